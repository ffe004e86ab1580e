"""Issue 15's floor: per file exactly the physical work batchd does, with no daemon around it.

Per file, in this order: rename it from staging into an inbox folder; a
first SQLite commit (the file's row, claimed); read it and hash it
(sha256); write a JSON result under a temporary name, fsync it, rename it
into the outbox; rename the input into the archive; a second commit (the
row completed, with the digest). The database is as batchd opens its own:
WAL, ``synchronous=NORMAL``, one connection per process. With N processes
the files are split into N equal slices, each process working its slice.

    python -m bench.floor [--files 2000] [--processes 1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import make_drops

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS files (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,"
    " status TEXT NOT NULL, sha256 TEXT, started REAL, finished REAL)"
)


def _connect(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db, timeout=60, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def work(files: list[Path], root: Path, db: Path) -> None:
    """One process's slice of the files, one after the other."""
    conn = _connect(db)
    inbox, outbox, archive = root / "inbox", root / "outbox", root / "archive"
    for src in files:
        path = inbox / src.name
        os.rename(src, path)
        with conn:  # commit 1: registered and claimed
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT INTO files (name, status, started) VALUES (?, 'processing', ?)",
                (src.name, time.time()),
            )
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        tmp = outbox / f".{src.name}.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, json.dumps({"size": len(data), "sha256": digest}).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, outbox / f"{src.name}.json")
        os.rename(path, archive / src.name)
        with conn:  # commit 2: completed
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "UPDATE files SET status = 'completed', sha256 = ?, finished = ? WHERE name = ?",
                (digest, time.time(), src.name),
            )
    conn.close()


def run(files: int = 2000, processes: int = 1, tmp: Path | None = None) -> dict[str, Any]:
    """``files`` small loose files through ``processes`` floor processes: files/s."""
    with tempfile.TemporaryDirectory(prefix="batchd-floor-", dir=tmp) as t:
        root = Path(t)
        for d in ("inbox", "outbox", "archive"):
            (root / d).mkdir()
        db = root / "floor.db"
        conn = _connect(db)
        conn.execute(SCHEMA)
        conn.close()
        staged = make_drops(root / "staging", 1, files, loose=True)
        slices = [staged[k::processes] for k in range(processes)]
        ctx = mp.get_context("fork")  # the slices are already in memory: no re-import
        procs = [ctx.Process(target=work, args=(s, root, db)) for s in slices]
        t0 = time.perf_counter()
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        elapsed = time.perf_counter() - t0
        conn = _connect(db)
        sql = "SELECT COUNT(*) FROM files WHERE status = 'completed'"
        (completed,) = conn.execute(sql).fetchone()
        conn.close()
        results = sum(1 for _ in (root / "outbox").iterdir())
    if completed != files or results != files or any(p.exitcode for p in procs):
        raise RuntimeError(f"floor: {completed} rows, {results} results of {files} files")
    return {
        "files": files,
        "processes": processes,
        "seconds": round(elapsed, 3),
        "files_per_second": round(files / elapsed, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args(argv)
    print(json.dumps(run(args.files, args.processes), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
