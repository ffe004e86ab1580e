"""Test doubles shared by the unit tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class FakeClock:
    """A clock (see batchd.clock.Clock) that only moves when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def monotonic(self) -> float:
        return self.t

    def now(self) -> datetime:
        return datetime(2026, 11, 28, tzinfo=UTC) + timedelta(seconds=self.t)

    def advance(self, seconds: float) -> None:
        self.t += seconds
