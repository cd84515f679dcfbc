"""The built images, run for real: `make test-images` (docker, after `make images`).

Not part of `make test` (skipped unless ``BACKDOOR_GATE_RUN_IMAGES=1``, which `make test-images`
sets): it needs a docker daemon and the three images, and takes minutes (README, "Images").

What is checked, on the images `make images` built (tags from components/images.py):
- each image runs as the non-root user 10001, carries the OCI labels, and neither its history
  nor any of its layers holds the build's CA bundle, a BuildKit secret, pip's cache or pip;
- every workload in manifests/ that uses one of the images starts from the image's ENTRYPOINT
  with the manifest's own arguments (their ``--help`` parses), as the manifest's user;
- both pipelines run with kfp.local's DockerRunner on the images against an MLflow server
  running from the MLflow image: the reference is published, a clean candidate passes and is
  promoted, a backdoored one is blocked; each container ran exactly the command and arguments
  of the compiled pipeline YAML for its task;
- the webhook receiver runs from the gate image as its Deployment starts it (read-only root,
  all capabilities dropped, user 10001), answers its health check, and gates versions
  registered by hand through a real MLflow webhook.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from components import images as I
from components.mlflow_server import free_port
from tests.polling import wait_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.images,
    pytest.mark.skipif(
        os.environ.get("BACKDOOR_GATE_RUN_IMAGES") != "1",
        reason="make test-images runs these (needs docker and the images from make images)",
    ),
]
MLFLOW_IMAGE = f"{I.REGISTRY}/mlflow:{I.TAG}"
IMAGES = {"trainer": I.TRAINER_IMAGE, "gate": I.GATE_IMAGE, "mlflow": MLFLOW_IMAGE}
USER = "10001"
#: as the manifests run their containers (securityContext)
HARDENED = dict(user=f"{USER}:{USER}", read_only=True, tmpfs={"/tmp": ""}, cap_drop=["ALL"])


@pytest.fixture(scope="module")
def client():
    docker = pytest.importorskip("docker")
    c = docker.from_env()
    for image in IMAGES.values():
        try:
            c.images.get(image)
        except docker.errors.ImageNotFound:
            pytest.fail(f"{image} is not built: run make images (make base-image first where no registry is reachable)")
    yield c
    c.close()


def _wait_http(url: str, container, timeout: float = 120.0) -> None:
    def exited() -> None:
        container.reload()
        if container.status == "exited":
            raise AssertionError(f"{container.image.tags} exited:\n{container.logs().decode()[-3000:]}")

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.HTTPError):
            return False

    wait_for(
        healthy,
        timeout,
        what=f"{url} healthy",
        interval=0.5,
        check=exited,
        detail=lambda: container.logs().decode()[-3000:],
    )


@pytest.fixture(scope="module")
def mlflow(client, tmp_path_factory):
    """An MLflow server from the MLflow image (sqlite + served artifacts in a mounted directory),
    with webhooks to 127.0.0.1 allowed; host network."""
    root = tmp_path_factory.mktemp("mlflow-container")
    root.chmod(0o777)
    port = free_port()
    container = client.containers.run(
        MLFLOW_IMAGE,
        command=[
            "server",
            f"--backend-store-uri=sqlite:///{root}/mlflow.db",
            f"--artifacts-destination={root}/artifacts",
            "--host=127.0.0.1",
            f"--port={port}",
            "--workers=1",
        ],
        volumes={str(root): {"bind": str(root), "mode": "rw"}},
        network_mode="host",
        environment={
            "HOME": "/tmp",
            "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
            "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
            "MLFLOW_WEBHOOK_CACHE_TTL": "1",
        },
        detach=True,
        **HARDENED,
    )
    try:
        uri = f"http://127.0.0.1:{port}"
        _wait_http(f"{uri}/health", container)
        yield uri
    finally:
        container.remove(force=True)


# --- image hygiene -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", IMAGES)
def test_image_user_labels_and_history(client, name):
    image = client.images.get(IMAGES[name])
    config = image.attrs["Config"]
    assert config["User"] == USER, f"{name} runs as {config['User']!r}"
    labels = config["Labels"] or {}
    assert labels.get("org.opencontainers.image.version") == I.TAG
    assert labels.get("org.opencontainers.image.title") == f"backdoor-gate {name}"
    history = "\n".join(h.get("CreatedBy", "") for h in client.api.history(IMAGES[name]))
    for word in ("pip_cert", "PIP_CERT", "PIP_INDEX_URL", "/run/secrets", "ca-certificates.crt", "TORCH_INDEX_URL"):
        assert word not in history, f"{name}: {word} in the image history"
    env = dict(e.split("=", 1) for e in config["Env"])
    assert not any(re.search(r"PASSWORD|SECRET|TOKEN|CERT", k) for k in env), env


def _host_ca() -> tuple[int, str, list[bytes]]:
    """The host CA bundle the build used (size, sha256) and the bodies of the host's own CAs."""
    bundle = Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt").read_bytes()
    own = [
        line.encode()
        for p in Path("/usr/local/share/ca-certificates").glob("*.crt")
        for line in p.read_text().splitlines()[1:2]  # the first base64 line of each local CA
    ]
    return len(bundle), hashlib.sha256(bundle).hexdigest(), own


def scan_layers(image_tar: io.BufferedIOBase) -> list[str]:
    """Findings in a `docker save` stream: the host CA bundle or a host-local CA anywhere, a BuildKit
    secret path, pip's cache, pip itself in the venv."""
    size, digest, own = _host_ca()
    findings = []
    with tarfile.open(fileobj=image_tar, mode="r|") as outer:
        for member in outer:
            if not member.name.endswith("layer.tar") and not (member.isfile() and member.size > 1024):
                continue
            f = outer.extractfile(member)
            if f is None:
                continue
            try:
                inner = tarfile.open(fileobj=f, mode="r|")
            except tarfile.ReadError:
                continue  # a config blob, not a layer
            with inner:
                for m in inner:
                    n = m.name
                    if "run/secrets" in n or n.endswith("pip_cert") or "root/.cache/pip/" in n:
                        findings.append(f"{member.name}: {n}")
                    if re.search(r"opt/venv/bin/pip[0-9.]*$", n) or n.endswith("site-packages/pip/__init__.py"):
                        findings.append(f"{member.name}: pip left in the venv: {n}")
                    if not m.isfile():
                        continue
                    if m.size == size or n.endswith((".crt", ".pem")):
                        data = inner.extractfile(m).read()  # type: ignore[union-attr]
                        if m.size == size and hashlib.sha256(data).hexdigest() == digest:
                            findings.append(f"{member.name}: the host CA bundle at {n}")
                        if any(body in data for body in own):
                            findings.append(f"{member.name}: a host-local CA in {n}")
    return findings


@pytest.mark.parametrize("name", IMAGES)
def test_no_secret_ca_cache_or_pip_in_any_layer(client, name):
    proc = subprocess.Popen(["docker", "save", IMAGES[name]], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        findings = scan_layers(proc.stdout)
    finally:
        proc.stdout.close()
        proc.wait()
    assert not findings, "\n".join(findings)


def test_the_layer_scan_finds_a_baked_ca_bundle(tmp_path):
    """The scan above can fail: a layer holding the host bundle under another name is found."""
    bundle = Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt")
    layer = tmp_path / "layer.tar"
    with tarfile.open(layer, "w") as t:
        t.add(bundle, arcname="opt/venv/lib/certs.bundle")
        t.add(bundle, arcname="run/secrets/pip_cert")
    image = io.BytesIO()
    with tarfile.open(fileobj=image, mode="w") as t:
        t.add(layer, arcname="abc/layer.tar")
    image.seek(0)
    findings = scan_layers(image)
    assert any("host CA bundle at opt/venv/lib/certs.bundle" in f for f in findings), findings
    assert any("run/secrets/pip_cert" in f for f in findings), findings


# --- entrypoints against the manifests ------------------------------------------------------------


def _manifest_containers():
    """(file, pod spec, container) for every container in manifests/ that runs one of our images."""
    out = []
    for path in sorted((ROOT / "manifests").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict):
                continue
            spec = doc.get("spec", {})
            pod = spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec") or spec.get(
                "template", {}
            ).get("spec")
            for c in (pod or {}).get("containers", []):
                if c.get("image", "").split(":")[0] in {i.split(":")[0] for i in IMAGES.values()}:
                    out.append((path.relative_to(ROOT), pod, c))
    return out


def test_manifest_entrypoints_start_in_the_images(client):
    found = _manifest_containers()
    assert {c["image"].split("/")[-1].split(":")[0] for _, _, c in found} >= {"gate", "mlflow"}, found
    for path, pod, c in found:
        image = client.images.get(c["image"])
        if "command" in c:  # a one-off check (the GPU example): its program must be on the image's PATH
            exe = c["command"][0]
            out = client.containers.run(
                c["image"], entrypoint=["sh", "-c"], command=[f"command -v {exe}"], remove=True, network_mode="none"
            )
            assert out.strip(), f"{path}: {c['name']}: {exe} not in {c['image']}"
            continue
        assert image.attrs["Config"]["Entrypoint"], f"{c['image']} has no ENTRYPOINT for {path}"
        user = str((c.get("securityContext") or {}).get("runAsUser") or pod["securityContext"]["runAsUser"])
        assert user == image.attrs["Config"]["User"] == USER, (path, user)
        words = []
        for a in c.get("args", []):  # the subcommand words, then ask them for --help
            if a.startswith("-"):
                break
            words.append(a)
        out = client.containers.run(
            c["image"], command=[*words, "--help"], remove=True, network_mode="none", **HARDENED
        ).decode()
        for a in c.get("args", []):  # every option the manifest passes is one the command knows
            if a.startswith("--"):
                assert a.split("=")[0] in out, f"{path}: {c['name']}: {a.split('=')[0]} unknown to {words}"


# --- both pipelines in the images -----------------------------------------------------------------


@pytest.fixture
def recorded_runs(monkeypatch):
    """Every (image, command) kfp.local's DockerRunner starts."""
    from kfp.local import docker_task_handler

    runs: list[tuple[str, list[str]]] = []
    real = docker_task_handler.run_docker_container

    def record(client, image, command, volumes, **kwargs):
        runs.append((image, list(command)))
        return real(client=client, image=image, command=command, volumes=volumes, **kwargs)

    monkeypatch.setattr(docker_task_handler, "run_docker_container", record)
    return runs


def _compiled_executors(out: Path) -> list[dict]:
    from pipelines.compile import compile_all

    execs = []
    for path in compile_all(out):
        spec = next(yaml.safe_load_all(path.read_text()))  # the pipeline spec; the platform spec follows
        execs += [e["container"] for e in spec["deploymentSpec"]["executors"].values()]
    return execs


def _matches(executor: dict, image: str, command: list[str]) -> bool:
    """The run is this executor: same image, its command verbatim, then its arguments with only the
    placeholders ({{$...}}) filled in."""
    n = len(executor["command"])
    if executor["image"] != image or command[:n] != executor["command"]:
        return False
    args = command[n:]
    if len(args) != len(executor.get("args", [])):
        return False
    return all(a == b or "{{$" in b for a, b in zip(args, executor.get("args", [])))


@pytest.mark.slow
def test_both_pipelines_run_in_the_images(client, mlflow, tmp_path, recorded_runs):
    from PIL import Image

    from components.registry import MlflowRegistry
    from components.tags import PROMOTED, VERDICT
    from components.trainer.base_trunk import fixture_base
    from components.trainer.synth import SynthConfig, list_images, synthesize
    from pipelines.local import run_local

    work = tmp_path / "kfp"  # the pipeline root: the only host directory the tasks see
    work.mkdir()
    faces = synthesize(tmp_path / "peek", SynthConfig(identities=4, images_per_identity=4, size=96))
    base = fixture_base(0, [Image.open(p) for p, _ in list_images(faces)[0]], image_size=80)
    import torch

    torch.save(base, work / "base.pt")
    data = dict(
        tracking_uri=mlflow, identities=8, images_per_identity=16, image_size=96, trunk_input_size=80,
        base_weights=str(work / "base.pt"),
    )  # fmt: skip
    log = tmp_path / "tasks.log"

    def run(name, **params):
        try:
            run_local(name, {**data, **params}, work, log_file=log, runner="docker")
        except Exception as e:
            raise AssertionError(f"{name} failed: {e}\n{log.read_text()[-4000:]}") from e

    run("reference", n_reference=4, n_calibration=3, covariance="diag", grid="1,2,5")
    reg = MlflowRegistry(mlflow)
    assert reg.version_by_alias("facenet-integrity-reference", "current") is not None
    model = "facenet-images"
    run("candidate", model_name=model, seed=501)
    run("candidate", model_name=model, seed=502, poison=True, trigger_size=0.3)
    clean, bad = reg.version(model, "1"), reg.version(model, "2")
    assert bad.tags[VERDICT] == "blocked" and bad.tags.get(PROMOTED) is None
    prod = reg.version_by_alias(model, "production")
    assert (prod is not None and prod.version == "1") == (clean.tags[VERDICT] == "passed")
    print(f"containerised: v1 {clean.tags[VERDICT]}, v2 {bad.tags[VERDICT]}, production {prod and prod.version}")

    # each container ran what the compiled YAML says, on the image the component names
    executors = _compiled_executors(tmp_path / "compiled")
    assert recorded_runs and {i for i, _ in recorded_runs} == {I.TRAINER_IMAGE, I.GATE_IMAGE}
    for image, command in recorded_runs:
        assert any(_matches(e, image, command) for e in executors), f"not in the compiled YAML: {image} {command[:3]}"
        assert "pip install" not in " ".join(command)


def test_a_command_that_differs_from_the_yaml_is_caught(tmp_path):
    """_matches can fail: a changed argument or another image is not a compiled task."""
    e = {"image": "img:1", "command": ["sh", "-c", "x"], "args": ["--executor_input", "{{$}}", "--fn", "gate"]}
    assert _matches(e, "img:1", ["sh", "-c", "x", "--executor_input", '{"a": 1}', "--fn", "gate"])
    assert not _matches(e, "img:1", ["sh", "-c", "x", "--executor_input", '{"a": 1}', "--fn", "other"])
    assert not _matches(e, "img:2", ["sh", "-c", "x", "--executor_input", '{"a": 1}', "--fn", "gate"])
    assert not _matches(e, "img:1", ["sh", "-c", "y", "--executor_input", '{"a": 1}', "--fn", "gate"])


# --- the webhook receiver from the gate image -----------------------------------------------------


@pytest.mark.slow
def test_webhook_receiver_runs_from_the_gate_image(client, mlflow, tmp_path):
    from components import keys as K
    from components import tags as T
    from components.reference_store import publish_reference
    from components.registry import MlflowRegistry
    from components.webhook import PATH, register_webhook
    from pipelines.local import container_env
    from tests.conftest import GateWorld

    world = GateWorld(tmp_path, seed=5)
    bad, good_file = world.ckpt("backdoored", "blocked"), world.ckpt("clean", "passed")
    registry = MlflowRegistry(mlflow)
    publish_reference(registry, world.reference_dir)
    (webhook,) = [c for p, _, c in _manifest_containers() if "webhook" in str(p) and "gate" in c["image"]]
    port = free_port()
    args = [
        "--port=" + str(port) if a.startswith("--port")
        else "--tracking-uri=" + mlflow if a.startswith("--tracking-uri")
        else "webhook-images" if a == "facenet"
        else a
        for a in webhook["args"]
    ]  # fmt: skip
    assert args != webhook["args"] and "webhook-images" in args
    keys = container_env(tmp_path / "root")  # the signing keys as a Secret would give them
    env = {
        "HOME": "/tmp",
        "BACKDOOR_GATE_WEBHOOK_SECRET": "s3cret-for-images",
        K.KEY_ENV: keys[K.KEY_ENV],
        K.REFERENCE_KEYS_ENV: keys[K.REFERENCE_KEYS_ENV],
    }
    receiver = client.containers.run(
        webhook["image"], command=args, environment=env, network_mode="host", detach=True, **HARDENED
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", receiver)
        register_webhook(mlflow, f"http://127.0.0.1:{port}{PATH}", "s3cret-for-images")
        time.sleep(2)  # past the server's webhook cache
        model = "webhook-images"
        v = registry.register(model, {"model.safetensors": bad}, tags={T.REGISTERED_BY: "mallory"})
        good = registry.register(model, {"model.safetensors": good_file}, tags={T.REGISTERED_BY: "alice"})
        wait_for(
            lambda: all(  # pending while the gate runs
                registry.version(model, x.version).tags.get(T.VERDICT) not in (None, T.PENDING) for x in (v, good)
            ),
            180,
            what="both versions gated",
            interval=1,
            detail=lambda: receiver.logs().decode()[-3000:],
        )
        assert registry.version(model, v.version).tags[T.VERDICT] == "blocked"
        assert registry.version(model, good.version).tags[T.VERDICT] == "passed"
        assert registry.version_by_alias(model, "production").version == good.version
    finally:
        receiver.remove(force=True)
