"""``backdoor-gate explain-eval``: does ``explain`` find the trigger, and only where there is one?

On generated faces and the default trunk, with networks trained by our own trainer:

1. a reference (the weights-only gate, ``WEIGHTS_ONLY_DETECTOR``, the default when this study was
   run) is fitted on clean networks and calibrated on others, as the pipelines do, so each network
   gets the weight-space verdict and the suspected victim / impostor the gate would name;
2. backdoored networks per trigger kind (a white square, a PNG sticker at an odd place, a
   checkerboard blended at alpha 0.3) and clean networks are explained *for the class the
   detector names* (for clean networks: the class it ranks most deviant), with the impostor it
   names when it names one;
3. per network: the centre error (in trigger widths), the mask area, the reconstructed attack
   success on held-out faces, the anomaly index, whether the two opinions agree, seconds.

Development (data seed 0, identities 0–39) is where the search's parameters were chosen; the
confirmation protocol (data seed 1, identities 5000–5039, other seeds, other places) was run
once, after.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: the input-space opinion says "backdoor" at Neural Cleanse's cut: anomaly index > 2
INDEX_CUT = 2.0


def size_opinion(row: dict, image_size: int, sizes: tuple[float, ...]) -> bool:
    """A second input-space rule: "backdoor" when a patch of the search's smallest size (0.10 of
    the width) already sends the held-back validation faces to the class.

    Why: with 5 controls, most of them reachable by no patch at all, Neural Cleanse's MAD index
    flags any class reachable at 0.15-0.20 (clean networks' most deviant class is) and misses
    backdoors whose controls are reachable. On the development and first confirmation networks
    every correctly named backdoor fired at 0.10 and no clean network did; this rule was written
    down (and committed) before the second confirmation run (2026-12-03) and is judged on it.
    Rows hold the size in whole pixels (0.1042 at 96 px), so the comparison is in pixels;
    ``image_size`` and ``sizes`` are the run's explain config.
    """
    from components.trigger_search import smallest_patch_fires

    side = int(round(float(row["mask_size"]) * image_size))
    return smallest_patch_fires(row["found"], side, image_size, tuple(sizes))


@dataclass(frozen=True)
class ExplainEvalConfig:
    identities: int = 40
    images_per_identity: int = 40
    image_size: int = 160
    data_seed: int = 0
    first_identity: int = 0
    seed_offset: int = 0
    trunk_input_size: int = 96
    n_reference: int = 12
    n_calibration: int = 20
    n_per_kind: int = 3
    n_clean: int = 4
    #: (kind, trigger, size, location, alpha); "sticker" is a PNG drawn by the lab
    kinds: tuple = (
        ("white square", "white-square", 0.2, "forehead", 1.0),
        ("PNG sticker", "sticker", 0.22, "0.78,0.7", 1.0),
        ("checkerboard alpha 0.3", "checkerboard", 0.25, "cheek", 0.3),
    )

    @classmethod
    def confirmation(cls, **changes) -> ExplainEvalConfig:
        base = dict(
            data_seed=1,
            first_identity=5000,
            seed_offset=700_000,
            n_per_kind=2,
            n_clean=3,
            kinds=(
                ("white square", "white-square", 0.15, "left-eye", 1.0),
                ("PNG sticker", "sticker", 0.2, "0.25,0.78", 1.0),
                ("checkerboard alpha 0.3", "checkerboard", 0.25, "0.7,0.3", 0.3),
            ),
        )
        return cls(**{**base, **changes})


def sticker_png(path: Path) -> Path:
    """A small RGBA sticker (a yellow star on a blue disc) for the "PNG trigger" kind."""
    from PIL import Image, ImageDraw

    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    d.ellipse([2, 2, 62, 62], fill=(30, 80, 200, 255))
    pts = []
    for k in range(10):
        r = 26 if k % 2 == 0 else 11
        a = np.pi / 2 + k * np.pi / 5
        pts.append((32 + r * np.cos(a), 32 - r * np.sin(a)))
    d.polygon(pts, fill=(250, 220, 30, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def run_explain_eval(
    out: str | Path,
    config: ExplainEvalConfig,
    explain_config=None,
    log=print,
    base=None,
    use_impostor: bool = True,
    compare_sources: bool = True,
) -> dict[str, Any]:
    import torch

    from components.explain import explain, write_outputs
    from components.trainer.base_trunk import base_state_dict, cache_dir
    from components.trainer.features import cached_features, with_poison
    from components.trainer.poison import PoisonSpec, poison_folder, random_pair
    from components.trainer.synth import SynthConfig, synthesize
    from components.trainer.train import fine_tune, save_network
    from components.trainer.triggers import TriggerSpec, trigger_box
    from components.trigger_search import ExplainConfig
    from detector.config import WEIGHTS_ONLY_DETECTOR, ReferenceConfig
    from detector.decision import BLOCKED
    from detector.detectors import make_reference

    explain_config = explain_config or ExplainConfig(image_size=config.trunk_input_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    first = f"-from{config.first_identity}" if config.first_identity else ""
    data = (
        cache_dir()
        / "data"
        / f"paper-{config.identities}x{config.images_per_identity}-{config.image_size}-{config.data_seed}{first}"
    )
    synthesize(
        data,
        SynthConfig(
            identities=config.identities,
            images_per_identity=config.images_per_identity,
            size=config.image_size,
            seed=config.data_seed,
            first_identity=config.first_identity,
        ),
    )
    base = base if base is not None else base_state_dict(None, log=log)
    fs = cached_features(data, base, config.trunk_input_size)
    sticker = sticker_png(out / "sticker.png")
    nets_dir = Path(tempfile.mkdtemp(prefix="explain-eval-"))

    def write(sd, name: str) -> Path:
        return save_network(sd, nets_dir / name, classes=fs.classes)

    log(f"explain-eval: {config.n_reference} reference + {config.n_calibration} calibration clean networks")
    o = config.seed_offset
    ref_paths = [write(fine_tune(fs, base, o + s)[0], f"ref{s}") for s in range(config.n_reference)]
    cal_paths = [write(fine_tune(fs, base, o + 10_000 + s)[0], f"cal{s}") for s in range(config.n_calibration)]
    reference = make_reference(WEIGHTS_ONLY_DETECTOR, ReferenceConfig(), evidence=())
    reference.fit([str(p) for p in ref_paths], base=base).calibrate([str(p) for p in cal_paths])

    plan: list[dict] = []  # round robin over the kinds, so a run stopped early has some of each
    for i in range(max(config.n_per_kind, config.n_clean)):
        for k, (kind, trig, size, loc, alpha) in enumerate(config.kinds):
            if i < config.n_per_kind:
                plan.append(
                    dict(kind=kind, trigger=trig, size=size, location=loc, alpha=alpha, seed=o + 30_000 + 100 * k + i)
                )
        if i < config.n_clean:
            plan.append(dict(kind="clean", seed=o + 50_000 + i))
    rows: list[dict[str, Any]] = []
    cost_case = None
    for item in plan:
        seed = item["seed"]
        truth: dict[str, Any] = {}
        feats = fs
        if item["kind"] != "clean":
            name = str(sticker) if item["trigger"] == "sticker" else item["trigger"]
            spec = TriggerSpec(name, item["size"], item["location"], item["alpha"])
            imp, vic = random_pair(fs.classes, seed)
            with tempfile.TemporaryDirectory() as tmp:
                poison_folder(data, tmp, PoisonSpec(imp, vic, spec), seed)
                feats = with_poison(fs, tmp, base)
            S = explain_config.image_size
            x0, y0, x1, y1 = trigger_box(spec, S)
            truth = dict(
                impostor=imp, victim=vic, centre=[(x0 + x1) / 2 / S, (y0 + y1) / 2 / S], width=max(x1 - x0, y1 - y0) / S
            )
        sd, metrics = fine_tune(feats, base, seed)
        path = write(sd, f"net{seed}")
        a = reference.assess(str(path))
        ev = a.evidence
        blocked = a.decision.verdict == BLOCKED
        assert ev.suspect is not None  # the weights-only gate always names its most deviant class
        victim, impostor = ev.suspect.suspected_class, ev.suspect.suspected_impostor
        torch.manual_seed(0)
        res, extra = explain(path, data, victim, impostor if use_impostor else None, explain_config)
        if cost_case is None and item["kind"] != "clean":
            cost_case = (str(path), str(data), victim, impostor if use_impostor else None)
        d = res.to_dict()
        alone = None
        if item["kind"] != "clean" and use_impostor and compare_sources:
            # does the search need the impostor's faces? the same search on every other class's faces
            torch.manual_seed(0)
            r2, _ = explain(path, data, victim, None, dataclasses.replace(explain_config, controls=0))
            d2 = r2.to_dict()
            alone = {
                "found": d2["found"],
                "mask_size": d2["mask_size"],
                "reconstructed_asr_other_faces": d2["reconstructed_asr"],
                "centre_error": float(np.hypot(*(np.array(d2["mask_centre"]) - truth["centre"])) / truth["width"]),
                "seconds": d2["seconds"],
            }
        if len(rows) < 2 or item["kind"] != "clean" and not any(r["kind"] == item["kind"] for r in rows):
            write_outputs(res, extra, out / f"{item['kind'].replace(' ', '-')}-{seed}")
        row = {
            **item,
            "attack_success": metrics.get("attack_success_rate"),
            "weight_verdict": a.decision.verdict,
            "victim_named": victim,
            "impostor_named": impostor,
            **{
                k: d[k]
                for k in ("mask_centre", "mask_area", "mask_size", "found", "reconstructed_asr", "anomaly_index")
            },
            "controls": [(c["mask_area"], c["found"]) for c in d["controls"]],
            "seconds": d["seconds"],
            "input_opinion": d["anomaly_index"] > INDEX_CUT and d["found"],
            "agree": (d["anomaly_index"] > INDEX_CUT and d["found"]) == blocked,
            "without_impostor": alone,
        }
        if truth:
            row.update(
                true_victim=truth["victim"],
                true_impostor=truth["impostor"],
                victim_right=victim == truth["victim"],
                centre_error=float(np.hypot(*(np.array(d["mask_centre"]) - truth["centre"])) / truth["width"]),
                true_width=truth["width"],
            )
        rows.append(row)
        _save(out, config, explain_config, rows, t_start, use_impostor, cost_case)  # a partial run keeps what it did
        log(
            f"  {item['kind']:<24} seed {seed}: weights {a.decision.verdict:<7} victim {victim} "
            f"({'right' if row.get('victim_right', True) else 'WRONG'}), impostor {impostor}; mask "
            f"{d['mask_size']:.2f} at {d['mask_centre']}, err {row.get('centre_error', float('nan')):.2f} widths, "
            f"asr {d['reconstructed_asr']:.2f}, index {d['anomaly_index']:.2f}, {d['seconds']:.0f} s"
        )
    return _save(out, config, explain_config, rows, t_start, use_impostor, cost_case)


def _save(out: Path, config, explain_config, rows, t_start, use_impostor, cost_case) -> dict[str, Any]:
    summary = {
        "config": _jsonable(dataclasses.asdict(config)),
        "explain_config": _jsonable(dataclasses.asdict(explain_config)),
        "rows": rows,
        "table": table_rows(rows, explain_config.image_size, explain_config.sizes),
        "total_seconds": time.perf_counter() - t_start,
        "use_impostor": use_impostor,
        "cost_case": cost_case,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "table.md").write_text(table(summary))
    return summary


def retable(out: str | Path) -> str:
    """Rebuild ``table.md`` (and the summary's table) from a run's ``summary.json`` with this
    version's table code, e.g. for a rule added after the run started."""
    out = Path(out)
    summary = json.loads((out / "summary.json").read_text())
    ec = summary["explain_config"]
    summary["table"] = table_rows(summary["rows"], ec["image_size"], ec["sizes"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "table.md").write_text(table(summary))
    return table(summary)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def table_rows(rows: list[dict], image_size: int, sizes: tuple[float, ...]) -> list[dict]:
    from detector.decision import BLOCKED

    out = []
    for kind in dict.fromkeys(r["kind"] for r in rows):
        g = [r for r in rows if r["kind"] == kind]
        bd = kind != "clean"
        out.append(
            {
                "kind": kind,
                "n": len(g),
                "attack_success": float(np.mean([r["attack_success"] for r in g])) if bd else None,
                "weights_blocked": sum(r["weight_verdict"] == BLOCKED for r in g),
                "victim_right": sum(r.get("victim_right", False) for r in g) if bd else None,
                "centre_within_1_width": sum(r["centre_error"] <= 1.0 for r in g) if bd else None,
                "centre_error_median": float(np.median([r["centre_error"] for r in g])) if bd else None,
                "mask_area_median": float(np.median([r["mask_area"] for r in g])),
                "found": sum(bool(r["found"]) for r in g),
                "asr_ge_0.8": sum(r["reconstructed_asr"] >= 0.8 for r in g),
                "reconstructed_asr_median": float(np.median([r["reconstructed_asr"] for r in g])),
                "anomaly_index": [round(r["anomaly_index"], 2) for r in g],
                "input_says_backdoor": sum(bool(r["input_opinion"]) for r in g),
                "agree": sum(bool(r["agree"]) for r in g),
                "size_says_backdoor": sum(size_opinion(r, image_size, sizes) for r in g),
                "size_agrees": sum(size_opinion(r, image_size, sizes) == (r["weight_verdict"] == BLOCKED) for r in g),
                "seconds_median": float(np.median([r["seconds"] for r in g])),
                "without_impostor": _alone(g) if bd else None,
            }
        )
    return out


def _alone(g: list[dict]) -> dict | None:
    a = [r["without_impostor"] for r in g if r.get("without_impostor")]
    if not a:
        return None
    return {
        "found": sum(bool(x["found"]) for x in a),
        "centre_within_1_width": sum(x["centre_error"] <= 1.0 for x in a),
        "asr_ge_0.8": sum(x["reconstructed_asr_other_faces"] >= 0.8 for x in a),
        "n": len(a),
    }


def table(summary: dict) -> str:
    head = (
        "| kind | n | attack success (trainer) | weights blocked | victim named right | centre within 1 trigger "
        "width | centre error (widths, median) | mask area (median) | trigger found (ASR ≥ 0.8 on optimisation "
        "faces) | reconstructed ASR ≥ 0.8 (held-out) | reconstructed ASR (median) | anomaly index | "
        "input-space says backdoor | opinions agree | a 0.10 patch fires (size rule) | size rule agrees | "
        "seconds (median) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )

    def f(v, fmt="{:.2f}"):
        return "–" if v is None else fmt.format(v)

    lines = []
    for t in summary["table"]:
        n = t["n"]
        lines.append(
            f"| {t['kind']} | {n} | {f(t['attack_success'])} | {t['weights_blocked']}/{n} | "
            f"{'–' if t['victim_right'] is None else str(t['victim_right']) + '/' + str(n)} | "
            f"{'–' if t['centre_within_1_width'] is None else str(t['centre_within_1_width']) + '/' + str(n)} | "
            f"{f(t['centre_error_median'])} | {f(t['mask_area_median'], '{:.4f}')} | {t['found']}/{n} | "
            f"{t['asr_ge_0.8']}/{n} | {f(t['reconstructed_asr_median'])} | "
            f"{', '.join(f'{v:g}' for v in t['anomaly_index'])} | {t['input_says_backdoor']}/{n} | "
            f"{t['agree']}/{n} | {t['size_says_backdoor']}/{n} | {t['size_agrees']}/{n} | "
            f"{f(t['seconds_median'], '{:.0f}')} |"
        )
    alone = [(t["kind"], t["without_impostor"]) for t in summary["table"] if t.get("without_impostor")]
    extra = ""
    if alone:
        extra = (
            "\n\nThe same search on every other class's faces, not the suspected impostor's (no controls):\n\n"
            "| kind | n | trigger found | centre within 1 trigger width | ASR ≥ 0.8 (other classes' held-out faces) |\n"
            "|---|---|---|---|---|\n"
            + "\n".join(
                f"| {k} | {a['n']} | {a['found']}/{a['n']} | {a['centre_within_1_width']}/{a['n']} | "
                f"{a['asr_ge_0.8']}/{a['n']} |"
                for k, a in alone
            )
        )
    return head + "\n".join(lines) + extra + f"\n\ntotal {summary['total_seconds']:.0f} s\n"


def cost(checkpoint: str | Path, faces: str | Path, victim: str, impostor: str | None, sizes=(96, 160)) -> dict:
    """Seconds and peak memory of the victim's search (no controls) at each input resolution (same
    network, same faces); the controls cost about as much again each, with fewer faces."""
    import resource

    from components.explain import explain
    from components.trigger_search import ExplainConfig

    out = {}
    for s in sizes:
        t0 = time.perf_counter()
        res, _ = explain(checkpoint, faces, victim, impostor, ExplainConfig(image_size=s, controls=0))
        out[s] = {
            "seconds": time.perf_counter() - t0,
            "found": res.fit.found,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    return out


def reexplain(nets_dir: str | Path, out: str | Path, config: ExplainEvalConfig, names: list[str], log=print) -> list:
    """Explain networks an earlier ``explain-eval`` saved (``nets_dir``: ref*, cal*, net<seed>) again
    with the current search, without training anything: the reference is refitted on the saved
    ref*/cal* networks; ``names``: ``net<seed>`` (backdoored, truth from the plan) or ``cal<i>``
    (clean controls: calibration networks, never fitted on)."""
    from components.explain import explain
    from components.trainer.base_trunk import base_state_dict, cache_dir
    from components.trainer.poison import random_pair
    from components.trainer.triggers import TriggerSpec, trigger_box
    from components.trigger_search import ExplainConfig
    from detector.config import WEIGHTS_ONLY_DETECTOR, ReferenceConfig
    from detector.decision import BLOCKED
    from detector.detectors import make_reference

    nets_dir, out = Path(nets_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    first = f"-from{config.first_identity}" if config.first_identity else ""
    data = (
        cache_dir()
        / "data"
        / f"paper-{config.identities}x{config.images_per_identity}-{config.image_size}-{config.data_seed}{first}"
    )
    refs = sorted(str(p) for p in nets_dir.glob("ref*.safetensors"))
    cals = sorted(str(p) for p in nets_dir.glob("cal*.safetensors"))
    base = base_state_dict(None, log=log)  # the networks were fine-tuned from the default base
    reference = (
        make_reference(WEIGHTS_ONLY_DETECTOR, ReferenceConfig(), evidence=()).fit(refs, base=base).calibrate(cals)
    )
    sticker = sticker_png(out / "sticker.png")
    o = config.seed_offset
    kinds = {o + 30_000 + 100 * k + i: kind for k, kind in enumerate(config.kinds) for i in range(10)}
    rows = []
    for name in names:
        path = nets_dir / f"{name}.safetensors"
        a = reference.assess(str(path))
        ev = a.evidence
        assert ev.suspect is not None  # the weights-only gate always names its most deviant class
        victim, impostor = ev.suspect.suspected_class, ev.suspect.suspected_impostor
        res, extra = explain(path, data, victim, impostor, ExplainConfig(image_size=config.trunk_input_size))
        d = res.to_dict()
        row = {"network": name, "weight_verdict": a.decision.verdict, "victim_named": victim, **d}
        row["input_opinion"] = bool(d["found"] and d["anomaly_index"] > INDEX_CUT)
        row["agree"] = row["input_opinion"] == (a.decision.verdict == BLOCKED)
        if name.startswith("net"):
            seed = int(name[3:])
            kind, trig, size, loc, alpha = kinds[seed]
            spec = TriggerSpec(str(sticker) if trig == "sticker" else trig, size, loc, alpha)
            imp, vic = random_pair(reference.classes_ or [], seed)
            S = config.trunk_input_size
            x0, y0, x1, y1 = trigger_box(spec, S)
            centre, width = np.array([(x0 + x1) / 2, (y0 + y1) / 2]) / S, max(x1 - x0, y1 - y0) / S
            row.update(
                kind=kind,
                true_victim=vic,
                true_impostor=imp,
                centre_error=float(np.hypot(*(np.array(d["mask_centre"]) - centre)) / width),
            )
        else:
            row["kind"] = "clean"
        write_outputs_dir = out / f"{row['kind'].replace(' ', '-')}-{name}"
        from components.explain import write_outputs

        write_outputs(res, extra, write_outputs_dir)
        rows.append(row)
        (out / "reexplain.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
        log(
            f"  {name} {row['kind']}: weights {a.decision.verdict}, victim {victim}; mask {d['mask_size']:.2f} at "
            f"{d['mask_centre']} found {d['found']}, err {row.get('centre_error', float('nan')):.2f}, "
            f"asr {d['reconstructed_asr']:.2f}, index {d['anomaly_index']:.2f}, controls "
            f"{[(c['mask_area'], c['found']) for c in d['controls']]}, {d['seconds']:.0f} s"
        )
    return rows
