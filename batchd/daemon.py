"""The daemon: wires spool, store, watcher, scheduler, pool and HTTP together.

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
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from batchd import control
from batchd import log as logsetup
from batchd.clock import Clock, SystemClock, parse_iso
from batchd.config import Priority, Settings, load_settings
from batchd.diskspace import free_space_problem
from batchd.errors import (
    AlreadyRegistered,
    BatchdError,
    ConfigError,
    SpoolError,
    StartupError,
    StoreError,
)
from batchd.fsutil import owner_name
from batchd.intake import Intake
from batchd.metrics import Metrics
from batchd.outbox import Outbox
from batchd.pool import WorkerPool
from batchd.processors import ocr, resolve
from batchd.records import Status
from batchd.scheduler import Scheduler
from batchd.spool import Claimed, Spool
from batchd.store import Store, open_store
from batchd.watcher import Watcher

log = structlog.get_logger("batchd.daemon")

#: The daemon runs the retention purge this often when retention.days is set.
PURGE_INTERVAL_SECONDS = 86400.0

#: Keys whose change needs a restart; a reload logs them and keeps the old value.
RESTART_KEYS = (
    "spool.root",
    "database.path",
    "database.url",
    "http.enabled",
    "http.host",
    "http.port",
    "watch.observer",
    "cluster.node_id",
    "cluster.lease_seconds",
    "cluster.heartbeat_seconds",
)

#: In a cluster, an upload folder unchanged this long belonged to a node that
#: died mid-upload (a live upload writes to it all the time).
STALE_UPLOAD_SECONDS = 3600.0


def recover(spool: Spool, store: Store, outbox: Outbox, intake: Intake) -> dict[str, int]:
    """Reconcile ``work/``, the database and the outbox after any stop.

    * files left ``processing`` go back to ``pending`` (no attempt spent);
      in a cluster only this node's (the store knows whose they are);
    * a folder in ``work/`` with no batch (crash between claim and
      registration) is registered now, under the name it was claimed with;
      in a cluster another node may register it first, which is fine;
    * finished files still in ``work/`` get their result and move on;
      finished batches leave ``work/``;
    * half-received uploads and processor scratch folders are removed; in a
      cluster only those no live node can still be using.
    """
    spool.finish_cross_device()
    if spool.settings.database.url:
        # Other nodes share these folders and may be using them right now: a
        # scratch folder goes only once its file is not processing anywhere,
        # an upload folder once nothing in it changed for STALE_UPLOAD_SECONDS.
        cutoff = time.time() - STALE_UPLOAD_SECONDS
        spool.clear_scratch(keep=lambda entry: _file_running(store, entry.name))
        spool.clear_uploads(keep=lambda entry: _newest_mtime(entry) >= cutoff)
    else:
        spool.clear_uploads()
        spool.clear_scratch()
    # Batches with files cut off mid-run: their status.json says "processing"
    # and must be rewritten; the others are rewritten only if something moves.
    was_running = set(store.batches_with_files_in([Status.PROCESSING]))
    requeued = store.requeue_stale()
    registered = reconciled = 0
    for priority, entry in spool.work_entries():
        rel = spool.rel(entry)
        batch = store.batch_by_work_path(rel)
        if batch is None:
            if entry.is_dir() and not any(entry.iterdir()):
                entry.rmdir()  # crash between mkdir and the rename of a loose file
                continue
            try:
                if intake.register_claimed(_orphan_claim(spool, priority, entry)) is not None:
                    registered += 1
            except StoreError:
                raise  # no database: start-up cannot go on anyway
            except Exception as exc:
                # One orphan that cannot be registered must not stop every
                # start (a restart loop): it goes to failed/ as it is.
                log.error("orphan_not_registered", path=str(entry), error=repr(exc))
                spool.refuse_whole(rel, spool.unique_name(entry.name, store.name_taken))
            continue
        outbox.remove_stray_temporaries(batch)
        try:
            outbox.reconcile(batch, force_status=batch.id in was_running)
        except OSError as exc:
            # A full or read-only archive/outbox must not stop start-up: the
            # inputs stay in work/ (nothing is lost) and the next start retries.
            log.error("recovery_reconcile_failed", batch_id=batch.id, error=str(exc))
            continue
        reconciled += 1
    for batch in store.unfinished_batches():
        if not (spool.root / batch.work_path).exists():
            # Re-queued by an operator after it had finished: its status.json
            # must say it runs again.
            outbox.reconcile(batch)
    summary = {"requeued": requeued, "registered": registered, "reconciled": reconciled}
    log.info("recovery_done", **summary)
    return summary


def _orphan_claim(spool: Spool, priority: Priority, entry: Path) -> Claimed:
    """A folder found in ``work/`` with no batch, as a claim to register."""
    return Claimed(
        entry, entry.name, priority, f"recovered:{spool.rel(entry)}", owner_name(entry.lstat())
    )


def _file_running(store: Store, file_id: str) -> bool:
    file = store.get_file(file_id)
    return file is not None and file.status == Status.PROCESSING


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
            except FileNotFoundError:
                continue
    return newest


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


def _check_node_id(store: Store, lease_seconds: float) -> None:
    """Refuse to start under a node id another live process is using.

    Two nodes under one id would renew each other's leases and requeue each
    other's files at start: a configuration error (exit 78), not a race to
    lose files in.
    """
    me = (socket.gethostname(), os.getpid())
    for node in store.nodes():
        if node.node_id != store.node_id or (node.host, node.pid) == me:
            continue
        try:
            age = time.time() - parse_iso(node.last_heartbeat).timestamp()
        except ValueError:
            continue
        if age > lease_seconds:
            continue  # its heartbeat stopped: a node that died or stopped
        if node.host == me[0] and not _pid_alive(node.pid):
            continue
        raise ConfigError(
            f"cluster.node_id {node.node_id!r} is in use by a live node"
            f" (host {node.host}, pid {node.pid}, last heartbeat {age:.0f} s ago);"
            " give each node its own cluster.node_id"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        self._next_adopt = 0.0
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
        resolve(settings.processing.processor)  # a bad processor name is a config error
        for route in settings.route:
            resolve(route.processor)
        ocr.check_settings(settings)  # inspect.ocr = "always" needs Tesseract installed
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
        self.store = store = open_store(settings)
        if settings.database.url:
            _check_node_id(store, settings.cluster.lease_seconds)
        self._reload_generation = int(control.read_reload(self.reload_file).get("generation", 0))
        outbox = Outbox(self.spool, store)
        self.pool = pool = WorkerPool(settings, self.clock)
        self.scheduler = scheduler = Scheduler(
            settings, store, self.spool, outbox, pool, self.clock, self.metrics, self._tick
        )
        scheduler.on_stop = self._stopping
        if self._stop_signals:
            scheduler.signal_stop(force=self._stop_signals > 1)
        if self._reload_pending:
            scheduler.request_reload(self.reload)
        self.intake = intake = Intake(
            settings,
            self.spool,
            store,
            outbox,
            self.clock,
            on_registered=lambda batch: scheduler.wake(),
            write_status=lambda batch: scheduler.settler.refresh(batch.id),
        )
        if settings.http.enabled:
            # Bind before recovery: a taken port ends start-up before it has
            # changed anything, and the port is ours from here on.
            self._bind_http(store, intake)
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
        watcher.start()
        if self.http is not None:
            self.http.serve()
            scheduler.address = f"{settings.http.host}:{self.http.port}"
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
            _stop_resource_tracker()
        log.info("daemon_stopped")
        return 0

    def _take(self, path: Path, priority: Priority) -> object:
        assert self.intake is not None
        disk = free_space_problem(self.spool.root, self.settings.limits.min_free_bytes)
        if disk is not None:
            # Left in the inbox: the next rescan offers it again.
            log.warning("claim_postponed", path=str(path), reason=disk)
            return None
        return self.intake.take_drop(path, priority)

    def _inbox(self) -> list[dict[str, str | None]]:
        return self.watcher.inbox() if self.watcher is not None else []

    def _bind_http(self, store: Store, intake: Intake) -> None:
        from batchd.http import HttpServer

        self.http = HttpServer(
            self.settings, store, self.spool, intake, self.metrics, self.problems, self.clock
        )
        self.http.inbox = self._inbox
        self.http.bind()
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
        """Once per scheduler turn: daily retention, claims waiting for the
        database, orphaned claims (cluster), systemd watchdog and STATUS."""
        now = self.clock.monotonic()
        if self.settings.retention.days and now >= self._next_purge:
            self._next_purge = now + PURGE_INTERVAL_SECONDS
            self._purge()
        db_up = self.scheduler is not None and self.scheduler.db_error is None
        if db_up and self.intake is not None and self.intake.deferred:
            try:
                registered = self.intake.retry_deferred()
            except (OSError, BatchdError) as exc:
                log.warning("registration_still_deferred", error=str(exc))
            else:
                log.info("deferred_registered", batches=registered)
        if db_up and self.settings.database.url and now >= self._next_adopt:
            self._next_adopt = now + self.settings.cluster.lease_seconds
            self._adopt_orphans()
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

    def _adopt_orphans(self) -> None:
        """Register claims a dead node left in ``work/`` before registering them.

        A node killed between its claim rename and its registration leaves a
        folder no batch points to; start-up recovery of *some* node would
        find it, but in a cluster nodes rarely restart. A folder unchanged
        for longer than a lease is no live node's claim in progress.
        """
        assert self.store is not None and self.intake is not None
        cutoff = time.time() - self.settings.cluster.lease_seconds
        for priority, entry in self.spool.work_entries():
            try:
                if entry.lstat().st_mtime > cutoff:
                    continue
                if self.store.batch_by_work_path(self.spool.rel(entry)) is not None:
                    continue
                with self.intake.lock:
                    batch = self.intake.register_claimed(_orphan_claim(self.spool, priority, entry))
            except FileNotFoundError:
                continue  # finished and cleared meanwhile
            except (OSError, StoreError, AlreadyRegistered) as exc:
                log.warning("orphan_adopt_failed", path=str(entry), error=str(exc))
                continue
            if batch is not None:
                log.warning("orphan_claim_registered", batch=batch.name, batch_id=batch.id)

    def _purge(self) -> None:
        from batchd.retention import purge

        assert self.store is not None
        cutoff = self.clock.now() - timedelta(days=self.settings.retention.days)
        try:
            purge(self.spool, self.store, cutoff)
        except (OSError, BatchdError) as exc:
            log.error("purge_failed", error=str(exc))

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
            resolve(new.processing.processor)
            for route in new.route:
                resolve(route.processor)
            ocr.check_settings(new)
        except ConfigError as exc:
            log.error("reload_refused", error=exc.message)
            self._verdict(False, exc.message, [])
            if self.notifier is not None:
                self.notifier.ready()
            return
        old = self.settings
        needs_restart = []
        for key in RESTART_KEYS:
            section, name = key.split(".")
            before = getattr(getattr(old, section), name)
            after = getattr(getattr(new, section), name)
            if before != after:
                needs_restart.append(key)
                log.warning("reload_needs_restart", key=key, running=str(before), new=str(after))
        # Keep what needs a restart as it runs now.
        new = new.model_copy(
            update={
                "spool": old.spool,
                "database": old.database,
                "cluster": old.cluster,
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
        self._verdict(True, None, needs_restart)
        if self.notifier is not None:
            self.notifier.ready()
