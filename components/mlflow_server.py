"""An embedded `mlflow server` process: sqlite backend store, served local artifact store.

Used by `make demo` (and the tests) so nothing but this repository is needed to see the
gate work; production points ``MLFLOW_TRACKING_URI`` at a real server instead.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(
        self, root: Path, port: int | None = None, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ):
        self.extra_env, self.extra_args = dict(env or {}), tuple(args)
        self.root = Path(root).resolve()  # absolute: the server runs in it (cwd)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db = self.root / "mlflow.db"
        self.artifacts = self.root / "artifacts"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> MlflowServer:
        """Start and wait for ``/health`` (7-15 s here); the server gets its own process group."""
        self.root.mkdir(parents=True, exist_ok=True)
        mlflow = str(Path(sys.executable).with_name("mlflow"))
        env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", **self.extra_env)
        self.log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [
                mlflow,
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.db}",
                "--artifacts-destination",
                str(self.artifacts),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                *self.extra_args,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            # in its own directory: a server that falls back to a default store (./mlflow.db, ./mlruns)
            # writes it there, not into the caller's working tree
            cwd=self.root,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except urllib.error.HTTPError as e:
                if e.code == 401:  # basic auth on: up, and refusing anonymous requests as it should
                    return self
                time.sleep(0.5)
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("mlflow server did not become healthy in time")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)
