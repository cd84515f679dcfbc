"""Artifacts published before the artifact code was refactored (tests/detector/data/reference_v1, made by
commit 3767f64's code: see make_fixture.py there) load, score exactly as they did, and are written
again in the same format; an edited one is still refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.artifact import ARRAYS_FILE, META_FILE
from detector.detectors import load_reference
from detector.errors import InvalidReference

V1 = Path(__file__).parent / "data" / "reference_v1"
EXPECTED = json.loads((V1 / "expected.json").read_text())
NAMES = sorted(EXPECTED["scores"])
#: fields a new save writes anew (when, by which version, digests) or words differently (free text)
_VOLATILE = {"created_at", "library_version", "files", "artifact_sha256", "members", "score_convention"}


def _probes() -> list[dict[str, torch.Tensor]]:
    with np.load(V1 / "probes.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    n = 1 + max(int(k.split("/", 1)[0]) for k in arrays)
    return [
        {k.split("/", 1)[1]: torch.from_numpy(a) for k, a in arrays.items() if k.startswith(f"{i}/")} for i in range(n)
    ]


def _tree(root: Path) -> dict[str, dict]:
    """Every reference.json under ``root`` (the composite's members too), by relative directory."""
    return {str(p.parent.relative_to(root)): json.loads(p.read_text()) for p in sorted(root.rglob(META_FILE))}


def test_the_fixture_covers_every_detector_and_the_shipped_composite():
    """Every weights-only detector, and the composite that was the default when v1 was written (the
    default since reads a gallery; its artifacts are written and read in test_detectors)."""
    from detector.config import DETECTORS, WEIGHTS_ONLY_DETECTOR

    assert set(NAMES) == set(DETECTORS) and WEIGHTS_ONLY_DETECTOR in NAMES


def _as_it_did(scores: dict, name: str):
    """The same arrays and arithmetic; only the last bits may differ, where LAPACK's SVD rounds
    differently on another CPU (seen: 3e-14 relative on the spectrum's score) or a sum is ordered
    otherwise (the GMM's dense log-density is one matmul since 2026-12-05: 1e-16). ``head``
    builds the candidate's matrix in float32 since 2026-12-05 (seen: 2.2e-6 relative)."""
    return pytest.approx(scores, rel=1e-5 if "head" in name.split("+") else 1e-10, abs=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_an_artifact_of_the_old_code_loads_and_scores_exactly_as_it_did(name):
    ref = load_reference(V1 / name)
    assert ref.detector == name  # a composite too: its name, the rule that decides
    probes = _probes()
    scores = [ref.score(p) for p in probes]
    assert scores == [_as_it_did(s, name) for s in EXPECTED["scores"][name]]
    assert [ref.assess(p).decision.verdict for p in probes] == EXPECTED["verdicts"][name]
    assert ref.artifact_sha256_ == json.loads((V1 / name / META_FILE).read_text())["artifact_sha256"]


@pytest.mark.parametrize("name", NAMES)
def test_a_loaded_old_artifact_is_saved_again_in_the_same_format(name, tmp_path):
    load_reference(V1 / name).save(tmp_path / "again")
    old, new = _tree(V1 / name), _tree(tmp_path / "again")
    assert set(old) == set(new)
    for d in old:
        assert {k: v for k, v in old[d].items() if k not in _VOLATILE} == {
            k: v for k, v in new[d].items() if k not in _VOLATILE
        }, d
        assert set(old[d]) == set(new[d]) and set(old[d].get("members", {})) == set(new[d].get("members", {}))
        with np.load(V1 / name / d / ARRAYS_FILE) as a, np.load(tmp_path / "again" / d / ARRAYS_FILE) as b:
            assert list(a.files) == list(b.files)
            for k in a.files:
                assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), (d, k)
    assert load_reference(tmp_path / "again").score(_probes()[3]) == _as_it_did(EXPECTED["scores"][name][3], name)


@pytest.mark.parametrize("name", ["gmm", "classifier", "head+output-spectrum"])
def test_an_edited_old_artifact_is_refused(name, tmp_path):
    shutil.copytree(V1 / name, tmp_path / "t1")
    meta_path = tmp_path / "t1" / META_FILE
    meta = json.loads(meta_path.read_text())
    meta["n_calibration"] += 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(InvalidReference, match="tampered: artifact_sha256"):
        load_reference(tmp_path / "t1")
    # re-hashed by the editor: its arrays no longer match
    shutil.copytree(V1 / name, tmp_path / "t2")
    (tmp_path / "t2" / ARRAYS_FILE).write_bytes((tmp_path / "t2" / ARRAYS_FILE).read_bytes() + b"\0")
    with pytest.raises(InvalidReference, match="tampered: arrays.npz"):
        load_reference(tmp_path / "t2")


def test_evaluate_reads_a_composite_artifact_as_its_rule_or_as_one_member(tmp_path, capsys):
    """``evaluate --reference`` on a composite (v1's default): ``--detector`` names the deciding rule
    or a member (the GMM evidence, say); any other detector is refused, naming those it holds."""
    from backdoor_gate.cli import main
    from detector.config import DEFAULT_EVIDENCE
    from detector.config import WEIGHTS_ONLY_DETECTOR as SHIPPED

    composite = V1 / SHIPPED
    assert json.loads((composite / META_FILE).read_text())["evidence"] == list(DEFAULT_EVIDENCE)
    paths = []
    for i, net in enumerate(_probes()):
        paths.append(str(tmp_path / f"probe{i}.pt"))
        torch.save(net, paths[-1])
    verdicts = EXPECTED["verdicts"]

    def evaluate(*detector: str) -> tuple[int, dict, str]:
        clean = [p for p, v in zip(paths, verdicts[SHIPPED]) if v == "passed"]
        bad = [p for p, v in zip(paths, verdicts[SHIPPED]) if v == "blocked"]
        argv = ["evaluate", "--reference", str(composite), *detector, "--clean", *clean, "--backdoored", *bad]
        rc = main([*argv, "--json"])
        out, err = capsys.readouterr()
        return rc, (json.loads(out) if rc == 0 else {}), err

    for detector, parts in (
        ((), {"head", "output-spectrum"}),
        (("--detector", SHIPPED), {"head", "output-spectrum"}),
        (("--detector", "head"), {"classes"}),
        (("--detector", "gmm"), {"forward", "backward"}),
    ):
        rc, out, err = evaluate(*detector)
        assert rc == 0, err
        assert out["detector"] == (detector[1] if detector else SHIPPED) and set(out["auc"]) == parts
    rc, out, _ = evaluate()
    assert out["detection_rate"]["combined"] == 1.0 and out["false_rejection_rate"]["combined"] == 0.0
    rc, _, err = evaluate("--detector", "classifier")
    assert rc == 2 and "not classifier" in err and "gmm, head, head+output-spectrum, output-spectrum" in err
