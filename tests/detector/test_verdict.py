"""Signed verdicts: what a forger, an editor of tags, or a swapped file cannot get past."""

from __future__ import annotations

import copy
import os
import stat
import subprocess
import sys

import pytest

from components import keys as K
from detector import signing as V


def _doc(**over):
    fields = dict(
        model="facenet",
        version="3",
        model_sha256="ab" * 32,
        reference_sha256="cd" * 32,
        verdict="passed",
        reason="every view at or above its threshold",
        scores={"forward": 1.5},
        thresholds={"forward": 1.0},
        trunk="ok",
        gate_version="0.1",
        run_id="r1",
        checked_at="2026-11-25T00:00:00+00:00",
        detector="fusion",
        suspected_class=None,
        evidence_scores={"gmm.forward": 2.0},
    )
    fields.update(over)
    return V.document(**fields)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    priv, pub = V.generate_keypair(d)
    return V.load_private_key(priv.read_bytes()), V.load_public_key(pub), priv, pub


def test_sign_then_verify_returns_the_document(keys):
    sk, pk, _, _ = keys
    env = V.sign(_doc(), sk)
    assert V.verify(env, pk) == _doc() and env["key_id"] == V.key_id(pk)


@pytest.mark.parametrize(
    "attack, message",
    [
        (lambda e: e["document"].update(verdict="blocked"), "digest mismatch"),
        (
            lambda e: (e["document"].update(verdict="blocked"), e.update(sha256=V.digest(e["document"]))),
            "bad signature",
        ),
        (lambda e: e.update(signature=None), "unsigned"),
        (lambda e: e.update(signature="not base64!"), "bad signature"),
        (lambda e: e.update(algorithm="none"), "unsupported algorithm"),
        (lambda e: e["document"].update(format="other"), "format"),
    ],
)
def test_tampered_envelopes_are_refused(keys, attack, message):
    sk, pk, _, _ = keys
    env = copy.deepcopy(V.sign(_doc(), sk))
    attack(env)
    with pytest.raises(V.VerdictError, match=message):
        V.verify(env, pk)


def test_another_key_or_another_file_is_refused(keys, tmp_path):
    sk, pk, _, _ = keys
    _, other_pub = V.generate_keypair(tmp_path / "other")
    with pytest.raises(V.VerdictError, match="bad signature"):
        V.verify(V.sign(_doc(), sk), V.load_public_key(other_pub))
    with pytest.raises(V.VerdictError, match="not the one this verdict judged"):
        V.verify(V.sign(_doc(), sk), pk, model_bytes=b"some other model")


def test_document_needs_every_field_and_keygen_protects_the_key(keys, tmp_path):
    with pytest.raises(TypeError, match="missing"):
        V.document(model="facenet")
    _, _, priv, _ = keys
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    with pytest.raises(FileExistsError):
        V.generate_keypair(priv.parent)
    with pytest.raises(V.VerdictError, match="PEM"):
        K.signing_key_from_env({K.KEY_ENV: "-----BEGIN NONSENSE-----"})
    assert K.signing_key_from_env({}) is None


def test_verify_cli_exit_codes(keys, tmp_path):
    import json

    sk, _, _, pub = keys
    model = tmp_path / "model.bin"
    model.write_bytes(b"weights")
    import hashlib

    env = V.sign(_doc(model_sha256=hashlib.sha256(b"weights").hexdigest()), sk)
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(env))
    env["document"]["verdict"] = "blocked"
    bad.write_text(json.dumps(env))

    def run(*a):
        cmd = [sys.executable, "-m", "backdoor_gate.cli", "verify", *a, "--public-key", str(pub)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    p = run(str(good), "--checkpoint", str(model))
    assert p.returncode == 0 and p.stdout.startswith("valid: facenet v3 passed"), p.stderr
    p = run(str(bad))
    assert p.returncode == 2 and "digest mismatch" in p.stderr  # tampered: malformed, not a signed refusal
    p = run(str(good), "--checkpoint", str(good))
    assert p.returncode == 2 and "not the one" in p.stderr
    p = run(str(good))
    assert p.returncode == 2 and "--checkpoint" in p.stderr  # a verdict unbound to bytes allows nothing
    assert run().returncode == 2  # neither a file nor --version


def test_intoto_statement_in_dsse_binds_every_file_and_the_key(keys, tmp_path):
    sk, pk, _, _ = keys
    doc = _doc(files={"model.safetensors": "ab" * 32, "README": "ef" * 32})
    env = V.dsse_sign(V.intoto_statement(doc), sk)
    st = V.dsse_verify(env, [pk])
    assert st["predicate"] == doc and {s["name"]: s["digest"]["sha256"] for s in st["subject"]} == doc["files"]
    _, other = V.generate_keypair(tmp_path / "other")
    with pytest.raises(V.VerdictError, match="no signature by a trusted key"):
        V.dsse_verify(env, [V.load_public_key(other)])
    # a blocked statement's payload under a passed statement's signature (or the other way round)
    blocked = V.dsse_sign(V.intoto_statement(dict(doc, verdict="blocked")), sk)
    with pytest.raises(V.VerdictError, match="bad DSSE signature"):
        V.dsse_verify(dict(env, payload=blocked["payload"]), [pk])
    with pytest.raises(V.VerdictError, match="needs the judged files"):
        V.intoto_statement(_doc())
