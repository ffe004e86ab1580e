"""The hooks product modules call at their crash and hang points.

Each is one ``None`` check until a test arms a point: the points themselves,
their step names and how they are armed live in :mod:`batchd.testing.faults`.
A daemon started with ``BATCHD_CRASH_AT`` or ``BATCHD_HANG_AT`` in its
environment arms them when this module is first imported (a misspelled step
is a :class:`~batchd.errors.ConfigError` then, not a point that never fires).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batchd.testing.faults import Armed

_armed: Armed | None = None


def install(armed: Armed | None) -> None:
    """Route the hooks to ``armed`` (None: no-ops); see :func:`batchd.testing.faults.arm`."""
    global _armed
    _armed = armed


def armed() -> Armed | None:
    """What a test armed in this process (None: nothing)."""
    return _armed


def arm_worker(daemon_pid: int) -> None:
    """Called by a worker at start: see :func:`batchd.testing.faults.arm_worker`."""
    if _armed is not None:
        from batchd.testing.faults import arm_worker as arm

        arm(daemon_pid)


def crash_point(step: str) -> None:
    """Exit at once if a test armed a crash at ``step``; otherwise nothing."""
    if _armed is not None:
        _armed.crash_point(step)


def hang_point(step: str) -> None:
    """Block forever at ``step`` if a test armed a hang there; otherwise nothing."""
    if _armed is not None:
        _armed.hang_point(step)


if os.environ.get("BATCHD_CRASH_AT") or os.environ.get("BATCHD_HANG_AT"):
    from batchd.testing.faults import arm_from_env

    arm_from_env(os.environ)
