"""A worker's own record of a success: commit, input move, batch end (issue 15).

The daemon's loop used to do this for every file: take the worker's Done,
fsync the result, commit it, queue the input move and the batch end for its
archiver thread. That put about 3 ms of the daemon's CPU on every file, in
one process whose threads share one interpreter lock, and capped batchd near
300 files/s whatever the worker count (BENCHMARKS.md, issue 15). The common
case, a success, now ends in the worker that produced it, in the order crash
recovery relies on:

1. the result file is written and fsynced (:func:`batchd.worker.deliver`);
2. the outcome is committed, fenced by the claim's token (``lease_gen``): an
   attempt that lost its file (re-queued, claimed again) changes nothing;
3. the input moves to ``archive/``;
4. when that commit finished the batch, the batch ends here too: the rest
   of its folder leaves ``work/``, the final status.json is written and the
   empty folder released.

A crash between any two steps leaves what start-up recovery already repairs
(a result with a processing row is run again; a finished row with its input
still in ``work/`` is moved on). Whatever cannot be done here is left to the
daemon, which knows how to wait for it: a :class:`StoreError` (the database
is away) hands the whole outcome back unrecorded, and the daemon queues and
retries it as before; a failed move or batch end is retried by the daemon's
archiver. Under the daemon's permit (``Delivery.may_claim``) the same commit
claims the worker's next file when the head of the queue was never tried
(:meth:`batchd.store.Store.finish_and_claim`): the worker gives up its file
and takes one in one transaction, so ``processing.concurrency`` still bounds
what is processing; the daemon hears of both in one message.
"""

from __future__ import annotations

import contextlib
import time
from datetime import datetime

import structlog

from batchd.archiver import ArchiveFile, log_batch_finished, move_input
from batchd.caps import inline_result
from batchd.clock import parse_iso
from batchd.config import Settings
from batchd.errors import BatchdError, StoreError
from batchd.faults import crash_point
from batchd.messages import Delivery, Job, Recorded
from batchd.outbox import Outbox
from batchd.records import Outcome, Status
from batchd.spool import Spool
from batchd.store import Store, open_store

log = structlog.get_logger("batchd.worker")
# Operators know file_completed by the scheduler's logger name.
scheduler_log = structlog.get_logger("batchd.scheduler")


class Recorder:
    """The store, spool and outbox of one worker process, opened on first use."""

    def __init__(
        self, settings: Settings, database_url: str | None, database_password: str | None = None
    ) -> None:
        if database_url and database_password:
            # PGPASSWORD is scrubbed from the worker's environment (a processor
            # must not read it): libpq gets it in the connection string instead.
            from psycopg.conninfo import make_conninfo

            database_url = make_conninfo(database_url, password=database_password)
        self._database_url = database_url
        self._store: Store | None = None
        self.configure(settings)

    def configure(self, settings: Settings) -> None:
        """Take the daemon's new settings (a reload); the store stays open."""
        # The worker's settings carry no database URL (processors must not
        # see its password): the recorder keeps its own.
        self.settings = settings.model_copy(
            update={"database": settings.database.model_copy(update={"url": self._database_url})}
        )
        self.spool = Spool(self.settings)

    def _opened(self) -> Store:
        if self._store is None:
            self._store = open_store(self.settings)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.close()
            self._store = None

    def record(
        self,
        job: Job,
        delivery: Delivery,
        result: dict[str, object],
        file_hash: str,
        file_size: int,
        completed_at: str,
        claimant: str | None = None,
    ) -> Recorded | None:
        """Commit a delivered success and carry out what follows it.

        With ``claimant`` (the worker's token, under the daemon's permit) the
        same commit claims the worker's next file (:meth:`Store.finish_and_claim`),
        returned in ``Recorded.claimed``. Returns None when the store could not
        take it (the daemon records it).
        """
        inline = inline_result(result, delivery.max_inline_result_bytes, delivery.result_path)
        outcome = Outcome(
            Status.COMPLETED,
            result=inline,
            file_hash=file_hash,
            file_size=file_size,
            processor=job.processor,
            started_at=delivery.started_at,
            lease=job.lease,
        )
        try:
            ended_at: datetime = parse_iso(completed_at)
            store = self._opened()
            # Without the batch's row lock: the batch is derived after the
            # commit, by the last of its files (Store.finish_file).
            claimed = None
            if claimant:
                settled, claimed = store.finish_and_claim(job.file_id, outcome, ended_at, claimant)
            else:
                settled = store.finish_file(job.file_id, outcome, ended_at)
        except StoreError as exc:
            log.warning("worker_record_deferred", file_id=job.file_id, error=exc.message)
            self.close()  # a fresh connection next time
            return None
        claimed_at = 0.0
        if claimed is not None:
            claimed_at = time.monotonic()
            # Dead here, the claim is known only to the row (its claimant): the
            # daemon finds it by this worker's token when it sees it die.
            crash_point("after_worker_claim")
        crash_point("after_finish")
        if settled is None:
            return Recorded(None)
        batch = settled.batch
        # Logged here, not by the daemon: under the daemon's logger name and
        # into the same stream, without costing its loop a rendering per file.
        scheduler_log.info(
            "file_completed",
            batch_id=job.batch_id,
            file_id=job.file_id,
            relpath=job.relpath,
            attempts=delivery.file.attempts,
            processor=job.processor,
        )
        try:
            archived = self._archive(job, delivery)
            if settled.ended:
                ended = self._end_batch(store, batch.id, delivery)
            else:
                # Done already: the call that ended it ends it (its daemon, if
                # its worker dies first), so the daemon must not end it twice.
                ended = batch.status.done
        except Exception as exc:
            # The commit stands: whatever failed after it is the daemon's to
            # finish (its archiver moves the input and ends the batch).
            log.error("worker_after_commit_failed", file_id=job.file_id, error=repr(exc))
            return Recorded(batch, claimed=claimed, claimed_at=claimed_at)
        return Recorded(
            batch, archived=archived, ended=ended, claimed=claimed, claimed_at=claimed_at
        )

    def _archive(self, job: Job, delivery: Delivery) -> bool:
        task = ArchiveFile(
            job.file_id, job.batch_id, delivery.work_path, delivery.batch_name, job.relpath, True
        )
        return move_input(self.spool, task)

    def _end_batch(self, store: Store, batch_id: str, delivery: Delivery) -> bool:
        """The batch end the daemon's archiver would do; False leaves it to the daemon.

        Every finished member still in ``work/`` is moved first by its own
        status, as start-up recovery does: a failure (or a success the daemon
        recorded) may still wait in the daemon's archiver queue, and the
        sweep of what is left must not take a failed input to ``archive/``.
        """
        try:
            # One read of the batch and its files serves the moves and the
            # final status.json (it was four reads: the batch, its files, and
            # the batch again with its files for the document).
            snap = store.snapshot(batch_id)
            if snap is None or not snap.batch.status.done:
                # Re-queued by an operator since the commit: the batch goes on,
                # and a re-queued input back in work/ must stay there.
                return False
            # An empty folder (every worker moved its own input) has nothing
            # to settle and nothing for finalize() to archive; work/ is
            # batchd's alone, so nothing appears there meanwhile, and
            # release() removes the folder only if it is still empty.
            if self.spool.inputs_left(delivery.work_path):
                for file in snap.files:
                    if file.status.done:
                        self.spool.settle_input(
                            delivery.work_path,
                            delivery.batch_name,
                            file.relpath,
                            ok=file.status == Status.COMPLETED,
                        )
                self.spool.finalize(delivery.work_path, delivery.batch_name)
            # Ended, its counters are final (no refresh_counts): the document
            # is the one a read now would give, unless an operator re-queued
            # the batch meanwhile; then its newer version replaces this one
            # (Outbox._install) and the check below keeps its folder.
            Outbox(self.spool, store).write_snapshot(snap)
            fresh = store.get_batch(batch_id)
        except (OSError, BatchdError) as exc:
            log.error("batch_finalize_failed", batch_id=batch_id, error=str(exc))
            return False
        if fresh is None or not fresh.status.done:
            return False
        self.spool.release(delivery.work_path)
        log_batch_finished(fresh)
        return True
