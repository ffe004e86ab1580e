"""The daemon, and batchd's composition root: :func:`build` makes every part once.

Start-up order matters: the spool exists, the database is migrated, a crash's
leftovers are reconciled (recovery) and the workers are up *before* the
watcher claims anything or the service reports ready.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import generate_latest

from batchd import control
from batchd import log as logsetup
from batchd.archiver import Archiver
from batchd.chores import Chores
from batchd.clock import Clock, SystemClock
from batchd.config import Priority, Settings, load_settings
from batchd.diskspace import free_space_problem
from batchd.errors import (
    BatchdError,
    ConfigError,
    SpoolError,
    StartupError,
)
from batchd.httpguard import Tokens
from batchd.httpproc import DaemonAnswers, HttpProcess
from batchd.intake import Intake
from batchd.metrics import Metrics
from batchd.outbox import Outbox, ResultSyncer
from batchd.pool import WorkerPool
from batchd.processors import ocr
from batchd.records import BatchRow
from batchd.recovery import check_node_id, recover, settle_dead_uploads
from batchd.reloading import check_processors, keep_restart_keys
from batchd.scheduler import Scheduler
from batchd.spool import Spool
from batchd.store import Store, open_store
from batchd.watcher import Watcher

if TYPE_CHECKING:
    from batchd.http import HttpServer

#: How often the READY wait for the HTTP process looks for a stop signal.
READY_POLL_SECONDS = 0.1

log = structlog.get_logger("batchd.daemon")


@dataclass
class Parts:
    """Every part of one batchd, made once by :func:`build` and connected; none started."""

    settings: Settings
    clock: Clock
    spool: Spool
    store: Store
    outbox: Outbox
    metrics: Metrics
    pool: WorkerPool
    scheduler: Scheduler
    intake: Intake
    chores: Chores
    watcher: Watcher
    http: HttpServer | None
    #: what /healthz reports as wrong ({} when healthy); the daemon sets its own.
    health: Callable[[], dict[str, str]] = dict

    @property
    def archiver(self) -> Archiver:
        return self.scheduler.archiver

    @property
    def syncer(self) -> ResultSyncer:
        """The fsync pool the archiver and the outcomes' barrier share."""
        return self.scheduler.syncer


def build(
    settings: Settings,
    clock: Clock,
    *,
    spool: Spool | None = None,
    metrics: Metrics | None = None,
    http: bool = True,
) -> Parts:
    """Make every part of a batchd once and wire them together.

    Opens (and migrates) the store, so the spool must exist (``Spool.init``);
    starts nothing: no worker, no thread, no socket. The daemon, tests and
    bench/ all assemble batchd here. ``http=False`` leaves ``parts.http``
    out: the daemon serves HTTP from a process of its own
    (:mod:`batchd.httpproc`), tests in this one.
    """
    spool = spool or Spool(settings)
    metrics = metrics or Metrics()
    store = open_store(settings)
    outbox = Outbox(spool, store)
    pool = WorkerPool(settings, clock)
    scheduler = Scheduler(settings, store, spool, outbox, pool, clock, metrics)
    intake = Intake(
        settings,
        spool,
        store,
        outbox,
        clock,
        on_registered=lambda batch: scheduler.wake(),
        # Held a moment: a batch that ends sooner (a loose file) gets only
        # its final document (issue 15).
        write_status=lambda batch: scheduler.archiver.first_status(
            batch.id, first_status_hold(scheduler.settings)
        ),
    )
    chores = Chores(settings, clock, spool, store, intake, scheduler, pool)
    scheduler.on_tick = chores.tick
    watcher = Watcher(
        spool,
        settings.watch,
        clock,
        lambda path, priority: take_if_room(
            intake, path, priority, intake.settings.limits.min_free_bytes
        ),
        on_rescan=metrics.rescanned,
        on_restart=metrics.watcher_restarted,
        take_many=lambda drops: take_many_if_room(
            intake, drops, intake.settings.limits.min_free_bytes
        ),
    )
    chores.watcher_alive = watcher.is_alive
    parts = Parts(
        settings,
        clock,
        spool,
        store,
        outbox,
        metrics,
        pool,
        scheduler,
        intake,
        chores,
        watcher,
        None,
    )
    if settings.http.enabled and http:
        from batchd.http import HttpServer

        parts.http = HttpServer(
            settings, store, spool, intake, metrics, lambda: parts.health(), clock
        )
        parts.http.inbox = watcher.inbox
    return parts


def first_status_hold(settings: Settings) -> float:
    """Seconds a new batch's first status.json waits: the hold, never over the
    status interval (SPEC section 3: a change shows within it)."""
    processing = settings.processing
    return min(processing.first_status_hold_seconds, processing.status_interval_seconds)


def take_if_room(
    intake: Intake, path: Path, priority: Priority, min_free_bytes: int
) -> BatchRow | None:
    """The watcher's claim: a ready drop is taken unless the disk is under its floor."""
    disk = free_space_problem(intake.spool.root, min_free_bytes)
    if disk is not None:
        # Left in the inbox: the next rescan offers it again.
        log.warning("claim_postponed", path=str(path), reason=disk)
        return None
    return intake.take_drop(path, priority)


def take_many_if_room(
    intake: Intake, drops: list[tuple[Path, Priority]], min_free_bytes: int
) -> list[BatchRow | Exception | None]:
    """:func:`take_if_room` for several ready drops, registered together."""
    disk = free_space_problem(intake.spool.root, min_free_bytes)
    if disk is not None:
        for path, _priority in drops:
            log.warning("claim_postponed", path=str(path), reason=disk)
        return [None] * len(drops)
    return intake.take_drops(drops)


def _stop_resource_tracker() -> None:
    """Stop multiprocessing's resource tracker with the daemon.

    The spawn context starts it as a child of the daemon; left running, it
    outlives the main process by a moment and systemd logs SIGKILLing it on
    every stop. Closing its pipe ends it, and waiting reaps it.
    """
    from multiprocessing import resource_tracker

    stop = getattr(resource_tracker._resource_tracker, "_stop", None)
    if stop is not None:
        with contextlib.suppress(OSError, ChildProcessError):
            stop()


class Daemon:
    """One running batchd: ``run()`` blocks until SIGTERM/SIGINT and returns the exit code."""

    def __init__(
        self, settings: Settings, config_path: str | None = None, clock: Clock | None = None
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.clock = clock or SystemClock()
        self.spool = Spool(settings)
        self.store: Store | None = None
        self.metrics = Metrics()
        #: the listening socket, bound before recovery, and the process serving it.
        self.http_socket: socket.socket | None = None
        self.http: HttpProcess | None = None
        self.http_tokens: Tokens | None = None
        self.watcher: Watcher | None = None
        self.scheduler: Scheduler | None = None
        self.pool: WorkerPool | None = None
        self.intake: Intake | None = None
        self.notifier: Any = None
        self.chores: Chores | None = None
        self.lock = control.spool_lock(settings)
        self.reload_file = control.reload_path(settings)
        self._reload_generation = 0
        #: signals received, counted by the handler (which does nothing else).
        self._stop_signals = 0
        self._stop_signal_name = ""
        self._reload_pending = False

    # -- health ----------------------------------------------------------------

    def problems(self) -> dict[str, str]:
        """What is wrong with this daemon right now ({} when healthy)."""
        problems: dict[str, str] = {}
        if self.watcher is None or not self.watcher.is_alive():
            problems["watcher"] = "watcher thread is not running"
        elif (watcher_problem := self.watcher.problem()) is not None:
            problems["watcher"] = watcher_problem
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
        if self.scheduler is not None and self.scheduler.db_error is not None:
            problems.setdefault("database", self.scheduler.db_error)
        disk = free_space_problem(self.spool.root, self.settings.limits.min_free_bytes)
        if disk is not None:
            problems["disk"] = f"{disk}; uploads get 507 and claims wait"
        return problems

    # -- run -------------------------------------------------------------------

    def run(self) -> int:
        settings = self.settings
        check_processors(settings)
        if settings.inspect.ocr == "auto" and (why := ocr.unavailable_reason(settings.inspect)):
            # Not an error: scans come back without text, saying ocr: "unavailable".
            log.warning("ocr_unavailable", reason=why)
        # The lock first: a second daemon on this spool must not touch
        # anything (recovery would requeue the first one's running files).
        self.lock.acquire()
        # Handlers from here on: a SIGHUP (`batchd reload`) or SIGTERM during
        # recovery is kept for the scheduler instead of killing the process.
        previous = self._install_signals()
        try:
            return self._run_locked()
        finally:
            for signum, handler in previous.items():
                if handler is not None:  # None: not set from Python; leave ours
                    signal.signal(signum, handler)
            self.lock.release()

    def _run_locked(self) -> int:
        settings = self.settings
        try:
            warnings = self.spool.init()
        except SpoolError as exc:
            raise StartupError(exc.message) from None
        for warning in warnings:
            log.warning("spool_warning", detail=warning)
        parts = build(settings, self.clock, spool=self.spool, metrics=self.metrics, http=False)
        parts.health = self.problems
        self.store = store = parts.store
        if settings.database.url:
            check_node_id(store, settings.cluster.lease_seconds)
        self._reload_generation = int(control.read_reload(self.reload_file).get("generation", 0))
        self.pool = pool = parts.pool
        self.intake = intake = parts.intake
        self.chores = chores = parts.chores
        self.scheduler = scheduler = parts.scheduler
        scheduler.on_stop = self._stopping
        if self._stop_signals:
            scheduler.signal_stop(force=self._stop_signals > 1)
        if self._reload_pending:
            scheduler.request_reload(self.reload)
        if settings.http.enabled:
            # Bind before recovery: a taken port ends start-up before it has
            # changed anything, and the port is ours from here on.
            self._bind_http()
        recover(self.spool, store, parts.outbox, intake)
        pool.start()
        self.watcher = watcher = parts.watcher
        watcher.start()
        if self.http_socket is not None:
            self.http = HttpProcess(
                settings,
                self.http_socket,
                DaemonAnswers(
                    health=self.problems,
                    inbox=watcher.inbox,
                    metrics=lambda: generate_latest(self.metrics.registry),
                    write_status=parts.archiver.refresh,
                    wake=scheduler.wake,
                    settle=lambda: settle_dead_uploads(self.spool, store, intake),
                ),
                self.http_tokens,
            )
            self.http.start()
            scheduler.address = f"{settings.http.host}:{self.http.port}"
            self._wait_http_serving(self.http)
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
            elif self.http_socket is not None:
                self.http_socket.close()
            chores.stop()
            store.close()
            _stop_resource_tracker()
        log.info("daemon_stopped")
        return 0

    def _take(self, path: Path, priority: Priority) -> BatchRow | None:
        assert self.intake is not None
        return take_if_room(self.intake, path, priority, self.settings.limits.min_free_bytes)

    def _bind_http(self) -> None:
        from batchd.http import listen

        # The HTTP process reads its tokens again when it starts; read them
        # here first, so an unreadable http.users_file ends start-up with its
        # ConfigError (exit 78) instead of killing each HTTP process in turn.
        self.http_tokens = Tokens(self.settings.http)
        self.http_socket = listen(self.settings)
        port_file = os.environ.get("BATCHD_PORT_FILE")
        if port_file:  # tests and scripts learn the ephemeral port here
            Path(port_file).write_text(str(self.http_socket.getsockname()[1]))

    # -- systemd ---------------------------------------------------------------

    def _wait_http_serving(self, http: HttpProcess) -> None:
        """Hold READY=1 until the HTTP process serves, at most http.ready_timeout_seconds.

        Without the wait, clients started after READY (``After=batchd.service``)
        waited in the listen backlog while the child imported and opened the
        store. Past the deadline READY=1 is sent anyway: files are the
        service, the API a part the supervisor keeps restarting; a failed
        start-up would stop file processing for an API problem. A SIGTERM
        meanwhile ends the wait (the stop is not held for the timeout).
        """
        timeout = self.settings.http.ready_timeout_seconds
        deadline = time.monotonic() + timeout
        # In slices: the signal handler only counts the stop (it may take no
        # lock), so the wait looks at the count between slices.
        while not http.wait_serving(min(READY_POLL_SECONDS, deadline - time.monotonic())):
            if self._stop_signals:
                log.info(
                    "http_ready_wait_stopped",
                    detail="a stop signal came while waiting for the HTTP process to serve",
                )
                return
            if time.monotonic() >= deadline:
                log.error(
                    "http_not_serving_at_ready",
                    timeout_seconds=timeout,
                    port=http.port,
                    detail="the HTTP process did not say it serves within"
                    " http.ready_timeout_seconds: READY=1 sent anyway, files are processed;"
                    " see http_process_died / the HTTP process's own events in this log",
                )
                return

    def _notify_ready(self) -> None:
        try:
            from batchd.service import Notifier
        except ImportError:
            return
        self.notifier = Notifier.from_env()
        self.notifier.ready()
        if self.chores is not None:
            self.chores.notifier = self.notifier

    # -- signals ---------------------------------------------------------------

    def _install_signals(self) -> dict[int, Any]:
        """Install the handlers; returns the ones they replaced (restored at the end)."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous: dict[int, Any] = {}
        for signum, handler in (
            (signal.SIGTERM, self._on_stop),
            (signal.SIGINT, self._on_stop),
            (signal.SIGHUP, self._on_reload),
        ):
            previous[signum] = signal.signal(signum, handler)
        return previous

    # The handlers only set a flag and wake the scheduler loop: logging,
    # sd_notify or taking a lock inside a handler can deadlock with the very
    # code the signal interrupted.

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stop_signals += 1
        self._stop_signal_name = signal.Signals(signum).name
        if self.scheduler is not None:
            self.scheduler.signal_stop(force=self._stop_signals > 1)

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        if self.scheduler is not None:
            self.scheduler.request_reload(self.reload)
        else:
            self._reload_pending = True  # still starting: applied once the loop runs

    def _stopping(self, forced: bool) -> None:
        """On the scheduler's thread, once a stop (or a forced stop) was asked for."""
        if forced:
            log.warning("shutdown_forced", detail="second stop signal: requeueing running files")
            return
        grace = self.settings.processing.shutdown_grace_seconds
        log.info(
            "shutdown_requested",
            signal=self._stop_signal_name or "request",
            detail=f"finishing running files for up to {grace:g} s;"
            " send the signal again (Ctrl-C) to stop at once",
        )
        if self.notifier is not None:
            self.notifier.stopping()
        if self.watcher is not None:
            # Stop claiming at once; the watcher thread notices within a second.
            threading.Thread(target=self.watcher.stop, daemon=True).start()

    def _verdict(self, ok: bool, error: str | None, needs_restart: list[str]) -> None:
        """Tell ``batchd reload`` what became of this SIGHUP."""
        self._reload_generation += 1
        try:
            control.write_reload(
                self.reload_file,
                {
                    "generation": self._reload_generation,
                    "pid": os.getpid(),
                    "ok": ok,
                    "error": error,
                    "needs_restart": needs_restart,
                    "at": self.clock.now().isoformat(),
                },
            )
        except OSError as exc:
            log.error("reload_verdict_unwritten", path=str(self.reload_file), error=str(exc))

    def reload(self) -> None:
        """Re-read the configuration and apply what can change while running."""
        if self.notifier is not None:
            self.notifier.reloading()
        try:
            new = load_settings(self.config_path)
            check_processors(new)
        except ConfigError as exc:
            log.error("reload_refused", error=exc.message)
            self._verdict(False, exc.message, [])
            if self.notifier is not None:
                self.notifier.ready()
            return
        new, needs_restart = keep_restart_keys(self.settings, new)
        self.settings = new
        logsetup.configure(new.log)
        assert self.scheduler is not None and self.intake is not None
        self.scheduler.reconfigure(new)
        self.intake.settings = new
        self.spool.settings = new
        if self.chores is not None:
            self.chores.settings = new
        if self.watcher is not None:
            self.watcher.settings = self.watcher.readiness.settings = new.watch
        if self.http is not None:
            self.http.reconfigure(new)
        log.info("config_reloaded", concurrency=new.processing.concurrency)
        self._verdict(True, None, needs_restart)
        if self.notifier is not None:
            self.notifier.ready()
