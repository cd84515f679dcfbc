"""tests/polling.py: the helper every waiting test uses returns as soon as it can and fails loudly."""

from __future__ import annotations

import itertools
import time

import pytest

from tests.polling import wait_for


def test_returns_the_first_truthy_value_without_waiting_longer():
    calls = itertools.count(1)
    start = time.monotonic()
    assert wait_for(lambda: (n := next(calls)) >= 3 and n, 10, interval=0.01) == 3
    assert time.monotonic() - start < 5


def test_times_out_naming_what_did_not_happen_with_its_detail():
    with pytest.raises(AssertionError, match=r"the receiver's call not met within 0.05 s\nlog tail"):
        wait_for(lambda: False, 0.05, what="the receiver's call", interval=0.01, detail=lambda: "log tail")


def test_a_failed_check_stops_the_wait_at_once():
    def exited():
        raise RuntimeError("server exited")

    start = time.monotonic()
    with pytest.raises(RuntimeError, match="server exited"):
        wait_for(lambda: False, 30, check=exited)
    assert time.monotonic() - start < 5
