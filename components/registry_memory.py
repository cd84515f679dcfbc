"""A second :class:`~components.registry.Registry` backend, held in this process.

Not a mock: a small model registry with the semantics of MLflow's that the promotion rules
rest on, kept honest by one conformance test run against it and a real ``mlflow server``
(tests/components/test_registry_conformance.py):

- a model's versions are numbered 1, 2, … as strings; each is registered from a new run whose
  artifacts hold the files (``source`` is ``runs:/<run id>/<artifact dir>``);
- tags are strings, keys and values validated as MLflow validates them;
- an alias points at one version of a model at a time, setting it again moves it; the names
  MLflow reserves (``latest``, ``v<n>``) are refused, deleting a missing alias is a no-op;
- ``search`` understands the filters the code uses: ``name='m'`` and ``tags.`k`='v'`` joined
  by ``and``; anything else is refused rather than guessed;
- artifacts are bytes, downloaded to disk as MLflow downloads them (a directory URI gives
  ``dst/<its last path part>``), and every failure is a :class:`RegistryError`.

Thread-safe (one lock), so the reconciler and concurrent gates can share one instance.
"""

from __future__ import annotations

import posixpath
import re
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.registry import (
    CANDIDATE_EXPERIMENT,
    WEIGHTS_DIR,
    Registry,
    RegistryError,
    VersionInfo,
)

# MLflow's limits and name rules (mlflow/utils/validation.py)
_TAG_KEY_MAX, _TAG_VALUE_MAX, _ALIAS_MAX = 250, 100_000, 255
_TAG_KEY = re.compile(r"^[/\w.\- :]*$")
_ALIAS = re.compile(r"^[\w\-]*$")
_RESERVED_ALIAS = re.compile(r"^([vV]\d+|latest)$", re.IGNORECASE)
_SCHEME = "memory-artifacts:"
_ARTIFACT_URI = re.compile(rf"^{_SCHEME}/(?P<run>[0-9a-f]{{32}})/artifacts(?:/(?P<path>.*))?$")
_RUNS_URI = re.compile(r"^runs:/(?P<run>[^/]+)(?:/(?P<path>.*))?$")
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))(?:/(?P<path>.*))?$")
_TERM = re.compile(
    r"^\s*(?:(?P<name>name)|tags\.(?:`(?P<quoted>[^`]+)`|(?P<bare>[\w.]+)))\s*=\s*'(?P<value>[^']*)'\s*$"
)


@dataclass
class _Version:
    version: int
    source: str
    run_id: str
    user_id: str | None
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class _Model:
    versions: dict[int, _Version] = field(default_factory=dict)
    aliases: dict[str, int] = field(default_factory=dict)
    next_version: int = 1


@dataclass
class _Run:
    experiment_id: str
    name: str | None
    files: dict[str, bytes] = field(default_factory=dict)  # path under the run's artifact root -> bytes
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = "RUNNING"


class InMemoryRegistry(Registry):
    """Models, runs and artifacts in dictionaries. ``user_id`` is who registers (MLflow's
    authenticated user; None like a server without auth)."""

    def __init__(self, user_id: str | None = None):
        self.user_id = user_id
        self._lock = threading.RLock()
        self._models: dict[str, _Model] = {}
        self._runs: dict[str, _Run] = {}
        self._experiments: dict[str, str] = {}  # name -> id

    # -- helpers -----------------------------------------------------------------------------
    def _model(self, name: str, what: str) -> _Model:
        model = self._models.get(name)
        if model is None:
            raise RegistryError(f"{what} failed: RESOURCE_DOES_NOT_EXIST: registered model {name!r} not found")
        return model

    def _version(self, name: str, version: str | int, what: str) -> _Version:
        if not str(version).strip().lstrip("-").isdigit():
            raise RegistryError(f"{what} failed: INVALID_PARAMETER_VALUE: version {version!r} is not an integer")
        found = self._model(name, what).versions.get(int(version))
        if found is None:
            raise RegistryError(f"{what} failed: RESOURCE_DOES_NOT_EXIST: {name} version {version} not found")
        return found

    def _run(self, run_id: str, what: str) -> _Run:
        run = self._runs.get(run_id)
        if run is None:
            raise RegistryError(f"{what} failed: RESOURCE_DOES_NOT_EXIST: run {run_id!r} not found")
        return run

    def _info(self, name: str, v: _Version) -> VersionInfo:
        aliases = tuple(sorted(a for a, n in self._models[name].aliases.items() if n == v.version))
        return VersionInfo(name, str(v.version), v.source, v.run_id, dict(v.tags), aliases, v.user_id)

    @staticmethod
    def _check_alias(alias: str, what: str) -> None:
        if not alias or not _ALIAS.match(alias) or len(alias) > _ALIAS_MAX:
            raise RegistryError(f"{what} failed: INVALID_PARAMETER_VALUE: invalid alias name {alias!r}")

    # -- versions ----------------------------------------------------------------------------
    def version(self, name: str, version: str | int) -> VersionInfo:
        with self._lock:
            return self._info(name, self._version(name, version, f"reading {name} v{version}"))

    def version_by_alias(self, name: str, alias: str) -> VersionInfo | None:
        with self._lock:
            model = self._models.get(name)
            if model is None or alias not in model.aliases:
                return None
            return self._info(name, model.versions[model.aliases[alias]])

    def set_tags(self, name: str, version: str, tags: dict[str, Any]) -> None:
        with self._lock:
            for k, v in tags.items():
                what = f"tagging {name} v{version} ({k})"
                self._version(name, version, what).tags[k] = self._checked_tag(k, v, what)

    @staticmethod
    def _checked_tag(key: str, value: Any, what: str) -> str:
        norm = posixpath.normpath(key) if key else ""
        if not key or not _TAG_KEY.match(key) or len(key) > _TAG_KEY_MAX or norm != key or norm.startswith(("..", "/")):
            raise RegistryError(f"{what} failed: INVALID_PARAMETER_VALUE: invalid tag key {key!r}")
        if len(str(value)) > _TAG_VALUE_MAX:
            raise RegistryError(f"{what} failed: INVALID_PARAMETER_VALUE: tag value over {_TAG_VALUE_MAX} characters")
        return str(value)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        what = f"setting {name}@{alias}"
        with self._lock:
            self._check_alias(alias, what)
            if _RESERVED_ALIAS.match(alias):
                raise RegistryError(f"{what} failed: INVALID_PARAMETER_VALUE: alias name {alias!r} is reserved")
            found = self._version(name, version, what)
            self._models[name].aliases[alias] = found.version

    def delete_alias(self, name: str, alias: str) -> None:
        what = f"removing {name}@{alias}"
        with self._lock:
            self._check_alias(alias, what)
            self._model(name, what).aliases.pop(alias, None)

    def search(self, filter_string: str) -> list[VersionInfo]:
        terms = []
        for part in re.split(r"\s+and\s+", filter_string.strip(), flags=re.IGNORECASE):
            m = _TERM.match(part)
            if m is None:
                raise RegistryError(f"searching versions failed: INVALID_PARAMETER_VALUE: unsupported filter {part!r}")
            terms.append((None if m["name"] else m["quoted"] or m["bare"], m["value"]))
        with self._lock:
            return [
                self._info(name, v)
                for name, model in self._models.items()
                for v in model.versions.values()
                if all((name if key is None else v.tags.get(key)) == value for key, value in terms)
            ]

    def versions(self, name: str) -> list[VersionInfo]:
        with self._lock:
            model = self._models.get(name)
            return [self._info(name, model.versions[n]) for n in sorted(model.versions, reverse=True)] if model else []

    # -- artifacts ---------------------------------------------------------------------------
    def _resolve(self, source: str) -> tuple[str, str]:
        """(run id, path under the run's artifact root) of a URI this registry hands out."""
        if m := _MODELS_URI.match(source):
            name = m["name"]
            info = self.version_by_alias(name, m["alias"]) if m["alias"] else self.version(name, m["version"])
            if info is None:
                raise RegistryError(f"resolving {source} failed: no alias {name}@{m['alias']}")
            run_id, base = self._resolve(info.source)
            return run_id, posixpath.join(base, m["path"]) if m["path"] else base
        m = _RUNS_URI.match(source) or _ARTIFACT_URI.match(source)
        if m is None:
            raise RegistryError(f"downloading {source} failed: not a URI of this registry")
        return m["run"], (m["path"] or "").strip("/")

    def download(self, source: str, dst: str | Path) -> Path:
        with self._lock:
            run_id, path = self._resolve(source)
            files = self._run(run_id, f"downloading {source}").files
            if path in files:
                picked = {posixpath.basename(path): files[path]}
                out = Path(dst) / posixpath.basename(path)
            else:
                prefix = f"{path}/" if path else ""
                picked = {
                    posixpath.join(posixpath.basename(path), k[len(prefix) :]): b
                    for k, b in files.items()
                    if k.startswith(prefix)
                }
                out = Path(dst) / posixpath.basename(path) if path else Path(dst)
                if not picked:
                    raise RegistryError(f"downloading {source} failed: no such artifact")
        for rel, data in picked.items():
            (Path(dst) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(dst) / rel).write_bytes(data)
        return out

    def run_file(self, run_id: str | None, path: str, max_bytes: int = 1 << 20) -> bytes | None:
        if not run_id:
            return None
        with self._lock:
            data = self._run(run_id, f"listing {path}").files.get(path)
        if data is not None and len(data) > max_bytes:
            raise RegistryError(f"{path} is {len(data)} bytes, over {max_bytes}")
        return data

    # -- writing -----------------------------------------------------------------------------
    def register(
        self,
        name: str,
        files: Mapping[str, str | Path],
        *,
        artifact_dir: str = WEIGHTS_DIR,
        experiment: str = CANDIDATE_EXPERIMENT,
        run_name: str | None = None,
        params: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        tags: dict[str, Any] | None = None,
    ) -> VersionInfo:
        try:
            staged = {posixpath.join(artifact_dir, dest): Path(src).read_bytes() for dest, src in files.items()}
        except OSError as e:
            raise RegistryError(f"uploading artifacts failed: {e.__class__.__name__}: {e}") from e
        checked = {k: self._checked_tag(k, v, f"registering {name}") for k, v in (tags or {}).items()}
        with self._lock:
            exp_id = self._experiments.setdefault(experiment, str(len(self._experiments) + 1))
            run_id = uuid.uuid4().hex
            self._runs[run_id] = _Run(
                exp_id,
                run_name,
                staged,
                {k: str(v) for k, v in (params or {}).items()},
                {k: float(v) for k, v in (metrics or {}).items()},
                "FINISHED",
            )
            model = self._models.setdefault(name, _Model())
            number, model.next_version = model.next_version, model.next_version + 1
            model.versions[number] = _Version(number, f"runs:/{run_id}/{artifact_dir}", run_id, self.user_id, checked)
            return self._info(name, model.versions[number])

    def log_artifacts_to_run(self, run_id: str, local_dir: str | Path, artifact_path: str) -> str:
        root = Path(local_dir)
        files = {
            posixpath.join(artifact_path, p.relative_to(root).as_posix()): p.read_bytes()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }
        with self._lock:
            self._run(run_id, "uploading report").files.update(files)
        return f"{_SCHEME}/{run_id}/artifacts/{artifact_path}"
