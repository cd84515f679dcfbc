"""The reviewer's report for one gated version: a PNG and an HTML page that embeds it.

Per view it shows (left) where the candidate's score falls among the clean networks' scores
and the threshold, and (right) a per-vector anomaly map: how far each of the candidate's
vectors (input features in the forward view, neurons in the backward view) is below what
the reference networks score for that same vector, in reference standard deviations.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np


def vector_deviation(calibration_vector_scores: np.ndarray, vector_scores: np.ndarray) -> np.ndarray:
    """(candidate − mean of clean calibration networks) / their std, per vector. Negative = unlikely.

    Calibration networks were not used to fit the GMM, so they show what a *new* clean
    network scores on each vector; in-sample reference scores would flag everything.
    """
    ref = np.asarray(calibration_vector_scores)
    mu, sd = ref.mean(axis=0), ref.std(axis=0)
    return (np.asarray(vector_scores) - mu) / np.where(sd > 0, sd, 1.0)


def _grid(values: np.ndarray) -> np.ndarray:
    n = values.size
    cols = int(math.ceil(math.sqrt(n * 2)))
    rows = int(math.ceil(n / cols))
    out = np.full(rows * cols, np.nan)
    out[:n] = values
    return out.reshape(rows, cols)


def write_report(out_dir: Path, reference, vector_scores: dict[str, np.ndarray], result) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    views = list(vector_scores)
    fig, axes = plt.subplots(len(views), 2, figsize=(12, 3.6 * len(views)), squeeze=False)
    worst: dict[str, list[tuple[int, float]]] = {}
    for row, v in enumerate(views):
        est = reference.views_[v]
        ax = axes[row][0]
        ref_scores = np.asarray(est.reference_scores_)
        cal = np.asarray(reference.calibration_scores_[v])
        ax.scatter(ref_scores, np.full_like(ref_scores, 1.0), marker="|", s=300, label=f"reference networks (n={ref_scores.size}, in-sample: optimistic)")
        ax.scatter(cal, np.full_like(cal, 0.0), marker="|", s=300, label=f"calibration ({reference.threshold_source_}, n={cal.size})")
        ax.axvline(reference.thresholds_[v], color="k", ls="--", label=f"threshold (FRR {reference.config.frr:g})")
        score = result.scores[v]
        ax.axvline(score, color="red" if score < reference.thresholds_[v] else "green", lw=2.5, label=f"candidate {score:.4g}")
        ax.set_yticks([0, 1], ["calibration", "reference"])
        ax.set_ylim(-0.8, 1.8)
        ax.set_title(f"{v} view: score (higher = more typical)", fontsize=10)
        ax.legend(fontsize=7, loc="best")
        dev = vector_deviation(reference.calibration_vector_scores_[v], vector_scores[v])
        ax = axes[row][1]
        lim = min(10.0, max(3.0, float(np.nanmax(np.abs(dev)))))
        im = ax.imshow(_grid(np.clip(dev, -lim, lim)), cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        ax.set_title(f"{v}: deviation per vector from clean (σ), {dev.size} vectors", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.03)
        order = np.argsort(dev)[:10]
        worst[v] = [(int(i), float(dev[i])) for i in order]
    fig.suptitle(f"{result.model} v{result.version}: {result.verdict.upper()} — {result.reason[:120]}", fontsize=11)
    fig.tight_layout()
    png = out_dir / "report.png"
    fig.savefig(png, dpi=90)
    plt.close(fig)

    rows = "".join(
        f"<tr><td>{html.escape(v)}</td><td>{result.scores[v]:.6g}</td><td>{reference.thresholds_[v]:.6g}</td>"
        f"<td>{'below' if result.scores[v] < reference.thresholds_[v] else 'ok'}</td>"
        f"<td>{', '.join(f'#{i} ({d:.1f}σ)' for i, d in worst[v])}</td></tr>"
        for v in views
    )
    color = {"passed": "#1a7f37", "blocked": "#cf222e"}.get(result.verdict, "#9a6700")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>integrity report {html.escape(result.model)} v{result.version}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} td,th{{padding:4px 10px;border-bottom:1px solid #ddd}}
.v{{color:#fff;background:{color};padding:2px 10px;border-radius:4px}}</style></head><body>
<h1>{html.escape(result.model)} v{result.version} <span class="v">{html.escape(result.verdict)}</span></h1>
<p>{html.escape(result.reason)}</p>
<table><tr><th>view</th><th>score</th><th>threshold</th><th></th><th>least likely vectors (index, deviation)</th></tr>{rows}</table>
<p>Score = Σ log-likelihood of the layer's vectors under the clean reference (higher = more typical); blocked if any view is below its threshold.
Model sha256 <code>{result.model_sha256}</code>; reference sha256 <code>{result.reference_sha256}</code>
({reference.n_reference_} clean networks, layer <code>{html.escape(reference.config.layer)}</code>).</p>
<img alt="scores and per-vector anomaly map" style="max-width:100%" src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}">
</body></html>"""
    page_path = out_dir / "report.html"
    page_path.write_text(page)
    return png, page_path
