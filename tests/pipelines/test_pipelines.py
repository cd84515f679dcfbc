"""Compiled pipeline YAML (what a cluster runs) and a real kfp.local run against a real MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from components import cluster, images
from components.registry import MlflowRegistry
from components.tags import PROMOTED, VERDICT
from pipelines.local import prune_runs


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled")
    p = subprocess.run(
        [sys.executable, "-m", "backdoor_gate.cli", "pipelines", "compile", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    docs = {}
    for name in ("reference", "candidate"):
        spec, *platform = yaml.safe_load_all((out / f"{name}.yaml").read_text())  # 2nd document: platform config
        docs[name] = {**spec, **(platform[0] if platform else {})}
    return docs


def _executors(doc):
    return doc["deploymentSpec"]["executors"]


def _k8s(doc):
    return doc.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {})


@pytest.mark.parametrize(
    "name, gpu_tasks",
    [
        ("reference", {"extract-features", "fine-tune", "fine-tune-2", "make-gallery"}),
        ("candidate", {"extract-features", "fine-tune"}),
    ],
)
def test_training_tasks_request_the_gpu_pool(compiled, name, gpu_tasks):
    doc = compiled[name]
    ex, k8s = _executors(doc), _k8s(doc)
    gpu = {e for e, spec in ex.items() if spec["container"].get("resources", {}).get("accelerator")}
    assert {e.removeprefix("exec-") for e in gpu} == gpu_tasks
    for e in gpu:
        acc = ex[e]["container"]["resources"]["accelerator"]
        assert acc["resourceType"] == cluster.GPU_ACCELERATOR_TYPE and int(acc["resourceCount"]) == cluster.GPU_LIMIT
        assert k8s[e]["nodeSelector"]["labels"] == dict([cluster.GPU_NODE_SELECTOR])
        assert k8s[e]["tolerations"] == [cluster.GPU_TOLERATION]
    for e, spec in ex.items():  # every task names its image; the gate side never gets a GPU
        assert spec["container"]["image"] in (images.TRAINER_IMAGE, images.GATE_IMAGE)
        if e not in gpu:
            assert "nodeSelector" not in k8s.get(e, {})


def test_gate_never_cached_and_runs_on_the_gate_image(compiled):
    doc = compiled["candidate"]
    tasks = doc["root"]["dag"]["tasks"]
    assert tasks["gate"]["cachingOptions"].get("enableCache", False) is False
    assert tasks["register-model"]["cachingOptions"].get("enableCache", False) is False
    assert tasks["fine-tune"]["cachingOptions"]["enableCache"] is True
    assert _executors(doc)["exec-gate"]["container"]["image"] == images.GATE_IMAGE
    # the verdict signing key reaches the gate (and only the gate); MLflow credentials reach the
    # tasks that talk to the registry (and only those); both from optional Secrets
    secrets = {
        e: {x["secretName"]: x for x in spec.get("secretAsEnv", [])}
        for e, spec in _k8s(doc).items()
        if spec.get("secretAsEnv")
    }
    assert {e for e, s in secrets.items() if cluster.SIGNING_SECRET in s} == {"exec-gate"}
    assert {e for e, s in secrets.items() if cluster.MLFLOW_CREDENTIALS_SECRET in s} == {
        "exec-gate",
        "exec-register-model",
        "exec-explain",
    }
    for name, env in (
        (cluster.SIGNING_SECRET, cluster.SIGNING_SECRET_ENV),
        (cluster.MLFLOW_CREDENTIALS_SECRET, cluster.MLFLOW_CREDENTIALS_ENV),
    ):
        entry = secrets["exec-gate"][name]
        assert entry.get("optional") is True and {k["secretKey"]: k["envVar"] for k in entry["keyToEnv"]} == env
    ref_secrets = {e for e, spec in _k8s(compiled["reference"]).items() if spec.get("secretAsEnv")}
    assert ref_secrets == {"exec-publish-reference"}
    # the reference is written by its publisher, never with the gate's credentials (which may only read it)
    publish = {x["secretName"]: x for x in _k8s(compiled["reference"])["exec-publish-reference"]["secretAsEnv"]}
    assert cluster.MLFLOW_CREDENTIALS_SECRET not in publish
    entry = publish[cluster.MLFLOW_PUBLISHER_SECRET]
    assert entry.get("optional") is True
    assert {k["secretKey"]: k["envVar"] for k in entry["keyToEnv"]} == cluster.MLFLOW_CREDENTIALS_ENV


def test_explain_runs_after_the_gate_only_when_wanted(compiled):
    """The trigger search is evidence for a reviewer: it waits for the gate's verdict (the alias is
    moved inside the gate task, so it never waits for explain) and runs only when should-explain says so."""
    from components.definitions import should_explain

    doc = compiled["candidate"]
    root = doc["root"]["dag"]["tasks"]
    assert "explain" not in root  # never unconditional
    assert root["should-explain"]["dependentTasks"] == ["gate"]
    cond = next(t for t in root.values() if "triggerPolicy" in t)
    assert "should-explain-Output" in cond["triggerPolicy"]["condition"]
    inner = doc["components"][cond["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"explain"} and inner["explain"]["cachingOptions"].get("enableCache", False) is False
    assert _executors(doc)["exec-explain"]["container"]["image"] == images.TRAINER_IMAGE  # needs facenet-pytorch
    decide = should_explain.python_func
    assert decide("blocked", "blocked") and not decide("passed", "blocked") and not decide("invalid", "blocked")
    assert decide("passed", "always") and not decide("blocked", "never")
    with pytest.raises(ValueError, match="explain_when"):
        decide("blocked", "sometimes")


def test_reference_pipeline_fans_out_and_collects(compiled):
    dag = compiled["reference"]["root"]["dag"]["tasks"]
    loops = [t for t in dag.values() if "parameterIterator" in t]
    assert len(loops) == 2 and all(t["iteratorPolicy"]["parallelismLimit"] == cluster.TRAIN_PARALLELISM for t in loops)
    fit = dag["fit-reference"]["inputs"]["artifacts"]
    assert set(fit) == {"networks", "calibration", "base", "gallery"}
    # the margins part's gallery is a fresh secret draw each run: its step is never cached
    assert dag["make-gallery"]["cachingOptions"].get("enableCache", False) is False


@pytest.mark.slow
def test_local_run_end_to_end(tmp_path, mlflow_server):
    """reference -> clean and backdoored candidates, every task a real subprocess, verdicts in MLflow."""
    from components.trainer.base_trunk import fixture_base
    from components.trainer.synth import SynthConfig, list_images, synthesize

    faces = synthesize(tmp_path / "peek", SynthConfig(identities=4, images_per_identity=4, size=96))
    base = fixture_base(0, [Image.open(p) for p, _ in list_images(faces)[0]], image_size=80)
    torch.save(base, tmp_path / "base.pt")
    data = [
        "--param",
        "identities=8",
        "--param",
        "images_per_identity=16",
        "--param",
        "image_size=96",
        "--param",
        "trunk_input_size=80",
        "--param",
        f"base_weights={tmp_path / 'base.pt'}",
    ]
    run = [sys.executable, "-m", "backdoor_gate.cli", "pipelines", "run-local", "--workdir", str(tmp_path / "kfp")]
    env = dict(os.environ, OMP_NUM_THREADS="1", BACKDOOR_GATE_CACHE=str(tmp_path / "cache"))
    uri = ["--param", f"tracking_uri={mlflow_server.uri}"]

    def go(*args):
        p = subprocess.run([*run, *args, *uri, *data], capture_output=True, text=True, env=env, timeout=900)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]

    go(
        "reference",
        "--param",
        "n_reference=4",
        "--param",
        "n_calibration=3",
        "--param",
        "covariance=diag",
        "--param",
        "grid=1,2,5",
    )
    reg = MlflowRegistry(mlflow_server.uri)
    assert reg.version_by_alias("facenet-integrity-reference", "current") is not None
    (fitted,) = (tmp_path / "kfp").glob("facenet-integrity-reference-*/fit-reference/reference/reference.json")
    fitted_info = json.loads(fitted.read_text())
    assert fitted_info["decide_by"] == ["head", "output-spectrum", "margins"]  # the default
    assert set(fitted_info["thresholds"]) == {"head", "head.offset-share", "head.toward", "output-spectrum", "margins"}
    (drawn,) = (tmp_path / "kfp").glob("facenet-integrity-reference-*/make-gallery/gallery/gallery.npz")
    assert np.load(drawn)["features"].shape == (8, 16, 1792)  # every person of 8, 16 faces each
    model = "facenet-e2e"
    go("candidate", "--param", f"model_name={model}", "--param", "seed=501")
    go(
        "candidate",
        "--param",
        f"model_name={model}",
        "--param",
        "seed=502",
        "--param",
        "poison=true",
        "--param",
        "trigger_size=0.3",
        "--param",
        "explain_when=never",  # the trigger search is tested in test_explain / test_review_page (time)
    )
    clean, bad = reg.version(model, "1"), reg.version(model, "2")
    assert clean.tags["integrity.trunk"] == "ok" and bad.tags["integrity.trunk"] == "ok"
    assert bad.tags[VERDICT] == "blocked" and bad.tags.get(PROMOTED) is None
    prod = reg.version_by_alias(model, "production")
    assert (prod is not None and prod.version == "1") == (clean.tags[VERDICT] == "passed")
    # each run left its outputs under the pipeline root; the demo's pruning keeps the newest of each
    # pipeline (here the second candidate run) and nothing else that looks like a run
    runs = sorted(d.name for d in (tmp_path / "kfp").iterdir() if d.name.startswith("facenet-"))
    assert len(runs) == 3, runs
    gone, freed = prune_runs(tmp_path / "kfp", keep=1)
    left = sorted(d.name for d in (tmp_path / "kfp").iterdir() if d.name.startswith("facenet-"))
    assert [d.name for d in gone] == [runs[0]] and left == runs[1:] and "candidate" in runs[0], (runs, left)
    assert freed > 90e6  # the first candidate's fine-tuned network alone is 94 MB


def test_prune_runs_leaves_the_cache_and_foreign_dirs(tmp_path):
    for name in (
        "cache",
        "notes-2026",
        "p-2026-12-02-04-11-59-908077",
        "p-2026-12-02-05-00-00-000001",
        "q-2026-01-01-00-00-00-000000",
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_bytes(b"x" * 10)
    gone, freed = prune_runs(tmp_path, keep=1)
    assert [d.name for d in gone] == ["p-2026-12-02-04-11-59-908077"] and freed == 10
    assert sorted(d.name for d in tmp_path.iterdir()) == [
        "cache",
        "notes-2026",
        "p-2026-12-02-05-00-00-000001",
        "q-2026-01-01-00-00-00-000000",
    ]
    gone, _ = prune_runs(tmp_path, keep=0)
    assert sorted(d.name for d in gone) == ["p-2026-12-02-05-00-00-000001", "q-2026-01-01-00-00-00-000000"]
    assert prune_runs(tmp_path / "missing")[0] == []
