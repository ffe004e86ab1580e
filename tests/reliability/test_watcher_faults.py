"""Watcher faults: an inotify queue overflow, inbox folders deleted under it, polling.

Events only say where to look; the rescan at start and every
``watch.rescan_seconds`` must catch whatever the events lost, and a
replaced or vanished inbox folder must be watched again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import DaemonProcess, csv_bytes, drop_folder, wait_until

from batchd.testing.procs import runs

MAX_QUEUED_EVENTS = Path("/proc/sys/fs/inotify/max_queued_events")
#: The kernel's inotify queue while the burst test's daemon starts: far below the burst.
SMALL_QUEUE = 256


def burst_size(long_run: bool) -> int:
    return 10_000 if long_run else 2_000


@contextlib.contextmanager
def small_inotify_queue() -> Iterator[None]:
    """Lower the inotify queue for instances created inside the block (root only).

    The limit is machine-wide but read when an inotify instance is created,
    so the block is kept to the daemon's start-up and restored at once.
    """
    if os.geteuid() != 0:
        pytest.skip("lowering fs.inotify.max_queued_events needs root")
    try:
        old = MAX_QUEUED_EVENTS.read_text().strip()
        MAX_QUEUED_EVENTS.write_text(str(SMALL_QUEUE))
    except OSError as exc:
        pytest.skip(f"cannot change {MAX_QUEUED_EVENTS}: {exc}")
    try:
        yield
    finally:
        MAX_QUEUED_EVENTS.write_text(old)


def batch_count(d: DaemonProcess) -> int:
    with contextlib.closing(d.db()) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM batch_jobs").fetchone()[0])


def finished_batches(d: DaemonProcess) -> int:
    with contextlib.closing(d.db()) as conn:
        row = conn.execute(
            "SELECT COUNT(*) FROM batch_jobs WHERE status IN ('completed', 'failed')"
        ).fetchone()
    return int(row[0])


def test_inotify_overflow_burst_is_all_picked_up(tmp_path: Path, long_run: bool) -> None:
    """A burst of loose files far past the inotify queue: every file is claimed once (the
    rescan catches what the overflow dropped); the long form also processes every one once."""
    count = burst_size(long_run)
    d = DaemonProcess(
        tmp_path,
        watch={"settle_seconds": 0, "rescan_seconds": 2.0},
        processing={"processor": "batchd.testing.procs:counted", "concurrency": 2},
    )
    with small_inotify_queue():
        d.start()
    try:
        staging = tmp_path / "staging"
        staging.mkdir()
        names = [f"b{i:05}.csv" for i in range(count)]
        for i, name in enumerate(names):
            (staging / name).write_bytes(csv_bytes(i))
        inbox = d.inbox()
        for name in names:  # as fast as rename(2) goes: a burst of IN_MOVED_TO
            os.rename(staging / name, inbox / name)

        wait_until(
            lambda: batch_count(d) >= count and not os.listdir(inbox),
            60 + count * 0.05,
            interval=0.5,
            what=f"{count} drops to be claimed",
        )
        # watchdog's own warning (stderr): the kernel did drop events.
        assert "Inotify queue overflowed" in d.log()
        with contextlib.closing(d.db()) as conn:
            claimed = sorted(r[0] for r in conn.execute("SELECT name FROM batch_jobs"))
        assert claimed == names  # each claimed once, under its own name: none lost, none doubled
        if long_run:
            wait_until(
                lambda: finished_batches(d) >= count,
                60 + count * 0.1,
                interval=1.0,
                what=f"{count} batches to finish",
            )
    finally:
        assert d.stop(120) == 0
    assert [n for n in names if runs(d.state, "done", n) > 1] == []
    with contextlib.closing(d.db()) as conn:
        done = [r[0] for r in conn.execute("SELECT name FROM batch_jobs WHERE status='completed'")]
    for name in done:
        assert (d.spool / "archive" / name / name).is_file(), name
        assert (d.spool / "outbox" / name / "results" / f"{name}.json").is_file(), name
    if long_run:
        assert sorted(done) == names


def test_inbox_folders_deleted_while_running_are_watched_again(tmp_path: Path) -> None:
    """An inbox folder deleted and recreated, and one deleted for good, are watched again:
    drops into both complete with no rescan due for ten minutes."""
    d = DaemonProcess(tmp_path, watch={"settle_seconds": 0.2, "rescan_seconds": 600})
    d.start()
    try:
        (d.inbox() / "before.csv").write_bytes(csv_bytes(1))
        assert d.wait_batch("before.csv")["batch"]["status"] == "completed"

        shutil.rmtree(d.inbox("normal"))
        d.inbox("normal").mkdir()
        shutil.rmtree(d.inbox("high"))
        wait_until(lambda: d.events("watcher_restarted"), 30, what="the watcher to restart")
        wait_until(d.inbox("high").is_dir, 30, what="inbox/high to be recreated")

        (d.inbox("normal") / "after.csv").write_bytes(csv_bytes(2))
        assert d.wait_batch("after.csv")["batch"]["status"] == "completed"
        # The restart's own rescan is long over: this one can only come by an event.
        drop_folder(d.inbox("high") / "urgent", {"u.csv": csv_bytes(3)}, tmp_path / "staging")
        status = d.wait_batch("urgent")
        assert (status["batch"]["status"], status["batch"]["priority"]) == ("completed", "high")
        (d.inbox("normal") / "later.csv").write_bytes(csv_bytes(4))
        assert d.wait_batch("later.csv")["batch"]["status"] == "completed"
    finally:
        assert d.stop(60) == 0


def test_polling_observer_end_to_end(tmp_path: Path) -> None:
    """With ``watch.observer = "polling"`` loose files and folders (settled or with a marker)
    are picked up by polling alone, no rescan due."""
    d = DaemonProcess(
        tmp_path,
        watch={
            "observer": "polling",
            "polling_interval_seconds": 0.2,
            "settle_seconds": 0.3,
            "rescan_seconds": 600,
        },
    )
    d.start()
    try:
        (d.inbox("low") / "loose.csv").write_bytes(csv_bytes(1))
        drop_folder(
            d.inbox() / "settled",
            {"a.csv": csv_bytes(2), "sub/b.csv": csv_bytes(3)},
            tmp_path / "s",
        )
        marked = d.inbox("high") / "marked"
        marked.mkdir()
        (marked / "c.csv").write_bytes(csv_bytes(4))
        (marked / ".ready").touch()
        for name, files in (("loose.csv", 1), ("settled", 2), ("marked", 1)):
            status = d.wait_batch(name)
            assert (status["batch"]["status"], status["batch"]["total_files"]) == (
                "completed",
                files,
            )
        assert sorted(d.results("settled")) == ["a.csv", "sub/b.csv"]
        assert d.events("watcher_restarted") == []
    finally:
        assert d.stop(60) == 0
