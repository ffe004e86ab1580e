"""The periodic chores that ride on the scheduler's turn.

The scheduler calls :meth:`Chores.tick` once per turn; each chore keeps its
own cadence on the clock it is given (a fake clock in tests):

* the retention purge, every :data:`PURGE_INTERVAL_SECONDS` when
  ``retention.days`` is set; its ``rmtree`` of old batches can take minutes
  on a big archive, so it runs on its own thread, never on the dispatch
  thread, one purge at a time;
* registrations deferred while the database was away, as soon as it answers;
* in a cluster, claims a dead node left unregistered in ``work/``, every
  ``cluster.lease_seconds``;
* the systemd watchdog ping and STATUS line (when systemd asked for them).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import structlog

from batchd.clock import Clock
from batchd.config import Settings
from batchd.errors import BatchdError
from batchd.intake import Intake
from batchd.pool import WorkerPool
from batchd.recovery import adopt_orphans
from batchd.scheduler import Scheduler
from batchd.spool import Spool
from batchd.store import Store

# The daemon's logger: these events were always the daemon's.
log = structlog.get_logger("batchd.daemon")

#: The daemon runs the retention purge this often when retention.days is set.
PURGE_INTERVAL_SECONDS = 86400.0
#: The systemd STATUS line is rewritten this often.
STATUS_INTERVAL_SECONDS = 5.0
#: How long stopping waits for a running purge before closing the store.
PURGE_JOIN_SECONDS = 30.0


class Chores:
    """What the scheduler's turn does besides dispatching and recording."""

    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        spool: Spool,
        store: Store,
        intake: Intake,
        scheduler: Scheduler,
        pool: WorkerPool,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.spool = spool
        self.store = store
        self.intake = intake
        self.scheduler = scheduler
        self.pool = pool
        #: whether the watcher thread lives (set once the watcher exists).
        self.watcher_alive: Callable[[], bool] = lambda: False
        #: the systemd notifier, once the daemon is ready (None: no systemd).
        self.notifier: Any = None
        self._next_purge = 0.0
        self._purger: threading.Thread | None = None
        self._next_adopt = 0.0
        self._next_watchdog = clock.monotonic()
        self._next_status = 0.0
        self._finished_at_last_status = 0
        self._last_status_at = 0.0

    def tick(self) -> None:
        """Once per scheduler turn, on the scheduler's thread: whatever is due."""
        now = self.clock.monotonic()
        if self.settings.retention.days and now >= self._next_purge:
            self._next_purge = now + PURGE_INTERVAL_SECONDS
            self._start_purge()
        db_up = self.scheduler.db_error is None
        if db_up and self.intake.deferred:
            try:
                registered = self.intake.retry_deferred()
            except (OSError, BatchdError) as exc:
                log.warning("registration_still_deferred", error=str(exc))
            else:
                log.info("deferred_registered", batches=registered)
        if db_up and self.settings.database.url and now >= self._next_adopt:
            self._next_adopt = now + self.settings.cluster.lease_seconds
            adopt_orphans(self.spool, self.store, self.intake, self.settings.cluster.lease_seconds)
        if self.notifier is not None and self.notifier.enabled:
            self._feed_systemd(now)

    def stop(self) -> None:
        """Wait (bounded) for a running purge, so the store closes after it."""
        if self._purger is not None:
            self._purger.join(PURGE_JOIN_SECONDS)

    # -- retention -------------------------------------------------------------

    def _start_purge(self) -> None:
        if self._purger is not None and self._purger.is_alive():
            return  # the last one still runs: the next interval tries again
        cutoff = self.clock.now() - timedelta(days=self.settings.retention.days)
        self._purger = threading.Thread(
            target=self._purge, args=(cutoff,), name="batchd-purge", daemon=True
        )
        self._purger.start()

    def _purge(self, cutoff: datetime) -> None:
        from batchd.retention import purge

        try:
            purge(self.spool, self.store, cutoff)
        except (OSError, BatchdError) as exc:
            log.error("purge_failed", error=str(exc))

    # -- systemd ---------------------------------------------------------------

    def _feed_systemd(self, now: float) -> None:
        interval = self.notifier.watchdog_interval()
        if interval and now >= self._next_watchdog:
            # Only a daemon whose parts all live earns a ping; systemd
            # restarts one that stops pinging.
            if self.watcher_alive() and self.pool.alive() > 0:
                self.notifier.watchdog()
            self._next_watchdog = now + interval
            # An idle loop waits up to poll_seconds, which may be longer
            # than the watchdog interval: wake it for the next ping.
            self.scheduler.tick_by = self._next_watchdog
        if now >= self._next_status:
            counts = self.store.queue_counts()
            done = self.scheduler.finished_count
            elapsed = max(now - self._last_status_at, 1e-9)
            rate = (
                (done - self._finished_at_last_status) * 60 / elapsed
                if self._last_status_at
                else 0.0
            )
            self._finished_at_last_status, self._last_status_at = done, now
            self.notifier.status(
                f"{counts['pending']} pending, {counts['processing']} processing,"
                f" {rate:.0f} files/min"
            )
            self._next_status = now + STATUS_INTERVAL_SECONDS
