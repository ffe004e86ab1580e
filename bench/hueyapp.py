"""The huey peer: a ``SqliteHuey`` in ``$BENCH_HUEY_DB`` with the tasks the scenarios run.

Run by ``huey_consumer bench.hueyapp.huey -w 2 -k process``; ``process_file``
is the task of issue 15's watchdog + huey stack (bench/peerstack.py). Two set-ups,
chosen by ``$BENCH_HUEY_SYNC``:

* ``default``: ``SqliteHuey`` as it comes (WAL, SQLite's default
  ``synchronous=FULL``: every enqueue, dequeue and result commit is synced);
  the peer the issue names.
* ``normal``: batchd's own pragmas (WAL, ``synchronous=NORMAL``: no sync per
  commit), huey at its fastest.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from typing import Any

from huey import SqliteHuey
from huey.storage import SqliteStorage


class NormalSyncStorage(SqliteStorage):  # type: ignore[misc]
    def _create_connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection = super()._create_connection()
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn


_tuned = os.environ.get("BENCH_HUEY_SYNC", "default") == "normal"
huey = SqliteHuey(
    "bench",
    filename=os.environ.get("BENCH_HUEY_DB", "/nonexistent/huey.db"),
    **({"storage_class": NormalSyncStorage} if _tuned else {}),
)


@huey.task()  # type: ignore[untyped-decorator]
def noop() -> int:
    return 1


@huey.task()  # type: ignore[untyped-decorator]
def copy(src: str, dst: str) -> int:
    shutil.copyfile(src, dst)
    return 1


@huey.task()  # type: ignore[untyped-decorator]
def process_file(path: str, root: str) -> int:
    """Issue 15's peer stack (bench/peerstack.py): batchd's file work on one file."""
    from pathlib import Path

    from bench.peerstack import file_work

    return file_work(Path(path), Path(root))


def result_count() -> Any:
    return huey.storage.result_store_size()
