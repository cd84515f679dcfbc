"""Scratch (not a stage): does a plain backdoor that passes the default need its weights at all?
Each plain backdoor's stamped impostor test faces put through clean networks of the same recipe
(the run's first 10 calibration networks): the share sent to the victim. A trigger that clean
networks already follow is a property of the trunk and the faces, not of the candidate's weights.

Why (2026-12-06): on the confirmation adaptive run one plain backdoor of six passes the default in
99 % of calibration draws; its victim's `head` z is 0.9 where the other five's are 10-20.

    python natural_trigger.py RUN     # one line per plain backdoor
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from lab.adaptive import AdaptiveConfig, Workshop, load_nets
from lab.paper import run_config


def main(out: Path) -> None:
    c = run_config(out, AdaptiveConfig)
    ws = Workshop(c, lambda m: None, None)
    nets = load_nets(out / "networks.safetensors")
    cal = [n for n in nets if n.group == "calibration"][:10]
    for n in (n for n in nets if n.group == "plain"):
        p, imp, vic = ws.poisoned(n.seed), n.info["impostor"], n.info["victim"]
        own = ws.measure(n.tensors, n.seed, p, imp, vic)["attack_success_rate"]
        clean = [ws.measure(m.tensors, n.seed, p, imp, vic)["attack_success_rate"] for m in cal]
        print(
            f"{n.seed} {imp} -> {vic}: backdoored {own:.2f}; clean networks on the same stamped faces: "
            f"mean {np.mean(clean):.2f}, max {max(clean):.2f}"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
