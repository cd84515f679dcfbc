"""Signing primitives: the gate's decision as a document anyone can check later, offline.

A verdict document holds what was decided about which bytes with which reference (model
sha256, reference sha256, scores, thresholds, verdict, reason, trunk check, gate version,
run id, time). Its digest is the sha256 of its canonical JSON (sorted keys, no spaces); the
gate signs that canonical JSON with an Ed25519 key held in a Secret, and promotion records
the digest. ``backdoor-gate verify`` checks the signature, the digest and, given the model
file, that the file is the one that was judged. Tags in a registry can be edited by anyone
with write access; a signature cannot be forged without the key.

Keys are passed in: this library reads no environment (the service reads the keys a deployment
configures, :mod:`components.keys`); ``backdoor-gate keygen`` makes a pair.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detector.artifact import canonical_json
from detector.decision import PASSED

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

FORMAT = "backdoor-gate/verdict"
OVERRIDE_FORMAT = "backdoor-gate/override"
REFERENCE_SIG_FORMAT = "backdoor-gate/reference-signature"
FORMAT_VERSION = 1
ALGORITHM = "ed25519"
REFERENCE_SIG_FILE = "reference.sig.json"
_FIELDS = (
    "model",
    "version",
    "model_sha256",
    "reference_sha256",
    "verdict",
    "reason",
    "scores",
    "thresholds",
    "trunk",
    "gate_version",
    "run_id",
    "checked_at",
)
#: later fields: the whole artifact tree's digest and files, whether signing was opted out of,
#: the deciding detector, the suspected victim class and the evidence detectors' scores
_OPTIONAL = ("artifact_sha256", "files", "signature_policy", "detector", "suspected_class", "evidence_scores")
_OVERRIDE_FIELDS = (
    "model",
    "version",
    "model_sha256",
    "artifact_sha256",
    "verdict_sha256",
    "reason",
    "reviewer",
    "registrant",
    "at",
)


class VerdictError(ValueError):
    """A verdict document that is malformed, unsigned where a signature is required, or forged."""


def document(**fields: Any) -> dict[str, Any]:
    """The verdict document; every field of the format must be given (None where unknown)."""
    missing = [f for f in _FIELDS if f not in fields]
    extra = sorted(set(fields) - set(_FIELDS) - set(_OPTIONAL))
    if missing or extra:
        raise TypeError(f"verdict document: missing {missing}, unknown {extra}")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **{f: fields[f] for f in (*_FIELDS, *_OPTIONAL) if f in fields},
    }


def override_document(**fields: Any) -> dict[str, Any]:
    """A reviewer's signed word that a blocked version may ship: bound to its bytes and its verdict."""
    missing = [f for f in _OVERRIDE_FIELDS if f not in fields]
    extra = sorted(set(fields) - set(_OVERRIDE_FIELDS))
    if missing or extra:
        raise TypeError(f"override document: missing {missing}, unknown {extra}")
    return {"format": OVERRIDE_FORMAT, "format_version": FORMAT_VERSION, **{f: fields[f] for f in _OVERRIDE_FIELDS}}


def digest(doc: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(doc)).hexdigest()


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex of the sha256 of the raw public key: names the key without revealing anything."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(doc: dict[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """The signed envelope: document, its digest, the signature over its canonical JSON."""
    sig = private_key.sign(canonical_json(doc))
    return {
        "document": doc,
        "sha256": digest(doc),
        "algorithm": ALGORITHM,
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(sig).decode(),
    }


def unsigned(doc: dict[str, Any]) -> dict[str, Any]:
    return {"document": doc, "sha256": digest(doc), "algorithm": None, "key_id": None, "signature": None}


def verify(
    envelope: dict[str, Any], public_key: Ed25519PublicKey, model_bytes: bytes | None = None, fmt: str = FORMAT
) -> dict[str, Any]:
    """The document, if the envelope is intact and signed by ``public_key``; else VerdictError."""
    from cryptography.exceptions import InvalidSignature

    if not isinstance(envelope, dict) or not isinstance(envelope.get("document"), dict):
        raise VerdictError("not a verdict envelope (expected {document, sha256, signature, ...})")
    doc = envelope["document"]
    if doc.get("format") != fmt:
        raise VerdictError(f"document format is {doc.get('format')!r}, not {fmt}")
    if envelope.get("sha256") != digest(doc):
        raise VerdictError("digest mismatch: the document was changed after it was written")
    if not envelope.get("signature"):
        raise VerdictError("unsigned: the gate that wrote it had no signing key")
    if envelope.get("algorithm") != ALGORITHM:
        raise VerdictError(f"unsupported algorithm {envelope.get('algorithm')!r}")
    try:
        public_key.verify(base64.b64decode(envelope["signature"], validate=True), canonical_json(doc))
    except (InvalidSignature, ValueError):
        raise VerdictError(
            f"bad signature: not signed by key {key_id(public_key)}, or the document was changed"
        ) from None
    if model_bytes is not None and hashlib.sha256(model_bytes).hexdigest() != doc.get("model_sha256"):
        raise VerdictError("the model file is not the one this verdict judged (sha256 differs)")
    return doc


def verify_any(
    envelope: dict[str, Any], public_keys: list[Ed25519PublicKey], fmt: str = FORMAT
) -> tuple[dict[str, Any], str]:
    """The document and the id of the trusted key that signed it; VerdictError if none of them did."""
    keys = {key_id(k): k for k in public_keys}
    if not keys:
        raise VerdictError("no trusted public keys configured")
    kid = envelope.get("key_id") if isinstance(envelope, dict) else None
    if kid not in keys:
        verify(envelope, next(iter(keys.values())), fmt=fmt)  # malformed / unsigned say so first
        raise VerdictError(f"signed by key {kid}, which is not trusted (trusted: {', '.join(sorted(keys))})")
    return verify(envelope, keys[kid], fmt=fmt), kid


def check_unsigned(envelope: dict[str, Any], fmt: str = FORMAT) -> dict[str, Any]:
    """An unsigned envelope's document after its digest check: only for an explicit opt-out."""
    if not isinstance(envelope, dict) or not isinstance(envelope.get("document"), dict):
        raise VerdictError("not a verdict envelope (expected {document, sha256, signature, ...})")
    doc = envelope["document"]
    if doc.get("format") != fmt or envelope.get("sha256") != digest(doc):
        raise VerdictError("malformed or changed unsigned document")
    return doc


# -- in-toto statement in a DSSE envelope ---------------------------------------------------
#: the same verdict, in the format admission controllers (Sigstore policy-controller, Kyverno) read
INTOTO_STATEMENT = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://backdoor-gate.dev/verdict/v1"
DSSE_PAYLOAD_TYPE = "application/vnd.in-toto+json"


def _pae(payload_type: str, body: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is really signed (type and body, length-prefixed)."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)


def intoto_statement(doc: dict[str, Any]) -> dict[str, Any]:
    """Subjects = every file of the judged artifact tree with its sha256; predicate = the verdict document."""
    files = doc.get("files") or {}
    if not files:
        raise VerdictError("an in-toto statement needs the judged files (the document has none)")
    return {
        "_type": INTOTO_STATEMENT,
        "subject": [{"name": n, "digest": {"sha256": h}} for n, h in sorted(files.items())],
        "predicateType": PREDICATE_TYPE,
        "predicate": doc,
    }


def dsse_sign(statement: dict[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    body = canonical_json(statement)
    sig = private_key.sign(_pae(DSSE_PAYLOAD_TYPE, body))
    return {
        "payloadType": DSSE_PAYLOAD_TYPE,
        "payload": base64.b64encode(body).decode(),
        "signatures": [{"keyid": key_id(private_key.public_key()), "sig": base64.b64encode(sig).decode()}],
    }


def dsse_verify(envelope: dict[str, Any], public_keys: list[Ed25519PublicKey]) -> dict[str, Any]:
    """The statement, if one signature is by a trusted key over the PAE of the payload; else VerdictError."""
    from cryptography.exceptions import InvalidSignature

    try:
        if envelope["payloadType"] != DSSE_PAYLOAD_TYPE:
            raise VerdictError(f"payloadType {envelope['payloadType']!r} is not {DSSE_PAYLOAD_TYPE}")
        body = base64.b64decode(envelope["payload"], validate=True)
        signatures = list(envelope["signatures"])
    except (KeyError, TypeError, ValueError) as e:
        raise VerdictError(f"not a DSSE envelope ({e.__class__.__name__})") from None
    keys = {key_id(k): k for k in public_keys}
    for s in signatures:
        keyid = s.get("keyid") if isinstance(s, dict) else None
        key = keys.get(keyid) if isinstance(keyid, str) else None
        if key is None:
            continue
        try:
            key.verify(base64.b64decode(s.get("sig", ""), validate=True), _pae(DSSE_PAYLOAD_TYPE, body))
        except (InvalidSignature, ValueError):
            raise VerdictError("bad DSSE signature") from None
        statement = json.loads(body)
        if statement.get("_type") != INTOTO_STATEMENT or statement.get("predicateType") != PREDICATE_TYPE:
            raise VerdictError("not a backdoor-gate verdict statement")
        return statement
    raise VerdictError("no signature by a trusted key")


class NotAdmitted(VerdictError):
    """A validly signed attestation of these bytes whose verdict is not ``passed``."""


def admitted(statement: dict[str, Any], sha256: str) -> dict[str, Any]:
    """The admission rule for a verified statement: a *pass* for exactly these bytes.

    A valid signature says only who judged; a blocked model's attestation is signed as well.
    So admit only when ``predicate.verdict == "passed"`` and ``sha256`` is the judged model's
    digest (also one of the subjects). Returns the predicate; VerdictError names the refusal.
    """
    doc = statement.get("predicate")
    if not isinstance(doc, dict):
        raise VerdictError("the statement has no verdict predicate")
    digests = {s.get("digest", {}).get("sha256") for s in statement.get("subject") or [] if isinstance(s, dict)}
    if sha256 not in digests or doc.get("model_sha256") != sha256:
        raise VerdictError("the attestation is for other bytes (sha256 not among its subjects)")
    if doc.get("verdict") != PASSED:
        raise NotAdmitted(f"the attested verdict is {doc.get('verdict')!r}, not {PASSED!r}: {doc.get('reason')}")
    return doc


# -- signed references ----------------------------------------------------------------------
def sign_reference(ref_dir: str | os.PathLike, private_key: Ed25519PrivateKey) -> Path:
    """Write ``reference.sig.json``: a signature over the artifact's ``artifact_sha256``.

    That digest covers every field of ``reference.json`` and, through it, ``arrays.npz``; the
    loader recomputes the chain, so signing the digest signs the whole artifact.
    """
    from detector.artifact import read_metadata

    meta = read_metadata(ref_dir)
    doc = {"format": REFERENCE_SIG_FORMAT, "format_version": FORMAT_VERSION, "artifact_sha256": meta["artifact_sha256"]}
    path = Path(ref_dir) / REFERENCE_SIG_FILE
    path.write_text(json.dumps(sign(doc, private_key), indent=2, sort_keys=True) + "\n")
    return path


def verify_reference(ref_dir: str | os.PathLike, public_keys: list[Ed25519PublicKey]) -> str:
    """The id of the trusted key that signed this reference artifact; VerdictError otherwise."""
    from detector.artifact import read_metadata

    sig = Path(ref_dir) / REFERENCE_SIG_FILE
    if not sig.is_file():
        raise VerdictError(f"reference is not signed ({REFERENCE_SIG_FILE} missing)")
    doc, kid = verify_any(read_envelope(sig), public_keys, fmt=REFERENCE_SIG_FORMAT)
    if doc.get("artifact_sha256") != read_metadata(ref_dir)["artifact_sha256"]:
        raise VerdictError("reference signature is for another artifact (artifact_sha256 differs)")
    return kid


# -- keys -----------------------------------------------------------------------------------
def generate_keypair(out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``signing-key.pem`` (mode 0600, for the Secret) and ``verify-key.pem`` (publish it)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    priv, pub = out / "signing-key.pem", out / "verify-key.pem"
    if priv.exists():
        raise FileExistsError(f"{priv} exists; refusing to overwrite a signing key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return priv, pub


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise VerdictError(f"signing key is not an unencrypted PEM private key: {e.__class__.__name__}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise VerdictError("signing key is not an Ed25519 key")
    return key


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (ValueError, TypeError) as e:
        raise VerdictError(f"{path}: not a PEM public key ({e.__class__.__name__})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise VerdictError(f"{path}: not an Ed25519 public key")
    return key


def load_public_keys(value: str, what: str) -> list:
    """Public keys from PEM text (one or more blocks, as a Secret maps them) or from PEM paths
    separated by os.pathsep; ``what`` names the source in errors."""
    if "-----BEGIN" in value:
        from cryptography.hazmat.primitives import serialization

        blocks = [b + "-----END PUBLIC KEY-----" for b in value.split("-----END PUBLIC KEY-----") if "-----BEGIN" in b]
        try:
            return [serialization.load_pem_public_key(b.strip().encode()) for b in blocks]
        except (ValueError, TypeError) as e:
            raise VerdictError(f"{what}: not PEM public keys ({e.__class__.__name__})") from None
    return [load_public_key(p) for p in value.split(os.pathsep) if p.strip()]


def load_reviewer_keys(value: str, what: str) -> dict[str, tuple[str, Any]]:
    """key id -> (reviewer name, public key) from ``name=path`` entries separated by os.pathsep."""
    out = {}
    for entry in value.split(os.pathsep):
        if not entry.strip():
            continue
        name, sep, path = entry.partition("=")
        if not sep or not name.strip():
            raise VerdictError(f"{what}: entry {entry!r} is not name=path")
        key = load_public_key(path)
        out[key_id(key)] = (name.strip(), key)
    return out


def read_envelope(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if p.stat().st_size > 1 << 20:
        raise VerdictError(f"{p}: larger than 1 MiB; not a verdict")
    try:
        return json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VerdictError(f"{p}: not JSON ({e})") from None
