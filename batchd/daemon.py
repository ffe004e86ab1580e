"""The daemon: wires spool, store, watcher, scheduler, pool and HTTP together.

Start-up order matters: the spool exists, the database is migrated, a crash's
leftovers are reconciled (recovery) and the workers are up *before* the
watcher claims anything or the service reports ready.
"""

from __future__ import annotations

import os
import signal
import threading
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from batchd import log as logsetup
from batchd.clock import Clock, SystemClock
from batchd.config import Priority, Settings, load_settings
from batchd.errors import BatchdError, ConfigError
from batchd.intake import Intake
from batchd.metrics import Metrics
from batchd.outbox import Outbox
from batchd.pool import WorkerPool
from batchd.processors import resolve
from batchd.scheduler import Scheduler
from batchd.spool import Claimed, Spool, owner_name
from batchd.store import SQLiteStore
from batchd.watcher import Watcher

log = structlog.get_logger("batchd.daemon")

#: The daemon runs the retention purge this often when retention.days is set.
PURGE_INTERVAL_SECONDS = 86400.0

#: Keys whose change needs a restart; a reload logs them and keeps the old value.
RESTART_KEYS = (
    "spool.root",
    "database.path",
    "http.enabled",
    "http.host",
    "http.port",
    "watch.observer",
)


def recover(spool: Spool, store: SQLiteStore, outbox: Outbox, intake: Intake) -> dict[str, int]:
    """Reconcile ``work/``, the database and the outbox after any stop.

    * files left ``processing`` go back to ``pending`` (no attempt spent);
    * a folder in ``work/`` with no batch (crash between claim and
      registration) is registered now, under the name it was claimed with;
    * finished files still in ``work/`` get their result and move on;
      finished batches leave ``work/``;
    * half-received uploads and processor scratch folders are removed.
    """
    spool.finish_cross_device()
    spool.clear_uploads()
    spool.clear_scratch()
    requeued = store.requeue_stale()
    registered = reconciled = 0
    for priority, entry in spool.work_entries():
        rel = spool.rel(entry)
        batch = store.batch_by_work_path(rel)
        if batch is None:
            if entry.is_dir() and not any(entry.iterdir()):
                entry.rmdir()  # crash between mkdir and the rename of a loose file
                continue
            claimed = Claimed(
                entry, entry.name, priority, f"recovered:{rel}", owner_name(entry.lstat())
            )
            intake.register(claimed)
            registered += 1
            continue
        outbox.remove_stray_temporaries(batch)
        outbox.reconcile(batch)
        reconciled += 1
    for batch in store.unfinished_batches():
        if not (spool.root / batch.work_path).exists():
            # Re-queued by an operator after it had finished: its status.json
            # must say it runs again.
            outbox.reconcile(batch)
    summary = {"requeued": requeued, "registered": registered, "reconciled": reconciled}
    log.info("recovery_done", **summary)
    return summary


class Daemon:
    """One running batchd: ``run()`` blocks until SIGTERM/SIGINT and returns the exit code."""

    def __init__(
        self, settings: Settings, config_path: str | None = None, clock: Clock | None = None
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.clock = clock or SystemClock()
        self.spool = Spool(settings)
        self.store: SQLiteStore | None = None
        self.metrics = Metrics()
        self.http: Any = None
        self.watcher: Watcher | None = None
        self.scheduler: Scheduler | None = None
        self.pool: WorkerPool | None = None
        self.intake: Intake | None = None
        self.notifier: Any = None
        self._next_watchdog = 0.0
        self._next_status = 0.0
        self._finished_at_last_status = 0
        self._last_status_at = 0.0
        self._next_purge = 0.0

    # -- health ----------------------------------------------------------------

    def problems(self) -> dict[str, str]:
        """What is wrong with this daemon right now ({} when healthy)."""
        problems: dict[str, str] = {}
        if self.watcher is None or not self.watcher.is_alive():
            problems["watcher"] = "watcher thread is not running"
        if self.pool is None or self.pool.alive() < self.pool.size:
            alive = self.pool.alive() if self.pool else 0
            size = self.pool.size if self.pool else self.settings.processing.concurrency
            problems["workers"] = f"{alive} of {size} worker processes alive"
        if self.scheduler is not None:
            stalled = self.clock.monotonic() - self.scheduler.heartbeat
            limit = max(30.0, 10 * self.settings.processing.poll_seconds)
            if stalled > limit:
                problems["scheduler"] = f"scheduler loop stalled for {stalled:.0f} s"
        if self.store is not None:
            try:
                self.store.ping()
            except BatchdError as exc:
                problems["database"] = exc.message
        return problems

    # -- run -------------------------------------------------------------------

    def run(self) -> int:
        settings = self.settings
        resolve(settings.processing.processor)  # a bad processor name is a config error
        for route in settings.route:
            resolve(route.processor)
        for warning in self.spool.init():
            log.warning("spool_warning", detail=warning)
        self.store = store = SQLiteStore(settings.db_path)
        outbox = Outbox(self.spool, store)
        self.pool = pool = WorkerPool(settings, self.clock)
        self.scheduler = scheduler = Scheduler(
            settings, store, self.spool, outbox, pool, self.clock, self.metrics, self._tick
        )
        self.intake = intake = Intake(
            settings,
            self.spool,
            store,
            outbox,
            self.clock,
            on_registered=lambda batch: scheduler.wake(),
        )
        recover(self.spool, store, outbox, intake)
        pool.start()
        self.watcher = watcher = Watcher(
            self.spool,
            settings.watch,
            self.clock,
            self._take,
            on_rescan=self.metrics.rescanned,
            on_restart=self.metrics.watcher_restarted,
        )
        self._install_signals()
        watcher.start()
        if settings.http.enabled:
            self._start_http(store, intake)
        self._notify_ready()
        log.info(
            "daemon_started",
            spool=str(self.spool.root),
            pid=os.getpid(),
            workers=pool.size,
            processor=settings.processing.processor,
            http_port=self.http.port if self.http else None,
        )
        try:
            scheduler.run()
        finally:
            watcher.stop()
            if self.http is not None:
                self.http.stop()
            store.close()
        log.info("daemon_stopped")
        return 0

    def _take(self, path: Path, priority: Priority) -> object:
        assert self.intake is not None
        return self.intake.take_drop(path, priority)

    def _start_http(self, store: SQLiteStore, intake: Intake) -> None:
        from batchd.http import HttpServer

        self.http = HttpServer(
            self.settings, store, self.spool, intake, self.metrics, self.problems, self.clock
        )
        self.http.start()
        port_file = os.environ.get("BATCHD_PORT_FILE")
        if port_file:  # tests and scripts learn the ephemeral port here
            Path(port_file).write_text(str(self.http.port))

    # -- systemd ---------------------------------------------------------------

    def _notify_ready(self) -> None:
        try:
            from batchd.service import Notifier
        except ImportError:
            return
        self.notifier = Notifier.from_env()
        self.notifier.ready()
        self._next_watchdog = self.clock.monotonic()

    def _tick(self) -> None:
        """Once per scheduler turn: daily retention, systemd watchdog and STATUS."""
        now = self.clock.monotonic()
        if self.settings.retention.days and now >= self._next_purge:
            self._next_purge = now + PURGE_INTERVAL_SECONDS
            self._purge()
        if self.notifier is None or not self.notifier.enabled:
            return
        interval = self.notifier.watchdog_interval()
        if interval and now >= self._next_watchdog:
            # Only a daemon whose parts all live earns a ping; systemd
            # restarts one that stops pinging.
            if (
                self.watcher is not None
                and self.watcher.is_alive()
                and self.pool is not None
                and self.pool.alive() > 0
            ):
                self.notifier.watchdog()
            self._next_watchdog = now + interval
            if self.scheduler is not None:
                # An idle loop waits up to poll_seconds, which may be longer
                # than the watchdog interval: wake it for the next ping.
                self.scheduler.tick_by = self._next_watchdog
        if now >= self._next_status and self.store is not None and self.scheduler is not None:
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
            self._next_status = now + 5.0

    def _purge(self) -> None:
        from batchd.retention import purge

        assert self.store is not None
        cutoff = self.clock.now() - timedelta(days=self.settings.retention.days)
        try:
            purge(self.spool, self.store, cutoff)
        except (OSError, BatchdError) as exc:
            log.error("purge_failed", error=str(exc))

    # -- signals ---------------------------------------------------------------

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        log.info("shutdown_requested", signal=signal.Signals(signum).name)
        if self.notifier is not None:
            self.notifier.stopping()
        if self.watcher is not None:
            # Stop claiming at once; the watcher thread notices within a second.
            threading.Thread(target=self.watcher.stop, daemon=True).start()
        if self.scheduler is not None:
            self.scheduler.request_stop()

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        if self.scheduler is not None:
            self.scheduler.request_reload(self.reload)

    def reload(self) -> None:
        """Re-read the configuration and apply what can change while running."""
        if self.notifier is not None:
            self.notifier.reloading()
        try:
            new = load_settings(self.config_path)
            resolve(new.processing.processor)
            for route in new.route:
                resolve(route.processor)
        except ConfigError as exc:
            log.error("reload_refused", error=exc.message)
            if self.notifier is not None:
                self.notifier.ready()
            return
        old = self.settings
        for key in RESTART_KEYS:
            section, name = key.split(".")
            before = getattr(getattr(old, section), name)
            after = getattr(getattr(new, section), name)
            if before != after:
                log.warning("reload_needs_restart", key=key, running=str(before), new=str(after))
        # Keep what needs a restart as it runs now.
        new = new.model_copy(
            update={
                "spool": old.spool,
                "database": old.database,
                "watch": new.watch.model_copy(update={"observer": old.watch.observer}),
                "http": new.http.model_copy(
                    update={
                        "enabled": old.http.enabled,
                        "host": old.http.host,
                        "port": old.http.port,
                    }
                ),
            }
        )
        self.settings = new
        logsetup.configure(new.log)
        assert self.scheduler is not None and self.intake is not None
        self.scheduler.reconfigure(new)
        self.intake.settings = new
        self.spool.settings = new
        if self.watcher is not None:
            self.watcher.settings = self.watcher.readiness.settings = new.watch
        if self.http is not None:
            self.http.reconfigure(new)
        log.info("config_reloaded", concurrency=new.processing.concurrency)
        if self.notifier is not None:
            self.notifier.ready()
