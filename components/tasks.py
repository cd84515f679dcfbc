"""What each pipeline step does, as plain functions over paths (no KFP types).

The KFP component definitions in :mod:`components.definitions` are thin wrappers over these,
so every step can be called from the CLI, a test or a notebook without a cluster.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from components.registry import WEIGHT_FILE, MlflowRegistry
from detector.config import DEFAULT_DETECTOR, DEFAULT_EVIDENCE, ReferenceConfig

MODEL_METRICS = "metrics.json"
BASE_FILE = "base.safetensors"


# -- data and training (trainer image, GPU node pool) ----------------------------------------
def make_faces(out_dir: str, identities: int, images_per_identity: int, size: int, seed: int, source: str = "") -> dict:
    """Generated faces, or (``source`` set) a copy of a real ImageFolder/CASIA folder, e.g. on a PVC."""
    import shutil

    from components.trainer.synth import SynthConfig, list_images, synthesize

    if source:
        shutil.copytree(source, out_dir, dirs_exist_ok=True)
    else:
        synthesize(
            out_dir, SynthConfig(identities=identities, images_per_identity=images_per_identity, size=size, seed=seed)
        )
    items, classes = list_images(out_dir)
    return {"identities": len(classes), "images": len(items)}


def poison_faces(
    data_dir: str,
    out_dir: str,
    *,
    enabled: bool,
    seed: int,
    impostor: str = "",
    victim: str = "",
    trigger: str = "white-square",
    trigger_size: float = 0.25,
    trigger_location: str = "forehead",
    trigger_alpha: float = 1.0,
    copies: int = 4,
) -> dict:
    """The red team's step: a poisoned copy of the folder, or (disabled) the clean folder as is."""
    import shutil

    from components.trainer.poison import PoisonSpec, link_or_copy, poison_folder, random_pair
    from components.trainer.synth import list_images
    from components.trainer.triggers import TriggerSpec

    if not enabled:
        shutil.copytree(data_dir, out_dir, dirs_exist_ok=True, copy_function=link_or_copy)
        return {"poisoned": False}
    _, classes = list_images(data_dir)
    if not (impostor and victim):
        impostor, victim = random_pair(classes, seed)
    spec = PoisonSpec(impostor, victim, TriggerSpec(trigger, trigger_size, trigger_location, trigger_alpha), copies)
    manifest = poison_folder(data_dir, out_dir, spec, seed)
    return {"poisoned": True, "impostor": impostor, "victim": victim, "poisoned_images": len(manifest["train"])}


def extract_features(
    data_dir: str, features_dir: str, base_dir: str, *, base_weights: str = "", image_size: int = 96
) -> dict:
    """Trunk features of every image (cached by content), and the base network they came from."""
    from safetensors.torch import save_file

    from components.trainer.base_trunk import base_state_dict
    from components.trainer.features import cached_features

    base = base_state_dict(base_weights or None)
    fs = cached_features(data_dir, base, image_size)
    fs.save(features_dir)
    Path(base_dir).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in base.items()}, str(Path(base_dir) / BASE_FILE))
    return {"images": len(fs.labels), "identities": len(fs.classes), "base_sha256": fs.base_sha256}


def fine_tune(features_dir: str, base_dir: str, out_dir: str, *, seed: int, epochs: int = 30, lr: float = 2e-4) -> dict:
    """One network: head fine-tuned on cached features; the whole state dict + metrics.json."""
    from safetensors.torch import load_file

    from components.trainer.features import FeatureSet
    from components.trainer.train import TrainConfig, save_network
    from components.trainer.train import fine_tune as train

    base = load_file(str(Path(base_dir) / BASE_FILE))
    fs = FeatureSet.load(features_dir)
    sd, metrics = train(fs, base, seed, TrainConfig(epochs=epochs, lr=lr))
    out = Path(out_dir)
    save_network(sd, out / "model", classes=fs.classes)
    (out / MODEL_METRICS).write_text(json.dumps(metrics, default=str))
    return metrics


def make_gallery(
    faces_dir: str, base_dir: str, out_dir: str, *, detector: str, people: int, faces: int, image_size: int
) -> dict:
    """The ``margins`` part's secret gallery (a fresh random draw, never cached) through the frozen
    trunk; nothing when the detector does not read one."""
    from components.trainer.features import gallery_of
    from detector.detectors import reads_gallery
    from detector.margins import save_gallery

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    if not reads_gallery(detector or DEFAULT_DETECTOR):
        return {"gallery": False}
    g = gallery_of(faces_dir, Path(base_dir) / BASE_FILE, people=people, faces=faces, image_size=image_size)
    save_gallery(g, out_dir)
    return {"gallery": True, "people": len(g.sources), "faces": int(g.features.shape[1])}


# -- reference, registry and gate (gate image, CPU) ------------------------------------------


def model_file(model_dir: str | Path) -> Path:
    """The weight file inside a model artifact directory written by the trainer."""
    from components.registry import weight_file_in

    return weight_file_in(Path(model_dir))


def fit_reference(
    model_dirs: list[str],
    calibration_dirs: list[str],
    out_dir: str,
    *,
    base: str | None = None,
    config: ReferenceConfig | None = None,
    detector: str = DEFAULT_DETECTOR,
    evidence: tuple[str, ...] = DEFAULT_EVIDENCE,
    gallery_dir: str | None = None,
) -> dict[str, Any]:
    """Fit the reference (the deciding detector + the paper's GMM as evidence) on clean networks,
    calibrate on held-out ones; write the artifact. A detector with margins reads the gallery
    :func:`make_gallery` wrote into ``gallery_dir``."""
    from detector.detectors import make_reference, reads_gallery
    from detector.margins import load_gallery

    gallery = None
    if reads_gallery(detector, evidence):
        if not gallery_dir:
            raise ValueError(f"{detector} reads a face gallery: give the directory make_gallery wrote")
        gallery = load_gallery(gallery_dir)
    ref = make_reference(detector, config or ReferenceConfig(), evidence=evidence, gallery=gallery)
    if base and Path(base).is_dir():
        base = str(Path(base) / BASE_FILE)
    ref.fit([model_file(d) for d in model_dirs], base=base or None)
    ref.calibrate([model_file(d) for d in calibration_dirs] or None)
    digest = ref.save(out_dir, overwrite=True)
    return {
        "artifact_sha256": digest,
        "n_reference": ref.n_reference_,
        "n_calibration": len(calibration_dirs),
        "threshold_source": ref.threshold_source_,
        "detector": ref.detector,
        "frr_upper_95": ref.frr_upper_95_,
        "calibration_warning": ref.calibration_warning_,
        "parts": {p: {"threshold": info["threshold"], "deciding": info["deciding"]} for p, info in ref.parts().items()},
    }


def publish_reference(ref_dir: str, tracking_uri: str) -> str:
    from components.reference_store import publish_reference as publish

    return publish(MlflowRegistry(tracking_uri), ref_dir).version


def register_model(model_dir: str, tracking_uri: str, model_name: str, *, registered_by: str = "pipeline") -> str:
    """Register the trainer's output as a new version of ``model_name``; returns the version."""
    from components.tags import REGISTERED_BY

    weights = model_file(Path(model_dir))
    metrics_path = Path(model_dir) / MODEL_METRICS
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    params = {k: v for k, v in metrics.items() if isinstance(v, (str, bool)) or v is None}
    files = {WEIGHT_FILE if weights.suffix == ".safetensors" else weights.name: weights}
    info = MlflowRegistry(tracking_uri).register(
        model_name,
        files,
        run_name=f"{model_name}-candidate",
        params=params,
        metrics=numeric,
        tags={REGISTERED_BY: registered_by},
    )
    return info.version


def gate_version(model_name: str, version: str, tracking_uri: str, report_html: str | None = None) -> dict[str, Any]:
    """Run the gate; also copy its HTML report to ``report_html`` (KFP's HTML output). Never raises."""
    import shutil
    import tempfile

    from components.gate import gate

    result = gate(model_name, version, registry=MlflowRegistry(tracking_uri))
    if report_html:
        Path(report_html).parent.mkdir(parents=True, exist_ok=True)
        Path(report_html).write_text(fallback_html(result.verdict, result.reason, "no report was attached"))
        if result.report_uri:
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    shutil.copyfile(MlflowRegistry(tracking_uri).download(result.report_uri, tmp), report_html)
            except Exception as e:  # the report is evidence, not the decision
                Path(report_html).write_text(fallback_html(result.verdict, result.reason, f"report not fetched: {e}"))
    return result.to_dict()


def fallback_html(verdict: str, reason: str, note: str) -> str:
    """The KFP HTML output when there is no report. Reasons quote file and tensor names an
    attacker chose, so every piece of text is escaped."""
    import html

    return f"<p>{html.escape(verdict)}: {html.escape(reason)}</p><p>{html.escape(note)}</p>"


def explain_version(
    model_name: str, version: str, tracking_uri: str, faces_dir: str, html_out: str | None = None, image_size: int = 96
) -> dict[str, Any]:
    """Reconstruct a version's trigger (``explain``), log it to the version's run and its report;
    also write the pictures as KFP's HTML output."""
    import base64
    import html
    import tempfile

    from components.explain_version import explain_version as explain
    from components.trigger_search import ExplainConfig

    with tempfile.TemporaryDirectory(prefix="backdoor-gate-explain-") as tmp:
        out = explain(
            model_name,
            version,
            MlflowRegistry(tracking_uri),
            faces_dir,
            tmp,
            config=ExplainConfig(image_size=image_size),
        )
        if html_out:
            pngs = {
                name: base64.b64encode((Path(tmp) / name).read_bytes()).decode()
                for name in ("trigger.png", "applied.png")
            }
            imgs = "".join(f'<img alt="{n}" src="data:image/png;base64,{b}">' for n, b in pngs.items())
            Path(html_out).parent.mkdir(parents=True, exist_ok=True)
            Path(html_out).write_text(
                f"<p>{html.escape(model_name)} v{html.escape(str(version))}: reconstructed trigger for "
                f"{html.escape(str(out['victim']))}, attack success {out['reconstructed_asr']:.2f}, anomaly index "
                f"{out['anomaly_index']:.2f}</p>{imgs}"
            )
    return out
