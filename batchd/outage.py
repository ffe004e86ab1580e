"""The database-outage guard of the scheduler's outcomes.

The database may go away (restart, fail-over, network). Every step of the
loop that talks to it runs through :meth:`OutageGuard.guarded`: a
:class:`StoreError` never ends the loop; it is logged once per outage, and
the next attempt waits 0.5 s, 1 s, 2 s ... up to
:data:`DB_RETRY_MAX_SECONDS`, asking the database with a ping before any
step runs again. Meanwhile the outcomes wait in memory
(:class:`batchd.outcomes.Outcomes`) and no new file starts.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from batchd.clock import Clock
from batchd.errors import StoreError
from batchd.store import Store

# The scheduler's logger: operators know these events by it.
log = structlog.get_logger("batchd.scheduler")

#: First wait before talking to an unreachable database again; doubles per failure.
DB_RETRY_MIN_SECONDS = 0.5
#: The longest wait between two attempts to reach the database.
DB_RETRY_MAX_SECONDS = 10.0


class OutageGuard:
    """Whether the database answers, and when to ask it again (a mixin of Outcomes)."""

    clock: Clock
    store: Store

    def __init__(self) -> None:
        #: the last database error while it lasts (None: the database answers).
        self.db_error: str | None = None
        self._db_failures = 0
        #: monotonic time of the next attempt to reach the database while it is away.
        self.db_retry_at = 0.0
        #: called when the database answers again (the loop renews its leases).
        self.on_reconnect: Callable[[], None] = lambda: None

    def _waiting(self) -> int:
        """Outcomes waiting for the database (for the log)."""
        return 0

    def _running_count(self) -> int:
        """Attempts running (for the log)."""
        return 0

    def guarded(self, step: Callable[[], object]) -> None:
        """Run a step that talks to the database, unless it is away and not yet due a retry."""
        if self.db_error is not None:
            if self.clock.monotonic() < self.db_retry_at:
                return
            try:
                # A step may not touch the database at all: ask it directly.
                self.store.ping()
            except StoreError as exc:
                self.db_failed(exc)
                return
            log.warning(
                "database_reconnected", failures=self._db_failures, outcomes=self._waiting()
            )
            self.db_error = None
            self._db_failures = 0
            self.on_reconnect()  # the loop renews the leases at once
        try:
            step()
        except StoreError as exc:
            self.db_failed(exc)

    def db_failed(self, exc: StoreError) -> None:
        if self.db_error is None:
            log.error("database_unavailable", error=exc.message, running=self._running_count())
        self.db_error = exc.message
        self._db_failures += 1
        backoff = min(DB_RETRY_MAX_SECONDS, DB_RETRY_MIN_SECONDS * 2 ** (self._db_failures - 1))
        self.db_retry_at = self.clock.monotonic() + backoff
