"""The bench measures what ships (its figures are the README's cost targets)."""

from __future__ import annotations

import copy

import numpy as np

from detector.config import DEFAULT_DETECTOR, WEIGHTS_ONLY_DETECTOR
from detector.detectors import make_reference
from detector.head import HeadReference
from lab.bench import paper_family, shipped_members


def test_the_bench_builds_each_gate_s_members_as_make_reference_does():
    for detector in (DEFAULT_DETECTOR, WEIGHTS_ONLY_DETECTOR):
        members, shipped = shipped_members(detector), make_reference(detector).members
        assert list(members) == list(shipped) == detector.split("+")
        head = members["head"]
        assert isinstance(head, HeadReference)
        # the default's head carries its offset share and toward (the margins decide beside it)
        assert (head.share, head.toward) == ((True, True) if "margins" in members else (False, False))
        settings = ("rank", "normalize", "std_floor", "share", "toward", "victim_rule")
        assert [getattr(head, k) for k in settings] == [getattr(shipped["head"], k) for k in settings]


#: the targets each section is judged by (the README's cost table)
TARGETS_OF = {
    "head_training": {"head_training_speedup"},
    "reference_fit": {"reference_fit_speedup"},
    "gate": {"gate_seconds", "gate_peak_rss_mb"},
    **{
        g: {f"{g}_{k}_{c}" for k in ("seconds", "peak_rss_mb") for c in (40, 10_575)}
        for g in ("gate_default", "gate_weights_only")
    },
    "reference_fit_default": {
        "reference_fit_default_leave_one_out_seconds",
        "reference_fit_default_calibrated_seconds",
    },
    "explain": {"explain_96px_seconds", "explain_96px_peak_rss_mb"},
}


def test_a_partial_run_prints_and_judges_only_its_sections(tmp_path, capsys):
    """``bench --only``: each section's lines are the full table's own lines for it, its targets only
    its own; a name that is no section is refused before anything runs (the committed full run is
    the input: what ``make bench`` last wrote)."""
    import json
    from pathlib import Path

    from backdoor_gate.cli import main
    from lab.bench import SECTIONS, format_table, summary

    full = json.loads((Path(__file__).parents[2] / "bench" / "results.json").read_text())
    assert set(SECTIONS) <= set(full)
    full["summary"] = summary(full)
    body = set(format_table(full).splitlines()[3:-3])
    covered: set[str] = set()
    for name in SECTIONS:
        part = {k: full[k] for k in ("mode", "machine", "bench_seconds", name)} | {"only": [name]}
        part["summary"] = summary(part)
        lines = format_table(part).splitlines()
        assert f"only {name})" in lines[0]
        footer = ("targets missed", "all targets met", "no targets in these sections", "plot:", "bench")
        mine = [x for x in lines[3:] if x and not x.startswith(footer)]
        assert ("no targets in these sections" in lines) == (name not in TARGETS_OF), name
        assert mine and set(mine) <= body, name
        covered |= set(mine)
        assert set(part["summary"]["targets_met"]) == TARGETS_OF.get(name, set()), name
    assert covered == body  # every line of the full table belongs to one section
    assert main(["bench", "--only", "gate,nonsense", "--out-dir", str(tmp_path)]) == 2
    assert "no section nonsense" in capsys.readouterr().err and not any(tmp_path.iterdir())
    # each section draws from a copy of the family as it stands after the pool
    a = paper_family(0)
    b = copy.deepcopy(a)
    assert np.array_equal(a.clean(), b.clean())
