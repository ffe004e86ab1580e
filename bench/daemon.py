"""Benchmarks of the daemon itself: drop-to-result latency, no-op and CPU-bound throughput.

Each measurement starts a real ``batchd run`` on a fresh spool in a
temporary folder, as a user would, and measures from outside the process.
``python -m bench.daemon`` runs the three once at full size and prints JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Daemon, drop_all, make_drops
from bench.peers import poll_exists


def latency(samples: int = 50, gap: float = 0.05, tmp: Path | None = None) -> list[float]:
    """One small file renamed into inbox/high of an idle daemon (``settle_seconds = 0``);
    ms until its result file exists, ``samples`` times, ``gap`` s apart."""
    with tempfile.TemporaryDirectory(dir=tmp) as t:
        daemon = Daemon(Path(t)).start()
        staging = Path(t) / "staging"
        staging.mkdir()
        times = []
        try:
            for i in range(samples):
                src = staging / f"f{i}.csv"
                src.write_bytes(b"a,b\n1,2\n")
                result = daemon.spool / "outbox" / src.name / "results" / f"{src.name}.json"
                t0 = time.perf_counter()
                os.rename(src, daemon.inbox("high") / src.name)
                poll_exists(result, 60)
                times.append((time.perf_counter() - t0) * 1000)
                time.sleep(gap)
        finally:
            daemon.stop()
    return times


def throughput(
    folders: int = 40,
    per_folder: int = 50,
    workers: int = 2,
    loose: bool = False,
    tmp: Path | None = None,
    on_start: Any = None,
) -> dict[str, Any]:
    """``folders x per_folder`` small files (or that many loose files) with the no-op
    processor: files per second from the first rename to the last file done.
    ``on_start(pid)`` runs once the daemon is idle, before the drop (profiling)."""
    total = folders * per_folder
    with tempfile.TemporaryDirectory(dir=tmp) as t:
        daemon = Daemon(Path(t), BATCHD_PROCESSING__CONCURRENCY=str(workers)).start()
        drops = make_drops(Path(t) / "staging", folders, per_folder, loose)
        try:
            if on_start is not None:
                on_start(daemon.pid)
            t0 = time.perf_counter()
            drop_all(drops, daemon.inbox("normal"))
            daemon.wait_done(total, 600)
            elapsed = time.perf_counter() - t0
            completed = daemon.count_files("completed")
        finally:
            daemon.stop()
    if completed != total:
        raise RuntimeError(f"only {completed} of {total} files completed")
    return {
        "files": total,
        "workers": workers,
        "loose": loose,
        "seconds": round(elapsed, 3),
        "files_per_second": round(total / elapsed, 1),
    }


def cpu_bound(inputs: Path, workers: int, tmp: Path | None = None) -> float:
    """The folders under ``inputs`` (copied) through ``bench.procs:burn``; wall seconds."""
    import shutil

    with tempfile.TemporaryDirectory(dir=tmp) as t:
        daemon = Daemon(
            Path(t),
            BATCHD_PROCESSING__CONCURRENCY=str(workers),
            BATCHD_PROCESSING__PROCESSOR="bench.procs:burn",
        ).start()
        staging = Path(t) / "staging"
        shutil.copytree(inputs, staging)
        drops = sorted(staging.iterdir())
        total = sum(1 for p in staging.rglob("*") if p.is_file())
        try:
            t0 = time.perf_counter()
            drop_all(drops, daemon.inbox("normal"))
            daemon.wait_done(total, 600)
            elapsed = time.perf_counter() - t0
            completed = daemon.count_files("completed")
        finally:
            daemon.stop()
    if completed != total:
        raise RuntimeError(f"only {completed} of {total} burn files completed")
    return elapsed


def main() -> dict[str, Any]:
    lat = sorted(latency())
    out = {
        "latency_ms": {"median": lat[len(lat) // 2], "max": lat[-1]},
        "throughput_folders": throughput(),
        "throughput_loose": throughput(loose=True),
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
