"""The names the gate writes into the registry: tags on a version, files on its run.

Tags are for people and for filtering (an EDIT-holder can write them too): nothing here decides a
promotion; :mod:`components.policy` decides from the signed documents named by these files.
"""

PREFIX = "integrity."
VERDICT = PREFIX + "verdict"
REASON = PREFIX + "reason"
MODEL_SHA = PREFIX + "model_sha256"
REFERENCE_SHA = PREFIX + "reference_sha256"
REFERENCE_VERSION = PREFIX + "reference_version"
GATE = PREFIX + "gate_version"
CHECKED_AT = PREFIX + "checked_at"
REPORT = PREFIX + "report"
PROMOTED = PREFIX + "promoted"
TRUNK = PREFIX + "trunk"  # ok | modified | not-checked
OVERRIDE_BY = PREFIX + "override.by"
OVERRIDE_REASON = PREFIX + "override.reason"
OVERRIDE_AT = PREFIX + "override.at"
VERDICT_SHA = PREFIX + "verdict_sha256"  # digest of the (signed) verdict document
VERDICT_DOC = PREFIX + "verdict_document"  # where the document is: the run's artifacts
SIGNED_BY = PREFIX + "signed_by"  # key id of the signing key, or "unsigned"
PROMOTED_VERDICT = PREFIX + "promoted_verdict_sha256"
ALIAS_VIOLATION = PREFIX + "alias_violation"
DETECTOR = PREFIX + "detector"  # the rule that decided: fusion, classifier, gmm …
SUSPECTED_CLASS = PREFIX + "suspected_class"  # the identity a blocked model would let an impostor into
ARTIFACT_SHA = PREFIX + "artifact_sha256"  # digest of the version's whole artifact tree
REGISTERED_BY = "registered_by"
#: Registry state before a verdict is written (the verdicts themselves: detector/decision.py).
PENDING = "pending"
VERDICT_FILE, OVERRIDE_FILE, DSSE_FILE = "verdict.json", "override.json", "verdict.intoto.dsse.json"


def score_tag(view: str) -> str:
    return f"{PREFIX}score.{view}"


def threshold_tag(view: str) -> str:
    return f"{PREFIX}threshold.{view}"


def evidence_tag(part: str) -> str:
    """Scores that are recorded but do not decide (the paper's GMM beside the default detector)."""
    return f"{PREFIX}evidence.score.{part}"


def evidence_threshold_tag(part: str) -> str:
    return f"{PREFIX}evidence.threshold.{part}"


#: what ``explain`` adds to a blocked version (components/explain.py)
EXPLAIN_TRIGGER = PREFIX + "explain.trigger"
EXPLAIN_ANOMALY = PREFIX + "explain.anomaly_index"
EXPLAIN_ASR = PREFIX + "explain.reconstructed_asr"
