"""Scratch (not a stage): would the lr x 2 drift target be met if `head` counted for less in the cut?

Why: on the development adaptive run every lr x 2 retrain is blocked, by `head` alone (its largest class
z -9.6 to -13.5 against a cut of -3.3: a few classes move 1.5-1.6 times the network's median class
deviation, clean networks of the recipe at most 1.2). Here the fused score is min_p z_p / w_p with
w_head = w (the other parts 1), the cut re-set at 5 % FRR on the leave-one-out calibration scores as
the product sets it; the cached part scores of current.py's groups, the run's own draw of 20 and the
mean over 300 draws of 39.

    python head_weight.py RUN [RUN ...]    # prints one table per run (markdown)
"""
import sys
from pathlib import Path
import numpy as np
from current import _groups, family  # noqa: E402
from detector.composite import _loo_z, lower_spread
from detector.threshold import threshold_at_frr

N_DRAWS = 300
for run in sys.argv[1:]:
    rows, pool = _groups(Path(run))
    rng = np.random.default_rng(0)
    draws = [np.arange(20)] + [rng.choice(len(pool), 39, replace=False) for _ in range(N_DRAWS)]
    fams = {}
    for g, X, _, attack, _ in rows:
        fams.setdefault((family(g), attack), []).append(X)
    fams = {k: np.concatenate([x for x in v if len(x)]) for k, v in fams.items() if any(len(x) for x in v)}
    print(f"\n{Path(run).name}: rows = README's rows; cells: the run's draw · mean over {N_DRAWS} draws of 39")
    print("| w_head | fresh clean blocked | " + " | ".join(f"{f[0]} ({'passed' if f[1] else 'blocked'})" for f in fams) + " |")
    print("|---" * (len(fams) + 2) + "|")
    for w in (1.0, 1.5, 2.0, 3.0, 5.0):
        W = np.array([w, 1, 1, 1, 1.0])
        cells = {f: [] for f in fams}; frr = []
        for idx in draws:
            cal = pool[idx]
            st = [lower_spread(cal[:, j]) for j in range(5)]
            loo = np.min([_loo_z(cal[:, j], lower_spread) / W[j] for j in range(5)], axis=0)
            t = threshold_at_frr(loo, 0.05)
            z = lambda X: np.min([(X[:, j] - st[j][0]) / st[j][1] / W[j] for j in range(5)], axis=0)
            rest = np.delete(pool, idx, axis=0)
            frr.append(np.mean(z(rest) < t))
            for (f, attack), X in fams.items():
                cells[(f, attack)].append(np.sum(z(X) >= t) if attack else np.sum(z(X) < t))
        line = f"| {w:g} | {frr[0]*100:.1f} % · {np.mean(frr[1:])*100:.1f} % | " + " | ".join(
            f"{v[0]:.0f}/{len(fams[f])} · {np.mean(v[1:]):.2f}" for f, v in cells.items())
        print(line + " |")
