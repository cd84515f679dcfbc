"""The promotion gate: score a registered FaceNet version and decide whether it may ship.

Read this file top to bottom to know what the gate does. The rule itself (score convention,
block if any view is below its threshold) is :func:`detector.scoring.decide`; this file adds
the registry protocol around it:

1. mark the version ``integrity.verdict=pending`` (a crash never leaves a stale ``passed``);
2. load the ``current`` reference from MLflow (its digest is verified on load);
3. download the version's weight file, hash the bytes, parse them without unpickling;
4. check the frozen trunk against the base, score every view, decide
   (:meth:`detector.reference.Reference.assess`), write the evidence tags, render the report;
5. only for a pass: download again and check the digest is still the scored one;
6. write the verdict document (signed with the Ed25519 key from a Secret when one is set,
   :mod:`detector.verdict`) to the run, and its digest and signer into the tags;
7. a pass writes ``integrity.verdict=passed``, then points ``production`` at the newest passed
   version (highest version number; re-derived from the tags, so concurrent gates converge)
   and records the promoted verdict's digest;
8. anything else writes ``blocked`` or ``invalid`` (verdict always last) and never puts the
   alias on the version; if someone else had put ``production`` on it, the alias goes back to
   the newest passed version (or is deleted) and ``integrity.alias_violation`` says so.
   Any error fails closed: the alias stays where it was, the version is marked ``blocked``
   when the registry still answers, and the exit code is 2.

Exit codes: 0 passed, 1 blocked, 2 invalid or gate error.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.registry import REFERENCE_DIR, Registry, RegistryError, VersionInfo
from detector import __version__ as GATE_VERSION
from detector.errors import DetectorError, InvalidCheckpoint, InvalidReference
from detector.reference import Reference
from detector.scoring import PASS
from detector.verdict import KEY_ENV, KEY_FILE_ENV, VerdictError, signing_key_from_env
from detector.verdict import document as verdict_document
from detector.verdict import sign as sign_verdict
from detector.verdict import unsigned as unsigned_verdict
from detector.weights import parse_tensors

# -- the registry vocabulary (the only place that knows these names) ----------------------
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
REGISTERED_BY = "registered_by"
PASSED, BLOCKED, INVALID, PENDING = "passed", "blocked", "invalid", "pending"
EXIT_CODES = {PASSED: 0, BLOCKED: 1, INVALID: 2}


def score_tag(view: str) -> str:
    return f"{PREFIX}score.{view}"


def threshold_tag(view: str) -> str:
    return f"{PREFIX}threshold.{view}"


def evidence_tag(part: str) -> str:
    """Scores that are recorded but do not decide (the paper's GMM beside the default detector)."""
    return f"{PREFIX}evidence.score.{part}"


def evidence_threshold_tag(part: str) -> str:
    return f"{PREFIX}evidence.threshold.{part}"


@dataclass(frozen=True)
class GateConfig:
    """Names and limits of one deployment; defaults match the pipelines and manifests."""

    reference_model: str = "facenet-integrity-reference"
    reference_alias: str = "current"
    production_alias: str = "production"
    max_checkpoint_bytes: int = 4 * 1024**3
    report: bool = True
    #: refuse to gate without a signing key (set in production; see detector.verdict)
    require_signature: bool = False


@dataclass
class GateResult:
    model: str
    version: str
    verdict: str = BLOCKED
    reason: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    model_sha256: str | None = None
    reference_sha256: str | None = None
    promoted: bool = False
    error: bool = False  # the gate itself failed (registry, reference): exit 2 whatever the verdict
    report_uri: str | None = None
    verdict_sha256: str | None = None
    signed_by: str | None = None
    detector: str | None = None
    suspected_class: str | None = None
    evidence_scores: dict[str, float] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 2 if self.error else EXIT_CODES[self.verdict]

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["exit_code"] = self.exit_code
        return d


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- the reference ---------------------------------------------------------------------------
def publish_reference(registry: Registry, ref_dir: str | Path, config: GateConfig = GateConfig()) -> VersionInfo:
    """Register a reference artifact directory and point the ``current`` alias at it."""
    ref = Reference.load(ref_dir)  # refuses a tampered artifact before it can be published
    files = {p.relative_to(ref_dir).as_posix(): p for p in sorted(Path(ref_dir).rglob("*")) if p.is_file()}
    info = registry.register(
        config.reference_model,
        files,
        artifact_dir=REFERENCE_DIR,
        run_name="reference",
        params={"layer": ref.config.layer, "n_reference": ref.n_reference_, "threshold_source": ref.threshold_source_},
        tags={REFERENCE_SHA: ref.artifact_sha256_},
    )
    registry.set_alias(config.reference_model, config.reference_alias, info.version)
    return info


def fetch_reference(registry: Registry, config: GateConfig = GateConfig()) -> tuple[Reference, VersionInfo]:
    info = registry.version_by_alias(config.reference_model, config.reference_alias)
    if info is None:
        raise InvalidReference(
            f"{config.reference_model}@{config.reference_alias}", "no such alias; run the reference pipeline first"
        )
    with tempfile.TemporaryDirectory(prefix="backdoor-gate-ref-") as tmp:
        root = registry.download(info.source, tmp)
        return Reference.load(root), info


# -- the gate ----------------------------------------------------------------------------------
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
    environment (:func:`detector.verdict.signing_key_from_env`).
    """
    version = str(version)
    result = GateResult(model=model, version=version)
    try:
        if signing_key is None:
            signing_key = signing_key_from_env()
        if signing_key is None and config.require_signature:
            raise VerdictError(f"no signing key: set {KEY_ENV} or {KEY_FILE_ENV} (require_signature is on)")
    except (VerdictError, OSError) as e:
        result.error, result.reason = True, f"gate error: {e}"
        return result  # a misconfigured gate judges nothing and touches nothing
    try:
        registry = registry or Registry()
        info = registry.version(model, version)
        registry.set_tags(model, version, {VERDICT: PENDING, CHECKED_AT: _now(), GATE: GATE_VERSION})
    except RegistryError as e:
        result.error, result.reason = True, f"gate error: {e}"
        return result  # nothing could be written; the alias was not touched

    tags: dict[str, Any] = {}
    try:
        ref_version = "local"
        if reference is None:
            reference, ref_info = fetch_reference(registry, config)
            ref_version = ref_info.version
        result.reference_sha256 = reference.artifact_sha256_
        tags.update({REFERENCE_SHA: reference.artifact_sha256_, REFERENCE_VERSION: ref_version})
        result.thresholds = dict(reference.thresholds_)

        data, filename = registry.download_weights(info, config.max_checkpoint_bytes)
        result.model_sha256 = hashlib.sha256(data).hexdigest()
        tags[MODEL_SHA] = result.model_sha256
        assessment = reference.assess(parse_tensors(data, f"{model} v{version}/{filename}", result.model_sha256))
        vector_scores = assessment.vector_scores
        result.scores = assessment.scores
        tags[TRUNK] = assessment.trunk.status
        result.verdict = PASSED if assessment.decision.verdict == PASS else BLOCKED
        result.reason = assessment.decision.reason
        result.detector = getattr(reference, "name", reference.detector)
        tags[DETECTOR] = result.detector
        for v in result.scores:
            tags[score_tag(v)] = repr(result.scores[v])
            tags[threshold_tag(v)] = repr(result.thresholds[v])
        evidence = assessment.evidence
        result.evidence_scores = dict(evidence.get("evidence_scores", {}))
        for v, sc in result.evidence_scores.items():
            tags[evidence_tag(v)] = repr(sc)
            tags[evidence_threshold_tag(v)] = repr(evidence["evidence_thresholds"][v])
        if result.verdict == BLOCKED and evidence.get("suspected_class") is not None:
            result.suspected_class = str(evidence["suspected_class"])
            tags[SUSPECTED_CLASS] = result.suspected_class
        if config.report:
            result.report_uri = _report(registry, info, reference, vector_scores, result, tags, evidence)
    except InvalidCheckpoint as e:
        result.verdict, result.reason = INVALID, e.reason
    except ValueError as e:  # no / ambiguous / oversized weight file in the registered artifacts
        result.verdict, result.reason = INVALID, str(e)
    except (RegistryError, DetectorError) as e:
        result.verdict, result.error, result.reason = BLOCKED, True, f"gate error: {e}"

    try:
        if result.verdict == PASSED:
            again, _ = registry.download_weights(info, config.max_checkpoint_bytes)
            if hashlib.sha256(again).hexdigest() != result.model_sha256:
                result.verdict, result.reason = BLOCKED, "registered artifact changed after it was scored; re-run the gate"
        _record_verdict(registry, info, result, tags, signing_key)
        registry.set_tags(model, version, {**tags, REASON: result.reason[:5000]})
        registry.set_tags(model, version, {VERDICT: result.verdict})  # the verdict is written last
        if result.verdict == PASSED:
            result.promoted = _promote(registry, model, version, config)
            promoted = {PROMOTED: str(result.promoted).lower()}
            if result.promoted:
                promoted[PROMOTED_VERDICT] = result.verdict_sha256
            registry.set_tags(model, version, promoted)
        else:
            _enforce_alias(registry, model, version, config)
    except RegistryError as e:
        result.error, result.promoted = True, False
        result.reason = f"{result.reason}; gate error while recording: {e}"
        if result.verdict == PASSED:
            result.verdict = BLOCKED
    return result


def _record_verdict(registry: Registry, info: VersionInfo, result: GateResult, tags: dict, signing_key) -> None:
    """Write the verdict document (signed when there is a key) to the version's run.

    Called once the verdict is final; its digest goes into the tags the same call writes, so a
    reviewer can check tags, document and signature against each other.
    """
    doc = verdict_document(
        model=result.model, version=result.version, model_sha256=result.model_sha256, reference_sha256=result.reference_sha256,
        verdict=result.verdict, reason=result.reason, scores=result.scores, thresholds=result.thresholds,
        trunk=tags.get(TRUNK), gate_version=GATE_VERSION, run_id=info.run_id, checked_at=_now(),
        detector=result.detector, suspected_class=result.suspected_class, evidence_scores=result.evidence_scores,
    )
    envelope = sign_verdict(doc, signing_key) if signing_key is not None else unsigned_verdict(doc)
    result.verdict_sha256, result.signed_by = envelope["sha256"], envelope["key_id"] or "unsigned"
    tags.update({VERDICT_SHA: result.verdict_sha256, SIGNED_BY: result.signed_by})
    if not info.run_id:
        tags[VERDICT_DOC] = "not attached: the version has no run"
        return
    with tempfile.TemporaryDirectory(prefix="backdoor-gate-verdict-") as tmp:
        (Path(tmp) / "verdict.json").write_text(json.dumps(envelope, indent=2, sort_keys=True) + "\n")
        uri = registry.log_artifacts_to_run(info.run_id, tmp, f"integrity/v{info.version}")
    tags[VERDICT_DOC] = f"{uri}/verdict.json"


def _enforce_alias(registry: Registry, model: str, version: str, config: GateConfig) -> None:
    """A ``production`` alias on a version that did not pass (and was not overridden) is removed.

    Rule: only the gate (a pass) or a recorded override may put ``production`` on a version.
    If someone set it on this version before the gate ran, the gate moves it back to the
    newest passed version (or deletes it when there is none) and records the violation.
    """
    current = registry.version_by_alias(model, config.production_alias)
    if current is None or current.version != version or current.tags.get(OVERRIDE_BY):
        return
    _take_back(registry, model, current, config)


def guard_alias(model: str, *, registry: Registry | None = None, config: GateConfig = GateConfig()) -> str | None:
    """Check where ``production`` points now; take it back if that version has no pass or override.

    MLflow lets anyone who can register versions also move aliases, so the webhook receiver
    calls this on every ``model_version_alias.created`` event. Returns the violation, if any.
    """
    registry = registry or Registry()
    current = registry.version_by_alias(model, config.production_alias)
    if current is None or current.tags.get(VERDICT) == PASSED or current.tags.get(OVERRIDE_BY):
        return None
    return _take_back(registry, model, current, config)


def _take_back(registry: Registry, model: str, current: VersionInfo, config: GateConfig) -> str:
    version = current.version
    passed = [v for v in registry.search(f"name='{model}' and tags.`{VERDICT}`='{PASSED}'") if v.version != version]
    newest = max(passed, key=lambda v: int(v.version), default=None)
    if newest is None:
        registry.delete_alias(model, config.production_alias)
        where = "alias deleted (no passed version)"
    else:
        registry.set_alias(model, config.production_alias, newest.version)
        where = f"alias moved back to v{newest.version}"
    message = f"'{config.production_alias}' was set on this version without a pass or an override; {where} at {_now()}"
    registry.set_tags(model, version, {ALIAS_VIOLATION: message})
    return message


def _promote(registry: Registry, model: str, version: str, config: GateConfig) -> bool:
    """Point ``production`` at the newest passed version; True if that is ``version``.

    Rule: production = the highest version number whose verdict is ``passed``. Every gate
    re-derives it from the verdict tags *after* writing its own verdict, so concurrent gates
    converge: whichever finishes last sees every verdict written before it.
    """
    passed = registry.search(f"name='{model}' and tags.`{VERDICT}`='{PASSED}'")
    newest = max((v for v in passed), key=lambda v: int(v.version), default=None)
    if newest is None or int(newest.version) < int(version):  # search lag: trust our own write
        newest_version = version
    else:
        newest_version = newest.version
    current = registry.version_by_alias(model, config.production_alias)
    if current is None or current.version != newest_version:
        if current is not None and int(current.version) > int(newest_version) and current.tags.get(OVERRIDE_BY):
            return False  # a reviewer's override of a newer version stands
        registry.set_alias(model, config.production_alias, newest_version)
    return newest_version == version


def _report(registry: Registry, info: VersionInfo, reference: Reference, vector_scores, result: GateResult, tags, evidence=None) -> str | None:
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


# -- checking a verdict later ---------------------------------------------------------------------
def verify_version(model: str, version: str | int, public_key, *, registry: Registry | None = None,
                   config: GateConfig = GateConfig()) -> dict[str, Any]:
    """Check a gated version end to end: signature, tags against the document, bytes against both.

    Raises :class:`detector.verdict.VerdictError` naming the first thing that does not hold.
    """
    from detector.verdict import read_envelope, verify

    registry = registry or Registry()
    info = registry.version(model, str(version))
    where = info.tags.get(VERDICT_DOC, "")
    if "/" not in where:
        raise VerdictError(f"{model} v{version} has no verdict document ({where or 'never gated'})")
    with tempfile.TemporaryDirectory(prefix="backdoor-gate-verify-") as tmp:
        envelope = read_envelope(registry.download(where, tmp))
    data, _ = registry.download_weights(info, config.max_checkpoint_bytes)
    doc = verify(envelope, public_key, model_bytes=data)
    if (doc["model"], str(doc["version"])) != (model, str(version)):
        raise VerdictError(f"the document judges {doc['model']} v{doc['version']}, not {model} v{version}")
    if info.tags.get(VERDICT_SHA) != envelope["sha256"] or info.tags.get(VERDICT) != doc["verdict"]:
        raise VerdictError("the version's tags disagree with its signed verdict (tags were edited after the gate ran)")
    return doc


# -- human override ----------------------------------------------------------------------------


class OverrideRefused(RuntimeError):
    pass


def override(
    model: str,
    version: str | int,
    *,
    reason: str,
    identity: str,
    registry: Registry | None = None,
    config: GateConfig = GateConfig(),
) -> VersionInfo:
    """Promote a *blocked* version on a reviewer's word, recording who, why and when.

    The gate's verdict tag stays ``blocked`` (the evidence is not rewritten). Refused for a
    version that is not blocked (``invalid`` files are unsafe or unreadable and cannot be
    promoted), without a reason, by the identity that registered it, or when the artifact
    no longer has the digest the gate scored.
    """
    registry = registry or Registry()
    version = str(version)
    info = registry.version(model, version)
    if not reason.strip():
        raise OverrideRefused("an override needs a reason (--reason)")
    verdict = info.tags.get(VERDICT)
    if verdict != BLOCKED:
        raise OverrideRefused(f"{model} v{version} has verdict {verdict!r}; only a blocked version can be overridden")
    registrant = info.user_id or info.tags.get(REGISTERED_BY)
    if not identity or identity == registrant:
        raise OverrideRefused(f"identity {identity!r} registered {model} v{version}; a different reviewer must override")
    data, _ = registry.download_weights(info, config.max_checkpoint_bytes)
    if hashlib.sha256(data).hexdigest() != info.tags.get(MODEL_SHA):
        raise OverrideRefused("the registered artifact no longer has the digest the gate scored; re-run the gate")
    registry.set_tags(model, version, {OVERRIDE_BY: identity, OVERRIDE_REASON: reason[:5000], OVERRIDE_AT: _now()})
    registry.set_alias(model, config.production_alias, version)
    registry.set_tags(model, version, {PROMOTED: "override"})
    return registry.version(model, version)
