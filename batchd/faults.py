"""Test-only crash points: prove that a crash between any two steps loses nothing.

When the environment variable ``BATCHD_CRASH_AT`` names a step (for example
``after_claim``), the daemon calls ``os._exit(CRASH_EXIT_CODE)`` right after
that step, the way a power cut or SIGKILL would stop it: no cleanup, no
flushing. ``BATCHD_CRASH_AFTER=N`` lets the step pass N times first.
The reliability tests restart the daemon and check its invariants.
"""

from __future__ import annotations

import os
import time

CRASH_EXIT_CODE = 86
STEPS = (
    "after_claim",
    "after_register",
    "after_dispatch",
    "after_result_write",
    "after_finish",
    "after_archive",
    "during_status_write",
)

_target = os.environ.get("BATCHD_CRASH_AT", "")
_remaining = int(os.environ.get("BATCHD_CRASH_AFTER", "0") or 0)


def crash_point(step: str) -> None:
    """Exit at once if the test asked to crash at ``step``; otherwise nothing."""
    global _remaining
    if step != _target:
        return
    if _remaining > 0:
        _remaining -= 1
        return
    os._exit(CRASH_EXIT_CODE)


_hang_target = os.environ.get("BATCHD_HANG_AT", "")
_hang_after = float(os.environ.get("BATCHD_HANG_AFTER_SECONDS", "0") or 0)
_hang_armed_at: float | None = None


def hang_point(step: str) -> None:
    """Block forever at ``step`` once ``BATCHD_HANG_AFTER_SECONDS`` have passed
    since the first call, when ``BATCHD_HANG_AT`` names it: a wedged daemon,
    for proving that the systemd watchdog stops being fed."""
    global _hang_armed_at
    if step != _hang_target:
        return
    now = time.monotonic()
    if _hang_armed_at is None:
        _hang_armed_at = now
    if now - _hang_armed_at >= _hang_after:
        while True:
            time.sleep(3600)
