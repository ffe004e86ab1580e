"""What every scenario shares: a real ``batchd run`` child, waiting, drops, figures.

Each scenario starts the daemon as a user would (``python -m batchd run``
on a fresh spool in a temporary folder, configured by environment
variables) and measures it from outside the process.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from batchd.testing import wait_until
from batchd.testing.launcher import DaemonLauncher
from batchd.testing.launcher import children as children  # bench/scale.py's workers

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


class Daemon(DaemonLauncher):
    """``batchd run`` as a child process on ``tmp/spool``, logging JSON to ``tmp/daemon-N.log``.

    Configured by ``BATCHD_*`` variables only (no config file), the defaults
    below first and then ``env``; ``self.env`` is what every start gets.
    """

    def __init__(self, tmp: Path, **env: str) -> None:
        super().__init__(tmp)
        self.env = self.base_env
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

    def environment(self, **extra: str) -> dict[str, str]:
        # Exactly ``self.env`` (a scenario may have changed it since __init__),
        # which already holds the inherited environment.
        return {**self.env, **extra}

    def start(self, idle_seconds: float = 1.0, timeout: float = 120) -> Daemon:  # type: ignore[override]
        """Start and wait for ``daemon_started``; then let it idle (workers spawned)."""
        super().start(timeout=timeout, interval=POLL_SECONDS)
        time.sleep(idle_seconds)  # not synchronisation: an idle daemon is the scenario
        return self

    def http_port(self) -> int:
        return int(self.events("daemon_started")[-1]["http_port"])

    def stop(self, timeout: float = 60) -> None:  # type: ignore[override]
        """SIGTERM; a daemon that does not stop within ``timeout`` is killed, workers too."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:  # type: ignore[override]
        """SIGKILL the daemon, then its orphaned workers (they exit on their own too)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        super().kill(workers=True)

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
