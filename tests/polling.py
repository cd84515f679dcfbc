"""The one way a test waits: poll a condition until it holds, or fail saying what did not happen."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T],
    timeout: float,
    *,
    what: str = "the condition",
    interval: float = 0.2,
    check: Callable[[], None] | None = None,
    detail: Callable[[], str] | None = None,
) -> T:
    """``condition()``'s first truthy value, polled every ``interval`` seconds.

    ``check()`` runs before each poll and raises when waiting longer is pointless (the process
    being waited for has exited); past ``timeout`` seconds, AssertionError names ``what`` and
    appends ``detail()`` (a log tail, say).
    """
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        got = condition()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not met within {timeout:g} s" + (f"\n{detail()}" if detail else ""))
        time.sleep(interval)
