"""Worker memory limits and result caps (issue 12 point 4), on a real daemon with real workers."""

from __future__ import annotations

import json
from pathlib import Path

from support import DaemonProcess, csv_bytes, drop_folder

LIMIT_ERROR = "exceeded the worker memory limit of 1024 MiB"


def test_a_document_over_the_default_memory_limit_fails_once_permanently(tmp_path: Path) -> None:
    """A worker hitting the default 1024 MiB limit fails the file at once, not retried."""
    d = DaemonProcess(tmp_path, processing={"processor": "batchd.testing.procs:hog"}).start()
    try:
        (d.inbox() / "bomb.csv").write_bytes(csv_bytes(1))
        status = d.wait_batch("bomb.csv", timeout=60)
        (file,) = status["files"]
        assert file["status"] == "failed"
        assert LIMIT_ERROR in file["error"]
        assert (file["attempts"], file["retry_count"]) == (1, 0)
        assert d.results("bomb.csv")["bomb.csv"]["error"] == file["error"]
    finally:
        d.stop()


def test_a_worker_killed_while_over_the_memory_limit_is_a_permanent_failure(
    tmp_path: Path,
) -> None:
    """SIGKILLed near its limit (an OOM kill), the file fails once with the limit's error."""
    d = DaemonProcess(
        tmp_path, processing={"processor": "batchd.testing.procs:oom_killed", "poll_seconds": 0.1}
    ).start()
    try:
        (d.inbox() / "oom.csv").write_bytes(csv_bytes(1))
        status = d.wait_batch("oom.csv", timeout=60)
        (file,) = status["files"]
        assert file["status"] == "failed"
        assert LIMIT_ERROR in file["error"] and "signal 9" in file["error"]
        assert (file["attempts"], file["retry_count"]) == (1, 0)
    finally:
        d.stop()


def test_a_worker_that_grew_large_is_replaced_after_its_file(tmp_path: Path) -> None:
    """Past worker_recycle_rss_mb after a file, the worker is replaced before the next one."""
    d = DaemonProcess(
        tmp_path,
        processing={
            "processor": "batchd.testing.procs:grow",
            "concurrency": 1,
            "worker_recycle_rss_mb": 100,
        },
    ).start()
    try:
        drop_folder(
            d.inbox() / "two", {"a.csv": csv_bytes(1), "b.csv": csv_bytes(2)}, tmp_path / "st"
        )
        d.wait_batch("two", timeout=60)
        pids = {rel: doc["result"]["pid"] for rel, doc in d.results("two").items()}
        assert pids["a.csv"] != pids["b.csv"]
        assert d.events("worker_recycled")
    finally:
        d.stop()


def test_big_results_stay_whole_in_files_and_bounded_in_status_json(tmp_path: Path) -> None:
    """50 results of ~200 KB: result files whole; DB and status.json carry short summaries."""
    d = DaemonProcess(tmp_path, processing={"processor": "batchd.testing.procs:big_result"}).start()
    try:
        files = {f"f{i:02}.csv": csv_bytes(i) for i in range(50)}
        drop_folder(d.inbox() / "big", files, tmp_path / "st")
        status = d.wait_batch("big", timeout=120)
        assert status["batch"]["status"] == "completed"
        path = d.spool / "outbox" / "big" / "status.json"
        assert path.stat().st_size < 512 * 1024, path.stat().st_size
        for entry in status["files"]:
            summary = json.loads(entry["result"])
            assert summary["truncated"] is True
            assert summary["result_bytes"] > 64 * 1024
            whole = json.loads(Path(summary["result_file"]).read_text())
            assert len(whole["result"]["rows"]) == 2000
        with d.db() as conn:
            longest = conn.execute("SELECT MAX(LENGTH(result)) FROM batch_files").fetchone()[0]
        assert longest < 4096
    finally:
        d.stop()
