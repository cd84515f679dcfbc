"""Versions registered by hand are gated through a real MLflow webhook; forged deliveries are not."""

from __future__ import annotations

import itertools
import json
import time
import urllib.error
import urllib.request

import pytest

from components import gate as G
from components import policy
from components import tags as T
from components.config import GateConfig
from components.mlflow_server import MlflowServer
from components.reference_store import publish_reference
from components.registry import MlflowRegistry
from components.webhook import PATH, DeliveryCheck, Receiver, Rejected, expected_signature, register_webhook
from tests.conftest import GateWorld
from tests.polling import wait_for

SECRET = "s3cret-for-tests"
PROBE = "webhook-probe"


def _post(port: int, body: bytes, headers: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{PATH}", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
        return json.loads(r.read())


def _signed(body: bytes, delivery="d-1", stamp=None, secret=SECRET) -> dict:
    stamp = str(int(time.time())) if stamp is None else stamp
    return {
        "X-MLflow-Delivery-Id": delivery,
        "X-MLflow-Timestamp": stamp,
        "X-MLflow-Signature": expected_signature(secret, delivery, stamp, body),
        "Content-Type": "application/json",
    }


def test_delivery_check_refuses_forged_stale_and_replayed():
    check = DeliveryCheck(SECRET, max_age=300)
    body = b'{"entity": "model_version", "action": "created", "data": {}}'
    assert check(_signed(body, "a"), body)["entity"] == "model_version"
    for headers, status, reason in [
        ({}, 401, "unsigned"),
        (_signed(body, "b", secret="guess"), 401, "bad signature"),
        (_signed(body, "c", stamp=str(int(time.time()) - 3600)), 401, "stale"),
        (_signed(body, "a"), 409, "replayed"),
    ]:
        with pytest.raises(Rejected, match=reason) as e:
            check(headers, body)
        assert e.value.status == status
    with pytest.raises(Rejected, match="bad signature"):  # body changed under a valid signature
        check(_signed(body, "d"), body.replace(b"created", b"deleted"))
    with pytest.raises(ValueError, match="secret"):
        DeliveryCheck("")


@pytest.mark.slow
def test_hand_registered_version_is_gated_through_a_real_webhook(tmp_path):
    world = GateWorld(tmp_path, seed=5)
    bad, good_file = world.ckpt("backdoored", "blocked"), world.ckpt("clean", "passed")
    server = MlflowServer(
        tmp_path / "mlflow",
        env={
            "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
            "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
            # the server caches the webhook list (default 60 s); a new hook
            # would miss registrations made in that window
            "MLFLOW_WEBHOOK_CACHE_TTL": "1",
        },
    ).start()
    receiver = None
    try:
        registry = MlflowRegistry(server.uri)
        publish_reference(registry, world.reference_dir)
        calls = []

        def gate_fn(model, version):
            calls.append((model, version))
            return G.gate(model, version, registry=MlflowRegistry(server.uri), config=GateConfig(report=False))

        # registered before any webhook exists: no delivery; its tag writes below are the probe
        probe = registry.register(PROBE, {"model.safetensors": good_file}, tags={T.REGISTERED_BY: "ci"})
        receiver = Receiver(
            SECRET,
            gate_fn,
            models=("facenet", PROBE),
            host="127.0.0.1",
            port=0,
            guard_fn=lambda m: policy.guard_alias(m, registry=MlflowRegistry(server.uri)),
        ).serve_in_thread()
        register_webhook(server.uri, f"http://127.0.0.1:{receiver.port}{PATH}", SECRET)
        register_webhook(server.uri, f"http://127.0.0.1:{receiver.port}{PATH}", SECRET)  # idempotent
        # the server caches its webhook list: tag the probe until a delivery reaches the receiver
        writes = itertools.count()
        wait_for(
            lambda: registry.set_tags(PROBE, probe.version, {"probe": next(writes)}) or PROBE in receiver.guarded,
            60,
            what="a delivery to the new webhook",
            interval=0.5,
        )
        # someone registers a version by hand and points production at it before anything ran
        v = registry.register("facenet", {"model.safetensors": bad}, tags={T.REGISTERED_BY: "mallory"})
        registry.set_alias("facenet", "production", v.version)
        wait_for(lambda: receiver.results, 90, what="the gate run for the hand-registered version")
        assert calls == [("facenet", v.version)], "the webhook did not reach the receiver"
        ((_, _, result),) = receiver.results
        assert result.verdict == "blocked"
        wait_for(  # the gate or the guard took it back
            lambda: registry.version_by_alias("facenet", "production") is None, 90, what="production taken back"
        )
        tags = registry.version("facenet", v.version).tags
        assert tags[T.VERDICT] == "blocked" and T.ALIAS_VIOLATION in tags
        # a clean version registered by hand passes through the same path and gets production
        good = registry.register("facenet", {"model.safetensors": good_file}, tags={T.REGISTERED_BY: "alice"})
        wait_for(lambda: len(receiver.results) == 2, 90, what="the second gate run")
        assert receiver.results[1][2].verdict == "passed"
        assert registry.version_by_alias("facenet", "production").version == good.version
        # moving production by hand onto the blocked version is reverted by the alias guard
        registry.set_alias("facenet", "production", v.version)
        wait_for(
            lambda: registry.version_by_alias("facenet", "production").version == good.version,
            90,
            what="the alias guard reverting production",
        )
        assert "facenet" in receiver.guarded
        # the reference model's own registrations and forged posts gate nothing
        body = json.dumps(
            {"entity": "model_version", "action": "created", "data": {"name": "facenet", "version": v.version}}
        ).encode()
        assert _post(receiver.port, body, {"Content-Type": "application/json"})[0] == 401
        assert _post(receiver.port, body, _signed(body, secret="wrong"))[0] == 401
        other = json.dumps(
            {"entity": "model_version", "action": "created", "data": {"name": "other", "version": "1"}}
        ).encode()
        status, reply = _post(receiver.port, other, _signed(other, delivery="x-1"))
        assert status == 202 and "not watched" in reply["ignored"]
        wait_for(lambda: _health(receiver.port)["pending"] == 0, 90, what="the receiver's queue drained")
        assert len(calls) == 2
    finally:
        if receiver is not None:
            receiver.close()
        server.stop()
