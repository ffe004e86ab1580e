"""HTTP API load benchmark: list and detail endpoints under keep-alive load.

Starts batchd's :class:`~batchd.http.HttpServer` on 127.0.0.1, port 0, over a
fresh spool with a 50-file batch (plus older batches to list), while a
writer thread keeps the database busy the way a daemon processing at full
speed does (claims, progress updates, finishes). Load comes from client
processes, each running threads with kept-alive ``http.client`` connections,
for a fixed number of requests. Prints requests/s and p50/p99 latency.

    .venv/bin/python bench/bench_http.py [--requests 20000] [--processes 2] [--threads 4]

Loopback only; every loop is bounded by the request count.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from batchd.clock import SystemClock
from batchd.config import LogSettings, Priority, Settings
from batchd.daemon import build
from batchd.log import configure as configure_logging
from batchd.records import NewBatch, NewFile, Outcome, Status
from batchd.spool import Spool
from batchd.store import SQLiteStore

CSV = b"name,qty\nmenu,1\nsoup,2\n"
DETAIL_FILES = 50
OLDER_BATCHES = 100
BUSY_FILES = 30_000


def client(port: int, paths: list[str], count: int, out: Any) -> None:
    """Send ``count`` requests over one kept-alive connection; report latencies."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    latencies: dict[str, list[float]] = {p: [] for p in set(paths)}
    errors = 0
    for i in range(count):
        path = paths[i % len(paths)]
        start = time.perf_counter()
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200 or not json.loads(body)["success"]:
                errors += 1
        except (OSError, http.client.HTTPException):
            errors += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            continue
        latencies[path].append(time.perf_counter() - start)
    conn.close()
    out.append((latencies, errors))


def client_process(port: int, paths: list[str], count: int, threads: int, queue: Any) -> None:
    results: list[Any] = []
    per_thread = count // threads
    workers = [
        threading.Thread(target=client, args=(port, paths, per_thread, results))
        for _ in range(threads)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    queue.put(results)


def busy_writer(store: SQLiteStore, stop: threading.Event) -> int:
    """Claim, report progress on and finish files back to back, like a busy daemon."""
    clock = SystemClock()
    done = 0
    while not stop.is_set():
        task = store.claim_next(clock.now())
        if task is None:
            break
        store.set_progress({task.file.id: 50})
        store.finish(task.file.id, Outcome(Status.COMPLETED, result={"rows": 2}), clock.now())
        done += 1
    return done


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument(
        "--no-writer", action="store_true", help="no concurrent database writes (API alone)"
    )
    args = parser.parse_args(argv)
    # As in production (info level, so the per-request debug line costs nothing),
    # but quiet: warnings only.
    configure_logging(LogSettings(level="warning", format="console"))

    root = Path(tempfile.mkdtemp(prefix="batchd-bench-http-"))
    settings = Settings(
        spool={"root": root},
        http={"host": "127.0.0.1", "port": 0, "max_threads": 64},
    )
    spool = Spool(settings)
    spool.init()
    clock = SystemClock()
    # The daemon's own assembly; only the HTTP server is started.
    parts = build(settings, clock, spool=spool)
    store, intake = parts.store, parts.intake

    def drop(name: str, n: int, priority: Priority) -> str:
        folder = spool.inbox_for(priority) / name
        folder.mkdir()
        for i in range(n):
            (folder / f"file{i:04d}.csv").write_bytes(CSV)
        batch = intake.take_drop(folder, priority)
        assert batch is not None
        return batch.id

    for i in range(OLDER_BATCHES):
        drop(f"older-{i}", 2, Priority.LOW)
    detail_id = drop("detail-50", DETAIL_FILES, Priority.LOW)
    # What the writer works through meanwhile: rows only (it never reads the
    # files), high priority so the measured batch stays pending.
    busy = tuple(NewFile(f"busy{i:05d}.csv", len(CSV)) for i in range(BUSY_FILES))
    store.register_batch(
        NewBatch("busy", Priority.HIGH, "bench", "work/high/busy", "bench", busy), clock.now()
    )

    server = parts.http
    assert server is not None
    server.start()
    paths = ["/api/batch/jobs?limit=50", f"/api/batch/jobs/{detail_id}"]

    stop = threading.Event()
    written: list[int] = []
    writer = threading.Thread(target=lambda: written.append(busy_writer(store, stop)))
    if not args.no_writer:
        writer.start()

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    per_process = args.requests // args.processes
    procs = [
        ctx.Process(
            target=client_process, args=(server.port, paths, per_process, args.threads, queue)
        )
        for _ in range(args.processes)
    ]
    started = time.perf_counter()
    for p in procs:
        p.start()
    results = [item for _ in procs for item in queue.get(timeout=600)]
    elapsed = time.perf_counter() - started
    for p in procs:
        p.join()
    stop.set()
    if writer.is_alive():
        writer.join()
    server.stop()
    store.close()

    by_path: dict[str, list[float]] = {p: [] for p in paths}
    errors = 0
    for latencies, errs in results:
        errors += errs
        for path, values in latencies.items():
            by_path[path].extend(values)
    total = sum(len(v) for v in by_path.values())
    every = [x for v in by_path.values() for x in v]
    print(
        f"http bench: {total} requests in {elapsed:.2f} s = {total / elapsed:,.0f} req/s"
        f" ({args.processes} processes x {args.threads} keep-alive connections),"
        f" errors {errors}"
    )
    if written:
        print(
            f"  meanwhile a writer claimed, updated and finished {written[0]} files"
            f" ({3 * written[0] / elapsed:,.0f} commits/s)"
        )
    print(
        f"  all      p50 {statistics.median(every) * 1000:6.2f} ms"
        f"  p99 {percentile(every, 99) * 1000:6.2f} ms"
    )
    for path, values in by_path.items():
        label = "list" if "?" in path else "detail50"
        print(
            f"  {label:8} p50 {statistics.median(values) * 1000:6.2f} ms"
            f"  p99 {percentile(values, 99) * 1000:6.2f} ms  ({len(values)} requests)"
        )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
