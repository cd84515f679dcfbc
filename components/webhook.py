"""Gate versions registered by hand, guard ``production``: an MLflow webhook receiver.

The pipelines gate what they register. Someone with registry access can also register a
version directly (``mlflow.register_model``), bypassing the pipeline; MLflow (3.3+, SQL
backend) then POSTs a ``model_version.created`` event here and the receiver gates the version
like the pipeline would. MLflow lets anyone who may register versions also move aliases, so
``model_version_alias.created`` events for ``production`` are checked too: an alias on a
version without a pass or a recorded override is taken back at once
(:func:`components.gate.guard_alias`).

Every delivery must carry MLflow's HMAC-SHA256 signature (``X-MLflow-Signature: v1,<b64>``
over ``delivery_id.timestamp.body`` with the shared secret), a timestamp no older than
``max_age`` seconds, and a delivery id not seen before (replays are refused). Unsigned,
forged, stale or replayed requests are answered 401/409 and gate nothing. The gate runs on a
worker thread so MLflow gets its 202 at once; one version is never gated twice at the same
time by this receiver.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

SECRET_ENV = "BACKDOOR_GATE_WEBHOOK_SECRET"
SIGNATURE_HEADER, TIMESTAMP_HEADER, DELIVERY_HEADER = "X-MLflow-Signature", "X-MLflow-Timestamp", "X-MLflow-Delivery-Id"
PATH = "/mlflow-webhook"
_MAX_BODY = 1 << 20
log = logging.getLogger("backdoor_gate.webhook")


class Rejected(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def expected_signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


class DeliveryCheck:
    """HMAC, freshness and replay checks of one delivery; remembers recent delivery ids."""

    def __init__(self, secret: str, max_age: float = 300.0, remember: int = 10_000):
        if not secret:
            raise ValueError(f"a webhook secret is required (set {SECRET_ENV}); unsigned deliveries are never trusted")
        self.secret, self.max_age, self.remember = secret, max_age, remember
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, headers, body: bytes, now: float | None = None) -> dict:
        delivery, stamp, sig = headers.get(DELIVERY_HEADER), headers.get(TIMESTAMP_HEADER), headers.get(SIGNATURE_HEADER)
        if not (delivery and stamp and sig):
            raise Rejected(401, "unsigned delivery (missing signature, timestamp or delivery id)")
        if not hmac.compare_digest(sig, expected_signature(self.secret, delivery, stamp, body)):
            raise Rejected(401, "bad signature")
        try:
            age = (time.time() if now is None else now) - int(stamp)
        except ValueError:
            raise Rejected(401, "malformed timestamp") from None
        if abs(age) > self.max_age:
            raise Rejected(401, f"stale delivery ({age:.0f} s old)")
        with self._lock:
            if delivery in self._seen:
                raise Rejected(409, "replayed delivery id")
            self._seen[delivery] = time.time()
            while len(self._seen) > self.remember:
                self._seen.popitem(last=False)
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise Rejected(400, "body is not JSON") from None


class Receiver:
    """HTTP endpoint: verified ``model_version.created`` events of watched models -> ``gate``."""

    def __init__(self, secret: str, gate_fn: Callable[[str, str], object], models: tuple[str, ...] = ("facenet",),
                 host: str = "0.0.0.0", port: int = 8080, workers: int = 2,
                 guard_fn: Callable[[str], str | None] | None = None, production_alias: str = "production"):
        self.check = DeliveryCheck(secret)
        self.gate_fn, self.models = gate_fn, tuple(models)
        self.guard_fn, self.production_alias = guard_fn, production_alias
        self.guarded: list[str] = []
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gate")
        self.results: list = []  # (model, version, result or exception), for tests and /healthz
        self._busy: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):  # one line per request, no headers (they hold the signature)
                log.info("%s %s", self.address_string(), fmt % args)

            def do_GET(self):
                self._reply(200 if self.path == "/healthz" else 404, {"gated": len(receiver.results)})

            def do_POST(self):
                try:
                    if self.path != PATH:
                        raise Rejected(404, f"POST {PATH}")
                    n = int(self.headers.get("Content-Length") or 0)
                    if n > _MAX_BODY:
                        raise Rejected(413, "body too large")
                    event = receiver.check(self.headers, self.rfile.read(n))
                    self._reply(202, receiver.dispatch(event))
                except Rejected as e:
                    log.warning("refused delivery: %s", e.reason)
                    self._reply(e.status, {"error": e.reason})

            def _reply(self, status: int, obj: dict) -> None:
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]

    def dispatch(self, event: dict) -> dict:
        kind = (event.get("entity"), event.get("action"))
        data = event.get("data") or {}
        model, version = str(data.get("name", "")), str(data.get("version", ""))
        if kind not in (("model_version", "created"), ("model_version_alias", "created")):
            return {"ignored": f"event {kind[0]}.{kind[1]}"}
        if model not in self.models or not version.isdigit():
            return {"ignored": f"model {model!r} is not watched"}
        if kind[0] == "model_version_alias":
            if self.guard_fn is None or data.get("alias") != self.production_alias:
                return {"ignored": f"alias {data.get('alias')!r}"}
            self.pool.submit(self._guard, model)
            return {"guarding": f"{model}@{self.production_alias}"}
        with self._lock:
            if (model, version) in self._busy:
                return {"ignored": f"{model} v{version} is being gated"}
            self._busy.add((model, version))
        self.pool.submit(self._run, model, version)
        return {"gating": f"{model} v{version}"}

    def _guard(self, model: str) -> None:
        try:
            violation = self.guard_fn(model)
            if violation:
                log.warning("%s@%s: %s", model, self.production_alias, violation)
        except Exception:  # noqa: BLE001
            log.exception("alias guard crashed on %s", model)
        self.guarded.append(model)

    def _run(self, model: str, version: str) -> None:
        try:
            result = self.gate_fn(model, version)
            log.info("%s v%s: %s", model, version, getattr(result, "verdict", result))
        except Exception as e:  # noqa: BLE001 — the gate never raises by design; record if it ever does
            log.exception("gate crashed on %s v%s", model, version)
            result = e
        finally:
            with self._lock:
                self._busy.discard((model, version))
        self.results.append((model, version, result))

    def serve_in_thread(self) -> "Receiver":
        threading.Thread(target=self.server.serve_forever, daemon=True, name="webhook").start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.pool.shutdown(wait=True)


def register_webhook(tracking_uri: str | None, url: str, secret: str, name: str = "backdoor-gate"):
    """Create (once) the MLflow webhook that sends ``model_version.created`` to ``url``."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    for hook in client.list_webhooks():
        if hook.name == name and hook.url == url:
            return hook
    return client.create_webhook(name=name, url=url, events=["model_version.created", "model_version_alias.created"], secret=secret,
                                 description="backdoor-gate: gate versions registered outside the pipeline")
