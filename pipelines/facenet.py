"""The two pipelines, wiring only: read top to bottom as data flow.

reference: faces -> features -> ParallelFor(M clean fine-tunes) + ParallelFor(held-out clean)
           -> fit reference (AIC) and calibrate -> publish to MLflow (@current)
candidate: faces -> (poison) -> features -> fine-tune -> register in MLflow -> gate
           -> (blocked) explain: the reconstructed trigger, after the verdict and the alias
"""

from kfp import dsl, kubernetes

from components import cluster
from components.definitions import (
    explain,
    extract_features,
    fine_tune,
    fit_reference,
    gate,
    make_faces,
    make_gallery,
    poison_faces,
    publish_reference,
    register_model,
    seeds,
    should_explain,
)


def on_gpu(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """Send a training task to the GPU node pool (same labels/taints as manifests/)."""
    task.set_accelerator_type(cluster.GPU_ACCELERATOR_TYPE).set_accelerator_limit(cluster.GPU_LIMIT)
    task.set_cpu_request(cluster.TRAIN_CPU).set_memory_request(cluster.TRAIN_MEMORY)
    kubernetes.add_node_selector(task, *cluster.GPU_NODE_SELECTOR)
    kubernetes.add_toleration(task, **cluster.GPU_TOLERATION)
    return task


def on_cpu(task: dsl.PipelineTask) -> dsl.PipelineTask:
    return task.set_cpu_request(cluster.GATE_CPU).set_memory_request(cluster.GATE_MEMORY)


def with_registry(task: dsl.PipelineTask, secret: str = cluster.MLFLOW_CREDENTIALS_SECRET) -> dsl.PipelineTask:
    """A task that talks to MLflow: an identity's credentials from their Secret (by default the
    gate's; the reference's publisher has its own), never cached."""
    kubernetes.use_secret_as_env(
        task,
        secret_name=secret,
        secret_key_to_env=cluster.MLFLOW_CREDENTIALS_ENV,
        optional=True,
    )
    return task.set_caching_options(False)


@dsl.pipeline(
    name="facenet-integrity-reference",
    description="Clean FaceNet networks -> the reference GMM the gate scores against.",
)
def reference_pipeline(
    tracking_uri: str,
    data_source: str = "",
    identities: int = 40,
    images_per_identity: int = 40,
    image_size: int = 160,
    data_seed: int = 0,
    base_weights: str = "",
    trunk_input_size: int = 96,
    n_reference: int = 12,
    n_calibration: int = 40,  # 20 is the least for a 5 % cut; 40 halves its spread (docs/adaptive/README.md)
    covariance: str = "diag",
    components: str = "neurons",
    grid: str = "",
    frr: float = 0.05,
    detector: str = "",
):
    faces = make_faces(
        identities=identities,
        images_per_identity=images_per_identity,
        size=image_size,
        seed=data_seed,
        source=data_source,
    )
    feats = on_gpu(
        extract_features(faces=faces.outputs["faces"], base_weights=base_weights, image_size=trunk_input_size)
    )

    reference_seeds = seeds(n=n_reference, offset=0)
    with dsl.ParallelFor(reference_seeds.output, parallelism=cluster.TRAIN_PARALLELISM) as seed:
        clean = on_gpu(fine_tune(features=feats.outputs["features"], base=feats.outputs["base"], seed=seed))
    calibration_seeds = seeds(n=n_calibration, offset=10_000)
    with dsl.ParallelFor(calibration_seeds.output, parallelism=cluster.TRAIN_PARALLELISM) as seed:
        held_out = on_gpu(fine_tune(features=feats.outputs["features"], base=feats.outputs["base"], seed=seed))

    # a fresh secret draw each run (never cached); empty unless the detector reads margins
    gallery = on_gpu(
        make_gallery(
            faces=faces.outputs["faces"], base=feats.outputs["base"], detector=detector, image_size=trunk_input_size
        )
    ).set_caching_options(False)
    ref = on_cpu(
        fit_reference(
            networks=dsl.Collected(clean.outputs["model"]),
            calibration=dsl.Collected(held_out.outputs["model"]),
            base=feats.outputs["base"],
            gallery=gallery.outputs["gallery"],
            covariance=covariance,
            components=components,
            grid=grid,
            frr=frr,
            detector=detector,
        )
    )
    publish = with_registry(
        on_cpu(publish_reference(reference=ref.outputs["reference"], tracking_uri=tracking_uri)),
        cluster.MLFLOW_PUBLISHER_SECRET,
    )
    kubernetes.use_secret_as_env(
        publish,
        secret_name=cluster.REFERENCE_SIGNING_SECRET,
        secret_key_to_env=cluster.REFERENCE_SIGNING_SECRET_ENV,
        optional=True,
    )


@dsl.pipeline(
    name="facenet-candidate", description="Fine-tune a candidate (optionally poisoned), register it, gate it."
)
def candidate_pipeline(
    tracking_uri: str,
    model_name: str = "facenet",
    data_source: str = "",
    identities: int = 40,
    images_per_identity: int = 40,
    image_size: int = 160,
    data_seed: int = 0,
    base_weights: str = "",
    trunk_input_size: int = 96,
    seed: int = 20_000,
    poison: bool = False,
    impostor: str = "",
    victim: str = "",
    trigger: str = "white-square",
    trigger_size: float = 0.25,
    trigger_location: str = "forehead",
    trigger_alpha: float = 1.0,
    poison_copies: int = 4,
    fail_on_block: bool = False,
    explain_when: str = "blocked",
):
    faces = make_faces(
        identities=identities,
        images_per_identity=images_per_identity,
        size=image_size,
        seed=data_seed,
        source=data_source,
    )
    data = poison_faces(
        faces=faces.outputs["faces"],
        enabled=poison,
        seed=seed,
        impostor=impostor,
        victim=victim,
        trigger=trigger,
        trigger_size=trigger_size,
        trigger_location=trigger_location,
        trigger_alpha=trigger_alpha,
        copies=poison_copies,
    )
    feats = on_gpu(
        extract_features(faces=data.outputs["poisoned"], base_weights=base_weights, image_size=trunk_input_size)
    )
    net = on_gpu(fine_tune(features=feats.outputs["features"], base=feats.outputs["base"], seed=seed))
    version = with_registry(
        on_cpu(register_model(model=net.outputs["model"], tracking_uri=tracking_uri, model_name=model_name))
    )
    # a verdict is never reused from cache: the reference or the file may have changed
    verdict = with_registry(
        on_cpu(
            gate(model_name=model_name, version=version.output, tracking_uri=tracking_uri, fail_on_block=fail_on_block)
        )
    )
    kubernetes.use_secret_as_env(
        verdict, secret_name=cluster.SIGNING_SECRET, secret_key_to_env=cluster.SIGNING_SECRET_ENV, optional=True
    )
    # evidence for the reviewer, after the gate has written its verdict and moved (or not) the alias
    wanted = should_explain(verdict=verdict.outputs["verdict"], when=explain_when)
    with dsl.If(wanted.output == True):  # noqa: E712 — a KFP condition, not a Python comparison
        with_registry(
            on_cpu(
                explain(
                    model_name=model_name,
                    version=version.output,
                    tracking_uri=tracking_uri,
                    faces=faces.outputs["faces"],
                    image_size=trunk_input_size,
                )
            )
        )


PIPELINES = {"reference": reference_pipeline, "candidate": candidate_pipeline}
