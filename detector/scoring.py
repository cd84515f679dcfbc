"""The score convention and the decision rule — the one place both are defined.

**Convention.** A view's score is the paper's: the sum over the network's vectors of their
log-likelihood under the reference GMM. *Higher = more typical of clean networks.*

**Decision.** A network is blocked when *any* of its views scores strictly *below* that
view's threshold. Combining views this way can only raise the false-rejection rate: the
combined FRR is at most the sum of the per-view FRRs; the reference records the combined
rate it observed on its calibration networks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

PASS, BLOCK, INVALID = "pass", "block", "invalid"


@dataclass(frozen=True)
class Decision:
    verdict: str  # pass | block | invalid
    reason: str
    below: tuple[str, ...] = ()


def decide(scores: Mapping[str, float], thresholds: Mapping[str, float]) -> Decision:
    """Apply the rule above to one network's per-view scores."""
    missing = sorted(set(thresholds) - set(scores))
    if missing:
        return Decision(INVALID, f"no score for view(s) {', '.join(missing)}")
    below = tuple(v for v in thresholds if scores[v] < thresholds[v])
    if below:
        detail = "; ".join(f"{v} score {scores[v]:.6g} < threshold {thresholds[v]:.6g}" for v in below)
        return Decision(BLOCK, f"anomalous weights: {detail}", below)
    return Decision(PASS, "every view at or above its threshold")
