"""Waiting with a deadline: the one way tests (and bench/) wait for something to happen."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: How long :func:`wait_until` waits by default: long enough for a loaded CI machine.
WAIT_TIMEOUT_SECONDS = 20.0
#: How often :func:`wait_until` asks again by default.
WAIT_INTERVAL_SECONDS = 0.05


def wait_until(
    cond: Callable[[], T],
    timeout: float = WAIT_TIMEOUT_SECONDS,
    *,
    interval: float = WAIT_INTERVAL_SECONDS,
    what: str = "condition",
) -> T:
    """Poll ``cond`` until it returns something truthy and return that value;
    raise :class:`AssertionError` naming ``what`` after ``timeout`` seconds.

    Never a bare sleep in a test: the wait ends as soon as the condition
    holds, and a condition that never holds fails with what was awaited.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


__all__ = ["WAIT_INTERVAL_SECONDS", "WAIT_TIMEOUT_SECONDS", "wait_until"]
