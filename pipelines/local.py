"""Run the pipelines on this machine with ``kfp.local`` (one subprocess per task, no cluster).

GPU requests, node selectors and tolerations are ignored locally; everything runs on CPU.
Tasks run in this very environment (``use_venv=False``): the project and kfp are installed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path


def init_local(workdir: str | Path) -> Path:
    from kfp import local

    root = Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # the tasks' `python3` must be this interpreter, whatever PATH the caller had
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    return root


@contextlib.contextmanager
def _output_to(log_file: Path | None):
    """Send everything written to fds 1 and 2 (ours and the task subprocesses') to a file."""
    if log_file is None:
        yield
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_file, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_local(
    name: str, params: dict, workdir: str | Path = ".cache/kfp-local", log_file: str | Path | None = None
) -> dict:
    """Run pipeline ``name`` with ``params``; returns the pipeline task's outputs (may be empty).

    With ``log_file`` the (very talkative) task logs go there instead of the terminal.
    """
    from pipelines.facenet import PIPELINES

    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; choose from {sorted(PIPELINES)}")
    init_local(workdir)
    with _output_to(Path(log_file) if log_file else None), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        task = PIPELINES[name](**params)
    return dict(getattr(task, "outputs", {}) or {})
