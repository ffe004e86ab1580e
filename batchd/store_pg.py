"""The cluster store: batches and files in PostgreSQL, shared by several batchd nodes.

Same contract, tables and columns as :class:`batchd.store.SQLiteStore` (SPEC §5),
with PostgreSQL types (``uuid`` ids, ``timestamptz`` times, ``json`` results),
converted at this boundary so callers get the very same records: ids as strings,
times as :func:`batchd.clock.iso` text. Times are truncated to milliseconds on the
way in, so comparisons behave exactly as SQLite's fixed-width text does.

What PostgreSQL adds for a cluster of nodes on one shared spool:

* **Leases.** :meth:`PostgresStore.claim_next` takes the next due file with
  ``FOR UPDATE SKIP LOCKED`` (nodes never wait on each other's claims) and
  stamps it with this node's ``node_id`` and ``lease_until``;
  :meth:`~PostgresStore.heartbeat` extends the leases of the node's running
  files, and :meth:`~PostgresStore.requeue_expired` (run by every node) gives
  the files of a node that stopped heart-beating back to the queue, without
  spending an attempt. Lease times come from the caller's clock, so nodes
  need synchronised clocks (NTP); a skew of a second or two is harmless
  against ``cluster.lease_seconds`` (30).
* **Wake-ups.** A trigger on ``batch_files`` sends ``NOTIFY batchd_work``
  whenever a file becomes due (registration, requeue, retry, and an
  operator's ``UPDATE ... SET status='pending'`` in ``psql`` too);
  :meth:`~PostgresStore.listen_fileno` hands the scheduler a socket to add to
  its ``select()``, so idle nodes wake at once instead of polling.
* **Nodes.** A ``nodes`` table holds every node's last heartbeat.

Isolation: READ COMMITTED, with explicit row locks where it matters. Every
write that refreshes a batch locks the batch row (``FOR UPDATE``) before
counting its files, so two nodes finishing files of one batch at once
serialise on that row and the second counts the first's commit. Locks are
always taken files first, then batches in id order, so writers cannot
deadlock each other.

Connections: one per thread, as in the SQLite store (psycopg connections may
be shared, but a transaction may not), plus one dedicated ``LISTEN``
connection. No pool: the daemon has a fixed handful of threads, and HTTP
threads hand theirs back with :meth:`~PostgresStore.release_thread`.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row

from batchd.clock import iso
from batchd.config import Priority
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

Conn = psycopg.Connection[DictRow]

#: The channel the trigger notifies when a file becomes due.
CHANNEL = "batchd_work"
#: pg_advisory_xact_lock key held while migrating (several nodes may start at once).
MIGRATION_LOCK = 0x62617463_68640001  # "batchd" + 1
CONNECT_TIMEOUT_SECONDS = 10

# Forward-only migrations: MIGRATIONS[i] takes the schema from version i to i+1.
# Each runs in the migrating transaction, under MIGRATION_LOCK.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE batch_jobs (
        id              uuid PRIMARY KEY,
        user_id         text,
        status          text NOT NULL
            CHECK (status IN ('pending', 'processing', 'completed', 'failed')),
        total_files     integer NOT NULL DEFAULT 0,
        processed_files integer NOT NULL DEFAULT 0,
        failed_files    integer NOT NULL DEFAULT 0,
        priority        text NOT NULL CHECK (priority IN ('high', 'normal', 'low')),
        created_at      timestamptz NOT NULL,
        started_at      timestamptz,
        completed_at    timestamptz,
        error           text,
        name            text NOT NULL UNIQUE,
        source          text,
        -- Unique: the database half of exactly-once claiming (see register_batch).
        work_path       text NOT NULL UNIQUE,
        -- Registration order, for ties of created_at (SQLite's rowid).
        ord             bigint GENERATED ALWAYS AS IDENTITY
    );
    CREATE INDEX batch_jobs_created ON batch_jobs (created_at, ord);
    CREATE INDEX batch_jobs_status ON batch_jobs (status, created_at);

    CREATE TABLE batch_files (
        id            uuid PRIMARY KEY,
        batch_id      uuid NOT NULL REFERENCES batch_jobs (id) ON DELETE CASCADE,
        filename      text NOT NULL,
        file_size     bigint,
        file_hash     text,
        status        text NOT NULL
            CHECK (status IN ('pending', 'processing', 'completed', 'failed')),
        progress      integer NOT NULL DEFAULT 0,
        result        json,
        error         text,
        retry_count   integer NOT NULL DEFAULT 0,
        created_at    timestamptz NOT NULL,
        started_at    timestamptz,
        completed_at  timestamptz,
        relpath       text NOT NULL,
        seq           bigint NOT NULL,
        priority      text NOT NULL,
        priority_rank integer NOT NULL,
        available_at  timestamptz,
        attempts      integer NOT NULL DEFAULT 0,
        processor     text,
        node_id       text,
        lease_until   timestamptz,
        UNIQUE (batch_id, relpath)
    );
    -- The dispatch query walks this partial index in order: O(log n) per claim.
    CREATE INDEX batch_files_queue ON batch_files (priority_rank, seq)
        WHERE status = 'pending';
    CREATE INDEX batch_files_leases ON batch_files (lease_until)
        WHERE status = 'processing';
    CREATE INDEX batch_files_node ON batch_files (node_id)
        WHERE status = 'processing';
    CREATE INDEX batch_files_batch ON batch_files (batch_id, status);

    CREATE TABLE counters (name text PRIMARY KEY, value bigint NOT NULL);
    INSERT INTO counters (name, value) VALUES ('file_seq', 0);

    CREATE TABLE uploads (
        id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        user_id    text NOT NULL,
        created_at timestamptz NOT NULL
    );
    CREATE INDEX uploads_user ON uploads (user_id, created_at);

    CREATE TABLE nodes (
        node_id        text PRIMARY KEY,
        host           text NOT NULL,
        pid            integer NOT NULL,
        started_at     timestamptz NOT NULL,
        last_heartbeat timestamptz NOT NULL,
        address        text
    );

    -- A file that becomes due wakes every listening node, whoever made it due
    -- (a node, or an operator in psql). Identical notifications within one
    -- transaction are delivered once, so a 50-file registration sends one.
    CREATE FUNCTION batchd_notify_work() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('batchd_work', '');
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER batch_files_due
        AFTER INSERT OR UPDATE OF status, available_at ON batch_files
        FOR EACH ROW
        WHEN (NEW.status = 'pending' AND (NEW.available_at IS NULL OR NEW.available_at <= now()))
        EXECUTE FUNCTION batchd_notify_work();
    """,
    # 2: fencing and status.json ordering (issue 16). lease_gen grows by one at
    # every claim: an outcome, progress or lease renewal is written only while
    # the row still carries the generation of the attempt that reports it.
    # version grows at every re-derivation of the batch: a status.json built
    # from an older snapshot never replaces a newer one.
    """
    ALTER TABLE batch_files ADD COLUMN lease_gen integer NOT NULL DEFAULT 0;
    ALTER TABLE batch_jobs ADD COLUMN version bigint NOT NULL DEFAULT 0;
    """,
    # 3: the device and inode each member had when scanned (issue 12).
    """
    ALTER TABLE batch_files ADD COLUMN file_dev bigint, ADD COLUMN file_ino bigint;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

_BATCH_COLS = (
    "id, user_id, status, total_files, processed_files, failed_files, priority, "
    "created_at, started_at, completed_at, error, name, source, work_path, version"
)
_FILE_FIELDS = (
    *("id", "batch_id", "filename", "relpath", "file_size", "file_hash", "status"),
    *("progress", "result", "error", "retry_count", "attempts", "created_at", "started_at"),
    *("completed_at", "processor", "lease_gen", "file_dev", "file_ino"),
)


def _file_cols(prefix: str = "") -> str:
    """The FileRow columns; ``result`` as its stored text, so it reads back verbatim."""
    return ", ".join(
        f"{prefix}{c}::text AS {c}" if c == "result" else f"{prefix}{c}" for c in _FILE_FIELDS
    )


_FILE_COLS = _file_cols()


class PostgresStore:
    """The cluster store: one PostgreSQL database shared by every node."""

    def __init__(self, url: str, node_id: str, lease_seconds: float = 30.0) -> None:
        self.url = url
        self.node_id = node_id
        self.lease = timedelta(seconds=lease_seconds)
        self.where = describe_url(url)
        self._local = threading.local()
        self._all: list[Conn] = []
        self._lock = threading.Lock()
        self._listener: psycopg.Connection[Any] | None = None
        self._started: datetime | None = None
        self._migrate()

    # -- connections ---------------------------------------------------------

    def _connect(self) -> Conn:
        try:
            # autocommit: every write is an explicit conn.transaction() block;
            # reads outside one see the latest commits (READ COMMITTED).
            return psycopg.connect(
                self.url,
                autocommit=True,
                row_factory=dict_row,
                connect_timeout=CONNECT_TIMEOUT_SECONDS,
                application_name=f"batchd {self.node_id}"[:63],
            )
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to {self.where}: {_why(exc)}") from exc

    def _conn(self) -> Conn:
        conn: Conn | None = getattr(self._local, "conn", None)
        if conn is not None and (conn.closed or conn.broken):
            # The server restarted or the network dropped: start afresh.
            self._forget(conn)
            conn = None
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _forget(self, conn: Conn) -> None:
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)
        conn.close()

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
            if self._listener is not None:
                self._listener.close()
                self._listener = None
        self._local = threading.local()

    def release_thread(self) -> None:
        """Close the calling thread's connection, if it opened one."""
        conn: Conn | None = getattr(self._local, "conn", None)
        if conn is not None:
            self._forget(conn)

    @contextmanager
    def _tx(self, begin: str = "BEGIN") -> Iterator[Conn]:
        """A transaction: BEGIN, COMMIT, ROLLBACK on any error.

        A connection the server dropped (restart, failover) is found out by
        BEGIN, before anything was done, so it is replaced and BEGIN retried
        once; an error later in the transaction is the caller's StoreError.
        """
        conn = self._conn()
        try:
            conn.execute(begin)
        except psycopg.Error as exc:
            if not conn.broken:
                raise StoreError(f"{self.where} is unavailable: {_why(exc)}") from exc
            self._forget(conn)
            conn = self._conn()
            try:
                conn.execute(begin)
            except psycopg.Error as exc2:
                raise StoreError(f"{self.where} is unavailable: {_why(exc2)}") from exc2
        try:
            yield conn
        except psycopg.Error as exc:
            self._rollback(conn)
            raise StoreError(f"write to {self.where} failed: {_why(exc)}") from exc
        except BaseException:
            self._rollback(conn)
            raise
        try:
            conn.execute("COMMIT")
        except psycopg.Error as exc:
            self._rollback(conn)
            raise StoreError(f"commit to {self.where} failed: {_why(exc)}") from exc

    def _rollback(self, conn: Conn) -> None:
        try:
            conn.execute("ROLLBACK")
        except psycopg.Error:
            # The connection is gone, and the server rolled back with it.
            self._forget(conn)

    def _read(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[DictRow]:
        """One query outside a transaction; retried once on a fresh connection
        when the server had dropped the old one (a read is safe to repeat)."""
        conn = self._conn()
        try:
            return conn.execute(sql, params).fetchall()
        except psycopg.Error as exc:
            if not conn.broken:
                raise StoreError(f"query on {self.where} failed: {_why(exc)}") from exc
            self._forget(conn)
        try:
            return self._conn().execute(sql, params).fetchall()
        except psycopg.Error as exc:
            raise StoreError(f"query on {self.where} failed: {_why(exc)}") from exc

    def _migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION, one node at a time.

        The advisory lock makes nodes that start together queue: the first
        migrates, the others then find the schema current.
        """
        with self._tx() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            version = 0 if row is None else int(row["version"])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.where} has schema version {version}, newer than this "
                    f"batchd ({SCHEMA_VERSION}); upgrade batchd"
                )
            for target in range(version, SCHEMA_VERSION):
                conn.execute(MIGRATIONS[target])
                conn.execute("UPDATE schema_version SET version = %s", (target + 1,))

    def schema_version(self) -> int:
        return int(self._read("SELECT version FROM schema_version")[0]["version"])

    def ping(self) -> None:
        self._read("SELECT 1")

    def change_version(self) -> int:
        """A number that changes after every commit by any connection of any node.

        The server's current snapshot (``xmin:xmax:running xids``) changes
        whenever a writing transaction commits anywhere in the cluster, and
        is read before an answer is built, so a cached answer is never served
        after a commit it does not show. Other databases on the same server
        cause spurious changes: a cache miss, never a stale answer.
        """
        text = str(self._read("SELECT pg_current_snapshot()::text AS s")[0]["s"])
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")

    def data_version(self) -> int:
        return self.change_version()

    # -- registration --------------------------------------------------------

    def register_batch(self, batch: NewBatch, now: datetime) -> BatchRow:
        """Insert a batch and all its files in one transaction and return it.

        Exactly-once claiming across nodes takes both halves. The atomic
        ``rename(2)`` of ``inbox/<p>/<name>`` to ``work/<p>/<name>`` on the
        shared filesystem decides which node owns a drop: only one rename of
        one directory entry can succeed, the losers see the drop vanish. But
        a claimed folder can still be seen by a second node before it is
        registered (the start-up scan of ``work/`` for claims a crash left
        unregistered, or an NFS client retrying a rename whose reply was
        lost), and that node would register it again. The unique key on
        ``work_path`` closes that gap: the second ``INSERT ... ON CONFLICT DO
        NOTHING`` waits for the first transaction and then inserts nothing,
        and its caller gets :class:`AlreadyRegistered` and moves on. The
        rename alone is not enough (NFS), and the key alone is not enough
        (two nodes would both move files around), so both are used.

        Raises :class:`NameTaken` when another batch (another folder) already
        has this name.
        """
        batch_id = str(uuid.uuid4())
        stamp = _ts(now)
        try:
            with self._tx() as conn:
                # The counter row lock serialises registrations, so a batch's
                # files get one contiguous block of seq: FIFO across nodes.
                seq = int(
                    _one(
                        conn,
                        "UPDATE counters SET value = value + %s WHERE name = 'file_seq'"
                        " RETURNING value",
                        (len(batch.files),),
                    )["value"]
                ) - len(batch.files)
                inserted = conn.execute(
                    "INSERT INTO batch_jobs (id, user_id, status, total_files, priority,"
                    " created_at, error, name, source, work_path)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (work_path) DO NOTHING RETURNING id",
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
                ).fetchone()
                if inserted is None:
                    raise AlreadyRegistered(batch.work_path)
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
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO batch_files (id, batch_id, filename, relpath, file_size,"
                        " status, error, created_at, completed_at, seq, priority, priority_rank,"
                        " file_dev, file_ino)"
                        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        rows,
                    )
                return self._refresh_batch(conn, batch_id, now)
        except StoreError as exc:
            cause = exc.__cause__
            if not isinstance(cause, pg_errors.UniqueViolation):
                raise
            # Two nodes inserting at the same instant can trip the name key
            # before the work_path key is consulted: classify after the fact.
            if self.batch_by_work_path(batch.work_path) is not None:
                raise AlreadyRegistered(batch.work_path) from cause
            if cause.diag.constraint_name == "batch_jobs_name_key":
                raise NameTaken(batch.name) from cause
            raise

    def name_taken(self, name: str) -> bool:
        return bool(self._read("SELECT 1 FROM batch_jobs WHERE name = %s", (name,)))

    def batch_by_work_path(self, work_path: str) -> BatchRow | None:
        rows = self._read(
            f"SELECT {_BATCH_COLS} FROM batch_jobs WHERE work_path = %s", (work_path,)
        )
        return _batch(rows[0]) if rows else None

    # -- the queue -----------------------------------------------------------

    def claim_next(self, now: datetime) -> FileTask | None:
        """Atomically move the next due pending file to ``processing``, leased to this node.

        ``SKIP LOCKED``: a file another node is claiming this instant is
        passed over, not waited for, so each file is handed out once and
        nodes never queue behind each other. Order as in SQLite: priority
        rank, then registration order (``seq``).
        """
        stamp = _ts(now)
        with self._tx() as conn:
            row = conn.execute(
                f"WITH next AS ("
                f"  SELECT id FROM batch_files"
                f"  WHERE status = 'pending' AND (available_at IS NULL OR available_at <= %s)"
                f"  ORDER BY priority_rank, seq LIMIT 1 FOR UPDATE SKIP LOCKED)"
                f" UPDATE batch_files f SET status = 'processing', started_at = %s,"
                f" progress = 0, completed_at = NULL, attempts = attempts + 1,"
                f" available_at = NULL, node_id = %s, lease_until = %s,"
                f" lease_gen = f.lease_gen + 1"
                f" FROM next WHERE f.id = next.id RETURNING {_file_cols('f.')}",
                (stamp, stamp, self.node_id, stamp + self.lease),
            ).fetchone()
            if row is None:
                return None
            file = _file(row)
            batch = self._batch_for_claim(conn, file.batch_id, now)
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
        each item, in order, re-derived once per batch after every update.
        Rows are locked files first (in id order), then batches (in id order,
        by :meth:`_refresh_batch`), as every writer here does, so two nodes
        finishing files of the same batches cannot deadlock.

        Fencing: an outcome with a token (``Outcome.lease``) is written only
        while the row is still processing under that token. A node whose
        lease expired during an outage and whose file another node claimed
        since gets None for that item, and nothing of it is written.
        """
        for file_id, outcome, _at in items:
            if not outcome.status.done:
                raise ValueError(f"finish() needs a final status, not {outcome.status}")
            if _uuid(file_id) is None:
                raise StoreError(f"no file {file_id} in {self.where}")
        batch_of: dict[str, str] = {}
        with self._tx() as conn:
            for file_id, outcome, at in sorted(items, key=lambda item: item[0]):
                row = conn.execute(
                    "UPDATE batch_files SET status = %s, result = %s::json, error = %s,"
                    " completed_at = %s,"
                    " progress = CASE WHEN %s = 'completed' THEN 100 ELSE progress END,"
                    " file_hash = COALESCE(%s, file_hash), file_size = COALESCE(%s, file_size),"
                    " processor = COALESCE(%s, processor),"
                    " started_at = COALESCE(%s::timestamptz, started_at), lease_until = NULL"
                    " WHERE id = %s AND (%s::integer IS NULL"
                    "   OR (status = 'processing' AND lease_gen = %s::integer))"
                    " RETURNING batch_id",
                    (
                        outcome.status,
                        json.dumps(outcome.result) if outcome.result is not None else None,
                        outcome.error,
                        _ts(at),
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
                if row is None:
                    if outcome.lease is None:
                        raise StoreError(f"no file {file_id} in {self.where}")
                    continue
                batch_of[file_id] = str(row["batch_id"])
            latest = max((at for _fid, _o, at in items), default=datetime.now(UTC))
            batches = {
                bid: self._refresh_batch(conn, bid, latest)
                for bid in sorted(set(batch_of.values()))
            }
        return [batches[batch_of[fid]] if fid in batch_of else None for fid, _o, _at in items]

    def retry_later(
        self, file_id: str, error: str, available_at: datetime, lease: int | None = None
    ) -> bool:
        """Atomically put a failed attempt back to pending, one retry spent.

        The trigger wakes listening nodes only if the file is already due;
        a later back-off is found through :meth:`next_due`. With ``lease``,
        only while the file still carries that token (False: superseded).
        """
        if _uuid(file_id) is None:
            return lease is None
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE batch_files SET status = 'pending', retry_count = retry_count + 1,"
                " error = %s, available_at = %s, progress = 0, lease_until = NULL"
                " WHERE id = %s AND (%s::integer IS NULL"
                "   OR (status = 'processing' AND lease_gen = %s::integer))",
                (error, _ts(available_at), file_id, lease, lease),
            )
            return cur.rowcount > 0 or lease is None

    def requeue(self, file_ids: Sequence[str], leases: Mapping[str, int] | None = None) -> None:
        ids = [fid for fid in file_ids if _uuid(fid) is not None]
        if not ids:
            return
        leases = leases or {}
        with self._tx() as conn:
            # attempts - 1: an attempt cut short by us (shutdown, crash) is not spent.
            conn.execute(
                "UPDATE batch_files f SET status = 'pending', progress = 0,"
                " attempts = GREATEST(f.attempts - 1, 0), lease_until = NULL"
                " FROM unnest(%s::uuid[], %s::integer[]) AS t (id, gen)"
                " WHERE f.id = t.id AND f.status = 'processing'"
                " AND (t.gen IS NULL OR f.lease_gen = t.gen)",
                (ids, [leases.get(fid) for fid in ids]),
            )

    def requeue_stale(self) -> int:
        """At start-up: this node's ``processing`` files back to pending; returns how many.

        Only this node's: the other nodes' files are running. Files of a node
        that died are :meth:`requeue_expired`'s business once its leases end.
        """
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE batch_files SET status = 'pending', progress = 0,"
                " attempts = GREATEST(attempts - 1, 0), lease_until = NULL"
                " WHERE status = 'processing' AND node_id = %s",
                (self.node_id,),
            )
            return cur.rowcount

    def requeue_expired(self, now: datetime) -> int:
        """Files of any node whose lease ended before ``now`` back to pending.

        Their node stopped heart-beating (died, hung, lost the network), so
        the attempt is not spent, as with :meth:`requeue`. A processing file
        without a lease (set by hand) counts as expired. Returns how many.
        """
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE batch_files SET status = 'pending', progress = 0,"
                " attempts = GREATEST(attempts - 1, 0), lease_until = NULL"
                " WHERE status = 'processing' AND (lease_until IS NULL OR lease_until < %s)",
                (_ts(now),),
            )
            return cur.rowcount

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
        extended, so a file leased to this node that it lost track of (a
        claim whose reply a dropped connection swallowed) expires and is
        requeued. ``None`` extends every file leased to this node. A file in
        ``leases`` is extended only while it still carries that token.
        """
        stamp = _ts(now)
        if self._started is None:
            self._started = stamp
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO nodes (node_id, host, pid, started_at, last_heartbeat, address)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (node_id) DO UPDATE SET"
                " host = EXCLUDED.host, pid = EXCLUDED.pid, started_at = EXCLUDED.started_at,"
                " last_heartbeat = EXCLUDED.last_heartbeat, address = EXCLUDED.address",
                (self.node_id, socket.gethostname(), os.getpid(), self._started, stamp, address),
            )
            if running is None:
                conn.execute(
                    "UPDATE batch_files SET lease_until = %s"
                    " WHERE status = 'processing' AND node_id = %s",
                    (stamp + self.lease, self.node_id),
                )
            elif ids := [fid for fid in running if _uuid(fid) is not None]:
                gens = [(leases or {}).get(fid) for fid in ids]
                conn.execute(
                    "UPDATE batch_files f SET lease_until = %s"
                    " FROM unnest(%s::uuid[], %s::integer[]) AS t (id, gen)"
                    " WHERE f.id = t.id AND f.status = 'processing' AND f.node_id = %s"
                    " AND (t.gen IS NULL OR f.lease_gen = t.gen)",
                    (stamp + self.lease, ids, gens, self.node_id),
                )

    def nodes(self) -> list[NodeRow]:
        """Every node that ever heart-beat, with its running files, by node id."""
        rows = self._read(
            "SELECT n.node_id, n.host, n.pid, n.started_at, n.last_heartbeat, n.address,"
            " COUNT(f.id) AS processing FROM nodes n"
            " LEFT JOIN batch_files f ON f.node_id = n.node_id AND f.status = 'processing'"
            " GROUP BY n.node_id ORDER BY n.node_id"
        )
        return [
            NodeRow(
                node_id=r["node_id"],
                host=r["host"],
                pid=r["pid"],
                started_at=iso(r["started_at"]),
                last_heartbeat=iso(r["last_heartbeat"]),
                address=r["address"],
                processing=int(r["processing"]),
            )
            for r in rows
        ]

    # -- wake-ups ------------------------------------------------------------

    def listen_fileno(self) -> int | None:
        """The socket to ``select()`` on for ``NOTIFY batchd_work``.

        Opens (or re-opens, after the server went away) a dedicated
        connection that LISTENs. ``None`` while the server cannot be
        reached: the scheduler's ``poll_seconds`` sweep covers the gap.
        The descriptor may change from call to call; ask before each select.
        """
        with self._lock:
            listener = self._listener
            if listener is not None and (listener.closed or listener.broken):
                listener.close()
                listener = self._listener = None
            if listener is None:
                try:
                    listener = psycopg.connect(
                        self.url,
                        autocommit=True,
                        connect_timeout=CONNECT_TIMEOUT_SECONDS,
                        application_name=f"batchd {self.node_id} listen"[:63],
                    )
                    listener.execute(f"LISTEN {CHANNEL}")
                except psycopg.Error:
                    return None
                self._listener = listener
            return listener.fileno()

    def drain_notifications(self) -> int:
        """Consume the notifications that arrived, without blocking; how many.

        A listening connection found broken counts as one: notifications
        sent while it was down are lost, so the caller should look for work.
        The next :meth:`listen_fileno` reconnects.
        """
        with self._lock:
            listener = self._listener
            if listener is None:
                return 0
            try:
                count = sum(1 for _ in listener.notifies(timeout=0))
                # notifies() ends quietly on a socket the server closed; libpq's
                # consume_input() raises then, and picks up any late arrivals.
                listener.pgconn.consume_input()
                while listener.pgconn.notifies() is not None:
                    count += 1
                return count
            except psycopg.Error:
                listener.close()
                self._listener = None
                return 1

    # -- progress and retries --------------------------------------------------

    def set_progress(
        self, progress: Mapping[str, int], leases: Mapping[str, int] | None = None
    ) -> None:
        leases = leases or {}
        rows = [
            (max(0, min(100, int(pct))), fid, leases.get(fid), leases.get(fid))
            for fid, pct in progress.items()
            if _uuid(fid)
        ]
        if not rows:
            return
        with self._tx() as conn, conn.cursor() as cur:
            cur.executemany(
                "UPDATE batch_files SET progress = %s WHERE id = %s AND status = 'processing'"
                " AND (%s::integer IS NULL OR lease_gen = %s::integer)",
                rows,
            )

    def retry_failed(self, target_id: str) -> int:
        if _uuid(target_id) is None:
            return 0
        with self._tx() as conn:
            rows = conn.execute(
                "UPDATE batch_files SET status = 'pending', retry_count = 0, progress = 0,"
                " available_at = NULL WHERE status = 'failed' AND (id = %s OR batch_id = %s)"
                " RETURNING batch_id",
                (target_id, target_id),
            ).fetchall()
            now = datetime.now(UTC)
            for batch_id in sorted({str(r["batch_id"]) for r in rows}):
                self._refresh_batch(conn, batch_id, now)
            return len(rows)

    def _refresh_batch(self, conn: Conn, batch_id: str, now: datetime) -> BatchRow:
        """Derive a batch's counters and status from its files (inside a transaction).

        The batch row is locked first, so concurrent refreshes of one batch
        (two nodes finishing two of its files) run one after the other and
        each counts the files as committed before it.
        """
        conn.execute("SELECT 1 FROM batch_jobs WHERE id = %s FOR UPDATE", (batch_id,))
        counts = {
            r["status"]: int(r["n"])
            for r in conn.execute(
                "SELECT status, COUNT(*) AS n FROM batch_files WHERE batch_id = %s GROUP BY status",
                (batch_id,),
            )
        }
        total = sum(counts.values())
        completed = counts.get(Status.COMPLETED, 0)
        failed = counts.get(Status.FAILED, 0)
        status = batch_status(counts)
        row = _one(
            conn,
            f"UPDATE batch_jobs SET status = %(status)s, total_files = %(total)s,"
            f" processed_files = %(completed)s, failed_files = %(failed)s,"
            f" started_at = CASE WHEN %(status)s IN ('processing', 'completed', 'failed')"
            f"   THEN COALESCE(started_at, %(now)s) ELSE started_at END,"
            f" completed_at = CASE WHEN %(status)s IN ('completed', 'failed')"
            f"   THEN COALESCE(completed_at, %(now)s) ELSE NULL END, version = version + 1"
            f" WHERE id = %(id)s RETURNING {_BATCH_COLS}",
            {
                "status": str(status),
                "total": total,
                "completed": completed,
                "failed": failed,
                "now": _ts(now),
                "id": batch_id,
            },
        )
        return _batch(row)

    def _batch_for_claim(self, conn: Conn, batch_id: str, now: datetime) -> BatchRow:
        """The batch of a file just claimed, re-derived only when the claim changes it.

        A batch already ``processing`` keeps its status and counters when one
        more file starts, so the hot path neither counts nor locks the batch
        row: nodes claiming files of one batch do not queue on it.
        """
        row = _one(conn, f"SELECT {_BATCH_COLS} FROM batch_jobs WHERE id = %s", (batch_id,))
        if row["status"] == Status.PROCESSING:
            return _batch(row)
        return self._refresh_batch(conn, batch_id, now)

    def refresh_batch(self, batch_id: str, now: datetime) -> BatchRow:
        """Re-derive one batch's counters (after an operator's manual edit)."""
        if _uuid(batch_id) is None:
            raise StoreError(f"no batch {batch_id} in {self.where}")
        with self._tx() as conn:
            return self._refresh_batch(conn, batch_id, now)

    # -- queries -------------------------------------------------------------

    def get_batch(self, batch_id: str) -> BatchRow | None:
        if _uuid(batch_id) is None:
            return None
        rows = self._read(f"SELECT {_BATCH_COLS} FROM batch_jobs WHERE id = %s", (batch_id,))
        return _batch(rows[0]) if rows else None

    def find_batch(self, id_or_name: str) -> BatchRow | None:
        rows = self._read(
            f"SELECT {_BATCH_COLS} FROM batch_jobs WHERE id = %s OR name = %s"
            f" ORDER BY id = %s DESC LIMIT 1",
            (_uuid(id_or_name), id_or_name, _uuid(id_or_name)),
        )
        return _batch(rows[0]) if rows else None

    def snapshot(self, batch_id: str) -> BatchSnapshot | None:
        """The batch, its files, their counts and progress, from one REPEATABLE READ snapshot.

        Read apart, the batch row could predate a commit its file rows show
        (issue 16: a status.json saying 'processing' with every file done).
        """
        if _uuid(batch_id) is None:
            return None
        with self._tx("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY") as conn:
            row = conn.execute(
                f"SELECT {_BATCH_COLS} FROM batch_jobs WHERE id = %s", (batch_id,)
            ).fetchone()
            if row is None:
                return None
            files = tuple(
                _file(r)
                for r in conn.execute(
                    f"SELECT {_FILE_COLS} FROM batch_files WHERE batch_id = %s ORDER BY seq",
                    (batch_id,),
                )
            )
        return BatchSnapshot.of(_batch(row), files)

    def batch_ids_with_prefix(self, prefix: str, limit: int = 2) -> list[str]:
        # Ids are uuids: only hex digits and dashes can start one.
        if any(c not in "0123456789abcdef-" for c in prefix.lower()):
            return []
        rows = self._read(
            "SELECT id::text AS id FROM batch_jobs WHERE id::text LIKE %s ORDER BY id LIMIT %s",
            (prefix.lower() + "%", limit),
        )
        return [str(r["id"]) for r in rows]

    def get_file(self, file_id: str) -> FileRow | None:
        if _uuid(file_id) is None:
            return None
        rows = self._read(f"SELECT {_FILE_COLS} FROM batch_files WHERE id = %s", (file_id,))
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
            where.append("status = %s")
            params.append(str(status))
        if user_id is not None:
            where.append("user_id = %s")
            params.append(user_id)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._read(
            f"SELECT {_BATCH_COLS} FROM batch_jobs {clause}"
            f" ORDER BY created_at DESC, ord DESC LIMIT %s OFFSET %s",
            (*params, limit, offset),
        )
        return [_batch(r) for r in rows]

    def list_files(self, batch_id: str, limit: int | None = None, offset: int = 0) -> list[FileRow]:
        if _uuid(batch_id) is None:
            return []
        rows = self._read(
            f"SELECT {_FILE_COLS} FROM batch_files WHERE batch_id = %s"
            f" ORDER BY seq LIMIT %s OFFSET %s",
            (batch_id, limit, offset),
        )
        return [_file(r) for r in rows]

    def file_summary(self, batch_id: str) -> dict[str, int]:
        summary = {"total": 0, **{str(s): 0 for s in Status}}
        if _uuid(batch_id) is None:
            return summary
        for r in self._read(
            "SELECT status, COUNT(*) AS n FROM batch_files WHERE batch_id = %s GROUP BY status",
            (batch_id,),
        ):
            summary[r["status"]] = int(r["n"])
            summary["total"] += int(r["n"])
        return summary

    def progress_sum(self, batch_id: str) -> int:
        if _uuid(batch_id) is None:
            return 0
        rows = self._read(
            "SELECT COALESCE(SUM(CASE WHEN status IN ('completed', 'failed') THEN 100"
            " ELSE progress END), 0) AS n FROM batch_files WHERE batch_id = %s",
            (batch_id,),
        )
        return int(rows[0]["n"])

    def unfinished_batches(self) -> list[BatchRow]:
        rows = self._read(
            f"SELECT {_BATCH_COLS} FROM batch_jobs WHERE status IN ('pending', 'processing')"
            " ORDER BY created_at, ord"
        )
        return [_batch(r) for r in rows]

    def batches_with_files_in(self, statuses: Sequence[Status]) -> list[str]:
        rows = self._read(
            "SELECT DISTINCT batch_id FROM batch_files WHERE status = ANY(%s)",
            ([str(s) for s in statuses],),
        )
        return [str(r["batch_id"]) for r in rows]

    def next_due(self) -> datetime | None:
        rows = self._read(
            "SELECT MIN(available_at) AS due FROM batch_files"
            " WHERE status = 'pending' AND available_at IS NOT NULL"
        )
        value: datetime | None = rows[0]["due"]
        return None if value is None else value.astimezone(UTC)

    def queue_counts(self) -> dict[str, int]:
        counts = {str(s): 0 for s in Status}
        for r in self._read("SELECT status, COUNT(*) AS n FROM batch_files GROUP BY status"):
            counts[r["status"]] = int(r["n"])
        return counts

    def counts_by_status_priority(self) -> dict[str, dict[tuple[str, str], int]]:
        """Files and batches by (status, priority), for the metrics scrape.

        Both counts come from one REPEATABLE READ snapshot, so they agree.
        """
        out: dict[str, dict[tuple[str, str], int]] = {"files": {}, "batches": {}}
        with self._tx("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY") as conn:
            for key, table in (("files", "batch_files"), ("batches", "batch_jobs")):
                for r in conn.execute(
                    f"SELECT status, priority, COUNT(*) AS n FROM {table} GROUP BY status, priority"
                ):
                    out[key][(r["status"], r["priority"])] = int(r["n"])
        return out

    # -- uploads (rate limiting) ----------------------------------------------

    def uploads_since(self, user_id: str, since: datetime) -> list[str]:
        """Times of ``user_id``'s uploads at or after ``since``, oldest first."""
        rows = self._read(
            "SELECT created_at FROM uploads WHERE user_id = %s AND created_at >= %s"
            " ORDER BY created_at",
            (user_id, _ts(since)),
        )
        return [iso(r["created_at"]) for r in rows]

    def record_upload(self, user_id: str, now: datetime, limit: int, window: timedelta) -> bool:
        """Atomically count an upload for ``user_id`` unless ``limit`` are already in
        the window; True when it was counted (the upload may go ahead).

        A per-user advisory lock serialises the count and the insert, so two
        nodes taking uploads from one user at once cannot both squeeze in.
        """
        stamp = _ts(now)
        with self._tx() as conn:
            conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('batchd.upload:' || %s, 0))",
                (user_id,),
            )
            n = _one(
                conn,
                "SELECT COUNT(*) AS n FROM uploads WHERE user_id = %s AND created_at >= %s",
                (user_id, stamp - window),
            )["n"]
            if n >= limit:
                return False
            conn.execute(
                "INSERT INTO uploads (user_id, created_at) VALUES (%s, %s)", (user_id, stamp)
            )
            conn.execute("DELETE FROM uploads WHERE created_at < %s", (stamp - 2 * window,))
            return True

    # -- retention -----------------------------------------------------------

    def finished_before(self, cutoff: datetime) -> list[BatchRow]:
        """Completed or failed batches that ended before ``cutoff``."""
        rows = self._read(
            f"SELECT {_BATCH_COLS} FROM batch_jobs WHERE status IN ('completed', 'failed')"
            " AND completed_at < %s ORDER BY completed_at, ord",
            (_ts(cutoff),),
        )
        return [_batch(r) for r in rows]

    def delete_batch(self, batch_id: str) -> None:
        """Delete a finished batch and its files (refuses unfinished ones)."""
        if _uuid(batch_id) is None:
            return
        with self._tx() as conn:
            busy = _one(
                conn,
                "SELECT COUNT(*) AS n FROM batch_files WHERE batch_id = %s"
                " AND status IN ('pending', 'processing')",
                (batch_id,),
            )["n"]
            if busy:
                raise StoreError(f"batch {batch_id} still has {busy} unfinished files")
            conn.execute("DELETE FROM batch_files WHERE batch_id = %s", (batch_id,))
            conn.execute("DELETE FROM batch_jobs WHERE id = %s", (batch_id,))


# -- conversions at the boundary ------------------------------------------------


def _ts(dt: datetime) -> datetime:
    """``dt`` in UTC, cut to milliseconds, as SQLite's fixed-width text keeps it."""
    dt = dt.astimezone(UTC)
    return dt.replace(microsecond=dt.microsecond // 1000 * 1000)


def _opt_iso(value: datetime | None) -> str | None:
    return None if value is None else iso(value)


def _uuid(text: str) -> str | None:
    """``text`` when it is a UUID; None otherwise (it cannot match a uuid column)."""
    try:
        uuid.UUID(text)
    except (ValueError, TypeError, AttributeError):
        return None
    return text


def _one(conn: Conn, sql: str, params: Sequence[Any] | Mapping[str, Any]) -> DictRow:
    row = conn.execute(sql, params).fetchone()
    if row is None:  # pragma: no cover - every caller's statement returns a row
        raise StoreError(f"no row from {sql.split()[0]}")
    return row


def _why(exc: psycopg.Error) -> str:
    """The first line of a driver error: what went wrong, without the query dump."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe_url(url: str) -> str:
    """Where the database is, for messages: never the password."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.Error:
        return "the PostgreSQL database"
    host = parts.get("host") or "localhost"
    port = parts.get("port") or "5432"
    return f"PostgreSQL database {parts.get('dbname') or '?'} on {host}:{port}"


def _batch(row: DictRow) -> BatchRow:
    return BatchRow(
        id=str(row["id"]),
        user_id=row["user_id"],
        status=Status(row["status"]),
        total_files=row["total_files"],
        processed_files=row["processed_files"],
        failed_files=row["failed_files"],
        priority=Priority(row["priority"]),
        created_at=iso(row["created_at"]),
        started_at=_opt_iso(row["started_at"]),
        completed_at=_opt_iso(row["completed_at"]),
        error=row["error"],
        name=row["name"],
        source=row["source"],
        work_path=row["work_path"],
        version=int(row["version"]),
    )


def _file(row: DictRow) -> FileRow:
    return FileRow(
        id=str(row["id"]),
        batch_id=str(row["batch_id"]),
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
        created_at=iso(row["created_at"]),
        started_at=_opt_iso(row["started_at"]),
        completed_at=_opt_iso(row["completed_at"]),
        processor=row["processor"],
        lease_gen=row["lease_gen"],
        file_dev=row["file_dev"],
        file_ino=row["file_ino"],
    )
