"""``backdoor-gate paper --adaptive --margins``: the margin check (:mod:`lab.margins`) on every
network an adaptive run stored, beside the default gate's verdict (no training)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from lab.margins import margin_check, top_of


def scored(nets) -> list:
    """The stored networks a stage scores: every one but the gate's reference and calibration."""
    return [n for n in nets if n.group not in ("reference", "calibration")]


def row_of(n, clean_acc: float) -> dict:
    """What every stage's row says of a network: its group and seed, and whether an attack works."""
    from lab.adaptive import works

    attack = "attack_success_rate" in n.info
    return {"group": n.group, "seed": n.seed, "attack": attack, "works": bool(works(n, clean_acc)) if attack else None}


def run_margins(out: str | Path, c, log=print, base: dict | None = None) -> dict:
    """Score every stored network of the adaptive run in ``out`` with the margin check (panel: the
    run's calibration networks) beside the default gate's verdict; writes ``margins.json``,
    ``margins.md`` and ``margins.png``."""
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
    for n in scored(nets):
        row = row_of(n, clean_acc)
        score, (s, t) = top_of(check.pair_z(n.tensors))  # the margins once per network
        rows.append(
            {
                **row,
                "weights": ref.decide(ref.score(n.tensors)).verdict,
                "margin_score": score,
                "margin_flags": score > check.threshold_,
                "top_pair": [ws.fs.classes[s], ws.fs.classes[t]],
                "true_pair": [n.info.get("impostor"), n.info.get("victim")] if row["attack"] else None,
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


#: The gate with the margins deciding beside the weights (what ``--gate-margins`` measures).
GATE_WITH_MARGINS = "head+output-spectrum+margins"


def run_gate_margins(out: str | Path, c, log=print, base: dict | None = None) -> dict:
    """The product's ``margins`` detector deciding with the default, fitted as the gate fits it:
    the run's reference networks for the statistics, its calibration networks for one cut at
    the target FRR shared by the three parts. Every stored network is scored beside the default
    gate's verdict; writes ``gate_margins.json`` and ``gate_margins.md``."""
    from lab.adaptive_input import stored_run

    out = Path(out)
    t0 = time.perf_counter()
    ws, nets, default, clean_acc = stored_run(out, c, log, base)
    gate = gate_with_margins(ws, nets, c)
    log(f"{GATE_WITH_MARGINS}: thresholds {gate.thresholds_} (fused cut {gate.fused_threshold_:.3f})")
    rows = [{**row_of(n, clean_acc), **gate_verdicts(n, gate, default)} for n in scored(nets)]
    summary = {
        "detector": GATE_WITH_MARGINS,
        "thresholds": gate.thresholds_,
        "fused_threshold": gate.fused_threshold_,
        "calibration_frr": gate.frr_empirical_,
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "gate_margins.json").write_text(json.dumps(summary, indent=1))
    (out / "gate_margins.md").write_text(gate_table(rows))
    return summary


def gate_verdicts(n, gate, default) -> dict:
    """What a row says of the gate with margins beside the default: both verdicts, the parts
    below their cuts and the part scores."""
    scores = gate.score(n.tensors)
    decision = gate.decide(scores)
    return {
        "default": default.decide(default.score(n.tensors)).verdict,
        "gate": decision.verdict,
        "below": list(decision.below),
        "scores": scores,
    }


def gate_with_margins(ws, nets, c, draw: int = 0, groups: tuple[str, str] = ("reference", "calibration")):
    """The gate with margins fitted as the product fits it: a gallery of ``c.margins.faces`` faces
    of every person (draw 0 is the lab's, the gate's; an attacker draws its own), the statistics
    on the ``groups[0]`` networks, one cut at the target FRR on the ``groups[1]`` ones (a list of
    networks each, or group names)."""
    from detector.composite import CompositeReference
    from detector.detectors import make_reference
    from lab.margins import lab_gallery

    gallery = lab_gallery(ws.fs, c.margins.faces, c.margins.seed + draw)
    fit, cal = (
        [n.tensors for n in nets if n.group == g] if isinstance(g, str) else [n.tensors for n in g] for g in groups
    )
    gate = make_reference(GATE_WITH_MARGINS, gallery=gallery)
    assert isinstance(gate, CompositeReference)
    return gate.fit(fit, base=ws.base).calibrate(cal)


def gate_table(rows: list[dict]) -> str:
    """Per group: passed the default gate, passed the gate with margins, and which part blocked."""
    lines = [
        f"| group | networks | works | passed `{'head+output-spectrum'}` | passed `{GATE_WITH_MARGINS}` "
        "(working attacks; clean networks: blocked) | blocked with `margins` below its cut |",
        "|---|---|---|---|---|---|",
    ]
    for g in dict.fromkeys(r["group"] for r in rows):
        rs = [r for r in rows if r["group"] == g]
        attack = rs[0]["attack"]
        counted = [r for r in rs if r["works"]] if attack else rs
        passed = lambda key, counted=counted: sum(r[key] == "passed" for r in counted)  # noqa: E731
        cells = [
            g,
            str(len(rs)),
            f"{len(counted)}/{len(rs)}" if attack else "—",
            f"{passed('default')}/{len(counted)}" if attack else f"blocked {len(rs) - passed('default')}/{len(rs)}",
            f"**{passed('gate')}/{len(counted)}**" if attack else f"blocked {len(rs) - passed('gate')}/{len(rs)}",
            f"{sum('margins' in r['below'] for r in rs)}/{len(rs)}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
