"""Every kind of worker fault at once, in one daemon, with healthy files alongside.

A processor that raises, calls ``os._exit``, segfaults, runs out of memory
under ``processing.worker_memory_mb``, hangs inside a C call or on a FIFO,
or has its worker SIGKILLed from outside: each file ends in its documented
state with a clear error, every healthy file completes exactly once, and
the daemon goes on taking work.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from support import DaemonProcess, csv_bytes, drop_folder, files_under, wait_until

from batchd.testing.procs import runs
from batchd.worker import memory_limit_error

MEMORY_MB = 256
TIMEOUT_SECONDS = 5.0
HEALTHY = 24

# kind -> (status, attempts, error or None): the documented outcome (SPEC §2).
EXPECTED: dict[str, tuple[str, int, str | None]] = {
    "raise": ("failed", 4, "RuntimeError: chaos processor raised for raise-1.csv (attempt 4)"),
    "exit": ("failed", 4, "worker process exited with status 7"),
    "segv": ("failed", 4, "worker process killed by signal 11 (SIGSEGV)"),
    # Out of its memory limit: permanent (issue 12.4), so one attempt only.
    "mem": ("failed", 1, memory_limit_error(MEMORY_MB)),
    "csleep": ("failed", 1, "Processing timeout exceeded"),
    "fifo": ("failed", 1, "Processing timeout exceeded"),
    "exitonce": ("completed", 2, None),
    "segvonce": ("completed", 2, None),
    "victim": ("completed", 2, None),
}


def _files() -> dict[str, bytes]:
    files = {f"ok-{i:02}.csv": csv_bytes(i) for i in range(HEALTHY)}
    files.update({f"{kind}-1.csv": csv_bytes(100 + n) for n, kind in enumerate(EXPECTED)})
    return files


def test_all_worker_faults_together_leave_healthy_files_untouched(tmp_path: Path) -> None:
    """Raise, exit, segfault, OOM, C hang, FIFO hang and SIGKILL each end as documented
    while 24 healthy files complete exactly once and the daemon keeps working."""
    d = DaemonProcess(
        tmp_path,
        processing={
            "processor": "batchd.testing.procs:chaos",
            "concurrency": 4,
            "timeout_seconds": TIMEOUT_SECONDS,
            "worker_memory_mb": MEMORY_MB,
        },
    )
    os.mkfifo(d.state / "fifo")
    d.start()
    try:
        files = _files()
        drop_folder(d.inbox() / "mix", files, tmp_path / "staging")
        pid_file = d.state / "pid-victim-1.csv"
        wait_until(pid_file.exists, 60, what="the victim file to start")
        os.kill(int(pid_file.read_text()), signal.SIGKILL)

        status = d.wait_batch("mix", 120)
        by_path: dict[str, dict[str, Any]] = {f["relpath"]: f for f in status["files"]}
        outcomes = {
            rel: (f["status"], f["attempts"], f["error"])
            for rel, f in by_path.items()
            if not rel.startswith("ok-")
        }
        assert outcomes == {f"{kind}-1.csv": want for kind, want in EXPECTED.items()}
        healthy = {rel: f for rel, f in by_path.items() if rel.startswith("ok-")}
        assert len(healthy) == HEALTHY
        assert {(f["status"], f["attempts"]) for f in healthy.values()} == {("completed", 1)}
        assert {rel: runs(d.state, "done", rel) for rel in healthy} == dict.fromkeys(healthy, 1)

        # One result per input, each agreeing with the database; inputs where documented.
        results = d.results("mix")
        assert sorted(results) == sorted(files)
        assert {rel: (doc["status"], doc["error"]) for rel, doc in results.items()} == {
            rel: (f["status"], f["error"]) for rel, f in by_path.items()
        }
        failed = sorted(f"{k}-1.csv" for k, (st, _, _) in EXPECTED.items() if st == "failed")
        assert files_under(d.spool / "failed" / "mix") == failed
        assert files_under(d.spool / "archive" / "mix") == sorted(set(files) - set(failed))
        assert files_under(d.spool / "work") == []

        died = [e["reason"] for e in d.events("worker_died")]
        assert died.count("exited with status 7") == 4 + 1  # exit x4, exitonce x1
        assert died.count("killed by signal 11 (SIGSEGV)") == 4 + 1
        assert died.count("killed by signal 9 (SIGKILL)") == 1
        assert len(d.events("file_timeout")) == 2

        # The daemon is still whole: it takes and finishes new work.
        assert d.proc is not None and d.proc.poll() is None
        (d.inbox() / "after.csv").write_bytes(csv_bytes(999))
        assert d.wait_batch("after.csv", 60)["batch"]["status"] == "completed"
    finally:
        assert d.stop(60) == 0
