"""Scratch (not a stage): the offset share built into the product (``head``'s second view, cut as a
part of its own beside the margins; 2026-12-05) checked against concentration.py's lab form on a
stored adaptive run: the four cuts, and the verdicts on the attacks concentration.py aimed at the
four-part gate (read back from OUT/concentration_networks.safetensors); then every stored attack of
the run judged by the product's gate under the run's calibration draw (the attacker table's column).

    python product_share.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch


def main(out: Path) -> None:
    from lab.adaptive import AdaptiveConfig, deciding_parts, load_nets, torch_anomaly, works
    from lab.adaptive_input import stored_run
    from lab.adaptive_margins import gate_with_margins
    from lab.paper import run_config

    c = run_config(out, AdaptiveConfig)
    ws, nets, _, clean_acc = stored_run(out, c, lambda m: None, None)
    gate = gate_with_margins(ws, nets, c)
    lab = json.loads((out / "concentration.json").read_text())
    names = {"head.offset-share": "share"}
    print("part | product cut | lab cut")
    for p, t in gate.thresholds_.items():
        print(f"{p} | {t:.6f} | {lab['thresholds'][names.get(p, p)]:.6f}")
    probe = next(n for n in nets if n.group == "clean")
    t = {k: torch.as_tensor(v) for k, v in probe.tensors.items()}
    est = dict(zip(gate.thresholds_, (e for e, _ in deciding_parts(gate))))["head.offset-share"]
    print(
        f"torch mirror {-float(torch_anomaly(est, t, {}).max()):.6f} "
        f"numpy {gate.score(probe.tensors)['head.offset-share']:.6f}"
    )
    aimed = load_nets(out / "concentration_networks.safetensors")
    rows = {(r["group"], r["seed"]): r for r in lab["rows"]}
    same = 0
    for group in dict.fromkeys(n.group for n in aimed):
        ok = [n for n in aimed if n.group == group and works(n, clean_acc)]
        verdicts = [gate.decide(gate.score(n.tensors)).verdict for n in ok]
        same += sum(v == rows[(n.group, n.seed)]["share_gate"] for n, v in zip(ok, verdicts))
        print(f"{group}: passed the product's four-part gate {verdicts.count('passed')}/{len(ok)}")
    print(f"verdicts equal to the lab form's: {same}/{sum(works(n, clean_acc) for n in aimed)}")
    s = [gate.score(n.tensors)["head.offset-share"] for n in aimed[:3]]
    lab_s = [rows[(n.group, n.seed)]["scores"]["share"] for n in aimed[:3]]
    print("share scores product", np.round(s, 6), "lab", np.round(lab_s, 6))
    gates = {"weights only": weights_only(ws, nets), "three parts": three_parts(ws, nets, c), "four parts": gate}
    stored(out, nets, gates, clean_acc)


def weights_only(ws, nets):
    """``head+output-spectrum`` fitted and calibrated on the same networks."""
    from detector.config import WEIGHTS_ONLY_DETECTOR
    from detector.detectors import make_reference

    fit, cal = ([n.tensors for n in nets if n.group == g] for g in ("reference", "calibration"))
    return make_reference(WEIGHTS_ONLY_DETECTOR).fit(fit, base=ws.base).calibrate(cal)


def three_parts(ws, nets, c):
    """The gate as it was before the share (its head without the second view), fitted and calibrated
    on the same networks and gallery as :func:`lab.adaptive_margins.gate_with_margins`."""
    from detector.detectors import make_reference
    from detector.head import HeadReference
    from lab.adaptive_margins import GATE_WITH_MARGINS
    from lab.margins import lab_gallery

    gate = make_reference(GATE_WITH_MARGINS, gallery=lab_gallery(ws.fs, c.margins.faces, c.margins.seed))
    gate.members["head"] = HeadReference(gate.config)  # type: ignore[attr-defined]
    fit, cal = ([n.tensors for n in nets if n.group == g] for g in ("reference", "calibration"))
    return gate.fit(fit, base=ws.base).calibrate(cal)


#: the stored attacks beyond the suite: the file, and what aimed them
STORED = (
    ("excess_networks.safetensors", "excess.py: aimed at the three-part gate, margins as Σ (z − 2)₊"),
    ("head_floor_1.25.safetensors", "head_floor.py: aimed at the three-part gate with head's std floored"),
    ("share_in_head.safetensors", "share_in_head.py: aimed at the three-part gate with the share inside head"),
    ("concentration_networks.safetensors", "concentration.py: aimed at the four-part gate"),
)


def stored(out: Path, nets, gates: dict, clean_acc: float) -> None:
    """Working attacks passed (clean networks: blocked) per group, by each of ``gates``."""
    from lab.adaptive import load_nets, works
    from lab.adaptive_margins import scored

    print(f"\n| set | group | works | {' | '.join(gates)} (passed; clean: blocked) |")
    print("|---|---|---|" + "---|" * len(gates))
    sets = [("suite", scored(nets))] + [(label, load_nets(out / f)) for f, label in STORED]
    for label, ns in sets:
        for group in dict.fromkeys(n.group for n in ns):
            g = [n for n in ns if n.group == group]
            attack = "attack_success_rate" in g[0].info
            counted = [n for n in g if works(n, clean_acc)] if attack else g
            cells = []
            for gate in gates.values():
                v = [gate.decide(gate.score(n.tensors)).verdict for n in counted]
                cells.append(f"{v.count('passed')}/{len(v)}" if attack else f"{len(v) - v.count('passed')}/{len(v)}")
            works_cell = f"{len(counted)}/{len(g)}" if attack else "clean"
            print(f"| {label} | {group} | {works_cell} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
