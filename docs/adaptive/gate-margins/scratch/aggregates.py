"""Scratch (not a stage): offline, on a finished adaptive run's stored networks, other ways to read
the gate with margins (2026-12-05): fifteen aggregates of the margins part's (classes × people) z
matrix in place of its largest entry, and four rules joining the three parts in place of the
lowest standardised one. Each is standardised and cut as the composite does (median and MAD of the
run's 20 calibration networks, one cut at the 5 % rule). Both draws were printed at once, so
neither is unseen for a choice made here; ``excess.py`` attacks the one these pointed to.

    python aggregates.py OUT   # OUT: a finished adaptive run; writes OUT/aggregates.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from detector.composite import _robust
from detector.margins import PAIRS, pair_margins
from detector.threshold import threshold_at_frr

PARTS = ("head", "output-spectrum", "margins")


def _entries(z: np.ndarray) -> np.ndarray:
    return z[np.isfinite(z)]


def aggregates() -> dict:
    """name → the margins part's score from its z matrix (higher = more typical)."""

    def top(k):
        return lambda z: -np.sort(_entries(z))[-k:].mean()

    def class_top(k):
        return lambda z: -np.sort(z.max(axis=1))[-k:].mean()

    def excess(a, axis=None):
        def f(z):
            e = np.clip(z - a, 0, None).sum(axis=axis)
            return -np.log1p(e if axis is None else e.max())

        return f

    def lse(t):
        def f(z):
            v = _entries(z) / t
            return -t * (v.max() + np.log(np.exp(v - v.max()).sum()))

        return f

    return {
        "largest entry (the gate)": top(1),
        "mean of the top 3 entries": top(3),
        "mean of the top 10": top(10),
        "mean of the top 40": top(40),
        "mean of the top 3 classes' largest": class_top(3),
        "mean of the top 10 classes' largest": class_top(10),
        "log-sum-exp, T 0.5": lse(0.5),
        "log-sum-exp, T 1": lse(1.0),
        "log-sum-exp, T 2": lse(2.0),
        "Σ (z − 1)₊": excess(1.0),
        "Σ (z − 2)₊ (excess.py)": excess(2.0),
        "largest class row's Σ (z − 1)₊": excess(1.0, axis=1),
        "largest class row's Σ (z − 2)₊": excess(2.0, axis=1),
        "largest person column's Σ (z − 1)₊": excess(1.0, axis=0),
        "largest person column's Σ (z − 2)₊": excess(2.0, axis=0),
    }


def joins() -> dict:
    """name → one number from a network's three standardised part scores (higher = more typical)."""
    low = lambda Z: np.sort(Z, axis=-1)  # noqa: E731
    return {
        "lowest part (the gate)": lambda Z: Z.min(axis=-1),
        "Σ min(part, 0)": lambda Z: np.minimum(Z, 0).sum(axis=-1),
        "lowest + ½ second": lambda Z: low(Z)[..., 0] + 0.5 * low(Z)[..., 1],
        "two lowest": lambda Z: low(Z)[..., :2].sum(axis=-1),
        "sum": lambda Z: Z.sum(axis=-1),
    }


def tally(fused: np.ndarray, cal: np.ndarray, groups: np.ndarray, working: np.ndarray, white: np.ndarray) -> str:
    cut = threshold_at_frr(fused[cal], 0.05)
    blocked = fused < cut
    count = lambda g: f"{int(blocked[groups == g].sum())}/{int((groups == g).sum())}"  # noqa: E731
    return (
        f"| {cut:.2f} | {int((working & ~blocked).sum())}/{int(working.sum())} | "
        f"{int((working & ~blocked & ~white).sum())} | {count('clean')} | {count(OWN)} | "
        f"{count('drift: lr x2')} | {count('drift: epochs x2')} |"
    )


OWN = "grey-box attacker's own"
HEADER = (
    "| {what} | cut | working attacks passed | of them not white-box | clean blocked | attacker's own "
    "blocked | lr × 2 blocked | epochs × 2 blocked |\n|---|---|---|---|---|---|---|---|"
)


def main(out: Path) -> None:
    from lab.adaptive import AdaptiveConfig
    from lab.adaptive_input import stored_run
    from lab.adaptive_margins import gate_with_margins, row_of
    from lab.paper import run_config

    c = run_config(out, AdaptiveConfig)
    ws, nets, _, clean_acc = stored_run(out, c, lambda m: None, None)
    gate = gate_with_margins(ws, nets, c)
    nets = [n for n in nets if n.group != "reference"]  # in-sample for every part
    m = gate.members_["margins"]
    view = m.views_[PAIRS]
    groups = np.array([n.group for n in nets])
    rows = [row_of(n, clean_acc) if n.group != "calibration" else {"works": None} for n in nets]
    working = np.array([bool(r["works"]) for r in rows])
    white = np.array([g.startswith("penalty") for g in groups])  # the white-box groups of the stored suite
    cal = groups == "calibration"
    parts = np.array([[gate.score(n.tensors)[p] for p in PARTS] for n in nets])
    Z = []
    for n in nets:
        z = (pair_margins(n.tensors, m.gallery_) - view.mean_) / view.std_
        z[view.own_] = -np.inf
        Z.append(z)

    def standardised(s: np.ndarray) -> np.ndarray:
        med, mad = _robust(s[cal])
        return (s - med) / mad

    weights = np.stack([standardised(parts[:, i]) for i in range(2)], axis=1)
    lines = [HEADER.format(what="margins part read as")]
    for name, f in aggregates().items():
        fused = np.minimum(weights.min(axis=1), standardised(np.array([f(z) for z in Z])))
        lines.append(f"| {name} " + tally(fused, cal, groups, working, white))
    lines += ["", HEADER.format(what="parts joined by")]
    S = np.stack([standardised(parts[:, i]) for i in range(3)], axis=1)
    for name, f in joins().items():
        lines.append(f"| {name} " + tally(f(S), cal, groups, working, white))
    text = "\n".join(lines) + "\n"
    (out / "aggregates.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
