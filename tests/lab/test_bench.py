"""The bench measures what ships (its figures are the README's cost targets)."""

from __future__ import annotations

from detector.config import DEFAULT_DETECTOR, WEIGHTS_ONLY_DETECTOR
from detector.detectors import make_reference
from detector.head import HeadReference
from lab.bench import shipped_members


def test_the_bench_builds_each_gate_s_members_as_make_reference_does():
    for detector in (DEFAULT_DETECTOR, WEIGHTS_ONLY_DETECTOR):
        members, shipped = shipped_members(detector), make_reference(detector).members
        assert list(members) == list(shipped) == detector.split("+")
        head = members["head"]
        assert isinstance(head, HeadReference)
        # the default's head carries its offset share and toward (the margins decide beside it)
        assert (head.share, head.toward) == ((True, True) if "margins" in members else (False, False))
        settings = ("rank", "normalize", "std_floor", "share", "toward", "victim_rule")
        assert [getattr(head, k) for k in settings] == [getattr(shipped["head"], k) for k in settings]
