"""Tests for batchd.intake: several ready drops registered together (issue 15).

A real spool under tmp_path and a real SQLite store; the store subclass only
counts which registration method was called.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from batchd.clock import SystemClock
from batchd.config import Priority, Settings, load_settings
from batchd.errors import StoreError
from batchd.intake import REGISTER_GROUP_MAX, Intake
from batchd.outbox import Outbox
from batchd.records import BatchRow, NewBatch, Status
from batchd.spool import Spool
from batchd.store import SQLiteStore


class CountingStore(SQLiteStore):
    """The real SQLite store, counting registration calls (and failing groups on request)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.singles = 0
        self.groups: list[int] = []
        self.fail_groups = False

    def register_batch(self, batch: NewBatch, now: datetime) -> BatchRow:
        self.singles += 1
        return super().register_batch(batch, now)

    def register_batches(self, batches: Sequence[NewBatch], now: datetime) -> list[BatchRow]:
        self.groups.append(len(batches))
        if self.fail_groups:
            raise StoreError("the group's transaction failed (test)")
        return super().register_batches(batches, now)


class World:
    def __init__(self, tmp_path: Path) -> None:
        config = tmp_path / "config.toml"
        config.write_text("")
        self.settings: Settings = load_settings(
            config, {"BATCHD_SPOOL__ROOT": str(tmp_path / "spool")}
        )
        self.spool = Spool(self.settings)
        self.spool.init()
        self.store = CountingStore(self.spool.state / "batchd.db")
        self.registered: list[str] = []
        self.intake = Intake(
            self.settings,
            self.spool,
            self.store,
            Outbox(self.spool, self.store),
            SystemClock(),
            on_registered=lambda batch: self.registered.append(batch.name),
        )

    def drop(self, name: str, priority: Priority = Priority.NORMAL) -> tuple[Path, Priority]:
        path = self.spool.inbox_for(priority) / name
        path.write_text("id,name\n1,x\n")
        return path, priority


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.store.close()


def test_ready_drops_are_registered_in_one_transaction(world: World) -> None:
    """Three loose drops ready at once: claimed one by one, registered by one store call, FIFO."""
    drops = [world.drop(f"f{i}.csv") for i in range(3)]
    answers = world.intake.take_drops(drops)
    assert all(isinstance(a, BatchRow) for a in answers)
    assert (world.store.groups, world.store.singles) == ([3], 0)
    assert [b.name for b in reversed(world.store.list_batches())] == ["f0.csv", "f1.csv", "f2.csv"]
    assert world.registered == ["f0.csv", "f1.csv", "f2.csv"]
    for i in range(3):
        assert (world.spool.work / "normal" / f"f{i}.csv" / f"f{i}.csv").is_file()
        assert not drops[i][0].exists()
    task = world.store.claim_next(SystemClock().now())
    assert task is not None and task.batch_name == "f0.csv"


def test_a_large_burst_is_registered_in_bounded_groups(world: World) -> None:
    """More ready drops than REGISTER_GROUP_MAX: several transactions, none over the cap."""
    drops = [world.drop(f"g{i:03}.csv") for i in range(REGISTER_GROUP_MAX + 3)]
    answers = world.intake.take_drops(drops)
    assert all(isinstance(a, BatchRow) for a in answers)
    assert world.store.groups == [REGISTER_GROUP_MAX, 3]
    assert len(world.store.list_batches(limit=1000)) == REGISTER_GROUP_MAX + 3


def test_a_vanished_drop_does_not_stop_the_others(world: World) -> None:
    """A drop gone before its claim answers None; the rest of the group is registered."""
    drops = [world.drop("a.csv"), world.drop("gone.csv"), world.drop("b.csv")]
    drops[1][0].unlink()
    answers = world.intake.take_drops(drops)
    assert answers[1] is None
    assert [a.name for a in answers if isinstance(a, BatchRow)] == ["a.csv", "b.csv"]
    assert world.store.groups == [2]


def test_a_group_that_fails_is_registered_one_by_one(world: World) -> None:
    """When the group's transaction fails, each claim is registered on its own; none is lost."""
    world.store.fail_groups = True
    drops = [world.drop("x.csv", Priority.HIGH), world.drop("y.csv")]
    answers = world.intake.take_drops(drops)
    assert [a.name for a in answers if isinstance(a, BatchRow)] == ["x.csv", "y.csv"]
    assert (world.store.groups, world.store.singles) == ([2], 2)
    assert {b.name: b.status for b in world.store.list_batches()} == {
        "x.csv": Status.PENDING,
        "y.csv": Status.PENDING,
    }
    assert world.intake.deferred == 0


def test_group_registration_writes_each_batchs_first_status(world: World) -> None:
    """Registered in a group, each batch still gets its documents (here written at once)."""
    answers = world.intake.take_drops([world.drop("s1.csv"), world.drop("s2.csv")])
    for answer in answers:
        assert isinstance(answer, BatchRow)
        doc = json.loads(world.spool.status_path(answer.name).read_text())
        assert (doc["batch"]["name"], doc["batch"]["status"]) == (answer.name, "pending")


def test_names_are_repaired_only_when_one_is_not_utf8(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drop whose names are all text is walked once; one holding a name that
    is not UTF-8 (a Latin-1 file name, here deep in a folder and loose) has it
    renamed to its printable form and is registered under that name."""
    import os

    repairs: list[str] = []
    real_repair = world.spool.repair_names

    def counting_repair(folder: Path) -> list[str]:
        repairs.append(folder.name)
        return real_repair(folder)

    monkeypatch.setattr(world.spool, "repair_names", counting_repair)
    inbox = world.spool.inbox_for(Priority.NORMAL)
    plain = inbox / "plain"
    (plain / "sub").mkdir(parents=True)
    (plain / "sub" / "a.csv").write_text("id\n1\n")
    latin = inbox / "latin"
    (latin / "sub").mkdir(parents=True)
    (latin / "sub" / os.fsdecode(b"caf\xe9.csv")).write_text("id\n1\n")
    (latin / "b.csv").write_text("id\n1\n")
    loose = inbox / os.fsdecode(b"men\xfc.csv")
    loose.write_text("id\n1\n")
    # Names that are not members are repaired too: an ignored temporary
    # name and an empty subfolder.
    others = inbox / "others"
    (others / os.fsdecode(b"vac\xeda")).mkdir(parents=True)
    (others / os.fsdecode(b"~$caf\xe9.xlsx")).write_bytes(b"lock")
    (others / "c.csv").write_text("id\n1\n")
    answers = world.intake.take_drops([(p, Priority.NORMAL) for p in (plain, latin, loose, others)])
    assert all(isinstance(a, BatchRow) for a in answers), answers
    assert repairs == ["latin", "men\\xfc.csv", "others"]
    assert sorted(os.listdir(world.spool.work / "normal" / "others")) == [
        "c.csv",
        "vac\\xeda",
        "~$caf\\xe9.xlsx",
    ]
    by_name = {b.name: b for b in world.store.list_batches()}
    assert set(by_name) == {"plain", "latin", "men\\xfc.csv", "others"}
    relpaths = {
        name: sorted(f.relpath for f in world.store.list_files(batch.id))
        for name, batch in by_name.items()
    }
    assert relpaths == {
        "plain": ["sub/a.csv"],
        "latin": ["b.csv", "sub/caf\\xe9.csv"],
        "men\\xfc.csv": ["men\\xfc.csv"],
        "others": ["c.csv"],
    }
    assert (world.spool.work / "normal" / "latin" / "sub" / "caf\\xe9.csv").is_file()
