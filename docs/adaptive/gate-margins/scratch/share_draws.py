"""Scratch (not a stage): the grey-box attacks that know of the offset share, judged by the product's
four-part gate under six calibration draws (2026-12-05). Two sets: concentration.py's, aimed at the
four-part gate, and share_in_head.py's, aimed at the three parts with the share inside `head` (which
pass the product's gate 0/5 · 4/6 under the run's draw: product_share.py). Draws as concentration.py's
(three disjoint 20s of the 60 clean networks, three 40s; the rest scored as fresh).

    python share_draws.py OUT   # writes OUT/share_draws.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from concentration import DRAWS_20, DRAWS_40, draw_row, stored_sets, working

PARTS = ("head", "output-spectrum", "margins", "head.offset-share")


def main(out: Path) -> None:
    from lab.adaptive import AdaptiveConfig
    from lab.adaptive_input import stored_run
    from lab.adaptive_margins import gate_with_margins
    from lab.paper import run_config

    c = run_config(out, AdaptiveConfig)
    ws, nets, _, clean_acc = stored_run(out, c, lambda m: None, None)
    gate = gate_with_margins(ws, nets, c)  # the product's: its fit is the statistics; draws re-cut them
    extra = (("aimed", "concentration_networks.safetensors"), ("sih", "share_in_head.safetensors"))
    sets = stored_sets(out, nets, extra)
    X = {k: np.array([[gate.score(n.tensors)[p] for p in PARTS] for n in v]) for k, v in sets.items()}
    ok = working(sets, clean_acc)
    grey = ("excess", "floor", "aimed", "sih")
    lines = [
        "per calibration draw: fresh clean blocked, stored suite working attacks passed (not white-box · "
        "white-box), grey-box attacks passed of " + " · ".join(grey) + ", lr x2 blocked",
        "",
        "| gate | draws | draw 1 | draw 2 | draw 3 |",
        "|---|---|---|---|---|",
    ]
    for label, cols in (("three parts", [0, 1, 2]), ("four parts", [0, 1, 2, 3])):
        for name, draws in (("20", DRAWS_20), ("40", DRAWS_40)):
            lines.append(f"| {label} | {name} | " + draw_row(X, ok, sets, cols, grey, draws) + " |")
    text = "\n".join(lines) + "\n"
    (out / "share_draws.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
