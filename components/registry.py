"""The narrow seam between backdoor-gate and the MLflow model registry.

Everything that talks to the registry goes through the :class:`Registry` protocol: versions,
tags, aliases, artifacts, and no policy (the tag names are :mod:`components.tags`, the
decision :mod:`detector.decision`, the production rules :mod:`components.policy`). Two
backends implement it, the way MLflow's own stores implement its ``AbstractStore``:
:class:`MlflowRegistry` over MLflow's client (a local sqlite server in tests, Postgres + S3 in
production) and :class:`components.registry_memory.InMemoryRegistry`, a second backend in this
process for fast tests of the promotion rules. One conformance test runs against both
(tests/components/test_registry_conformance.py), so the second cannot drift.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

# Fail fast instead of MLflow's default 7 retries x 120 s when the server is gone; the gate
# fails closed, and a rerun converges. Users can still override both.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

#: Where a registered version's weights live inside its source artifact directory.
WEIGHTS_DIR = "weights"
WEIGHT_FILE = "model.safetensors"
REFERENCE_DIR = "reference"
#: Candidates' runs (registered versions, verdicts, reports) and the reference's run live in
#: different experiments: registrants may read and write the first, only the gate may read the second.
CANDIDATE_EXPERIMENT = "backdoor-gate"
REFERENCE_EXPERIMENT = "backdoor-gate-reference"
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


class RegistryError(RuntimeError):
    """The registry could not be read or written (unreachable, missing object, refused)."""


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    source: str
    run_id: str | None
    tags: dict[str, str]
    aliases: tuple[str, ...]
    user_id: str | None


@dataclass(frozen=True)
class Artifact:
    """Every file of a version's artifact tree, read once, and the digest that binds them all."""

    files: dict[str, bytes]  # path inside the version's artifact directory -> bytes

    @property
    def digests(self) -> dict[str, str]:
        return {name: hashlib.sha256(data).hexdigest() for name, data in sorted(self.files.items())}

    @property
    def sha256(self) -> str:
        """sha256 of the canonical JSON {path: sha256}: adding, removing or changing a file changes it."""
        return hashlib.sha256(json.dumps(self.digests, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def weight_file(self) -> tuple[str, bytes]:
        """The one weight file; ValueError naming every file the gate would not judge."""
        weights = sorted(n for n in self.files if n.endswith(_WEIGHT_SUFFIXES))
        others = sorted(n for n in self.files if n not in weights)
        if others:
            raise ValueError(
                f"files the gate does not judge in the registered artifacts: {', '.join(others[:20])}"
                " (register only the weight file)"
            )
        if not weights:
            raise ValueError(f"no weight file ({WEIGHT_FILE}, *.pt, *.pth) in the registered artifacts")
        if len(weights) > 1:
            raise ValueError(
                f"{len(weights)} weight files in the registered artifacts ({', '.join(weights[:20])}); register "
                "exactly one"
            )
        return weights[0], self.files[weights[0]]


class Registry(Protocol):
    """Registry operations the gate, the reconciler and the pipelines need.

    Errors are :class:`RegistryError` (a missing version, a refused write, an unreachable
    server), never a backend's own exception type. Version numbers are strings; an alias is on
    one version of a model at a time and moves when set again.
    """

    # -- versions ---------------------------------------------------------------------------
    def version(self, name: str, version: str | int) -> VersionInfo:
        """One version; RegistryError when the model or the version does not exist."""
        ...

    def version_by_alias(self, name: str, alias: str) -> VersionInfo | None:
        """The version ``alias`` points at; None when the model or the alias does not exist."""
        ...

    def set_tags(self, name: str, version: str, tags: dict[str, Any]) -> None:
        """Set each tag (values become ``str``) one at a time: a failure leaves the earlier ones set."""
        ...

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point ``alias`` at ``version``, taking it off any other version of the model."""
        ...

    def delete_alias(self, name: str, alias: str) -> None:
        """Remove ``alias``; nothing happens when the model has no such alias."""
        ...

    def search(self, filter_string: str) -> list[VersionInfo]:
        """Versions matching an MLflow filter: ``name='m'`` and ``tags.`k`='v'`` terms joined by ``and``,
        in no particular order (:meth:`versions` sorts)."""
        ...

    def versions(self, name: str) -> list[VersionInfo]:
        """Every version of ``name``, newest (highest number) first; empty for an unknown model."""
        ...

    # -- artifacts --------------------------------------------------------------------------
    def download(self, source: str, dst: str | Path) -> Path:
        """Download a version's ``source``, a ``models:/`` URI or a URI :meth:`log_artifacts_to_run`
        returned, into ``dst``; the local path of the file or directory it names."""
        ...

    def download_artifact(self, info: VersionInfo, max_bytes: int) -> Artifact:
        """The version's whole artifact tree, bounded in total size. Raises RegistryError/ValueError.

        Written once, over :meth:`download`: every backend reads an artifact tree the same way."""
        with tempfile.TemporaryDirectory(prefix="backdoor-gate-") as tmp:
            return artifact_in(self.download(info.source, tmp), max_bytes)

    def run_file(self, run_id: str | None, path: str, max_bytes: int = 1 << 20) -> bytes | None:
        """A small file from a run's artifacts, or None when it is not there (or there is no run)."""
        ...

    # -- writing ----------------------------------------------------------------------------
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
        """Log ``files`` (name in the artifact dir -> local path) in a new run and register them as
        the model's next version, its source ``runs:/<run id>/<artifact_dir>``."""
        ...

    def log_artifacts_to_run(self, run_id: str, local_dir: str | Path, artifact_path: str) -> str:
        """Upload a directory's files under ``artifact_path`` of the run; the URI to :meth:`download` them."""
        ...


class MlflowRegistry(Registry):
    """The registry as MLflow's client sees it, with errors turned into :class:`RegistryError`."""

    def __init__(self, tracking_uri: str | None = None):
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "http://127.0.0.1:5000"
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # MlflowException, requests errors, OSError ...
            first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:300]
            raise RegistryError(f"{what} failed: {e.__class__.__name__}: {first}") from e

    # -- versions ---------------------------------------------------------------------------
    def version(self, name: str, version: str | int) -> VersionInfo:
        mv = self._call(f"reading {name} v{version}", self.client.get_model_version, name, str(version))
        return VersionInfo(
            name=mv.name,
            version=str(mv.version),
            source=mv.source,
            run_id=mv.run_id,
            tags=dict(mv.tags or {}),
            aliases=tuple(getattr(mv, "aliases", ()) or ()),
            user_id=mv.user_id or None,
        )

    def version_by_alias(self, name: str, alias: str) -> VersionInfo | None:
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(name, alias)
        except MlflowException as e:
            if getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise RegistryError(f"reading alias {name}@{alias} failed: {e}") from e
        except Exception as e:
            raise RegistryError(f"reading alias {name}@{alias} failed: {e.__class__.__name__}: {e}") from e
        return self.version(name, mv.version)

    def set_tags(self, name: str, version: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self._call(f"tagging {name} v{version} ({k})", self.client.set_model_version_tag, name, version, k, str(v))

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self._call(f"setting {name}@{alias}", self.client.set_registered_model_alias, name, alias, version)

    def delete_alias(self, name: str, alias: str) -> None:
        self._call(f"removing {name}@{alias}", self.client.delete_registered_model_alias, name, alias)

    def search(self, filter_string: str) -> list[VersionInfo]:
        found = self._call("searching versions", self.client.search_model_versions, filter_string)
        return [self.version(mv.name, mv.version) for mv in found]

    # -- artifacts --------------------------------------------------------------------------
    def download(self, source: str, dst: str | Path) -> Path:
        import mlflow

        uri = self._resolve_models_uri(source) if source.startswith("models:") else source
        return Path(
            self._call(
                f"downloading {source}",
                mlflow.artifacts.download_artifacts,
                artifact_uri=uri,
                dst_path=str(dst),
                tracking_uri=self.tracking_uri,
            )
        )

    def _resolve_models_uri(self, source: str) -> str:
        """``models:/name@alias[/path]`` or ``models:/name/version[/path]`` -> where its files are, asked of
        *this* registry: MLflow resolves ``models:/`` against the process-wide registry URI instead, which
        is not this one unless $MLFLOW_TRACKING_URI happens to name it."""
        from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
        from mlflow.store.artifact.utils.models import get_model_name_and_version

        base, path = self._call(f"parsing {source}", ModelsArtifactRepository.split_models_uri, source)
        found = self._call(f"resolving {base}", get_model_name_and_version, self.client, base)
        if len(found) != 2:
            raise RegistryError(f"{source}: only registered models (name@alias or name/version) are supported")
        where = self._call(f"resolving {base}", self.client.get_model_version_download_uri, *found)
        return f"{where.rstrip('/')}/{path}" if path else where

    def download_weights(self, info: VersionInfo, max_bytes: int) -> tuple[bytes, str]:
        """The version's weight file as bytes plus its file name. Raises RegistryError/ValueError."""
        with tempfile.TemporaryDirectory(prefix="backdoor-gate-") as tmp:
            root = self.download(info.source, tmp)
            path = weight_file_in(root)
            size = path.stat().st_size
            if size > max_bytes:
                raise ValueError(f"{path.name} is {size} bytes, over the {max_bytes}-byte limit")
            return path.read_bytes(), path.name

    def versions(self, name: str) -> list[VersionInfo]:
        """Every version of ``name``, newest (highest number) first."""
        found = self._call("searching versions", self.client.search_model_versions, f"name='{name}'")
        return sorted((self.version(mv.name, mv.version) for mv in found), key=lambda v: -int(v.version))

    def run_file(self, run_id: str | None, path: str, max_bytes: int = 1 << 20) -> bytes | None:
        """A small file from a run's artifacts, or None when it is not there."""
        if not run_id:
            return None
        folder, _, name = path.rpartition("/")
        listed = self._call(f"listing {folder}", self.client.list_artifacts, run_id, folder or None)
        entry = next((f for f in listed if f.path.rsplit("/", 1)[-1] == name and not f.is_dir), None)
        if entry is None:
            return None
        if entry.file_size is not None and entry.file_size > max_bytes:
            raise RegistryError(f"{path} is {entry.file_size} bytes, over {max_bytes}")
        with tempfile.TemporaryDirectory(prefix="backdoor-gate-") as tmp:
            local = Path(self._call(f"downloading {path}", self.client.download_artifacts, run_id, path, tmp))
            if local.stat().st_size > max_bytes:
                raise RegistryError(f"{path} is over {max_bytes} bytes")
            return local.read_bytes()

    # -- writing ----------------------------------------------------------------------------
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
        """Log ``files`` (name in the artifact dir -> local path) in a new run and register them."""
        from mlflow.exceptions import MlflowException

        exp = self._call(f"reading experiment {experiment}", self.client.get_experiment_by_name, experiment)
        exp_id = (
            exp.experiment_id if exp else self._call("creating experiment", self.client.create_experiment, experiment)
        )
        run = self._call("creating run", self.client.create_run, exp_id, run_name=run_name)
        rid = run.info.run_id
        try:
            with tempfile.TemporaryDirectory() as tmp:
                staged = Path(tmp) / artifact_dir
                staged.mkdir()
                for dest, src in files.items():
                    (staged / dest).parent.mkdir(parents=True, exist_ok=True)
                    (staged / dest).write_bytes(Path(src).read_bytes())
                self._call("uploading artifacts", self.client.log_artifacts, rid, str(staged), artifact_dir)
            for k, v in (params or {}).items():
                self._call("logging params", self.client.log_param, rid, k, v)
            for k, v in (metrics or {}).items():
                self._call("logging metrics", self.client.log_metric, rid, k, float(v))
            self._call("ending run", self.client.set_terminated, rid)
        except RegistryError:
            self.client.set_terminated(rid, status="FAILED")
            raise
        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise RegistryError(f"creating registered model {name} failed: {e}") from e
        mv = self._call(
            f"registering {name}",
            self.client.create_model_version,
            name,
            source=f"runs:/{rid}/{artifact_dir}",
            run_id=rid,
            tags={k: str(v) for k, v in (tags or {}).items()},
        )
        return self.version(name, mv.version)

    def log_artifacts_to_run(self, run_id: str, local_dir: str | Path, artifact_path: str) -> str:
        self._call("uploading report", self.client.log_artifacts, run_id, str(local_dir), artifact_path)
        run = self._call("reading run", self.client.get_run, run_id)
        return f"{run.info.artifact_uri}/{artifact_path}"


def artifact_in(root: Path, max_bytes: int) -> Artifact:
    """Every file of a downloaded artifact tree (or the one file ``root``), bounded in total size."""
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())
    total = sum(p.lstat().st_size for p in paths)
    if total > max_bytes:
        raise ValueError(f"the registered artifacts are {total} bytes, over the {max_bytes}-byte limit")
    if any(p.is_symlink() for p in paths):
        raise ValueError("the registered artifacts contain a symbolic link")
    return Artifact({(p.name if root.is_file() else p.relative_to(root).as_posix()): p.read_bytes() for p in paths})


def weight_file_in(root: Path) -> Path:
    """The one weight file of a downloaded version: ``model.safetensors``, else a single .pt/.pth."""
    root = Path(root)
    if root.is_file():
        return root
    preferred = root / WEIGHT_FILE
    if preferred.is_file():
        return preferred
    found = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(f"no weight file ({WEIGHT_FILE}, *.pt, *.pth) in the registered artifacts")
    raise ValueError(
        f"ambiguous: {len(found)} weight files in the registered artifacts ({', '.join(p.name for p in found[:5])})"
    )
