"""Scratch (not a stage): the two fused cuts of loo_cut.py on a stored paper run (2026-12-06). The
default fitted and calibrated as ``paper --rescore`` fits it; every network's parts scored once; then
blocked per group under each cut (the run's 20 calibration networks), and each cut's expected fresh
false rejection over 300 random 20/20 splits of the run's 40 clean networks (held-out + weighting).

    python loo_paper.py RUN [RUN ...]   # writes RUN/loo_paper.txt; the pooled line is printed
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from concentration_paper import stored_paper_run
from loo_cut import RULES, cut, fused_z

from detector.config import DEFAULT_DETECTOR
from detector.detectors import make_reference


def main(runs: list[Path]) -> None:
    rng = np.random.default_rng(0)
    pooled = {r: [] for r in RULES}
    for out in runs:
        lab, W, groups, gallery, rc = stored_paper_run(out)
        g = make_reference(DEFAULT_DETECTOR, rc, gallery=gallery)
        g.fit([W[i] for i in groups["reference"]], base=lab.base).calibrate([W[i] for i in groups["held-out"]])
        parts = list(g.thresholds_)
        X = np.array([[g.score(w)[p] for p in parts] for w in W])
        cal = X[groups["held-out"]]
        lines = [f"{out.name}: blocked per group, cut on the run's 20 calibration networks: " + " · ".join(RULES), ""]
        lines += ["| group | networks | " + " | ".join(RULES) + " |", "|---|---|---|---|"]
        cuts = {r: cut({j: cal[:, j] for j in range(len(parts))}, 0.05, r) for r in RULES}
        for grp, idx in groups.items():
            if grp != "reference":
                cells = [f"{int((fused_z(X[idx], cuts[r][0]) < cuts[r][1]).sum())}/{len(idx)}" for r in RULES]
                lines.append(f"| {grp} | {len(idx)} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("fused cuts: " + ", ".join(f"{r} {cuts[r][1]:.2f}" for r in RULES))
        clean = X[np.r_[groups["held-out"], groups["weighting"]]]
        for r in RULES:
            frr = []
            for _ in range(300):
                perm = rng.permutation(len(clean))
                c, f = clean[perm[:20]], clean[perm[20:]]
                st, t, _ = cut({j: c[:, j] for j in range(len(parts))}, 0.05, r)
                frr.append(float(np.mean(fused_z(f, st) < t)))
            pooled[r] += frr
            splits = f"300 random 20/20 splits of {len(clean)}"
            lines.append(f"{r}: expected fresh false rejection over {splits}: {np.mean(frr):.3f}")
        text = "\n".join(lines) + "\n"
        (out / "loo_paper.txt").write_text(text)
        print(text)
    print("pooled: " + ", ".join(f"{r} {np.mean(v):.3f}" for r, v in pooled.items()))


if __name__ == "__main__":
    main([Path(a) for a in sys.argv[1:]])
