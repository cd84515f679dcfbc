"""Thresholds from a target false-rejection rate (FRR) on clean networks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def threshold_at_frr(clean_scores: np.ndarray, frr: float) -> float:
    """The threshold at which a *new* clean network is rejected with probability at most ``frr``.

    Blocked means ``score < threshold``. With n clean scores sorted ascending, the threshold is
    the (k+1)-th lowest for the largest k with (k+1)/(n+1) <= frr: a fresh network from the
    same distribution falls below the (k+1)-th lowest of n with probability (k+1)/(n+1) (its rank
    among the n+1 is uniform). Counting only the calibration networks instead (k = floor(frr·n))
    promised 5 % but gave 2/21 = 9.5 % with 20 networks. With fewer than 1/frr − 1 networks the
    threshold is the lowest clean score and the true FRR about 1/(n+1): calibrate on more.
    """
    s = np.sort(np.asarray(clean_scores, dtype=np.float64))
    if s.size == 0:
        raise ValueError("need at least one clean score to set a threshold")
    if not np.all(np.isfinite(s)):
        raise ValueError("clean scores must be finite")
    k = min(max(int(math.floor(frr * (s.size + 1) + 1e-12)) - 1, 0), s.size - 1)
    return float(s[k])


def rejection_rate(scores: Sequence[float] | np.ndarray, threshold: float) -> float:
    s = np.asarray(scores, dtype=np.float64)
    return float(np.mean(s < threshold)) if s.size else float("nan")


#: MAD x 1.4826 estimates a normal distribution's standard deviation
MAD_TO_STD = 1.4826


def median_mad(x: np.ndarray, axis: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Median and scaled MAD (a robust centre and spread) along ``axis``, not floored: each
    caller floors the MAD at what "no spread" means for its own numbers."""
    x = np.asarray(x)
    med = np.median(x, axis=axis)
    centred = x - (med if axis is None else np.expand_dims(med, axis))
    return med, MAD_TO_STD * np.median(np.abs(centred), axis=axis)


def frr_upper_bound(rejected: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper–Pearson upper bound on the true FRR after ``rejected`` of ``n`` clean
    networks were blocked: what an observed "FRR 0 of 12" actually promises (up to 22 %)."""
    from scipy.stats import beta

    if n <= 0:
        return 1.0
    if rejected >= n:
        return 1.0
    return float(beta.ppf(confidence, rejected + 1, n - rejected))
