"""The one interface every detector implements (the paper's GMM, the baselines, ``classifier``,
``spectrum``, and composites such as ``fusion`` or the gate's reference with GMM evidence).

One score convention everywhere: a part's score is *higher = more typical of clean networks*
(the paper's log-likelihood is the model for it); a network is blocked when any deciding part
scores below its threshold (:func:`detector.decision.decide`). ``make_reference(name)`` gives an
unfitted detector by name; ``load_reference(path)`` any saved one (the artifact names it); both
live in :mod:`detector.detectors`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from detector.errors import NotFittedError


def check_fitted(est: Any, attr: str) -> None:
    """scikit-learn's rule: fitted state ends in ``_`` and exists only after ``fit``."""
    if not hasattr(est, attr):
        raise NotFittedError(f"{type(est).__name__} is not fitted yet: call fit() first")


def leave_one_out(
    matrices: Sequence[np.ndarray], refit: Callable[[list[np.ndarray]], Any], progress: Callable | None = None
) -> np.ndarray:
    """(M, n): each network's vector scores from ``refit(the other networks)``, an estimator fitted
    without it, so a reference network is scored as a new one would be (leave-one-out thresholds)."""
    out = []
    for i, W in enumerate(matrices):
        out.append(refit([m for j, m in enumerate(matrices) if j != i]).score_vectors(W))
        if progress is not None:
            progress(i)
    return np.asarray(out)


@runtime_checkable
class Detector(Protocol):
    """Also: ``detector`` (its name, recorded in the artifact) and, once calibrated,
    ``thresholds_`` (per deciding part, at the configured FRR)."""

    def fit(self, networks: Sequence[Any], progress: Callable | None = None, base: Any = None) -> Detector:
        """Learn from clean networks (paths, state dicts, modules); ``base`` is the network
        fine-tuning started from (frozen-trunk digests, and ΔW for detectors that need it)."""

    def calibrate(self, clean: Sequence[Any] | None = None, progress: Callable | None = None) -> Detector:
        """Thresholds at the target FRR on held-out clean networks (else leave-one-out)."""

    def assess(self, network: Any) -> Any:
        """Trunk check, every part's score and per-unit evidence, the decision: an ``Assessment``."""

    def score(self, network: Any) -> dict[str, float]:
        """One score per deciding part (higher = more typical)."""

    def score_vectors(self, network: Any) -> Mapping[str, np.ndarray]:
        """Per-unit evidence: per vector (GMM views), per class (classifier), one value (spectrum)."""

    def decide(self, scores: dict[str, float]) -> Any:
        """The rule of :mod:`detector.decision` applied to these scores and the thresholds."""

    def parts(self) -> dict[str, dict[str, Any]]:
        """Per scored part: threshold, whether it decides, the clean calibration scores (for reports)."""

    def save(self, path: Any, **kwargs: Any) -> str:
        """Write the artifact atomically; returns its sha256."""
