"""Test-only crash points: prove that a crash between any two steps loses nothing.

When the environment variable ``BATCHD_CRASH_AT`` names a step (for example
``after_claim``), the daemon calls ``os._exit(CRASH_EXIT_CODE)`` right after
that step, the way a power cut or SIGKILL would stop it: no cleanup, no
flushing. ``BATCHD_CRASH_AFTER=N`` lets the step pass N times first.
The reliability tests restart the daemon and check its invariants.
"""

from __future__ import annotations

import os

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
