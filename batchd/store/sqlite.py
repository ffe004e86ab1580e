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
  process, the CLI) first queue on a lock of their own, tried again within
  a fraction of a millisecond (:class:`_WritersLock`); SQLite's busy
  handler, which sleeps whole milliseconds, is left to writers that are not
  batchd (an operator's ``sqlite3``).
* one connection per thread (``sqlite3`` connections are not thread-safe).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sqlite3
import threading
import time
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
        self._writers = _WritersLock(path.with_name(path.name + LOCK_SUFFIX), path)
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
        this database (:class:`_WritersLock`), both within busy_timeout.
        Without them they would meet on
        SQLite's file lock, whose busy handler waits by sleeping (1, 2, 5,
        10 … ms): under load a registration and a commit kept missing each
        other by whole milliseconds, and two workers recording their files
        slept in it about once every four files. Writers that are not batchd
        (an operator's sqlite3) still wait on ``busy_timeout``.
        """
        conn = self._conn()
        with self._write_lock:
            timeout = BUSY_TIMEOUT_MS / 1000
            left = self._writers.acquire(timeout)
            try:
                # The wait for the writers' lock counts against busy_timeout:
                # behind an operator's sqlite3 write, each batchd writer waits
                # busy_timeout in all, not once more for every writer before it.
                shortened = left < timeout - 0.001
                if shortened:
                    conn.execute(f"PRAGMA busy_timeout = {max(1, int(left * 1000))}")
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as exc:
                    raise StoreError(f"database {self.path} is unavailable: {exc}") from exc
                finally:
                    if shortened:
                        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
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
            finally:
                self._writers.release()

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
#: a taken writers' lock is tried again after this pause, doubled each time
#: up to LOCK_POLL_MAX_SECONDS: a commit holds it for a fraction of a
#: millisecond, where SQLite's busy handler sleeps 1, 2, 5, 10 ... ms.
LOCK_POLL_FIRST_SECONDS = 0.00002
LOCK_POLL_MAX_SECONDS = 0.0005


class _WritersLock:
    """The lock batchd's processes on one SQLite database take around each
    write transaction: ``flock`` on a file beside it.

    Tried without blocking, then again after pauses of 20 us doubling up to
    0.5 ms, so that a waiter comes in within a fraction of a millisecond of
    a release. The wait counts against ``busy_timeout``, like SQLite's own:
    a writer that cannot have it in time gets :class:`StoreError`, never an
    endless wait (a batchd process stopped with SIGSTOP or frozen inside a
    transaction keeps it; one that dies, a worker killed at its timeout,
    releases it with its descriptors). A separate file, not the database:
    SQLite's own locks on the database are ``fcntl`` locks, which NFS would
    merge with ``flock``.

    Only who may write the database may take it: the file gets the
    database's owner and, for each class of user, read and write where the
    database is writable (a reader of a world-readable database cannot stop
    batchd's writes). It is opened for writing where it can be (NFS's
    ``flock`` needs that), for reading otherwise. Where it cannot be opened
    or locked at all (a read-only folder, a filesystem without locks), the
    writers fall back to ``busy_timeout`` alone: slower under contention,
    never refused. Each process opens its own descriptor: a ``flock``
    belongs to the open file, which a forked child would share with its
    parent.
    """

    def __init__(self, path: Path, database: Path) -> None:
        self.path = path
        self.database = database
        self._fd = -1
        self._pid = 0
        self._held = False

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
        flags = os.O_NOFOLLOW | os.O_CLOEXEC
        for access in (os.O_RDWR, os.O_RDONLY):
            try:
                return os.open(self.path, access | flags)
            except FileNotFoundError:
                break
            except PermissionError:
                continue
        else:
            raise PermissionError(f"cannot open {self.path}")
        db = os.stat(self.database)
        classes = db.st_mode & 0o666
        # rw for each class that may write the database, nothing for the others
        mode = sum(0o6 << shift for shift in (6, 3, 0) if classes & (0o2 << shift))
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | flags, mode)
        except FileExistsError:  # another process created it meanwhile
            return self._open()
        with contextlib.suppress(OSError):
            os.fchmod(fd, mode)  # whatever the creator's umask
            if os.geteuid() == 0 and (db.st_uid, db.st_gid) != (0, 0):
                # root's CLI first: the file is the database owner's, as the database
                os.fchown(fd, db.st_uid, db.st_gid)
        return fd

    def acquire(self, timeout: float) -> float:
        """Take the lock within ``timeout`` seconds; the seconds left of it.
        :class:`StoreError` when another batchd process held it all along."""
        fd = self._descriptor()
        if fd < 0:
            return timeout
        deadline = time.monotonic() + timeout
        pause = LOCK_POLL_FIRST_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            except OSError:
                # no locks here (ENOLCK, NFS without them ...): busy_timeout alone
                os.close(fd)
                self._fd = -1  # not tried again by this process
                return deadline - time.monotonic()
            else:
                self._held = True
                return deadline - time.monotonic()
            left = deadline - time.monotonic()
            if left <= 0:
                raise StoreError(
                    f"database {self.database} is locked: another batchd process held "
                    f"{self.path.name} for {timeout:g} s (one stopped inside a write?)"
                )
            time.sleep(min(pause, left))
            pause = min(pause * 2, LOCK_POLL_MAX_SECONDS)

    def release(self) -> None:
        if self._held:
            self._held = False
            if self._fd >= 0 and self._pid == os.getpid():
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self._held = False
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
