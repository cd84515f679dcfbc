"""Scratch (not a stage): the offset share inside `head` rather than as a fourth part
(``concentration.py``): the network's −max_c log share_c z-scored against the reference networks
(each scored leave-one-out in the others' metric, as `head` scores the network's shape), joined to
`head`'s vector so its lowest entry is `head`'s score; then the gate's three parts cut as today.
Offline on the stored networks, under the three calibration draws of ``concentration.py suite``
(2026-12-05): how the product form would compare before it is built.

    python concentration_in_head.py OUT   # writes OUT/concentration_in_head.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from concentration import draw_row, share_score, stored_sets, whitened, working


def reference_shares(view, matrices: list[np.ndarray]) -> np.ndarray:
    """Each reference network's share score in the metric of the others (as ``fit`` scores them)."""
    S = np.stack([np.asarray(H, dtype=np.float64) for H in matrices])
    out = []
    for i in range(len(S)):
        others = np.delete(S, i, axis=0)
        c = others.mean(axis=0)
        U, w, floor = view._metric(others - c, view.rank)
        loo = type("LOO", (), {"directions_": U, "weights_": w, "floor_": floor})
        V, q = whitened(loo, S[i] - c)
        out.append(-float(np.max(np.log(V.max(1) / q))))
    return np.asarray(out)


def main(out: Path) -> None:
    from lab.adaptive import AdaptiveConfig
    from lab.adaptive_input import stored_run
    from lab.adaptive_margins import gate_with_margins
    from lab.paper import run_config

    c = run_config(out, AdaptiveConfig)
    ws, nets, _, clean_acc = stored_run(out, c, lambda m: None, None)
    gate = gate_with_margins(ws, nets, c)
    head = gate.members_["head"]
    view = head.views_["classes"]
    ref = reference_shares(view, [head._head_matrix(n.tensors, n.group) for n in nets if n.group == "reference"])
    med, std = float(np.median(ref)), float(ref.std(ddof=1))
    sets = stored_sets(out, nets, (("aimed", "concentration_networks.safetensors"),))
    X = {}
    for k, v in sets.items():
        rows = []
        for n in v:
            s = gate.score(n.tensors)
            z = (share_score(view, head._head_matrix(n.tensors, n.group)) - med) / std
            rows.append([s["head"], s["output-spectrum"], s["margins"], min(s["head"], z)])
        X[k] = np.array(rows)
    ok = working(sets, clean_acc)
    lines = [
        f"reference networks' share score (leave-one-out): median {med:.3f}, std {std:.3f}, min {ref.min():.3f}",
        "",
        "per calibration draw: fresh clean blocked, stored suite passed (not white-box · white-box), grey-box "
        "attacks of excess.py · head_floor.py · concentration.py (aimed at the four-part gate) passed, lr x2 blocked",
        "",
        "| gate | draw 1 | draw 2 | draw 3 |",
        "|---|---|---|---|",
    ]
    for label, cols in (("today's", [0, 1, 2]), ("share inside head", [3, 1, 2])):
        lines.append(f"| {label} | " + draw_row(X, ok, sets, cols, ("excess", "floor", "aimed")) + " |")
    text = "\n".join(lines) + "\n"
    (out / "concentration_in_head.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
