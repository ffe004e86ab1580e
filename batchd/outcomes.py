"""Recording how each attempt ended: the scheduler's outcomes.

The loop (:mod:`batchd.scheduler`) hands every worker event to
:meth:`Outcomes.handle`; a completed attempt, or a failure, becomes a
:class:`Final` queued for the grouped commit, a retryable failure a
:class:`Retry` with its back-off time. :meth:`Outcomes.commit` then, once
per loop turn, makes the queued results durable as one group (the fsync
barrier), records every final outcome in one ``finish_many`` transaction,
refills the workers, and hands the input moves and batch ends to the
archiver. An attempt whose claim was superseded (its lease lost, or the file
claimed again) is dropped: nothing of it is written (issue 16).

The database may go away: :meth:`Outcomes.guarded` (:mod:`batchd.outage`)
runs each step that talks to it, and a :class:`StoreError` keeps the
outcomes queued in memory and retries with exponential back-off.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta

import structlog

from batchd.archiver import ArchiveFile, Archiver
from batchd.attempts import Final, Retry, Running
from batchd.caps import inline_result
from batchd.clock import Clock, iso, parse_iso
from batchd.config import Settings
from batchd.faults import crash_point
from batchd.messages import Done, Event, Failed, Job, Lost, Progress, Recorded, TimedOut
from batchd.metrics import Metrics
from batchd.outage import OutageGuard
from batchd.outbox import Outbox, ResultSyncer
from batchd.records import BatchRow, FileRow, FileTask, Outcome, Status
from batchd.spool import Spool
from batchd.store import Store

# The scheduler's logger: operators know these events by it.
log = structlog.get_logger("batchd.scheduler")


class Outcomes(OutageGuard):
    """The attempts running, and what became of each, until the database has it."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        spool: Spool,
        outbox: Outbox,
        clock: Clock,
        metrics: Metrics,
        archiver: Archiver,
        syncer: ResultSyncer,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.store = store
        self.spool = spool
        self.outbox = outbox
        self.clock = clock
        self.metrics = metrics
        self.archiver = archiver
        self.syncer = syncer
        #: the attempts this node runs, by file id (the loop adds, outcomes remove).
        self.running: dict[str, Running] = {}
        self.pending: list[Final] = []
        self.retries: list[Retry] = []
        self.progress: dict[str, int] = {}
        #: batches whose status.json is behind the database (ids).
        self.dirty: set[str] = set()
        self._last_flush = 0.0
        self.finished_count = 0
        #: the loop's dispatch: a commit refills the freed workers at once.
        self.refill: Callable[[], None] = lambda: None
        #: the loop's follow-up of a file a worker claimed itself in the commit
        #: of its success (``Recorded.claimed``), with the job it started (None:
        #: it could not start it).
        self.adopt: Callable[[FileTask, Job | None, float], None] = lambda task, job, at: None

    def _waiting(self) -> int:
        return len(self.pending) + len(self.retries)

    def _running_count(self) -> int:
        return len(self.running)

    def leases(self) -> dict[str, int]:
        """The fencing token of every attempt this node runs, by file id."""
        return {fid: r.task.file.lease_gen for fid, r in self.running.items()}

    def superseded(self, running: Running, reason: str) -> None:
        """Drop an attempt that no longer owns its file: nothing of it is written."""
        file = running.task.file
        if self.running.get(file.id) is running:
            del self.running[file.id]
        self.progress.pop(file.id, None)
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

    def _refused(self, running: Running, document: FileRow | None = None) -> None:
        """The store refused this attempt's fenced write: it was superseded, or it
        is already recorded, by its own worker (:mod:`batchd.recorder`), which
        then died or failed before saying so (killed at its deadline or by the
        OOM killer, an error after the commit), or by an earlier commit of ours
        whose answer was lost. Then what follows the commit is done here."""
        file = running.task.file
        row = self.store.get_file(file.id)
        if row is None or not row.status.done or row.lease_gen != file.lease_gen:
            self.superseded(running, "lease_lost")
            return
        log.warning(
            "outcome_already_recorded",
            batch_id=file.batch_id,
            file_id=file.id,
            relpath=file.relpath,
            status=str(row.status),
        )
        # A failure's document says what the row says; a success's result file
        # was written by its worker before its commit, and stays as it is.
        if document is not None and row.status == Status.FAILED:
            document = replace(document, error=row.error, completed_at=row.completed_at)
        else:
            document = None
        task = running.task
        self._finished(
            Final(
                running,
                Outcome(row.status, processor=row.processor),
                self.clock.now(),
                document=document,
            ),
            logged=True,
        )
        self._move_input(task, ok=row.status == Status.COMPLETED)
        # Derived if its files are all done: a worker that committed the last
        # one without the batch's lock (Store.finish_file) may have died before
        # deriving it.
        settled = self.store.settle_batch(file.batch_id, self.clock.now())
        if settled is not None:
            self.batch_moved_on(settled.batch)

    def _move_input(self, task: FileTask, ok: bool) -> None:
        """Have the archiver move a recorded file's input out of work/."""
        file = task.file
        self.archiver.archive_file(
            ArchiveFile(file.id, file.batch_id, task.work_path, task.batch_name, file.relpath, ok)
        )

    def batch_moved_on(self, batch: BatchRow) -> None:
        """A batch a commit changed: its end queued if it is done, else its status.json."""
        if batch.status.done:
            self.dirty.discard(batch.id)
            self.archiver.end_batch(batch)
        else:
            self.dirty.add(batch.id)

    # -- outcomes ----------------------------------------------------------------

    def handle(self, event: Event) -> None:
        self._handle(event)
        if isinstance(event, Done) and event.recorded is not None:
            claimed = event.recorded.claimed
            if claimed is not None:
                # Even for an attempt dropped meanwhile: the claim is the worker's now.
                self.adopt(claimed, event.recorded.started, event.recorded.claimed_at)

    def _handle(self, event: Event) -> None:
        running = self.running.get(event.file_id)
        if running is None or running.task.file.lease_gen != event.lease:
            return  # an attempt already dropped as superseded
        if isinstance(event, Progress):
            self.progress[event.file_id] = event.percent
            self.dirty.add(running.task.file.batch_id)
            return
        self.progress.pop(event.file_id, None)
        self.metrics.attempt_took(self.clock.monotonic() - running.started_mono)
        if isinstance(event, Done) and event.recorded is not None:
            self._recorded(running, event.recorded)
        elif isinstance(event, Done):
            self._complete(running, event)
        elif (
            isinstance(event, TimedOut)
            or (isinstance(event, Failed) and event.permanent)
            or (isinstance(event, Lost) and event.out_of_memory)
        ):
            self.fail(running, event.error)
        else:
            self._retry_or_fail(running, event.error)

    def _recorded(self, running: Running, recorded: Recorded) -> None:
        """A success its worker has committed, and maybe archived and ended."""
        task = running.task
        batch = recorded.batch
        if batch is None:
            self.superseded(running, "lease_lost")
            return
        outcome = Outcome(Status.COMPLETED, processor=running.processor)
        # The worker logged file_completed (and batch_finished) itself.
        self._finished(Final(running, outcome, self.clock.now()), logged=True)
        # No refill here: another event of this turn (a retry, a timeout) may
        # still hold its row as processing until this turn's commit; the next
        # dispatch, right after it, fills the freed workers within the bound.
        if not recorded.archived:
            self._move_input(task, ok=True)
        if recorded.ended:
            self.dirty.discard(batch.id)
        else:
            self.batch_moved_on(batch)

    def _complete(self, running: Running, done: Done) -> None:
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
        self.pending.append(Final(running, outcome, ended, unsynced=running.result_path))

    def fail(self, running: Running, error: str) -> None:
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

    def lost(self, running: Running, error: str) -> None:
        """An attempt whose worker died: retried after its back-off, or failed once spent."""
        self._retry_or_fail(running, error)

    def _retry_or_fail(self, running: Running, error: str) -> None:
        file = running.task.file
        if file.retry_count >= self.settings.processing.max_retries:
            self.fail(running, error)
            return
        shutil.rmtree(self.spool.scratch_for(file.id), ignore_errors=True)
        delay = self.settings.processing.backoff_seconds(file.retry_count + 1)
        # Queued like a final outcome; the file stays ours (leased) until committed.
        self.retries.append(Retry(running, error, self.clock.now() + timedelta(seconds=delay)))
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
        self.dirty.add(file.batch_id)

    def _finish(self, running: Running, outcome: Outcome) -> None:
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
        self.pending.append(Final(running, outcome, now, document=final))

    def commit(self) -> None:
        """Make the queued results durable, record every queued outcome in one
        transaction, refill the workers, then hand input moves and batch ends
        to the archiver.

        Outcomes that arrive together share one durability barrier and one
        commit, so a busy daemon pays for one disk flush and one transaction
        per turn rather than one per file. The slower file moves happen on the
        archiver's thread, so freed workers do not wait for them.
        """
        while self.retries:
            retry = self.retries[0]
            file = retry.running.task.file
            held = self.store.retry_later(
                file.id, retry.error, retry.available_at, lease=file.lease_gen
            )
            self.retries.pop(0)
            if held:
                if self.running.get(file.id) is retry.running:
                    del self.running[file.id]
            else:
                self._refused(retry.running)
        while self.pending:
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
            del self.pending[: len(pending)]
            crash_point("after_finish")
            accepted = []
            batches = []
            for final, batch in zip(pending, recorded, strict=True):
                if batch is None:
                    # Another attempt owns the file now (no result, no input
                    # move), or this one's worker recorded it already.
                    self._refused(final.running, final.document)
                    continue
                accepted.append(final)
                batches.append(batch)
                self._finished(final)
            pending = accepted
            # Only now: a file is claimed after the one it replaces is recorded
            # as finished, so the database never shows more files processing
            # than there are workers. What follows must happen even if the
            # database goes away now, so a failed dispatch waits its turn.
            self.guarded(self.refill)
            for final in pending:
                task = final.running.task
                self._move_input(task, ok=final.outcome.status == Status.COMPLETED)
            for batch in {b.id: b for b in batches}.values():
                self.batch_moved_on(batch)

    def _barrier(self) -> list[Final]:
        """fsync the queued results the workers wrote, as one group.

        Returns the queued outcomes that may be committed. A result that
        cannot be made durable (an I/O error) is never recorded as completed:
        that attempt is retried, or failed once retries are spent.
        """
        pending = list(self.pending)
        failed = self.syncer.sync([f.unsynced for f in pending if f.unsynced is not None])
        if not failed:
            return pending
        durable = [f for f in pending if f.unsynced not in failed]
        self.pending = durable + self.pending[len(pending) :]
        for final in pending:
            if final.unsynced in failed:
                exc = failed[final.unsynced]
                self._retry_or_fail(
                    final.running, f"cannot write the result file: {exc.strerror or exc}"
                )
        return durable

    def _finished(self, final: Final, logged: bool = False) -> None:
        """Forget a recorded attempt, count it, and log it (unless its worker did)."""
        task, outcome = final.running.task, final.outcome
        file = task.file
        if self.running.get(file.id) is final.running:
            del self.running[file.id]
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
        if logged:
            return
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

    def flush(self, force: bool = False) -> None:
        """Write progress and status.json for changed batches, a few times a second at most."""
        now = self.clock.monotonic()
        if not force and now - self._last_flush < self.settings.processing.status_interval_seconds:
            return
        self._last_flush = now
        if self.progress:
            progress, self.progress = self.progress, {}
            # Lost on a StoreError: the next report redoes it.
            self.store.set_progress(progress, self.leases())
        dirty, self.dirty = self.dirty, set()
        for batch_id in dirty:
            self.archiver.refresh(batch_id)
