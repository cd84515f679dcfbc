"""KFP v2 component definitions: thin, typed wrappers over :mod:`components.tasks`.

(No ``from __future__ import annotations`` here: KFP reads the real annotation objects.)

Each body only imports the project and calls one task function, so the logic stays testable
without KFP. Every component names its container image (:mod:`components.images`); the
images already contain kfp and the project, so nothing is pip-installed at run time.
"""

from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.images import GATE_IMAGE, TRAINER_IMAGE

_trainer = dict(base_image=TRAINER_IMAGE, install_kfp_package=False)
_gate = dict(base_image=GATE_IMAGE, install_kfp_package=False)


@dsl.component(**_trainer)
def seeds(n: int, offset: int) -> List[int]:
    """The seeds of n networks: one fine-tune (and one 70/30 resample) each."""
    return [offset + i for i in range(n)]


@dsl.component(**_trainer)
def make_faces(
    faces: Output[Dataset],
    identities: int = 40,
    images_per_identity: int = 40,
    size: int = 160,
    seed: int = 0,
    source: str = "",
):
    """Generated identity-labelled faces, or a copy of a real ImageFolder/CASIA folder (``source``)."""
    from components.tasks import make_faces as task

    faces.metadata.update(task(faces.path, identities, images_per_identity, size, seed, source))


@dsl.component(**_trainer)
def poison_faces(
    faces: Input[Dataset],
    poisoned: Output[Dataset],
    enabled: bool,
    seed: int,
    impostor: str = "",
    victim: str = "",
    trigger: str = "white-square",
    trigger_size: float = 0.25,
    trigger_location: str = "forehead",
    trigger_alpha: float = 1.0,
    copies: int = 4,
):
    """Red-team step: the paper's poisoning (impostor's training copies + trigger, relabelled victim)."""
    from components.tasks import poison_faces as task

    poisoned.metadata.update(
        task(
            faces.path,
            poisoned.path,
            enabled=enabled,
            seed=seed,
            impostor=impostor,
            victim=victim,
            trigger=trigger,
            trigger_size=trigger_size,
            trigger_location=trigger_location,
            trigger_alpha=trigger_alpha,
            copies=copies,
        )
    )


@dsl.component(**_trainer)
def extract_features(
    faces: Input[Dataset], features: Output[Dataset], base: Output[Model], base_weights: str = "", image_size: int = 96
):
    """The frozen trunk's 1792-d features, once per image (GPU)."""
    from components.tasks import extract_features as task

    features.metadata.update(
        task(faces.path, features.path, base.path, base_weights=base_weights, image_size=image_size)
    )


@dsl.component(**_trainer)
def fine_tune(
    features: Input[Dataset],
    base: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
    seed: int,
    epochs: int = 30,
    lr: float = 2e-4,
):
    """One network: last_linear + last_bn + logits on cached features (GPU)."""
    from components.tasks import fine_tune as task

    out = task(features.path, base.path, model.path, seed=seed, epochs=epochs, lr=lr)
    for key in ("clean_accuracy", "attack_success_rate", "relative_weight_change"):
        if key in out:
            metrics.log_metric(key, float(out[key]))
    model.metadata.update({k: v for k, v in out.items() if isinstance(v, (int, float, str))})


@dsl.component(**_trainer)
def make_gallery(
    faces: Input[Dataset],
    base: Input[Model],
    gallery: Output[Dataset],
    detector: str = "",
    people: int = 128,
    faces_per_person: int = 16,
    image_size: int = 96,
):
    """The margins part's secret gallery through the frozen trunk (a new random draw each run:
    never cache this step); empty when the detector reads none."""
    from components.tasks import make_gallery as task

    gallery.metadata.update(
        task(
            faces.path,
            base.path,
            gallery.path,
            detector=detector,
            people=people,
            faces=faces_per_person,
            image_size=image_size,
        )
    )


@dsl.component(**_gate)
def fit_reference(
    networks: Input[List[Model]],
    calibration: Input[List[Model]],
    base: Input[Model],
    gallery: Input[Dataset],
    reference: Output[Artifact],
    summary: Output[Metrics],
    covariance: str = "diag",
    components: str = "neurons",
    grid: str = "",
    frr: float = 0.05,
    detector: str = "",
):
    """The deciding detector (default: the project's, chosen on evidence) with the paper's PCA + GMM
    as evidence, fitted on clean networks; thresholds calibrated on held-out clean ones."""
    from components.tasks import fit_reference as task
    from detector.config import DEFAULT_DETECTOR, ReferenceConfig

    config = ReferenceConfig(covariance=covariance, components=components, frr=frr)
    if grid:
        config = config.replace(grid=tuple(int(g) for g in grid.split(",")))
    out = task(
        [m.path for m in networks],
        [m.path for m in calibration],
        reference.path,
        base=base.path,
        config=config,
        detector=detector or DEFAULT_DETECTOR,
        gallery_dir=gallery.path,
    )
    reference.metadata["artifact_sha256"] = out["artifact_sha256"]
    reference.metadata["detector"] = out["detector"]
    summary.log_metric("frr_upper_95", out["frr_upper_95"])
    for part, info in out["parts"].items():
        summary.log_metric(f"{part}.threshold", info["threshold"])


@dsl.component(**_gate)
def publish_reference(reference: Input[Artifact], tracking_uri: str) -> str:
    """Register the reference artifact in MLflow and point ``@current`` at it."""
    from components.tasks import publish_reference as task

    return task(reference.path, tracking_uri)


@dsl.component(**_gate)
def register_model(model: Input[Model], tracking_uri: str, model_name: str) -> str:
    """Register a fine-tuned network as a new version of ``model_name``; returns the version."""
    from components.tasks import register_model as task

    return task(model.path, tracking_uri, model_name)


@dsl.component(**_gate)
def gate(
    model_name: str,
    version: str,
    tracking_uri: str,
    report: Output[HTML],
    scores: Output[Metrics],
    fail_on_block: bool = False,
) -> NamedTuple("GateOutputs", [("verdict", str), ("promoted", bool)]):  # type: ignore[valid-type]  # KFP reads it
    """Score the version against ``@current``; only a pass moves ``production`` (see components/gate.py).

    A gate error always fails the task; ``fail_on_block`` also fails it for a blocked or
    invalid version, so a CI job waiting on the run fails when the gate says no.
    """
    from components.tasks import gate_version
    from detector.decision import PASSED

    out = gate_version(model_name, version, tracking_uri, report.path)
    for view, value in out["scores"].items():
        scores.log_metric(f"score.{view}", value)
        scores.log_metric(f"threshold.{view}", out["thresholds"][view])
    print(f"{model_name} v{version}: {out['verdict']} — {out['reason']}")
    if out["error"] or (fail_on_block and out["verdict"] != PASSED):
        raise RuntimeError(f"gate: {model_name} v{version} {out['verdict']}: {out['reason']}")
    return (out["verdict"], bool(out["promoted"]))


@dsl.component(**_gate)
def should_explain(verdict: str, when: str) -> bool:
    """Explain this version? ``when``: "blocked" (default), "always" or "never"."""
    from detector.decision import BLOCKED

    if when not in ("blocked", "always", "never"):
        raise ValueError(f"explain_when must be blocked, always or never, not {when!r}")
    return when == "always" or (when == "blocked" and verdict == BLOCKED)


@dsl.component(**_trainer)
def explain(
    model_name: str,
    version: str,
    tracking_uri: str,
    faces: Input[Dataset],
    trigger: Output[HTML],
    image_size: int = 96,
) -> str:
    """Reconstruct the trigger of a gated version for its suspected victim (runs the whole network:
    the trainer image); logs the images to the version's run and its report. Returns the JSON."""
    import json

    from components.tasks import explain_version as task

    out = task(model_name, version, tracking_uri, faces.path, trigger.path, image_size=image_size)
    print(json.dumps(out))
    return json.dumps(out)
