"""The store's reads: batches, files, counts and due times for the API, the CLI,
status.json and the metrics scrape.

A mixin of :class:`batchd.store.sql.SqlStore` (which is the one class the
:class:`batchd.store.Store` contract is on): it writes nothing, and needs only
the store's connector (``db``) and named statements (``q``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from batchd.clock import parse_iso
from batchd.records import BatchRow, BatchSnapshot, FileRow, Status
from batchd.store.connector import Connector
from batchd.store.rows import batch_row, file_row

#: Batches per statement in :meth:`SqlReads.snapshots` (well under SQLite's
#: 32,766 parameters; PostgreSQL plans a short IN list as fast as one id).
SNAPSHOTS_CHUNK = 200


class SqlReads:
    """Every read-only contract method, against :class:`Connector`."""

    db: Connector
    q: Mapping[str, str]

    def get_batch(self, batch_id: str) -> BatchRow | None:
        if self.db.key(batch_id) is None:
            return None
        rows = self.db.read(self.q["get_batch"], (batch_id,))
        return batch_row(rows[0]) if rows else None

    def find_batch(self, id_or_name: str) -> BatchRow | None:
        key = self.db.key(id_or_name)
        rows = self.db.read(self.q["find_batch"], (key, id_or_name, key))
        return batch_row(rows[0]) if rows else None

    def find_batch_version(self, id_or_name: str) -> tuple[str, int, Status] | None:
        key = self.db.key(id_or_name)
        rows = self.db.read(self.q["find_batch_version"], (key, id_or_name, key))
        if not rows:
            return None
        row = rows[0]
        return str(row["id"]), int(row["version"]), Status(row["status"])

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

    def snapshots(self, batch_ids: Sequence[str]) -> dict[str, BatchSnapshot]:
        """:meth:`snapshot` of several batches from one read: two statements per
        ``SNAPSHOTS_CHUNK`` batches, not three per batch (the archiver's held
        first documents come in groups of hundreds)."""
        keys = list(dict.fromkeys(k for k in (self.db.key(b) for b in batch_ids) if k is not None))
        batches: list[BatchRow] = []
        files: dict[str, list[FileRow]] = {}
        if not keys:
            return {}
        with self.db.snapshot() as tx:
            for start in range(0, len(keys), SNAPSHOTS_CHUNK):
                chunk = keys[start : start + SNAPSHOTS_CHUNK]
                marks = ", ".join(self.db.mark for _ in chunk)
                rows = tx.all(self.q["get_batches"].format(marks=marks), chunk)
                batches += [batch_row(r) for r in rows]
                for r in tx.all(self.q["snapshots_files"].format(marks=marks), chunk):
                    file = file_row(r)
                    files.setdefault(file.batch_id, []).append(file)
        return {b.id: BatchSnapshot.of(b, tuple(files.get(b.id, ()))) for b in batches}

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

    def progress_sums(self, batch_ids: Sequence[str]) -> dict[str, int]:
        keys = [k for k in (self.db.key(b) for b in batch_ids) if k is not None]
        if not keys:
            return {}
        sql = self.q["progress_sums"].format(marks=", ".join(self.db.mark for _ in keys))
        sums = {str(r["batch_id"]): int(r["n"]) for r in self.db.read(sql, keys)}
        return {b: sums.get(b, 0) for b in batch_ids}

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
