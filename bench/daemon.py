"""Benchmarks of the daemon itself: drop-to-result latency and no-op throughput.

Each scenario starts a real ``batchd run`` on a fresh spool in a temporary
folder, as a user would, and measures from outside the process.
"""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _start(tmp: Path, **env: str) -> subprocess.Popen[bytes]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BATCHD_")}
    base.update(
        {
            "PYTHONPATH": str(REPO),
            "BATCHD_CONFIG": "",
            "BATCHD_SPOOL__ROOT": str(tmp / "spool"),
            "BATCHD_HTTP__ENABLED": "false",
            "BATCHD_LOG__LEVEL": "warning",
            "BATCHD_LOG__FORMAT": "json",
            "BATCHD_WATCH__SETTLE_SECONDS": "0",
        }
    )
    base.update(env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchd", "run"],
        env=base,
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "daemon.log").open("wb"),
    )
    db = tmp / "spool" / "state" / "batchd.db"
    deadline = time.monotonic() + 30
    while not (tmp / "spool" / "inbox" / "high").is_dir() or not db.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError((tmp / "daemon.log").read_text())
        time.sleep(0.01)
    time.sleep(1.0)  # workers spawned, first rescan done: an idle daemon
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(60)


def latency(samples: int = 50) -> dict[str, Any]:
    """One small file renamed into inbox/high; time until its result file exists."""
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        proc = _start(
            tmp, BATCHD_PROCESSING__PROCESSOR="noop", BATCHD_LIMITS__ALLOWED_TYPES='["*"]'
        )
        staging = tmp / "staging"
        staging.mkdir()
        times = []
        try:
            for i in range(samples):
                src = staging / f"f{i}.csv"
                src.write_bytes(b"a,b\n1,2\n")
                result = tmp / "spool" / "outbox" / src.name / "results" / f"{src.name}.json"
                t0 = time.perf_counter()
                os.rename(src, tmp / "spool" / "inbox" / "high" / src.name)
                while not result.exists():
                    time.sleep(0.0002)
                times.append((time.perf_counter() - t0) * 1000)
                time.sleep(0.05)
        finally:
            _stop(proc)
    times.sort()
    return {
        "samples": samples,
        "median_ms": round(statistics.median(times), 2),
        "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))], 2),
        "min_ms": round(times[0], 2),
        "max_ms": round(times[-1], 2),
    }


def throughput(
    folders: int = 40, per_folder: int = 50, workers: int = 2, loose: bool = False
) -> dict[str, Any]:
    """``folders x per_folder`` small files (or that many loose files) with the
    no-op processor: files per second from the first rename to the last result."""
    total = folders * per_folder
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        proc = _start(
            tmp,
            BATCHD_PROCESSING__PROCESSOR="noop",
            BATCHD_PROCESSING__CONCURRENCY=str(workers),
            BATCHD_LIMITS__ALLOWED_TYPES='["*"]',
        )
        staging = tmp / "staging"
        staging.mkdir()
        drops = []
        for f in range(folders):
            if loose:
                for i in range(per_folder):
                    p = staging / f"f{f:03}-{i:03}.csv"
                    p.write_bytes(b"a,b\n1,2\n")
                    drops.append(p)
            else:
                d = staging / f"batch{f:03}"
                d.mkdir()
                for i in range(per_folder):
                    (d / f"f{i:03}.csv").write_bytes(b"a,b\n1,2\n")
                drops.append(d)
        inbox = tmp / "spool" / "inbox" / "normal"
        db = sqlite3.connect(tmp / "spool" / "state" / "batchd.db")
        try:
            t0 = time.perf_counter()
            for d in drops:
                os.rename(d, inbox / d.name)
            while True:
                (done,) = db.execute(
                    "SELECT COUNT(*) FROM batch_files WHERE status='completed'"
                ).fetchone()
                if done >= total:
                    break
                time.sleep(0.01)
            elapsed = time.perf_counter() - t0
        finally:
            db.close()
            _stop(proc)
    return {
        "files": total,
        "workers": workers,
        "loose": loose,
        "seconds": round(elapsed, 2),
        "files_per_second": round(total / elapsed, 1),
    }


def main() -> dict[str, Any]:
    out = {
        "latency": latency(),
        "throughput_folders": throughput(),
        "throughput_loose": throughput(loose=True),
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
