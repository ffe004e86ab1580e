"""What every scenario shares: a real ``batchd run`` child, waiting, drops, figures.

Each scenario starts the daemon as a user would (``python -m batchd run``
on a fresh spool in a temporary folder, configured by environment
variables) and measures it from outside the process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from batchd.testing import wait_until

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
CORES = os.cpu_count() or 1
#: How often the benchmarks look whether what they wait for happened
#: (the resolution of their timings).
POLL_SECONDS = 0.01


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def percentile(values: Iterable[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vm_hwm_kib(pid: int) -> int:
    """Peak resident set of one process (``VmHWM`` in /proc/<pid>/status), KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the daemon's workers)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


class Daemon:
    """``batchd run`` as a child process on ``tmp/spool``, logging JSON to ``tmp/daemon-N.log``."""

    def __init__(self, tmp: Path, **env: str) -> None:
        self.tmp = tmp
        self.spool = tmp / "spool"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHD_")}
        self.env.update(
            {
                "PYTHONPATH": str(REPO),
                "BATCHD_CONFIG": "",
                "BATCHD_SPOOL__ROOT": str(self.spool),
                "BATCHD_HTTP__ENABLED": "false",
                "BATCHD_LOG__LEVEL": "info",
                "BATCHD_LOG__FORMAT": "json",
                "BATCHD_WATCH__SETTLE_SECONDS": "0",
                "BATCHD_PROCESSING__PROCESSOR": "noop",
                "BATCHD_LIMITS__ALLOWED_TYPES": '["*"]',
            }
        )
        self.env.update(env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.started_in = 0.0

    @property
    def log_path(self) -> Path:
        return self.tmp / f"daemon-{self.runs}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def db_path(self) -> Path:
        return self.spool / "state" / "batchd.db"

    def inbox(self, priority: str = "normal") -> Path:
        return self.spool / "inbox" / priority

    def start(self, idle_seconds: float = 1.0, timeout: float = 120) -> Daemon:
        """Start and wait for ``daemon_started``; then let it idle (workers spawned)."""
        self.runs += 1
        with self.log_path.open("wb") as log:
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "batchd", "run"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmp,
            )
        wait_until(
            lambda: self.events("daemon_started") or self.proc.poll() is not None,  # type: ignore[union-attr]
            timeout,
            what="daemon start",
            interval=POLL_SECONDS,
        )
        self.started_in = time.perf_counter() - t0
        if self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited at start:\n{self.log_path.read_text()[-3000:]}")
        time.sleep(idle_seconds)  # not synchronisation: an idle daemon is the scenario
        return self

    def events(self, name: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if not self.log_path.exists():
            return out
        with self.log_path.open("rb") as fh:
            for line in fh:
                if name.encode() not in line:
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == name:
                    out.append(event)
        return out

    def http_port(self) -> int:
        return int(self.events("daemon_started")[-1]["http_port"])

    def stop(self, timeout: float = 60) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the daemon, then its orphaned workers (they exit on their own too)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        workers = children(self.proc.pid)
        self.proc.kill()
        self.proc.wait()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.db_path, timeout=30)

    def count_files(self, status: str | None = None) -> int:
        with self.db() as conn:
            if status is None:
                row = conn.execute("SELECT COUNT(*) FROM batch_files").fetchone()
            else:
                row = conn.execute(
                    "SELECT COUNT(*) FROM batch_files WHERE status=?", (status,)
                ).fetchone()
        conn.close()
        return int(row[0])

    def wait_done(self, total: int, timeout: float) -> None:
        """Wait until ``total`` files are completed or failed (polled every 10 ms)."""
        conn = self.db()
        try:
            wait_until(
                lambda: (
                    conn.execute(
                        "SELECT COUNT(*) FROM batch_files WHERE status IN ('completed','failed')"
                    ).fetchone()[0]
                    >= total
                ),
                timeout,
                what=f"{total} files done",
                interval=POLL_SECONDS,
            )
        finally:
            conn.close()


def write_small(path: Path, body: bytes) -> None:
    """Create one small file with three syscalls (three times faster than ``open()`` here)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, body)
    finally:
        os.close(fd)


def make_drops(
    staging: Path, folders: int, per_folder: int, loose: bool = False, body: bytes = b"a,b\n1,2\n"
) -> list[Path]:
    """``folders x per_folder`` small files under ``staging``: folders, or loose files."""
    staging.mkdir(parents=True, exist_ok=True)
    drops = []
    for f in range(folders):
        if loose:
            for i in range(per_folder):
                p = staging / f"f{f:04}-{i:03}.csv"
                write_small(p, body)
                drops.append(p)
        else:
            d = staging / f"batch{f:04}"
            d.mkdir()
            for i in range(per_folder):
                write_small(d / f"f{i:03}.csv", body)
            drops.append(d)
    return drops


def drop_all(drops: list[Path], inbox: Path) -> None:
    for d in drops:
        os.rename(d, inbox / d.name)
