"""detector/decision.py: judge() turns every failure into the right word, and a pass holds
only for the bytes that were scored. Real files and a real reference of a small weight family."""

from __future__ import annotations

import pytest

from detector.config import ReferenceConfig
from detector.decision import BLOCKED, ERROR, EXIT_CODES, INVALID, PASSED, Decision, confirm_unchanged, judge
from detector.errors import InvalidReference
from detector.reference import Reference
from detector.weights import read_tensors


@pytest.fixture(scope="module")
def reference():
    from lab.synthetic import FamilyConfig, WeightFamily

    fam = WeightFamily(FamilyConfig(out_features=24, in_features=32, backdoor_strength=1.0, seed=3))
    ref = Reference(ReferenceConfig(grid=(1, 2, 5))).fit([fam.clean() for _ in range(10)])
    return ref.calibrate([fam.clean() for _ in range(8)]), fam


def test_judge_passes_the_reference_s_decision_through(reference, tmp_path):
    ref, fam = reference
    path = fam.write(fam.backdoored(), tmp_path / "b.safetensors", fmt="safetensors")
    j = judge(ref, lambda: read_tensors(path)[0])
    assert j.assessment is not None and j.decision == j.assessment.decision == ref.assess(path).decision


def test_a_candidate_that_cannot_be_read_is_invalid_not_an_error(reference, tmp_path):
    ref, _ = reference
    junk = tmp_path / "model.pt"
    junk.write_bytes(b"not a checkpoint")
    j = judge(ref, lambda: junk)
    assert (j.decision.verdict, j.assessment) == (INVALID, None) and "unknown format" in j.decision.reason

    def extra_files():
        raise ValueError("files the gate does not judge in the registered artifacts: loader.py")

    assert judge(ref, extra_files).decision == Decision(
        INVALID, "files the gate does not judge in the registered artifacts: loader.py"
    )


def test_a_reference_that_cannot_judge_is_the_gate_s_error(reference, tmp_path):
    _, fam = reference
    path = fam.write(fam.clean(), tmp_path / "c.safetensors", fmt="safetensors")
    unfitted = Reference(ReferenceConfig())
    assert judge(unfitted, lambda: path).decision.verdict == ERROR

    def unreadable():
        raise InvalidReference("ref", "tampered")

    assert judge(unfitted, unreadable).decision.verdict == ERROR


def test_a_pass_holds_only_for_the_scored_bytes():
    ok = Decision(PASSED, "every view at or above its threshold")
    assert confirm_unchanged(ok, "aa", "aa") == ok
    changed = confirm_unchanged(ok, "aa", "bb")
    assert changed.verdict == BLOCKED and "changed after it was scored" in changed.reason
    blocked = Decision(BLOCKED, "anomalous weights")
    assert confirm_unchanged(blocked, "aa", "bb") == blocked


def test_one_vocabulary_and_its_exit_codes():
    # the words users filter registry tags on, and the exit codes scripts branch on
    assert (PASSED, BLOCKED, INVALID, ERROR) == ("passed", "blocked", "invalid", "error")
    assert EXIT_CODES == {"passed": 0, "blocked": 1, "invalid": 2, "error": 2}
