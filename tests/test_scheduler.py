"""Unit tests for batchd.scheduler: the loop (dispatch, timers, drain on stop).

A fake clock and a fake pool (tests/schedworld.py) over a real spool and a
real SQLite store; each test drives ``Scheduler.turn()`` or ``run()`` itself.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from schedworld import DEFAULTS, World, make_world
from structlog.testing import capture_logs

from batchd.config import Priority
from batchd.records import Status
from batchd.testing.wait import wait_until


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path, **DEFAULTS)


@pytest.fixture
def one_worker(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path, concurrency=1)


def test_dispatch_takes_high_before_normal_before_low(one_worker: World) -> None:
    """With one worker, files start by priority (high, normal, low), whatever their order."""
    w = one_worker
    w.batch("low.csv", ("l.csv",), Priority.LOW)
    w.batch("normal.csv", ("n.csv",), Priority.NORMAL)
    w.batch("high.csv", ("h.csv",), Priority.HIGH)
    order = []
    for _ in range(3):
        w.turn()
        (job,) = w.pool.jobs.values()
        order.append(job.relpath)
        w.pool.done(job.relpath)
        w.turn()  # records it; the freed worker takes the next file in this turn
    assert order[0] == "h.csv"
    assert [j.relpath for j in w.pool.submitted] == ["h.csv", "n.csv", "l.csv"]


def test_dispatch_is_fifo_within_a_priority(one_worker: World) -> None:
    """Within one priority, the batch registered first starts first, and its files in order."""
    w = one_worker
    w.batch("first", ("a.csv", "b.csv"))
    w.batch("second", ("c.csv",))
    for _ in range(3):
        w.turn()
        (job,) = w.pool.jobs.values()
        w.pool.done(job.relpath)
    w.turn()
    assert [j.relpath for j in w.pool.submitted] == ["a.csv", "b.csv", "c.csv"]


def test_concurrency_caps_the_files_processing(world: World) -> None:
    """With processing.concurrency = 2, five pending files put exactly two in processing."""
    w = world
    batch = w.batch("five", tuple(f"{i}.csv" for i in range(5)))
    w.turn(3)
    assert len(w.pool.submitted) == 2
    assert w.store.queue_counts()["processing"] == 2
    w.pool.done(w.pool.submitted[0].relpath)
    w.turn()
    assert len(w.pool.submitted) == 3  # one finished, one more started
    statuses = sorted(str(f.status) for f in w.store.list_files(batch.id))
    assert statuses == ["completed", "pending", "pending", "processing", "processing"]


def test_a_raised_concurrency_fills_the_new_workers(one_worker: World) -> None:
    """reconfigure() with a higher concurrency starts more files at the next turn."""
    w = one_worker
    w.batch("three", ("a.csv", "b.csv", "c.csv"))
    w.turn()
    assert len(w.pool.jobs) == 1
    settings = w.settings.model_copy(
        update={"processing": w.settings.processing.model_copy(update={"concurrency": 3})}
    )
    w.scheduler.reconfigure(settings)
    w.turn()
    assert len(w.pool.jobs) == 3


def test_nothing_starts_while_a_retry_waits_for_its_back_off(world: World) -> None:
    """A failed attempt's file starts again only once its back-off has passed on the clock."""
    w = world
    w.batch("b", ("a.csv",))
    w.turn()
    w.pool.failed("a.csv")
    w.turn()
    assert w.pool.jobs == {}
    w.clock.advance(1.5)  # backoff for retry 1 is 2 s
    w.turn()
    assert w.pool.jobs == {}
    w.clock.advance(1.0)
    w.turn()
    assert [j.relpath for j in w.pool.jobs.values()] == ["a.csv"]


def test_stop_drains_running_files_then_requeues_the_rest(tmp_path: Path) -> None:
    """On stop, an outcome that arrives within the grace is recorded; a file still running
    when the grace ends goes back to pending, and the pool is stopped."""
    for w in make_world(tmp_path, start_archiver=False, concurrency=2, shutdown_grace_seconds=5.0):
        batch = w.batch("b", ("a.csv", "b.csv"))
        w.turn()
        assert len(w.pool.jobs) == 2
        w.pool.done("a.csv")  # arrives during the drain
        w.scheduler.request_stop()
        start = w.clock.monotonic()
        with capture_logs() as logs:
            w.scheduler.run()
        assert w.clock.monotonic() - start >= 5.0  # waited the grace out for b.csv
        assert w.stopped == [False]
        assert w.file(batch, "a.csv").status == Status.COMPLETED
        b = w.file(batch, "b.csv")
        assert b.status == Status.PENDING
        assert b.attempts == 0  # a drained attempt is not spent
        assert w.pool.stopped
        assert {"event": "shutdown_requeued", "files": 1, "log_level": "warning"} in logs


def test_forced_stop_cuts_the_drain_short(tmp_path: Path) -> None:
    """A second stop signal ends the drain at once: the running file is requeued early."""
    for w in make_world(tmp_path, start_archiver=False, shutdown_grace_seconds=600.0):
        batch = w.batch("b", ("a.csv",))
        w.turn()
        w.scheduler.signal_stop()
        w.scheduler.signal_stop(force=True)
        start = w.clock.monotonic()
        w.scheduler.run()
        assert w.clock.monotonic() - start < 600.0
        assert w.stopped == [False, True]
        assert w.file(batch, "a.csv").status == Status.PENDING


def test_no_dispatch_after_stop(world: World) -> None:
    """Once a stop is asked for, a pending file is not started."""
    w = world
    w.batch("b", ("a.csv",))
    w.scheduler.request_stop()
    w.turn()
    assert w.pool.submitted == []


def test_a_held_first_status_does_not_stall_a_start_waiting_for_its_files_move(
    world: World,
) -> None:
    """A file re-queued while its input's move is queued starts once that move is done,
    not once every new batch's held first status.json is written too (the loop stalled)."""
    w = world
    batch = w.batch("b", ("a.csv",))
    w.turn()
    gate = threading.Event()
    archiver = w.scheduler.archiver
    real_archive = archiver._archive

    def slow_archive(task: Any) -> bool:
        assert gate.wait(timeout=60)
        return real_archive(task)

    archiver._archive = slow_archive  # type: ignore[method-assign]
    w.pool.failed("a.csv", permanent=True)
    w.turn()  # recorded: the move of a.csv to failed/ waits in the archiver
    assert w.store.retry_failed(batch.id) == 1  # an operator's retry right after
    held = w.batch("new", ("n.csv",))
    archiver.first_status(held.id, 3600.0)  # a batch just registered: its document held
    turn = threading.Thread(target=w.turn, daemon=True)
    turn.start()
    gate.set()
    wait_until(lambda: not turn.is_alive(), 30, what="the turn to start the re-queued file")
    assert "a.csv" in {j.relpath for j in w.pool.jobs.values()}


def test_wakes_are_coalesced_into_one_byte_until_the_loop_reads_it(world: World) -> None:
    """Intake wakes the loop once per registered batch; while a wake byte is
    unread, more wakes send nothing. Once the loop has read it, the next wake
    sends again, so a wake-up is never lost."""
    import select

    sched = world.scheduler
    wake_r = sched._wake_r

    def unread() -> int:
        n = 0
        while select.select([wake_r], [], [], 0)[0]:
            n += len(wake_r.recv(4096))
        return n

    for _ in range(64):
        sched.wake()
    assert select.select([wake_r], [], [], 0)[0]
    sched._drain_wakes()
    assert unread() == 0
    sched.wake()
    sched.wake()
    assert unread() == 1
    # Only the loop's own read re-arms the wake: a byte read here (by the
    # test, not the loop) leaves wakes pending until the loop has read.
    sched.wake()
    assert unread() == 0
    sched._drain_wakes()
    sched.wake()
    assert unread() == 1
