"""Threshold-free evaluation: ROC AUC of clean vs backdoored networks.

Backdoored is the positive class and a *lower* score means more anomalous (see
:mod:`detector.decision`), so AUC = P(backdoored score < clean score), ties counting 1/2.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def roc_auc(clean_scores: Any, backdoored_scores: Any) -> float:
    c = np.asarray(clean_scores, dtype=np.float64).ravel()
    b = np.asarray(backdoored_scores, dtype=np.float64).ravel()
    if c.size == 0 or b.size == 0:
        raise ValueError("AUC needs at least one clean and one backdoored network")
    less = (b[:, None] < c[None, :]).sum()
    ties = (b[:, None] == c[None, :]).sum()
    return float((less + 0.5 * ties) / (b.size * c.size))
