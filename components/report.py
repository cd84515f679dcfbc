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

from detector.decision import BLOCKED, PASSED
from detector.evidence import Evidence
from detector.head import NETWORK_ENTRIES, toward_suspects


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


def write_report(
    out_dir: Path, reference, vector_scores: dict[str, np.ndarray], result, evidence: Evidence | None = None
) -> tuple[Path, Path]:
    """One row per scored part (deciding parts first, then evidence such as the paper's GMM)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    evidence = evidence or Evidence()
    suspect = evidence.suspect
    parts = reference.parts()
    scores = {**result.scores, **evidence.scores}
    names = [v for v in parts if v in vector_scores and v in scores]
    suspected = suspect.suspected_index if suspect is not None else None
    fig, axes = plt.subplots(len(names), 2, figsize=(12, 3.6 * len(names)), squeeze=False)
    worst: dict[str, list[tuple[int, float]]] = {}
    suspects = _suspect_names(parts, vector_scores)
    for row, v in enumerate(names):
        info = parts[v]
        role = "decides" if info["deciding"] else "evidence only"
        ax = axes[row][0]
        cal = info["calibration_scores"]
        if info["reference_scores"] is not None:
            ref_scores = np.asarray(info["reference_scores"])
            ax.scatter(
                ref_scores,
                np.full_like(ref_scores, 1.0),
                marker="|",
                s=300,
                label=f"reference networks (n={ref_scores.size}, in-sample: optimistic)",
            )
        ax.scatter(
            cal,
            np.full_like(cal, 0.0),
            marker="|",
            s=300,
            label=f"calibration ({reference.threshold_source_}, n={cal.size})",
        )
        ax.axvline(info["threshold"], color="k", ls="--", label=f"threshold (FRR {reference.config.frr:g})")
        score = scores[v]
        ax.axvline(
            score, color="red" if not score >= info["threshold"] else "green", lw=2.5, label=f"candidate {score:.4g}"
        )
        ax.set_yticks([0, 1], ["calibration", "reference"])
        ax.set_ylim(-0.8, 1.8)
        ax.set_title(f"{v} ({role}): score (higher = more typical)", fontsize=10)
        ax.legend(fontsize=7, loc="best")
        dev = vector_deviation(info["calibration_vector_scores"], vector_scores[v])
        ax = axes[row][1]
        if info["unit"] == "class":
            _class_panel(ax, info, np.asarray(vector_scores[v]), suspected)
        elif info["unit"] == "suspect":
            _suspect_panel(ax, v, info, np.asarray(vector_scores[v]), suspects)
        elif dev.size > 1:
            lim = min(10.0, max(3.0, float(np.nanmax(np.abs(dev)))))
            im = ax.imshow(
                _grid(np.clip(dev, -lim, lim)), cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest"
            )
            ax.set_title(f"{v}: deviation per vector from clean (σ), {dev.size} vectors", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, ax=ax, fraction=0.03)
        else:
            ax.axis("off")
            ax.text(
                0.05,
                0.5,
                f"{v}: one statistic per network\n(candidate {score:.4g}, threshold {info['threshold']:.4g})",
                fontsize=10,
            )
        order = np.argsort(dev)[:10]
        worst[v] = [(int(i), float(dev[i])) for i in order]
    fig.suptitle(f"{result.model} v{result.version}: {result.verdict.upper()} — {result.reason[:120]}", fontsize=11)
    fig.tight_layout()
    png = out_dir / "report.png"
    fig.savefig(png, dpi=90)
    plt.close(fig)

    def unit_name(v: str, i: int) -> str:
        if parts[v]["unit"] == "suspect" and i < len(suspects):
            return html.escape(suspects[i])
        classes = parts[v]["classes"]
        if parts[v]["unit"] == "class" and classes:
            # past the classes: the network-level statistics of the same part (head's shape)
            return html.escape(classes[i]) if i < len(classes) else NETWORK_ENTRIES[i - len(classes)]
        return f"#{i}"

    def least_typical(v: str) -> str:
        shown = worst[v][: (1 if len(vector_scores[v]) == 1 else 10)]
        return ", ".join(f"{unit_name(v, i)} ({d:.1f}σ)" for i, d in shown)

    def table_row(v: str) -> str:
        t = parts[v]["threshold"]
        cells = (
            html.escape(v),
            "decides" if parts[v]["deciding"] else "evidence",
            f"{scores[v]:.6g}",
            f"{t:.6g}",
            "below" if not scores[v] >= t else "ok",
            least_typical(v),
        )
        return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"

    rows = "".join(table_row(v) for v in names)
    victim = ""
    if result.verdict == BLOCKED and suspect is not None:
        runner_up = f" (runner-up {suspect.runner_up_z:.1f} σ)" if suspect.runner_up_z is not None else ""
        victim = (
            '<p class="victim">Suspected victim identity: '
            f"<b>{html.escape(suspect.suspected_class)}</b> — its class row deviates "
            f"{suspect.suspected_z:.1f} robust σ from the clean networks' rows for that class{runner_up}. "
            "A backdoor of this kind lets an impostor wearing a trigger be accepted as this person.</p>"
        )
    color = {PASSED: "#1a7f37", BLOCKED: "#cf222e"}.get(result.verdict, "#9a6700")
    title = f"{html.escape(result.model)} v{html.escape(str(result.version))}"
    image = base64.b64encode(png.read_bytes()).decode()
    header = "<tr><th>part</th><th>role</th><th>score</th><th>threshold</th><th></th>"
    header += "<th>least typical units (index or class, deviation)</th></tr>"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>integrity report {title}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} td,th{{padding:4px 10px;border-bottom:1px solid #ddd}}
.v{{color:#fff;background:{color};padding:2px 10px;border-radius:4px}}
.victim{{background:#fff8c5;padding:8px;border-left:4px solid #cf222e}}</style></head><body>
<h1>{title} <span class="v">{html.escape(result.verdict)}</span></h1>
<p>{html.escape(result.reason)}</p>{victim}
<table>{header}{rows}</table>
<p>Every score: higher = more typical of clean networks; blocked if any <i>deciding</i> part is below its
threshold (evidence parts, such as the paper's GMM, are reported but do not decide).
Model sha256 <code>{html.escape(str(result.model_sha256))}</code>;
reference sha256 <code>{html.escape(str(result.reference_sha256))}</code>
({reference.n_reference_} clean networks).</p>
<img alt="scores and per-unit anomaly maps" style="max-width:100%" src="data:image/png;base64,{image}">
</body></html>"""
    page_path = out_dir / "report.html"
    page_path.write_text(page)
    return png, page_path


def _clean_range(ax, x: np.ndarray, calibration: np.ndarray) -> None:
    """The clean calibration networks' range per unit (rows: networks), as a band behind the candidate."""
    ax.fill_between(
        x,
        calibration.min(axis=0),
        calibration.max(axis=0),
        color="tab:blue",
        alpha=0.25,
        step="mid",
        label="clean calibration networks (range)",
    )


def _suspect_names(parts: dict, vector_scores: dict[str, np.ndarray]) -> list[str]:
    """The classes ``head``'s toward view read, most deviant first, by name (by index when the
    reference keeps no class list): chosen from ``head``'s own z, as the view chooses them."""
    head = next(
        (v for v in ("head", "classes") if v in vector_scores and parts.get(v, {}).get("unit") == "class"), None
    )
    if head is None:
        return []
    classes = parts[head]["classes"]
    n = len(classes) if classes else np.asarray(vector_scores[head]).size - len(NETWORK_ENTRIES)
    z = -np.asarray(vector_scores[head])[:n]
    return [classes[i] if classes else f"class {i}" for i in toward_suspects(z)]


def _suspect_panel(ax, v: str, info: dict, vector_scores: np.ndarray, suspects: list[str]) -> None:
    """Per suspect (``head``'s most deviant classes, in order): the largest cosine of its change with
    another class's row, against the clean calibration networks' range at the same rank."""
    cos, cal = -vector_scores, -np.asarray(info["calibration_vector_scores"])
    x = np.arange(cos.size)
    _clean_range(ax, x, cal)
    ax.bar(x, cos, width=0.5, color=["red" if c > -info["threshold"] else "k" for c in cos], label="candidate")
    ax.axhline(-info["threshold"], color="k", ls="--", lw=0.8, label="threshold")
    ax.set_xticks(x, suspects or [f"#{i + 1}" for i in x], fontsize=7, rotation=20)
    ax.set_xlabel("head's most deviant classes, most deviant first")
    ax.set_ylabel("largest cosine with another class's row")
    ax.set_title(f"{v}: does a deviant class's change point at another class?", fontsize=10)
    ax.legend(fontsize=7, loc="best")


def _class_panel(ax, info: dict, vector_scores: np.ndarray, suspected: int | None) -> None:
    """Per class: the candidate's z against the clean calibration networks' spread for that class."""
    z = -vector_scores
    cal_z = -np.asarray(info["calibration_vector_scores"])
    n = len(info["classes"]) if info.get("classes") else z.size
    network_z = z[n:]  # head: the network-level z's after the classes (NETWORK_ENTRIES)
    z, cal_z = z[:n], cal_z[:, :n]
    x = np.arange(z.size)
    _clean_range(ax, x, cal_z)
    ax.plot(x, z, drawstyle="steps-mid", color="k", lw=0.8, label="candidate")
    if suspected is not None and 0 <= suspected < z.size:
        classes = info["classes"]
        name = classes[suspected] if classes else str(suspected)
        ax.scatter([suspected], [z[suspected]], color="red", s=60, zorder=5, label=f"suspected victim: {name}")
    ax.set_xlabel("class (logit index)")
    if info.get("label"):  # the offset share: each class's own statistic, not a z
        ax.set_ylabel(info["label"])
        ax.set_title(f"per class: {info['label']} of its whitened deviation", fontsize=10)
    else:
        ax.set_ylabel("deviation z (robust σ)")
        shape = "".join(f"; {name} z = {v:.1f}" for name, v in zip(NETWORK_ENTRIES, network_z))
        ax.set_title(f"per-class deviation of the decision rule{shape}", fontsize=10)
    ax.legend(fontsize=7, loc="best")


def _size_rule(e: dict) -> str:
    if "smallest_patch_fires" not in e:  # an explain.json from before the rule
        return ""
    smallest = min(e["config"]["sizes"])
    fires = "already fires" if e["smallest_patch_fires"] else "does not fire"
    return (
        f" The smallest patch tried ({smallest:.0%} of the width) {fires}. In the lab (default sizes), "
        "every backdoor's trigger fired at 10% of the width and no clean network's most deviant class did."
    )


def add_trigger(page: str, images: dict, explanation: dict) -> str:
    """The gate's report with the reconstructed trigger (``explain``) shown beside its plots.

    ``images``: the paths ``components.explain.write_outputs`` wrote. The pictures are embedded,
    as the report's own plot is, so the page needs nothing else from the run to render.
    """

    def img(key: str, alt: str, css: str) -> str:
        data = base64.b64encode(Path(images[key]).read_bytes()).decode()
        return f'<img alt="{alt}" class="{css}" style="max-width:100%" src="data:image/png;base64,{data}">'

    e = explanation
    source = (
        f"held-out faces of the suspected impostor {html.escape(str(e['impostor']))}"
        if e.get("impostor")
        else "held-out faces of other classes (no impostor named)"
    )
    section = (
        '<div class="explain" style="flex:1;min-width:260px">'
        "<p><b>Reconstructed trigger</b> (pattern × mask, then the mask)</p>"
        + img("trigger", "reconstructed trigger", "trigger")
        + img("mask", "trigger mask", "trigger-mask")
        + img("applied", "faces with and without the reconstructed trigger", "trigger-applied")
        + f"<p>Faces wearing it are classified as <b>{html.escape(str(e['victim']))}</b> "
        f"{e['reconstructed_asr']:.0%} of the time ({e['heldout_faces']} {source}). "
        f"Mask: {e['mask_size']:.0%} of the width, centre at "
        f"({e['mask_centre'][0]:.2f}, {e['mask_centre'][1]:.2f}) of the image; anomaly index "
        f"{e['anomaly_index']:.1f} against {len(e['controls'])} control classes.{_size_rule(e)} (Input-space "
        "evidence; the verdict is the weight-space detector's.)</p></div>"
    )
    marker = '<img alt="scores and per-unit anomaly maps"'
    if marker in page:  # the plots on the left, the trigger on their right
        before, after = page.split(marker, 1)
        end = after.index(">") + 1
        plots = marker + after[:end].replace("max-width:100%", "max-width:100%;flex:3;min-width:0")
        row = '<div style="display:flex;gap:16px;align-items:flex-start">' + plots + section + "</div>"
        return before + row + after[end:]
    return page.replace("</body>", section + "</body>")
