"""One SQL store: every :class:`batchd.store.Store` method, once, over a connector.

A connector (:mod:`batchd.store.sqlite`, :mod:`batchd.store.postgres`) owns the
connections, transactions, migrations, wake-ups and the translation of driver
errors into :class:`StoreError`; this module owns what the queue does with
them. Statements come by name from :mod:`batchd.store.queries`.

:class:`SqlStore` is the one class every contract method is on. This module
holds the batch and file lifecycle (registration, claim, finish, retry,
requeue, progress); the reads come from :class:`batchd.store.reads.SqlReads`
and uploads, retention and nodes from :class:`batchd.store.upkeep.SqlUpkeep`.
A new contract method goes beside its kind (a write in a file's life here, a
read in ``reads.py``, anything else in ``upkeep.py``), its statement into
``queries.py`` and its signature into the :class:`batchd.store.Store` protocol.

Callers get the very same records from both databases: ids as strings, times
as :func:`batchd.clock.iso` text (the connector's ``ts`` turns a time into what
its database compares; :mod:`batchd.store.rows` turns what comes back into records).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from batchd.config import Priority
from batchd.errors import AlreadyRegistered, NameTaken, StoreError
from batchd.faults import crash_point
from batchd.records import (
    BatchRow,
    FileRow,
    FileTask,
    NewBatch,
    Outcome,
    Settled,
    Status,
    batch_status,
)
from batchd.store import queries
from batchd.store.connector import Connector, Tx
from batchd.store.reads import SqlReads
from batchd.store.rows import batch_row, file_row
from batchd.store.upkeep import SqlUpkeep


class SqlStore(SqlReads, SqlUpkeep):
    """The queue store, written once against a :class:`Connector`."""

    def __init__(self, db: Connector, node_id: str, lease_seconds: float = 30.0) -> None:
        self.db = db
        #: this node's name in ``nodes`` (``batchd nodes``, /healthz).
        self.node_id = node_id
        #: how long a claimed file stays this node's without a heartbeat (PostgreSQL).
        self.lease = timedelta(seconds=lease_seconds)
        self.q = queries.for_dialect(db.dialect)
        self._started: Any = None

    @property
    def _all(self) -> list[Any]:
        return self.db.connections

    # -- connections, delegated ----------------------------------------------

    def close(self) -> None:
        self.db.close()

    def release_thread(self) -> None:
        self.db.release_thread()

    def ping(self) -> None:
        self.db.read(self.q["ping"])

    def schema_version(self) -> int:
        return self.db.schema_version()

    def change_version(self) -> int:
        return self.db.change_version()

    def listen_fileno(self) -> int | None:
        return self.db.listen_fileno()

    def drain_notifications(self) -> int:
        return self.db.drain_notifications()

    # -- registration --------------------------------------------------------

    def register_batch(self, batch: NewBatch, now: datetime) -> BatchRow:
        """Insert a batch and all its files in one transaction and return it.

        The counter row is taken first: its lock (SQLite: the whole database)
        serialises registrations, so a batch's files get one contiguous block
        of ``seq`` (FIFO across nodes) and the checks below see every batch
        registered before.
        """
        with self.db.transaction() as tx:
            return self._insert_batch(tx, batch, now)

    def register_batches(self, batches: Sequence[NewBatch], now: datetime) -> list[BatchRow]:
        """Insert several batches and their files in one transaction; all or none.

        Each batch is checked and inserted exactly as :meth:`register_batch`
        does, in order (FIFO by list position); the first that is
        :class:`AlreadyRegistered` or :class:`NameTaken` rolls back them all.
        """
        if not batches:
            return []
        with self.db.transaction() as tx:
            return [self._insert_batch(tx, batch, now) for batch in batches]

    def _insert_batch(self, tx: Tx, batch: NewBatch, now: datetime) -> BatchRow:
        """One batch and its files, inside the caller's transaction."""
        batch_id = str(uuid.uuid4())
        stamp = self.db.ts(now)
        n = len(batch.files)
        seq = int(tx.row(self.q["counter_take"], (n,))["value"]) - n
        if tx.one(self.q["work_path_taken"], (batch.work_path,)):
            raise AlreadyRegistered(batch.work_path)
        if tx.one(self.q["name_taken"], (batch.name,)):
            raise NameTaken(batch.name)
        inserted = tx.run(
            self.q["insert_batch"],
            (
                *(batch_id, batch.user_id, Status.PENDING, n, batch.priority, stamp),
                *(batch.error, batch.name, batch.source, batch.work_path),
            ),
        )
        if not inserted:
            raise AlreadyRegistered(batch.work_path)
        rows = []
        for i, member in enumerate(batch.files):
            refused = batch.error is not None or member.error is not None
            rows.append(
                (
                    *(str(uuid.uuid4()), batch_id, member.relpath.rsplit("/", 1)[-1]),
                    *(member.relpath, member.file_size),
                    Status.FAILED if refused else Status.PENDING,
                    *(member.error or batch.error, stamp, stamp if refused else None),
                    *(seq + i + 1, batch.priority, batch.priority.rank),
                    *(member.file_dev, member.file_ino),
                )
            )
        tx.many(self.q["insert_file"], rows)
        return self._refresh_batch(tx, batch_id, now)

    def name_taken(self, name: str) -> bool:
        return bool(self.db.read(self.q["name_taken"], (name,)))

    def batch_by_work_path(self, work_path: str) -> BatchRow | None:
        rows = self.db.read(self.q["batch_by_work_path"], (work_path,))
        return batch_row(rows[0]) if rows else None

    # -- the queue -----------------------------------------------------------

    def claim_next(self, now: datetime) -> FileTask | None:
        """Atomically move the next due pending file to ``processing``, leased to this node.

        Order: priority rank, then registration order (``seq``).
        """
        with self.db.transaction() as tx:
            return self._claim(tx, now, None, fresh=False)

    def _claim(
        self,
        tx: Tx,
        now: datetime,
        claimant: str | None,
        fresh: bool,
        known: BatchRow | None = None,
    ) -> FileTask | None:
        """The claim, inside the caller's transaction; ``fresh``: only a never-tried head.

        ``known`` is a batch row this transaction already derived (the batch of
        the file it just finished): not read again when the claim is in it.
        """
        params = {
            "now": self.db.ts(now),
            "node_id": self.node_id,
            "lease_until": self.db.ts(now + self.lease),
            "claimant": claimant,
            "fresh": int(fresh),
        }
        row = tx.one(self.q["claim"], params)
        if row is None:
            return None
        file = file_row(row)
        if row.get("batch_status") == Status.PROCESSING:
            # PostgreSQL read the batch with the claim; a batch already
            # processing keeps its status and counters when one more starts.
            return FileTask(
                file=file,
                batch_name=row["batch_name"],
                work_path=row["batch_work_path"],
                priority=Priority(row["batch_priority"]),
                batch_files=int(row["batch_total_files"]),
            )
        if known is not None and known.id == file.batch_id and known.status == Status.PROCESSING:
            return _task(file, known)
        return _task(file, self._batch_for_claim(tx, file.batch_id, now))

    def finish_and_claim(
        self, file_id: str, outcome: Outcome, now: datetime, claimant: str
    ) -> tuple[Settled | None, FileTask | None]:
        """:meth:`finish_file`, and in the same transaction a worker's claim of its next file.

        The claim takes the head of the queue's order (priority, then FIFO)
        only when that file was never claimed (``lease_gen``, ``attempts`` and
        ``retry_count`` 0): a re-queued file may need what only the daemon
        does before a run (its input back from archive/, a refusal kept, a
        queued move waited for, an attempt of it still running here stopped),
        so then nothing is claimed and the daemon claims it as before.
        The row records ``claimant`` (the worker's token): a worker that dies
        before it reports the claim leaves a row the daemon finds by it
        (:meth:`claimed_by`). One write transaction per file instead of two.
        Nothing is claimed when the outcome is superseded (None, None).
        """
        self._check_final([(file_id, outcome, now)])
        with self.db.transaction() as tx:
            row = tx.one(self.q["finish"], self._finish_params(file_id, outcome, now))
            if row is None:
                if outcome.lease is None:
                    raise StoreError(f"no file {file_id} in {self.db.where}")
                return None, None
            batch_id = str(row["batch_id"])
            # SQLite serialises every writer: the batch is derived in the
            # commit (as finish_many does); PostgreSQL derives it after, by
            # the last of its files (finish_file).
            batch = self._refresh_batch(tx, batch_id, now) if self._serialised else None
            task = self._claim(tx, now, claimant, fresh=True, known=batch)
        crash_point("after_file_commit")
        if batch is not None:
            return Settled(batch, ended=batch.status.done), task
        settled = self.settle_batch(batch_id, now)
        if settled is None:
            raise StoreError(f"batch of file {file_id} is no longer in {self.db.where}")
        return settled, task

    def claimed_by(self, claimant: str) -> list[FileTask]:
        """The files still ``processing`` under a worker's own claim (``claimant``)."""
        rows = self.db.read(self.q["claimed_by"], (claimant,))
        tasks = []
        for row in rows:
            file = file_row(row)
            batch = self.get_batch(file.batch_id)
            if batch is not None:
                tasks.append(_task(file, batch))
        return tasks

    def finish(self, file_id: str, outcome: Outcome, now: datetime) -> BatchRow:
        """Record one file's final outcome; returns its batch, re-derived. Atomic."""
        batch = self.finish_many([(file_id, outcome, now)])[0]
        if batch is None:
            raise StoreError(f"file {file_id} was claimed again: outcome superseded")
        return batch

    def finish_many(self, items: Sequence[tuple[str, Outcome, datetime]]) -> list[BatchRow | None]:
        """Record several files' final outcomes in one transaction (all or none).

        ``items`` are ``(file_id, outcome, completed_at)``. Returns the batch of
        each item, in order, re-derived once per batch after every update: the
        scheduler groups the outcomes that arrive together, so a busy daemon
        pays one commit for many files. Rows are locked files first (in id
        order), then batches (in id order), as every writer here does, so two
        nodes finishing files of the same batches cannot deadlock.

        Fencing: an outcome with a token (``Outcome.lease``) is written only
        while the row is still processing under that token; otherwise it is
        superseded (re-queued or claimed again meanwhile) and its item is None.
        """
        self._check_final(items)
        batch_of: dict[str, str] = {}
        with self.db.transaction() as tx:
            for file_id, outcome, at in sorted(items, key=lambda item: item[0]):
                row = tx.one(self.q["finish"], self._finish_params(file_id, outcome, at))
                if row is None:
                    if outcome.lease is None:
                        raise StoreError(f"no file {file_id} in {self.db.where}")
                    continue
                batch_of[file_id] = str(row["batch_id"])
            latest = max((at for _fid, _o, at in items), default=datetime.now(UTC))
            batches = {
                bid: self._refresh_batch(tx, bid, latest) for bid in sorted(set(batch_of.values()))
            }
        if not self._serialised:
            for bid, batch in batches.items():
                if not batch.status.done:
                    # A success committed meanwhile without the batch's lock
                    # (finish_file) may be the one this derivation missed.
                    settled = self.settle_batch(bid, latest)
                    if settled is not None and settled.ended:
                        batches[bid] = settled.batch
        return [batches[batch_of[fid]] if fid in batch_of else None for fid, _o, _at in items]

    def finish_file(self, file_id: str, outcome: Outcome, now: datetime) -> Settled | None:
        """Record one file's final outcome without waiting for its batch; None if superseded.

        A worker's success (:mod:`batchd.recorder`) comes here. On PostgreSQL
        the commit writes the file's row only: every worker of every node
        finishing a file of the same batch (FIFO order puts them all on one
        batch) would otherwise queue on the batch row's lock for its
        re-derivation. The batch is derived after the commit, and only when no
        file of it is left to finish (:meth:`settle_batch`): the last file to
        commit always sees the others' commits then, so the batch always
        ends, and the lock decides which one call ends it. Until then the
        batch row's counters trail its files; :meth:`refresh_counts` (the
        status.json rewrite, a few times a second) brings them up to date.
        SQLite serialises every writer anyway: there the batch is derived in
        the same commit, as :meth:`finish_many` does.

        Fenced as :meth:`finish_many`: with ``Outcome.lease`` the row is
        written only while it is still processing under that token.
        """
        if self._serialised:
            (batch,) = self.finish_many([(file_id, outcome, now)])
            crash_point("after_file_commit")
            return None if batch is None else Settled(batch, ended=batch.status.done)
        self._check_final([(file_id, outcome, now)])
        with self.db.transaction() as tx:
            row = tx.one(self.q["finish"], self._finish_params(file_id, outcome, now))
        if row is None:
            if outcome.lease is None:
                raise StoreError(f"no file {file_id} in {self.db.where}")
            return None
        # A node killed here leaves its batch underived (settle_abandoned).
        crash_point("after_file_commit")
        settled = self.settle_batch(str(row["batch_id"]), now)
        if settled is None:
            raise StoreError(f"batch of file {file_id} is no longer in {self.db.where}")
        return settled

    def settle_batch(self, batch_id: str, now: datetime) -> Settled | None:
        """The batch after its files' commits: derived (under its lock) when none is
        left to finish, else as its row is; None when there is no such batch.

        ``ended`` is True for the one derivation that moved the batch to its
        final status. Safe to call any number of times, from any node.
        """
        if self.db.key(batch_id) is None:
            return None
        rows = self.db.read(self.q["batch_with_unfinished"], (batch_id,))
        if not rows:
            return None
        if int(rows[0]["unfinished"]) > 0:
            return Settled(batch_row(rows[0]), ended=False)
        with self.db.transaction() as tx:
            before = tx.one(self.q["lock_batch_status"], (batch_id,))
            if before is None:
                return None
            if Status(before["status"]).done:
                # Ended by another call: deriving again would only bump its
                # version past the final status.json's.
                return Settled(batch_row(before), ended=False)
            batch = self._refresh_batch(tx, batch_id, now)
        return Settled(batch, ended=batch.status.done)

    def settle_abandoned(self, now: datetime, finished_before: datetime) -> list[Settled]:
        """Derive the running batches whose last lock-free commit nobody derived.

        A node SIGKILLed (or cut off for good) between :meth:`finish_file`'s
        commit of a batch's last file and :meth:`settle_batch` leaves the batch
        ``processing`` with nothing left to run: no other node touches it again,
        and start-up recovery ends it only when that very node starts again.
        Every node's heartbeat calls this (:mod:`batchd.scheduler`). Only batches
        whose last file finished before ``finished_before`` (a lease ago): a
        live worker derives its own commit within moments, and its archiving
        of the input must not race another node's end of the batch.

        Returns the batches this call ended (its caller ends them: documents,
        archive). SQLite derives in the commit itself: nothing to do.
        """
        if self._serialised:
            return []
        rows = self.db.read(self.q["abandoned_batches"], (self.db.ts(finished_before),))
        ended: list[Settled] = []
        for row in rows:
            settled = self.settle_batch(str(row["id"]), now)
            if settled is not None and settled.ended:
                ended.append(settled)
        return ended

    def refresh_counts(self, batch_id: str) -> None:
        """Bring a running batch's ``processed_files`` / ``failed_files`` up to its files.

        One statement (its row lock lasts no longer); a no-op when they are
        current or the batch has ended (its final derivation counted them).
        SQLite derives the batch in each file's commit, so they never trail
        there: no write transaction (the one write lock) for every status.json.
        """
        if self._serialised or self.db.key(batch_id) is None:
            return
        with self.db.transaction() as tx:
            tx.run(self.q["refresh_counts"], {"id": batch_id})

    @property
    def _serialised(self) -> bool:
        """One writer at a time (SQLite's BEGIN IMMEDIATE): no batch row lock to wait for."""
        return not self.q["lock_batch"]

    def _check_final(self, items: Sequence[tuple[str, Outcome, datetime]]) -> None:
        for file_id, outcome, _at in items:
            if not outcome.status.done:
                raise ValueError(f"finish() needs a final status, not {outcome.status}")
            if self.db.key(file_id) is None:
                raise StoreError(f"no file {file_id} in {self.db.where}")

    def _finish_params(self, file_id: str, outcome: Outcome, at: datetime) -> tuple[Any, ...]:
        return (
            outcome.status,
            json.dumps(outcome.result) if outcome.result is not None else None,
            *(outcome.error, self.db.ts(at), outcome.status),
            *(outcome.file_hash, outcome.file_size, outcome.processor),
            *(outcome.started_at, file_id, outcome.lease, outcome.lease),
        )

    def retry_later(
        self, file_id: str, error: str, available_at: datetime, lease: int | None = None
    ) -> bool:
        """Put a failed attempt back to pending; False when ``lease`` no longer holds."""
        if self.db.key(file_id) is None:
            return lease is None
        with self.db.transaction() as tx:
            changed = tx.run(
                self.q["retry_later"],
                (error, self.db.ts(available_at), file_id, lease, lease),
            )
            return changed > 0 or lease is None

    def requeue(self, file_ids: Sequence[str], leases: Mapping[str, int] | None = None) -> None:
        ids = [fid for fid in file_ids if self.db.key(fid) is not None]
        if not ids:
            return
        leases = leases or {}
        with self.db.transaction() as tx:
            tx.many(self.q["requeue"], [(fid, leases.get(fid), leases.get(fid)) for fid in ids])

    def requeue_stale(self) -> int:
        """At start-up: this node's ``processing`` files back to pending; returns how many.

        Only this node's: in a cluster the other nodes' files are running.
        """
        with self.db.transaction() as tx:
            return tx.run(self.q["requeue_stale"], {"node_id": self.node_id})

    def requeue_expired(self, now: datetime) -> int:
        """Files of any node whose lease ended before ``now`` back to pending.

        Their node stopped heart-beating, so the attempt is not spent. SQLite
        keeps no leases (one node: :meth:`requeue_stale` takes its
        predecessor's files back at start): always 0 there.
        """
        if not self.q["requeue_expired"]:
            return 0
        with self.db.transaction() as tx:
            return tx.run(self.q["requeue_expired"], (self.db.ts(now),))

    def set_progress(
        self, progress: Mapping[str, int], leases: Mapping[str, int] | None = None
    ) -> None:
        leases = leases or {}
        rows = [
            (max(0, min(100, int(pct))), fid, leases.get(fid), leases.get(fid))
            for fid, pct in progress.items()
            if self.db.key(fid) is not None
        ]
        if not rows:
            return
        with self.db.transaction() as tx:
            tx.many(self.q["set_progress"], rows)

    def retry_failed(self, target_id: str) -> int:
        if self.db.key(target_id) is None:
            return 0
        with self.db.transaction() as tx:
            rows = tx.all(self.q["retry_failed"], (target_id, target_id))
            now = datetime.now(UTC)
            for batch_id in sorted({str(r["batch_id"]) for r in rows}):
                self._refresh_batch(tx, batch_id, now)
            return len(rows)

    def _refresh_batch(self, tx: Tx, batch_id: str, now: datetime) -> BatchRow:
        """Derive a batch's counters and status from its files (inside a transaction).

        Deriving instead of incrementing keeps the batch right even after an
        operator edits batch_files by hand. PostgreSQL locks the batch row
        first, so two nodes finishing two of its files refresh one after the
        other and each counts the other's commit.
        """
        if self.q["lock_batch"]:
            tx.one(self.q["lock_batch"], (batch_id,))
        counts = {r["status"]: int(r["n"]) for r in tx.all(self.q["count_files"], (batch_id,))}
        row = tx.row(
            self.q["refresh_batch"],
            {
                "status": str(batch_status(counts)),
                "total": sum(counts.values()),
                "completed": counts.get(Status.COMPLETED, 0),
                "failed": counts.get(Status.FAILED, 0),
                "now": self.db.ts(now),
                "id": batch_id,
            },
        )
        return batch_row(row)

    def _batch_for_claim(self, tx: Tx, batch_id: str, now: datetime) -> BatchRow:
        """The batch of a file just claimed, re-derived only when the claim changes it.

        A batch already ``processing`` keeps its status and counters when one
        more file starts, so the hot path neither counts nor locks the batch.
        """
        row = tx.row(self.q["get_batch"], (batch_id,))
        if row["status"] == Status.PROCESSING:
            return batch_row(row)
        if row["status"] == Status.PENDING:
            # Its first file starts (every file of a loose drop's batch does):
            # processing, counters unchanged, without counting its files.
            started = tx.one(self.q["start_batch"], {"now": self.db.ts(now), "id": batch_id})
            if started is not None:
                return batch_row(started)
        return self._refresh_batch(tx, batch_id, now)


def _task(file: FileRow, batch: BatchRow) -> FileTask:
    """A claimed file with what its attempt needs of its batch."""
    return FileTask(
        file=file,
        batch_name=batch.name,
        work_path=batch.work_path,
        priority=batch.priority,
        batch_files=batch.total_files,
    )
