"""One deployment's names, limits and trusted keys: the typed config every service room takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from components import keys
from components.registry import REFERENCE_EXPERIMENT
from detector.config import MAX_CHECKPOINT_BYTES
from detector.signing import key_id


@dataclass(frozen=True)
class GateConfig:
    """Names and limits of one deployment; defaults match the pipelines and manifests."""

    reference_model: str = "facenet-integrity-reference"
    reference_alias: str = "current"
    #: the reference's run lives in its own experiment, apart from candidates' runs, so that
    #: experiment permissions can hide its arrays from registrants (components/access.py)
    reference_experiment: str = REFERENCE_EXPERIMENT
    production_alias: str = "production"
    max_checkpoint_bytes: int = MAX_CHECKPOINT_BYTES
    report: bool = True
    #: refuse to gate without a verdict signing key; False is the explicit opt-out, recorded in
    #: every verdict it writes, and lets unsigned verdicts count for promotion (never in production)
    require_signature: bool = True
    #: refuse a reference not signed by one of ``reference_keys`` (or $BACKDOOR_GATE_REFERENCE_PUBLIC_KEYS)
    require_signed_reference: bool = True
    reference_keys: tuple = ()
    #: keys whose verdicts count (default $BACKDOOR_GATE_VERDICT_PUBLIC_KEYS plus the gate's own key)
    verdict_keys: tuple = ()
    #: (name, public key) of reviewers whose signed overrides count (default $BACKDOOR_GATE_REVIEWER_KEYS)
    reviewer_keys: tuple = ()

    def trusted_reference_keys(self) -> list:
        return list(self.reference_keys) or keys.public_keys_from_env(keys.REFERENCE_KEYS_ENV)

    def trusted_verdict_keys(self) -> list:
        return list(self.verdict_keys) or keys.verdict_keys_from_env()

    def trusted_reviewers(self) -> dict[str, tuple[str, Any]]:
        """key id -> (reviewer name, public key)."""
        if self.reviewer_keys:
            return {key_id(k): (n, k) for n, k in self.reviewer_keys}
        return keys.reviewer_keys_from_env()
