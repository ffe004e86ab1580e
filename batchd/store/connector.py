"""The connector's side of the store: what :class:`batchd.store.sql.SqlStore` runs on.

A connector (:mod:`batchd.store.sqlite`, :mod:`batchd.store.postgres`) owns the
connections, transactions, migrations, wake-ups and the translation of driver
errors into :class:`batchd.errors.StoreError`. This module holds the contract
(:class:`Connector`) and the pieces both connectors share.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from importlib import resources
from typing import Any, Generic, Protocol, TypeVar

from batchd.errors import StoreError

#: A result row: column name -> value (both connectors hand out dicts).
Row = dict[str, Any]
Params = Sequence[Any] | Mapping[str, Any]


def load_migrations(dialect: str) -> tuple[str, ...]:
    """The forward-only migrations of ``dialect``: item i takes the schema from version
    i to i+1; one file each in ``migrations/<dialect>/NNNN_*.sql``, in name order."""
    folder = resources.files("batchd.store").joinpath("migrations", dialect)
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return tuple(f.read_text(encoding="utf-8") for f in files)


class _Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=_Closable)


class ThreadConnections(Generic[C]):
    """One connection per thread (a transaction must not be shared), and every one
    open, so :meth:`close_all` can close them."""

    def __init__(self) -> None:
        self.all: list[C] = []
        self.lock = threading.Lock()
        self._local = threading.local()

    def mine(self) -> C | None:
        """The calling thread's connection, if it opened one."""
        conn: C | None = getattr(self._local, "conn", None)
        return conn

    def adopt(self, conn: C) -> C:
        """Make ``conn`` the calling thread's connection."""
        self._local.conn = conn
        with self.lock:
            self.all.append(conn)
        return conn

    def forget(self, conn: C) -> None:
        """Close ``conn`` and drop it (a thread about to end, a broken connection)."""
        if self.mine() is conn:
            self._local.conn = None
        with self.lock:
            if conn in self.all:
                self.all.remove(conn)
        conn.close()

    def close_all(self) -> None:
        with self.lock:
            for conn in self.all:
                conn.close()
            self.all.clear()
        self._local = threading.local()


class Tx:
    """Statements inside one transaction, on a DB-API connection (sqlite3 or psycopg).

    Driver errors propagate: the connector's transaction turns them into
    :class:`StoreError` after rolling back.
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def _execute(self, sql: str, params: Params | None) -> Any:
        # No parameters: psycopg then sends the text as is (a migration script
        # of several statements runs only that way).
        return self.conn.execute(sql) if params is None else self.conn.execute(sql, params)

    def one(self, sql: str, params: Params | None = None) -> Row | None:
        row: Row | None = self._execute(sql, params).fetchone()
        return row

    def row(self, sql: str, params: Params | None = None) -> Row:
        """The one row of a statement that always returns one (a count, a RETURNING)."""
        row = self.one(sql, params)
        if row is None:  # pragma: no cover - every caller's statement returns a row
            raise StoreError(f"no row from {sql.split()[0]}")
        return row

    def all(self, sql: str, params: Params | None = None) -> list[Row]:
        rows: list[Row] = self._execute(sql, params).fetchall()
        return rows

    def run(self, sql: str, params: Params | None = None) -> int:
        """Run one statement; how many rows it changed."""
        return int(self._execute(sql, params).rowcount)

    def many(self, sql: str, rows: Sequence[Params]) -> None:
        cur = self.conn.cursor()
        try:
            cur.executemany(sql, rows)
        finally:
            cur.close()


class Connector(Protocol):
    """What :class:`SqlStore` needs from a database: the dialect's half of the store."""

    #: ``sqlite`` or ``postgres``: which statements of :mod:`queries` to run.
    dialect: str
    #: where the database is, for messages (never a password).
    where: str
    #: the positional placeholder (``?`` or ``%s``), for clauses built per call.
    mark: str
    #: every connection open now (the HTTP server's tests watch it shrink).
    connections: list[Any]

    def read(self, sql: str, params: Params = ()) -> list[Row]:
        """One query outside a transaction."""

    def transaction(self) -> AbstractContextManager[Tx]:
        """A write transaction: committed at the end, rolled back on any error."""

    def snapshot(self) -> AbstractContextManager[Tx]:
        """A read transaction whose queries all see one consistent state."""

    def ts(self, dt: datetime) -> Any:
        """``dt`` as this database stores and compares times."""

    def key(self, text: str) -> str | None:
        """``text`` as an id this database can match; None when no row can have it."""

    def id_prefix(self, prefix: str) -> str | None:
        """``prefix`` as the start of an id this database can hold; None when none can."""

    def close(self) -> None: ...

    def release_thread(self) -> None: ...

    def change_version(self) -> int: ...

    def schema_version(self) -> int: ...

    def listen_fileno(self) -> int | None: ...

    def drain_notifications(self) -> int: ...
