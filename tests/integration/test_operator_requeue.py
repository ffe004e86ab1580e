"""Fencing on a single SQLite node (issue 16): an operator re-queues a running file by SQL."""

from __future__ import annotations

import json
from pathlib import Path

from support import DaemonProcess, csv_bytes, wait_until


def test_operator_requeue_of_a_running_file_supersedes_the_old_attempt(tmp_path: Path) -> None:
    """Re-queued by SQL while running, the old attempt's outcome is dropped; the new one owns it."""
    d = DaemonProcess(
        tmp_path, processing={"processor": "batchd.testing.procs:gated", "concurrency": 2}
    ).start()
    try:
        (d.inbox() / "f.csv").write_bytes(csv_bytes(1))
        wait_until(lambda: (d.state / "started-1").exists(), 30, what="attempt 1 to start")
        with d.db() as conn:
            conn.execute("UPDATE batch_files SET status = 'pending' WHERE relpath = 'f.csv'")
        wait_until(lambda: (d.state / "started-2").exists(), 30, what="attempt 2 to start")
        # Let the first attempt report now: on the old code its "completed"
        # was recorded under the second attempt, which was still running.
        (d.state / "release-1").touch()
        wait_until(
            lambda: d.events("outcome_superseded"), 30, what=f"outcome_superseded\n{d.log()}"
        )
        with d.db() as conn:
            assert conn.execute("SELECT status FROM batch_files").fetchone()[0] == "processing"
        assert any((d.spool / "work").rglob("f.csv")), "the input stays for the owning attempt"
        (d.state / "release-2").touch()
        status = d.wait_batch("f.csv")
        assert status["batch"]["status"] == "completed"
        with d.db() as conn:
            row = conn.execute("SELECT result, lease_gen FROM batch_files").fetchone()
        assert json.loads(row[0]) == {"attempt": 2}
        assert row[1] == 2
        assert d.results("f.csv")["f.csv"]["result"] == {"attempt": 2}
        assert len(d.events("file_completed")) == 1
        assert (d.spool / "archive" / "f.csv" / "f.csv").exists()
    finally:
        d.stop()
