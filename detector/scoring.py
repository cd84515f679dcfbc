"""The score convention and the decision rule — the one place both are defined.

**Convention.** A view's score is the paper's: the sum over the network's vectors of their
log-likelihood under the reference GMM. *Higher = more typical of clean networks.*

**Decision.** A network is blocked when its frozen trunk differs from the base network's
(``trunk-modified``, see :mod:`detector.trunk`), or when *any* of its views scores strictly
*below* that view's threshold. Combining views this way can only raise the false-rejection rate: the
combined FRR is at most the sum of the per-view FRRs; the reference records the combined
rate it observed on its calibration networks.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

from detector.trunk import MISSING, MODIFIED, NOT_CHECKED, TrunkCheck

PASS, BLOCK, INVALID = "pass", "block", "invalid"


@dataclass(frozen=True)
class Decision:
    verdict: str  # pass | block | invalid
    reason: str
    below: tuple[str, ...] = ()


def decide(scores: Mapping[str, float], thresholds: Mapping[str, float], trunk: TrunkCheck | None = None) -> Decision:
    """Apply the rule above to one network's per-view scores and trunk check.

    Fails closed by construction: a view passes only when ``score >= threshold`` holds for two
    finite numbers, so NaN, inf or a missing score can never read as "not below".
    """
    if not thresholds:
        return Decision(INVALID, "no thresholds: the reference has no views")
    missing = sorted(set(thresholds) - set(scores))
    if missing:
        return Decision(INVALID, f"no score for view(s) {', '.join(missing)}")
    bad = [v for v in thresholds if not (_finite(scores[v]) and _finite(thresholds[v]))]
    if bad:
        shown = "; ".join(f"{v} score {scores[v]!r}, threshold {thresholds[v]!r}" for v in bad)
        return Decision(INVALID, f"not finite: {shown} (the weights cannot be scored)")
    if trunk is not None and trunk.status == MISSING:
        return Decision(INVALID, trunk.reason)
    below = tuple(v for v in thresholds if not (scores[v] >= thresholds[v]))
    detail = "; ".join(f"{v} score {scores[v]:.6g} < threshold {thresholds[v]:.6g}" for v in below)
    if trunk is not None and trunk.status == MODIFIED:
        return Decision(BLOCK, trunk.reason + (f"; anomalous weights: {detail}" if below else ""), below)
    if below:
        return Decision(BLOCK, f"anomalous weights: {detail}", below)
    note = f"; {trunk.reason}" if trunk is not None and trunk.status == NOT_CHECKED else ""
    return Decision(PASS, "every view at or above its threshold" + note)


def _finite(x) -> bool:
    """A real, finite number (bools and strings are not scores)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))
