"""The scheduler: the daemon's main loop.

It owns the worker pool and is the only code that moves a file from
``pending`` to ``processing`` and on to its end. Each turn of the loop:
hand due files to idle workers (priority, then FIFO), wait for worker
events, a wake-up or the next timer, then record outcomes. A free worker
gets the next file in the same turn that freed it, with no polling delay;
the ``processing.poll_seconds`` sweep only catches back-off timers and
changes other processes made to the database (an operator's re-queue).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta

import structlog

from batchd.clock import Clock, iso, parse_iso
from batchd.config import Settings
from batchd.errors import BatchdError
from batchd.faults import crash_point, hang_point
from batchd.metrics import Metrics
from batchd.outbox import Outbox
from batchd.pool import Lost, TimedOut, WorkerPool
from batchd.processors import choose
from batchd.records import BatchRow, FileTask, Outcome, Status
from batchd.spool import Spool
from batchd.store import SQLiteStore
from batchd.worker import Done, Failed, Job, Progress

log = structlog.get_logger("batchd.scheduler")


@dataclass
class _Running:
    task: FileTask
    processor: str
    started_at: str
    started_mono: float


class Scheduler:
    """Dispatches files to the pool and records how each attempt ended."""

    def __init__(
        self,
        settings: Settings,
        store: SQLiteStore,
        spool: Spool,
        outbox: Outbox,
        pool: WorkerPool,
        clock: Clock,
        metrics: Metrics,
        on_tick: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.spool = spool
        self.outbox = outbox
        self.pool = pool
        self.clock = clock
        self.metrics = metrics
        self.on_tick = on_tick
        self._running: dict[str, _Running] = {}
        self._progress: dict[str, int] = {}
        self._dirty: dict[str, BatchRow] = {}
        self._last_flush = 0.0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop_requested = threading.Event()
        self._reload: Callable[[], None] | None = None
        #: monotonic time of the last completed loop turn (watchdog, health).
        self.heartbeat = clock.monotonic()
        self.finished_count = 0
        #: monotonic time by which an idle loop must turn anyway, so that
        #: ``on_tick`` runs on time (the daemon's next systemd watchdog ping).
        self.tick_by: float | None = None

    # -- control (any thread) ----------------------------------------------------

    def wake(self) -> None:
        """Make the loop look at the queue now (new batch registered, re-queue)."""
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def request_stop(self) -> None:
        self._stop_requested.set()
        self.wake()

    def request_reload(self, apply: Callable[[], None]) -> None:
        """Run ``apply`` on the scheduler's thread at the next turn."""
        self._reload = apply
        self.wake()

    @property
    def stopping(self) -> bool:
        return self._stop_requested.is_set()

    def reconfigure(self, settings: Settings) -> None:
        """Take new settings (on the scheduler's thread)."""
        self.settings = settings
        self.pool.configure(settings)

    # -- the loop ----------------------------------------------------------------

    def run(self) -> None:
        """Run until :meth:`request_stop`, then drain within the shutdown grace."""
        while not self.stopping:
            self._turn()
        self._drain()

    def _turn(self) -> None:
        hang_point("scheduler_turn")
        if self._reload is not None:
            apply, self._reload = self._reload, None
            apply()
        self._dispatch()
        events, woken = self.pool.wait(self._timeout(), [self._wake_r])
        if woken:
            with contextlib.suppress(BlockingIOError, OSError):
                while self._wake_r.recv(4096):
                    pass
        for event in events:
            self._handle(event)
        self._flush()
        self.heartbeat = self.clock.monotonic()
        self.metrics.set_workers(self.pool.alive())
        self.on_tick()

    def _timeout(self) -> float:
        timeout = self.settings.processing.poll_seconds
        if self.tick_by is not None:
            timeout = min(timeout, max(0.0, self.tick_by - self.clock.monotonic()) + 0.001)
        if self._dirty or self._progress:
            timeout = min(timeout, self.settings.processing.status_interval_seconds)
        if self.pool.idle():
            due = self.store.next_due()
            if due is not None:
                wait = (due - self.clock.now()).total_seconds()
                timeout = min(timeout, max(0.0, wait) + 0.001)
        return timeout

    def _dispatch(self) -> None:
        while not self.stopping and self.pool.idle() > 0:
            task = self.store.claim_next(self.clock.now())
            if task is None:
                return
            self._start(task)

    def _start(self, task: FileTask) -> None:
        file = task.file
        bound = log.bind(batch_id=file.batch_id, file_id=file.id, relpath=file.relpath)
        try:
            path = self.spool.locate_input(task.work_path, task.batch_name, file.relpath)
        except OSError as exc:
            path = None
            bound.error("input_unavailable", error=str(exc))
        processor = choose(self.settings, file.relpath)
        running = _Running(
            task, processor, file.started_at or iso(self.clock.now()), self.clock.monotonic()
        )
        self._running[file.id] = running
        self._mark(task)
        if path is None:
            self._fail(running, "input file is no longer in the spool (moved or deleted)")
            return
        scratch = self.spool.scratch_for(file.id)
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
        self.pool.submit(
            Job(file.id, file.batch_id, file.relpath, str(path), processor, str(scratch))
        )
        crash_point("after_dispatch")
        if file.attempts == 1:
            with contextlib.suppress(ValueError):
                wait = parse_iso(file.started_at or "") - parse_iso(file.created_at)
                self.metrics.waited(max(0.0, wait.total_seconds()))
        bound.debug("file_started", processor=processor, attempt=file.attempts)

    def _mark(self, task: FileTask) -> None:
        batch = self.store.get_batch(task.file.batch_id)
        if batch is not None:
            self._dirty[batch.id] = batch

    # -- outcomes ----------------------------------------------------------------

    def _handle(self, event: Progress | Done | Failed | Lost | TimedOut) -> None:
        if isinstance(event, Progress):
            running = self._running.get(event.file_id)
            if running is not None:
                self._progress[event.file_id] = event.percent
                if running.task.file.batch_id not in self._dirty:
                    self._mark(running.task)
            return
        running = self._running.get(event.file_id)
        if running is None:
            return
        self._progress.pop(event.file_id, None)
        self.metrics.attempt_took(self.clock.monotonic() - running.started_mono)
        if isinstance(event, Done):
            self._complete(running, event)
        elif isinstance(event, TimedOut) or (isinstance(event, Failed) and event.permanent):
            self._fail(running, event.error)
        else:
            self._retry_or_fail(running, event.error)

    def _complete(self, running: _Running, done: Done) -> None:
        task = running.task
        scratch = self.spool.scratch_for(task.file.id)
        try:
            self.spool.collect_outputs(scratch, task.batch_name, task.file.relpath)
        except OSError as exc:
            self._retry_or_fail(running, f"cannot store the processor's output files: {exc}")
            return
        self._finish(
            running,
            Outcome(
                Status.COMPLETED,
                result=done.result,
                file_hash=done.file_hash,
                file_size=done.file_size,
                processor=running.processor,
                started_at=running.started_at,
            ),
        )

    def _fail(self, running: _Running, error: str) -> None:
        shutil.rmtree(self.spool.scratch_for(running.task.file.id), ignore_errors=True)
        self._finish(
            running,
            Outcome(
                Status.FAILED,
                error=error,
                processor=running.processor,
                started_at=running.started_at,
            ),
        )

    def _retry_or_fail(self, running: _Running, error: str) -> None:
        file = running.task.file
        if file.retry_count >= self.settings.processing.max_retries:
            self._fail(running, error)
            return
        shutil.rmtree(self.spool.scratch_for(file.id), ignore_errors=True)
        delay = self.settings.processing.backoff_seconds(file.retry_count + 1)
        self.store.retry_later(file.id, error, self.clock.now() + timedelta(seconds=delay))
        self._running.pop(file.id, None)
        self.metrics.file_retried(str(running.task.priority))
        log.info(
            "file_retry_scheduled",
            batch_id=file.batch_id,
            file_id=file.id,
            relpath=file.relpath,
            error=error,
            retry=file.retry_count + 1,
            delay_seconds=delay,
        )
        self._mark(running.task)

    def _finish(self, running: _Running, outcome: Outcome) -> None:
        """Result file, then database, then input: the order crash recovery relies on.

        A crash after the result write re-runs the file (same result path,
        replaced atomically); a crash after the database write leaves the
        input in work/, which recovery moves on.
        """
        task = running.task
        file = task.file
        now = self.clock.now()
        final = replace(
            file,
            status=outcome.status,
            result=json.dumps(outcome.result) if outcome.result is not None else None,
            error=outcome.error,
            file_hash=outcome.file_hash or file.file_hash,
            file_size=outcome.file_size if outcome.file_size is not None else file.file_size,
            processor=outcome.processor,
            started_at=outcome.started_at,
            completed_at=iso(now),
            progress=100 if outcome.status == Status.COMPLETED else file.progress,
        )
        try:
            self.outbox.write_result(task.batch_name, final)
        except OSError as exc:
            error = f"cannot write the result file: {exc.strerror or exc}"
            log.error("result_write_failed", batch_id=file.batch_id, file_id=file.id, error=error)
            if outcome.status == Status.COMPLETED:
                # Never completed without its result on disk: try again later,
                # and once retries are spent, fail with the reason.
                if file.retry_count < self.settings.processing.max_retries:
                    self._retry_or_fail(running, error)
                else:
                    failed = replace(outcome, status=Status.FAILED, result=None, error=error)
                    self._store_final(running, failed)
                return
        crash_point("after_result_write")
        self._store_final(running, outcome)

    def _store_final(self, running: _Running, outcome: Outcome) -> None:
        task = running.task
        file = task.file
        batch = self.store.finish(file.id, outcome, self.clock.now())
        crash_point("after_finish")
        self._running.pop(file.id, None)
        self.finished_count += 1
        self.metrics.file_finished(str(outcome.status), str(task.priority))
        bound = log.bind(batch_id=file.batch_id, file_id=file.id, relpath=file.relpath)
        if outcome.status == Status.COMPLETED:
            bound.info("file_completed", attempts=file.attempts, processor=running.processor)
        else:
            bound.warning("file_failed", attempts=file.attempts, error=outcome.error)
        try:
            self.spool.settle_input(
                task.work_path, task.batch_name, file.relpath, ok=outcome.status == Status.COMPLETED
            )
        except OSError as exc:
            # The database is right; recovery moves the input on next start.
            bound.error("input_move_failed", error=str(exc))
        crash_point("after_archive")
        if batch.status.done:
            self._end_batch(batch)
        else:
            self._dirty[batch.id] = batch

    def _end_batch(self, batch: BatchRow) -> None:
        try:
            self.spool.finalize(batch.work_path, batch.name)
        except OSError as exc:
            log.error("batch_finalize_failed", batch_id=batch.id, error=str(exc))
        self._dirty.pop(batch.id, None)
        self._write_status(batch)
        log.info(
            "batch_finished",
            batch_id=batch.id,
            batch=batch.name,
            status=str(batch.status),
            completed=batch.processed_files,
            failed=batch.failed_files,
        )

    def _write_status(self, batch: BatchRow) -> None:
        try:
            self.outbox.write_status(batch)
        except (OSError, BatchdError) as exc:
            log.error("status_write_failed", batch_id=batch.id, error=str(exc))

    def _flush(self, force: bool = False) -> None:
        """Write progress and status.json for changed batches, a few times a second at most."""
        now = self.clock.monotonic()
        if not force and now - self._last_flush < self.settings.processing.status_interval_seconds:
            return
        self._last_flush = now
        if self._progress:
            progress, self._progress = self._progress, {}
            self.store.set_progress(progress)
        dirty, self._dirty = self._dirty, {}
        for batch in dirty.values():
            self._write_status(batch)

    # -- shutdown ----------------------------------------------------------------

    def _drain(self) -> None:
        """Let running files finish for up to the grace period, then requeue the rest."""
        grace = self.settings.processing.shutdown_grace_seconds
        deadline = self.clock.monotonic() + grace
        if self._running:
            log.info("shutdown_draining", running=len(self._running), grace_seconds=grace)
        while self._running and self.clock.monotonic() < deadline:
            remaining = deadline - self.clock.monotonic()
            events, _ = self.pool.wait(min(remaining, 0.5), [self._wake_r])
            for event in events:
                self._handle(event)
            self._flush()
        left = list(self._running)
        if left:
            log.warning("shutdown_requeued", files=len(left))
            self.store.requeue(left)
            for file_id in left:
                self._mark(self._running[file_id].task)
        self.pool.stop()
        self._running.clear()
        self._flush(force=True)
        with contextlib.suppress(OSError):
            self._wake_r.close()
            self._wake_w.close()
