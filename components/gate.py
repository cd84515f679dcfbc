"""The promotion gate: score a registered FaceNet version and record what the verdict says.

The verdict itself (trunk check, scores, thresholds, every fail-closed case, the words
passed/blocked/invalid/error and their exit codes) is made in one place,
:mod:`detector.decision`; this file never decides, it records:

1. mark the version ``integrity.verdict=pending`` (a crash never leaves a stale ``passed``);
2. load the ``current`` reference, signed and digest-checked (:mod:`components.reference_store`);
3. :func:`detector.decision.judge` over a reader that downloads the version's artifact tree,
   hashes the weight file and parses it without unpickling; write the evidence tags and the report;
4. only for a pass: download again, :func:`detector.decision.confirm_unchanged`;
5. write the verdict document (signed with the Ed25519 key from a Secret when one is set) to the
   run, its digest and signer into the tags, and the verdict tag last;
6. a pass points ``production`` at the newest promotable version (:func:`components.policy.promote`);
   anything else never puts the alias on the version and takes it back if someone else did.

A gate fault (registry, unreadable or unsigned reference, no signing key, a failure while
recording) goes through one path, :func:`_fault`: the verdict is ``error`` (decided by
:func:`detector.decision.fault`) exactly when the gate failed, no verdict document is written,
and the alias is guarded. Exit codes: 0 passed, 1 blocked, 2 invalid or gate error.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components import keys
from components.config import GateConfig
from components.policy import enforce_alias, now, promote
from components.reference_store import fetch_reference
from components.registry import MlflowRegistry, Registry, RegistryError, VersionInfo
from components.tags import (
    ARTIFACT_SHA,
    CHECKED_AT,
    DETECTOR,
    DSSE_FILE,
    GATE,
    MODEL_SHA,
    PENDING,
    PROMOTED,
    PROMOTED_VERDICT,
    REASON,
    REFERENCE_SHA,
    REFERENCE_VERSION,
    REPORT,
    SIGNED_BY,
    SUSPECTED_CLASS,
    TRUNK,
    VERDICT,
    VERDICT_DOC,
    VERDICT_FILE,
    VERDICT_SHA,
    evidence_tag,
    evidence_threshold_tag,
    score_tag,
    threshold_tag,
)
from detector import __version__ as GATE_VERSION
from detector.decision import BLOCKED, ERROR, EXIT_CODES, INVALID, PASSED, Decision, confirm_unchanged, fault, judge
from detector.evidence import Evidence
from detector.reference import Assessment, Reference
from detector.signing import VerdictError, dsse_sign, intoto_statement
from detector.signing import document as verdict_document
from detector.signing import sign as sign_verdict
from detector.signing import unsigned as unsigned_verdict
from detector.weights import parse_tensors


@dataclass
class GateResult:
    model: str
    version: str
    verdict: str = ERROR  # until decision.judge says otherwise: a gate that stops early has failed
    reason: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    model_sha256: str | None = None
    artifact_sha256: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # every file of the artifact tree -> sha256
    reference_sha256: str | None = None
    promoted: bool = False
    report_uri: str | None = None
    verdict_sha256: str | None = None
    signed_by: str | None = None
    detector: str | None = None
    suspected_class: str | None = None
    evidence_scores: dict[str, float] = field(default_factory=dict)

    def record(self, decision: Decision) -> None:
        """Take the verdict and its reason from a decision: the only way a verdict is set."""
        self.verdict, self.reason = decision.verdict, decision.reason

    @property
    def error(self) -> bool:
        """The gate itself failed (registry, reference, keys, recording): never the candidate's fault."""
        return self.verdict == ERROR

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "error": self.error, "exit_code": self.exit_code}


def gate(
    model: str,
    version: str | int,
    *,
    registry: Registry | None = None,
    reference: Reference | None = None,
    config: GateConfig = GateConfig(),
    signing_key: Any = None,
) -> GateResult:
    """Gate one registered version. Never raises for a bad candidate or a registry fault.

    ``signing_key`` (Ed25519) signs the verdict document; by default it comes from the
    environment (:func:`components.keys.signing_key_from_env`).
    """
    result = GateResult(model=model, version=str(version))
    try:
        signing_key = _signing_key(signing_key, config)
        registry = registry or MlflowRegistry()
        info = registry.version(model, result.version)
        registry.set_tags(model, result.version, {VERDICT: PENDING, CHECKED_AT: now(), GATE: GATE_VERSION})
    except Exception as e:  # noqa: BLE001 — a misconfigured gate or a registry it cannot write: touch nothing
        return _fault(result, fault(str(e)))
    try:
        return _gate(registry, info, result, reference, config, signing_key)
    except Exception as e:  # noqa: BLE001 — whatever was raised, the gate failed: never a pass
        return _fault(result, fault(f"{e.__class__.__name__}: {e}"), registry, info, config)


def _signing_key(signing_key: Any, config: GateConfig) -> Any:
    if signing_key is None:
        signing_key = keys.signing_key_from_env()
    if signing_key is None and config.require_signature:
        raise VerdictError(f"no signing key: set {keys.KEY_ENV} or {keys.KEY_FILE_ENV} (require_signature is on)")
    return signing_key


def _gate(
    registry: Registry,
    info: VersionInfo,
    result: GateResult,
    reference: Reference | None,
    config: GateConfig,
    signing_key: Any,
) -> GateResult:
    """Steps 2-6 of the module docstring; any exception is the caller's gate fault."""
    tags: dict[str, Any] = {REFERENCE_VERSION: "local"}
    if reference is None:
        reference, ref_info = fetch_reference(registry, config)
        tags[REFERENCE_VERSION] = ref_info.version
    result.reference_sha256 = tags[REFERENCE_SHA] = reference.artifact_sha256_
    result.thresholds = dict(reference.thresholds_)

    judgement = judge(reference, lambda: _read_candidate(registry, info, result, tags, config))
    if judgement.decision.verdict == ERROR:
        return _fault(result, judgement.decision, registry, info, config)
    result.record(judgement.decision)
    if judgement.assessment is not None:
        _record_assessment(registry, info, reference, judgement.assessment, result, tags, config)
    if result.verdict == PASSED:
        again = registry.download_artifact(info, config.max_checkpoint_bytes)
        result.record(confirm_unchanged(judgement.decision, result.artifact_sha256, again.sha256))

    _record_verdict(registry, info, result, tags, signing_key, config)
    registry.set_tags(info.name, info.version, {**tags, REASON: result.reason[:5000]})
    registry.set_tags(info.name, info.version, {VERDICT: result.verdict})  # the verdict is written last
    if result.verdict == PASSED:
        # a signed pass is stored now: if promoting fails, a rerun or the reconciler finishes it
        result.promoted = promote(registry, info.name, info.version, config)
        promoted = {PROMOTED: str(result.promoted).lower()}
        if result.promoted and result.verdict_sha256:
            promoted[PROMOTED_VERDICT] = result.verdict_sha256
        registry.set_tags(info.name, info.version, promoted)
    else:
        enforce_alias(registry, info.name, info.version, config)
    return result


def _read_candidate(
    registry: Registry, info: VersionInfo, result: GateResult, tags: dict[str, Any], config: GateConfig
) -> Any:
    """The version's tensors, parsed from the bytes that were hashed (ValueError: over the size
    limit, extra files, no or several weight files; InvalidCheckpoint: an unreadable file)."""
    artifact = registry.download_artifact(info, config.max_checkpoint_bytes)
    result.artifact_sha256, result.files = artifact.sha256, artifact.digests
    tags[ARTIFACT_SHA] = result.artifact_sha256
    filename, data = artifact.weight_file()
    result.model_sha256 = tags[MODEL_SHA] = hashlib.sha256(data).hexdigest()
    return parse_tensors(data, f"{info.name} v{info.version}/{filename}", result.model_sha256)


def _record_assessment(
    registry: Registry,
    info: VersionInfo,
    reference: Reference,
    assessment: Assessment,
    result: GateResult,
    tags: dict[str, Any],
    config: GateConfig,
) -> None:
    """What the reference saw, as tags a reviewer can filter on and a report to look at."""
    result.scores = assessment.scores
    tags[TRUNK] = assessment.trunk.status
    result.detector = tags[DETECTOR] = reference.detector
    for v in result.scores:
        tags[score_tag(v)] = repr(result.scores[v])
        tags[threshold_tag(v)] = repr(result.thresholds[v])
    evidence = assessment.evidence
    result.evidence_scores = dict(evidence.scores)
    for v, sc in result.evidence_scores.items():
        tags[evidence_tag(v)] = repr(sc)
        tags[evidence_threshold_tag(v)] = repr(evidence.thresholds[v])
    if result.verdict == BLOCKED and evidence.suspect is not None:
        result.suspected_class = tags[SUSPECTED_CLASS] = evidence.suspect.suspected_class
    if config.report and result.verdict != INVALID:
        result.report_uri = _report(registry, info, reference, assessment.vector_scores, result, tags, evidence)


def _fault(
    result: GateResult,
    decision: Decision,
    registry: Registry | None = None,
    info: VersionInfo | None = None,
    config: GateConfig = GateConfig(),
) -> GateResult:
    """The gate could not judge or record: say so, blame nothing on the candidate.

    The one path of every gate fault; ``decision`` is an ``error`` made by
    :func:`detector.decision.fault` (here, or inside ``judge``). No verdict document is written;
    once the version is known, the tags say ``error`` and why, and ``production`` is still guarded: a version without a
    signed pass never keeps it (a signed pass already stored keeps its promotion).
    """
    result.record(decision)
    result.promoted, result.scores = False, {}
    if registry is None or info is None:
        return result  # nothing could be written; the alias was not touched
    try:
        registry.set_tags(info.name, info.version, {REASON: result.reason[:5000]})
        registry.set_tags(info.name, info.version, {VERDICT: ERROR})
        enforce_alias(registry, info.name, info.version, config)
    except Exception as e:  # noqa: BLE001 — already failing closed; say what else went wrong
        result.reason = f"{result.reason}; and while guarding the alias: {e}"
    return result


def _record_verdict(
    registry: Registry,
    info: VersionInfo,
    result: GateResult,
    tags: dict,
    signing_key,
    config: GateConfig = GateConfig(),
) -> None:
    """Write the verdict document (signed when there is a key) to the version's run.

    Called once the verdict is final; its digest goes into the tags the same call writes, so a
    reviewer can check tags, document and signature against each other.
    """
    doc = verdict_document(
        model=result.model,
        version=result.version,
        model_sha256=result.model_sha256,
        reference_sha256=result.reference_sha256,
        verdict=result.verdict,
        reason=result.reason,
        scores=result.scores,
        thresholds=result.thresholds,
        trunk=tags.get(TRUNK),
        gate_version=GATE_VERSION,
        run_id=info.run_id,
        checked_at=now(),
        detector=result.detector,
        suspected_class=result.suspected_class,
        evidence_scores=result.evidence_scores,
        artifact_sha256=result.artifact_sha256,
        files=result.files or None,
        signature_policy="required" if config.require_signature else "opted-out",
    )
    envelope = sign_verdict(doc, signing_key) if signing_key is not None else unsigned_verdict(doc)
    result.verdict_sha256, result.signed_by = envelope["sha256"], envelope["key_id"] or "unsigned"
    tags.update({VERDICT_SHA: result.verdict_sha256, SIGNED_BY: result.signed_by})
    if not info.run_id:
        tags[VERDICT_DOC] = "not attached: the version has no run"
        return
    with tempfile.TemporaryDirectory(prefix="backdoor-gate-verdict-") as tmp:
        (Path(tmp) / VERDICT_FILE).write_text(json.dumps(envelope, indent=2, sort_keys=True) + "\n")
        if signing_key is not None and doc.get("files") and result.verdict == PASSED:
            # the same pass as in-toto in DSSE, for admission controllers; only a pass is attested,
            # so a policy that checks the signature alone cannot admit a blocked model
            dsse = dsse_sign(intoto_statement(doc), signing_key)
            (Path(tmp) / DSSE_FILE).write_text(json.dumps(dsse, indent=2, sort_keys=True) + "\n")
        uri = registry.log_artifacts_to_run(info.run_id, tmp, f"integrity/v{info.version}")
    tags[VERDICT_DOC] = f"{uri}/{VERDICT_FILE}"


def _report(
    registry: Registry,
    info: VersionInfo,
    reference: Reference,
    vector_scores: dict,
    result: GateResult,
    tags: dict[str, Any],
    evidence: Evidence | None = None,
) -> str | None:
    """Render the review report and attach it to the version's run; failures are recorded, not fatal."""
    from components.report import write_report

    if not info.run_id:
        tags[REPORT] = "not attached: the version has no run"
        return None
    try:
        with tempfile.TemporaryDirectory(prefix="backdoor-gate-report-") as tmp:
            write_report(Path(tmp), reference, vector_scores, result, evidence)
            uri = registry.log_artifacts_to_run(info.run_id, tmp, f"integrity/v{info.version}")
        tags[REPORT] = f"{uri}/report.html"
        return tags[REPORT]
    except (RegistryError, OSError, ValueError) as e:
        tags[REPORT] = f"failed: {e}"[:500]
        return None
