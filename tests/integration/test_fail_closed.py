"""Nothing fails open (issue 24): each attack that walked around the gate on main, as a test.

The attackers are the ones the gate blocks: the checkpoint's author, anyone with EDIT rights on
the registered model (tags, aliases, their own runs' artifacts) and any network client of the
webhook. Every test here failed on the code before the fix; docs/hardening.md has a row each.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from components import gate as G
from components import keys as K
from components import tags as T
from components.config import GateConfig
from components.reconciler import Reconciler
from components.registry import MlflowRegistry
from detector import signing as V
from detector.config import ReferenceConfig
from detector.decision import judge
from detector.errors import InvalidCheckpoint
from detector.reference import Reference
from detector.weights import read_tensors
from tests.conftest import GateWorld

_names = itertools.count()
NO_REPORT = GateConfig(report=False)


def _model() -> str:
    return f"failclosed-{next(_names)}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return GateWorld(tmp_path_factory.mktemp("failclosed"), seed=17)


@pytest.fixture
def registry(mlflow_server, world):
    return world.publish(MlflowRegistry(mlflow_server.uri))


def _cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "backdoor_gate.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


# -- 1. every tensor is checked, read by the detector or not -------------------------------------
@pytest.mark.parametrize(
    "name, value",
    [("logits.bias", math.nan), ("last_bn.running_mean", math.inf), ("last_bn.bias", 1e30)],
)
def test_a_broken_tensor_the_detector_never_reads_is_invalid(world, tmp_path, name, value):
    tensors = load_file(str(world.ckpt("clean", "passed")))
    tensors[name] = torch.full((24,), value)
    path = tmp_path / "broken.safetensors"
    save_file(tensors, str(path))
    d = judge(world.offline, lambda: read_tensors(path)[0]).decision
    assert d.verdict == "invalid" and name in d.reason, d


# -- 3. one reading of a checkpoint ------------------------------------------------------------------
def _two_readings(world):
    fam = world.family
    clean, backdoor = fam.state_dict(world.matrix("clean", "passed")), fam.state_dict(fam.backdoored(strength=4))
    return {
        "nested clean, top-level backdoor": ({"state_dict": clean, **backdoor}, "two readings"),
        "two candidate dicts": ({"state_dict": clean, "model": backdoor}, "two readings"),
        "an entry that is not a tensor": ({**clean, "epoch": 3}, "epoch"),
        "a nested dict a loader could use": ({**clean, "hooks": {"w": torch.ones(2)}}, "hooks"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "nested clean, top-level backdoor",
        "two candidate dicts",
        "an entry that is not a tensor",
        "a nested dict a loader could use",
    ],
)
def test_a_checkpoint_with_two_readings_is_invalid(world, tmp_path, case):
    obj, named = _two_readings(world)[case]
    path = tmp_path / "two.pt"
    torch.save(obj, path)
    with pytest.raises(InvalidCheckpoint, match=named):
        read_tensors(path)
    d = judge(world.offline, lambda: read_tensors(path)[0]).decision
    assert d.verdict == "invalid", d


def test_a_single_wrapped_state_dict_is_still_read(world, tmp_path):
    """The real loading path: a ``{"state_dict": ...}`` file with nothing else is one reading."""
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": world.family.state_dict(world.matrix("clean", "passed"))}, path)
    assert judge(world.offline, lambda: read_tensors(path)[0]).decision.verdict == "passed"


# -- 9. the trunk is always judged --------------------------------------------------------------------
def test_reference_without_base_records_the_shared_trunk_and_blocks_a_changed_one(world):
    fam = world.family
    ref = Reference(ReferenceConfig(grid=(1, 2, 5)))
    ref.fit([fam.state_dict(fam.clean()) for _ in range(6)]).calibrate([fam.state_dict(fam.clean()) for _ in range(4)])
    assert set(ref.trunk_digests_) == set(fam.trunk)
    candidate = fam.state_dict(world.matrix("clean", "passed"))
    assert ref.assess(candidate).decision.verdict == "passed"
    candidate["conv2d_1a.conv.weight"] = torch.ones_like(candidate["conv2d_1a.conv.weight"])
    d = ref.assess(candidate).decision
    assert d.verdict == "blocked" and "trunk-modified" in d.reason, d


def test_reference_networks_with_different_trunks_are_refused_naming_the_tensor(world):
    fam = world.family
    nets = [fam.state_dict(fam.clean()) for _ in range(4)]
    nets[2]["conv2d_1a.conv.weight"] = nets[2]["conv2d_1a.conv.weight"] + 1
    with pytest.raises(ValueError, match="conv2d_1a.conv.weight"):
        Reference(ReferenceConfig(grid=(1, 2))).fit(nets)


def test_a_reference_that_recorded_no_trunk_passes_nothing(world):
    fam = world.family
    ref = Reference(ReferenceConfig(grid=(1, 2, 5))).fit([fam.clean() for _ in range(6)])  # bare matrices
    ref.calibrate([fam.clean() for _ in range(4)])
    assert ref.trunk_digests_ == {}
    d = ref.assess(fam.state_dict(world.matrix("clean", "passed"))).decision
    assert d.verdict == "error" and "trunk not checked" in d.reason, d


# -- 8. the gate's own failures say "error" ------------------------------------------------------------
def test_the_gates_own_failures_say_error_in_every_output(mlflow_server, monkeypatch):
    monkeypatch.delenv(K.KEY_FILE_ENV, raising=False)
    monkeypatch.delenv(K.KEY_ENV, raising=False)
    r = G.gate("anything", 1, registry=MlflowRegistry(mlflow_server.uri))
    assert (r.verdict, r.error, r.exit_code, r.to_dict()["verdict"]) == ("error", True, 2, "error"), r
    r = G.gate("anything", 1, registry=MlflowRegistry("http://127.0.0.1:9"), signing_key=object())
    assert (r.verdict, r.exit_code) == ("error", 2), r


# -- 2. unreadable records never keep production, 5. only signed state says "was it gated?":
# tests/components/test_promotion.py
# -- 4. the deployed bytes are the judged bytes ---------------------------------------------------------
@pytest.mark.slow
def test_bytes_swapped_after_a_pass_are_refused_at_deploy_time(registry, world, mlflow_server, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", mlflow_server.uri)

    model = _model()
    clean = world.ckpt("clean", "passed")
    v = world.register(registry, model, clean, who="mallory")
    assert G.gate(model, v.version, registry=registry, config=NO_REPORT).promoted
    pub = os.environ["BACKDOOR_GATE_VERDICT_PUBLIC_KEYS"]
    ok = _cli(
        "pull", "--model", model, "--out", tmp_path / "ok", "--public-key", pub, "--tracking-uri", mlflow_server.uri
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "ok" / "model.safetensors").read_bytes() == clean.read_bytes()
    # the registrant overwrites the weights in their own run after the pass: no event fires
    swap = tmp_path / "swap"
    swap.mkdir()
    (swap / "model.safetensors").write_bytes(world.ckpt("backdoored", "blocked").read_bytes())
    registry.client.log_artifacts(v.run_id, str(swap), "weights")
    served = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{model}@production", dst_path=str(tmp_path / "served"), tracking_uri=mlflow_server.uri
        )
    )
    assert (served / "model.safetensors").read_bytes() == (swap / "model.safetensors").read_bytes()  # the attack
    p = _cli(
        "pull", "--model", model, "--out", tmp_path / "deploy", "--public-key", pub, "--tracking-uri", mlflow_server.uri
    )
    assert p.returncode == 2 and "not the ones this verdict judged" in p.stderr, (p.returncode, p.stderr)
    assert not (tmp_path / "deploy" / "model.safetensors").exists()
    # and the next resync gates the new bytes (blocked) and takes production back
    Reconciler(registry, models=(model,), config=NO_REPORT).resync()
    assert registry.version(model, v.version).tags[T.VERDICT] == "blocked"
    assert registry.version_by_alias(model, "production") is None


# -- 7. an attestation admits only a pass of the exact bytes ---------------------------------------------
def _attestation(tmp_path: Path, verdict: str) -> tuple[Path, Path]:
    model = tmp_path / f"{verdict}.safetensors"
    model.write_bytes(f"weights judged {verdict}".encode())
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    doc = V.document(
        model="facenet",
        version="7",
        model_sha256=sha,
        reference_sha256="cd" * 32,
        verdict=verdict,
        reason="anomalous weights" if verdict == "blocked" else "every view at or above its threshold",
        scores={"forward": 1.0},
        thresholds={"forward": 2.0},
        trunk="ok",
        gate_version="0",
        run_id="r",
        checked_at="2026-12-01T00:00:00+00:00",
        files={"model.safetensors": sha},
    )
    dsse = tmp_path / f"{verdict}.dsse.json"
    dsse.write_text(json.dumps(V.dsse_sign(V.intoto_statement(doc), K.signing_key_from_env())))
    return dsse, model


@pytest.mark.slow
def test_an_attestation_of_a_block_is_refused_by_the_admission_check(tmp_path):
    pub = os.environ["BACKDOOR_GATE_VERDICT_PUBLIC_KEYS"]
    dsse, model = _attestation(tmp_path, "blocked")
    p = _cli("verify", "--attestation", dsse, "--checkpoint", model, "--public-key", pub)
    assert p.returncode == 1 and "blocked" in p.stderr, (p.returncode, p.stderr)
    dsse, model = _attestation(tmp_path, "passed")
    p = _cli("verify", "--attestation", dsse, "--checkpoint", model, "--public-key", pub)
    assert p.returncode == 0 and "admitted" in p.stdout, (p.returncode, p.stdout, p.stderr)
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"other bytes")
    p = _cli("verify", "--attestation", dsse, "--checkpoint", other, "--public-key", pub)
    assert p.returncode == 2 and "other bytes" in p.stderr, (p.returncode, p.stderr)


# -- 6. the receiver answers 4xx to any bad request and holds under slow clients ----------------------
SECRET = "s3cret"


@pytest.fixture
def receiver():
    from components.webhook import Receiver

    r = Receiver(
        SECRET, lambda m, v: None, models=("facenet",), host="127.0.0.1", port=0, header_timeout=3.0
    ).serve_in_thread()
    yield r
    r.close()


def _signed(body: bytes, delivery: str | None = None, signature: str | None = None) -> bytes:
    from components.webhook import expected_signature

    delivery = delivery or f"d-{random.random()}"
    stamp = str(int(time.time()))
    sig = signature if signature is not None else expected_signature(SECRET, delivery, stamp, body)
    head = (
        (
            "POST /mlflow-webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"X-MLflow-Delivery-Id: {delivery}\r\nX-MLflow-Timestamp: {stamp}\r\n"
        ).encode()
        + b"X-MLflow-Signature: "
        + sig.encode("latin-1")
        + b"\r\n\r\n"
    )
    return head + body


def _status(port: int, request: bytes, timeout: float = 5.0) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        reply = b""
        while b"\r\n" not in reply:
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    return int(reply.split(b" ", 2)[1])


@pytest.mark.parametrize(
    "request_bytes, why",
    [
        (_signed(b"{}", signature="v1,\xff\xfe"), "a non-ASCII byte in the signature"),
        (_signed(b"[1, 2]"), "a signed body that is a JSON list"),
        (_signed(b'{"entity": "model_version", "action": "created", "data": [1]}'), "data that is a list"),
        (_signed(b'{"entity": "model_version", "action": "created", "data": "x"}'), "data that is a string"),
        (_signed(b'{"entity": ["x"], "action": {}, "data": {}}'), "entity and action that are not strings"),
        (_signed(b"[" * 100_000), "deeply nested JSON"),
        (b"GARBAGE\r\n\r\n", "not HTTP"),
        (
            b"POST /mlflow-webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
            "two lengths",
        ),
        (b"POST /mlflow-webhook HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "chunked"),
    ],
)
def test_bad_requests_get_a_4xx_never_a_500(receiver, request_bytes, why):
    status = _status(receiver.port, request_bytes)
    assert status < 500 and status != 202, (why, status)


def test_fuzzed_headers_and_bodies_never_get_a_500(receiver):
    """A bounded, seeded fuzz: random bytes in every header and the body, signed and unsigned."""
    rng = random.Random(24)
    statuses = []
    for i in range(150):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        body = junk if i % 3 else json.dumps({"entity": junk.decode("latin-1"), "data": {"name": i}}).encode()
        if i % 2:
            req = _signed(body, delivery=junk.decode("latin-1").replace("\r", "").replace("\n", "") or "d")
        else:
            req = _signed(body, signature="v1," + junk.decode("latin-1").replace("\r", "").replace("\n", ""))
        try:
            statuses.append(_status(receiver.port, req))
        except (ValueError, IndexError):  # no status line: h11 refused a header before answering
            statuses.append(400)
    assert max(statuses) < 500, sorted(set(statuses))


def test_a_signed_delivery_is_answered_while_200_half_open_sockets_are_held(receiver):
    held = []
    try:
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", receiver.port), timeout=5)
            s.sendall(b"POST /mlflow-webhook HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            held.append(s)
        body = json.dumps({"entity": "model_version", "action": "created", "data": {"name": "x"}}).encode()
        start = time.monotonic()
        status = _status(receiver.port, _signed(body), timeout=2.0)
        assert status == 202 and time.monotonic() - start < 2.0, status
    finally:
        for s in held:
            s.close()


def test_at_the_connection_limit_the_oldest_idle_socket_is_shed(receiver):
    receiver.max_connections = 20
    held = [socket.create_connection(("127.0.0.1", receiver.port), timeout=5) for _ in range(40)]
    try:
        body = json.dumps({"entity": "model_version", "action": "created", "data": {"name": "x"}}).encode()
        assert _status(receiver.port, _signed(body), timeout=2.0) == 202
        assert receiver.shed >= 20
        held[0].settimeout(2)
        assert held[0].recv(10) == b""  # the oldest was closed to make room
    finally:
        for s in held:
            s.close()


def test_a_half_open_socket_is_closed_after_the_header_timeout(receiver):
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as s:
        s.sendall(b"POST /mlflow-webhook HTTP/1.1\r\n")
        start = time.monotonic()
        reply = s.recv(4096)
        assert b" 408 " in reply and time.monotonic() - start < receiver.header_timeout + 2, reply[:80]
