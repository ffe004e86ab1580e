"""The cluster store's connector: one PostgreSQL database shared by several batchd nodes.

Same contract, tables and columns as SQLite (SPEC §5), with PostgreSQL types
(``uuid`` ids, ``timestamptz`` times, ``json`` results), converted at the
boundary so callers get the very same records. Times are truncated to
milliseconds on the way in, so comparisons behave exactly as SQLite's
fixed-width text does.

What PostgreSQL adds for a cluster of nodes on one shared spool:

* **Leases.** The claim takes the next due file with ``FOR UPDATE SKIP
  LOCKED`` (nodes never wait on each other's claims) and stamps it with this
  node's ``node_id`` and ``lease_until``; the heartbeat extends the leases of
  the node's running files, and ``requeue_expired`` (run by every node) gives
  the files of a node that stopped heart-beating back to the queue, without
  spending an attempt. Lease times come from the caller's clock, so nodes
  need synchronised clocks (NTP); a skew of a second or two is harmless
  against ``cluster.lease_seconds`` (30).
* **Wake-ups.** A trigger on ``batch_files`` sends ``NOTIFY batchd_work``
  whenever a file becomes due (registration, requeue, retry, and an
  operator's ``UPDATE ... SET status='pending'`` in ``psql`` too);
  :meth:`PostgresConnector.listen_fileno` hands the scheduler a socket to add
  to its ``select()``, so idle nodes wake at once instead of polling.
* **Nodes.** A ``nodes`` table holds every node's last heartbeat.

Isolation: READ COMMITTED, with explicit row locks where it matters. Every
write that refreshes a batch locks the batch row (``FOR UPDATE``) before
counting its files. Locks are always taken files first, then batches in id
order, so writers cannot deadlock each other.

Connections: one per thread (psycopg connections may be shared, but a
transaction may not), plus one dedicated ``LISTEN`` connection. No pool: the
daemon has a fixed handful of threads, and HTTP threads hand theirs back with
``release_thread``.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row

from batchd.errors import AlreadyRegistered, NameTaken, StoreError
from batchd.records import BatchRow, NewBatch
from batchd.store.connector import Params, Row, ThreadConnections, Tx, load_migrations
from batchd.store.sql import SqlStore

Conn = psycopg.Connection[DictRow]

#: The channel the trigger notifies when a file becomes due.
CHANNEL = "batchd_work"
#: pg_advisory_xact_lock key held while migrating (several nodes may start at once).
MIGRATION_LOCK = 0x62617463_68640001  # "batchd" + 1
CONNECT_TIMEOUT_SECONDS = 10

# Forward-only: MIGRATIONS[i] takes the schema from version i to i+1
# (each runs whole, in the migrating transaction, under MIGRATION_LOCK).
MIGRATIONS = load_migrations("postgres")
SCHEMA_VERSION = len(MIGRATIONS)

__all__ = ["SCHEMA_VERSION", "AlreadyRegistered", "NameTaken", "PostgresStore", "describe_url"]


class PostgresStore(SqlStore):
    """The cluster store: one PostgreSQL database shared by every node."""

    def __init__(
        self, url: str, node_id: str, lease_seconds: float = 30.0, migrate: bool = True
    ) -> None:
        self.url = url
        super().__init__(PostgresConnector(url, node_id, migrate), node_id, lease_seconds)

    def register_batch(self, batch: NewBatch, now: datetime) -> BatchRow:
        """Insert a batch and all its files in one transaction and return it.

        Exactly-once claiming across nodes takes both halves. The atomic
        ``rename(2)`` of ``inbox/<p>/<name>`` to ``work/<p>/<name>`` on the
        shared filesystem decides which node owns a drop. But a claimed
        folder can still be seen by a second node before it is registered
        (the start-up scan of ``work/``, or an NFS client retrying a rename
        whose reply was lost), and that node would register it again. The
        unique key on ``work_path`` closes that gap: the second ``INSERT ...
        ON CONFLICT DO NOTHING`` waits for the first transaction and then
        inserts nothing, and its caller gets :class:`AlreadyRegistered`.
        """
        try:
            return super().register_batch(batch, now)
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


class PostgresConnector:
    """Per-thread connections with reconnect, advisory-lock migrations, LISTEN/NOTIFY."""

    dialect = "postgres"
    mark = "%s"

    def __init__(self, url: str, node_id: str, migrate: bool = True) -> None:
        """``migrate=False`` (the HTTP process, whose daemon migrated before it
        started) connects on first use only, so a database that is down then
        fails each call with StoreError instead of the construction."""
        self.url = url
        self.node_id = node_id
        self.where = describe_url(url)
        self.threads: ThreadConnections[Conn] = ThreadConnections()
        self.connections = self.threads.all
        self._lock = threading.Lock()  # guards the LISTEN connection
        self._listener: psycopg.Connection[Any] | None = None
        if migrate:
            self._migrate()

    # -- connections ---------------------------------------------------------

    def _connect(self) -> Conn:
        try:
            # autocommit: every write is an explicit BEGIN ... COMMIT block;
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
        conn = self.threads.mine()
        if conn is not None and (conn.closed or conn.broken):
            # The server restarted or the network dropped: start afresh.
            self.threads.forget(conn)
            conn = None
        return conn if conn is not None else self.threads.adopt(self._connect())

    def close(self) -> None:
        self.threads.close_all()
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None

    def release_thread(self) -> None:
        """Close the calling thread's connection, if it opened one."""
        conn = self.threads.mine()
        if conn is not None:
            self.threads.forget(conn)

    # -- transactions ----------------------------------------------------------

    def transaction(self) -> AbstractContextManager[Tx]:
        return self._tx("BEGIN")

    def snapshot(self) -> AbstractContextManager[Tx]:
        """A REPEATABLE READ snapshot: every query sees the same commits."""
        return self._tx("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    @contextmanager
    def _tx(self, begin: str) -> Iterator[Tx]:
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
            self.threads.forget(conn)
            conn = self._conn()
            try:
                conn.execute(begin)
            except psycopg.Error as exc2:
                raise StoreError(f"{self.where} is unavailable: {_why(exc2)}") from exc2
        try:
            yield Tx(conn)
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
            self.threads.forget(conn)

    def read(self, sql: str, params: Params = ()) -> list[Row]:
        """One query outside a transaction; retried once on a fresh connection
        when the server had dropped the old one (a read is safe to repeat)."""
        conn = self._conn()
        try:
            return conn.execute(sql, params).fetchall()
        except psycopg.Error as exc:
            if not conn.broken:
                raise StoreError(f"query on {self.where} failed: {_why(exc)}") from exc
            self.threads.forget(conn)
        try:
            return self._conn().execute(sql, params).fetchall()
        except psycopg.Error as exc:
            raise StoreError(f"query on {self.where} failed: {_why(exc)}") from exc

    # -- schema ----------------------------------------------------------------

    def _migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION, one node at a time.

        The advisory lock makes nodes that start together queue: the first
        migrates, the others then find the schema current.
        """
        with self.transaction() as tx:
            tx.run("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            tx.run("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
            row = tx.one("SELECT version FROM schema_version")
            if row is None:
                tx.run("INSERT INTO schema_version (version) VALUES (0)")
            version = 0 if row is None else int(row["version"])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.where} has schema version {version}, newer than this "
                    f"batchd ({SCHEMA_VERSION}); upgrade batchd"
                )
            for target in range(version, SCHEMA_VERSION):
                tx.run(MIGRATIONS[target])
                tx.run("UPDATE schema_version SET version = %s", (target + 1,))

    def schema_version(self) -> int:
        return int(self.read("SELECT version FROM schema_version")[0]["version"])

    def change_version(self) -> int:
        """A number that changes after every commit by any connection of any node.

        The server's current snapshot (``xmin:xmax:running xids``) changes
        whenever a writing transaction commits anywhere in the cluster, and
        is read before an answer is built, so a cached answer is never served
        after a commit it does not show. Other databases on the same server
        cause spurious changes: a cache miss, never a stale answer.
        """
        text = str(self.read("SELECT pg_current_snapshot()::text AS s")[0]["s"])
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")

    # -- values ----------------------------------------------------------------

    def ts(self, dt: datetime) -> datetime:
        """``dt`` in UTC, cut to milliseconds, as SQLite's fixed-width text keeps it."""
        dt = dt.astimezone(UTC)
        return dt.replace(microsecond=dt.microsecond // 1000 * 1000)

    def key(self, text: str) -> str | None:
        """``text`` when it is a UUID; None otherwise (it cannot match a uuid column)."""
        try:
            uuid.UUID(text)
        except (ValueError, TypeError, AttributeError):
            return None
        return text

    def id_prefix(self, prefix: str) -> str | None:
        """Ids are uuids: only hex digits and dashes can start one."""
        prefix = prefix.lower()
        return None if any(c not in "0123456789abcdef-" for c in prefix) else prefix

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
