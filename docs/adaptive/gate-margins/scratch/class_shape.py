"""Scratch (not a stage): does the class `head` blocks an lr × 2 retrain by move where clean
training moves, unlike a backdoor's? Per stored network of an adaptive run: the `head` part's
most deviant class (its z) and that class's share of deviation outside the kept directions,
log(minor / major), as a robust z against the network's own classes. A retrain's up-weighted
pair moving along clean directions would read low, a backdoor's trigger direction high
(2026-12-05: it does not; the lr × 2 pair reads as high as plain backdoors).

    python class_shape.py OUT   # OUT: a finished adaptive run; writes OUT/class_shape.txt
"""

import sys
from pathlib import Path

import numpy as np

from detector.head import head_matrix
from detector.threshold import median_mad
from lab.adaptive import AdaptiveConfig
from lab.adaptive_input import stored_run
from lab.paper import run_config

out = Path(sys.argv[1])
c = run_config(out, AdaptiveConfig)
ws, nets, default, _ = stored_run(out, c, lambda m: None, None)
view = default.members_["head"].views_["classes"]
by: dict[str, list[tuple[float, float]]] = {}
for n in nets:
    major, minor, _ = view.statistic(head_matrix(n.tensors))
    zc, _ = view.z(head_matrix(n.tensors))
    top = int(np.argmax(zc))
    share = np.log(minor / major)
    med, mad = median_mad(share)
    by.setdefault(n.group, []).append((float(zc[top]), float((share[top] - med) / mad)))
lines = [
    "| group | networks | top class z (median) | its outside share, z among the network's classes: median (min–max) |",
    "|---|---|---|---|",
]
for g, v in by.items():
    z, s = np.array(v).T
    lines.append(f"| {g} | {len(v)} | {np.median(z):.1f} | {np.median(s):.2f} ({s.min():.2f} – {s.max():.2f}) |")
(out / "class_shape.txt").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
