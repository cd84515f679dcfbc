"""The production policy: which registered version may be ``production``, decided from signed
records and the bytes registered now, never from tags.

A version may be ``production`` only with a verdict document signed by a trusted gate key that
says ``passed`` for the exact artifact tree now registered, or a ``blocked`` one plus an override
signed by a trusted reviewer key whose reviewer did not register the version. Tags mirror these
records for people and filter candidates; they never make a version promotable.

- :func:`promote`: after a pass, ``production`` = the newest promotable version;
- :func:`guard_alias` / :func:`enforce_alias`: an alias moved by hand is taken back;
- :func:`verify_version` / :func:`fetch_deployable`: deploy only verified bytes (MLflow lets a
  registrant overwrite their own run's artifacts after a pass, and no event fires);
- :func:`override`: a reviewer's signed word for a blocked version.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from components import keys
from components.config import GateConfig
from components.registry import MlflowRegistry, Registry, VersionInfo
from components.tags import (
    ALIAS_VIOLATION,
    OVERRIDE_AT,
    OVERRIDE_BY,
    OVERRIDE_FILE,
    OVERRIDE_REASON,
    PROMOTED,
    REGISTERED_BY,
    VERDICT,
    VERDICT_FILE,
    VERDICT_SHA,
)
from detector.decision import BLOCKED, PASSED
from detector.signing import (
    OVERRIDE_FORMAT,
    VerdictError,
    check_unsigned,
    key_id,
    override_document,
    sign,
    verify_any,
)


def now() -> str:
    """The time the service records, in UTC, to the second."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


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
        doc, _ = verify_any(envelope, config.trusted_verdict_keys())
    else:
        doc = check_unsigned(envelope)  # the explicit opt-out: unsigned verdicts count
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
    odoc, kid = verify_any(over, [k for _, k in reviewers.values()], fmt=OVERRIDE_FORMAT)
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


def enforce_alias(registry: Registry, model: str, version: str, config: GateConfig) -> None:
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
    registry = registry or MlflowRegistry()
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
        f"{where} at {now()}"
    )
    registry.set_tags(model, version, {ALIAS_VIOLATION: message[:5000]})
    return message


def promote(registry: Registry, model: str, version: str, config: GateConfig) -> bool:
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


# -- deploying: verified bytes only ----------------------------------------------------------
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
    registry = registry or MlflowRegistry()
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
    registry = registry or MlflowRegistry()
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
    registry = registry or MlflowRegistry()
    version = str(version)
    info = registry.version(model, version)
    if not reason.strip():
        raise OverrideRefused("an override needs a reason (--reason)")
    reviewers = config.trusted_reviewers()
    kid = key_id(key.public_key())
    if kid not in reviewers:
        raise OverrideRefused(f"key {kid} is not a trusted reviewer key (${keys.REVIEWER_KEYS_ENV})")
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
    odoc = override_document(
        model=model,
        version=version,
        model_sha256=doc.get("model_sha256"),
        artifact_sha256=artifact.sha256,
        verdict_sha256=envelope["sha256"],
        reason=reason[:5000],
        reviewer=name,
        registrant=registrant,
        at=now(),
    )
    with tempfile.TemporaryDirectory(prefix="backdoor-gate-override-") as tmp:
        (Path(tmp) / OVERRIDE_FILE).write_text(json.dumps(sign(odoc, key), indent=2, sort_keys=True) + "\n")
        registry.log_artifacts_to_run(info.run_id, tmp, f"integrity/v{version}")
    registry.set_tags(model, version, {OVERRIDE_BY: name, OVERRIDE_REASON: reason[:5000], OVERRIDE_AT: odoc["at"]})
    registry.set_alias(model, config.production_alias, version)
    registry.set_tags(model, version, {PROMOTED: "override"})
    return registry.version(model, version)
