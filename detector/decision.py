"""The verdict, end to end: the one place a candidate is judged. Read this file to know why a
model was passed, blocked or refused.

**Vocabulary** (the same words from this library to the registry's ``integrity.verdict`` tag,
the signed verdict document, the CLI's JSON and the exit code):

=========  ====  ==================================================================
verdict    exit  when
=========  ====  ==================================================================
passed     0     every tensor finite, trunk identical to the recorded one, and every
                 deciding part scores at or above its threshold
blocked    1     the frozen trunk differs from the base network's, *or* a deciding
                 part scores strictly below its threshold, *or* the artifact changed
                 between scoring and promotion
invalid    2     the candidate cannot be judged: unreadable or malicious file, any
                 non-finite or oversized tensor, two readings of one file, missing
                 trunk tensors, another class list, a file the gate does not judge
error      2     the gate cannot judge (unreadable reference, a reference that
                 records no trunk, registry down, no signing key): the gate's fault,
                 never blamed on the candidate
=========  ====  ==================================================================

**Convention.** A part's score is *higher = more typical of clean networks* (the paper's
log-likelihood is the model for it; see :mod:`detector.protocol`). Combining parts with "any
below blocks" can only raise the false-rejection rate: the combined FRR is at most the sum of
the per-part FRRs; the reference records the combined rate on its calibration networks.

**Fail closed.** A part passes only when ``score >= threshold`` holds for two finite numbers,
so NaN, inf or a missing score never reads as "not below"; every exception a candidate can
cause is ``invalid``, every exception the reference can cause is ``error``.

Steps: :func:`judge` parses the candidate's bytes without unpickling, asks the reference to
check the trunk and score every part (``assess``), and applies :func:`decide`;
:func:`confirm_unchanged` is the last check before promotion; :func:`fault` is the verdict of a
gate that could not judge. The gate (:mod:`components.gate`) calls these and records what they
say; it writes no verdict of its own.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from detector.errors import DetectorError, InvalidCheckpoint
from detector.trunk import MISSING, MODIFIED, NOT_CHECKED, TrunkCheck

PASSED, BLOCKED, INVALID, ERROR = "passed", "blocked", "invalid", "error"
VERDICTS = (PASSED, BLOCKED, INVALID, ERROR)
EXIT_CODES = {PASSED: 0, BLOCKED: 1, INVALID: 2, ERROR: 2}


@dataclass(frozen=True)
class Decision:
    verdict: str  # one of VERDICTS
    reason: str
    below: tuple[str, ...] = ()


def decide(scores: Mapping[str, float], thresholds: Mapping[str, float], trunk: TrunkCheck | None = None) -> Decision:
    """The rule, applied to one network's per-part scores and its trunk check."""
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
    if trunk is not None and trunk.status == NOT_CHECKED:  # an unjudged trunk passes nothing
        return fault(trunk.reason)
    below = tuple(v for v in thresholds if not (scores[v] >= thresholds[v]))
    detail = "; ".join(f"{v} score {scores[v]:.6g} < threshold {thresholds[v]:.6g}" for v in below)
    if trunk is not None and trunk.status == MODIFIED:
        return Decision(BLOCKED, trunk.reason + (f"; anomalous weights: {detail}" if below else ""), below)
    if below:
        return Decision(BLOCKED, f"anomalous weights: {detail}", below)
    return Decision(PASSED, "every view at or above its threshold")


@dataclass(frozen=True)
class Judgement:
    """A decision and, when the candidate could be scored, the reference's full assessment."""

    decision: Decision
    assessment: Any = None  # detector.reference.Assessment


def judge(reference: Any, read_candidate: Callable[[], Any]) -> Judgement:
    """Judge one candidate with a loaded reference; never raises for a bad candidate.

    ``read_candidate`` returns the candidate's tensors (e.g. :func:`detector.weights.parse_tensors`
    over the downloaded bytes) or a path; it raises ``InvalidCheckpoint`` or ``ValueError`` for a
    file or artifact tree that cannot be judged. The reference's ``assess`` checks the trunk,
    scores every part and applies :func:`decide`.
    """
    try:
        assessment = reference.assess(read_candidate())
    except InvalidCheckpoint as e:
        return Judgement(Decision(INVALID, e.reason))
    except DetectorError as e:  # an unfitted or unreadable reference: not the candidate's fault
        return Judgement(fault(str(e)))
    except ValueError as e:  # extra files, no / several / oversized weight files
        return Judgement(Decision(INVALID, str(e)))
    return Judgement(assessment.decision, assessment)


def confirm_unchanged(decision: Decision, scored_sha256: str | None, current_sha256: str | None) -> Decision:
    """A pass holds only for the bytes that were scored: anything else registered since is blocked."""
    if decision.verdict == PASSED and current_sha256 != scored_sha256:
        return Decision(BLOCKED, "registered artifact changed after it was scored; re-run the gate")
    return decision


def fault(reason: str) -> Decision:
    """The gate could not judge or record (registry, reference, keys): verdict ``error``, the
    gate's fault and never the candidate's, so it exits 2 and is never promotable."""
    return Decision(ERROR, f"gate error: {reason}")


def _finite(x: Any) -> bool:
    """A real, finite number (bools and strings are not scores)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))
