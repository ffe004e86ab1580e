"""End to end: workers claim their next file themselves, within the concurrency bound."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path

from support import DaemonProcess, csv_bytes, drop_folder, files_under

FILES = 48  # limits.max_files_per_batch is 50
CONCURRENCY = 2


def test_workers_claim_their_next_files_and_never_exceed_the_concurrency(
    tmp_path: Path,
) -> None:
    """48 files with 2 workers: most are claimed by the workers themselves (the rows
    name their claimant), never more than 2 are processing (sampled all along), and
    every file completes once, on its first attempt."""
    d = DaemonProcess(
        tmp_path,
        processing={"processor": "batchd.testing.procs:sleepy", "concurrency": CONCURRENCY},
    )
    d.start(BATCHD_TEST_DELAY="0.01")
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        with contextlib.closing(d.db()) as conn:
            while not done.wait(0.002):
                with contextlib.suppress(sqlite3.OperationalError):
                    row = conn.execute(
                        "SELECT COUNT(*) FROM batch_files WHERE status = 'processing'"
                    ).fetchone()
                    samples.append(int(row[0]))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        files = {f"m{i:03}.csv": csv_bytes(i) for i in range(FILES)}
        drop_folder(d.inbox("normal") / "menus", files, tmp_path / "staging")
        status = d.wait_batch("menus", 60)
    finally:
        done.set()
        sampler.join()
        assert d.stop() == 0
    assert status["summary"]["completed"] == FILES, status
    assert max(samples) <= CONCURRENCY, f"more than {CONCURRENCY} processing: {max(samples)}"
    assert len(samples) > 10 and max(samples) >= 1
    with contextlib.closing(d.db()) as conn:
        rows = conn.execute("SELECT status, attempts, claimant FROM batch_files").fetchall()
    assert {(r["status"], r["attempts"]) for r in rows} == {("completed", 1)}
    by_workers = sum(1 for r in rows if r["claimant"] is not None)
    # The daemon claims the first file of each worker, and again whenever a
    # worker's permit was withheld a moment (an outcome waiting to commit).
    assert by_workers >= FILES // 2, f"only {by_workers} of {FILES} claimed by the workers"
    assert len({r["claimant"] for r in rows if r["claimant"]}) <= CONCURRENCY
    assert files_under(d.spool / "archive" / "menus") == sorted(files)


def test_a_worker_killed_right_after_its_own_claim_loses_nothing(tmp_path: Path) -> None:
    """Every worker dies right after committing its own claim of a next file (from the
    third on), the daemon living on: each such file is found by the worker's token and
    retried, and every file completes exactly once."""
    d = DaemonProcess(
        tmp_path,
        processing={
            "processor": "batchd.testing.procs:sleepy",
            "concurrency": CONCURRENCY,
            "max_retries": 3,
        },
    )
    d.start(
        BATCHD_TEST_DELAY="0.01",
        BATCHD_CRASH_AT="after_worker_claim",
        BATCHD_CRASH_AFTER="2",
        BATCHD_CRASH_WORKER_ALONE="1",
    )
    try:
        files = {f"k{i:02}.csv": csv_bytes(i) for i in range(12)}
        drop_folder(d.inbox("normal") / "kills", files, tmp_path / "staging")
        status = d.wait_batch("kills", 60)
    finally:
        assert d.stop() == 0
    assert status["summary"]["completed"] == len(files), status
    with contextlib.closing(d.db()) as conn:
        rows = conn.execute("SELECT relpath, status, error FROM batch_files").fetchall()
    assert {r["status"] for r in rows} == {"completed"}
    log = d.log()
    lost = log.count('"worker_claim_lost"')
    assert lost >= 1, log[-3000:]
    assert log.count('"worker_died"') >= lost
    assert files_under(d.spool / "archive" / "kills") == sorted(files)
    outbox = d.results("kills")
    assert sorted(outbox) == sorted(files)
    assert sum(1 for doc in outbox.values() if doc["attempts"] == 2) == lost
