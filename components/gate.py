"""The promotion gate: score a registered FaceNet version and decide whether it may ship.

Read this file top to bottom to know what the gate does. The verdict itself (trunk check,
scores, thresholds, every fail-closed case, the words passed/blocked/invalid/error and their
exit codes) is made in one place, :mod:`detector.decision`; this file records it in the
registry and guards the ``production`` alias:

1. mark the version ``integrity.verdict=pending`` (a crash never leaves a stale ``passed``);
2. load the ``current`` reference from MLflow (its digest is verified on load);
3. download the version's weight file, hash the bytes, parse them without unpickling;
4. :func:`detector.decision.judge`: check the frozen trunk against the base, score every part,
   decide; then write the evidence tags and render the report;
5. only for a pass: download again, :func:`detector.decision.confirm_unchanged`;
6. write the verdict document (signed with the Ed25519 key from a Secret when one is set,
   :mod:`detector.verdict`) to the run, and its digest and signer into the tags;
7. a pass writes ``integrity.verdict=passed``, then points ``production`` at the newest passed
   version (highest version number; re-derived from the tags, so concurrent gates converge)
   and records the promoted verdict's digest;
8. anything else writes ``blocked`` or ``invalid`` (verdict always last) and never puts the
   alias on the version; if someone else had put ``production`` on it, the alias goes back to
   the newest promotable version (or is deleted) and ``integrity.alias_violation`` says so.
   A gate fault (registry, unreadable or unsigned reference, a reference with no recorded
   trunk, no signing key) is the gate's, not the candidate's: verdict ``error`` in every output
   (tag, result, exit 2), no verdict document, and the alias is guarded.

**Production is a function of signed state** (:func:`production_status`): a version may be
``production`` only with a verdict document signed by a trusted gate key that says ``passed``
for the exact artifact tree now registered, or a ``blocked`` one plus an override signed by a
trusted reviewer key whose reviewer did not register the version. Tags mirror these records
for people and filter candidates; they never make a version promotable.

**Deploy from verified bytes** (:func:`fetch_deployable`): MLflow lets a registrant overwrite
their own run's artifacts after a pass, and no event fires; so what a deployment loads is
downloaded once, hashed, checked against the signed records, and only then handed over.

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

from components.registry import REFERENCE_DIR, REFERENCE_EXPERIMENT, Registry, RegistryError, VersionInfo
from detector import __version__ as GATE_VERSION
from detector import verdict as V
from detector.decision import BLOCKED, ERROR, EXIT_CODES, INVALID, PASSED, Decision, Judgement, confirm_unchanged, judge
from detector.detectors import load_reference
from detector.errors import InvalidReference
from detector.reference import Reference
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


@dataclass(frozen=True)
class GateConfig:
    """Names and limits of one deployment; defaults match the pipelines and manifests."""

    reference_model: str = "facenet-integrity-reference"
    reference_alias: str = "current"
    #: the reference's run lives in its own experiment, apart from candidates' runs, so that
    #: experiment permissions can hide its arrays from registrants (components/access.py)
    reference_experiment: str = REFERENCE_EXPERIMENT
    production_alias: str = "production"
    max_checkpoint_bytes: int = 4 * 1024**3
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
        return list(self.reference_keys) or V.public_keys_from_env(V.REFERENCE_KEYS_ENV)

    def trusted_verdict_keys(self) -> list:
        return list(self.verdict_keys) or V.verdict_keys_from_env()

    def trusted_reviewers(self) -> dict:
        """key id -> (reviewer name, public key)."""
        if self.reviewer_keys:
            return {V.key_id(k): (n, k) for n, k in self.reviewer_keys}
        return V.reviewer_keys_from_env()


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
    error: bool = False  # the gate itself failed (registry, reference): exit 2, verdict "error"
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
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# -- the reference ---------------------------------------------------------------------------
def publish_reference(
    registry: Registry, ref_dir: str | Path, config: GateConfig = GateConfig(), signing_key: Any = None
) -> VersionInfo:
    """Register a reference artifact directory and point the ``current`` alias at it.

    The published artifact is signed: by ``signing_key`` (default: the reference key from the
    environment), or already by a trusted key (``reference fit --sign``). Without either it is
    refused unless ``config.require_signed_reference`` is off.
    """
    ref = load_reference(ref_dir)  # refuses a tampered artifact before it can be published
    if not getattr(ref, "trunk_digests_", None):
        raise InvalidReference(
            ref_dir,
            "not published: it records no frozen trunk, so the gate could pass nothing; fit it on whole networks",
        )
    files = {p.relative_to(ref_dir).as_posix(): p for p in sorted(Path(ref_dir).rglob("*")) if p.is_file()}
    signing_key = signing_key or V.reference_signing_key_from_env()
    tmp = tempfile.TemporaryDirectory(prefix="backdoor-gate-refsig-")
    if signing_key is not None:  # sign a copy of the signature file, never edit the user's directory
        staged = Path(tmp.name) / "ref"
        staged.mkdir()
        for name, src in files.items():  # a composite reference has members/<name>/ subdirectories
            (staged / name).parent.mkdir(parents=True, exist_ok=True)
            (staged / name).symlink_to(Path(src).resolve())
        (staged / V.REFERENCE_SIG_FILE).unlink(missing_ok=True)
        files[V.REFERENCE_SIG_FILE] = V.sign_reference(staged, signing_key)
    elif config.require_signed_reference:
        try:
            V.verify_reference(ref_dir, config.trusted_reference_keys())
        except VerdictError as e:
            tmp.cleanup()
            raise InvalidReference(ref_dir, f"not published: {e}; set {V.REFERENCE_KEY_FILE_ENV} or sign it") from None
    with tmp:
        info = _register_reference(registry, ref, files, config)
    registry.set_alias(config.reference_model, config.reference_alias, info.version)
    return info


def _register_reference(registry: Registry, ref: Reference, files: dict, config: GateConfig) -> VersionInfo:
    return registry.register(
        config.reference_model,
        files,
        artifact_dir=REFERENCE_DIR,
        experiment=config.reference_experiment,
        run_name="reference",
        params={"layer": ref.config.layer, "n_reference": ref.n_reference_, "threshold_source": ref.threshold_source_},
        tags={REFERENCE_SHA: ref.artifact_sha256_},
    )


def check_reference_dir(root: str | Path, config: GateConfig) -> str | None:
    """The trusted key id that signed the reference directory (None when not required)."""
    if not config.require_signed_reference:
        return None
    try:
        return V.verify_reference(root, config.trusted_reference_keys())
    except VerdictError as e:
        raise InvalidReference(
            root, f"refused: {e} (signed references only; trusted keys from ${V.REFERENCE_KEYS_ENV})"
        ) from None


def fetch_reference(registry: Registry, config: GateConfig = GateConfig()) -> tuple[Reference, VersionInfo]:
    info = registry.version_by_alias(config.reference_model, config.reference_alias)
    if info is None:
        raise InvalidReference(
            f"{config.reference_model}@{config.reference_alias}", "no such alias; run the reference pipeline first"
        )
    with tempfile.TemporaryDirectory(prefix="backdoor-gate-ref-") as tmp:
        root = registry.download(info.source, tmp)
        try:
            check_reference_dir(root, config)
        except InvalidReference as e:
            raise InvalidReference(f"{config.reference_model} v{info.version}", e.reason) from None
        return load_reference(root), info


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
    except Exception as e:  # noqa: BLE001 — whatever the key loader raises, the gate has failed
        result.error, result.reason = True, f"gate error: {e}"
        return result  # a misconfigured gate judges nothing and touches nothing
    try:
        registry = registry or Registry()
        info = registry.version(model, version)
        registry.set_tags(model, version, {VERDICT: PENDING, CHECKED_AT: _now(), GATE: GATE_VERSION})
    except Exception as e:  # noqa: BLE001
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
    except Exception as e:  # noqa: BLE001 — no reference, no judgement: the gate's fault, whatever the type
        return _gate_fault(registry, info, result, f"gate error: {e}", config)
    try:
        artifact = registry.download_artifact(info, config.max_checkpoint_bytes)
        result.artifact_sha256, result.files = artifact.sha256, artifact.digests
        tags[ARTIFACT_SHA] = result.artifact_sha256

        def read_candidate():
            filename, data = artifact.weight_file()  # ValueError: extra files, no or several weight files
            result.model_sha256 = hashlib.sha256(data).hexdigest()
            tags[MODEL_SHA] = result.model_sha256
            return parse_tensors(data, f"{model} v{version}/{filename}", result.model_sha256)

        judgement = judge(reference, read_candidate)  # the verdict: detector/decision.py
    except ValueError as e:  # the artifact tree is over the size limit
        judgement = Judgement(Decision(INVALID, str(e)))
    except Exception as e:  # noqa: BLE001 — registry down, or anything judge() did not expect: never a pass
        return _gate_fault(registry, info, result, f"gate error: {e.__class__.__name__}: {e}", config)
    if judgement.decision.verdict == ERROR:
        return _gate_fault(registry, info, result, judgement.decision.reason, config)
    result.verdict, result.reason = judgement.decision.verdict, judgement.decision.reason
    try:
        if judgement.assessment is not None:
            _record_assessment(registry, info, reference, judgement.assessment, result, tags, config)
    except Exception as e:  # noqa: BLE001
        return _gate_fault(registry, info, result, f"gate error: {e}", config)

    try:
        if result.verdict == PASSED:
            again = registry.download_artifact(info, config.max_checkpoint_bytes)
            decision = confirm_unchanged(judgement.decision, result.artifact_sha256, again.sha256)
            result.verdict, result.reason = decision.verdict, decision.reason
        _record_verdict(registry, info, result, tags, signing_key, config)
        registry.set_tags(model, version, {**tags, REASON: result.reason[:5000]})
        registry.set_tags(model, version, {VERDICT: result.verdict})  # the verdict is written last
        if result.verdict == PASSED:
            result.promoted = _promote(registry, model, version, config)
            promoted = {PROMOTED: str(result.promoted).lower()}
            if result.promoted and result.verdict_sha256:
                promoted[PROMOTED_VERDICT] = result.verdict_sha256
            registry.set_tags(model, version, promoted)
        else:
            _enforce_alias(registry, model, version, config)
    except Exception as e:  # noqa: BLE001 — recording failed: the gate's fault, whatever was raised
        # a signed pass may already be stored: promotion derives from it, so a rerun or the
        # reconciler finishes the job; this run reports an error and claims no promotion
        result.error, result.promoted, result.verdict = True, False, ERROR
        result.reason = f"{result.reason}; gate error while recording: {e}"
        try:
            registry.set_tags(model, version, {REASON: result.reason[:5000]})
            registry.set_tags(model, version, {VERDICT: ERROR})
        except Exception:  # noqa: BLE001, S110 — the registry is down: the tag stays pending
            pass
    return result


def _record_assessment(
    registry: Registry,
    info: VersionInfo,
    reference: Any,
    assessment: Any,
    result: GateResult,
    tags: dict[str, Any],
    config: GateConfig,
) -> None:
    """What the reference saw, as tags a reviewer can filter on and a report to look at."""
    result.scores = assessment.scores
    tags[TRUNK] = assessment.trunk.status
    result.detector = reference.detector
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
    if config.report and result.verdict != INVALID:
        result.report_uri = _report(registry, info, reference, assessment.vector_scores, result, tags, evidence)


def _gate_fault(
    registry: Registry, info: VersionInfo, result: GateResult, reason: str, config: GateConfig
) -> GateResult:
    """The gate could not judge (registry, reference): say so, blame nothing on the candidate.

    No verdict is written (the tag stays ``pending``, the reason says why) and ``production`` is
    still guarded: a version without a signed pass never keeps it.
    """
    result.verdict, result.error, result.reason, result.scores = ERROR, True, reason, {}
    try:
        registry.set_tags(info.name, info.version, {REASON: reason[:5000]})
        registry.set_tags(info.name, info.version, {VERDICT: ERROR})
        _enforce_alias(registry, info.name, info.version, config)
    except Exception as e:  # noqa: BLE001 — already failing closed; say what else went wrong
        result.reason = f"{reason}; and while guarding the alias: {e}"
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
        checked_at=_now(),
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
            dsse = V.dsse_sign(V.intoto_statement(doc), signing_key)
            (Path(tmp) / DSSE_FILE).write_text(json.dumps(dsse, indent=2, sort_keys=True) + "\n")
        uri = registry.log_artifacts_to_run(info.run_id, tmp, f"integrity/v{info.version}")
    tags[VERDICT_DOC] = f"{uri}/{VERDICT_FILE}"


def _hint(v: VersionInfo) -> bool:
    """Tags that suggest a version may be promotable. Only a filter (it can hide, never grant):
    :func:`production_status` decides from signed records."""
    return v.tags.get(VERDICT) == PASSED or bool(v.tags.get(OVERRIDE_BY))


def _registrant(info: VersionInfo) -> str | None:
    """Who registered the version: MLflow's own user id (set by the server) before our tag."""
    return info.user_id or info.tags.get(REGISTERED_BY)


def _run_json(registry: Registry, info: VersionInfo, name: str) -> dict | None:
    raw = registry.run_file(info.run_id, f"integrity/v{info.version}/{name}")
    if raw is None:
        return None
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise VerdictError(f"{name} is not JSON") from None
    if not isinstance(obj, dict):
        raise VerdictError(f"{name} is not a JSON object")
    return obj


def signed_verdict(registry: Registry, info: VersionInfo, config: GateConfig = GateConfig()) -> tuple[dict, dict]:
    """The version's verdict envelope and document, signed by a trusted gate key. VerdictError otherwise."""
    envelope = _run_json(registry, info, VERDICT_FILE)
    if envelope is None:
        raise VerdictError(f"{info.name} v{info.version} has no verdict document (never gated)")
    if config.require_signature or envelope.get("signature"):
        doc, _ = V.verify_any(envelope, config.trusted_verdict_keys())
    else:
        doc = V.check_unsigned(envelope)  # the explicit opt-out: unsigned verdicts count
    if (doc.get("model"), str(doc.get("version"))) != (info.name, info.version):
        raise VerdictError(
            f"the document judges {doc.get('model')} v{doc.get('version')}, not {info.name} v{info.version}"
        )
    return envelope, doc


def signed_override(registry: Registry, info: VersionInfo, envelope: dict, config: GateConfig = GateConfig()) -> dict:
    """The override of this blocked verdict, signed by a trusted reviewer who did not register it."""
    over = _run_json(registry, info, OVERRIDE_FILE)
    if over is None:
        raise VerdictError(f"{info.name} v{info.version} is blocked and has no signed override")
    reviewers = config.trusted_reviewers()
    odoc, kid = V.verify_any(over, [k for _, k in reviewers.values()], fmt=V.OVERRIDE_FORMAT)
    name = reviewers[kid][0]
    if (odoc.get("model"), str(odoc.get("version"))) != (info.name, info.version) or odoc.get(
        "verdict_sha256"
    ) != envelope["sha256"]:
        raise VerdictError("the override is for another version or another verdict")
    if odoc.get("reviewer") != name or name == _registrant(info):
        raise VerdictError(f"override by {name!r}, who registered the version (or a name not its key's)")
    return odoc


def production_status(registry: Registry, info: VersionInfo, config: GateConfig = GateConfig()) -> tuple[bool, str]:
    """May ``info`` be production? Decided from signed records and the bytes registered now, never tags."""
    try:
        envelope, doc = signed_verdict(registry, info, config)
        if doc.get("verdict") not in (PASSED, BLOCKED):
            return False, f"its signed verdict is {doc.get('verdict')!r}"
        artifact = registry.download_artifact(info, config.max_checkpoint_bytes)
        if doc.get("artifact_sha256") != artifact.sha256:
            return False, "its registered artifacts are not the ones the signed verdict judged"
        if doc["verdict"] == PASSED:
            return True, f"signed pass {envelope['sha256'][:12]}"
        odoc = signed_override(registry, info, envelope, config)
        if odoc.get("artifact_sha256") != artifact.sha256:
            return False, "the override was signed for other bytes"
        return True, f"signed override by {odoc['reviewer']}"
    except Exception as e:  # noqa: BLE001 — any record that cannot be read, parsed or verified: not promotable
        return False, f"{e.__class__.__name__}: {e}" if not isinstance(e, (VerdictError, ValueError)) else str(e)


def _newest_promotable(
    registry: Registry, model: str, config: GateConfig, *, above: int = 0, skip: str | None = None
) -> VersionInfo | None:
    for v in registry.versions(model):
        if int(v.version) <= above:
            break
        if v.version != skip and _hint(v) and production_status(registry, v, config)[0]:
            return v
    return None


def _enforce_alias(registry: Registry, model: str, version: str, config: GateConfig) -> None:
    """A ``production`` alias on this version, which did not pass, is taken back unless a signed override holds."""
    current = registry.version_by_alias(model, config.production_alias)
    if current is None or current.version != version:
        return
    ok, why = production_status(registry, current, config)
    if not ok:
        _take_back(registry, model, current, config, why)


def guard_alias(model: str, *, registry: Registry | None = None, config: GateConfig = GateConfig()) -> str | None:
    """Check where ``production`` points now; take it back unless signed records allow it there.

    MLflow lets anyone who may register versions also move aliases and write tags, so this is
    called on every delivery (alias, tag, version) and on every resync. Returns the violation.
    """
    registry = registry or Registry()
    current = registry.version_by_alias(model, config.production_alias)
    if current is None:
        return None
    ok, why = production_status(registry, current, config)
    return None if ok else _take_back(registry, model, current, config, why)


def _take_back(registry: Registry, model: str, current: VersionInfo, config: GateConfig, why: str = "") -> str:
    version = current.version
    newest = _newest_promotable(registry, model, config, skip=version)
    if newest is None:
        registry.delete_alias(model, config.production_alias)
        where = "alias deleted (no promotable version)"
    else:
        registry.set_alias(model, config.production_alias, newest.version)
        where = f"alias moved back to v{newest.version}"
    message = (
        f"'{config.production_alias}' was set on this version without a pass or an override (signed records: {why}); "
        f"{where} at {_now()}"
    )
    registry.set_tags(model, version, {ALIAS_VIOLATION: message[:5000]})
    return message


def _promote(registry: Registry, model: str, version: str, config: GateConfig) -> bool:
    """Point ``production`` at the newest promotable version; True if that is ``version``.

    Rule: production = the highest version number with a signed pass (or a signed override of
    a newer version that holds it). Every gate re-derives it from the signed records *after*
    storing its own, so concurrent gates converge: whichever finishes last sees every record
    stored before it. Our own signed pass was just stored and checked by the caller.
    """
    newer = _newest_promotable(registry, model, config, above=int(version))
    target = newer.version if newer is not None else version
    current = registry.version_by_alias(model, config.production_alias)
    if current is None or current.version != target:
        if (
            current is not None
            and int(current.version) > int(target)
            and production_status(registry, current, config)[0]
        ):
            return False  # a newer promotable version (a reviewer's override) stands
        registry.set_alias(model, config.production_alias, target)
    return target == version


def _report(
    registry: Registry, info: VersionInfo, reference: Reference, vector_scores, result: GateResult, tags, evidence=None
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


# -- checking a verdict later ---------------------------------------------------------------------
class NotDeployable(Exception):
    """A validly signed verdict that does not allow deployment (blocked / invalid, no override)."""

    def __init__(self, doc: dict):
        self.doc = doc
        super().__init__(f"{doc.get('model')} v{doc.get('version')} {doc.get('verdict')}: {doc.get('reason')}")


def _deployable(registry: Registry, info: VersionInfo, config: GateConfig, *, tags: bool = False):
    """The signed document that allows deploying ``info`` and the artifact it allows, read once.

    The artifact returned is the one that was checked: hand *these* bytes to the deployment.
    Raises :class:`NotDeployable` for a validly signed refusal, ``VerdictError`` for anything
    forged, malformed or bound to other bytes, ``RegistryError``/``ValueError`` when unreadable.
    """
    envelope, doc = signed_verdict(registry, info, config)
    artifact = registry.download_artifact(info, config.max_checkpoint_bytes)
    if doc.get("artifact_sha256") != artifact.sha256:
        raise VerdictError("the registered artifacts are not the ones this verdict judged (artifact sha256 differs)")
    if tags and (info.tags.get(VERDICT_SHA) != envelope["sha256"] or info.tags.get(VERDICT) != doc["verdict"]):
        raise VerdictError("the version's tags disagree with its signed verdict (tags were edited after the gate ran)")
    if doc["verdict"] == PASSED:
        return doc, artifact
    if doc["verdict"] == BLOCKED:
        try:
            odoc = signed_override(registry, info, envelope, config)
        except VerdictError:
            raise NotDeployable(doc) from None
        if odoc.get("artifact_sha256") == artifact.sha256:
            return {**doc, "override": odoc}, artifact
    raise NotDeployable(doc)


def _verify_config(config: GateConfig, public_key) -> GateConfig:
    return GateConfig(**{**config.__dict__, "verdict_keys": (public_key,), "require_signature": True})


def verify_version(
    model: str, version: str | int, public_key, *, registry: Registry | None = None, config: GateConfig = GateConfig()
) -> dict[str, Any]:
    """May this registered version be deployed? Signature, bytes, then the verdict itself.

    Returns the document of a signed ``passed`` verdict (or a blocked one with a valid signed
    override) bound to the artifact registered now; raises :class:`NotDeployable` for a validly
    signed refusal and :class:`detector.verdict.VerdictError` for anything forged or malformed.
    The bytes can still change after this returns: deploy with :func:`fetch_deployable`.
    """
    registry = registry or Registry()
    info = registry.version(model, str(version))
    return _deployable(registry, info, _verify_config(config, public_key), tags=True)[0]


def fetch_deployable(
    model: str,
    ref: str,
    dst: str | Path,
    public_key,
    *,
    registry: Registry | None = None,
    config: GateConfig = GateConfig(),
) -> dict[str, Any]:
    """Download ``model`` at ``ref`` (an alias or a version number) for deployment, verified.

    The artifact is downloaded once, checked against the version's signed pass (or signed
    override) and only then its weight file is written to ``dst`` (a directory), under a
    temporary name first: bytes swapped after the gate ran are refused here, at deploy time,
    not at the next resync. Returns the allowing document plus ``path`` and ``sha256``.
    """
    registry = registry or Registry()
    info = registry.version(model, ref) if str(ref).isdigit() else registry.version_by_alias(model, ref)
    if info is None:
        raise VerdictError(f"{model}@{ref}: no such alias")
    doc, artifact = _deployable(registry, info, _verify_config(config, public_key))
    name, data = artifact.weight_file()
    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    final = out / Path(name).name
    partial = out / f".{final.name}.partial"
    partial.write_bytes(data)
    partial.replace(final)
    return {**doc, "path": str(final), "sha256": hashlib.sha256(data).hexdigest()}


# -- human override ----------------------------------------------------------------------------


class OverrideRefused(RuntimeError):
    pass


def override(
    model: str,
    version: str | int,
    *,
    reason: str,
    key: Any,
    registry: Registry | None = None,
    config: GateConfig = GateConfig(),
) -> VersionInfo:
    """Promote a *blocked* version on a reviewer's signed word.

    The reviewer signs an override document (version, artifact digest, the blocked verdict's
    digest, reason) with their own Ed25519 key; their name is the one the deployment gave that
    key ($BACKDOOR_GATE_REVIEWER_KEYS), never a flag. Refused without a reason, for a key that
    is not a trusted reviewer's, for a version without a signed ``blocked`` verdict (``invalid``
    files are unsafe or unreadable), by the reviewer who registered it, or when the artifact no
    longer has the digest the gate judged. Tags mirror the override for people.
    """
    registry = registry or Registry()
    version = str(version)
    info = registry.version(model, version)
    if not reason.strip():
        raise OverrideRefused("an override needs a reason (--reason)")
    reviewers = config.trusted_reviewers()
    kid = V.key_id(key.public_key())
    if kid not in reviewers:
        raise OverrideRefused(f"key {kid} is not a trusted reviewer key (${V.REVIEWER_KEYS_ENV})")
    name = reviewers[kid][0]
    try:
        envelope, doc = signed_verdict(registry, info, config)
    except VerdictError as e:
        raise OverrideRefused(
            f"{model} v{version} has no valid signed verdict ({e}); only a blocked version can be overridden"
        ) from None
    if doc.get("verdict") != BLOCKED:
        raise OverrideRefused(
            f"{model} v{version} has verdict {doc.get('verdict')!r}; only a blocked version can be overridden"
        )
    if not info.run_id:
        raise OverrideRefused(f"{model} v{version} has no run to record the override in")
    registrant = _registrant(info)
    if name == registrant:
        raise OverrideRefused(f"identity {name!r} registered {model} v{version}; a different reviewer must override")
    artifact = registry.download_artifact(info, config.max_checkpoint_bytes)
    if artifact.sha256 != doc.get("artifact_sha256"):
        raise OverrideRefused("the registered artifact no longer has the digest the gate scored; re-run the gate")
    odoc = V.override_document(
        model=model,
        version=version,
        model_sha256=doc.get("model_sha256"),
        artifact_sha256=artifact.sha256,
        verdict_sha256=envelope["sha256"],
        reason=reason[:5000],
        reviewer=name,
        registrant=registrant,
        at=_now(),
    )
    with tempfile.TemporaryDirectory(prefix="backdoor-gate-override-") as tmp:
        (Path(tmp) / OVERRIDE_FILE).write_text(json.dumps(V.sign(odoc, key), indent=2, sort_keys=True) + "\n")
        registry.log_artifacts_to_run(info.run_id, tmp, f"integrity/v{version}")
    registry.set_tags(model, version, {OVERRIDE_BY: name, OVERRIDE_REASON: reason[:5000], OVERRIDE_AT: odoc["at"]})
    registry.set_alias(model, config.production_alias, version)
    registry.set_tags(model, version, {PROMOTED: "override"})
    return registry.version(model, version)
