"""Gate versions registered by hand, guard ``production``: an MLflow webhook receiver.

The pipelines gate what they register. Someone with registry access can also register a
version directly (``mlflow.register_model``), bypassing the pipeline; MLflow (3.3+, SQL
backend) then POSTs a ``model_version.created`` event here and the receiver gates the version
like the pipeline would. MLflow lets anyone who may register versions also move aliases and
write tags, so alias and tag events re-derive ``production`` from signed state
(:func:`components.gate.guard_alias`, :mod:`components.reconciler`): a version without a
signed pass or a signed override loses the alias at once.

Every delivery must carry MLflow's HMAC-SHA256 signature (``X-MLflow-Signature: v1,<b64>``
over ``delivery_id.timestamp.body`` with the shared secret), a timestamp no older than
``max_age`` seconds, and a delivery id not seen before (replays are refused). Unsigned,
forged, stale or replayed requests are answered 401/409 and gate nothing.

It runs on uvicorn (h11): a Content-Length that is missing, negative, malformed or over 1 MiB
is answered 4xx before a byte of the body is read; a body that trickles in is cut off after
``body_timeout`` seconds; idle connections close after 5 s; at most ``limit_concurrency``
connections and ``max_pending`` queued jobs (503 past that); every list it keeps is bounded.
Work runs on a thread pool so MLflow gets its 202 at once; one version is never gated twice
at the same time here, and the gate itself is idempotent, so two replicas are safe.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

SECRET_ENV = "BACKDOOR_GATE_WEBHOOK_SECRET"
SIGNATURE_HEADER, TIMESTAMP_HEADER, DELIVERY_HEADER = "X-MLflow-Signature", "X-MLflow-Timestamp", "X-MLflow-Delivery-Id"
PATH = "/mlflow-webhook"
#: typed loosely: MLflow's client annotates these as its own Literal strings
WEBHOOK_EVENTS: list[Any] = [
    "model_version.created",
    "model_version_alias.created",
    "model_version_alias.deleted",
    "model_version_tag.set",
    "model_version_tag.deleted",
]
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
        delivery, stamp, sig = (
            headers.get(DELIVERY_HEADER),
            headers.get(TIMESTAMP_HEADER),
            headers.get(SIGNATURE_HEADER),
        )
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
    """HTTP endpoint: verified events of watched models -> ``gate`` (new versions) and ``guard_fn``.

    ``guard_fn(model)`` (the reconciler, or :func:`components.gate.guard_alias`) runs after
    every gate and on every alias or tag event; runs for one model are coalesced.
    """

    def __init__(
        self,
        secret: str,
        gate_fn: Callable[[str, str], object],
        models: tuple[str, ...] = ("facenet",),
        host: str = "0.0.0.0",
        port: int = 8080,
        workers: int = 2,
        guard_fn: Callable[[str], str | None] | None = None,
        production_alias: str = "production",
        max_pending: int = 256,
        body_timeout: float = 10.0,
        limit_concurrency: int = 64,
    ):
        self.check = DeliveryCheck(secret)
        self.gate_fn, self.models = gate_fn, tuple(models)
        self.guard_fn, self.production_alias = guard_fn, production_alias
        self.max_pending, self.body_timeout = max_pending, body_timeout
        self.guarded: deque[str] = deque(maxlen=1000)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gate")
        self.results: deque = deque(maxlen=1000)  # (model, version, result or exception), for tests and /healthz
        self.gated = 0
        self._busy: set[tuple[str, str]] = set()
        self._guarding: dict[str, bool] = {}  # model -> another run requested while one runs
        self._pending = 0
        self._lock = threading.Lock()
        import uvicorn

        self._socket = socket.create_server((host, port), reuse_port=False)
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            http="h11",
            interface="asgi3",
            proxy_headers=False,
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_keep_alive=5,
            limit_concurrency=limit_concurrency,
            h11_max_incomplete_event_size=16 * 1024,
            server_header=False,
        )
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    # -- HTTP (ASGI) ---------------------------------------------------------------------------
    async def app(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        try:
            status, obj = await self._handle(scope, receive)
        except Rejected as e:
            log.warning("refused delivery: %s", e.reason)
            status, obj = e.status, {"error": e.reason}
        body = json.dumps(obj).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *([(b"connection", b"close")] if status >= 400 else []),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _handle(self, scope, receive) -> tuple[int, dict]:
        if scope["method"] == "GET":
            if scope["path"] == "/healthz":
                return 200, {"ok": True, "gated": self.gated, "pending": self._pending}
            raise Rejected(404, "not found")
        if scope["method"] != "POST" or scope["path"] != PATH:
            raise Rejected(404, f"POST {PATH}")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length")
        if length is None or not length.isdigit():  # also refuses "-1": never read an unbounded body
            raise Rejected(411 if length is None else 400, "a non-negative Content-Length is required")
        n = int(length)
        if n > _MAX_BODY:
            raise Rejected(413, "body too large")
        try:
            body = await asyncio.wait_for(self._read(receive, n), self.body_timeout)
        except TimeoutError:
            raise Rejected(408, f"body not received within {self.body_timeout:g} s") from None
        event = self.check(_Headers(headers), body)
        return 202, self.dispatch(event)

    @staticmethod
    async def _read(receive, n: int) -> bytes:
        chunks, got = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Rejected(400, "client went away")
            chunk = message.get("body", b"")
            got += len(chunk)
            if got > n:
                raise Rejected(400, "body longer than its Content-Length")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    # -- work ----------------------------------------------------------------------------------
    def dispatch(self, event: dict) -> dict:
        kind = (event.get("entity"), event.get("action"))
        data = event.get("data") or {}
        model, version = str(data.get("name", "")), str(data.get("version", ""))
        if kind not in _EVENTS:
            return {"ignored": f"event {kind[0]}.{kind[1]}"}
        if model not in self.models:
            return {"ignored": f"model {model!r} is not watched"}
        if kind != ("model_version", "created"):
            if self.guard_fn is None:
                return {"ignored": "no guard configured"}
            if kind[0] == "model_version_alias" and data.get("alias") != self.production_alias:
                return {"ignored": f"alias {data.get('alias')!r}"}
            self._submit(self._guard, model)
            return {"guarding": f"{model}@{self.production_alias}"}
        if not version.isdigit():
            return {"ignored": f"version {version!r}"}
        with self._lock:
            if (model, version) in self._busy:
                return {"ignored": f"{model} v{version} is being gated"}
            self._busy.add((model, version))
        try:
            self._submit(self._run, model, version)
        except Rejected:
            with self._lock:
                self._busy.discard((model, version))
            raise
        return {"gating": f"{model} v{version}"}

    def _submit(self, fn, *args) -> None:
        with self._lock:
            if self._pending >= self.max_pending:
                raise Rejected(503, "too much work queued; MLflow will retry, the resync catches up")
            self._pending += 1

        def run():
            try:
                fn(*args)
            finally:
                with self._lock:
                    self._pending -= 1

        self.pool.submit(run)

    def _guard(self, model: str) -> None:
        """Run the guard; a request that arrives while it runs makes it run once more, not N times."""
        with self._lock:
            if model in self._guarding:
                self._guarding[model] = True
                return
            self._guarding[model] = False
        guard = self.guard_fn
        if guard is None:
            return
        while True:
            try:
                violation = guard(model)
                if violation:
                    log.warning("%s@%s: %s", model, self.production_alias, violation)
            except Exception:  # noqa: BLE001
                log.exception("alias guard crashed on %s", model)
            self.guarded.append(model)
            with self._lock:
                if not self._guarding.get(model):
                    del self._guarding[model]
                    return
                self._guarding[model] = False

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
        self.gated += 1
        if self.guard_fn is not None:
            self._guard(model)

    # -- lifecycle -----------------------------------------------------------------------------
    def serve_forever(self) -> None:
        self.server.run(sockets=[self._socket])

    def serve_in_thread(self) -> Receiver:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True, name="webhook")
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def close(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._socket.close()
        self.pool.shutdown(wait=True)


class _Headers(dict):
    """Case-insensitive ``get`` over lower-cased header names, as :class:`DeliveryCheck` expects."""

    def get(self, key, default=None):
        return super().get(key.lower(), default)


_EVENTS = {
    ("model_version", "created"),
    ("model_version_alias", "created"),
    ("model_version_alias", "deleted"),
    ("model_version_tag", "set"),
    ("model_version_tag", "deleted"),
}


def register_webhook(tracking_uri: str | None, url: str, secret: str, name: str = "backdoor-gate"):
    """Create (once) the MLflow webhook that sends version, alias and tag events to ``url``."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    for hook in client.list_webhooks():
        if hook.name == name and hook.url == url:
            return hook
    return client.create_webhook(
        name=name,
        url=url,
        events=WEBHOOK_EVENTS,
        secret=secret,
        description="backdoor-gate: gate versions registered outside the pipeline",
    )
