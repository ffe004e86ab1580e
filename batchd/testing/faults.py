"""Crash and hang points: prove that a crash between any two steps loses nothing.

A test arms a point explicitly, in the daemon's environment (the daemon runs
in a process of its own)::

    BATCHD_CRASH_AT=<step>             exit CRASH_EXIT_CODE right after that step,
                                       the way a power cut or SIGKILL would stop it:
                                       no cleanup, no flushing
    BATCHD_CRASH_AFTER=N               let the step pass N times first
    BATCHD_HANG_AT=<step>              block forever at that step (a wedged daemon,
                                       for proving the systemd watchdog stops being fed)
    BATCHD_HANG_AFTER_SECONDS=S        only once S seconds have passed since its first call

or in-process with :func:`arm`. A step that is not one of :data:`STEPS` /
:data:`HANG_STEPS` is refused with :class:`~batchd.errors.ConfigError` when
armed, so a misspelled step cannot silently never fire; a product module
calling a hook with an unknown step raises too, once anything is armed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from batchd.errors import ConfigError

CRASH_EXIT_CODE = 86
#: Where the daemon may be made to crash (:func:`batchd.faults.crash_point`).
STEPS = (
    "after_claim",
    "after_register",
    "after_dispatch",
    "after_result_write",
    "after_finish",
    "after_archive",
    "during_status_write",
)
#: Where the daemon may be made to hang (:func:`batchd.faults.hang_point`).
HANG_STEPS = ("scheduler_turn",)


@dataclass
class Armed:
    """The points a test armed; what the hooks of :mod:`batchd.faults` consult."""

    crash_at: str = ""
    crash_after: int = 0
    hang_at: str = ""
    hang_after_seconds: float = 0.0
    hang_armed_at: float | None = None

    def crash_point(self, step: str) -> None:
        """Exit at once if armed to crash at ``step`` (after its passes are used up)."""
        _known(step, STEPS, "crash")
        if step != self.crash_at:
            return
        if self.crash_after > 0:
            self.crash_after -= 1
            return
        os._exit(CRASH_EXIT_CODE)

    def hang_point(self, step: str) -> None:
        """Block forever at ``step`` once ``hang_after_seconds`` have passed since
        its first call, if armed to hang there."""
        _known(step, HANG_STEPS, "hang")
        if step != self.hang_at:
            return
        now = time.monotonic()
        if self.hang_armed_at is None:
            self.hang_armed_at = now
        if now - self.hang_armed_at >= self.hang_after_seconds:
            while True:
                time.sleep(3600)


def _known(step: str, steps: tuple[str, ...], kind: str) -> None:
    if step not in steps:
        raise ConfigError(
            f"{step!r} is not a {kind} step of batchd.testing.faults; use one of {', '.join(steps)}"
        )


def arm(
    crash_at: str = "", crash_after: int = 0, hang_at: str = "", hang_after_seconds: float = 0.0
) -> Armed:
    """Arm the points named (an empty name arms nothing); returns what is armed.

    Raises :class:`ConfigError` for a step that does not exist.
    """
    if crash_at:
        _known(crash_at, STEPS, "crash")
    if hang_at:
        _known(hang_at, HANG_STEPS, "hang")
    from batchd import faults

    armed = Armed(crash_at, crash_after, hang_at, hang_after_seconds)
    faults.install(armed)
    return armed


def arm_from_env(env: Mapping[str, str]) -> Armed | None:
    """Arm what ``BATCHD_CRASH_AT`` / ``BATCHD_HANG_AT`` name in ``env``; None if neither."""
    crash_at = env.get("BATCHD_CRASH_AT", "")
    hang_at = env.get("BATCHD_HANG_AT", "")
    if not crash_at and not hang_at:
        return None
    try:
        crash_after = int(env.get("BATCHD_CRASH_AFTER", "0") or 0)
        hang_after = float(env.get("BATCHD_HANG_AFTER_SECONDS", "0") or 0)
    except ValueError as exc:
        raise ConfigError(
            f"BATCHD_CRASH_AFTER / BATCHD_HANG_AFTER_SECONDS must be numbers: {exc}"
        ) from None
    return arm(crash_at, crash_after, hang_at, hang_after)


def disarm() -> None:
    """Make every hook a no-op again."""
    from batchd import faults

    faults.install(None)
