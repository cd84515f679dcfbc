"""Scratch (not a stage): the share part (``concentration.py``) on the paper's three protocols'
stored networks: the default gate fitted and calibrated as ``paper --rescore`` fits it, then the
same gate with the share part added (four parts, one fused cut on the same 20 held-out
networks); how many of each group each blocks (2026-12-05).

    python concentration_paper.py RUN   # RUN: a finished paper run; writes RUN/concentration_paper.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from concentration import ShareGate

from detector.config import DEFAULT_DETECTOR, ReferenceConfig
from detector.detectors import make_reference
from detector.margins import DEFAULT_FACES
from lab.margins import lab_gallery
from lab.paper import NETWORKS_FILE, PaperConfig, _Lab, backdoor_status, detection_groups, load_networks, run_config


def stored_paper_run(out: Path):
    """(the run's lab, every network's tensors, the detection groups, the gallery ``paper --rescore``
    draws, the run's reference config): what a study of a finished paper run starts from."""
    config = run_config(out, PaperConfig)
    lab = _Lab(config, None, lambda m: None)
    nets, W = load_networks(out / NETWORKS_FILE)
    clean_acc = float(np.mean([n["clean_accuracy"] for n in nets if n["group"] in ("reference", "held-out")]))
    for n in nets:
        if "attack_success_rate" in n:
            n["status"] = backdoor_status(n, clean_acc)
    gallery = lab_gallery(lab.fs, DEFAULT_FACES, seed=0)
    return lab, W, detection_groups(nets), gallery, ReferenceConfig.from_dict(config.reference)


def blocked_table(groups: dict, rows: list, names: tuple[str, str], keys: tuple) -> list[str]:
    """Markdown rows: per group but the reference networks, how many each of two gates blocked
    (``rows[i][key]``: network i blocked by the gate under ``key``)."""
    lines = [f"| group | networks | {names[0]} | {names[1]} |", "|---|---|---|---|"]
    for g, idx in groups.items():
        if g != "reference":
            a, b = (sum(rows[i][k] for i in idx) for k in keys)
            lines.append(f"| {g} | {len(idx)} | {a}/{len(idx)} | {b}/{len(idx)} |")
    return lines


def main(out: Path) -> None:
    lab, W, groups, gallery, rc = stored_paper_run(out)
    gate = make_reference(DEFAULT_DETECTOR, rc, gallery=gallery)
    gate.fit([W[i] for i in groups["reference"]], base=lab.base).calibrate([W[i] for i in groups["held-out"]])
    sgate = ShareGate(gate, [W[i] for i in groups["held-out"]])
    rows = []
    for w in W:
        gs = gate.score(w)
        rows.append((gate.decide(gs).verdict != "passed", sgate.decide(sgate.score(w, gs)).verdict != "passed"))
    lines = [
        f"{out.name}: blocked, today's default · with the share part (cuts {sgate.thresholds_})",
        "",
        *blocked_table(groups, rows, ("today's default", "+ share"), (0, 1)),
    ]
    text = "\n".join(lines) + "\n"
    (out / "concentration_paper.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
