"""One SQL store: every :class:`batchd.store.Store` method, once, over a connector.

A connector (:mod:`batchd.store.sqlite`, :mod:`batchd.store.postgres`) owns the
connections, transactions, migrations, wake-ups and the translation of driver
errors into :class:`StoreError`; this module owns what the queue does with
them. Statements come by name from :mod:`batchd.store.queries`.

Callers get the very same records from both databases: ids as strings, times
as :func:`batchd.clock.iso` text (the connector's ``ts`` turns a time into what
its database compares; :mod:`batchd.store.rows` turns what comes back into records).
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from batchd.clock import parse_iso
from batchd.errors import AlreadyRegistered, NameTaken, StoreError
from batchd.records import (
    BatchRow,
    BatchSnapshot,
    FileRow,
    FileTask,
    NewBatch,
    NodeRow,
    Outcome,
    Status,
    batch_status,
)
from batchd.store import queries
from batchd.store.connector import Connector, Params, Row, Tx
from batchd.store.rows import batch_row, file_row, text_time


class SqlStore:
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
        batch_id = str(uuid.uuid4())
        stamp = self.db.ts(now)
        n = len(batch.files)
        with self.db.transaction() as tx:
            seq = int(_one(tx, self.q["counter_take"], (n,))["value"]) - n
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
        params = {
            "now": self.db.ts(now),
            "node_id": self.node_id,
            "lease_until": self.db.ts(now + self.lease),
        }
        with self.db.transaction() as tx:
            row = tx.one(self.q["claim"], params)
            if row is None:
                return None
            file = file_row(row)
            batch = self._batch_for_claim(tx, file.batch_id, now)
            return FileTask(
                file=file, batch_name=batch.name, work_path=batch.work_path, priority=batch.priority
            )

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
        for file_id, outcome, _at in items:
            if not outcome.status.done:
                raise ValueError(f"finish() needs a final status, not {outcome.status}")
            if self.db.key(file_id) is None:
                raise StoreError(f"no file {file_id} in {self.db.where}")
        batch_of: dict[str, str] = {}
        with self.db.transaction() as tx:
            for file_id, outcome, at in sorted(items, key=lambda item: item[0]):
                row = tx.one(
                    self.q["finish"],
                    (
                        outcome.status,
                        json.dumps(outcome.result) if outcome.result is not None else None,
                        *(outcome.error, self.db.ts(at), outcome.status),
                        *(outcome.file_hash, outcome.file_size, outcome.processor),
                        *(outcome.started_at, file_id, outcome.lease, outcome.lease),
                    ),
                )
                if row is None:
                    if outcome.lease is None:
                        raise StoreError(f"no file {file_id} in {self.db.where}")
                    continue
                batch_of[file_id] = str(row["batch_id"])
            latest = max((at for _fid, _o, at in items), default=datetime.now(UTC))
            batches = {
                bid: self._refresh_batch(tx, bid, latest) for bid in sorted(set(batch_of.values()))
            }
        return [batches[batch_of[fid]] if fid in batch_of else None for fid, _o, _at in items]

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
        row = _one(
            tx,
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
        row = _one(tx, self.q["get_batch"], (batch_id,))
        if row["status"] == Status.PROCESSING:
            return batch_row(row)
        return self._refresh_batch(tx, batch_id, now)

    # -- queries -------------------------------------------------------------

    def get_batch(self, batch_id: str) -> BatchRow | None:
        if self.db.key(batch_id) is None:
            return None
        rows = self.db.read(self.q["get_batch"], (batch_id,))
        return batch_row(rows[0]) if rows else None

    def find_batch(self, id_or_name: str) -> BatchRow | None:
        key = self.db.key(id_or_name)
        rows = self.db.read(self.q["find_batch"], (key, id_or_name, key))
        return batch_row(rows[0]) if rows else None

    def snapshot(self, batch_id: str) -> BatchSnapshot | None:
        """The batch, its files, their counts and progress, all from one read.

        Read apart, the batch row could predate a commit its file rows show
        (issue 16: a status.json saying 'processing' with every file done).
        """
        if self.db.key(batch_id) is None:
            return None
        with self.db.snapshot() as tx:
            row = tx.one(self.q["get_batch"], (batch_id,))
            if row is None:
                return None
            files = tuple(file_row(r) for r in tx.all(self.q["snapshot_files"], (batch_id,)))
        return BatchSnapshot.of(batch_row(row), files)

    def batch_ids_with_prefix(self, prefix: str, limit: int = 2) -> list[str]:
        pattern = self.db.id_prefix(prefix)
        if pattern is None:
            return []
        escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = self.db.read(self.q["ids_with_prefix"], (escaped + "%", limit))
        return [str(r["id"]) for r in rows]

    def get_file(self, file_id: str) -> FileRow | None:
        if self.db.key(file_id) is None:
            return None
        rows = self.db.read(self.q["get_file"], (file_id,))
        return file_row(rows[0]) if rows else None

    def list_batches(
        self,
        limit: int = 50,
        offset: int = 0,
        status: Status | None = None,
        user_id: str | None = None,
    ) -> list[BatchRow]:
        where, params = [], []
        if status is not None:
            where.append(f"status = {self.db.mark}")
            params.append(str(status))
        if user_id is not None:
            where.append(f"user_id = {self.db.mark}")
            params.append(user_id)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        sql = self.q["list_batches"].format(where=clause)
        return [batch_row(r) for r in self.db.read(sql, (*params, limit, offset))]

    def list_files(self, batch_id: str, limit: int | None = None, offset: int = 0) -> list[FileRow]:
        if self.db.key(batch_id) is None:
            return []
        # LIMIT -1 is SQLite's "no limit"; PostgreSQL says it with LIMIT NULL.
        no_limit = -1 if self.db.dialect == "sqlite" else None
        rows = self.db.read(
            self.q["list_files"], (batch_id, no_limit if limit is None else limit, offset)
        )
        return [file_row(r) for r in rows]

    def file_summary(self, batch_id: str) -> dict[str, int]:
        summary = {"total": 0, **{str(s): 0 for s in Status}}
        if self.db.key(batch_id) is None:
            return summary
        for r in self.db.read(self.q["count_files"], (batch_id,)):
            summary[r["status"]] = int(r["n"])
            summary["total"] += int(r["n"])
        return summary

    def progress_sum(self, batch_id: str) -> int:
        if self.db.key(batch_id) is None:
            return 0
        return int(self.db.read(self.q["progress_sum"], (batch_id,))[0]["n"])

    def unfinished_batches(self) -> list[BatchRow]:
        return [batch_row(r) for r in self.db.read(self.q["unfinished_batches"])]

    def batches_with_files_in(self, statuses: Sequence[Status]) -> list[str]:
        if not statuses:
            return []
        sql = self.q["batches_with_files_in"].format(
            marks=", ".join(self.db.mark for _ in statuses)
        )
        return [str(r["batch_id"]) for r in self.db.read(sql, [str(s) for s in statuses])]

    def next_due(self) -> datetime | None:
        value = self.db.read(self.q["next_due"])[0]["due"]
        if value is None:
            return None
        return parse_iso(value) if isinstance(value, str) else value.astimezone(UTC)

    def queue_counts(self) -> dict[str, int]:
        counts = {str(s): 0 for s in Status}
        for r in self.db.read(self.q["queue_counts"]):
            counts[r["status"]] = int(r["n"])
        return counts

    def counts_by_status_priority(self) -> dict[str, dict[tuple[str, str], int]]:
        """Files and batches by (status, priority), for the metrics scrape.

        ``{"files": {(status, priority): n}, "batches": {...}}``; pairs with no
        rows are absent. Both counts come from one read, so they agree.
        """
        out: dict[str, dict[tuple[str, str], int]] = {"files": {}, "batches": {}}
        with self.db.snapshot() as tx:
            for key in ("files", "batches"):
                for r in tx.all(self.q[f"counts_{key}"]):
                    out[key][(r["status"], r["priority"])] = int(r["n"])
        return out

    # -- uploads (rate limiting) ----------------------------------------------

    def uploads_since(self, user_id: str, since: datetime) -> list[str]:
        """Times of ``user_id``'s uploads at or after ``since``, oldest first."""
        rows = self.db.read(self.q["uploads_since"], (user_id, self.db.ts(since)))
        return [text_time(r["created_at"]) or "" for r in rows]

    def record_upload(self, user_id: str, now: datetime, limit: int, window: timedelta) -> bool:
        """Atomically count an upload for ``user_id`` unless ``limit`` are already in
        the window; True when it was counted (the upload may go ahead).

        PostgreSQL takes a per-user advisory lock, so two nodes taking uploads
        from one user at once cannot both squeeze in.
        """
        with self.db.transaction() as tx:
            if self.q["lock_uploads"]:
                tx.one(self.q["lock_uploads"], (user_id,))
            n = _one(tx, self.q["count_uploads"], (user_id, self.db.ts(now - window)))["n"]
            if n >= limit:
                return False
            tx.run(self.q["insert_upload"], (user_id, self.db.ts(now)))
            tx.run(self.q["prune_uploads"], (self.db.ts(now - 2 * window),))
            return True

    # -- retention -----------------------------------------------------------

    def finished_before(self, cutoff: datetime) -> list[BatchRow]:
        """Completed or failed batches that ended before ``cutoff``."""
        return [
            batch_row(r) for r in self.db.read(self.q["finished_before"], (self.db.ts(cutoff),))
        ]

    def delete_batch(self, batch_id: str) -> None:
        """Delete a finished batch and its files (refuses unfinished ones)."""
        if self.db.key(batch_id) is None:
            return
        with self.db.transaction() as tx:
            busy = _one(tx, self.q["count_unfinished_files"], (batch_id,))["n"]
            if busy:
                raise StoreError(f"batch {batch_id} still has {busy} unfinished files")
            tx.run(self.q["delete_files"], (batch_id,))
            tx.run(self.q["delete_batch"], (batch_id,))

    # -- nodes ----------------------------------------------------------------

    def heartbeat(
        self,
        now: datetime,
        address: str | None = None,
        running: Sequence[str] | None = None,
        leases: Mapping[str, int] | None = None,
    ) -> None:
        """Atomically record that this node is alive and extend its files' leases.

        ``address`` is where this node's HTTP API listens, if it serves one.
        ``running``: the files this node really runs; only their leases are
        extended, so a file leased to this node that it lost track of expires
        and is requeued. ``None`` extends every file leased to this node. A
        file in ``leases`` is extended only while it still carries that
        token. SQLite keeps no leases: there only the node row is written.
        """
        stamp = self.db.ts(now)
        if self._started is None:
            self._started = stamp
        host, pid = socket.gethostname(), os.getpid()
        with self.db.transaction() as tx:
            tx.run(
                self.q["upsert_node"],
                (self.node_id, host, pid, self._started, stamp, address),
            )
            if not self.q["extend_leases"]:
                return
            until = self.db.ts(now + self.lease)
            if running is None:
                tx.run(self.q["extend_all_leases"], (until, self.node_id))
            elif ids := [fid for fid in running if self.db.key(fid) is not None]:
                gens = [(leases or {}).get(fid) for fid in ids]
                tx.run(self.q["extend_leases"], (until, ids, gens, self.node_id))

    def nodes(self) -> list[NodeRow]:
        """Every node that heart-beat, with how many files it runs, by node id."""
        return [
            NodeRow(
                node_id=r["node_id"],
                host=r["host"],
                pid=r["pid"],
                started_at=text_time(r["started_at"]) or "",
                last_heartbeat=text_time(r["last_heartbeat"]) or "",
                address=r["address"],
                processing=int(r["processing"]),
            )
            for r in self.db.read(self.q["nodes"], {"node_id": self.node_id})
        ]


def _one(tx: Tx, sql: str, params: Params | None = None) -> Row:
    row = tx.one(sql, params)
    if row is None:  # pragma: no cover - every caller's statement returns a row
        raise StoreError(f"no row from {sql.split()[0]}")
    return row
