"""The gate as an attacker with EDIT rights on the registered model would try to walk around it.

Each test is one attack from issue 15, run against the real CLI or a real `mlflow server`.
Every one of them succeeded on the code before the fix (see docs/hardening.md).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from components import gate as G
from components import keys as K
from components import tags as T
from components.config import GateConfig
from components.reference_store import publish_reference
from components.registry import MlflowRegistry
from detector import signing as V
from detector.decision import decide
from tests.conftest import GateWorld

_names = itertools.count()


def _model() -> str:
    return f"attack-{next(_names)}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return GateWorld(tmp_path_factory.mktemp("attacks"), seed=13)


@pytest.fixture
def registry(mlflow_server, world):
    return world.publish(MlflowRegistry(mlflow_server.uri))


def _register(reg: MlflowRegistry, model: str, files: dict, who: str = "mallory"):
    return reg.register(model, files, tags={T.REGISTERED_BY: who})


def _cli(*args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "backdoor_gate.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _overflowing(world, path: Path) -> Path:
    """float64 weights, all finite, one 1e200 entry: squares overflow inside the GMM."""
    w = world.family.clean().astype(np.float64)
    w[0, 0] = 1e200
    torch.save({"last_linear.weight": torch.from_numpy(w), "last_bn.weight": torch.ones(w.shape[0])}, path)
    return path


# -- 1. verify means "may deploy" ------------------------------------------------------------------
def test_verify_refuses_a_validly_signed_blocked_verdict(tmp_path):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"backdoored weights")
    key = K.signing_key_from_env()
    doc = V.document(
        model="facenet",
        version="7",
        model_sha256=hashlib.sha256(b"backdoored weights").hexdigest(),
        reference_sha256="cd" * 32,
        verdict="blocked",
        reason="anomalous weights: forward score 1 < threshold 2",
        scores={"forward": 1.0},
        thresholds={"forward": 2.0},
        trunk="ok",
        gate_version="0",
        run_id="r",
        checked_at="2026-12-01T00:00:00+00:00",
    )
    envelope = tmp_path / "verdict.json"
    envelope.write_text(json.dumps(V.sign(doc, key)))
    pub = os.environ["BACKDOOR_GATE_VERDICT_PUBLIC_KEYS"]
    p = _cli("verify", envelope, "--checkpoint", model, "--public-key", pub)
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert "blocked" in p.stdout + p.stderr and "anomalous weights" in p.stdout + p.stderr
    assert not p.stdout.startswith("valid")


# -- 2. fail closed on numbers ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "scores, thresholds",
    [
        ({"forward": math.nan}, {"forward": 1.0}),
        ({"forward": math.inf}, {"forward": 1.0}),
        ({"forward": 1.0}, {"forward": math.nan}),
        ({"forward": 1.0}, {"forward": -math.inf}),
        ({"forward": -math.inf}, {"forward": -math.inf}),
    ],
)
def test_decide_treats_non_finite_numbers_as_invalid(scores, thresholds):
    d = decide(scores, thresholds)
    assert d.verdict == "invalid" and "not finite" in d.reason


def test_overflowing_checkpoint_is_invalid_through_score(world, tmp_path):
    p = _cli("score", "--reference", world.reference_dir, "--json", _overflowing(world, tmp_path / "big.pt"))
    rec = json.loads(p.stdout.splitlines()[0])
    assert (p.returncode, rec["verdict"]) == (2, "invalid"), (p.returncode, rec)


def test_overflowing_checkpoint_is_invalid_through_the_gate(registry, world, tmp_path):
    model = _model()
    v = _register(registry, model, {"model.pt": _overflowing(world, tmp_path / "big.pt")})
    r = G.gate(model, v.version, registry=registry, config=GateConfig(report=False))
    assert (r.verdict, r.exit_code) == ("invalid", 2), r.reason
    assert registry.version(model, v.version).tags[T.VERDICT] == "invalid"
    assert registry.version_by_alias(model, "production") is None


# -- 3. judge the whole artifact -------------------------------------------------------------------
def test_clean_weights_beside_a_backdoored_file_are_invalid(registry, world):
    model = _model()
    v = _register(
        registry,
        model,
        {"model.safetensors": world.ckpt("clean", "passed"), "trunk.pt": world.ckpt("backdoored", "blocked")},
    )
    r = G.gate(model, v.version, registry=registry, config=GateConfig(report=False))
    assert r.verdict == "invalid" and "trunk.pt" in r.reason, r.reason
    assert registry.version_by_alias(model, "production") is None


def test_a_file_the_gate_does_not_judge_is_invalid(registry, world, tmp_path):
    model = _model()
    loader = tmp_path / "loader.py"
    loader.write_text("import os\n")
    v = _register(registry, model, {"model.safetensors": world.ckpt("clean", "passed"), "loader.py": loader})
    r = G.gate(model, v.version, registry=registry, config=GateConfig(report=False))
    assert r.verdict == "invalid" and "loader.py" in r.reason, r.reason


def _with_trunk(matrix, trunk) -> dict:
    return {
        "conv.weight": trunk.clone(),
        "last_linear.weight": torch.from_numpy(np.asarray(matrix, dtype=np.float32)),
        "last_bn.weight": torch.ones(matrix.shape[0]),
    }


def test_head_only_file_is_invalid_when_the_reference_recorded_a_trunk(registry, world, tmp_path):
    from safetensors.torch import save_file

    from detector.config import ReferenceConfig
    from detector.reference import Reference

    fam, trunk = world.family, torch.randn(8, 3, 3, 3)
    ref = Reference(ReferenceConfig(grid=(1, 2, 5))).fit(
        [_with_trunk(fam.clean(), trunk) for _ in range(6)], base=_with_trunk(fam.base, trunk)
    )
    ref.calibrate([_with_trunk(fam.clean(), trunk) for _ in range(4)])
    head = {k: v for k, v in _with_trunk(fam.clean(), trunk).items() if k != "conv.weight"}
    a = ref.assess(head)
    assert a.decision.verdict == "invalid" and "trunk missing" in a.decision.reason, a.decision
    # the same through the gate, with that reference published
    ref_dir = tmp_path / "ref"
    ref.save(ref_dir)
    refs = f"trunk-reference-{next(_names)}"
    config = GateConfig(report=False, reference_model=refs)
    publish_reference(registry, ref_dir, config)
    save_file(head, str(tmp_path / "head.safetensors"))
    model = _model()
    v = _register(registry, model, {"model.safetensors": tmp_path / "head.safetensors"})
    r = G.gate(model, v.version, registry=registry, config=config)
    assert r.verdict == "invalid" and "trunk missing" in r.reason, r.reason


# -- 4. signed references --------------------------------------------------------------------------
def test_rehashed_edited_reference_is_refused(registry, world, tmp_path):
    """The editor sets every threshold to -1e300 and recomputes artifact_sha256, then moves @current."""
    from detector.artifact import META_FILE, _digest

    edited = tmp_path / "edited"
    shutil.copytree(world.reference_dir, edited)
    for sig in edited.glob("*.sig*"):
        sig.unlink()
    meta = json.loads((edited / META_FILE).read_text())
    for view in meta["views"].values():
        view["threshold"] = -1e300
    meta["artifact_sha256"] = _digest(meta)
    (edited / META_FILE).write_text(json.dumps(meta))
    refs = f"edited-reference-{next(_names)}"
    info = registry.register(refs, {p.name: p for p in edited.iterdir()}, artifact_dir="reference")
    registry.set_alias(refs, "current", info.version)
    model = _model()
    v = _register(registry, model, {"model.safetensors": world.ckpt("backdoored", "blocked")})
    r = G.gate(model, v.version, registry=registry, config=GateConfig(report=False, reference_model=refs))
    assert r.verdict != "passed" and r.exit_code == 2 and "signed" in r.reason, r.reason
    assert registry.version_by_alias(model, "production") is None
    # the gate's fault, not the candidate's: the version says "error", never blocked or invalid
    assert registry.version(model, v.version).tags[T.VERDICT] == "error"


# -- 5. production is a function of signed state, 6. the resync heals: tests/components/test_promotion.py
# -- 7. the webhook receiver on a real server ------------------------------------------------------
@pytest.fixture
def receiver():
    from components.webhook import Receiver

    r = Receiver("s3cret", lambda m, v: None, models=("facenet",), host="127.0.0.1", port=0).serve_in_thread()
    yield r
    r.close()


def _raw(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """The reply to a raw request: headers, then as much body as they announce (the headers and
    the body may come in separate packets). The connection is left open: a server that waits
    for a body never answers (socket.timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        reply = s.recv(4096)
        while b"\r\n\r\n" not in reply:
            chunk = s.recv(4096)
            if not chunk:
                return reply
            reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")[1:]
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        while len(body) < length:
            chunk = s.recv(4096)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body


@pytest.mark.parametrize("length", ["-1", "99999999999", "abc"])
def test_bad_content_length_is_refused_without_reading(receiver, length):
    head = (
        f"POST /mlflow-webhook HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n"
        "Content-Type: application/json\r\n\r\n"
    ).encode()
    try:
        reply = _raw(receiver.port, head)
    except TimeoutError:
        pytest.fail(f"Content-Length {length}: no answer in 5 s (the receiver is waiting to read a body)")
    status = int(reply.split(b" ", 2)[1])
    assert 400 <= status < 500, reply[:200]


def test_receiver_has_a_health_endpoint(receiver):
    reply = _raw(receiver.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.split(b" ", 2)[1] == b"200" and b"gated" in reply


# -- 8. smaller mends ------------------------------------------------------------------------------
def test_kfp_html_fallback_escapes_attacker_chosen_text():
    from components.tasks import fallback_html

    page = fallback_html("invalid", "files the gate does not judge: <script>alert(1)</script>.pt", "no report & <b>")
    assert "<script>" not in page and "&lt;script&gt;" in page and "&amp;" in page


def test_unfitted_or_unreadable_reference_is_a_gate_error_not_the_candidates(registry, world, tmp_path):
    """A reference version whose artifact is garbage: exit 2 'gate error', the version says error."""
    refs = f"broken-reference-{next(_names)}"
    junk = tmp_path / "reference.json"
    junk.write_text("{not json")
    info = registry.register(refs, {"reference.json": junk}, artifact_dir="reference")
    registry.set_alias(refs, "current", info.version)
    model = _model()
    v = _register(registry, model, {"model.safetensors": world.ckpt("clean", "passed")})
    r = G.gate(model, v.version, registry=registry, config=GateConfig(report=False, reference_model=refs))
    assert (r.verdict, r.exit_code, r.error) == ("error", 2, True) and "gate error" in r.reason, r.reason
    assert registry.version(model, v.version).tags[T.VERDICT] == "error"


def test_compiled_pipelines_can_pin_images_by_digest(tmp_path):
    digest = "sha256:" + "ab" * 32
    env = dict(os.environ, BACKDOOR_GATE_GATE_IMAGE_DIGEST=digest, BACKDOOR_GATE_TRAINER_IMAGE_DIGEST=digest)
    p = _cli("pipelines", "compile", "--out", tmp_path, env=env)
    assert p.returncode == 0, p.stderr
    text = (tmp_path / "candidate.yaml").read_text()
    assert (
        "/gate:" in text
        and f"@{digest}" in text
        and not [line for line in text.splitlines() if "image: " in line and "@sha256:" not in line]
    )
