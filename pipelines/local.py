"""Run the pipelines on this machine with ``kfp.local`` (no cluster).

Two runners. ``subprocess`` (the default): one subprocess per task, in this very environment
(``use_venv=False``): the project and kfp are installed. ``docker``: each task runs in the image
its component names (components/images.py, built by ``make images``), with exactly the command
and arguments of the compiled YAML, on the host network (a tracking URI on 127.0.0.1 works).
In a container a task sees only the pipeline root (mounted at the same path, writable by the
images' non-root user) and the host's ``BACKDOOR_GATE_*`` / ``MLFLOW_*`` variables: any file
such a variable names (signing keys, base weights) must lie under the pipeline root.
GPU requests, node selectors and tolerations are ignored locally; everything runs on CPU.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

RUNNERS = ("subprocess", "docker")
#: a run's directory under the pipeline root: ``<pipeline name>-<UTC timestamp>`` (kfp.local's naming)
_RUN_DIR = re.compile(r"^(?P<pipeline>.+)-\d{4}(?:-\d{2}){5}-\d{6}$")
#: host variables a container task gets (a subprocess task inherits the whole environment)
CONTAINER_ENV_PREFIXES = ("BACKDOOR_GATE_", "MLFLOW_")


def container_env(root: Path) -> dict[str, str]:
    """The environment of a container task: the host's ``BACKDOOR_GATE_*`` / ``MLFLOW_*`` variables,
    with key files turned into the PEM text a Secret would give (a container cannot read host
    paths), and a feature/trunk cache under the pipeline root, seeded with the host's base trunks."""
    from components import keys as K

    env = {k: v for k, v in os.environ.items() if k.startswith(CONTAINER_ENV_PREFIXES)}
    for file_var, var in ((K.KEY_FILE_ENV, K.KEY_ENV), (K.REFERENCE_KEY_FILE_ENV, K.REFERENCE_KEY_ENV)):
        if path := env.pop(file_var, ""):
            env.setdefault(var, Path(path).read_text())
    for var in (K.VERDICT_KEYS_ENV, K.REFERENCE_KEYS_ENV):
        if env.get(var) and "-----BEGIN" not in env[var]:
            env[var] = "".join(Path(p).read_text() for p in env[var].split(os.pathsep) if p.strip())
    env.pop(K.REVIEWER_KEYS_ENV, None)  # name=path pairs; no pipeline task reads them
    cache = root / "cache"
    (cache / "trunks").mkdir(parents=True, exist_ok=True)
    host_trunks = Path(os.environ.get("BACKDOOR_GATE_CACHE", Path.home() / ".cache" / "backdoor-gate")) / "trunks"
    for trunk in host_trunks.glob("*.safetensors"):
        if not (cache / "trunks" / trunk.name).exists():
            shutil.copy2(trunk, cache / "trunks" / trunk.name)
    for d in (cache, cache / "trunks"):
        d.chmod(0o777)
    env["BACKDOOR_GATE_CACHE"] = str(cache)
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    return env


def init_local(workdir: str | Path, runner: str = "subprocess") -> Path:
    from kfp import local

    if runner not in RUNNERS:
        raise ValueError(f"unknown runner {runner!r}; choose from {RUNNERS}")
    root = Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if runner == "docker":
        try:
            import docker

            docker.from_env().ping()
        except Exception as e:  # docker missing, no daemon, no permission: all the same to the caller
            raise RuntimeError(f"runner docker: no usable docker daemon ({e}); start one (make images does)") from e
        # the images run as a non-root user (uid 10001): it writes its outputs under the root
        root.chmod(0o777)
        # entrypoint [""]: the task's command replaces the image's ENTRYPOINT, as a pod's `command`
        # does on Kubernetes (docker alone would append it to ENTRYPOINT)
        local.init(
            runner=local.DockerRunner(network_mode="host", entrypoint=[""], environment=container_env(root)),
            pipeline_root=str(root),
            raise_on_error=True,
        )
        return root
    # the tasks' `python3` must be this interpreter, whatever PATH the caller had
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
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
    name: str,
    params: dict,
    workdir: str | Path = ".cache/kfp-local",
    log_file: str | Path | None = None,
    runner: str | None = None,
) -> dict:
    """Run pipeline ``name`` with ``params``; returns the pipeline task's outputs (may be empty).

    With ``log_file`` the (very talkative) task logs go there instead of the terminal.
    ``runner="docker"`` runs every task in its component's image (see the module docstring);
    the default is ``$BACKDOOR_GATE_LOCAL_RUNNER`` or ``subprocess`` (so ``make demo`` can run in
    the images: ``BACKDOOR_GATE_LOCAL_RUNNER=docker``).
    """
    from pipelines.facenet import PIPELINES

    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; choose from {sorted(PIPELINES)}")
    init_local(workdir, runner or os.environ.get("BACKDOOR_GATE_LOCAL_RUNNER", "subprocess"))
    with _output_to(Path(log_file) if log_file else None), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        task = PIPELINES[name](**params)
    return dict(getattr(task, "outputs", {}) or {})


def prune_runs(workdir: str | Path, keep: int = 1) -> tuple[list[Path], int]:
    """Delete all but the newest ``keep`` runs of each pipeline under a local pipeline root.

    Every local run leaves its artifacts there (a reference run: one 94 MB checkpoint per clean
    network); MLflow already holds what was registered, so older runs are only disk. The trunk
    and feature cache (``cache/``) and anything not named like a run are left alone.
    Returns the deleted directories and the bytes they held.
    """
    root = Path(workdir)
    runs: dict[str, list[Path]] = {}
    for d in root.iterdir() if root.is_dir() else ():
        if d.is_dir() and (m := _RUN_DIR.match(d.name)):
            runs.setdefault(m["pipeline"], []).append(d)
    gone, freed = [], 0
    for dirs in runs.values():
        for d in sorted(dirs, key=lambda d: d.name)[: max(len(dirs) - keep, 0)]:
            freed += sum(f.stat().st_size for f in d.rglob("*") if f.is_file() and not f.is_symlink())
            shutil.rmtree(d)
            gone.append(d)
    return gone, freed
