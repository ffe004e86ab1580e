"""The archiver: the spool work that follows a database commit, off the scheduler's loop.

Once the store has recorded a file as finished, three slow filesystem steps
remain: move its input to ``archive/`` or ``failed/``, clear a finished batch
out of ``work/``, and rewrite ``status.json`` (fsynced, as SPEC section 3
promises). Each is a journaled metadata operation or a disk flush, costing
milliseconds of waiting, not CPU. Done on the scheduler's thread they would
keep idle workers waiting for their next file; here they run on one
background thread. The thread takes whatever is queued as one group: the
input moves in the order they were asked for, then the status.json of every
batch the group touched, written together so that their fsyncs share one
disk flush (each document is still synced before it is renamed into place).
A new batch's first status.json comes this way too, from intake, held for
``processing.first_status_hold_seconds`` first (:class:`FirstStatus`; never
longer than ``status_interval_seconds``): a batch that ends meanwhile (a
loose file, most often) gets only its final document, written by whoever
ends it, instead of two (issue 15); one still running or waiting in the
queue then gets its first.

This keeps the crash order recovery relies on (result file, then database,
then input move): nothing is queued here before its commit, and a crash that
loses the queue leaves inputs in ``work/`` with a finished row, which start-up
recovery moves on, exactly as after a crash between the two steps before.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import structlog

from batchd.errors import BatchdError
from batchd.faults import crash_point
from batchd.outbox import Outbox, ResultSyncer
from batchd.records import BatchRow
from batchd.spool import Spool

# Logger, thread and event names keep the old "settle" wording: operators
# filter logs by them.
log = structlog.get_logger("batchd.settle")

#: A move that failed (archive full, read-only) is tried again after this
#: long, doubling up to the maximum, so inputs leave work/ once space returns
#: without waiting for a restart.
RETRY_FIRST_SECONDS = 2.0
RETRY_MAX_SECONDS = 60.0
#: At most this many queued tasks are taken as one group.
GROUP_MAX_TASKS = 512


def log_batch_finished(row: BatchRow) -> None:
    """The ``batch_finished`` event, wherever the batch ended (here or in a worker)."""
    log.info(
        "batch_finished",
        batch_id=row.id,
        batch=row.name,
        status=str(row.status),
        completed=row.processed_files,
        failed=row.failed_files,
    )


@dataclass(frozen=True, slots=True)
class ArchiveFile:
    """Move one finished file's input out of ``work/``."""

    file_id: str
    batch_id: str
    work_path: str
    batch_name: str
    relpath: str
    ok: bool


def move_input(spool: Spool, task: ArchiveFile) -> bool:
    """Move a recorded file's input out of ``work/`` (here, or in the worker that
    recorded it); False when it must be tried again later."""
    try:
        spool.settle_input(task.work_path, task.batch_name, task.relpath, ok=task.ok)
    except OSError as exc:
        # The database is right and the input is safe in work/: tried again
        # later by the archiver, and by start-up recovery after a restart.
        log.error("input_move_failed", batch_id=task.batch_id, file_id=task.file_id, error=str(exc))
        return False
    crash_point("after_archive")
    return True


@dataclass(frozen=True, slots=True)
class EndBatch:
    """Clear a finished batch out of ``work/`` and write its final status.json."""

    batch: BatchRow


@dataclass(frozen=True, slots=True)
class RefreshStatus:
    """Rewrite a batch's status.json from the database."""

    batch_id: str


@dataclass(frozen=True, slots=True)
class FirstStatus:
    """Write a new batch's first status.json ``delay`` seconds from now, unless
    the batch ended meanwhile (its end writes the final one) or another
    rewrite came first."""

    batch_id: str
    delay: float


Task = ArchiveFile | EndBatch | RefreshStatus | FirstStatus


class Archiver:
    """One background thread running :data:`Task` items in order."""

    def __init__(
        self,
        spool: Spool,
        outbox: Outbox,
        retry_first_seconds: float = RETRY_FIRST_SECONDS,
        syncer: ResultSyncer | None = None,
    ) -> None:
        self.spool = spool
        self.outbox = outbox
        self.retry_first_seconds = retry_first_seconds
        #: the scheduler lends its own syncer (one pool of fsync threads per
        #: daemon); an archiver made without one owns and closes its own.
        self._owns_syncer = syncer is None
        self.syncer = syncer or ResultSyncer()
        #: parked moves dropped because their file was re-queued meanwhile.
        self.retries_dropped = 0
        self._queue: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._unsettled: set[str] = set()
        self._ending: set[str] = set()
        self._refresh_queued: set[str] = set()
        self._outstanding = 0
        self._thread: threading.Thread | None = None
        #: failed moves waiting to be tried again (archiver thread only):
        #: (monotonic due time, delay used, task).
        self._later: list[tuple[float, float, ArchiveFile | EndBatch]] = []
        #: new batches' first status.json, by batch id: when it is due
        #: (monotonic; archiver thread only, in due order since every delay is
        #: the same setting).
        self._first: dict[str, float] = {}
        #: first documents held and then not needed (the batch had ended).
        self.first_statuses_skipped = 0

    # -- asking (scheduler thread) -------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="batchd-settler", daemon=True)
        self._thread.start()

    def archive_file(self, task: ArchiveFile) -> None:
        with self._lock:
            self._unsettled.add(task.file_id)
        self._put(task)

    def end_batch(self, batch: BatchRow) -> None:
        with self._lock:
            self._ending.add(batch.id)
        self._put(EndBatch(batch))

    def refresh(self, batch_id: str) -> None:
        """Rewrite a batch's status.json soon; a request already queued covers it."""
        with self._lock:
            if batch_id in self._refresh_queued:
                return
            self._refresh_queued.add(batch_id)
        self._put(RefreshStatus(batch_id))

    def first_status(self, batch_id: str, delay: float) -> None:
        """Write a new batch's first status.json in ``delay`` seconds, unless
        it has ended by then; ``delay`` 0 writes it as soon as :meth:`refresh`."""
        if delay <= 0:
            self.refresh(batch_id)
            return
        self._put(FirstStatus(batch_id, delay))

    def touches(self, file_id: str, batch_id: str) -> bool:
        """Whether queued work still moves this file's input or ends its batch.

        The scheduler asks before it runs a file again (an operator's re-queue
        right after it finished), so a queued move never takes an input away
        from under a worker.
        """
        with self._lock:
            return file_id in self._unsettled or batch_id in self._ending

    def wait_untouched(self, file_id: str, batch_id: str, timeout: float | None = None) -> bool:
        """Block until no queued work moves this file's input or ends its batch
        (:meth:`touches`); False on timeout.

        Not :meth:`wait_idle`: that also waits for every new batch's held first
        status.json (:meth:`first_status`), which under a stream of drops is
        never all written, and the scheduler's loop would stall meanwhile.
        """
        with self._idle:
            return self._idle.wait_for(
                lambda: file_id not in self._unsettled and batch_id not in self._ending, timeout
            )

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until everything asked so far is done; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._outstanding == 0, timeout)

    @property
    def backlog(self) -> int:
        with self._lock:
            return self._outstanding

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then end the thread."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("settler_stop_timeout", backlog=self.backlog)
        elif self._owns_syncer:
            self.syncer.close()

    def _put(self, task: Task) -> None:
        with self._lock:
            self._outstanding += 1
        self._queue.put(task)

    # -- doing (archiver thread) ----------------------------------------------------

    def _next(self) -> Task | None:
        """The next queued task, running parked retries and held first
        documents that fall due meanwhile."""
        while True:
            dues = [due for due, _d, _t in self._later]
            if self._first:
                dues.append(next(iter(self._first.values())))
            if not dues:
                return self._queue.get()
            wait = min(dues) - time.monotonic()
            try:
                return self._queue.get(timeout=max(0.0, wait))
            except queue.Empty:
                self._retry_due()
                self._first_due()

    def _first_due(self, everything: bool = False) -> None:
        """Write the held first documents that are due (all of them when stopping)."""
        now = time.monotonic()
        due = [b for b, when in self._first.items() if everything or when <= now]
        if not due:
            return
        for batch_id in due:
            del self._first[batch_id]
        try:
            self._write_first(due)
        except Exception:
            # A bug must not stop the thread; recovery rewrites status.json.
            log.exception("settle_failed", tasks=len(due))
        finally:
            with self._idle:
                self._outstanding -= len(due)
                self._idle.notify_all()

    def _write_first(self, batch_ids: list[str]) -> None:
        try:
            # One read for the whole group: a deep queue of loose drops makes
            # these hundreds at a time (issue 15).
            snaps = self.outbox.store.snapshots(batch_ids)
        except BatchdError as exc:
            for batch_id in batch_ids:
                log.error("status_write_failed", batch_id=batch_id, error=str(exc))
            return
        live = [snap for snap in snaps.values() if not snap.batch.status.done]
        # Ended (or deleted) meanwhile: the end wrote, or writes, the final
        # document, and recovery rewrites one a crash lost.
        self.first_statuses_skipped += len(batch_ids) - len(live)
        errors = self.outbox.write_snapshots(live, self.syncer) if live else {}
        for batch_id, error in errors.items():
            log.error("status_write_failed", batch_id=batch_id, error=str(error))

    def _retry_due(self) -> None:
        now = time.monotonic()
        due = [item for item in self._later if item[0] <= now]
        self._later = [item for item in self._later if item[0] > now]
        for _due, delay, task in due:
            if not self._still_finished(task):
                # Re-queued by an operator meanwhile: the scheduler owns it again.
                self.retries_dropped += 1
                continue
            done = self._archive(task) if isinstance(task, ArchiveFile) else self._end_again(task)
            if not done:
                self._park(task, min(delay * 2, RETRY_MAX_SECONDS))

    def _still_finished(self, task: ArchiveFile | EndBatch) -> bool:
        try:
            if isinstance(task, ArchiveFile):
                file = self.outbox.store.get_file(task.file_id)
                return file is not None and file.status.done
            batch = self.outbox.store.get_batch(task.batch.id)
            return batch is not None and batch.status.done
        except BatchdError:
            return False

    def _park(self, task: ArchiveFile | EndBatch, delay: float) -> None:
        self._later.append((time.monotonic() + delay, delay, task))

    def _run(self) -> None:
        try:
            stopping = False
            while not stopping and (task := self._next()) is not None:
                # Take everything queued meanwhile: the group's status.json
                # rewrites then share one disk flush.
                group = [task]
                while len(group) < GROUP_MAX_TASKS:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stopping = True
                        break
                    group.append(more)
                group = self._hold_first(group)
                try:
                    self._do_group(group)
                except Exception:
                    # A bug must not stop the thread; recovery redoes what was missed.
                    log.exception("settle_failed", tasks=len(group))
                finally:
                    with self._idle:
                        self._outstanding -= len(group)
                        for done in group:
                            if isinstance(done, ArchiveFile):
                                self._unsettled.discard(done.file_id)
                            elif isinstance(done, EndBatch):
                                self._ending.discard(done.batch.id)
                        self._idle.notify_all()
                # Also while the queue never runs dry (a flood of drops).
                self._first_due()
            # Stopping: what is held is written now (or found unneeded).
            self._first_due(everything=True)
        finally:
            with contextlib.suppress(Exception):
                self.outbox.store.release_thread()

    def _hold_first(self, group: list[Task]) -> list[Task]:
        """Hold the group's :class:`FirstStatus` items until due; the rest, to do now.

        A held document stays counted as outstanding until it is written or
        found unneeded; a second one for a batch already held is done at once.
        """
        now = time.monotonic()
        rest: list[Task] = []
        doubled = 0
        for task in group:
            if not isinstance(task, FirstStatus):
                rest.append(task)
            elif task.batch_id in self._first:
                doubled += 1
            else:
                self._first[task.batch_id] = now + task.delay
        if doubled:
            with self._idle:
                self._outstanding -= doubled
                self._idle.notify_all()
        return rest

    def _drop_first(self, batch_ids: Iterable[str]) -> None:
        """Written now by a refresh or an end: a held first document is not needed."""
        dropped = 0
        for batch_id in batch_ids:
            if self._first.pop(batch_id, None) is not None:
                dropped += 1
        if dropped:
            with self._idle:
                self._outstanding -= dropped
                self._idle.notify_all()

    def _do_group(self, group: list[Task]) -> None:
        """Moves first, in order; then every status.json the group asked for, together."""
        status_for: dict[str, None] = {}  # an ordered set of batch ids
        ends: dict[str, EndBatch] = {}
        finalized: set[str] = set()
        for task in group:
            if isinstance(task, ArchiveFile):
                if not self._archive(task):
                    self._park(task, self.retry_first_seconds)
            elif isinstance(task, EndBatch):
                ends[task.batch.id] = task
                status_for[task.batch.id] = None
                try:
                    # Re-read first: an operator may have re-queued a file since
                    # the commit, and its input is back in work/ to be run again.
                    if self._still_finished(task):
                        self.spool.finalize(task.batch.work_path, task.batch.name)
                        finalized.add(task.batch.id)
                except OSError as exc:
                    log.error("batch_finalize_failed", batch_id=task.batch.id, error=str(exc))
            else:
                with self._lock:
                    self._refresh_queued.discard(task.batch_id)
                status_for[task.batch_id] = None
        # Re-read each batch: the documents show the database as it is now.
        fresh: dict[str, BatchRow] = {}
        for batch_id in status_for:
            try:
                # Counters first: they may trail the files (Store.finish_file).
                self.outbox.store.refresh_counts(batch_id)
                row = self.outbox.store.get_batch(batch_id)
            except BatchdError as exc:
                log.error("status_write_failed", batch_id=batch_id, error=str(exc))
                continue
            if row is not None:
                fresh[batch_id] = row
        errors = self.outbox.write_statuses(list(fresh.values()), self.syncer) if fresh else {}
        for batch_id, error in errors.items():
            log.error("status_write_failed", batch_id=batch_id, error=str(error))
        if self._first:
            self._drop_first(b for b in fresh if b not in errors)
        for batch_id, end in ends.items():
            row = fresh.get(batch_id, end.batch)
            if batch_id in finalized and batch_id in fresh and batch_id not in errors:
                if row.status.done:
                    # The empty folder left in work/ until now is what makes
                    # recovery rewrite a final status.json a crash kept from
                    # being written.
                    self.spool.release(end.batch.work_path)
            else:
                self._park(end, self.retry_first_seconds)
            log_batch_finished(row)

    def _archive(self, task: ArchiveFile) -> bool:
        """Move the input on; False when it must be tried again later."""
        return move_input(self.spool, task)

    def _end_again(self, task: EndBatch) -> bool:
        """Retry a batch end that failed: clear the batch out of work/ and write
        its final status; False to retry once more."""
        batch = task.batch
        ok = True
        try:
            self.spool.finalize(batch.work_path, batch.name)
        except OSError as exc:
            log.error("batch_finalize_failed", batch_id=batch.id, error=str(exc))
            ok = False
        # Re-read: an operator may have re-queued a file since the commit.
        try:
            fresh = self.outbox.refresh_status(batch.id) or batch
        except (OSError, BatchdError) as exc:
            fresh = batch
            ok = False
            log.error("status_write_failed", batch_id=batch.id, error=str(exc))
        if ok and fresh.status.done:
            # The empty folder left in work/ until now is what makes recovery
            # rewrite a final status.json that a crash kept from being written.
            self.spool.release(batch.work_path)
        return ok
