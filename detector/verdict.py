"""Signed verdicts: the gate's decision as a document anyone can check later, offline.

A verdict document holds what was decided about which bytes with which reference (model
sha256, reference sha256, scores, thresholds, verdict, reason, trunk check, gate version,
run id, time). Its digest is the sha256 of its canonical JSON (sorted keys, no spaces); the
gate signs that canonical JSON with an Ed25519 key held in a Secret, and promotion records
the digest. ``backdoor-gate verify`` checks the signature, the digest and, given the model
file, that the file is the one that was judged. Tags in a registry can be edited by anyone
with write access; a signature cannot be forged without the key.

The signing key comes from ``BACKDOOR_GATE_SIGNING_KEY`` (PEM text) or
``BACKDOOR_GATE_SIGNING_KEY_FILE`` (a path); ``backdoor-gate keygen`` makes a pair.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from detector.artifact import canonical_json

FORMAT = "backdoor-gate/verdict"
FORMAT_VERSION = 1
ALGORITHM = "ed25519"
KEY_ENV, KEY_FILE_ENV = "BACKDOOR_GATE_SIGNING_KEY", "BACKDOOR_GATE_SIGNING_KEY_FILE"
_FIELDS = ("model", "version", "model_sha256", "reference_sha256", "verdict", "reason", "scores", "thresholds",
           "trunk", "gate_version", "run_id", "checked_at", "detector", "suspected_class", "evidence_scores")


class VerdictError(ValueError):
    """A verdict document that is malformed, unsigned where a signature is required, or forged."""


def document(**fields: Any) -> dict[str, Any]:
    """The verdict document; every field of the format must be given (None where unknown)."""
    missing = [f for f in _FIELDS if f not in fields]
    extra = sorted(set(fields) - set(_FIELDS))
    if missing or extra:
        raise TypeError(f"verdict document: missing {missing}, unknown {extra}")
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **{f: fields[f] for f in _FIELDS}}


def digest(doc: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(doc)).hexdigest()


def key_id(public_key) -> str:
    """First 16 hex of the sha256 of the raw public key: names the key without revealing anything."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(doc: dict[str, Any], private_key) -> dict[str, Any]:
    """The signed envelope: document, its digest, the signature over its canonical JSON."""
    sig = private_key.sign(canonical_json(doc))
    return {"document": doc, "sha256": digest(doc), "algorithm": ALGORITHM,
            "key_id": key_id(private_key.public_key()), "signature": base64.b64encode(sig).decode()}


def unsigned(doc: dict[str, Any]) -> dict[str, Any]:
    return {"document": doc, "sha256": digest(doc), "algorithm": None, "key_id": None, "signature": None}


def verify(envelope: dict[str, Any], public_key, model_bytes: bytes | None = None) -> dict[str, Any]:
    """The document, if the envelope is intact and signed by ``public_key``; else VerdictError."""
    from cryptography.exceptions import InvalidSignature

    if not isinstance(envelope, dict) or not isinstance(envelope.get("document"), dict):
        raise VerdictError("not a verdict envelope (expected {document, sha256, signature, ...})")
    doc = envelope["document"]
    if doc.get("format") != FORMAT:
        raise VerdictError(f"document format is {doc.get('format')!r}, not {FORMAT}")
    if envelope.get("sha256") != digest(doc):
        raise VerdictError("digest mismatch: the document was changed after it was written")
    if not envelope.get("signature"):
        raise VerdictError("unsigned: the gate that wrote it had no signing key")
    if envelope.get("algorithm") != ALGORITHM:
        raise VerdictError(f"unsupported algorithm {envelope.get('algorithm')!r}")
    try:
        public_key.verify(base64.b64decode(envelope["signature"], validate=True), canonical_json(doc))
    except (InvalidSignature, ValueError):
        raise VerdictError(f"bad signature: not signed by key {key_id(public_key)}, or the document was changed") from None
    if model_bytes is not None and hashlib.sha256(model_bytes).hexdigest() != doc.get("model_sha256"):
        raise VerdictError("the model file is not the one this verdict judged (sha256 differs)")
    return doc


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
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def load_private_key(pem: bytes):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise VerdictError(f"signing key is not an unencrypted PEM private key: {e.__class__.__name__}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise VerdictError("signing key is not an Ed25519 key")
    return key


def load_public_key(path: str | os.PathLike):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (ValueError, TypeError) as e:
        raise VerdictError(f"{path}: not a PEM public key ({e.__class__.__name__})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise VerdictError(f"{path}: not an Ed25519 public key")
    return key


def signing_key_from_env(environ=os.environ):
    """The gate's signing key from the environment, or None when none is configured."""
    if environ.get(KEY_ENV):
        return load_private_key(environ[KEY_ENV].encode())
    if environ.get(KEY_FILE_ENV):
        return load_private_key(Path(environ[KEY_FILE_ENV]).read_bytes())
    return None


def read_envelope(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if p.stat().st_size > 1 << 20:
        raise VerdictError(f"{p}: larger than 1 MiB; not a verdict")
    try:
        return json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VerdictError(f"{p}: not JSON ({e})") from None
