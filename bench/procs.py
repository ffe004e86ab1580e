"""Processors for the benchmarks (``bench.procs:<fn>``; the repo root is on PYTHONPATH).

``burn`` costs a fixed amount of CPU per file: the file holds the number of
loop iterations, so batchd, the ``xargs`` peer (bench/burn_one.py) and the
serial calibration all do exactly the same work.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def burn_work(loops: int) -> int:
    """Pure-Python integer work: ``loops`` iterations, no I/O, no allocation to speak of."""
    x = 0
    for i in range(loops):
        x = (x * 31 + i) & 0xFFFFFFFF
    return x


def loops_for(cpu_seconds: float) -> int:
    """Iterations that cost about ``cpu_seconds`` of CPU on this machine (measured here)."""
    probe = 200_000
    best = float("inf")
    for _ in range(5):
        t0 = time.process_time()
        burn_work(probe)
        best = min(best, time.process_time() - t0)
    return max(1, int(probe * cpu_seconds / best))


def burn(path: Path, ctx: Any) -> dict[str, Any]:
    loops = int(path.read_text().split()[0])
    return {"loops": loops, "x": burn_work(loops)}


def sleepy(path: Path, ctx: Any) -> dict[str, Any]:
    """5 ms of waiting per file: keeps the daemon processing without eating the CPU."""
    time.sleep(0.005)
    return {"size": path.stat().st_size}


#: Issue 15's scale-out: the I/O-bound processor sleeps this long per file.
IO_SLEEP_SECONDS = 0.1


def io_bound(path: Path, ctx: Any) -> dict[str, Any]:
    """100 ms of waiting per file (cores are not the limit), each run written to a ledger.

    With ``$BENCH_LEDGER`` set, one ``start`` and one ``end`` line per run
    (node id, file id, relpath) are appended to it, each with a single
    ``O_APPEND`` write, so the kill scenario can count which node ran which
    file how often. (``path`` may be a worker's private copy: the file id
    names the file.)
    """
    ledger = os.environ.get("BENCH_LEDGER")
    node = os.environ.get("BATCHD_CLUSTER__NODE_ID", "")
    line = f"{node}\t{getattr(ctx, 'file_id', '')}\t{getattr(ctx, 'relpath', path.name)}\n"
    if ledger:
        _append(ledger, "start\t" + line)
    time.sleep(IO_SLEEP_SECONDS)
    if ledger:
        _append(ledger, "end\t" + line)
    return {"size": path.stat().st_size}


def _append(ledger: str, line: str) -> None:
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
