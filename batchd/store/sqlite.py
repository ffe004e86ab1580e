"""The embedded store's connector: one SQLite file in WAL mode.

SQLite is used deliberately:

* WAL journal, so the HTTP server, the CLI and an operator's ``sqlite3`` read
  while the daemon writes.
* ``synchronous=NORMAL``: in WAL mode a commit survives a crash of the
  process; a power cut may lose the last few commits but never corrupts the
  file. batchd is at-least-once by design, so a lost commit means a file is
  processed again, never lost.
* ``BEGIN IMMEDIATE`` for every write, so two writers queue on
  ``busy_timeout`` instead of failing half-way with SQLITE_BUSY.
* batchd's own writers (the daemon's threads, every worker, the HTTP
  process, the CLI) first queue on a lock the kernel hands over at once
  (:class:`_WritersLock`); SQLite's busy handler is left to writers that are
  not batchd (an operator's ``sqlite3``).
* one connection per thread (``sqlite3`` connections are not thread-safe).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from batchd.clock import iso
from batchd.errors import StoreError
from batchd.store.connector import Params, Row, ThreadConnections, Tx, load_migrations
from batchd.store.sql import SqlStore

BUSY_TIMEOUT_MS = 10_000
CONNECT_TIMEOUT_SECONDS = 10

# Forward-only: MIGRATIONS[i] takes the schema from version i to i+1 (PRAGMA user_version).
MIGRATIONS = load_migrations("sqlite")
SCHEMA_VERSION = len(MIGRATIONS)


class SQLiteStore(SqlStore):
    """The embedded store: one SQLite file in WAL mode, one node."""

    def __init__(self, path: Path, node_id: str = "", lease_seconds: float = 30.0) -> None:
        self.path = path
        # SQLite is one node; the id names it in ``nodes`` (``batchd nodes``, /healthz).
        super().__init__(SQLiteConnector(path), node_id or socket.gethostname(), lease_seconds)


class SQLiteConnector:
    """Per-thread connections, pragmas, BEGIN IMMEDIATE, the fair write lock, migrations."""

    dialect = "sqlite"
    mark = "?"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = f"database {path}"
        self.threads: ThreadConnections[sqlite3.Connection] = ThreadConnections()
        self.connections = self.threads.all
        self._write_lock = _FairLock()
        self._writers = _WritersLock(path.with_name(path.name + LOCK_SUFFIX))
        self._version_conn: sqlite3.Connection | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create {path.parent}: {exc.strerror}") from exc
        self._migrate()

    # -- connections ---------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
        return sqlite3.connect(
            self.path,
            isolation_level=None,
            check_same_thread=False,
            timeout=CONNECT_TIMEOUT_SECONDS,
        )

    def _conn(self) -> sqlite3.Connection:
        conn = self.threads.mine()
        if conn is None:
            try:
                conn = self._open()
                conn.row_factory = _dict_row
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute("PRAGMA foreign_keys = ON")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open database {self.path}: {exc}") from exc
            self.threads.adopt(conn)
        return conn

    def close(self) -> None:
        self.threads.close_all()
        self._writers.close()

    def release_thread(self) -> None:
        """Close the calling thread's connection, if it opened one.

        A thread about to end calls this (the HTTP server runs a thread per
        client connection), so connections do not pile up until :meth:`close`.
        """
        conn = self.threads.mine()
        if conn is not None:
            self.threads.forget(conn)

    def change_version(self) -> int:
        """A number that changes after every commit by any connection of any process.

        For read caches (the HTTP server's). ``PRAGMA data_version`` ignores
        the asking connection's own commits, so it is read on a connection of
        its own that never writes, shared by all threads under the lock.
        """
        with self.threads.lock:
            conn = self._version_conn
            try:
                if conn is None or conn not in self.connections:  # first use, or after close()
                    conn = self._version_conn = self._open()
                    self.threads.all.append(conn)
                return int(conn.execute("PRAGMA data_version").fetchone()[0])
            except sqlite3.Error as exc:
                raise StoreError(f"query on {self.path} failed: {exc}") from exc

    # -- transactions ----------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """A write transaction: BEGIN IMMEDIATE, COMMIT, ROLLBACK on any error.

        This process's writers (scheduler, watcher, HTTP threads) first queue
        on an in-process lock, then on the lock of every batchd process on
        this database (:class:`_WritersLock`). Without them they would meet on
        SQLite's file lock, whose busy handler waits by sleeping (1, 2, 5,
        10 … ms): under load a registration and a commit kept missing each
        other by whole milliseconds, and two workers recording their files
        slept in it about once every four files. Writers that are not batchd
        (an operator's sqlite3) still wait on ``busy_timeout``.
        """
        conn = self._conn()
        with self._write_lock, self._writers:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"database {self.path} is unavailable: {exc}") from exc
            try:
                yield Tx(conn)
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

    @contextmanager
    def snapshot(self) -> Iterator[Tx]:
        """A read transaction: deferred BEGIN, so the first SELECT fixes the WAL snapshot."""
        conn = self._conn()
        try:
            conn.execute("BEGIN")
            try:
                yield Tx(conn)
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"query on {self.path} failed: {exc}") from exc

    def read(self, sql: str, params: Params = ()) -> list[Row]:
        try:
            rows: list[Row] = self._conn().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"query on {self.path} failed: {exc}") from exc
        return rows

    # -- schema ----------------------------------------------------------------

    def _migrate(self) -> None:
        with self.transaction() as tx:
            version = int(_one_value(tx, "PRAGMA user_version"))
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"database {self.path} has schema version {version}, newer than this "
                    f"batchd ({SCHEMA_VERSION}); upgrade batchd"
                )
            for target in range(version, SCHEMA_VERSION):
                # executescript would COMMIT our transaction; run statements one by one.
                for statement in _statements(MIGRATIONS[target]):
                    tx.run(statement)
                tx.run(f"PRAGMA user_version = {target + 1}")

    def schema_version(self) -> int:
        return int(next(iter(self.read("PRAGMA user_version")[0].values())))

    # -- values ----------------------------------------------------------------

    def ts(self, dt: datetime) -> str:
        """Fixed-width ISO text: SQLite compares and sorts times as text."""
        return iso(dt)

    def key(self, text: str) -> str | None:
        return text

    def id_prefix(self, prefix: str) -> str | None:
        return prefix

    # -- wake-ups: none (the scheduler's own wake-ups cover one node) -----------

    def listen_fileno(self) -> int | None:
        return None

    def drain_notifications(self) -> int:
        return 0


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


#: the writers' lock file, beside the database (``batchd.db-lock``).
LOCK_SUFFIX = "-lock"
#: empty, so nothing to hide; readable, so any batchd process can open it.
LOCK_FILE_MODE = 0o644


class _WritersLock:
    """The lock batchd's processes on one SQLite database take around each
    write transaction: ``flock`` on a file beside it.

    The kernel hands a released ``flock`` to a waiter at once, where SQLite's
    busy handler polls by sleeping. A holder is always inside one bounded
    transaction (itself bounded by ``busy_timeout`` against other writers),
    and a holder that dies (a worker killed at its timeout) releases it with
    its descriptors. A separate file, not the database: SQLite's own locks on
    the database are ``fcntl`` locks, which NFS would merge with ``flock``.

    The file is opened read-only (``flock`` needs no more) and created
    empty and readable by all, in the database's folder (``state/``, 0700):
    whoever creates it first, root's CLI included, every batchd process can
    still open it. Where it cannot be opened at all (a read-only folder), the
    writers fall back to ``busy_timeout`` alone: slower, never wrong. Each
    process opens its own descriptor: a ``flock`` belongs to the open file,
    which a forked child would share with its parent.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        self._pid = 0

    def _descriptor(self) -> int:
        if self._pid != os.getpid():
            self._fd = -1  # inherited across a fork: the parent's, not ours
            self._pid = os.getpid()
            try:
                self._fd = self._open()
            except OSError:
                self._fd = -1
        return self._fd

    def _open(self) -> int:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(self.path, flags)
        except FileNotFoundError:
            pass
        try:
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, LOCK_FILE_MODE)
        except FileExistsError:  # another process created it meanwhile
            return os.open(self.path, flags)
        # Whatever the creator's umask (root's CLI with 077 included): every
        # batchd process must be able to open it.
        with contextlib.suppress(OSError):
            os.fchmod(fd, LOCK_FILE_MODE)
        return fd

    def __enter__(self) -> None:
        fd = self._descriptor()
        if fd < 0:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            # ENOLCK (no locks on this filesystem) and the like: busy_timeout alone.
            if exc.errno not in (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            os.close(fd)
            self._fd = -1  # not tried again by this process

    def __exit__(self, *exc: object) -> None:
        if self._fd >= 0 and self._pid == os.getpid():
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd >= 0 and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = -1
        self._pid = 0  # opened again if the connector is used again


def _dict_row(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> Row:
    """Rows as dicts, as psycopg's ``dict_row`` hands them out."""
    return {col[0]: value for col, value in zip(cursor.description, row, strict=True)}


def _one_value(tx: Tx, sql: str) -> Any:
    row = tx.one(sql)
    return None if row is None else next(iter(row.values()))


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
