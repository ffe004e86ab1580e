"""The scheduler: the daemon's main loop.

It owns the worker pool and is the only code that moves a file from
``pending`` to ``processing`` and on to its end. Each turn of the loop:
hand due files to idle workers (priority, then FIFO), wait for worker
events, a wake-up or the next timer, then record outcomes. A free worker
gets the next file in the same turn that freed it, with no polling delay;
the ``processing.poll_seconds`` sweep only catches back-off timers and
changes other processes made to the database (an operator's re-queue).

In a cluster (PostgreSQL store) the loop also heart-beats every
``cluster.heartbeat_seconds`` (extending the leases of the files it runs),
takes back the files of nodes whose leases expired, and selects on the
store's LISTEN socket so that work registered by another node wakes it at
once.

The database may go away (restart, fail-over, network): a
:class:`StoreError` never ends the loop. Running files go on; their
outcomes wait in memory (``_pending``, ``_retries``) and are committed when
the database answers again, retried with exponential back-off up to
:data:`DB_RETRY_MAX_SECONDS`; no new file starts meanwhile, and /healthz
says 503 (its own ping fails).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import structlog

from batchd.archiver import ArchiveFile, Archiver
from batchd.caps import inline_result
from batchd.clock import Clock, iso, parse_iso
from batchd.config import Settings
from batchd.errors import StoreError
from batchd.faults import crash_point, hang_point
from batchd.members import batch_limit_error
from batchd.messages import Delivery, Done, Event, Failed, Job, Lost, Progress, TimedOut
from batchd.metrics import Metrics
from batchd.outbox import Outbox, ResultSyncer
from batchd.pool import WorkerPool
from batchd.processors import choose
from batchd.records import FileRow, FileTask, Outcome, Status
from batchd.safefs import UnsafePath
from batchd.spool import Spool
from batchd.store import Store

log = structlog.get_logger("batchd.scheduler")

#: First wait before talking to an unreachable database again; doubles per failure.
DB_RETRY_MIN_SECONDS = 0.5
#: The longest wait between two attempts to reach the database.
DB_RETRY_MAX_SECONDS = 10.0
#: batches whose file count the scheduler remembers (a dictionary cleared when full).
BATCH_SIZE_CACHE = 4096


@dataclass
class _Running:
    task: FileTask
    processor: str
    started_at: str
    started_mono: float
    #: where this attempt's result file goes (written by the worker).
    result_path: str


@dataclass
class _Retry:
    """A failed attempt waiting to be put back in the queue (see :meth:`Scheduler._commit`)."""

    running: _Running
    error: str
    available_at: datetime


@dataclass
class _Final:
    """A final outcome waiting for the grouped database commit."""

    running: _Running
    outcome: Outcome
    ended: datetime
    #: a result file the worker wrote without fsync: made durable (in a group)
    #: before the commit that says "completed".
    unsynced: str | None = None
    #: a failure's result document, written once the commit accepted the
    #: outcome (a superseded attempt writes nothing: issue 16).
    document: FileRow | None = None


class Scheduler:
    """Dispatches files to the pool and records how each attempt ended."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
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
        self.syncer = ResultSyncer()
        self.archiver = Archiver(spool, outbox, syncer=self.syncer)
        self._pending: list[_Final] = []
        self._retries: list[_Retry] = []
        #: where this node's HTTP API listens (``nodes.address``); set by the daemon.
        self.address: str | None = None
        self._next_beat = 0.0
        #: the last database error while it lasts (None: the database answers).
        self.db_error: str | None = None
        self._db_failures = 0
        self._db_retry_at = 0.0
        self._progress: dict[str, int] = {}
        #: batches whose status.json is behind the database (ids).
        self._dirty: set[str] = set()
        self._last_flush = 0.0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop_requested = threading.Event()
        # Plain flags a signal handler may set (an Event takes a lock).
        self._stop_signalled = False
        self._force_stop = False
        #: called on the loop's thread when the drain starts (False) and when
        #: a forced stop cuts it short (True): the daemon logs and notifies there.
        self.on_stop: Callable[[bool], None] = lambda forced: None
        self._reload: Callable[[], None] | None = None
        #: monotonic time of the last completed loop turn (watchdog, health).
        self.heartbeat = clock.monotonic()
        self.finished_count = 0
        #: monotonic time by which an idle loop must turn anyway, so that
        #: ``on_tick`` runs on time (the daemon's next systemd watchdog ping).
        self.tick_by: float | None = None
        #: files per batch (fixed at registration), for the batch limit re-check.
        self._batch_sizes: dict[str, int] = {}

    # -- control (any thread) ----------------------------------------------------

    def wake(self) -> None:
        """Make the loop look at the queue now (new batch registered, re-queue)."""
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def request_stop(self) -> None:
        self._stop_requested.set()
        self.wake()

    def signal_stop(self, force: bool = False) -> None:
        """Stop (``force``: end the drain now); safe inside a signal handler."""
        self._stop_signalled = True
        if force:
            self._force_stop = True
        self.wake()

    def request_reload(self, apply: Callable[[], None]) -> None:
        """Run ``apply`` on the scheduler's thread at the next turn."""
        self._reload = apply
        self.wake()

    @property
    def stopping(self) -> bool:
        return self._stop_signalled or self._stop_requested.is_set()

    def reconfigure(self, settings: Settings) -> None:
        """Take new settings (on the scheduler's thread)."""
        self.settings = settings
        self.pool.configure(settings)

    # -- the loop ----------------------------------------------------------------

    def run(self) -> None:
        """Run until :meth:`request_stop`, then drain within the shutdown grace."""
        self.archiver.start()
        try:
            while not self.stopping:
                self._turn()
            self._drain()
        finally:
            self.archiver.stop()
            self.syncer.close()

    def _turn(self) -> None:
        hang_point("scheduler_turn")
        if self._reload is not None:
            apply, self._reload = self._reload, None
            apply()
        self._guarded(self._beat)
        self._guarded(self._commit)
        self._guarded(self._dispatch)
        listen = self._listen_fileno()
        extra: list[object] = [self._wake_r] if listen is None else [self._wake_r, listen]
        events, ready = self.pool.wait(self._timeout(), extra)
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError, OSError):
                while self._wake_r.recv(4096):
                    pass
        if listen is not None and listen in ready:
            # Work registered or requeued (by any node): the next turn's
            # dispatch, right after this one, claims it.
            self._guarded(self.store.drain_notifications)
        for event in events:
            self._handle(event)
        self._guarded(self._commit)
        self._guarded(self._flush)
        self.heartbeat = self.clock.monotonic()
        self.metrics.set_workers(self.pool.alive())
        self.on_tick()

    def _timeout(self) -> float:
        timeout = self.settings.processing.poll_seconds
        if self.tick_by is not None:
            timeout = min(timeout, max(0.0, self.tick_by - self.clock.monotonic()) + 0.001)
        if self._dirty or self._progress:
            timeout = min(timeout, self.settings.processing.status_interval_seconds)
        if self.db_error is not None:
            timeout = min(timeout, max(0.0, self._db_retry_at - self.clock.monotonic()) + 0.001)
        elif self.pool.idle():
            try:
                due = self.store.next_due()
            except StoreError as exc:
                self._db_failed(exc)
                return min(timeout, DB_RETRY_MIN_SECONDS)
            if due is not None:
                wait = (due - self.clock.now()).total_seconds()
                timeout = min(timeout, max(0.0, wait) + 0.001)
        return timeout

    # -- the database, which may be away ---------------------------------------

    def _guarded(self, step: Callable[[], object]) -> None:
        """Run a step that talks to the database, unless it is away and not yet due a retry.

        A :class:`StoreError` is logged once per outage, and the next attempt
        waits 0.5 s, 1 s, 2 s ... up to :data:`DB_RETRY_MAX_SECONDS`.
        """
        if self.db_error is not None:
            if self.clock.monotonic() < self._db_retry_at:
                return
            try:
                # A step may not touch the database at all: ask it directly.
                self.store.ping()
            except StoreError as exc:
                self._db_failed(exc)
                return
            log.warning(
                "database_reconnected",
                failures=self._db_failures,
                outcomes=len(self._pending) + len(self._retries),
            )
            self.db_error = None
            self._db_failures = 0
            self._next_beat = 0.0  # renew the leases at once
        try:
            step()
        except StoreError as exc:
            self._db_failed(exc)

    def _db_failed(self, exc: StoreError) -> None:
        if self.db_error is None:
            log.error("database_unavailable", error=exc.message, running=len(self._running))
        self.db_error = exc.message
        self._db_failures += 1
        backoff = min(DB_RETRY_MAX_SECONDS, DB_RETRY_MIN_SECONDS * 2 ** (self._db_failures - 1))
        self._db_retry_at = self.clock.monotonic() + backoff

    def _listen_fileno(self) -> int | None:
        """The store's wake-up socket (PostgreSQL LISTEN); None while the database is away."""
        if self.db_error is not None:
            return None
        return self.store.listen_fileno()

    def _beat(self) -> None:
        """Every ``cluster.heartbeat_seconds``: say this node lives, extend the
        leases of the files it runs, and requeue the files of nodes whose
        leases expired (their node died or lost the database)."""
        now_mono = self.clock.monotonic()
        if now_mono < self._next_beat:
            return
        now = self.clock.now()
        self.store.heartbeat(now, self.address, list(self._running), self._leases())
        requeued = self.store.requeue_expired(now)
        self._next_beat = now_mono + self.settings.cluster.heartbeat_seconds
        if requeued:
            log.warning("leases_expired_requeued", files=requeued)

    def _leases(self) -> dict[str, int]:
        """The fencing token of every attempt this node runs, by file id."""
        return {fid: r.task.file.lease_gen for fid, r in self._running.items()}

    def _superseded(self, running: _Running, reason: str) -> None:
        """Drop an attempt that no longer owns its file: nothing of it is written."""
        file = running.task.file
        if self._running.get(file.id) is running:
            del self._running[file.id]
        self._progress.pop(file.id, None)
        # Its scratch folder is left alone: it is the file's, in the shared
        # work/, and the attempt that owns the file now (maybe on another
        # node) may be writing there.
        log.warning(
            "outcome_superseded",
            batch_id=file.batch_id,
            file_id=file.id,
            relpath=file.relpath,
            lease=file.lease_gen,
            reason=reason,
        )

    def _dispatch(self) -> None:
        while not self.stopping and self.pool.idle() > 0:
            task = self.store.claim_next(self.clock.now())
            if task is None:
                return
            self._start(task)

    def _start(self, task: FileTask) -> None:
        file = task.file
        bound = log.bind(batch_id=file.batch_id, file_id=file.id, relpath=file.relpath)
        if self.archiver.touches(file.id, file.batch_id):
            self.archiver.wait_idle()
        old = self._running.get(file.id)
        if old is not None and old.task.file.lease_gen != file.lease_gen:
            # Claimed again while we still run it (an operator re-queued the
            # running file by SQL): the old attempt lost its claim. Stop it
            # before it writes anything.
            self.pool.cancel(file.id, old.task.file.lease_gen)
            self._superseded(old, "claimed_again")
            # What the stopped attempt left must not pass for the new one's outputs.
            shutil.rmtree(self.spool.scratch_for(file.id), ignore_errors=True)
        unsafe = None
        try:
            path = self.spool.locate_input(task.work_path, task.batch_name, file.relpath)
        except OSError as exc:
            path = None
            bound.error("input_unavailable", error=str(exc))
        except UnsafePath as exc:
            # A re-queued input whose way back from archive/failed is a link now.
            path, unsafe = None, exc.message
        processor = choose(self.settings, file.relpath)
        running = _Running(
            task,
            processor,
            file.started_at or iso(self.clock.now()),
            self.clock.monotonic(),
            str(self.spool.result_path(task.batch_name, file.relpath)),
        )
        self._running[file.id] = running
        self._dirty.add(file.batch_id)
        if path is None:
            self._fail(running, unsafe or "input file is no longer in the spool (moved or deleted)")
            return
        refusal = batch_limit_error(self._batch_size(file.batch_id), self.settings.limits)
        if refusal is not None:
            # Only a re-queued member of a batch refused whole gets here (by
            # `batchd retry` or an operator's UPDATE): it keeps its refusal.
            self._fail(running, refusal)
            return
        delivery = Delivery(
            file=file,
            started_at=running.started_at,
            result_path=running.result_path,
            outputs_path=str(self.spool.outputs_path(task.batch_name, file.relpath)),
            # The scheduler makes results durable a group at a time (_commit).
            fsync=False,
            spool_root=str(self.spool.root),
        )
        scratch = self.spool.scratch_for(file.id)
        self.pool.submit(
            Job(
                file.id,
                file.batch_id,
                file.relpath,
                str(path),
                processor,
                str(scratch),
                delivery,
                lease=file.lease_gen,
                file_dev=file.file_dev,
                file_ino=file.file_ino,
            )
        )
        crash_point("after_dispatch")
        if file.attempts == 1:
            with contextlib.suppress(ValueError):
                wait = parse_iso(file.started_at or "") - parse_iso(file.created_at)
                self.metrics.waited(max(0.0, wait.total_seconds()))
        bound.debug("file_started", processor=processor, attempt=file.attempts)

    def _batch_size(self, batch_id: str) -> int:
        size = self._batch_sizes.get(batch_id)
        if size is None:
            batch = self.store.get_batch(batch_id)
            size = batch.total_files if batch is not None else 0
            if len(self._batch_sizes) >= BATCH_SIZE_CACHE:
                self._batch_sizes.clear()
            self._batch_sizes[batch_id] = size
        return size

    # -- outcomes ----------------------------------------------------------------

    def _handle(self, event: Event) -> None:
        running = self._running.get(event.file_id)
        if running is None or running.task.file.lease_gen != event.lease:
            return  # an attempt already dropped as superseded
        if isinstance(event, Progress):
            self._progress[event.file_id] = event.percent
            self._dirty.add(running.task.file.batch_id)
            return
        self._progress.pop(event.file_id, None)
        self.metrics.attempt_took(self.clock.monotonic() - running.started_mono)
        if isinstance(event, Done):
            self._complete(running, event)
        elif (
            isinstance(event, TimedOut)
            or (isinstance(event, Failed) and event.permanent)
            or (isinstance(event, Lost) and event.out_of_memory)
        ):
            self._fail(running, event.error)
        else:
            self._retry_or_fail(running, event.error)

    def _complete(self, running: _Running, done: Done) -> None:
        """The worker has already written the result file (see batchd.worker)."""
        crash_point("after_result_write")
        # The result file holds it whole; the database (and so status.json
        # and the API) a bounded copy.
        result = inline_result(
            done.result, self.settings.limits.max_inline_result_bytes, running.result_path
        )
        outcome = Outcome(
            Status.COMPLETED,
            result=result,
            file_hash=done.file_hash,
            file_size=done.file_size,
            processor=running.processor,
            started_at=running.started_at,
        )
        try:
            ended = parse_iso(done.completed_at)
        except ValueError:
            ended = self.clock.now()
        self._pending.append(_Final(running, outcome, ended, unsynced=running.result_path))

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
        # Queued like a final outcome; the file stays ours (leased) until committed.
        self._retries.append(_Retry(running, error, self.clock.now() + timedelta(seconds=delay)))
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
        self._dirty.add(file.batch_id)

    def _finish(self, running: _Running, outcome: Outcome) -> None:
        """Queue a failed file's outcome; its result document follows the commit.

        A completed file's result is written by its worker, before
        :class:`Done` arrives (result file, then database, then input). A
        failure's document says nothing the database does not, so it is
        written after the commit, and only when the commit accepted it: an
        attempt whose claim was superseded (issue 16) never overwrites the
        document of the attempt that owns the file. A crash between the
        commit and the write leaves no document; start-up recovery writes it
        from the database (:meth:`batchd.outbox.Outbox.reconcile`).
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
        self._pending.append(_Final(running, outcome, now, document=final))

    def _commit(self) -> None:
        """Make the queued results durable, record every queued outcome in one
        transaction, refill the workers, then hand input moves and batch ends
        to the archiver.

        Outcomes that arrive together share one durability barrier and one
        commit, so a busy daemon pays for one disk flush and one transaction
        per turn rather than one per file. The slower file moves happen on the
        archiver's thread, so freed workers do not wait for them.
        """
        while self._retries:
            retry = self._retries[0]
            file = retry.running.task.file
            held = self.store.retry_later(
                file.id, retry.error, retry.available_at, lease=file.lease_gen
            )
            self._retries.pop(0)
            if held:
                if self._running.get(file.id) is retry.running:
                    del self._running[file.id]
            else:
                self._superseded(retry.running, "lease_lost")
        while self._pending:
            pending = self._barrier()
            # On a StoreError nothing was recorded (one transaction) and the
            # outcomes stay queued for the next attempt: never lost.
            recorded = (
                self.store.finish_many(
                    [
                        (
                            f.running.task.file.id,
                            replace(f.outcome, lease=f.running.task.file.lease_gen),
                            f.ended,
                        )
                        for f in pending
                    ]
                )
                if pending
                else []
            )
            del self._pending[: len(pending)]
            crash_point("after_finish")
            accepted = []
            batches = []
            for final, batch in zip(pending, recorded, strict=True):
                if batch is None:
                    # Another attempt owns the file now: no result, no input move.
                    self._superseded(final.running, "lease_lost")
                    continue
                accepted.append(final)
                batches.append(batch)
                self._finished(final)
            pending = accepted
            # Only now: a file is claimed after the one it replaces is recorded
            # as finished, so the database never shows more files processing
            # than there are workers. What follows must happen even if the
            # database goes away now, so a failed dispatch waits its turn.
            self._guarded(self._dispatch)
            for final in pending:
                task = final.running.task
                self.archiver.archive_file(
                    ArchiveFile(
                        task.file.id,
                        task.file.batch_id,
                        task.work_path,
                        task.batch_name,
                        task.file.relpath,
                        ok=final.outcome.status == Status.COMPLETED,
                    )
                )
            for batch in {b.id: b for b in batches}.values():
                if batch.status.done:
                    self._dirty.discard(batch.id)
                    self.archiver.end_batch(batch)
                else:
                    self._dirty.add(batch.id)

    def _barrier(self) -> list[_Final]:
        """fsync the queued results the workers wrote, as one group.

        Returns the queued outcomes that may be committed. A result that
        cannot be made durable (an I/O error) is never recorded as completed:
        that attempt is retried, or failed once retries are spent.
        """
        pending = list(self._pending)
        failed = self.syncer.sync([f.unsynced for f in pending if f.unsynced is not None])
        if not failed:
            return pending
        durable = [f for f in pending if f.unsynced not in failed]
        self._pending = durable + self._pending[len(pending) :]
        for final in pending:
            if final.unsynced in failed:
                exc = failed[final.unsynced]
                self._retry_or_fail(
                    final.running, f"cannot write the result file: {exc.strerror or exc}"
                )
        return durable

    def _finished(self, final: _Final) -> None:
        task, outcome = final.running.task, final.outcome
        file = task.file
        if self._running.get(file.id) is final.running:
            del self._running[file.id]
        if final.document is not None:
            try:
                self.outbox.write_result(task.batch_name, final.document)
            except OSError as exc:
                # The database says failed, with the error: start-up recovery
                # writes the missing document from it.
                log.error(
                    "result_write_failed",
                    batch_id=file.batch_id,
                    file_id=file.id,
                    error=f"cannot write the result file: {exc.strerror or exc}",
                )
            crash_point("after_result_write")
        self.finished_count += 1
        self.metrics.file_finished(str(outcome.status), str(task.priority))
        if outcome.status == Status.COMPLETED:
            log.info(
                "file_completed",
                batch_id=file.batch_id,
                file_id=file.id,
                relpath=file.relpath,
                attempts=file.attempts,
                processor=final.running.processor,
            )
        else:
            log.warning(
                "file_failed",
                batch_id=file.batch_id,
                file_id=file.id,
                relpath=file.relpath,
                attempts=file.attempts,
                error=outcome.error,
            )

    def _flush(self, force: bool = False) -> None:
        """Write progress and status.json for changed batches, a few times a second at most."""
        now = self.clock.monotonic()
        if not force and now - self._last_flush < self.settings.processing.status_interval_seconds:
            return
        self._last_flush = now
        if self._progress:
            progress, self._progress = self._progress, {}
            # Lost on a StoreError: the next report redoes it.
            self.store.set_progress(progress, self._leases())
        dirty, self._dirty = self._dirty, set()
        for batch_id in dirty:
            self.archiver.refresh(batch_id)

    # -- shutdown ----------------------------------------------------------------

    def _drain(self) -> None:
        """Let running files finish for up to the grace period, then requeue the rest."""
        grace = self.settings.processing.shutdown_grace_seconds
        deadline = self.clock.monotonic() + grace
        self.on_stop(False)
        if self._running:
            log.info("shutdown_draining", running=len(self._running), grace_seconds=grace)
        while self._running and self.clock.monotonic() < deadline:
            if self._force_stop:
                self.on_stop(True)
                break
            remaining = deadline - self.clock.monotonic()
            events, ready = self.pool.wait(min(remaining, 0.5), [self._wake_r])
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError, OSError):
                    while self._wake_r.recv(4096):
                        pass
            for event in events:
                self._handle(event)
            self._guarded(self._beat)
            self._guarded(self._commit)
            self._guarded(self._flush)
        # One last try for outcomes the database has not taken yet.
        self.db_error = None
        self._guarded(self._commit)
        unrecorded = {f.running.task.file.id for f in self._pending}
        unrecorded |= {r.running.task.file.id for r in self._retries}
        left = [fid for fid in self._running if fid not in unrecorded]
        try:
            if left:
                log.warning("shutdown_requeued", files=len(left))
                self.store.requeue(left, self._leases())
                for file_id in left:
                    self._dirty.add(self._running[file_id].task.file.batch_id)
        except StoreError as exc:
            left = [*left, *unrecorded]
            unrecorded = set()
            log.error("shutdown_requeue_failed", files=len(left), error=exc.message)
        if unrecorded:
            # Their results are written; the database still says processing.
            # The next start (or, in a cluster, the lease) runs them again.
            log.error("shutdown_outcomes_unrecorded", files=len(unrecorded), error=self.db_error)
        self.pool.stop()
        self._running.clear()
        self._guarded(lambda: self._flush(force=True))
        with contextlib.suppress(OSError):
            self._wake_r.close()
            self._wake_w.close()
