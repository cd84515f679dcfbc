"""What a reference says beside the verdict: typed, so the gate, the report and the CLI read
fields, not dictionary keys that a detector may or may not have written."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Suspect:
    """The class a backdoor would let an impostor into, and how far its row deviates.

    z-scores are robust (median / MAD over the clean networks' rows for that class): higher =
    more deviant. ``suspected_impostor`` is named only when a second class is anomalous too.
    """

    suspected_class: str
    suspected_index: int
    suspected_z: float
    median_z: float
    runner_up_z: float | None = None
    suspected_impostor: str | None = None
    #: the head's network-level deviation (its offset entry), where the detector has one
    network_z: float | None = None


@dataclass(frozen=True)
class Evidence:
    """Per-candidate extras: the suspect (detectors that name classes) and the scores of parts
    that are recorded but do not decide (the paper's GMM beside the default detector)."""

    suspect: Suspect | None = None
    #: evidence part -> score (higher = more typical, as every part's), threshold, passed/blocked
    scores: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    verdicts: dict[str, str] = field(default_factory=dict)

    def with_suspect(self, suspect: Suspect | None) -> Evidence:
        return self if suspect is None else replace(self, suspect=suspect)

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON form (``score --json``, the report): the suspect's fields at the top."""
        out: dict[str, Any] = asdict(self.suspect) if self.suspect is not None else {}
        if self.scores:
            out.update(evidence_scores=dict(self.scores), evidence_thresholds=dict(self.thresholds))
            out["evidence_verdicts"] = dict(self.verdicts)
        return out
