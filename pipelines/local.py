"""Run the pipelines on this machine with ``kfp.local`` (one subprocess per task, no cluster).

GPU requests, node selectors and tolerations are ignored locally; everything runs on CPU.
Tasks run in this very environment (``use_venv=False``): the project and kfp are installed.
"""

from __future__ import annotations

import logging
import os
import sys
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


def run_local(name: str, params: dict, workdir: str | Path = ".cache/kfp-local", quiet: bool = False) -> dict:
    """Run pipeline ``name`` with ``params``; returns the pipeline task's outputs (may be empty)."""
    from pipelines.facenet import PIPELINES

    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; choose from {sorted(PIPELINES)}")
    init_local(workdir)
    if quiet:
        logging.getLogger("kfp").setLevel(logging.WARNING)
    task = PIPELINES[name](**params)
    return dict(getattr(task, "outputs", {}) or {})
