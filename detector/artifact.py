"""The reference artifact: a directory of ``arrays.npz`` + ``reference.json``. No pickle.

``reference.json`` records everything a reviewer needs (layer, views, PCA dims, N_G and the
AIC table per view, thresholds, FRR, the reference and calibration checkpoints' sha256) and
the sha256 of ``arrays.npz``. ``artifact_sha256`` is the sha256 of the canonical JSON of all
other fields, so it covers the arrays too. Loading recomputes both and refuses any mismatch.

This module writes and verifies the format; :func:`detector.detectors.load_reference` turns a
verified artifact back into the detector it names.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from detector import __version__
from detector.errors import InvalidReference
from detector.gmm import Mixture
from detector.protocol import check_fitted

FORMAT = "backdoor-gate/reference"
FORMAT_VERSION = 1
META_FILE = "reference.json"
ARRAYS_FILE = "arrays.npz"
_MAX_META_BYTES = 16 << 20
#: Detectors stored as PCA + GMM per view (``gaussian`` is the GMM with N_G = 1).
GMM_DETECTORS = ("gmm", "gaussian")


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _digest(meta: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json({k: v for k, v in meta.items() if k != "artifact_sha256"})).hexdigest()


def _view_arrays(view: str, est) -> dict[str, np.ndarray]:
    m: Mixture = est.mixture_
    return {
        f"{view}.pca_mean": est.pca_mean_,
        f"{view}.pca_components": est.pca_components_,
        f"{view}.gmm_weights": m.weights,
        f"{view}.gmm_means": m.means,
        f"{view}.gmm_precisions_cholesky": m.precisions_cholesky,
        f"{view}.reference_vector_scores": np.asarray(est.reference_vector_scores_),
    }


def save_reference(ref, path: str | os.PathLike, *, overwrite: bool = False, extra: dict | None = None) -> str:
    """Write ``ref`` atomically (temp dir + rename); returns the artifact's sha256."""
    check_fitted(ref, "thresholds_")
    out = Path(path)
    with staged(out, overwrite) as tmp:
        arrays: dict[str, Any] = {}
        views: dict[str, Any] = {}
        detector = getattr(ref, "detector", "gmm")
        for v, est in ref.views_.items():
            arrays[f"{v}.calibration_vector_scores"] = np.asarray(ref.calibration_vector_scores_[v])
            if detector not in GMM_DETECTORS:  # a baseline: its own few arrays and fields
                arrays.update({f"{v}.{k}": a for k, a in est.arrays().items()})
                views[v] = {**est.info(), "threshold": ref.thresholds_[v], "frr_empirical": ref.frr_empirical_[v]}
                continue
            arrays.update(_view_arrays(v, est))
            views[v] = {
                "n_vectors": est.n_vectors_,
                "vector_dim": int(est.pca_mean_.shape[0]),
                "pca_dims": est.n_pca_,
                "explained_variance": est.explained_variance_,
                "n_components": est.n_components_,
                "covariance": est.mixture_.covariance,
                "reg_covar_absolute": est.reg_,
                "em_iterations": est.mixture_.n_iter,
                "em_converged": est.mixture_.converged,
                "selection": est.selection_,
                "fit_seconds": est.fit_seconds_,
                "threshold": ref.thresholds_[v],
                "frr_empirical": ref.frr_empirical_[v],
            }
        arrays_sha = save_arrays(tmp, arrays)
        meta: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "detector": detector,
            "library_version": __version__,
            "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "layer": ref.config.layer,
            "layer_shape": list(ref.shape_),
            "views": views,
            "score_convention": (
                "log-likelihood"
                if detector in GMM_DETECTORS
                else f"{detector} (see detector.{'classifier' if detector == 'classifier' else 'baselines'})"
            )
            + "; higher = more typical of clean networks; blocked if any view < threshold",
            "config": ref.config.to_dict(),
            "frr_target": ref.config.frr,
            "frr_empirical_combined": ref.frr_empirical_["combined"],
            "frr_upper_95_combined": getattr(ref, "frr_upper_95_", None),
            "calibration_warning": getattr(ref, "calibration_warning_", None),
            "classes": getattr(ref, "classes_", None),
            "threshold_source": ref.threshold_source_,
            "n_reference": ref.n_reference_,
            "n_calibration": int(len(next(iter(ref.calibration_scores_.values())))),
            "reference_checkpoints": ref.reference_checkpoints_,
            "calibration_checkpoints": ref.calibration_checkpoints_,
            "trunk_digests": getattr(ref, "trunk_digests_", {}),
            "files": {ARRAYS_FILE: arrays_sha},
            "extra": extra or {},
        }
        return finish_artifact(tmp, out, meta)


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
        got = hashlib.sha256(f.read_bytes()).hexdigest()
        if got != want:
            raise InvalidReference(root, f"tampered: {name} has sha256 {got[:12]}…, the metadata records {want[:12]}…")
    return meta
