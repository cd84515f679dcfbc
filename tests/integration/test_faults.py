"""Faults around the gate: a server that hangs, an artifact store that is full. Fail closed, converge."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

from components import gate as G
from components import tags as T
from components.mlflow_server import MlflowServer
from components.reference_store import publish_reference
from components.registry import MlflowRegistry
from tests.conftest import GateWorld


def test_a_hanging_server_times_out_and_fails_closed(monkeypatch):
    """A server that accepts connections and never answers: bounded time, exit 2, nothing promoted."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        t0 = time.monotonic()
        r = G.gate("facenet", 1, registry=MlflowRegistry(f"http://127.0.0.1:{hole.getsockname()[1]}"))
        elapsed = time.monotonic() - t0
    assert r.exit_code == 2 and "gate error" in r.reason and not r.promoted
    assert elapsed < 30, f"took {elapsed:.0f} s"


@pytest.fixture
def tiny_artifact_store(tmp_path):
    mount = tmp_path / "mlflow" / "artifacts"
    mount.mkdir(parents=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {p.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_full_artifact_store_leaves_no_verdict_and_a_rerun_converges(tmp_path, tiny_artifact_store):
    world = GateWorld(tmp_path, seed=3)
    good = world.ckpt("clean", "passed")
    server = MlflowServer(tmp_path / "mlflow").start()
    try:
        reg = MlflowRegistry(server.uri)
        publish_reference(reg, world.reference_dir)
        v = reg.register("facenet", {"model.safetensors": good}, tags={T.REGISTERED_BY: "ci"})
        filler = tiny_artifact_store / "filler"
        with open(filler, "wb") as f:  # fill the store to the last byte
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        r = G.gate("facenet", v.version, registry=reg)
        assert r.exit_code == 2 and r.verdict != "passed" and not r.promoted, r.reason
        tags = reg.version("facenet", v.version).tags
        assert tags[T.VERDICT] == "error"  # the gate's failure, no verdict without its document
        assert reg.version_by_alias("facenet", "production") is None
        filler.unlink()
        r = G.gate("facenet", v.version, registry=reg)
        assert (r.verdict, r.promoted) == ("passed", True), r.reason
        assert reg.version("facenet", v.version).tags[T.VERDICT] == "passed"
    finally:
        server.stop()
        shutil.rmtree(tmp_path / "mlflow" / "artifacts" / "filler", ignore_errors=True)
