"""Processors that fail, hang or crash; daemons that are killed or stopped."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from support import DaemonProcess, csv_bytes, drop_folder, files_under, wait_until


def test_flaky_processor_completes_on_third_attempt(tmp_path: Path) -> None:
    """A processor failing twice then succeeding ends completed with 3 attempts."""
    d = DaemonProcess(tmp_path, processing={"processor": "batchd.testing.procs:flaky"}).start()
    try:
        (d.inbox() / "f.csv").write_bytes(csv_bytes(1))
        status = d.wait_batch("f.csv")
        doc = d.results("f.csv")["f.csv"]
        assert status["batch"]["status"] == "completed"
        assert doc["attempts"] == 3
        assert status["files"][0]["retry_count"] == 2
        assert doc["result"] == {"attempt": 3}
    finally:
        d.stop()


def test_always_failing_processor_fails_after_retries(tmp_path: Path) -> None:
    """A processor that always raises ends failed with retry_count 3 (4 attempts)."""
    d = DaemonProcess(
        tmp_path, processing={"processor": "batchd.testing.procs:always_fail"}
    ).start()
    try:
        (d.inbox() / "f.csv").write_bytes(csv_bytes(1))
        status = d.wait_batch("f.csv")
        file = status["files"][0]
        assert status["batch"]["status"] == "failed"
        assert file["retry_count"] == 3
        assert file["attempts"] == 4
        assert "always fails" in file["error"]
        assert (d.spool / "failed" / "f.csv" / "f.csv").exists()
        assert d.results("f.csv")["f.csv"]["error"] == file["error"]
    finally:
        d.stop()


def test_permanent_error_skips_retries(tmp_path: Path) -> None:
    """PermanentError fails the file at once, without retry."""
    d = DaemonProcess(
        tmp_path, processing={"processor": "batchd.testing.procs:bad_content"}
    ).start()
    try:
        (d.inbox() / "f.csv").write_bytes(csv_bytes(1))
        file = d.wait_batch("f.csv")["files"][0]
        assert (file["status"], file["attempts"], file["retry_count"]) == ("failed", 1, 0)
        assert file["error"] == "bad content: permanent"
    finally:
        d.stop()


def test_hanging_file_is_killed_at_timeout(tmp_path: Path) -> None:
    """A hung processor is killed at the timeout, fails without retry, and others go on."""
    d = DaemonProcess(
        # 5 s, not less: a fresh worker's first file (imports included) can take
        # over a second on a loaded 2-core machine, and ok.csv must not time out.
        tmp_path,
        processing={"processor": "batchd.testing.procs:by_name", "timeout_seconds": 5.0},
    ).start()
    try:
        drop_folder(
            d.inbox() / "b", {"hang.csv": csv_bytes(1), "ok.csv": csv_bytes(2)}, tmp_path / "st"
        )
        status = d.wait_batch("b", 30)
        files = {f["relpath"]: f for f in status["files"]}
        assert files["hang.csv"]["status"] == "failed"
        assert files["hang.csv"]["error"] == "Processing timeout exceeded"
        assert files["hang.csv"]["attempts"] == 1
        assert files["ok.csv"]["status"] == "completed"
        (d.inbox() / "after.csv").write_bytes(csv_bytes(3))
        assert d.wait_batch("after.csv")["batch"]["status"] == "completed"
    finally:
        d.stop()


def test_worker_exit_and_segfault_are_retried(tmp_path: Path) -> None:
    """A worker that calls os._exit or segfaults costs one attempt and is replaced."""
    d = DaemonProcess(tmp_path, processing={"processor": "batchd.testing.procs:by_name"}).start()
    try:
        drop_folder(
            d.inbox() / "b",
            {"die.csv": csv_bytes(1), "segv.csv": csv_bytes(2), "fine.csv": csv_bytes(3)},
            tmp_path / "st",
        )
        status = d.wait_batch("b", 30)
        files = {f["relpath"]: f for f in status["files"]}
        assert all(f["status"] == "completed" for f in files.values()), files
        assert files["die.csv"]["attempts"] == 2
        assert files["segv.csv"]["attempts"] == 2
        died = d.events("worker_died")
        assert any("status 3" in e["reason"] for e in died)
        assert any("SIGSEGV" in e["reason"] for e in died)
    finally:
        d.stop()


def test_worker_sigkilled_from_outside_is_survived(tmp_path: Path) -> None:
    """A worker SIGKILLed mid-file is replaced and the file completes on retry."""
    d = DaemonProcess(tmp_path, processing={"processor": "batchd.testing.procs:by_name"}).start()
    try:
        (d.inbox() / "victim.csv").write_bytes(csv_bytes(1))
        pid_file = d.state / "running-victim.csv"
        # Not just exists(): the processor creates the file, then writes the pid.
        pid = wait_until(lambda: pid_file.exists() and pid_file.read_text(), what="victim pid")
        os.kill(int(pid), signal.SIGKILL)
        status = d.wait_batch("victim.csv")
        assert status["batch"]["status"] == "completed"
        assert status["files"][0]["attempts"] == 2
    finally:
        d.stop()


def test_too_many_files_rejects_whole_batch(tmp_path: Path) -> None:
    """51 files: the batch is rejected before processing, all 51 inputs in failed/."""
    d = DaemonProcess(tmp_path).start()
    try:
        files = {f"f{i:02}.csv": csv_bytes(i) for i in range(51)}
        drop_folder(d.inbox() / "huge", files, tmp_path / "st")
        status = d.wait_batch("huge")
        assert status["batch"]["status"] == "failed"
        assert "51 files" in status["batch"]["error"]
        assert "max_files_per_batch (50)" in status["batch"]["error"]
        assert all(f["attempts"] == 0 for f in status["files"])
        assert files_under(d.spool / "failed" / "huge") == sorted(files)
        assert len(d.results("huge")) == 51
    finally:
        d.stop()


def test_symlink_is_refused_and_target_never_read(tmp_path: Path) -> None:
    """A symlink to a file outside the spool fails; its content appears nowhere in the spool."""
    secret = tmp_path / "secret.csv"
    secret.write_text("TOP-SECRET-CONTENT,1\n")
    d = DaemonProcess(tmp_path).start()
    try:
        staging = tmp_path / "st" / "withlink"
        staging.mkdir(parents=True)
        (staging / "ok.csv").write_bytes(csv_bytes(1))
        (staging / "leak.csv").symlink_to(secret)
        os.rename(staging, d.inbox() / "withlink")
        status = d.wait_batch("withlink")
        files = {f["relpath"]: f for f in status["files"]}
        assert files["leak.csv"]["status"] == "failed"
        assert "symbolic link" in files["leak.csv"]["error"]
        assert files["ok.csv"]["status"] == "completed"
        for p in d.spool.rglob("*"):
            if p.is_file() and not p.is_symlink() and p.suffix != ".db":
                assert b"TOP-SECRET-CONTENT" not in p.read_bytes(), p
    finally:
        d.stop()


def test_oversize_and_wrong_type_fail_without_retry(tmp_path: Path) -> None:
    """Over-size and wrong-type files fail at once while their siblings complete."""
    d = DaemonProcess(tmp_path, limits={"max_file_bytes": 1000}).start()
    try:
        drop_folder(
            d.inbox() / "mixed",
            {
                "big.csv": b"a,b\n" + b"1,2\n" * 400,
                "fake.pdf": b"this is not a pdf at all\n",
                "good.csv": csv_bytes(1),
            },
            tmp_path / "st",
        )
        status = d.wait_batch("mixed")
        files = {f["relpath"]: f for f in status["files"]}
        assert "max_file_bytes (1000)" in files["big.csv"]["error"]
        assert "not an allowed type" in files["fake.pdf"]["error"]
        assert files["big.csv"]["attempts"] == files["fake.pdf"]["attempts"] == 0
        assert files["good.csv"]["status"] == "completed"
        assert files_under(d.spool / "failed" / "mixed") == ["big.csv", "fake.pdf"]
    finally:
        d.stop()


def test_sigkill_mid_batch_then_restart_finishes_once(tmp_path: Path) -> None:
    """SIGKILL mid-batch and restart: every file once, one batch, nothing left in work/."""
    d = DaemonProcess(tmp_path, processing={"processor": "batchd.testing.procs:sleepy"})
    d.start(BATCHD_TEST_DELAY="0.3")
    files = {f"f{i:02}.csv": csv_bytes(i) for i in range(12)}
    drop_folder(d.inbox() / "job", files, tmp_path / "st")
    wait_until(
        lambda: (
            len((d.state / "order.log").read_text().split()) >= 3
            if (d.state / "order.log").exists()
            else False
        ),
        what="some files done",
    )
    d.kill()
    d.start(BATCHD_TEST_DELAY="0.05")
    try:
        status = d.wait_batch("job", 60)
        assert status["batch"]["status"] == "completed"
        assert sorted(d.results("job")) == sorted(files)
        assert files_under(d.spool / "archive" / "job") == sorted(files)
        assert files_under(d.spool / "work") == []
        with d.db() as conn:
            assert conn.execute("SELECT COUNT(*) FROM batch_jobs").fetchone()[0] == 1
            assert conn.execute("SELECT COUNT(*) FROM batch_files").fetchone()[0] == 12
    finally:
        d.stop()


def test_sigterm_drains_and_restart_completes(tmp_path: Path) -> None:
    """SIGTERM mid-batch exits 0 within the grace period; a restart completes the rest."""
    d = DaemonProcess(
        tmp_path,
        processing={"processor": "batchd.testing.procs:sleepy", "shutdown_grace_seconds": 5},
    )
    d.start(BATCHD_TEST_DELAY="0.5")
    files = {f"f{i:02}.csv": csv_bytes(i) for i in range(10)}
    drop_folder(d.inbox() / "job", files, tmp_path / "st")
    wait_until(
        lambda: (d.status("job") or {}).get("summary", {}).get("processing"), what="files to start"
    )
    started = time.monotonic()
    assert d.stop(timeout=20) == 0
    assert time.monotonic() - started < 5 + 5
    with d.db() as conn:
        stuck = conn.execute("SELECT COUNT(*) FROM batch_files WHERE status='processing'")
        assert stuck.fetchone()[0] == 0
    d.start(BATCHD_TEST_DELAY="0.05")
    try:
        assert d.wait_batch("job", 60)["batch"]["status"] == "completed"
        assert sorted(d.results("job")) == sorted(files)
        assert all(doc["attempts"] == 1 for doc in d.results("job").values())
    finally:
        d.stop()


def test_sigterm_with_short_grace_requeues_running(tmp_path: Path) -> None:
    """A file still running when the grace ends is put back to pending, no attempt spent."""
    d = DaemonProcess(
        tmp_path,
        processing={"processor": "batchd.testing.procs:by_name", "shutdown_grace_seconds": 0.5},
    )
    d.start()
    (d.inbox() / "hang.csv").write_bytes(csv_bytes(1))
    wait_until(
        lambda: (d.status("hang.csv") or {}).get("summary", {}).get("processing"),
        what="hang to start",
    )
    assert d.stop(timeout=20) == 0
    with d.db() as conn:
        row = conn.execute("SELECT status, attempts, retry_count FROM batch_files").fetchone()
    assert tuple(row) == ("pending", 0, 0)
    assert d.events("shutdown_requeued")
