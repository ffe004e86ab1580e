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
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batchd.testing.launcher import children
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


def _nodes(
    tmp: Path,
    n: int,
    url: str | None,
    processor: str,
    workers: int = WORKERS_PER_NODE,
    **extra: str,
) -> list[Daemon]:
    spool = tmp / "spool"
    nodes = []
    for i in range(n):
        base = tmp / f"node{i}"
        base.mkdir()
        env = {
            "BATCHD_SPOOL__ROOT": str(spool),
            "BATCHD_PROCESSING__PROCESSOR": processor,
            "BATCHD_PROCESSING__CONCURRENCY": str(workers),
            "BATCHD_CLUSTER__NODE_ID": f"node{i}",
            **extra,
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


# Issue 15: scale-out with an I/O-bound processor, so cores are not the limit.
SCALE_NODES = (1, 2, 4)
SCALE_CONCURRENCY = 3
SCALE_TARGET = 0.9
#: The kill scenario's short leases: a dead node's files come back within seconds.
KILL_LEASE_SECONDS = 3.0
KILL_HEARTBEAT_SECONDS = 1.0


def _pg_rows(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        return list(conn.execute(sql, args).fetchall())


def _result_files(spool: Path) -> int:
    return sum(1 for _ in (spool / "outbox").glob("*/results/*.json"))


def _start_and_drop(nodes: list[Any], tmp: Path, folders: int, per: int) -> tuple[int, float]:
    """Start every node, let them idle, then drop ``folders x per`` files into the
    first node's inbox; returns the file count and the clock at the drop."""
    for node in nodes:
        node.start(idle_seconds=0)
    time.sleep(1.0)  # not synchronisation: idle nodes with spawned workers are the scenario
    staged = make_drops(tmp / "staging", folders, per)
    t0 = time.perf_counter()
    drop_all(staged, nodes[0].inbox())
    return folders * per, t0


def io_throughput(server: PgServer, n: int, folders: int, per: int) -> dict[str, Any]:
    """``n`` nodes (concurrency 3 each, ``bench.procs:io_bound``) on one spool and one
    database: files/s from the drop of every folder to the last file done."""
    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as name:
        tmp = Path(name)
        dbname = server.create_database()
        url = server.url(dbname)
        nodes = _nodes(tmp, n, url, "bench.procs:io_bound", SCALE_CONCURRENCY)
        try:
            total, t0 = _start_and_drop(nodes, tmp, folders, per)
            wait_until(
                lambda: _count_done(url, None) >= total, 900, what=f"{total} files", interval=0.05
            )
            elapsed = time.perf_counter() - t0
            by_node = {
                str(k): int(v)
                for k, v in _pg_rows(
                    url,
                    "SELECT node_id, COUNT(*) FROM batch_files WHERE status = 'completed'"
                    " GROUP BY node_id ORDER BY node_id",
                )
            }
        finally:
            for node in nodes:
                node.stop()
            server.drop_database(dbname)
    if sum(by_node.values()) != total:
        raise RuntimeError(f"scale-out: {sum(by_node.values())} of {total} files completed")
    return {
        "nodes": n,
        "files": total,
        "seconds": round(elapsed, 3),
        "files_per_second": round(total / elapsed, 2),
        "completed_by_node": by_node,
    }


def kill_one(server: PgServer, n: int, folders: int, per: int) -> dict[str, Any]:
    """``n`` nodes on short leases; the last one SIGKILLed (with its workers) once a third
    of the files are done. In the end every file must be completed exactly once: one
    completed row per file, one result file per file, none left in flight."""
    with tempfile.TemporaryDirectory(prefix="bench-kill-") as name:
        tmp = Path(name)
        dbname = server.create_database()
        url = server.url(dbname)
        ledger = tmp / "ledger.tsv"
        nodes = _nodes(
            tmp,
            n,
            url,
            "bench.procs:io_bound",
            SCALE_CONCURRENCY,
            BATCHD_CLUSTER__LEASE_SECONDS=str(KILL_LEASE_SECONDS),
            BATCHD_CLUSTER__HEARTBEAT_SECONDS=str(KILL_HEARTBEAT_SECONDS),
            BENCH_LEDGER=str(ledger),
        )
        victim = nodes[-1]
        victim_id = vid = victim.env["BATCHD_CLUSTER__NODE_ID"]
        try:
            total, t0 = _start_and_drop(nodes, tmp, folders, per)
            busy = "SELECT id FROM batch_files WHERE status = 'processing' AND node_id = %s"
            wait_until(
                lambda: _count_done(url, None) >= total // 3 and bool(_pg_rows(url, busy, vid)),
                300,
                what="a third done and the victim busy",
                interval=0.02,
            )
            # Frozen first: a victim's worker committing a file between the read
            # below and the kill would count as "in flight, not finished elsewhere".
            for pid in (victim.pid, *children(victim.pid)):
                os.kill(pid, signal.SIGSTOP)
            in_flight = {str(r[0]) for r in _pg_rows(url, busy, vid)}
            victim.kill()
            killed_at = time.perf_counter()
            wait_until(
                lambda: _count_done(url, None) >= total, 600, what=f"{total} files", interval=0.05
            )
            elapsed = time.perf_counter() - t0
            recovered_in = time.perf_counter() - killed_at
            statuses = dict(
                _pg_rows(url, "SELECT status, COUNT(*) FROM batch_files GROUP BY status")
            )
            doubled_rows = _pg_rows(
                url,
                "SELECT batch_id, relpath FROM batch_files GROUP BY batch_id, relpath"
                " HAVING COUNT(*) > 1",
            )
            finished_by = {
                str(r[0]): r[1]
                for r in _pg_rows(url, "SELECT id, node_id FROM batch_files")
                if str(r[0]) in in_flight
            }
            results = _result_files(tmp / "spool")
        finally:
            for node in nodes:
                node.stop()
            server.drop_database(dbname)
        ends: dict[str, int] = {}
        for line in ledger.read_text().splitlines():
            kind, _node, file_id, _relpath = line.split("\t")
            if kind == "end":
                ends[file_id] = ends.get(file_id, 0) + 1
    completed = int(statuses.get("completed", 0))
    out = {
        "nodes": n,
        "files": total,
        "lease_seconds": KILL_LEASE_SECONDS,
        "heartbeat_seconds": KILL_HEARTBEAT_SECONDS,
        "statuses": {str(k): int(v) for k, v in statuses.items()},
        "result_files": results,
        "duplicate_rows": len(doubled_rows),
        "in_flight_on_victim": len(in_flight),
        "in_flight_finished_elsewhere": sum(
            1 for v in finished_by.values() if v is not None and v != victim_id
        ),
        # A run that ended but whose finish the victim never recorded runs again
        # elsewhere: at-least-once execution, at most the files in flight.
        "processor_runs_ended_twice": sum(1 for v in ends.values() if v > 1),
        "files_never_run_to_end": total - len(ends),
        "seconds": round(elapsed, 2),
        "kill_to_all_done_s": round(recovered_in, 2),
    }
    out["lost"] = total - completed
    out["ok"] = (
        completed == total
        and results == total
        and not doubled_rows
        and out["in_flight_finished_elsewhere"] == len(in_flight)
        and out["files_never_run_to_end"] == 0
    )
    return out


def scaleout(rounds: int, quick: bool = False) -> dict[str, Any]:
    """Issue 15: 1, 2 and 4 nodes with an I/O-bound processor (median of ``rounds``), the
    ratio to N x the 1-node figure, and one node SIGKILLed mid-run."""
    bindir = find_bindir()
    if bindir is None:
        return {"skipped": "PostgreSQL is not installed (apt-get install postgresql)"}
    # Full: 1,200 files last ~10 s at 4 nodes (3 x 4 files per 100 ms at best).
    # Quick: 1 and 2 nodes only, 60 files, to stay fast.
    folders, per = (2, 30) if quick else (24, 50)
    counts = SCALE_NODES[:2] if quick else SCALE_NODES
    server = PgServer(bindir)
    server.start()
    try:
        per_round = [
            {str(n): io_throughput(server, n, folders, per) for n in counts} for _ in range(rounds)
        ]
        fps = {
            str(n): round(median(r[str(n)]["files_per_second"] for r in per_round), 2)
            for n in counts
        }
        one = fps["1"]
        ratios = {str(n): round(fps[str(n)] / (n * one), 3) for n in counts}
        kill = kill_one(server, 2 if quick else 3, 3 if quick else 8, 30 if quick else 50)
    finally:
        server.destroy()
    return {
        "files": folders * per,
        "concurrency_per_node": SCALE_CONCURRENCY,
        "sleep_ms_per_file": 100,
        "ideal_files_per_s_per_node": SCALE_CONCURRENCY * 10,
        "rounds": per_round,
        "files_per_second": fps,
        "ratio_to_n_x_one": ratios,
        "target": f"N nodes >= {SCALE_TARGET} x N x 1-node files/s; a killed node loses nothing",
        "met": all(r >= SCALE_TARGET for r in ratios.values()) and kill["ok"],
        "kill": kill,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes")
    args = parser.parse_args()
    print(json.dumps(run(args.quick), indent=1))


if __name__ == "__main__":
    main()
