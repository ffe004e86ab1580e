"""Issue 8 benchmarks: batchd nodes on one spool and one PostgreSQL database.

    python -m bench.cluster            # full sizes
    python -m bench.cluster --quick    # small sizes, for development

Measures, each against a real PostgreSQL server started here (Debian's
binaries, a throw-away cluster: tests/pgserver.py):

* **throughput** with 1, 2 and 3 nodes (``batchd run`` processes, same spool,
  same database, 2 workers each) on the no-op and the CPU-bound (~50 ms of
  CPU per file) scenarios, and the same single node on SQLite for reference:
  files per second from the drop of every folder to the last file done;
* the **claim rate** of the ``FOR UPDATE SKIP LOCKED`` dispatch query alone
  (``PostgresStore.claim_next``, no processing), from 1 and 3 connections;
* the **extra latency** a file sees with PostgreSQL: drop-to-result of one
  loose file into an idle node, PostgreSQL against SQLite (median, p90).

On a machine with few cores the nodes share them, so throughput flattens as
soon as the workers fill the cores: the figures say what this machine does,
not what three machines would.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import CORES, REPO, Daemon, drop_all, make_drops, median, percentile, wait_until
from bench.procs import loops_for

sys.path.insert(0, str(REPO / "tests"))
from pgserver import PgServer, find_bindir

CPU_SECONDS_PER_FILE = 0.05
WORKERS_PER_NODE = 2


@dataclass(frozen=True)
class Sizes:
    noop: tuple[int, int]  # folders, files per folder
    cpu_files: int
    claims: int
    latency_samples: int


FULL = Sizes(noop=(20, 50), cpu_files=240, claims=5000, latency_samples=30)
QUICK = Sizes(noop=(6, 50), cpu_files=60, claims=1000, latency_samples=8)


def _count_done(url: str | None, db: Path | None) -> int:
    sql = "SELECT COUNT(*) FROM batch_files WHERE status IN ('completed', 'failed')"
    if url is not None:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(sql).fetchone()
    else:
        import sqlite3

        assert db is not None
        conn2 = sqlite3.connect(db, timeout=30)
        row = conn2.execute(sql).fetchone()
        conn2.close()
    return int(row[0]) if row else 0


def _nodes(tmp: Path, n: int, url: str | None, processor: str) -> list[Daemon]:
    spool = tmp / "spool"
    nodes = []
    for i in range(n):
        base = tmp / f"node{i}"
        base.mkdir()
        env = {
            "BATCHD_SPOOL__ROOT": str(spool),
            "BATCHD_PROCESSING__PROCESSOR": processor,
            "BATCHD_PROCESSING__CONCURRENCY": str(WORKERS_PER_NODE),
            "BATCHD_CLUSTER__NODE_ID": f"node{i}",
        }
        if url is not None:
            env["BATCHD_DATABASE__URL"] = url
        daemon = Daemon(base, **env)
        daemon.spool = spool
        nodes.append(daemon)
    return nodes


def throughput(
    server: PgServer, n: int, processor: str, drops: tuple[int, int], body: bytes, pg: bool
) -> float:
    """Files per second for ``n`` nodes from the drop of every folder to the last file done."""
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as name:
        tmp = Path(name)
        dbname = server.create_database() if pg else None
        url = server.url(dbname) if dbname else None
        nodes = _nodes(tmp, n, url, processor)
        try:
            for node in nodes:
                node.start(idle_seconds=0)
            time.sleep(1.0)  # not synchronisation: idle nodes with spawned workers are the scenario
            folders, per = drops
            staged = make_drops(tmp / "staging", folders, per, body=body)
            total = folders * per
            t0 = time.perf_counter()
            drop_all(staged, nodes[0].inbox())
            db = None if pg else tmp / "spool" / "state" / "batchd.db"
            wait_until(
                lambda: _count_done(url, db) >= total, 600, what=f"{total} files", interval=0.05
            )
            return total / (time.perf_counter() - t0)
        finally:
            for node in nodes:
                node.stop()
            if dbname:
                server.drop_database(dbname)


def claim_rate(server: PgServer, files: int, connections: int) -> float:
    """Claims per second of ``PostgresStore.claim_next`` alone, from ``connections`` threads."""
    from batchd.config import Priority
    from batchd.records import NewBatch, NewFile
    from batchd.store.postgres import PostgresStore

    dbname = server.create_database()
    url = server.url(dbname)
    store = PostgresStore(url, node_id="bench")
    try:
        now = datetime.now(UTC)
        per = 50
        for b in range(files // per):
            store.register_batch(
                NewBatch(
                    name=f"b{b}",
                    priority=Priority.NORMAL,
                    user_id=None,
                    work_path=f"work/normal/b{b}",
                    source="bench",
                    files=tuple(NewFile(f"f{i}.csv", 10) for i in range(per)),
                ),
                now,
            )
        counts = [0] * connections

        def worker(k: int) -> None:
            while store.claim_next(datetime.now(UTC)) is not None:
                counts[k] += 1
            store.release_thread()

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(connections)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        assert sum(counts) == (files // per) * per, counts
        return sum(counts) / elapsed
    finally:
        store.close()
        server.drop_database(dbname)


def latency(server: PgServer, samples: int, pg: bool) -> dict[str, float]:
    """Drop-to-result seconds of one loose file into an idle node (median and p90)."""
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as name:
        tmp = Path(name)
        dbname = server.create_database() if pg else None
        url = server.url(dbname) if dbname else None
        node = _nodes(tmp, 1, url, "noop")[0]
        took: list[float] = []
        try:
            node.start(idle_seconds=1.0)
            staging = tmp / "staging"
            staging.mkdir()
            for i in range(samples):
                src = staging / f"one{i}.csv"
                src.write_bytes(b"a,b\n1,2\n")
                result = node.spool / "outbox" / src.name / "results" / f"{src.name}.json"
                t0 = time.perf_counter()
                src.rename(node.inbox() / src.name)
                wait_until(result.exists, 60, what="one result", interval=0.001)
                took.append(time.perf_counter() - t0)
                time.sleep(0.2)  # not synchronisation: each sample starts from an idle node
        finally:
            node.stop()
            if dbname:
                server.drop_database(dbname)
        return {"median_ms": median(took) * 1000, "p90_ms": percentile(took, 90) * 1000}


def run(quick: bool = False) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    bindir = find_bindir()
    if bindir is None:
        return {"skipped": "PostgreSQL is not installed (apt-get install postgresql)"}
    server = PgServer(bindir)
    server.start()
    try:
        out: dict[str, Any] = {"cores": CORES, "workers_per_node": WORKERS_PER_NODE}
        noop = sizes.noop
        loops = loops_for(CPU_SECONDS_PER_FILE)
        cpu = (sizes.cpu_files // 20, 20)
        tp: dict[str, dict[str, float]] = {"noop": {}, "cpu": {}}
        tp["noop"]["sqlite-1"] = throughput(server, 1, "noop", noop, b"a,b\n1,2\n", pg=False)
        tp["cpu"]["sqlite-1"] = throughput(
            server, 1, "bench.procs:burn", cpu, f"{loops}\n".encode(), pg=False
        )
        for n in (1, 2, 3):
            tp["noop"][f"pg-{n}"] = throughput(server, n, "noop", noop, b"a,b\n1,2\n", pg=True)
            tp["cpu"][f"pg-{n}"] = throughput(
                server, n, "bench.procs:burn", cpu, f"{loops}\n".encode(), pg=True
            )
        out["throughput_files_per_s"] = tp
        out["cpu_ideal_files_per_s"] = CORES / CPU_SECONDS_PER_FILE
        out["claim_rate_per_s"] = {
            "1 connection": claim_rate(server, sizes.claims, 1),
            "3 connections": claim_rate(server, sizes.claims, 3),
        }
        out["latency"] = {
            "sqlite": latency(server, sizes.latency_samples, pg=False),
            "postgresql": latency(server, sizes.latency_samples, pg=True),
        }
        return out
    finally:
        server.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes")
    args = parser.parse_args()
    print(json.dumps(run(args.quick), indent=1))


if __name__ == "__main__":
    main()
