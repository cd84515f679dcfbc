"""The reference artifact: a directory of ``arrays.npz`` + ``reference.json``. No pickle.

``reference.json`` records everything a reviewer needs (layer, views, PCA dims, N_G and the
AIC table per view, thresholds, FRR, the reference and calibration checkpoints' sha256) and
the sha256 of ``arrays.npz``. ``artifact_sha256`` is the sha256 of the canonical JSON of all
other fields, so it covers the arrays too. Loading recomputes both and refuses any mismatch.

This module writes and reads every reference, once: a reference gives its metadata
(``info()``), its arrays (``arrays()``) and the references nested in it (a composite's members,
each a whole artifact under ``members/<name>/`` whose digest the metadata records, so the
composite's digest covers them); its class rebuilds it (``restore(info, arrays, members)``).
Which class a name stands for is :data:`detector.detectors.CLASSES`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from detector import __version__
from detector.errors import InvalidReference
from detector.protocol import check_fitted

FORMAT = "backdoor-gate/reference"
FORMAT_VERSION = 1
META_FILE = "reference.json"
ARRAYS_FILE = "arrays.npz"
#: where a composite keeps its members' artifacts
MEMBERS_DIR = "members"
_MAX_META_BYTES = 16 << 20


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _digest(meta: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json({k: v for k, v in meta.items() if k != "artifact_sha256"})).hexdigest()


def save_reference(ref: Any, path: str | os.PathLike, *, overwrite: bool = False, extra: dict | None = None) -> str:
    """Write ``ref`` atomically (temp dir + rename); returns the artifact's sha256."""
    check_fitted(ref, "thresholds_")
    out = Path(path)
    with staged(out, overwrite) as tmp:
        members = {m: save_reference(r, tmp / MEMBERS_DIR / m) for m, r in ref.nested_references().items()}
        arrays_sha = save_arrays(tmp, ref.arrays())
        meta: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **ref.info(),
            **({"members": members} if members else {}),
            "library_version": __version__,
            "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "files": {ARRAYS_FILE: arrays_sha},
            "extra": extra or {},
        }
        return finish_artifact(tmp, out, meta)


def load_reference(path: str | os.PathLike, classes: Mapping[str, Any]) -> Any:
    """The reference in a verified artifact directory, rebuilt by ``classes[its detector]``.

    Its nested references are loaded alike and must have the digests its metadata records (an
    edited member is refused even when re-hashed). Raises InvalidReference.
    """
    root = Path(path)
    meta = read_metadata(root)
    kind = meta.get("detector", "gmm")
    if kind not in classes:
        raise InvalidReference(root, f"unknown detector {kind!r}; this version knows {', '.join(sorted(classes))}")
    try:
        members = {}
        for m, want in (meta.get("members") or {}).items():
            if m in ("", ".", "..") or "/" in m or "\\" in m:
                raise InvalidReference(root, f"member {m!r} is not a plain name")
            member = load_reference(root / MEMBERS_DIR / m, classes)
            if member.artifact_sha256_ != want:
                raise InvalidReference(
                    root,
                    f"tampered: member {m} has artifact_sha256 {member.artifact_sha256_[:12]}…, the composite "
                    f"records {str(want)[:12]}…",
                )
            members[m] = member
        with np.load(root / ARRAYS_FILE, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        ref = classes[kind].restore(meta, arrays, members)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise InvalidReference(root, f"malformed artifact: {e.__class__.__name__}: {e}") from None
    thresholds = ref.thresholds_
    if not thresholds or not all(np.isfinite(t) for t in thresholds.values()):
        raise InvalidReference(root, f"thresholds must be finite numbers, got {thresholds}")
    ref.artifact_sha256_ = meta["artifact_sha256"]
    ref.metadata_ = meta
    return ref


@contextmanager
def staged(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary directory beside ``out`` to build an artifact in (``finish_artifact`` swaps it
    in); removed if building fails. Refuses an existing ``out`` unless ``overwrite``."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose a new --out or pass overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_arrays(staging: Path, arrays: dict[str, Any]) -> str:
    """Write ``arrays.npz`` (no pickle) into a staged artifact; returns its sha256 for ``files``."""
    np.savez(staging / ARRAYS_FILE, **arrays)
    return hashlib.sha256((staging / ARRAYS_FILE).read_bytes()).hexdigest()


def finish_artifact(tmp: Path, out: Path, meta: dict[str, Any]) -> str:
    """Seal a staged artifact: digest the metadata, write it, swap the directory in atomically."""
    meta["artifact_sha256"] = _digest(meta)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, allow_nan=False) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return meta["artifact_sha256"]


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """``reference.json`` after checking every digest. Raises InvalidReference."""
    root = Path(path)
    meta_path = root / META_FILE
    if not root.is_dir():
        raise InvalidReference(root, "not a directory (expected a reference artifact made by `reference fit`)")
    if not meta_path.is_file():
        raise InvalidReference(root, f"{META_FILE} missing")
    if meta_path.stat().st_size > _MAX_META_BYTES:
        raise InvalidReference(root, f"{META_FILE} is larger than {_MAX_META_BYTES} bytes")
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidReference(root, f"{META_FILE} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InvalidReference(root, f"{META_FILE} is not a {FORMAT} document")
    if meta.get("format_version") != FORMAT_VERSION:
        raise InvalidReference(
            root, f"format_version {meta.get('format_version')} is not supported (need {FORMAT_VERSION})"
        )
    if meta.get("artifact_sha256") != _digest(meta):
        raise InvalidReference(root, "tampered: artifact_sha256 does not match the metadata's content")
    for name, want in (meta.get("files") or {}).items():
        f = root / name
        if not f.is_file():
            raise InvalidReference(root, f"{name} missing")
        with f.open("rb") as fh:  # streamed: no buffer the size of a CASIA-size arrays.npz (~100 MB)
            got = hashlib.file_digest(fh, "sha256").hexdigest()
        if got != want:
            raise InvalidReference(root, f"tampered: {name} has sha256 {got[:12]}…, the metadata records {want[:12]}…")
    return meta
