"""Unit tests for batchd.chores: the periodic work of the scheduler's turn, on a fake clock.

The scheduler, fake pool, real spool and SQLite store of tests/schedworld.py;
a recording stand-in for the systemd notifier.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from schedworld import DEFAULTS, World, make_world

from batchd.chores import PURGE_INTERVAL_SECONDS, Chores
from batchd.intake import Intake
from batchd.outbox import Outbox
from batchd.records import Outcome, Status


class RecordingNotifier:
    """What Chores asks of batchd.service.Notifier, written down."""

    enabled = True

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.pings = 0
        self.statuses: list[str] = []

    def watchdog_interval(self) -> float:
        return self.interval

    def watchdog(self) -> None:
        self.pings += 1

    def status(self, text: str) -> None:
        self.statuses.append(text)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path, **DEFAULTS)


def make_chores(w: World, retention_days: int = 0) -> Chores:
    settings = w.settings.model_copy(
        update={"retention": w.settings.retention.model_copy(update={"days": retention_days})}
    )
    intake = Intake(settings, w.spool, w.store, Outbox(w.spool, w.store), w.clock)
    return Chores(settings, w.clock, w.spool, w.store, intake, w.scheduler, w.pool)


def test_purge_runs_off_the_scheduler_thread_once_per_interval(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With retention.days set, the first tick purges old batches on the batchd-purge thread;
    the next purge waits PURGE_INTERVAL_SECONDS on the clock."""
    w = world
    batch = w.batch("old.csv", ("a.csv",))
    task = w.store.claim_next(w.clock.now())
    assert task is not None
    w.store.finish(task.file.id, Outcome(Status.COMPLETED), w.clock.now())
    w.clock.advance(3 * 86400)
    threads: list[str] = []
    delete = w.store.delete_batch

    def recording_delete(batch_id: str) -> None:
        threads.append(threading.current_thread().name)
        delete(batch_id)

    monkeypatch.setattr(w.store, "delete_batch", recording_delete)
    chores = make_chores(w, retention_days=1)
    chores.tick()
    chores.stop()  # waits for the purge thread
    assert threads == ["batchd-purge"]
    assert w.store.get_batch(batch.id) is None
    purges: list[object] = []
    monkeypatch.setattr("batchd.retention.purge", lambda *args: purges.append(args))
    chores.tick()
    w.clock.advance(PURGE_INTERVAL_SECONDS - 1)
    chores.tick()
    chores.stop()
    assert purges == []
    w.clock.advance(1)
    chores.tick()
    chores.stop()
    assert len(purges) == 1


def test_no_purge_without_retention_days(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """retention.days = 0 never starts a purge."""
    purges: list[object] = []
    monkeypatch.setattr("batchd.retention.purge", lambda *args: purges.append(args))
    chores = make_chores(world)
    chores.tick()
    chores.stop()
    assert purges == []


def test_watchdog_pings_on_its_interval_only_while_the_parts_live(world: World) -> None:
    """The watchdog ping follows the notifier's interval on the clock, wakes the loop for
    the next one, and is withheld while the watcher thread is dead."""
    w = world
    chores = make_chores(w)
    notifier = RecordingNotifier(interval=10.0)
    chores.notifier = notifier
    alive = [True]
    chores.watcher_alive = lambda: alive[0]
    chores.tick()
    assert notifier.pings == 1
    assert w.scheduler.tick_by == w.clock.monotonic() + 10.0
    w.clock.advance(9.0)
    chores.tick()
    assert notifier.pings == 1
    w.clock.advance(1.0)
    chores.tick()
    assert notifier.pings == 2
    alive[0] = False
    w.clock.advance(10.0)
    chores.tick()
    assert notifier.pings == 2
    assert notifier.statuses[0] == "0 pending, 0 processing, 0 files/min"


def test_deferred_registrations_wait_for_the_database(world: World) -> None:
    """A registration deferred while the database was away is retried only once it answers."""
    w = world
    chores = make_chores(w)
    calls: list[int] = []
    chores.intake._deferred.append(object())  # a claim whose registration failed

    def retry() -> int:
        calls.append(1)
        chores.intake._deferred.clear()
        return 1

    chores.intake.retry_deferred = retry
    w.scheduler.outcomes.db_error = "database is away"
    chores.tick()
    assert calls == []
    w.scheduler.outcomes.db_error = None
    chores.tick()
    assert calls == [1]
    chores.tick()
    assert calls == [1]  # nothing deferred any more
