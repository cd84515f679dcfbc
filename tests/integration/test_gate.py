"""The promotion gate against a real `mlflow server` process (sqlite + served artifacts)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from components import gate as G
from components.mlflow_server import MlflowServer
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
    reg = MlflowRegistry(mlflow_server.uri)
    G.publish_reference(reg, world.reference_dir)
    return reg


def _register(reg: MlflowRegistry, model: str, path: Path, name="model.safetensors", who="trainer-bot"):
    return reg.register(model, {name: path}, tags={G.REGISTERED_BY: who})


def _model() -> str:
    return f"facenet-{next(_names)}"


def test_pass_sets_alias_and_every_tag(registry, world):
    model = _model()
    v = _register(registry, model, world.ckpt("clean", "passed"))
    r = G.gate(model, v.version, registry=registry)
    assert (r.verdict, r.exit_code, r.promoted) == ("passed", 0, True), r.reason
    info = registry.version(model, v.version)
    for key in [
        G.VERDICT,
        G.MODEL_SHA,
        G.REFERENCE_SHA,
        G.GATE,
        G.CHECKED_AT,
        G.REASON,
        G.REPORT,
        G.score_tag("forward"),
        G.score_tag("backward"),
        G.threshold_tag("forward"),
        G.threshold_tag("backward"),
    ]:
        assert key in info.tags, key
    assert info.tags[G.VERDICT] == "passed"
    assert float(info.tags[G.score_tag("forward")]) >= float(info.tags[G.threshold_tag("forward")])
    assert registry.version_by_alias(model, "production").version == v.version
    assert info.tags[G.REPORT].endswith("report.html")


def test_backdoor_is_blocked_and_production_stays(registry, world, tmp_path):
    model = _model()
    good = _register(registry, model, world.ckpt("clean", "passed"))
    assert G.gate(model, good.version, registry=registry).promoted
    bad = _register(registry, model, world.ckpt("backdoored", "blocked"))
    r = G.gate(model, bad.version, registry=registry)
    assert (r.verdict, r.exit_code, r.promoted) == ("blocked", 1, False)
    assert registry.version_by_alias(model, "production").version == good.version
    flagged = registry.search(f"name='{model}' and tags.`integrity.verdict`='blocked'")
    assert [f.version for f in flagged] == [bad.version]
    # the review report is in the run's artifacts and names the verdict
    report_dir = registry.download(registry.version(model, bad.version).tags[G.REPORT].rsplit("/", 1)[0], tmp_path)
    assert "blocked" in (report_dir / "report.html").read_text()
    assert (report_dir / "report.png").stat().st_size > 10_000


def test_invalid_and_malicious_candidates_never_promote(registry, world, tmp_path):
    model = _model()
    nan = tmp_path / "nan.pt"
    torch.save({"last_linear.weight": torch.full((24, 32), float("nan"))}, nan)
    v = _register(registry, model, nan, name="model.pt")
    r = G.gate(model, v.version, registry=registry)
    assert (r.verdict, r.exit_code) == ("invalid", 2) and "NaN" in r.reason
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"last_linear.weight": torch.zeros(24, 32), "x": Evil()}, evil)
    v = _register(registry, model, evil, name="model.pt")
    r = G.gate(model, v.version, registry=registry)
    assert r.verdict == "invalid" and "safe loader" in r.reason and not marker.exists()
    assert registry.version_by_alias(model, "production") is None


def test_newest_passed_version_keeps_production(registry, world):
    model = _model()
    old = _register(registry, model, world.ckpt("clean", "passed"))
    new = _register(registry, model, world.ckpt("clean", "passed"))
    assert G.gate(model, new.version, registry=registry).promoted
    r = G.gate(model, old.version, registry=registry)
    assert r.verdict == "passed" and not r.promoted
    assert registry.version_by_alias(model, "production").version == new.version


def test_artifact_swapped_after_scoring_is_refused(registry, world, mlflow_server):
    """The stored file really changes on the server's disk between scoring and promotion."""
    model = _model()
    v = _register(registry, model, world.ckpt("clean", "passed"))
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


def test_missing_reference_fails_closed(mlflow_server, world):
    """A gate fault is the gate's: exit 2, verdict ``error`` on the version (never the candidate's), no alias."""
    reg = MlflowRegistry(mlflow_server.uri)
    model = _model()
    v = _register(reg, model, world.ckpt("clean"))
    r = G.gate(model, v.version, registry=reg, config=G.GateConfig(reference_model="no-such-reference"))
    assert r.exit_code == 2 and r.verdict == "error" and "no such alias" in r.reason
    tags = reg.version(model, v.version).tags
    assert tags[G.VERDICT] == "error" and "no such alias" in tags[G.REASON]
    assert reg.version_by_alias(model, "production") is None


@pytest.mark.slow
def test_server_killed_mid_gate_leaves_alias_untouched(tmp_path, world):
    server = MlflowServer(tmp_path / "srv").start()
    try:
        reg = MlflowRegistry(server.uri)
        G.publish_reference(reg, world.reference_dir)
        model = "facenet"
        first = _register(reg, model, world.ckpt("clean", "passed"))
        assert G.gate(model, first.version, registry=reg).promoted
        second = _register(reg, model, world.ckpt("clean", "passed"))

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
        assert reg.version(model, second.version).tags[G.VERDICT] == "pending"  # never a stale pass
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


def _reviewer(name: str):
    """A reviewer's own signing key (the test environment trusts bob and alice, see conftest)."""
    from detector import verdict as V

    return V.load_private_key((Path(os.environ["BACKDOOR_GATE_TEST_KEYS"]) / name / "signing-key.pem").read_bytes())


def test_override_rules(registry, world, tmp_path):
    from detector import verdict as V

    model = _model()
    bad = _register(registry, model, world.ckpt("backdoored", "blocked"), who="alice")
    with pytest.raises(G.OverrideRefused, match="only a blocked version"):
        G.override(model, bad.version, reason="ship it", key=_reviewer("bob"), registry=registry)
    assert G.gate(model, bad.version, registry=registry).verdict == "blocked"
    with pytest.raises(G.OverrideRefused, match="different reviewer"):
        G.override(model, bad.version, reason="I trust it", key=_reviewer("alice"), registry=registry)
    with pytest.raises(G.OverrideRefused, match="needs a reason"):
        G.override(model, bad.version, reason="  ", key=_reviewer("bob"), registry=registry)
    stranger, _ = V.generate_keypair(tmp_path / "stranger")
    with pytest.raises(G.OverrideRefused, match="not a trusted reviewer key"):
        G.override(
            model, bad.version, reason="I say so", key=V.load_private_key(stranger.read_bytes()), registry=registry
        )
    assert registry.version_by_alias(model, "production") is None
    info = G.override(
        model, bad.version, reason="false positive, checked by hand", key=_reviewer("bob"), registry=registry
    )
    assert info.tags[G.OVERRIDE_BY] == "bob" and info.tags[G.VERDICT] == "blocked" and G.OVERRIDE_AT in info.tags
    assert registry.version_by_alias(model, "production").version == bad.version


def test_gate_cli_exit_codes(registry, world, mlflow_server):
    model = _model()
    good = _register(registry, model, world.ckpt("clean", "passed"))
    bad = _register(registry, model, world.ckpt("backdoored", "blocked"))
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
    versions = [_register(registry, model, p).version for p in paths]
    expected = {
        v: ("passed" if ref.assess(p).decision.verdict == "passed" else "blocked") for v, p in zip(versions, paths)
    }
    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(
            pool.map(
                lambda v: G.gate(
                    model, v, registry=MlflowRegistry(registry.tracking_uri), config=G.GateConfig(report=False)
                ),
                versions,
            )
        )
    assert not [r.reason for r in results if r.error]
    assert {r.version: r.verdict for r in results} == expected
    for v in versions:
        tags = registry.version(model, v).tags
        assert tags[G.VERDICT] == expected[v] and G.MODEL_SHA in tags and G.score_tag("forward") in tags
    newest_pass = max((int(v) for v, verdict in expected.items() if verdict == "passed"))
    assert registry.version_by_alias(model, "production").version == str(newest_pass)


@pytest.fixture(scope="module")
def signing(tmp_path_factory):
    from detector import verdict as V

    priv, pub = V.generate_keypair(tmp_path_factory.mktemp("keys"))
    return V.load_private_key(priv.read_bytes()), pub


def test_signed_verdict_is_attached_verified_and_recorded_on_promotion(registry, world, signing, mlflow_server):
    from detector import verdict as V

    key, pub = signing
    model = _model()
    v = _register(registry, model, world.ckpt("clean", "passed"))
    r = G.gate(model, v.version, registry=registry, signing_key=key)
    assert r.verdict == "passed" and r.promoted
    tags = registry.version(model, v.version).tags
    assert tags[G.SIGNED_BY] == V.key_id(key.public_key()) == r.signed_by
    assert tags[G.VERDICT_SHA] == r.verdict_sha256 == tags[G.PROMOTED_VERDICT]
    doc = G.verify_version(model, v.version, V.load_public_key(pub), registry=registry)
    assert (doc["verdict"], doc["model_sha256"], doc["reference_sha256"]) == (
        "passed",
        r.model_sha256,
        r.reference_sha256,
    )
    # the same verdict as an in-toto statement in a DSSE envelope: subjects are every judged file
    info = registry.version(model, v.version)
    dsse = json.loads(registry.run_file(info.run_id, f"integrity/v{v.version}/{G.DSSE_FILE}"))
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
    registry.set_tags(model, v.version, {G.VERDICT: "blocked"})
    p = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "tags disagree" in p.stderr  # tampering is malformed (2), not a signed refusal (1)


def test_unsigned_gate_says_so_and_a_required_signature_stops_it(registry, world, monkeypatch):
    from detector import verdict as V

    monkeypatch.delenv(V.KEY_FILE_ENV)
    model = _model()
    v = _register(registry, model, world.ckpt("clean", "passed"))
    r = G.gate(
        model, v.version, registry=registry, config=G.GateConfig(report=False, require_signature=False)
    )  # opt-out
    assert r.signed_by == "unsigned" and r.verdict == "passed"
    w = _register(registry, model, world.ckpt("clean", "passed"))
    r = G.gate(model, w.version, registry=registry, config=G.GateConfig(report=False))  # required by default
    assert r.exit_code == 2 and "no signing key" in r.reason and not r.promoted
    assert G.VERDICT not in registry.version(model, w.version).tags  # judged nothing, wrote nothing


def test_production_set_by_hand_on_an_ungated_version_is_taken_back(registry, world):
    model = _model()
    good = _register(registry, model, world.ckpt("clean", "passed"))
    assert G.gate(model, good.version, registry=registry, config=G.GateConfig(report=False)).promoted
    bad = _register(registry, model, world.ckpt("backdoored", "blocked"))
    registry.set_alias(model, "production", bad.version)  # someone skips the gate
    r = G.gate(model, bad.version, registry=registry, config=G.GateConfig(report=False))
    assert r.verdict == "blocked"
    assert registry.version_by_alias(model, "production").version == good.version
    assert "without a pass or an override" in registry.version(model, bad.version).tags[G.ALIAS_VIOLATION]
    # with no passed version to fall back on, the alias is deleted
    lone = _model()
    only = _register(registry, lone, world.ckpt("backdoored", "blocked"))
    registry.set_alias(lone, "production", only.version)
    assert G.gate(lone, only.version, registry=registry, config=G.GateConfig(report=False)).verdict == "blocked"
    assert registry.version_by_alias(lone, "production") is None
