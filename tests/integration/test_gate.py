"""The promotion gate against a real `mlflow server` process (sqlite + served artifacts)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest

from components import gate as G
from components import policy
from components import tags as T
from components.config import GateConfig
from components.mlflow_server import MlflowServer
from components.reference_store import publish_reference
from components.registry import MlflowRegistry
from detector.detectors import load_reference
from tests.conftest import GateWorld

_names = itertools.count()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A reference artifact and a supply of clean / backdoored checkpoint files."""
    return GateWorld(tmp_path_factory.mktemp("gate"))


@pytest.fixture
def registry(mlflow_server, world):
    return world.publish(MlflowRegistry(mlflow_server.uri))


def _model() -> str:
    return f"facenet-{next(_names)}"


def test_artifact_swapped_after_scoring_is_refused(registry, world, mlflow_server):
    """The stored file really changes on the server's disk between scoring and promotion."""
    model = _model()
    v = world.register(registry, model, world.ckpt("clean", "passed"))
    swap_in = world.ckpt("backdoored").read_bytes()

    class SwappingRegistry(MlflowRegistry):
        calls = 0

        def download_artifact(self, info, max_bytes):
            out = super().download_artifact(info, max_bytes)
            SwappingRegistry.calls += 1
            if SwappingRegistry.calls == 1:  # after the gate's first read: tamper with the store
                run_dir = next(mlflow_server.artifacts.rglob(f"{info.run_id}"))
                (next(run_dir.rglob("model.safetensors"))).write_bytes(swap_in)
            return out

    r = G.gate(model, v.version, registry=SwappingRegistry(mlflow_server.uri))
    assert r.verdict == "blocked" and "changed after it was scored" in r.reason
    assert registry.version_by_alias(model, "production") is None


@pytest.mark.slow
def test_server_killed_mid_gate_leaves_alias_untouched(tmp_path, world):
    server = MlflowServer(tmp_path / "srv").start()
    try:
        reg = MlflowRegistry(server.uri)
        publish_reference(reg, world.reference_dir)
        model = "facenet"
        first = world.register(reg, model, world.ckpt("clean", "passed"))
        assert G.gate(model, first.version, registry=reg).promoted
        second = world.register(reg, model, world.ckpt("clean", "passed"))

        class DyingRegistry(MlflowRegistry):
            def download_artifact(self, info, max_bytes):
                out = super().download_artifact(info, max_bytes)
                server.kill()  # the server dies after the candidate was read, before any verdict
                return out

        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        try:
            r = G.gate(model, second.version, registry=DyingRegistry(server.uri))
        finally:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "3"
        assert r.exit_code == 2 and not r.promoted and r.verdict != "passed"
        server.start()
        assert reg.version_by_alias(model, "production").version == first.version
        assert reg.version(model, second.version).tags[T.VERDICT] == "pending"  # never a stale pass
        rerun = G.gate(model, second.version, registry=reg)  # and a rerun converges
        assert rerun.verdict == "passed" and rerun.promoted
    finally:
        server.stop()


def test_unreachable_server_is_a_gate_error():
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        r = G.gate("facenet", 1, registry=MlflowRegistry("http://127.0.0.1:9"))
    finally:
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "3"
    assert r.exit_code == 2 and "gate error" in r.reason and not r.promoted


def test_gate_cli_exit_codes(registry, world, mlflow_server):
    model = _model()
    good = world.register(registry, model, world.ckpt("clean", "passed"))
    bad = world.register(registry, model, world.ckpt("backdoored", "blocked"))
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server.uri)
    cli = [sys.executable, "-m", "backdoor_gate.cli", "gate", "--model", model, "--json", "--no-report", "--version"]
    out = {}
    for v in (good.version, bad.version):
        p = subprocess.run(cli + [v], capture_output=True, text=True, env=env, timeout=300)
        out[v] = (p.returncode, json.loads(p.stdout)["verdict"])
    assert out == {good.version: (0, "passed"), bad.version: (1, "blocked")}


@pytest.mark.slow
def test_twenty_concurrent_gates_converge(registry, world):
    """20 versions gated at once: every verdict right and recorded, production on the newest pass."""
    from concurrent.futures import ThreadPoolExecutor

    model = _model()
    ref = load_reference(world.reference_dir)
    kinds = ["clean", "backdoored", "clean", "clean"] * 5
    paths = [world.ckpt(k) for k in kinds]
    versions = [world.register(registry, model, p).version for p in paths]
    expected = {
        v: ("passed" if ref.assess(p).decision.verdict == "passed" else "blocked") for v, p in zip(versions, paths)
    }
    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(
            pool.map(
                lambda v: G.gate(
                    model, v, registry=MlflowRegistry(registry.tracking_uri), config=GateConfig(report=False)
                ),
                versions,
            )
        )
    assert not [r.reason for r in results if r.error]
    assert {r.version: r.verdict for r in results} == expected
    for v in versions:
        tags = registry.version(model, v).tags
        assert tags[T.VERDICT] == expected[v] and T.MODEL_SHA in tags and T.score_tag("forward") in tags
    newest_pass = max((int(v) for v, verdict in expected.items() if verdict == "passed"))
    assert registry.version_by_alias(model, "production").version == str(newest_pass)


@pytest.fixture(scope="module")
def signing(tmp_path_factory):
    from detector import signing as V

    priv, pub = V.generate_keypair(tmp_path_factory.mktemp("keys"))
    return V.load_private_key(priv.read_bytes()), pub


def test_signed_verdict_is_attached_verified_and_recorded_on_promotion(registry, world, signing, mlflow_server):
    from detector import signing as V

    key, pub = signing
    model = _model()
    v = world.register(registry, model, world.ckpt("clean", "passed"))
    r = G.gate(model, v.version, registry=registry, signing_key=key)
    assert r.verdict == "passed" and r.promoted
    tags = registry.version(model, v.version).tags
    assert tags[T.SIGNED_BY] == V.key_id(key.public_key()) == r.signed_by
    assert tags[T.VERDICT_SHA] == r.verdict_sha256 == tags[T.PROMOTED_VERDICT]
    doc = policy.verify_version(model, v.version, V.load_public_key(pub), registry=registry)
    assert (doc["verdict"], doc["model_sha256"], doc["reference_sha256"]) == (
        "passed",
        r.model_sha256,
        r.reference_sha256,
    )
    # the same verdict as an in-toto statement in a DSSE envelope: subjects are every judged file
    info = registry.version(model, v.version)
    dsse = json.loads(registry.run_file(info.run_id, f"integrity/v{v.version}/{T.DSSE_FILE}"))
    statement = V.dsse_verify(dsse, [V.load_public_key(pub)])
    assert {s["name"]: s["digest"]["sha256"] for s in statement["subject"]} == r.files == doc["files"]
    assert statement["predicate"] == doc
    cli = [
        sys.executable,
        "-m",
        "backdoor_gate.cli",
        "verify",
        "--model",
        model,
        "--version",
        v.version,
        "--public-key",
        str(pub),
        "--tracking-uri",
        mlflow_server.uri,
    ]
    assert subprocess.run(cli, capture_output=True, text=True, timeout=300).returncode == 0
    # someone with write access edits the verdict tag: the signed document no longer agrees
    registry.set_tags(model, v.version, {T.VERDICT: "blocked"})
    p = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "tags disagree" in p.stderr  # tampering is malformed (2), not a signed refusal (1)
