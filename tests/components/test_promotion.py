"""The promotion rules, fast: who may hold ``production``, on the in-memory registry.

``production`` follows from signed records and the bytes registered now, never from tags:
the gate promotes the newest signed pass, the alias guard takes back what no signed pass or
override allows, an override needs a trusted reviewer who did not register the version, and the
resync heals missed deliveries. Run on :class:`components.registry_memory.InMemoryRegistry`,
which tests/components/test_registry_conformance.py holds to a real server's semantics; what
only a real server shows (its disk, its death, the CLI and webhooks over HTTP) is in
tests/integration/.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch

from components import gate as G
from components import keys as K
from components import policy
from components import tags as T
from components.config import GateConfig
from components.reconciler import Reconciler
from components.reference_store import publish_reference
from components.registry import Registry
from components.registry_memory import InMemoryRegistry
from detector import signing as V
from tests.conftest import GateWorld
from tests.polling import wait_for

_names = itertools.count()
NO_REPORT = GateConfig(report=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A reference artifact and a supply of clean / backdoored checkpoint files."""
    return GateWorld(tmp_path_factory.mktemp("promotion"))


@pytest.fixture
def registry(world) -> InMemoryRegistry:
    return world.publish(InMemoryRegistry())


def _model() -> str:
    return f"facenet-{next(_names)}"


def _swap_weights(reg: Registry, info, path: Path, tmp_path: Path) -> None:
    """The registrant overwrites the weights in their own run after the gate ran (no event fires)."""
    folder = tmp_path / f"swap-{info.version}"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(path.read_bytes())
    reg.log_artifacts_to_run(info.run_id, folder, info.source.rsplit("/", 1)[-1])


def test_pass_sets_alias_and_every_tag(registry, world):
    model = _model()
    v = world.register(registry, model, world.ckpt("clean", "passed"))
    r = G.gate(model, v.version, registry=registry)
    assert (r.verdict, r.exit_code, r.promoted) == ("passed", 0, True), r.reason
    info = registry.version(model, v.version)
    for key in [
        T.VERDICT,
        T.MODEL_SHA,
        T.REFERENCE_SHA,
        T.GATE,
        T.CHECKED_AT,
        T.REASON,
        T.REPORT,
        T.score_tag("forward"),
        T.score_tag("backward"),
        T.threshold_tag("forward"),
        T.threshold_tag("backward"),
    ]:
        assert key in info.tags, key
    assert info.tags[T.VERDICT] == "passed"
    assert float(info.tags[T.score_tag("forward")]) >= float(info.tags[T.threshold_tag("forward")])
    assert registry.version_by_alias(model, "production").version == v.version
    assert info.tags[T.REPORT].endswith("report.html")


def test_backdoor_is_blocked_and_production_stays(registry, world, tmp_path):
    model = _model()
    good = world.register(registry, model, world.ckpt("clean", "passed"))
    assert G.gate(model, good.version, registry=registry).promoted
    bad = world.register(registry, model, world.ckpt("backdoored", "blocked"))
    r = G.gate(model, bad.version, registry=registry)
    assert (r.verdict, r.exit_code, r.promoted) == ("blocked", 1, False)
    assert registry.version_by_alias(model, "production").version == good.version
    flagged = registry.search(f"name='{model}' and tags.`integrity.verdict`='blocked'")
    assert [f.version for f in flagged] == [bad.version]
    # the review report is in the run's artifacts and names the verdict
    report_dir = registry.download(registry.version(model, bad.version).tags[T.REPORT].rsplit("/", 1)[0], tmp_path)
    assert "blocked" in (report_dir / "report.html").read_text()
    assert (report_dir / "report.png").stat().st_size > 10_000


def test_invalid_and_malicious_candidates_never_promote(registry, world, tmp_path):
    model = _model()
    nan = tmp_path / "nan.pt"
    torch.save({"last_linear.weight": torch.full((24, 32), float("nan"))}, nan)
    v = world.register(registry, model, nan, name="model.pt")
    r = G.gate(model, v.version, registry=registry)
    assert (r.verdict, r.exit_code) == ("invalid", 2) and "NaN" in r.reason
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"last_linear.weight": torch.zeros(24, 32), "x": Evil()}, evil)
    v = world.register(registry, model, evil, name="model.pt")
    r = G.gate(model, v.version, registry=registry)
    assert r.verdict == "invalid" and "safe loader" in r.reason and not marker.exists()
    assert registry.version_by_alias(model, "production") is None


def test_newest_passed_version_keeps_production(registry, world):
    model = _model()
    old = world.register(registry, model, world.ckpt("clean", "passed"))
    new = world.register(registry, model, world.ckpt("clean", "passed"))
    assert G.gate(model, new.version, registry=registry).promoted
    r = G.gate(model, old.version, registry=registry)
    assert r.verdict == "passed" and not r.promoted
    assert registry.version_by_alias(model, "production").version == new.version


def test_missing_reference_fails_closed(world):
    """A gate fault is the gate's: exit 2, verdict ``error`` on the version (never the candidate's), no alias."""
    reg = InMemoryRegistry()
    model = _model()
    v = world.register(reg, model, world.ckpt("clean"))
    r = G.gate(model, v.version, registry=reg, config=GateConfig(reference_model="no-such-reference"))
    assert r.exit_code == 2 and r.verdict == "error" and "no such alias" in r.reason
    tags = reg.version(model, v.version).tags
    assert tags[T.VERDICT] == "error" and "no such alias" in tags[T.REASON]
    assert reg.version_by_alias(model, "production") is None


def _reviewer(name: str):
    """A reviewer's own signing key (the test environment trusts bob and alice, see conftest)."""
    from detector import signing as V

    return V.load_private_key((Path(os.environ["BACKDOOR_GATE_TEST_KEYS"]) / name / "signing-key.pem").read_bytes())


def test_override_rules(registry, world, tmp_path):
    from detector import signing as V

    model = _model()
    bad = world.register(registry, model, world.ckpt("backdoored", "blocked"), who="alice")
    with pytest.raises(policy.OverrideRefused, match="only a blocked version"):
        policy.override(model, bad.version, reason="ship it", key=_reviewer("bob"), registry=registry)
    assert G.gate(model, bad.version, registry=registry).verdict == "blocked"
    with pytest.raises(policy.OverrideRefused, match="different reviewer"):
        policy.override(model, bad.version, reason="I trust it", key=_reviewer("alice"), registry=registry)
    with pytest.raises(policy.OverrideRefused, match="needs a reason"):
        policy.override(model, bad.version, reason="  ", key=_reviewer("bob"), registry=registry)
    stranger, _ = V.generate_keypair(tmp_path / "stranger")
    with pytest.raises(policy.OverrideRefused, match="not a trusted reviewer key"):
        policy.override(
            model, bad.version, reason="I say so", key=V.load_private_key(stranger.read_bytes()), registry=registry
        )
    assert registry.version_by_alias(model, "production") is None
    info = policy.override(
        model, bad.version, reason="false positive, checked by hand", key=_reviewer("bob"), registry=registry
    )
    assert info.tags[T.OVERRIDE_BY] == "bob" and info.tags[T.VERDICT] == "blocked" and T.OVERRIDE_AT in info.tags
    assert registry.version_by_alias(model, "production").version == bad.version


def test_unsigned_gate_says_so_and_a_required_signature_stops_it(registry, world, monkeypatch):

    monkeypatch.delenv(K.KEY_FILE_ENV)
    model = _model()
    v = world.register(registry, model, world.ckpt("clean", "passed"))
    r = G.gate(model, v.version, registry=registry, config=GateConfig(report=False, require_signature=False))  # opt-out
    assert r.signed_by == "unsigned" and r.verdict == "passed"
    w = world.register(registry, model, world.ckpt("clean", "passed"))
    r = G.gate(model, w.version, registry=registry, config=GateConfig(report=False))  # required by default
    assert r.exit_code == 2 and "no signing key" in r.reason and not r.promoted
    assert T.VERDICT not in registry.version(model, w.version).tags  # judged nothing, wrote nothing


def test_production_set_by_hand_on_an_ungated_version_is_taken_back(registry, world):
    model = _model()
    good = world.register(registry, model, world.ckpt("clean", "passed"))
    assert G.gate(model, good.version, registry=registry, config=GateConfig(report=False)).promoted
    bad = world.register(registry, model, world.ckpt("backdoored", "blocked"))
    registry.set_alias(model, "production", bad.version)  # someone skips the gate
    r = G.gate(model, bad.version, registry=registry, config=GateConfig(report=False))
    assert r.verdict == "blocked"
    assert registry.version_by_alias(model, "production").version == good.version
    assert "without a pass or an override" in registry.version(model, bad.version).tags[T.ALIAS_VIOLATION]
    # with no passed version to fall back on, the alias is deleted
    lone = _model()
    only = world.register(registry, lone, world.ckpt("backdoored", "blocked"))
    registry.set_alias(lone, "production", only.version)
    assert G.gate(lone, only.version, registry=registry, config=GateConfig(report=False)).verdict == "blocked"
    assert registry.version_by_alias(lone, "production") is None


def test_forged_override_tag_and_alias_move_are_reverted(registry, world):
    model = _model()
    good = world.register(registry, model, world.ckpt("clean", "passed"), who="ci")
    assert G.gate(model, good.version, registry=registry, config=GateConfig(report=False)).promoted
    bad = world.register(registry, model, world.ckpt("backdoored", "blocked"))
    assert G.gate(model, bad.version, registry=registry, config=GateConfig(report=False)).verdict == "blocked"
    registry.set_tags(model, bad.version, {T.OVERRIDE_BY: "x", T.OVERRIDE_REASON: "trust me"})
    registry.set_alias(model, "production", bad.version)
    assert policy.guard_alias(model, registry=registry)  # a violation is reported
    assert registry.version_by_alias(model, "production").version == good.version


def test_forged_passed_tag_and_alias_move_are_reverted(registry, world):
    model = _model()
    bad = world.register(registry, model, world.ckpt("backdoored", "blocked"))
    assert G.gate(model, bad.version, registry=registry, config=GateConfig(report=False)).verdict == "blocked"
    registry.set_tags(model, bad.version, {T.VERDICT: "passed"})
    registry.set_alias(model, "production", bad.version)
    assert policy.guard_alias(model, registry=registry)
    assert registry.version_by_alias(model, "production") is None


def test_override_identity_comes_from_the_reviewers_key(registry, world):
    keys = Path(os.environ["BACKDOOR_GATE_TEST_KEYS"])
    model = _model()
    bad = world.register(registry, model, world.ckpt("backdoored", "blocked"), who="alice")
    assert G.gate(model, bad.version, registry=registry, config=GateConfig(report=False)).verdict == "blocked"
    verify_key = V.load_public_key(os.environ["BACKDOOR_GATE_VERDICT_PUBLIC_KEYS"])
    with pytest.raises(policy.NotDeployable, match="blocked"):  # a validly signed refusal: verify exits 1
        policy.verify_version(model, bad.version, verify_key, registry=registry)
    alice = V.load_private_key((keys / "alice" / "signing-key.pem").read_bytes())
    with pytest.raises(policy.OverrideRefused, match="registered"):
        policy.override(model, bad.version, reason="mine, it is fine", key=alice, registry=registry)
    bob = V.load_private_key((keys / "bob" / "signing-key.pem").read_bytes())
    policy.override(model, bad.version, reason="false positive, checked by hand", key=bob, registry=registry)
    info = registry.version(model, bad.version)
    assert info.tags[T.OVERRIDE_BY] == "bob" and registry.version_by_alias(model, "production").version == bad.version
    assert policy.guard_alias(model, registry=registry) is None  # the signed override stands
    assert policy.verify_version(model, bad.version, verify_key, registry=registry)["override"]["reviewer"] == "bob"


def test_missed_delivery_is_healed_by_resync(registry, world):
    model = _model()
    good = world.register(registry, model, world.ckpt("clean", "passed"), who="ci")
    assert G.gate(model, good.version, registry=registry, config=GateConfig(report=False)).promoted
    # registered by hand while the receiver was down: no delivery, no gate; production moved onto it
    bad = world.register(registry, model, world.ckpt("backdoored", "blocked"))
    registry.set_alias(model, "production", bad.version)
    reconciler = Reconciler(registry, models=(model,), config=GateConfig(report=False), interval=0.1).start()
    try:
        wait_for(lambda: registry.version(model, bad.version).tags.get(T.VERDICT) == "blocked", 60, what="a resync")
    finally:
        reconciler.stop()
    assert registry.version(model, bad.version).tags[T.VERDICT] == "blocked"
    assert registry.version_by_alias(model, "production").version == good.version


def test_current_reference_moved_to_an_unsigned_version_is_put_back(registry, world):
    config = GateConfig(report=False, reference_model=f"guarded-reference-{next(_names)}")
    signed = publish_reference(registry, world.reference_dir, config)
    forged = registry.register(
        config.reference_model, {p.name: p for p in world.reference_dir.iterdir()}, artifact_dir="reference"
    )
    registry.set_alias(config.reference_model, "current", forged.version)  # unsigned: registered around publish
    done = Reconciler(registry, models=(), config=config).resync()
    assert registry.version_by_alias(config.reference_model, "current").version == signed.version, done


def _oversized_verdict(registry: Registry, info, tmp_path: Path) -> None:
    """The attacker's own run: integrity/vN/verdict.json replaced by a file over the 1 MiB read limit."""
    folder = tmp_path / f"big-{info.version}"
    folder.mkdir()
    (folder / T.VERDICT_FILE).write_bytes(b" " * (1 << 20) + b"{}")
    registry.log_artifacts_to_run(info.run_id, folder, f"integrity/v{info.version}")


def _promoted_then_blocked(registry, world):
    """A model whose v1 passed (production) and whose v2, the attacker's, was blocked."""
    model = _model()
    good = world.register(registry, model, world.ckpt("clean", "passed"), who="ci")
    assert G.gate(model, good.version, registry=registry, config=NO_REPORT).promoted
    bad = world.register(registry, model, world.ckpt("backdoored", "blocked"))
    assert G.gate(model, bad.version, registry=registry, config=NO_REPORT).verdict == "blocked"
    return model, good, bad


def test_an_unreadable_verdict_does_not_keep_production_on_a_blocked_version(registry, world, tmp_path):
    model, good, bad = _promoted_then_blocked(registry, world)
    _oversized_verdict(registry, bad, tmp_path)
    registry.set_alias(model, "production", bad.version)
    # the guard alone (the webhook's path) ...
    assert policy.guard_alias(model, registry=registry, config=NO_REPORT)
    assert registry.version_by_alias(model, "production").version == good.version
    # ... and the resync's path
    registry.set_alias(model, "production", bad.version)
    Reconciler(registry, models=(model,), config=NO_REPORT).resync()
    assert registry.version_by_alias(model, "production").version == good.version


def test_an_unreadable_record_on_a_decoy_does_not_stop_the_guard(registry, world, tmp_path):
    model, good, bad = _promoted_then_blocked(registry, world)
    decoy = world.register(registry, model, world.ckpt("backdoored", "blocked"))
    registry.set_tags(model, decoy.version, {T.VERDICT: "passed"})  # so the guard looks at it first
    _oversized_verdict(registry, decoy, tmp_path)
    registry.set_alias(model, "production", bad.version)
    assert policy.guard_alias(model, registry=registry, config=NO_REPORT)
    assert registry.version_by_alias(model, "production").version == good.version


@pytest.mark.parametrize("forged", [{T.VERDICT: "passed"}, {T.VERDICT: "pending", T.CHECKED_AT: "2999-01-01T00:00:00"}])
def test_forged_tags_do_not_hide_a_version_from_the_reconciler(registry, world, forged):
    model = _model()
    bad = world.register(registry, model, world.ckpt("backdoored", "blocked"))  # the receiver was down
    registry.set_tags(model, bad.version, forged)
    Reconciler(registry, models=(model,), config=NO_REPORT).resync()
    info = registry.version(model, bad.version)
    assert info.tags[T.VERDICT] == "blocked"
    assert policy.signed_verdict(registry, info)[1]["verdict"] == "blocked"


def test_the_gate_attests_only_a_pass(registry, world):
    model = _model()
    bad = world.register(registry, model, world.ckpt("backdoored", "blocked"))
    assert G.gate(model, bad.version, registry=registry, config=NO_REPORT).verdict == "blocked"
    assert registry.run_file(bad.run_id, f"integrity/v{bad.version}/{T.DSSE_FILE}") is None
    good = world.register(registry, model, world.ckpt("clean", "passed"), who="ci")
    assert G.gate(model, good.version, registry=registry, config=NO_REPORT).promoted
    assert registry.run_file(good.run_id, f"integrity/v{good.version}/{T.DSSE_FILE}") is not None


# -- rules no server-backed test covered --------------------------------------------------------------
def test_production_status_reads_signed_records_and_the_bytes_registered_now(registry, world, tmp_path):
    model = _model()
    good = world.register(registry, model, world.ckpt("clean", "passed"))
    bad = world.register(registry, model, world.ckpt("backdoored", "blocked"))
    never = world.register(registry, model, world.ckpt("clean", "passed"))
    for v in (good, bad):
        G.gate(model, v.version, registry=registry, config=NO_REPORT)
    ok, why = policy.production_status(registry, registry.version(model, good.version))
    assert ok and why.startswith("signed pass "), why
    registry.set_tags(model, good.version, {T.VERDICT: "blocked"})  # tags say nothing to it
    assert policy.production_status(registry, registry.version(model, good.version))[0]
    assert policy.production_status(registry, registry.version(model, bad.version)) == (
        False,
        f"{model} v{bad.version} is blocked and has no signed override",
    )
    registry.set_tags(model, never.version, {T.VERDICT: "passed"})
    assert policy.production_status(registry, registry.version(model, never.version)) == (
        False,
        f"{model} v{never.version} has no verdict document (never gated)",
    )
    _swap_weights(registry, good, world.ckpt("clean", "passed"), tmp_path)
    assert policy.production_status(registry, registry.version(model, good.version)) == (
        False,
        "its registered artifacts are not the ones the signed verdict judged",
    )


def test_the_alias_goes_back_to_the_newest_version_still_promotable(registry, world, tmp_path):
    model = _model()
    v1, v2 = (world.register(registry, model, world.ckpt("clean", "passed")) for _ in range(2))
    v3 = world.register(registry, model, world.ckpt("backdoored", "blocked"))
    for v in (v1, v2, v3):
        G.gate(model, v.version, registry=registry, config=NO_REPORT)
    assert registry.version_by_alias(model, "production").version == v2.version
    registry.set_alias(model, "production", v3.version)
    assert policy.guard_alias(model, registry=registry)
    assert registry.version_by_alias(model, "production").version == v2.version  # newest first, not v1
    _swap_weights(registry, v2, world.ckpt("clean", "passed"), tmp_path)  # v2 no longer promotable
    registry.set_alias(model, "production", v3.version)
    assert policy.guard_alias(model, registry=registry)
    assert registry.version_by_alias(model, "production").version == v1.version
    assert policy.guard_alias(model, registry=registry) is None  # a promotable holder stays


def test_a_newer_override_stands_against_an_older_pass_and_falls_to_a_newer_one(registry, world):
    model = _model()
    old = world.register(registry, model, world.ckpt("clean", "passed"))
    flagged = world.register(registry, model, world.ckpt("backdoored", "blocked"), who="alice")
    assert G.gate(model, flagged.version, registry=registry, config=NO_REPORT).verdict == "blocked"
    policy.override(
        model, flagged.version, reason="false positive, checked by hand", key=_reviewer("bob"), registry=registry
    )
    r = G.gate(model, old.version, registry=registry, config=NO_REPORT)  # gated late, e.g. by the resync
    assert (r.verdict, r.promoted) == ("passed", False)
    assert registry.version_by_alias(model, "production").version == flagged.version
    # tags only filter the search for a promotable version: blanked, the signed override still stands
    registry.set_tags(model, flagged.version, {T.OVERRIDE_BY: ""})
    assert not G.gate(model, old.version, registry=registry, config=NO_REPORT).promoted
    assert registry.version_by_alias(model, "production").version == flagged.version
    new = world.register(registry, model, world.ckpt("clean", "passed"))
    assert G.gate(model, new.version, registry=registry, config=NO_REPORT).promoted
    assert registry.version_by_alias(model, "production").version == new.version
