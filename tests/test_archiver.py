"""Tests for batchd.archiver: the moves and status writes that follow a commit, on their thread.

Real spool folders under tmp_path, a real SQLite store, the real Archiver thread.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from batchd.archiver import ArchiveFile, Archiver
from batchd.config import Priority, load_settings
from batchd.outbox import Outbox, ResultSyncer
from batchd.records import BatchRow, BatchSnapshot, NewBatch, NewFile, Outcome, Status
from batchd.spool import Spool
from batchd.store import SQLiteStore
from batchd.testing import wait_until

T0 = datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC)
WAIT_SECONDS = 30.0


@dataclass
class World:
    spool: Spool
    store: SQLiteStore
    outbox: Outbox
    archiver: Archiver

    def batch(self, name: str, relpaths: tuple[str, ...] = ("a.csv", "b.csv")) -> BatchRow:
        """A registered batch whose inputs lie in work/normal/<name>/."""
        folder = self.spool.work / "normal" / name
        for rel in relpaths:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(f"id,name\n1,{rel}\n")
        return self.store.register_batch(
            NewBatch(
                name=name,
                priority=Priority.NORMAL,
                user_id="alice",
                work_path=f"work/normal/{name}",
                source=f"inbox/normal/{name}",
                files=tuple(NewFile(rel, 20, None) for rel in relpaths),
            ),
            T0,
        )

    def finish_all(self, batch: BatchRow, status: Status = Status.COMPLETED) -> BatchRow:
        """Claim and finish every file of ``batch`` in the store."""
        last = batch
        while (task := self.store.claim_next(T0)) is not None:
            last = self.store.finish(task.file.id, Outcome(status, error="x"), T0)
        return last

    def settle(self, batch: BatchRow, relpath: str, ok: bool = True) -> ArchiveFile:
        file = next(f for f in self.store.list_files(batch.id) if f.relpath == relpath)
        task = ArchiveFile(file.id, batch.id, batch.work_path, batch.name, relpath, ok)
        self.archiver.archive_file(task)
        return task


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    config = tmp_path / "config.toml"
    config.write_text("")
    settings = load_settings(config, {"BATCHD_SPOOL__ROOT": str(tmp_path / "spool")})
    spool = Spool(settings)
    spool.init()
    store = SQLiteStore(spool.state / "batchd.db")
    outbox = Outbox(spool, store)
    world = World(spool, store, outbox, Archiver(spool, outbox, retry_first_seconds=0.05))
    yield world
    world.archiver.stop()
    store.close()


def test_settled_inputs_go_to_archive_or_failed(world: World) -> None:
    """A completed file's input moves to archive/<batch>/, a failed one's to failed/<batch>/."""
    batch = world.batch("b1")
    world.finish_all(batch)
    world.archiver.start()
    world.settle(batch, "a.csv", ok=True)
    world.settle(batch, "b.csv", ok=False)
    assert world.archiver.wait_idle(WAIT_SECONDS)
    assert (world.spool.archive / "b1" / "a.csv").is_file()
    assert (world.spool.failed / "b1" / "b.csv").is_file()
    assert not (world.spool.work / "normal" / "b1" / "a.csv").exists()


def test_end_batch_clears_work_and_writes_final_status(world: World) -> None:
    """Ending a batch empties work/, and status.json shows the database's final state."""
    batch = world.batch("b2", ("a.csv",))
    final = world.finish_all(batch)
    assert final.status == Status.COMPLETED
    world.archiver.start()
    world.settle(batch, "a.csv")
    world.archiver.end_batch(final)
    assert world.archiver.wait_idle(WAIT_SECONDS)
    assert not (world.spool.work / "normal" / "b2").exists()
    doc = json.loads(world.spool.status_path("b2").read_text())
    assert doc["batch"]["status"] == "completed"
    assert doc["summary"]["completed"] == 1
    assert doc["source"] == "inbox/normal/b2"


def test_touches_holds_until_the_move_is_done(world: World) -> None:
    """touches() is true while a move or batch end is queued, false once it ran."""
    batch = world.batch("b3", ("a.csv",))
    final = world.finish_all(batch)
    task = world.settle(batch, "a.csv")
    world.archiver.end_batch(final)
    assert world.archiver.touches(task.file_id, "some-other-batch")
    assert world.archiver.touches("some-other-file", batch.id)
    assert not world.archiver.touches("some-other-file", "some-other-batch")
    world.archiver.start()
    assert world.archiver.wait_idle(WAIT_SECONDS)
    assert not world.archiver.touches(task.file_id, batch.id)


def test_refresh_requests_for_one_batch_coalesce(world: World) -> None:
    """Refreshing a batch already queued for a refresh queues nothing more."""
    batch = world.batch("b4")
    for _ in range(5):
        world.archiver.refresh(batch.id)
    assert world.archiver.backlog == 1
    world.archiver.start()
    assert world.archiver.wait_idle(WAIT_SECONDS)
    doc = json.loads(world.spool.status_path("b4").read_text())
    assert doc["batch"]["status"] == "pending"


def test_a_failing_task_does_not_stop_the_thread(world: World) -> None:
    """A status write that fails (outbox path blocked by a file) is logged; later work runs."""
    blocked = world.batch("b5", ("a.csv",))
    world.spool.batch_outbox("b5").parent.mkdir(parents=True, exist_ok=True)
    world.spool.batch_outbox("b5").write_text("not a folder")
    other = world.batch("b6", ("a.csv",))
    world.finish_all(other)
    world.archiver.start()
    world.archiver.refresh(blocked.id)
    world.settle(other, "a.csv")
    assert world.archiver.wait_idle(WAIT_SECONDS)
    assert world.archiver.alive()
    assert (world.spool.archive / "b6" / "a.csv").is_file()


def test_stop_finishes_queued_work(world: World) -> None:
    """stop() runs everything already queued before the thread ends."""
    batch = world.batch("b7", ("a.csv", "b.csv", "c.csv"))
    world.finish_all(batch)
    for rel in ("a.csv", "b.csv", "c.csv"):
        world.settle(batch, rel)
    world.archiver.start()
    world.archiver.stop()
    assert not world.archiver.alive()
    assert sorted(p.name for p in (world.spool.archive / "b7").iterdir()) == [
        "a.csv",
        "b.csv",
        "c.csv",
    ]


def test_a_failed_move_is_retried_until_it_succeeds(world: World) -> None:
    """An input that cannot move (archive path blocked) stays in work/ and moves once it can."""
    batch = world.batch("b8", ("a.csv",))
    world.finish_all(batch)
    blocker = world.spool.archive / "b8"
    blocker.write_text("a file where the batch's archive folder should be")
    world.archiver.start()
    world.settle(batch, "a.csv")
    assert world.archiver.wait_idle(WAIT_SECONDS)
    source = world.spool.work / "normal" / "b8" / "a.csv"
    assert source.is_file()
    assert not world.archiver.touches("x", batch.id)
    blocker.unlink()
    deadline = time.monotonic() + WAIT_SECONDS
    while not (world.spool.archive / "b8" / "a.csv").is_file():
        assert time.monotonic() < deadline, "the parked move was never retried"
        time.sleep(0.05)
    assert not source.exists()


def test_a_parked_move_is_dropped_when_the_file_runs_again(world: World) -> None:
    """A retry is skipped once an operator re-queued the file: the scheduler owns it again."""
    batch = world.batch("b9", ("a.csv",))
    world.finish_all(batch, Status.FAILED)
    blocker = world.spool.failed / "b9"
    blocker.write_text("blocks the move to failed/")
    world.archiver.start()
    world.settle(batch, "a.csv", ok=False)
    assert world.archiver.wait_idle(WAIT_SECONDS)
    assert world.store.retry_failed(batch.id) == 1
    blocker.unlink()
    deadline = time.monotonic() + WAIT_SECONDS
    while world.archiver.retries_dropped == 0:
        assert time.monotonic() < deadline, "the parked move was never looked at again"
        time.sleep(0.02)
    assert (world.spool.work / "normal" / "b9" / "a.csv").is_file()
    assert not (world.spool.failed / "b9").exists()


class CountingOutbox(Outbox):
    """The real Outbox, counting the status.json documents it writes, by batch id."""

    def __init__(self, spool: Spool, store: SQLiteStore) -> None:
        super().__init__(spool, store)
        self.written: dict[str, int] = {}

    def write_status(self, batch: BatchRow) -> None:
        super().write_status(batch)
        self.written[batch.id] = self.written.get(batch.id, 0) + 1

    def write_snapshots(
        self, snaps: Sequence[BatchSnapshot], syncer: ResultSyncer
    ) -> dict[str, Exception]:
        errors = super().write_snapshots(snaps, syncer)
        for snap in snaps:
            if snap.batch.id not in errors:
                self.written[snap.batch.id] = self.written.get(snap.batch.id, 0) + 1
        return errors


@pytest.fixture
def counted(world: World) -> Iterator[tuple[World, CountingOutbox]]:
    outbox = CountingOutbox(world.spool, world.store)
    archiver = Archiver(world.spool, outbox, retry_first_seconds=0.05)
    yield World(world.spool, world.store, outbox, archiver), outbox
    archiver.stop()


def test_a_batch_that_ends_before_its_first_status_is_due_gets_one_document(
    counted: tuple[World, CountingOutbox],
) -> None:
    """A one-file batch ending within the hold gets exactly one status.json: the final one."""
    world, outbox = counted
    batch = world.batch("h1", ("a.csv",))
    world.archiver.start()
    world.archiver.first_status(batch.id, 30.0)
    final = world.finish_all(batch)
    world.settle(batch, "a.csv")
    world.archiver.end_batch(final)
    assert world.archiver.wait_idle(WAIT_SECONDS)
    assert outbox.written == {batch.id: 1}
    doc = json.loads(world.spool.status_path("h1").read_text())
    assert doc["batch"]["status"] == "completed"
    assert doc["summary"]["completed"] == 1
    assert doc["source"] == "inbox/normal/h1"


def test_a_waiting_batch_gets_its_first_status_once_the_hold_is_over(
    counted: tuple[World, CountingOutbox],
) -> None:
    """A batch still pending when its hold ends gets its first status.json then, once."""
    world, outbox = counted
    batch = world.batch("h2", ("a.csv",))
    world.archiver.start()
    world.archiver.first_status(batch.id, 0.2)
    world.archiver.first_status(batch.id, 0.2)  # asked twice: still one document
    path = world.spool.status_path("h2")
    wait_until(path.is_file, WAIT_SECONDS, what="the first status.json")
    assert world.archiver.wait_idle(WAIT_SECONDS)
    assert json.loads(path.read_text())["batch"]["status"] == "pending"
    assert outbox.written == {batch.id: 1}
    assert world.archiver.first_statuses_skipped == 0


def test_a_refresh_during_the_hold_replaces_the_first_status(
    counted: tuple[World, CountingOutbox],
) -> None:
    """A change rewritten during the hold is the batch's first document; none follows it."""
    world, outbox = counted
    batch = world.batch("h3", ("a.csv", "b.csv"))
    world.archiver.start()
    world.archiver.first_status(batch.id, 30.0)
    world.archiver.refresh(batch.id)
    assert world.archiver.wait_idle(WAIT_SECONDS)  # the hold is no longer outstanding
    assert outbox.written == {batch.id: 1}


def test_stop_writes_held_first_statuses(counted: tuple[World, CountingOutbox]) -> None:
    """stop() writes a held first status.json at once instead of losing it."""
    world, outbox = counted
    batch = world.batch("h4", ("a.csv",))
    world.archiver.start()
    world.archiver.first_status(batch.id, 3600.0)
    world.archiver.stop()
    assert not world.archiver.alive()
    assert json.loads(world.spool.status_path("h4").read_text())["batch"]["status"] == "pending"
    assert outbox.written == {batch.id: 1}
