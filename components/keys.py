"""The keys a deployment configures, read from the environment (Kubernetes Secrets map them there).

The signing primitives live in :mod:`detector.signing`, which reads no environment; this module
is the one place the service turns ``$BACKDOOR_GATE_*`` variables into keys.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from detector.signing import load_private_key, load_public_keys, load_reviewer_keys

KEY_ENV, KEY_FILE_ENV = "BACKDOOR_GATE_SIGNING_KEY", "BACKDOOR_GATE_SIGNING_KEY_FILE"
#: public keys whose verdicts may make a version production (default: the gate's own key)
VERDICT_KEYS_ENV = "BACKDOOR_GATE_VERDICT_PUBLIC_KEYS"
REFERENCE_KEY_ENV, REFERENCE_KEY_FILE_ENV = (
    "BACKDOOR_GATE_REFERENCE_SIGNING_KEY",
    "BACKDOOR_GATE_REFERENCE_SIGNING_KEY_FILE",
)
#: public keys of the references the gate trusts (os.pathsep-separated PEM paths)
REFERENCE_KEYS_ENV = "BACKDOOR_GATE_REFERENCE_PUBLIC_KEYS"
#: reviewers who may override: os.pathsep-separated ``name=verify-key.pem``; the name comes from here
REVIEWER_KEYS_ENV = "BACKDOOR_GATE_REVIEWER_KEYS"


def _private_key(text_env: str, file_env: str, environ: Mapping[str, str]) -> Any:
    if environ.get(text_env):
        return load_private_key(environ[text_env].encode())
    if environ.get(file_env):
        return load_private_key(Path(environ[file_env]).read_bytes())
    return None


def signing_key_from_env(environ: Mapping[str, str] = os.environ) -> Any:
    """The gate's signing key (PEM text or a path), or None when none is configured."""
    return _private_key(KEY_ENV, KEY_FILE_ENV, environ)


def reference_signing_key_from_env(environ: Mapping[str, str] = os.environ) -> Any:
    """The reference pipeline's signing key, or None."""
    return _private_key(REFERENCE_KEY_ENV, REFERENCE_KEY_FILE_ENV, environ)


def public_keys_from_env(name: str, environ: Mapping[str, str] = os.environ) -> list:
    """Public keys in ``$name``: PEM text or PEM paths separated by os.pathsep."""
    return load_public_keys(environ.get(name, ""), f"${name}")


def verdict_keys_from_env(environ: Mapping[str, str] = os.environ) -> list:
    """Keys whose verdicts count: ``$BACKDOOR_GATE_VERDICT_PUBLIC_KEYS``, plus the gate's own key."""
    keys = public_keys_from_env(VERDICT_KEYS_ENV, environ)
    own = signing_key_from_env(environ)
    if own is not None:
        keys.append(own.public_key())
    return keys


def reviewer_keys_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, tuple[str, Any]]:
    """key id -> (reviewer name, public key) from ``$BACKDOOR_GATE_REVIEWER_KEYS`` (``name=path``)."""
    return load_reviewer_keys(environ.get(REVIEWER_KEYS_ENV, ""), REVIEWER_KEYS_ENV)
