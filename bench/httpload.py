"""HTTP load: client processes, each with threads on kept-alive ``http.client`` connections.

Every loop is bounded by a request count; loopback only.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing as mp
import threading
import time
from typing import Any

from bench.common import median, percentile


def _client(port: int, paths: list[str], count: int, out: list[Any]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
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
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            continue
        latencies[path].append(time.perf_counter() - start)
    conn.close()
    out.append((latencies, errors))


def _client_process(port: int, paths: list[str], count: int, threads: int, queue: Any) -> None:
    results: list[Any] = []
    workers = [
        threading.Thread(target=_client, args=(port, paths, count // threads, results))
        for _ in range(threads)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    queue.put(results)


def load(
    port: int, paths: dict[str, str], requests: int, processes: int = 2, threads: int = 4
) -> dict[str, Any]:
    """``requests`` GETs spread over ``paths`` (label -> path): req/s overall, p50/p99 per label."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    order = list(paths.values())
    procs = [
        ctx.Process(
            target=_client_process,
            args=(port, order, requests // processes, threads, queue),
        )
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    # Spawned clients import first; time from the first answer, not from fork.
    started = time.perf_counter()
    results = [item for _ in procs for item in queue.get(timeout=900)]
    elapsed = time.perf_counter() - started
    for p in procs:
        p.join()
    by_path: dict[str, list[float]] = {p: [] for p in order}
    errors = 0
    for latencies, errs in results:
        errors += errs
        for path, values in latencies.items():
            by_path[path].extend(values)
    total = sum(len(v) for v in by_path.values())
    out: dict[str, Any] = {
        "requests": total,
        "errors": errors,
        "seconds": round(elapsed, 3),
        "requests_per_second": round(total / elapsed, 1),
        "connections": processes * threads,
    }
    for label, path in paths.items():
        values = by_path[path]
        out[label] = {
            "p50_ms": round(median(values) * 1000, 2),
            "p99_ms": round(percentile(values, 99) * 1000, 2),
        }
    return out


def timed_get(port: int, path: str, count: int) -> dict[str, Any]:
    """``count`` sequential GETs on one connection: p50/p99/max ms and the body size."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    times = []
    size = 0
    for _ in range(count):
        t0 = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        times.append((time.perf_counter() - t0) * 1000)
        if resp.status != 200:
            raise RuntimeError(f"GET {path}: {resp.status} {body[:200]!r}")
        size = len(body)
    conn.close()
    return {
        "p50_ms": round(median(times), 2),
        "p99_ms": round(percentile(times, 99), 2),
        "first_ms": round(times[0], 2),
        "bytes": size,
    }


def get_body(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("GET", path)
    body = conn.getresponse().read()
    conn.close()
    return body
