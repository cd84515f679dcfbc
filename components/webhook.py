"""Gate versions registered by hand, guard ``production``: an MLflow webhook receiver.

The pipelines gate what they register. Someone with registry access can also register a
version directly (``mlflow.register_model``), bypassing the pipeline; MLflow (3.3+, SQL
backend) then POSTs a ``model_version.created`` event here and the receiver gates the version
like the pipeline would. MLflow lets anyone who may register versions also move aliases and
write tags, so alias and tag events re-derive ``production`` from signed state
(:func:`components.policy.guard_alias`, :mod:`components.reconciler`): a version without a
signed pass or a signed override loses the alias at once.

Every delivery must carry MLflow's HMAC-SHA256 signature (``X-MLflow-Signature: v1,<b64>``
over ``delivery_id.timestamp.body`` with the shared secret), a timestamp no older than
``max_age`` seconds, and a delivery id not seen before (replays are refused). Unsigned,
forged, stale or replayed requests are answered 401/409 and gate nothing.

Any client of the network can reach it, so every bad request gets a 4xx, never a 500, and
slow clients cannot starve signed ones. It is a small asyncio server over h11 (one request per
connection, ``Connection: close``): a request head must arrive within ``header_timeout``
seconds and a body within ``body_timeout`` (408 otherwise); a Content-Length that is missing,
negative, malformed or over 1 MiB is answered 4xx before a byte of the body is read; at most
``max_connections`` sockets are held, and when a new one arrives at the limit the oldest one
still sending its head (idle or slowloris) is dropped first, so a delivery that sends its
request promptly is served while hundreds of half-open sockets are held. At most
``max_pending`` jobs queue (503 past that); every list it keeps is bounded. Work runs on a
thread pool so MLflow gets its 202 at once; one version is never gated twice at the same time
here, and the gate itself is idempotent, so two replicas are safe.
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
from dataclasses import dataclass
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
        # bytes, not str: compare_digest raises on a non-ASCII str (an attacker's header byte)
        expected = expected_signature(self.secret, delivery, stamp, body).encode()
        if not hmac.compare_digest(sig.encode("latin-1", "replace"), expected):
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
            event = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise Rejected(400, "body is not JSON") from None
        if not isinstance(event, dict):
            raise Rejected(400, f"the event is a JSON {type(event).__name__}, not an object")
        if not isinstance(event.get("data", {}), dict):
            raise Rejected(400, "the event's 'data' is not an object")
        return event


class Receiver:
    """HTTP endpoint: verified events of watched models -> ``gate`` (new versions) and ``guard_fn``.

    ``guard_fn(model)`` (the reconciler, or :func:`components.policy.guard_alias`) runs after
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
        header_timeout: float = 5.0,
        max_connections: int = 256,
    ):
        self.check = DeliveryCheck(secret)
        self.gate_fn, self.models = gate_fn, tuple(models)
        self.guard_fn, self.production_alias = guard_fn, production_alias
        self.max_pending, self.body_timeout, self.header_timeout = max_pending, body_timeout, header_timeout
        self.max_connections = max_connections
        self.guarded: deque[str] = deque(maxlen=1000)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gate")
        self.results: deque = deque(maxlen=1000)  # (model, version, result or exception), for tests and /healthz
        self.gated = 0
        self.shed = 0  # sockets dropped to make room (still sending their head at the limit)
        self._busy: set[tuple[str, str]] = set()
        self._guarding: dict[str, bool] = {}  # model -> another run requested while one runs
        self._pending = 0
        self._lock = threading.Lock()
        self._socket = socket.create_server((host, port), reuse_port=False, backlog=1024)
        self.port = self._socket.getsockname()[1]
        self._conns: dict[int, _Conn] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread: threading.Thread | None = None

    # -- HTTP ------------------------------------------------------------------------------------
    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        if threading.current_thread() is threading.main_thread():
            import signal

            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._stop.set)
        server = await asyncio.start_server(self._connection, sock=self._socket)
        self._started.set()
        async with server:
            await self._stop.wait()
        for c in list(self._conns.values()):
            c.writer.transport.abort()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(writer, time.monotonic())
        if len(self._conns) >= self.max_connections and not self._shed_one():
            await _reply(writer, 503, {"error": "too many connections"})
            return
        self._conns[id(conn)] = conn
        try:
            status, obj = await self._handle(conn, reader)
        except Rejected as e:
            log.warning("refused request: %s", e.reason)
            status, obj = e.status, {"error": e.reason}
        except (ConnectionError, OSError):
            writer.transport.abort()
            return
        except Exception:  # noqa: BLE001 — a bug of ours, not the client's: say so, keep serving
            log.exception("receiver crashed on a request")
            status, obj = 500, {"error": "internal error"}
        finally:
            self._conns.pop(id(conn), None)
        await _reply(writer, status, obj)

    def _shed_one(self) -> bool:
        """Drop the oldest socket still sending its request head; False when every one is past it."""
        heads = [c for c in self._conns.values() if c.phase == "head"]
        if not heads:
            return False
        oldest = min(heads, key=lambda c: c.since)
        oldest.writer.transport.abort()
        self._conns.pop(id(oldest), None)
        self.shed += 1
        return True

    async def _handle(self, conn: _Conn, reader: asyncio.StreamReader) -> tuple[int, dict]:
        import h11

        h = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        try:
            request = await asyncio.wait_for(_next_event(h, reader), self.header_timeout)
        except TimeoutError:
            raise Rejected(408, f"request head not received within {self.header_timeout:g} s") from None
        if not isinstance(request, h11.Request):
            raise Rejected(400, "no request")
        conn.phase = "body"
        method, path = request.method.decode("latin-1"), request.target.decode("latin-1").split("?", 1)[0]
        if method == "GET":
            if path == "/healthz":
                return 200, {"ok": True, "gated": self.gated, "pending": self._pending, "shed": self.shed}
            raise Rejected(404, "not found")
        if method != "POST" or path != PATH:
            raise Rejected(404, f"POST {PATH}")
        headers = _Headers({k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers})
        length = headers.get("content-length")
        # also refuses "-1" and non-ASCII digits: never read an unbounded body
        if length is None or not (length.isascii() and length.isdigit()):
            raise Rejected(411 if length is None else 400, "a non-negative Content-Length is required")
        if int(length) > _MAX_BODY:
            raise Rejected(413, "body too large")
        try:
            body = await asyncio.wait_for(_read_body(h, reader), self.body_timeout)
        except TimeoutError:
            raise Rejected(408, f"body not received within {self.body_timeout:g} s") from None
        return 202, self.dispatch(self.check(headers, body))

    # -- work ----------------------------------------------------------------------------------
    def dispatch(self, event: dict) -> dict:
        kind = (event.get("entity"), event.get("action"))
        if not all(isinstance(k, str) for k in kind):
            raise Rejected(400, "the event's entity and action must be strings")
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
        """Serve until SIGTERM / SIGINT (or :meth:`close` from another thread)."""
        asyncio.run(self._serve())

    def serve_in_thread(self) -> Receiver:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True, name="webhook")
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the webhook receiver did not start within 10 s")
        return self

    def close(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # the loop closed in between
                pass
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._socket.close()
        self.pool.shutdown(wait=True)


@dataclass
class _Conn:
    writer: asyncio.StreamWriter
    since: float
    phase: str = "head"  # "head" until the request line and headers are in, then "body"


async def _next_event(h, reader: asyncio.StreamReader):
    """The next h11 event, reading as needed; a protocol error is the client's (400)."""
    import h11

    while True:
        try:
            event = h.next_event()
        except h11.RemoteProtocolError as e:
            raise Rejected(getattr(e, "error_status_hint", 400) or 400, f"bad request: {e}") from None
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            if not data:
                raise Rejected(400, "client went away")
            try:
                h.receive_data(data)
            except h11.RemoteProtocolError as e:
                raise Rejected(400, f"bad request: {e}") from None
            continue
        return event


async def _read_body(h, reader: asyncio.StreamReader) -> bytes:
    import h11

    chunks, got = [], 0
    while True:
        event = await _next_event(h, reader)
        if isinstance(event, h11.Data):
            got += len(event.data)
            if got > _MAX_BODY:
                raise Rejected(413, "body too large")
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(chunks)
        else:
            raise Rejected(400, "unexpected data after the body")


async def _reply(writer: asyncio.StreamWriter, status: int, obj: dict) -> None:
    from http import HTTPStatus

    body = json.dumps(obj).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode()
    try:
        writer.write(head + body)
        await asyncio.wait_for(writer.drain(), 5)
    except (ConnectionError, OSError, TimeoutError):
        pass
    finally:
        writer.close()  # a no-op on a transport already closing


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
