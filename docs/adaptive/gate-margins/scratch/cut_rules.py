"""Scratch (not a stage): does another way of cutting the gate with margins stop the attack that
holds every margin low (``excess.py``'s grey-box networks), at the same false rejection? Offline,
after ``calibration_size.py`` and ``excess.py`` (2026-12-05). Every part score is computed once (the
parts are fitted on the reference networks only); then, under three disjoint calibration draws of
20 from the 60 clean networks of the calibration scheme (the other 40 scored as fresh clean):

* each part standardised by its median and another spread than the MAD (a tail quantile, the std,
  the lower semi-deviation), so the part with the heaviest tail sets less of the others' cuts;
* the `head` part's per-class std floored at a fraction of its median over classes, as the
  margins part floors its entries' (its clean maximum over classes is then less heavy-tailed).

Both draws' figures were printed at once: leads, not choices.

    python cut_rules.py OUT   # OUT: a finished adaptive run; writes OUT/cut_rules.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from detector.composite import _robust, fused_cut

SPREADS = {
    "MAD (the gate)": lambda s: _robust(s),
    "10 % quantile": lambda s: (np.median(s), (np.median(s) - np.quantile(s, 0.1)) / 1.2816),
    "20 % quantile": lambda s: (np.median(s), (np.median(s) - np.quantile(s, 0.2)) / 0.8416),
    "std": lambda s: (np.median(s), s.std(ddof=1)),
    "lower semi-deviation": lambda s: (np.median(s), np.sqrt(np.mean((s[s < np.median(s)] - np.median(s)) ** 2))),
}
HEAD_FLOORS = (0.0, 0.5, 1.0)


def evaluate(pool, suite, aimed, working, white, grey, spread) -> str:
    cells = []
    for k in range(3):
        cal, fresh = pool[20 * k : 20 * k + 20], np.delete(pool, np.s_[20 * k : 20 * k + 20], axis=0)
        st, cut, _ = fused_cut({j: cal[:, j] for j in range(3)}, 0.05, spread)

        def fused(X, st=st):
            return np.min([(X[:, j] - st[j][0]) / st[j][1] for j in range(3)], axis=0)

        cells.append(
            f"{int((fused(fresh) < cut).sum())}/40, {int((working & ~white & (fused(suite) >= cut)).sum())}, "
            f"{int((grey & (fused(aimed) >= cut)).sum())}/{int(grey.sum())}"
        )
    return " | ".join(cells)


def main(out: Path) -> None:
    from lab.adaptive import AdaptiveConfig, load_nets, works
    from lab.adaptive_input import stored_run
    from lab.adaptive_margins import gate_with_margins, scored
    from lab.paper import run_config

    c = run_config(out, AdaptiveConfig)
    ws, nets, _, clean_acc = stored_run(out, c, lambda m: None, None)
    gate = gate_with_margins(ws, nets, c)
    sets = {
        "pool": [n for n in nets if n.group == "calibration"] + load_nets(out / "extra_calibration.safetensors"),
        "suite": scored(nets),
        "aimed": load_nets(out / "excess_networks.safetensors"),
    }
    parts = ("head", "output-spectrum", "margins")
    S = {k: np.array([[gate.score(n.tensors)[p] for p in parts] for n in v]) for k, v in sets.items()}
    working = np.array(["attack_success_rate" in n.info and bool(works(n, clean_acc)) for n in sets["suite"]])
    white = np.array([n.group.startswith("penalty") for n in sets["suite"]])
    grey = np.array([n.group.startswith("grey") and bool(works(n, clean_acc)) for n in sets["aimed"]])
    head = gate.members_["head"]
    view = head.views_["classes"]
    scale = view.scale_.copy()
    lines = [
        "each cell, per calibration draw (the run's 20 | 20 new | 20 new): fresh clean blocked, working "
        "attacks of the stored suite passed (not white-box), the attack holding every margin low passed",
        "",
        "| parts standardised by | draw 1 | draw 2 | draw 3 |",
        "|---|---|---|---|",
    ]
    for name, spread in SPREADS.items():
        lines.append(f"| {name} | " + evaluate(S["pool"], S["suite"], S["aimed"], working, white, grey, spread) + " |")
    lines += ["", "| `head`'s per-class std floored at | draw 1 | draw 2 | draw 3 |", "|---|---|---|---|"]
    for f in HEAD_FLOORS:
        view.scale_ = np.maximum(scale, f * np.median(scale))
        X = {k: v.copy() for k, v in S.items()}
        for k, v in sets.items():
            X[k][:, 0] = [view.score(head._head_matrix(n.tensors, n.group)) for n in v]
        row = evaluate(X["pool"], X["suite"], X["aimed"], working, white, grey, SPREADS["MAD (the gate)"])
        lines.append(f"| {f:g} × its median | " + row + " |")
    view.scale_ = scale
    text = "\n".join(lines) + "\n"
    (out / "cut_rules.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
