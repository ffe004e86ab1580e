"""Time, passed in wherever logic depends on it.

The daemon reads the wall clock for timestamps it stores and the monotonic
clock for every timer (settle, back-off, timeouts), so a clock jump never
fires or stalls a timer. Tests pass their own :class:`Clock`.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """What batchd needs to know about time."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""

    def now(self) -> datetime:
        """The current wall-clock time, timezone-aware UTC."""


class SystemClock:
    """The real clocks."""

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(UTC)


def iso(dt: datetime) -> str:
    """Fixed-width ISO 8601 UTC with milliseconds: ``2026-11-28T10:00:00.123Z``.

    Fixed width matters: the store compares and sorts these as text.
    """
    dt = dt.astimezone(UTC)
    # Formatted by hand: strftime goes through the C library's locale and
    # time-zone machinery, and this runs several times per file.
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:"
        f"{dt.second:02d}.{dt.microsecond // 1000:03d}Z"
    )


def parse_iso(text: str) -> datetime:
    """Inverse of :func:`iso` (also accepts any ISO 8601 string Python parses)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def utcnow_iso() -> str:
    """:func:`iso` of the current time."""
    return iso(datetime.now(UTC))
