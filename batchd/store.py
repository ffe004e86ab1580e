"""The queue's state: batches and files in SQLite, behind one narrow contract.

Every SQL statement batchd runs lives in this module. The rest of the daemon
talks to the :class:`Store` protocol, so a PostgreSQL store can slot in later
and one contract test class runs against every implementation.

SQLite is used deliberately:

* WAL journal, so the HTTP server, the CLI and an operator's ``sqlite3`` read
  while the daemon writes.
* ``synchronous=NORMAL``: in WAL mode a commit survives a crash of the
  process; a power cut may lose the last few commits but never corrupts the
  file. batchd is at-least-once by design, so a lost commit means a file is
  processed again, never lost.
* ``BEGIN IMMEDIATE`` for every write, so two writers queue on
  ``busy_timeout`` instead of failing half-way with SQLITE_BUSY.
* one connection per thread (``sqlite3`` connections are not thread-safe).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from batchd.clock import iso
from batchd.config import Priority, Settings
from batchd.errors import AlreadyRegistered, ConfigError, NameTaken, StoreError
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

BUSY_TIMEOUT_MS = 10_000

# Forward-only migrations: MIGRATIONS[i] takes the schema from version i to i+1.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE batch_jobs (
        id              TEXT PRIMARY KEY,
        user_id         TEXT,
        status          TEXT NOT NULL,
        total_files     INTEGER NOT NULL DEFAULT 0,
        processed_files INTEGER NOT NULL DEFAULT 0,
        failed_files    INTEGER NOT NULL DEFAULT 0,
        priority        TEXT NOT NULL,
        created_at      TEXT NOT NULL,
        started_at      TEXT,
        completed_at    TEXT,
        error           TEXT,
        name            TEXT NOT NULL UNIQUE,
        source          TEXT,
        work_path       TEXT NOT NULL
    );
    CREATE INDEX batch_jobs_created ON batch_jobs (created_at);
    CREATE INDEX batch_jobs_status ON batch_jobs (status, created_at);
    CREATE INDEX batch_jobs_work ON batch_jobs (work_path);

    CREATE TABLE batch_files (
        id            TEXT PRIMARY KEY,
        batch_id      TEXT NOT NULL REFERENCES batch_jobs (id) ON DELETE CASCADE,
        filename      TEXT NOT NULL,
        file_size     INTEGER,
        file_hash     TEXT,
        status        TEXT NOT NULL,
        progress      INTEGER NOT NULL DEFAULT 0,
        result        TEXT,
        error         TEXT,
        retry_count   INTEGER NOT NULL DEFAULT 0,
        created_at    TEXT NOT NULL,
        started_at    TEXT,
        completed_at  TEXT,
        relpath       TEXT NOT NULL,
        seq           INTEGER NOT NULL,
        priority      TEXT NOT NULL,
        priority_rank INTEGER NOT NULL,
        available_at  TEXT,
        attempts      INTEGER NOT NULL DEFAULT 0,
        processor     TEXT,
        UNIQUE (batch_id, relpath)
    );
    -- The dispatch query walks this index in order: O(log n) per claim.
    CREATE INDEX batch_files_queue ON batch_files (status, priority_rank, seq);
    CREATE INDEX batch_files_batch ON batch_files (batch_id, status);

    CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO counters (name, value) VALUES ('file_seq', 0);

    CREATE TABLE uploads (
        id         INTEGER PRIMARY KEY,
        user_id    TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX uploads_user ON uploads (user_id, created_at);
    """,
    # 2: the nodes table of issue 8 (one row here: SQLite is one node).
    """
    CREATE TABLE nodes (
        node_id        TEXT PRIMARY KEY,
        host           TEXT NOT NULL,
        pid            INTEGER NOT NULL,
        started_at     TEXT NOT NULL,
        last_heartbeat TEXT NOT NULL,
        address        TEXT
    );
    """,
    # 3: fencing and status.json ordering (issue 16). lease_gen grows by one at
    # every claim: an outcome, progress or retry is written only while the row
    # still carries the generation of the attempt that reports it. version grows
    # at every re-derivation of the batch: a status.json built from an older
    # snapshot never replaces a newer one.
    """
    ALTER TABLE batch_files ADD COLUMN lease_gen INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE batch_jobs ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
    """,
    # 4: the device and inode each member had when scanned (issue 12).
    """
    ALTER TABLE batch_files ADD COLUMN file_dev INTEGER;
    ALTER TABLE batch_files ADD COLUMN file_ino INTEGER;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

_BATCH_COLS = (
    "id, user_id, status, total_files, processed_files, failed_files, priority, "
    "created_at, started_at, completed_at, error, name, source, work_path, version"
)
_FILE_COLS = (
    "id, batch_id, filename, relpath, file_size, file_hash, status, progress, result, "
    "error, retry_count, attempts, created_at, started_at, completed_at, processor, lease_gen, "
    "file_dev, file_ino"
)


class Store(Protocol):
    """What the daemon, the HTTP server and the CLI need from a queue store.

    Two implementations: :class:`SQLiteStore` (embedded, one node) and
    :class:`batchd.store_pg.PostgresStore` (several nodes on one spool).
    Every method raises :class:`StoreError` when the database cannot be
    reached; the caller decides whether to retry (the scheduler does).
    """

    #: this node's name in ``nodes`` (``cluster.node_id``).
    node_id: str
    #: how long a claimed file stays this node's without a heartbeat.
    lease: timedelta

    def close(self) -> None:
        """Close every connection this store opened."""

    def release_thread(self) -> None:
        """Close the calling thread's connection, if it opened one."""

    def ping(self) -> None:
        """Raise :class:`StoreError` unless the database answers."""

    def schema_version(self) -> int:
        """The schema version the database is at."""

    def change_version(self) -> int:
        """A number that changes after every commit (any connection): cache key."""

    def data_version(self) -> int:
        """A number that changes whenever another connection commits."""

    def register_batch(self, batch: NewBatch, now: datetime) -> BatchRow:
        """Insert a batch and all its files in one transaction and return it.

        Raises :class:`AlreadyRegistered` when ``work_path`` already is a
        batch (another node registered it), :class:`NameTaken` when another
        batch has the name.
        """

    def name_taken(self, name: str) -> bool:
        """True when a batch already uses ``name`` as its outbox folder."""

    def batch_by_work_path(self, work_path: str) -> BatchRow | None:
        """The batch registered from ``work_path`` (relative to the spool root)."""

    def claim_next(self, now: datetime) -> FileTask | None:
        """Atomically move the next due pending file to ``processing``.

        Order: priority (high first), then registration order. Files whose
        back-off has not expired are skipped. ``None`` when nothing is due.
        """

    def finish(self, file_id: str, outcome: Outcome, now: datetime) -> BatchRow:
        """Atomically record a file's final outcome and refresh its batch."""

    def finish_many(self, items: Sequence[tuple[str, Outcome, datetime]]) -> list[BatchRow | None]:
        """Atomically record several final outcomes; each item's batch, refreshed.

        An item whose ``Outcome.lease`` no longer matches the row (the file was
        re-queued or claimed again since) is not written: its entry is None.
        """

    def retry_later(
        self, file_id: str, error: str, available_at: datetime, lease: int | None = None
    ) -> bool:
        """Atomically put a failed attempt back to pending, one retry spent.

        With ``lease``, only while the file still carries that fencing token;
        False when it did not (the attempt was superseded).
        """

    def requeue(self, file_ids: Sequence[str], leases: Mapping[str, int] | None = None) -> None:
        """Put processing files back to pending without spending an attempt
        (those in ``leases`` only while they still carry that token)."""

    def requeue_stale(self) -> int:
        """At start-up: this node's ``processing`` files back to pending; returns how many."""

    def requeue_expired(self, now: datetime) -> int:
        """Files whose node's lease ended before ``now`` back to pending; how many."""

    def heartbeat(
        self,
        now: datetime,
        address: str | None = None,
        running: Sequence[str] | None = None,
        leases: Mapping[str, int] | None = None,
    ) -> None:
        """Record that this node is alive and extend the leases of its ``running`` files
        (those in ``leases`` only while they still carry that token)."""

    def nodes(self) -> list[NodeRow]:
        """Every node that heart-beat, with how many files it runs."""

    def listen_fileno(self) -> int | None:
        """A descriptor that turns readable when work arrives (None: poll)."""

    def drain_notifications(self) -> int:
        """Consume arrived wake-ups without blocking; how many."""

    def set_progress(
        self, progress: Mapping[str, int], leases: Mapping[str, int] | None = None
    ) -> None:
        """Record progress percentages for running files, in one transaction
        (those in ``leases`` only while they still carry that token)."""

    def retry_failed(self, target_id: str) -> int:
        """Failed file ``target_id``, or every failed file of batch ``target_id``,
        back to pending with retries reset; returns how many."""

    def refresh_batch(self, batch_id: str, now: datetime) -> BatchRow:
        """Re-derive a batch's counters and status from its files."""

    def get_batch(self, batch_id: str) -> BatchRow | None: ...

    def snapshot(self, batch_id: str) -> BatchSnapshot | None:
        """A batch and all its files from one consistent read (status.json)."""

    def find_batch(self, id_or_name: str) -> BatchRow | None: ...

    def batch_ids_with_prefix(self, prefix: str, limit: int = 2) -> list[str]:
        """Up to ``limit`` batch ids starting with ``prefix`` (the CLI's short ids)."""

    def get_file(self, file_id: str) -> FileRow | None: ...

    def list_batches(
        self,
        limit: int = 50,
        offset: int = 0,
        status: Status | None = None,
        user_id: str | None = None,
    ) -> list[BatchRow]: ...

    def list_files(
        self, batch_id: str, limit: int | None = None, offset: int = 0
    ) -> list[FileRow]: ...

    def file_summary(self, batch_id: str) -> dict[str, int]:
        """Counts of the batch's files by status, plus ``total``."""

    def progress_sum(self, batch_id: str) -> int:
        """Sum of the files' progress, done files counting 100."""

    def unfinished_batches(self) -> list[BatchRow]:
        """Batches not yet completed or failed."""

    def batches_with_files_in(self, statuses: Sequence[Status]) -> list[str]:
        """Ids of batches that have a file in one of ``statuses``."""

    def next_due(self) -> datetime | None:
        """When the earliest backed-off pending file becomes due, if any."""

    def queue_counts(self) -> dict[str, int]:
        """Files by status across the whole database."""

    def counts_by_status_priority(self) -> dict[str, dict[tuple[str, str], int]]:
        """Files and batches by (status, priority), for /metrics."""

    def uploads_since(self, user_id: str, since: datetime) -> list[str]:
        """The user's upload times since ``since`` (rate limit)."""

    def record_upload(self, user_id: str, now: datetime, limit: int, window: timedelta) -> bool:
        """Atomically count an upload unless ``limit`` were made within ``window``."""

    def finished_before(self, cutoff: datetime) -> list[BatchRow]:
        """Finished batches that completed before ``cutoff`` (retention)."""

    def delete_batch(self, batch_id: str) -> None:
        """Delete a finished batch and its files (refuses unfinished ones)."""


def open_store(settings: Settings) -> Store:
    """The store ``settings`` ask for: PostgreSQL when ``database.url`` is set, else SQLite.

    psycopg is imported only here, on demand, so single-node users need not
    install it.
    """
    if settings.database.url:
        try:
            from batchd.store_pg import PostgresStore
        except ImportError as exc:
            raise ConfigError(
                "database.url needs the PostgreSQL driver psycopg, which is not installed:"
                " pip install 'batchd[postgres]' (or unset database.url to use SQLite)"
            ) from exc
        return PostgresStore(
            settings.database.url,
            node_id=settings.node_id,
            lease_seconds=settings.cluster.lease_seconds,
        )
    return SQLiteStore(
        settings.db_path, node_id=settings.node_id, lease_seconds=settings.cluster.lease_seconds
    )


class SQLiteStore:
    """The embedded store: one SQLite file in WAL mode."""

    def __init__(self, path: Path, node_id: str = "", lease_seconds: float = 30.0) -> None:
        self.path = path
        #: SQLite is one node; the id names it in ``nodes`` (``batchd nodes``, /healthz).
        self.node_id = node_id or socket.gethostname()
        #: unused by SQLite (no other node can take over), kept for the common signature.
        self.lease = timedelta(seconds=lease_seconds)
        self._started: str | None = None
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._write_lock = _FairLock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create {path.parent}: {exc.strerror}") from exc
        self._migrate()

    # -- connections ---------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
                conn = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False, timeout=10
                )
                conn.row_factory = sqlite3.Row
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute("PRAGMA foreign_keys = ON")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open database {self.path}: {exc}") from exc
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()

    def release_thread(self) -> None:
        """Close the calling thread's connection, if it opened one.

        A thread about to end calls this (the HTTP server runs a thread per
        client connection), so connections do not pile up until :meth:`close`.
        """
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            return
        self._local.conn = None
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)
        conn.close()

    def change_version(self) -> int:
        """A number that changes after every commit by any connection of any process.

        For read caches (the HTTP server's). ``PRAGMA data_version`` ignores
        the asking connection's own commits, so it is read on a connection of
        its own that never writes, shared by all threads under the lock.
        """
        with self._lock:
            conn: sqlite3.Connection | None = getattr(self, "_version_conn", None)
            try:
                if conn is None or conn not in self._all:  # first use, or after close()
                    conn = sqlite3.connect(
                        self.path, isolation_level=None, check_same_thread=False, timeout=10
                    )
                    self._version_conn = conn
                    self._all.append(conn)
                return int(conn.execute("PRAGMA data_version").fetchone()[0])
            except sqlite3.Error as exc:
                raise StoreError(f"query on {self.path} failed: {exc}") from exc

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: BEGIN IMMEDIATE, COMMIT, ROLLBACK on any error.

        This process's writers (scheduler, watcher, HTTP threads) first queue
        on an in-process lock. Without it they would meet on SQLite's file
        lock, whose busy handler waits by sleeping (1, 2, 5, 10 … ms): under
        load a registration and a commit kept missing each other by whole
        milliseconds. Other processes (the CLI, an operator's sqlite3) still
        wait on ``busy_timeout``.
        """
        conn = self._conn()
        with self._write_lock:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"database {self.path} is unavailable: {exc}") from exc
            try:
                yield conn
            except sqlite3.Error as exc:
                conn.execute("ROLLBACK")
                raise StoreError(f"write to {self.path} failed: {exc}") from exc
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                conn.execute("ROLLBACK")
                raise StoreError(f"commit to {self.path} failed: {exc}") from exc

    def _read(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[sqlite3.Row]:
        try:
            return self._conn().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"query on {self.path} failed: {exc}") from exc

    def _migrate(self) -> None:
        with self._tx() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"database {self.path} has schema version {version}, newer than this "
                    f"batchd ({SCHEMA_VERSION}); upgrade batchd"
                )
            for target in range(version, SCHEMA_VERSION):
                # executescript would COMMIT our transaction; run statements one by one.
                for statement in _statements(MIGRATIONS[target]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target + 1}")

    def schema_version(self) -> int:
        return int(self._read("PRAGMA user_version")[0][0])

    def ping(self) -> None:
        self._read("SELECT 1")

    def data_version(self) -> int:
        return int(self._read("PRAGMA data_version")[0][0])

    # -- registration --------------------------------------------------------

    def register_batch(self, batch: NewBatch, now: datetime) -> BatchRow:
        """Insert a batch and all its files in one transaction and return it.

        Raises :class:`AlreadyRegistered` when ``work_path`` already is a
        batch, :class:`NameTaken` when another batch has the name.
        """
        batch_id = str(uuid.uuid4())
        stamp = iso(now)
        with self._tx() as conn:
            # BEGIN IMMEDIATE holds the write lock: nobody registers in between.
            if conn.execute(
                "SELECT 1 FROM batch_jobs WHERE work_path = ?", (batch.work_path,)
            ).fetchone():
                raise AlreadyRegistered(batch.work_path)
            if conn.execute("SELECT 1 FROM batch_jobs WHERE name = ?", (batch.name,)).fetchone():
                raise NameTaken(batch.name)
            seq = conn.execute(
                "UPDATE counters SET value = value + ? WHERE name = 'file_seq' RETURNING value",
                (len(batch.files),),
            ).fetchone()[0] - len(batch.files)
            conn.execute(
                "INSERT INTO batch_jobs (id, user_id, status, total_files, priority, created_at,"
                " error, name, source, work_path) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    batch_id,
                    batch.user_id,
                    Status.PENDING,
                    len(batch.files),
                    batch.priority,
                    stamp,
                    batch.error,
                    batch.name,
                    batch.source,
                    batch.work_path,
                ),
            )
            rows = []
            for i, member in enumerate(batch.files):
                refused = batch.error is not None or member.error is not None
                rows.append(
                    (
                        str(uuid.uuid4()),
                        batch_id,
                        member.relpath.rsplit("/", 1)[-1],
                        member.relpath,
                        member.file_size,
                        Status.FAILED if refused else Status.PENDING,
                        member.error or batch.error,
                        stamp,
                        stamp if refused else None,
                        seq + i + 1,
                        batch.priority,
                        batch.priority.rank,
                        member.file_dev,
                        member.file_ino,
                    )
                )
            conn.executemany(
                "INSERT INTO batch_files (id, batch_id, filename, relpath, file_size, status,"
                " error, created_at, completed_at, seq, priority, priority_rank, file_dev,"
                " file_ino) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            return self._refresh_batch(conn, batch_id, now)

    def name_taken(self, name: str) -> bool:
        return bool(self._read("SELECT 1 FROM batch_jobs WHERE name = ?", (name,)))

    def batch_by_work_path(self, work_path: str) -> BatchRow | None:
        rows = self._read(
            f"SELECT {_BATCH_COLS} FROM batch_jobs WHERE work_path = ?"
            " ORDER BY created_at DESC LIMIT 1",
            (work_path,),
        )
        return _batch(rows[0]) if rows else None

    # -- the queue -----------------------------------------------------------

    def claim_next(self, now: datetime) -> FileTask | None:
        stamp = iso(now)
        with self._tx() as conn:
            row = conn.execute(
                "SELECT f.id FROM batch_files f INDEXED BY batch_files_queue"
                " WHERE f.status = 'pending'"
                " AND (f.available_at IS NULL OR f.available_at <= ?)"
                " ORDER BY f.priority_rank, f.seq LIMIT 1",
                (stamp,),
            ).fetchone()
            if row is None:
                return None
            updated = conn.execute(
                f"UPDATE batch_files SET status = 'processing', started_at = ?, progress = 0,"
                f" completed_at = NULL, lease_gen = lease_gen + 1,"
                f" attempts = attempts + 1, available_at = NULL"
                f" WHERE id = ? RETURNING {_FILE_COLS}",
                (stamp, row["id"]),
            ).fetchone()
            file = _file(updated)
            batch = self._batch_for_claim(conn, file.batch_id, now)
            return FileTask(
                file=file,
                batch_name=batch.name,
                work_path=batch.work_path,
                priority=batch.priority,
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
        pays one commit for many files. An outcome that carries a fencing
        token (``Outcome.lease``) is recorded only while the file is still
        processing under that token; otherwise it is superseded (the file was
        re-queued or claimed again meanwhile) and its item is None.
        """
        for _fid, outcome, _at in items:
            if not outcome.status.done:
                raise ValueError(f"finish() needs a final status, not {outcome.status}")
        batch_of: list[str | None] = []
        with self._tx() as conn:
            for file_id, outcome, at in items:
                row = conn.execute(
                    "UPDATE batch_files SET status = ?, result = ?, error = ?, completed_at = ?,"
                    " progress = CASE WHEN ? = 'completed' THEN 100 ELSE progress END,"
                    " file_hash = COALESCE(?, file_hash), file_size = COALESCE(?, file_size),"
                    " processor = COALESCE(?, processor), started_at = COALESCE(?, started_at)"
                    " WHERE id = ? AND (? IS NULL OR (status = 'processing' AND lease_gen = ?))"
                    " RETURNING batch_id",
                    (
                        outcome.status,
                        json.dumps(outcome.result) if outcome.result is not None else None,
                        outcome.error,
                        iso(at),
                        outcome.status,
                        outcome.file_hash,
                        outcome.file_size,
                        outcome.processor,
                        outcome.started_at,
                        file_id,
                        outcome.lease,
                        outcome.lease,
                    ),
                ).fetchone()
                if row is None and outcome.lease is None:
                    raise StoreError(f"no file {file_id} in {self.path}")
                batch_of.append(None if row is None else row["batch_id"])
            latest = max(at for _fid, _o, at in items) if items else datetime.now(UTC)
            batches = {
                bid: self._refresh_batch(conn, bid, latest)
                for bid in dict.fromkeys(b for b in batch_of if b is not None)
            }
        return [None if bid is None else batches[bid] for bid in batch_of]

    def retry_later(
        self, file_id: str, error: str, available_at: datetime, lease: int | None = None
    ) -> bool:
        """Put a failed attempt back to pending; False when ``lease`` no longer holds."""
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE batch_files SET status = 'pending', retry_count = retry_count + 1,"
                " error = ?, available_at = ?, progress = 0 WHERE id = ?"
                " AND (? IS NULL OR (status = 'processing' AND lease_gen = ?))",
                (error, iso(available_at), file_id, lease, lease),
            )
            return cur.rowcount > 0 or lease is None

    def requeue(self, file_ids: Sequence[str], leases: Mapping[str, int] | None = None) -> None:
        if not file_ids:
            return
        leases = leases or {}
        with self._tx() as conn:
            # attempts - 1: an attempt cut short by us (shutdown, crash) is not spent.
            conn.executemany(
                "UPDATE batch_files SET status = 'pending', progress = 0,"
                " attempts = MAX(attempts - 1, 0) WHERE id = ? AND status = 'processing'"
                " AND (? IS NULL OR lease_gen = ?)",
                [(fid, leases.get(fid), leases.get(fid)) for fid in file_ids],
            )

    def requeue_stale(self) -> int:
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE batch_files SET status = 'pending', progress = 0,"
                " attempts = MAX(attempts - 1, 0) WHERE status = 'processing'"
            )
            return cur.rowcount

    def set_progress(
        self, progress: Mapping[str, int], leases: Mapping[str, int] | None = None
    ) -> None:
        if not progress:
            return
        leases = leases or {}
        with self._tx() as conn:
            conn.executemany(
                "UPDATE batch_files SET progress = ? WHERE id = ? AND status = 'processing'"
                " AND (? IS NULL OR lease_gen = ?)",
                [
                    (max(0, min(100, int(pct))), fid, leases.get(fid), leases.get(fid))
                    for fid, pct in progress.items()
                ],
            )

    def retry_failed(self, target_id: str) -> int:
        with self._tx() as conn:
            rows = conn.execute(
                "UPDATE batch_files SET status = 'pending', retry_count = 0, progress = 0,"
                " available_at = NULL WHERE status = 'failed' AND (id = ? OR batch_id = ?)"
                " RETURNING batch_id",
                (target_id, target_id),
            ).fetchall()
            now = datetime.now(UTC)
            for batch_id in {r["batch_id"] for r in rows}:
                self._refresh_batch(conn, batch_id, now)
            return len(rows)

    def _refresh_batch(self, conn: sqlite3.Connection, batch_id: str, now: datetime) -> BatchRow:
        """Derive a batch's counters and status from its files (inside a transaction).

        Deriving instead of incrementing keeps the batch right even after an
        operator edits batch_files by hand.
        """
        counts = {
            r["status"]: r["n"]
            for r in conn.execute(
                "SELECT status, COUNT(*) AS n FROM batch_files WHERE batch_id = ? GROUP BY status",
                (batch_id,),
            )
        }
        total = sum(counts.values())
        completed = counts.get(Status.COMPLETED, 0)
        failed = counts.get(Status.FAILED, 0)
        status = batch_status(counts)
        stamp = iso(now)
        row = conn.execute(
            f"UPDATE batch_jobs SET status = ?, total_files = ?, processed_files = ?,"
            f" failed_files = ?,"
            f" started_at = CASE WHEN ? IN ('processing', 'completed', 'failed')"
            f"   THEN COALESCE(started_at, ?) ELSE started_at END,"
            f" completed_at = CASE WHEN ? IN ('completed', 'failed')"
            f"   THEN COALESCE(completed_at, ?) ELSE NULL END, version = version + 1"
            f" WHERE id = ? RETURNING {_BATCH_COLS}",
            (status, total, completed, failed, status, stamp, status, stamp, batch_id),
        ).fetchone()
        return _batch(row)

    def _batch_for_claim(self, conn: sqlite3.Connection, batch_id: str, now: datetime) -> BatchRow:
        """The batch of a file just claimed, re-derived only when the claim changes it.

        Claiming moves one file from pending to processing: a batch already
        ``processing`` keeps its status and counters, so the hot path skips
        the re-derivation (a GROUP BY over the batch's files).
        """
        row = conn.execute(
            f"SELECT {_BATCH_COLS} FROM batch_jobs WHERE id = ?", (batch_id,)
        ).fetchone()
        if row is not None and row["status"] == Status.PROCESSING:
            return _batch(row)
        return self._refresh_batch(conn, batch_id, now)

    def refresh_batch(self, batch_id: str, now: datetime) -> BatchRow:
        """Re-derive one batch's counters (after an operator's manual edit)."""
        with self._tx() as conn:
            return self._refresh_batch(conn, batch_id, now)

    # -- queries -------------------------------------------------------------

    def get_batch(self, batch_id: str) -> BatchRow | None:
        rows = self._read(f"SELECT {_BATCH_COLS} FROM batch_jobs WHERE id = ?", (batch_id,))
        return _batch(rows[0]) if rows else None

    def find_batch(self, id_or_name: str) -> BatchRow | None:
        rows = self._read(
            f"SELECT {_BATCH_COLS} FROM batch_jobs WHERE id = ? OR name = ? LIMIT 1",
            (id_or_name, id_or_name),
        )
        return _batch(rows[0]) if rows else None

    def snapshot(self, batch_id: str) -> BatchSnapshot | None:
        """The batch, its files, their counts and progress, all from one read transaction."""
        conn = self._conn()
        try:
            conn.execute("BEGIN")  # deferred: the first SELECT fixes the WAL snapshot
            try:
                row = conn.execute(
                    f"SELECT {_BATCH_COLS} FROM batch_jobs WHERE id = ?", (batch_id,)
                ).fetchone()
                if row is None:
                    return None
                files = tuple(
                    _file(r)
                    for r in conn.execute(
                        f"SELECT {_FILE_COLS} FROM batch_files WHERE batch_id = ? ORDER BY seq",
                        (batch_id,),
                    )
                )
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"query on {self.path} failed: {exc}") from exc
        return BatchSnapshot.of(_batch(row), files)

    def batch_ids_with_prefix(self, prefix: str, limit: int = 2) -> list[str]:
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = self._read(
            "SELECT id FROM batch_jobs WHERE id LIKE ? ESCAPE '\\' ORDER BY id LIMIT ?",
            (escaped + "%", limit),
        )
        return [str(r[0]) for r in rows]

    def get_file(self, file_id: str) -> FileRow | None:
        rows = self._read(f"SELECT {_FILE_COLS} FROM batch_files WHERE id = ?", (file_id,))
        return _file(rows[0]) if rows else None

    def list_batches(
        self,
        limit: int = 50,
        offset: int = 0,
        status: Status | None = None,
        user_id: str | None = None,
    ) -> list[BatchRow]:
        where, params = [], []
        if status is not None:
            where.append("status = ?")
            params.append(str(status))
        if user_id is not None:
            where.append("user_id = ?")
            params.append(user_id)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._read(
            f"SELECT {_BATCH_COLS} FROM batch_jobs {clause}"
            f" ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?",
            (*params, limit, offset),
        )
        return [_batch(r) for r in rows]

    def list_files(self, batch_id: str, limit: int | None = None, offset: int = 0) -> list[FileRow]:
        rows = self._read(
            f"SELECT {_FILE_COLS} FROM batch_files WHERE batch_id = ?"
            f" ORDER BY seq LIMIT ? OFFSET ?",
            (batch_id, -1 if limit is None else limit, offset),
        )
        return [_file(r) for r in rows]

    def file_summary(self, batch_id: str) -> dict[str, int]:
        summary = {"total": 0, **{str(s): 0 for s in Status}}
        for r in self._read(
            "SELECT status, COUNT(*) AS n FROM batch_files WHERE batch_id = ? GROUP BY status",
            (batch_id,),
        ):
            summary[r["status"]] = r["n"]
            summary["total"] += r["n"]
        return summary

    def progress_sum(self, batch_id: str) -> int:
        rows = self._read(
            "SELECT COALESCE(SUM(CASE WHEN status IN ('completed', 'failed') THEN 100"
            " ELSE progress END), 0) FROM batch_files WHERE batch_id = ?",
            (batch_id,),
        )
        return int(rows[0][0])

    def unfinished_batches(self) -> list[BatchRow]:
        rows = self._read(
            f"SELECT {_BATCH_COLS} FROM batch_jobs WHERE status IN ('pending', 'processing')"
            " ORDER BY created_at"
        )
        return [_batch(r) for r in rows]

    def batches_with_files_in(self, statuses: Sequence[Status]) -> list[str]:
        marks = ", ".join("?" for _ in statuses)
        rows = self._read(
            f"SELECT DISTINCT batch_id FROM batch_files WHERE status IN ({marks})",
            [str(s) for s in statuses],
        )
        return [r[0] for r in rows]

    def next_due(self) -> datetime | None:
        rows = self._read(
            "SELECT MIN(available_at) FROM batch_files"
            " WHERE status = 'pending' AND available_at IS NOT NULL"
        )
        value = rows[0][0]
        if value is None:
            return None
        return datetime.fromisoformat(value.replace("Z", "+00:00"))

    def queue_counts(self) -> dict[str, int]:
        counts = {str(s): 0 for s in Status}
        for r in self._read("SELECT status, COUNT(*) AS n FROM batch_files GROUP BY status"):
            counts[r["status"]] = r["n"]
        return counts

    def counts_by_status_priority(self) -> dict[str, dict[tuple[str, str], int]]:
        """Files and batches by (status, priority), for the metrics scrape.

        ``{"files": {(status, priority): n}, "batches": {...}}``; pairs with no
        rows are absent. Both counts come from one read transaction, so they
        agree with each other.
        """
        out: dict[str, dict[tuple[str, str], int]] = {"files": {}, "batches": {}}
        conn = self._conn()
        try:
            conn.execute("BEGIN")
            try:
                for key, table in (("files", "batch_files"), ("batches", "batch_jobs")):
                    for r in conn.execute(
                        f"SELECT status, priority, COUNT(*) AS n FROM {table}"
                        " GROUP BY status, priority"
                    ):
                        out[key][(r["status"], r["priority"])] = r["n"]
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"query on {self.path} failed: {exc}") from exc
        return out

    # -- uploads (rate limiting) ----------------------------------------------

    def uploads_since(self, user_id: str, since: datetime) -> list[str]:
        """Times of ``user_id``'s uploads at or after ``since``, oldest first."""
        rows = self._read(
            "SELECT created_at FROM uploads WHERE user_id = ? AND created_at >= ?"
            " ORDER BY created_at",
            (user_id, iso(since)),
        )
        return [r[0] for r in rows]

    def record_upload(self, user_id: str, now: datetime, limit: int, window: timedelta) -> bool:
        """Atomically count an upload for ``user_id`` unless ``limit`` are already in
        the window; True when it was counted (the upload may go ahead)."""
        with self._tx() as conn:
            (n,) = conn.execute(
                "SELECT COUNT(*) FROM uploads WHERE user_id = ? AND created_at >= ?",
                (user_id, iso(now - window)),
            ).fetchone()
            if n >= limit:
                return False
            conn.execute(
                "INSERT INTO uploads (user_id, created_at) VALUES (?, ?)", (user_id, iso(now))
            )
            conn.execute("DELETE FROM uploads WHERE created_at < ?", (iso(now - 2 * window),))
            return True

    # -- retention -----------------------------------------------------------

    def finished_before(self, cutoff: datetime) -> list[BatchRow]:
        """Completed or failed batches that ended before ``cutoff``."""
        rows = self._read(
            f"SELECT {_BATCH_COLS} FROM batch_jobs WHERE status IN ('completed', 'failed')"
            " AND completed_at < ? ORDER BY completed_at",
            (iso(cutoff),),
        )
        return [_batch(r) for r in rows]

    # -- cluster (issue 8): one node, so mostly trivial ------------------------

    def heartbeat(
        self,
        now: datetime,
        address: str | None = None,
        running: Sequence[str] | None = None,
        leases: Mapping[str, int] | None = None,
    ) -> None:
        """Atomically record that this node is alive (SQLite files need no lease,
        so ``running`` and ``leases`` are unused)."""
        stamp = iso(now)
        if self._started is None:
            self._started = stamp
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO nodes (node_id, host, pid, started_at, last_heartbeat, address)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET"
                " host = excluded.host, pid = excluded.pid, started_at = excluded.started_at,"
                " last_heartbeat = excluded.last_heartbeat, address = excluded.address",
                (self.node_id, socket.gethostname(), os.getpid(), self._started, stamp, address),
            )

    def requeue_expired(self, now: datetime) -> int:
        """Always 0: one node, whose predecessor's files requeue_stale takes back at start."""
        return 0

    def nodes(self) -> list[NodeRow]:
        """This node (once it heart-beat), running every processing file."""
        rows = self._read(
            "SELECT n.node_id, n.host, n.pid, n.started_at, n.last_heartbeat, n.address,"
            " (SELECT COUNT(*) FROM batch_files WHERE status = 'processing') AS processing"
            " FROM nodes n ORDER BY n.node_id"
        )
        return [
            NodeRow(
                node_id=r["node_id"],
                host=r["host"],
                pid=r["pid"],
                started_at=r["started_at"],
                last_heartbeat=r["last_heartbeat"],
                address=r["address"],
                processing=r["processing"] if r["node_id"] == self.node_id else 0,
            )
            for r in rows
        ]

    def listen_fileno(self) -> int | None:
        """None: SQLite has no notifications (the scheduler's own wake-ups cover one node)."""
        return None

    def drain_notifications(self) -> int:
        return 0

    def delete_batch(self, batch_id: str) -> None:
        """Delete a finished batch and its files (refuses unfinished ones)."""
        with self._tx() as conn:
            busy = conn.execute(
                "SELECT COUNT(*) FROM batch_files WHERE batch_id = ?"
                " AND status IN ('pending', 'processing')",
                (batch_id,),
            ).fetchone()[0]
            if busy:
                raise StoreError(f"batch {batch_id} still has {busy} unfinished files")
            conn.execute("DELETE FROM batch_files WHERE batch_id = ?", (batch_id,))
            conn.execute("DELETE FROM batch_jobs WHERE id = ?", (batch_id,))


class _FairLock:
    """A first-come, first-served lock for this process's writers.

    ``threading.Lock`` is not fair: the scheduler's loop, committing twice
    per file, released and took it again before the watcher's thread was
    even scheduled, so registrations waited for the queue to run dry. Here
    each writer takes a ticket and goes in its turn.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> None:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._serving:
                self._cond.wait()

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


def _statements(script: str) -> list[str]:
    out, buf = [], []
    for line in script.splitlines():
        if line.strip().startswith("--"):
            continue
        buf.append(line)
        if line.rstrip().endswith(";"):
            out.append("\n".join(buf).strip())
            buf = []
    if "".join(buf).strip():
        out.append("\n".join(buf).strip())
    return out


def _batch(row: sqlite3.Row) -> BatchRow:
    return BatchRow(
        id=row["id"],
        user_id=row["user_id"],
        status=Status(row["status"]),
        total_files=row["total_files"],
        processed_files=row["processed_files"],
        failed_files=row["failed_files"],
        priority=Priority(row["priority"]),
        created_at=row["created_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        error=row["error"],
        name=row["name"],
        source=row["source"],
        work_path=row["work_path"],
        version=row["version"],
    )


def _file(row: sqlite3.Row) -> FileRow:
    return FileRow(
        id=row["id"],
        batch_id=row["batch_id"],
        filename=row["filename"],
        relpath=row["relpath"],
        file_size=row["file_size"],
        file_hash=row["file_hash"],
        status=Status(row["status"]),
        progress=row["progress"],
        result=row["result"],
        error=row["error"],
        retry_count=row["retry_count"],
        attempts=row["attempts"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        processor=row["processor"],
        lease_gen=row["lease_gen"],
        file_dev=row["file_dev"],
        file_ino=row["file_ino"],
    )
