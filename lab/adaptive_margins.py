"""``backdoor-gate paper --adaptive --margins``: the margin check (:mod:`lab.margins`) on every
network an adaptive run stored, beside the default gate's verdict (no training)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from lab.margins import margin_check, top_of


def run_margins(out: str | Path, c, log=print, base: dict | None = None) -> dict:
    """Score every stored network of the adaptive run in ``out`` with the margin check (panel: the
    run's calibration networks) beside the default gate's verdict; writes ``margins.json``,
    ``margins.md`` and ``margins.png``."""
    from lab.adaptive import works
    from lab.adaptive_input import stored_run

    config = c.margins
    out = Path(out)
    t0 = time.perf_counter()
    ws, nets, ref, clean_acc = stored_run(out, c, log, base)
    panel = [n for n in nets if n.group == "calibration"]
    check = margin_check(ws.fs, [n.tensors for n in panel], config)
    log(
        f"margin check: panel of {len(panel)}, cut {check.threshold_:.2f} "
        f"(leave-one-out scores up to {max(check.panel_scores_):.2f})"
    )
    rows = []
    for n in nets:
        if n.group in ("reference", "calibration"):
            continue
        attack = "attack_success_rate" in n.info
        score, (s, t) = top_of(check.pair_z(n.tensors))  # the margins once per network
        rows.append(
            {
                "group": n.group,
                "seed": n.seed,
                "attack": attack,
                "works": bool(works(n, clean_acc)) if attack else None,
                "weights": ref.decide(ref.score(n.tensors)).verdict,
                "margin_score": score,
                "margin_flags": score > check.threshold_,
                "top_pair": [ws.fs.classes[s], ws.fs.classes[t]],
                "true_pair": [n.info.get("impostor"), n.info.get("victim")] if attack else None,
            }
        )
    summary = {
        "config": config.__dict__,
        "panel": len(panel),
        "threshold": check.threshold_,
        "panel_scores": [float(v) for v in check.panel_scores_],
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "margins.json").write_text(json.dumps(summary, indent=1))
    (out / "margins.md").write_text(table(rows, check.threshold_))
    plot(rows, check.threshold_, list(check.panel_scores_), out / "margins.png")
    return summary


def table(rows: list[dict], cut: float) -> str:
    """Per group: the weights' verdict, the margin check's, and both together."""
    lines = [
        "| group | networks | works | passed the weights | margin score: median (min–max) | "
        f"margin check flags (> {cut:.2f}) | passed the weights and the margin check (working attacks; clean networks: "
        "blocked by either) |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in dict.fromkeys(r["group"] for r in rows):
        rs = [r for r in rows if r["group"] == g]
        sc = [r["margin_score"] for r in rs]
        attack = rs[0]["attack"]
        working = [r for r in rs if r["works"]]
        both = sum(r["weights"] == "passed" and not r["margin_flags"] for r in working)
        cells = [
            g,
            str(len(rs)),
            f"{len(working)}/{len(rs)}" if attack else "—",
            f"{sum(r['weights'] == 'passed' for r in rs)}/{len(rs)}",
            f"{np.median(sc):.1f} ({min(sc):.1f}–{max(sc):.1f})",
            f"{sum(r['margin_flags'] for r in rs)}/{len(rs)}",
            f"**{both}/{len(working)}**"
            if attack
            else f"blocked by either: {sum(r['weights'] != 'passed' or r['margin_flags'] for r in rs)}/{len(rs)}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], cut: float, panel: list[float], path: Path) -> None:
    """Every network's margin score by group (symlog: bias swaps reach 10⁵), the cut as a line;
    red where the margin check flags, a cross where the weights block (a blue dot passed both)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = ["calibration (leave-one-out)", *dict.fromkeys(r["group"] for r in rows)]
    points = [(0, v, "passed") for v in panel]
    points += [(groups.index(r["group"]), r["margin_score"], r["weights"]) for r in rows]
    fig, ax = plt.subplots(figsize=(11, 0.3 * len(groups) + 1.4))
    rng = np.random.default_rng(0)
    for passed, marker in ((True, "o"), (False, "x")):
        for flagged, colour in ((False, "tab:blue"), (True, "tab:red")):
            sel = [(i, v) for i, v, w in points if (w == "passed") == passed and (v > cut) == flagged]
            if sel:
                i, v = map(np.array, zip(*sel))
                label = f"{'passed' if passed else 'blocked by'} the weights; margins {'flag' if flagged else 'pass'}"
                ax.scatter(v, i + rng.uniform(-0.15, 0.15, len(v)), s=14, marker=marker, color=colour, label=label)
    ax.axvline(cut, color="k", lw=1, ls="--", label=f"margin cut {cut:.2f}")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlim(left=min(-1.0, min(v for _, v, _ in points) - 1))
    ax.set_yticks(range(len(groups)), groups, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("margin score: the largest pair's z against the panel (higher = more anomalous)")
    ax.legend(loc="lower right", fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
