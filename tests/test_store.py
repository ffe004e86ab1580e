"""Tests for batchd.store: the store contract, run against SQLiteStore.

:class:`StoreContract` holds every behaviour the daemon relies on and only
talks to the store through its methods; another implementation reuses it by
subclassing and providing a ``store`` fixture. :class:`TestSQLiteStore` adds
what is specific to SQLite: pragmas, the schema of SPEC §5, and the operator
SQL run from a separate connection.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from batchd.config import Priority
from batchd.errors import AlreadyRegistered, NameTaken, StoreError
from batchd.records import BatchRow, FileTask, NewBatch, NewFile, Outcome, Status
from batchd.store.sqlite import SCHEMA_VERSION, SQLiteStore

T0 = datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC)
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
HOUR = timedelta(hours=1)


def at(seconds: float) -> datetime:
    """T0 plus ``seconds``."""
    return T0 + timedelta(seconds=seconds)


def new_batch(
    name: str,
    relpaths: tuple[str, ...] = ("a.csv",),
    priority: Priority = Priority.NORMAL,
    user_id: str | None = "alice",
    errors: dict[str, str] | None = None,
    batch_error: str | None = None,
) -> NewBatch:
    errors = errors or {}
    return NewBatch(
        name=name,
        priority=priority,
        user_id=user_id,
        work_path=f"work/{priority.value}/{name}",
        source=f"inbox/{priority.value}/{name}",
        files=tuple(NewFile(rel, 100 + i, errors.get(rel)) for i, rel in enumerate(relpaths)),
        error=batch_error,
    )


def completed(**extra: Any) -> Outcome:
    return Outcome(
        Status.COMPLETED,
        result={"ok": True},
        file_hash="sha256:" + "0" * 64,
        file_size=123,
        processor="noop",
        **extra,
    )


FAILED = Outcome(Status.FAILED, error="RuntimeError: boom", processor="noop")


def failed_by(task: FileTask) -> Outcome:
    """FAILED, as the attempt ``task`` reports it (with its fencing token)."""
    return Outcome(Status.FAILED, error="boom", processor="noop", lease=task.file.lease_gen)


def operator_queue(store: Any) -> None:
    """What the SPEC §5 operator SELECTs are run against: batch b1 (one file
    failed after a retry, two pending) and b2 (refused whole)."""
    store.register_batch(new_batch("b1", ("a", "b", "c")), at(0))
    store.register_batch(new_batch("b2", ("a",), batch_error="too many"), at(1))
    task = store.claim_next(at(2))
    assert task is not None
    store.retry_later(task.file.id, "boom", at(2))
    task = store.claim_next(at(2))
    assert task is not None
    store.finish(task.file.id, FAILED, at(3))


class StoreContract:
    """Behaviour every store must have. Subclasses provide the ``store`` fixture."""

    @pytest.fixture
    def store(self) -> Iterator[Any]:
        raise NotImplementedError("a store implementation's test class provides this")

    # -- helpers ---------------------------------------------------------------

    def register(self, store: Any, *args: Any, now: datetime = T0, **kwargs: Any) -> BatchRow:
        batch: BatchRow = store.register_batch(new_batch(*args, **kwargs), now)
        return batch

    def claim(self, store: Any, now: datetime = T0) -> FileTask:
        task = store.claim_next(now)
        assert task is not None
        return task

    def file_ids(self, store: Any, batch: BatchRow) -> list[str]:
        return [f.id for f in store.list_files(batch.id)]

    def drain(self, store: Any, now: datetime = T0) -> list[str]:
        """Claim until nothing is due; the claimed files' relpaths in order."""
        out = []
        while (task := store.claim_next(now)) is not None:
            out.append(f"{task.batch_name}/{task.file.relpath}")
        return out

    # -- registration ------------------------------------------------------------

    def test_register_returns_pending_batch_with_counters(self, store: Any) -> None:
        """A fresh batch is pending, counts its files and names its owner."""
        batch = self.register(store, "b1", ("a.csv", "sub/b.pdf"), Priority.HIGH, "bob")
        assert (batch.status, batch.total_files, batch.processed_files, batch.failed_files) == (
            Status.PENDING,
            2,
            0,
            0,
        )
        assert (batch.name, batch.user_id, batch.priority) == ("b1", "bob", Priority.HIGH)
        assert (batch.work_path, batch.source) == ("work/high/b1", "inbox/high/b1")
        assert batch.started_at is None
        assert batch.completed_at is None
        assert store.get_batch(batch.id) == batch

    def test_register_stores_every_member(self, store: Any) -> None:
        """Each NewFile becomes a pending file row with its relpath, name and size."""
        batch = self.register(store, "b1", ("a.csv", "sub/b.pdf"))
        files = store.list_files(batch.id)
        assert [(f.relpath, f.filename, f.file_size, f.status) for f in files] == [
            ("a.csv", "a.csv", 100, Status.PENDING),
            ("sub/b.pdf", "b.pdf", 101, Status.PENDING),
        ]
        assert all(
            (f.batch_id, f.retry_count, f.attempts, f.progress) == (batch.id, 0, 0, 0)
            for f in files
        )

    def test_register_batches_registers_several_in_order(self, store: Any) -> None:
        """Several batches registered in one call are each as register_batch makes them, FIFO."""
        rows = store.register_batches(
            [new_batch("l1"), new_batch("l2", ("x.csv", "y.csv")), new_batch("l3")], T0
        )
        assert [(r.name, r.status, r.total_files) for r in rows] == [
            ("l1", Status.PENDING, 1),
            ("l2", Status.PENDING, 2),
            ("l3", Status.PENDING, 1),
        ]
        assert [store.get_batch(r.id) for r in rows] == rows
        assert self.drain(store) == ["l1/a.csv", "l2/x.csv", "l2/y.csv", "l3/a.csv"]
        assert store.register_batches([], T0) == []

    def test_register_batches_is_all_or_nothing(self, store: Any) -> None:
        """One batch of a group failing its checks rolls back the whole group."""
        self.register(store, "taken")
        with pytest.raises(NameTaken):
            store.register_batches(
                [new_batch("m1"), new_batch("taken", priority=Priority.HIGH), new_batch("m2")], T0
            )
        assert [b.name for b in store.list_batches()] == ["taken"]
        with pytest.raises(AlreadyRegistered):
            store.register_batches([new_batch("m3"), new_batch("taken")], T0)
        assert [b.name for b in store.list_batches()] == ["taken"]
        rows = store.register_batches([new_batch("m1"), new_batch("m2")], T0)
        assert [r.name for r in rows] == ["m1", "m2"]

    def test_refused_member_is_registered_failed(self, store: Any) -> None:
        """A member with an error is failed at once; the rest stay pending."""
        batch = self.register(
            store, "b1", ("bad.pdf", "good.csv"), errors={"bad.pdf": "not an allowed type"}
        )
        files = {f.relpath: f for f in store.list_files(batch.id)}
        assert files["bad.pdf"].status == Status.FAILED
        assert files["bad.pdf"].error == "not an allowed type"
        assert files["bad.pdf"].completed_at is not None
        assert files["good.csv"].status == Status.PENDING
        assert (batch.status, batch.failed_files) == (Status.PROCESSING, 1)
        assert self.claim(store).file.relpath == "good.csv"
        assert store.claim_next(T0) is None

    def test_batch_error_fails_every_file_and_the_batch(self, store: Any) -> None:
        """A rejected batch (too many files) is failed with all its files, none claimable."""
        batch = self.register(
            store, "big", ("a.csv", "b.csv", "c.csv"), batch_error="51 files, over 50"
        )
        assert batch.status == Status.FAILED
        assert batch.error == "51 files, over 50"
        assert (batch.total_files, batch.failed_files, batch.processed_files) == (3, 3, 0)
        assert batch.completed_at is not None
        assert {(f.status, f.error) for f in store.list_files(batch.id)} == {
            (Status.FAILED, "51 files, over 50")
        }
        assert store.claim_next(T0) is None

    def test_failed_registration_leaves_nothing(self, store: Any) -> None:
        """A registration that fails half-way (duplicate relpath) stores no batch and no file."""
        with pytest.raises(Exception):  # noqa: B017 - the driver's error type is the store's business
            store.register_batch(new_batch("dup", ("a.csv", "a.csv")), T0)
        assert store.list_batches() == []
        assert store.queue_counts() == {s.value: 0 for s in Status}
        assert not store.name_taken("dup")

    def test_failed_registration_raises_store_error(self, store: Any) -> None:
        """A refused registration raises StoreError, not a driver exception."""
        self.register(store, "same")
        with pytest.raises(StoreError):
            store.register_batch(new_batch("same"), T0)

    def test_name_taken_and_lookups(self, store: Any) -> None:
        """A batch is found by id, by name and by work path; its name counts as taken."""
        batch = self.register(store, "b1")
        assert store.name_taken("b1")
        assert not store.name_taken("b2")
        assert store.find_batch("b1") == batch
        assert store.find_batch(batch.id) == batch
        assert store.batch_by_work_path("work/normal/b1") == batch
        assert store.batch_by_work_path("work/normal/zzz") is None
        assert store.get_batch("no-such-id") is None

    def test_find_batch_version_names_the_row_find_batch_returns(self, store: Any) -> None:
        """find_batch_version gives the id, version and status of find_batch's row, by id or
        name, and follows the batch's changes (a claim makes it processing, a newer version)."""
        batch = self.register(store, "v1")
        expected = (batch.id, batch.version, Status.PENDING)
        assert store.find_batch_version("v1") == store.find_batch_version(batch.id) == expected
        assert store.find_batch_version("no-such-batch") is None
        assert store.claim_next(T0) is not None
        now = store.find_batch(batch.id)
        assert now.status == Status.PROCESSING and now.version > batch.version
        assert store.find_batch_version("v1") == (batch.id, now.version, Status.PROCESSING)

    def test_batch_ids_with_prefix(self, store: Any) -> None:
        """Batch ids are found by their first characters; LIKE wildcards match literally."""
        one = self.register(store, "p1")
        two = self.register(store, "p2")
        assert store.batch_ids_with_prefix(one.id[:8]) == [one.id]
        assert sorted(store.batch_ids_with_prefix("", limit=5)) == sorted([one.id, two.id])
        assert store.batch_ids_with_prefix("%") == []
        assert store.batch_ids_with_prefix("_") == []
        assert store.batch_ids_with_prefix("zzzz") == []

    # -- claiming ------------------------------------------------------------------

    def test_claim_next_returns_none_when_empty(self, store: Any) -> None:
        """claim_next on an empty queue answers None."""
        assert store.claim_next(T0) is None

    def test_claim_marks_file_processing(self, store: Any) -> None:
        """A claimed file is processing, started, one attempt spent, batch processing."""
        batch = self.register(store, "b1")
        task = self.claim(store, at(5))
        assert (task.batch_name, task.work_path, task.priority) == (
            "b1",
            "work/normal/b1",
            Priority.NORMAL,
        )
        assert (task.file.status, task.file.attempts, task.file.progress) == (
            Status.PROCESSING,
            1,
            0,
        )
        assert task.file.started_at == "2026-11-28T10:00:05.000Z"
        refreshed = store.get_batch(batch.id)
        assert refreshed.status == Status.PROCESSING
        assert refreshed.started_at == "2026-11-28T10:00:05.000Z"
        assert store.claim_next(at(5)) is None

    def test_claiming_a_pending_batchs_files_keeps_its_row_right(self, store: Any) -> None:
        """The first claim starts a pending batch (counters, version, started_at); later
        claims and a finish leave it derived from its files as before."""
        batch = self.register(store, "p1", ("a.csv", "b.csv"))
        first = self.claim(store, at(1))
        started = store.get_batch(batch.id)
        assert (started.status, started.started_at, started.completed_at) == (
            Status.PROCESSING,
            "2026-11-28T10:00:01.000Z",
            None,
        )
        assert (started.total_files, started.processed_files, started.failed_files) == (2, 0, 0)
        assert started.version > batch.version
        store.finish(first.file.id, completed(), at(2))
        self.claim(store, at(3))
        again = store.get_batch(batch.id)
        assert (again.status, again.started_at, again.processed_files) == (
            Status.PROCESSING,
            "2026-11-28T10:00:01.000Z",
            1,
        )

    def test_claim_order_priority_then_fifo(self, store: Any) -> None:
        """High before normal before low; within a priority, first registered first."""
        self.register(store, "low1", ("a", "b"), Priority.LOW)
        self.register(store, "norm1", ("a",), Priority.NORMAL)
        self.register(store, "high1", ("a", "b"), Priority.HIGH)
        self.register(store, "low2", ("a",), Priority.LOW)
        self.register(store, "norm2", ("a", "b"), Priority.NORMAL)
        self.register(store, "high2", ("a",), Priority.HIGH)
        assert self.drain(store) == [
            "high1/a",
            "high1/b",
            "high2/a",
            "norm1/a",
            "norm2/a",
            "norm2/b",
            "low1/a",
            "low1/b",
            "low2/a",
        ]

    def test_later_high_batch_jumps_the_queue(self, store: Any) -> None:
        """A high batch registered while normal files wait is served next."""
        self.register(store, "norm", ("a", "b", "c"), Priority.NORMAL)
        assert self.claim(store).file.relpath == "a"
        self.register(store, "urgent", ("x",), Priority.HIGH)
        assert self.drain(store) == ["urgent/x", "norm/b", "norm/c"]

    def test_claim_skips_backed_off_files_until_due(self, store: Any) -> None:
        """A file whose back-off has not expired is skipped, then claimed once due."""
        self.register(store, "b1", ("a", "b"))
        first = self.claim(store)
        store.retry_later(first.file.id, "boom", at(10))
        assert self.claim(store).file.relpath == "b"
        assert store.claim_next(at(9.999)) is None
        again = self.claim(store, at(10))
        assert again.file.id == first.file.id
        assert again.file.attempts == 2

    def test_backed_off_file_does_not_block_the_queue(self, store: Any) -> None:
        """A high file in back-off lets a due low file be claimed."""
        self.register(store, "h", ("a",), Priority.HIGH)
        self.register(store, "l", ("a",), Priority.LOW)
        task = self.claim(store)
        store.retry_later(task.file.id, "boom", at(60))
        assert self.claim(store).batch_name == "l"

    def test_next_due_reports_earliest_back_off(self, store: Any) -> None:
        """next_due is the earliest available_at of a backed-off pending file."""
        assert store.next_due() is None
        self.register(store, "b1", ("a", "b"))
        a = self.claim(store)
        b = self.claim(store)
        store.retry_later(a.file.id, "boom", at(30))
        store.retry_later(b.file.id, "boom", at(20))
        assert store.next_due() == at(20)

    # -- finishing --------------------------------------------------------------------

    def test_finish_completed_records_result(self, store: Any) -> None:
        """finish(completed) stores result, hash, size, progress 100 and completed_at."""
        self.register(store, "b1", ("a", "b"))
        task = self.claim(store)
        batch = store.finish(task.file.id, completed(), at(2))
        row = store.get_file(task.file.id)
        assert row.status == Status.COMPLETED
        assert row.result is not None and '"ok": true' in row.result
        assert (row.file_hash, row.file_size, row.progress, row.processor) == (
            "sha256:" + "0" * 64,
            123,
            100,
            "noop",
        )
        assert row.completed_at == "2026-11-28T10:00:02.000Z"
        assert (batch.status, batch.processed_files, batch.failed_files) == (
            Status.PROCESSING,
            1,
            0,
        )
        assert batch.completed_at is None

    def test_batch_completed_when_every_file_completed(self, store: Any) -> None:
        """The batch becomes completed, with completed_at, when its last file completes."""
        self.register(store, "b1", ("a", "b"))
        for n in range(2):
            batch = store.finish(self.claim(store).file.id, completed(), at(n))
        assert (batch.status, batch.processed_files, batch.failed_files) == (
            Status.COMPLETED,
            2,
            0,
        )
        assert batch.completed_at == "2026-11-28T10:00:01.000Z"

    def test_batch_failed_when_done_and_one_failed(self, store: Any) -> None:
        """All files done with one failure makes the batch failed."""
        self.register(store, "b1", ("a", "b"))
        store.finish(self.claim(store).file.id, FAILED, at(1))
        batch = store.finish(self.claim(store).file.id, completed(), at(2))
        assert (batch.status, batch.processed_files, batch.failed_files) == (
            Status.FAILED,
            1,
            1,
        )
        assert batch.completed_at == "2026-11-28T10:00:02.000Z"
        failed = [f for f in store.list_files(batch.id) if f.status == Status.FAILED]
        assert [f.error for f in failed] == ["RuntimeError: boom"]

    def test_finish_file_ends_the_batch_with_its_last_file_only(self, store: Any) -> None:
        """finish_file says the batch ended for its last file alone, then derived."""
        self.register(store, "b1", ("a", "b"))
        first, second = self.claim(store), self.claim(store)
        settled = store.finish_file(first.file.id, completed(lease=first.file.lease_gen), at(2))
        assert settled is not None and not settled.ended
        assert settled.batch.status == Status.PROCESSING
        settled = store.finish_file(second.file.id, FAILED, at(3))
        assert settled is not None and settled.ended
        assert (settled.batch.status, settled.batch.processed_files) == (Status.FAILED, 1)
        assert (settled.batch.failed_files, settled.batch.completed_at) == (
            1,
            "2026-11-28T10:00:03.000Z",
        )
        # Asked again (a daemon cleaning up after a worker): not ended twice, and
        # not derived again (its version stays the final status.json's).
        again = store.settle_batch(settled.batch.id, at(4))
        assert again is not None and again.batch.status == Status.FAILED and not again.ended
        assert again.batch.version == settled.batch.version

    def test_finish_file_with_a_lost_lease_writes_nothing(self, store: Any) -> None:
        """finish_file with a token the row no longer carries returns None and changes nothing."""
        self.register(store, "b1", ("a",))
        task = self.claim(store)
        store.requeue([task.file.id])
        again = self.claim(store)
        assert store.finish_file(task.file.id, completed(lease=task.file.lease_gen), at(2)) is None
        assert store.get_file(again.file.id).status == Status.PROCESSING

    # -- a worker's own claim (issue 15) -------------------------------------------

    def test_finish_and_claim_takes_the_fresh_head_in_the_same_commit(self, store: Any) -> None:
        """finish_and_claim finishes the file and claims the head of the order (high
        first) for the worker's token; claimed_by finds it, and only it."""
        self.register(store, "low", ("l1",), Priority.LOW)
        self.register(store, "high", ("h1", "h2"), Priority.HIGH)
        first = self.claim(store)
        assert first.file.relpath == "h1"
        settled, task = store.finish_and_claim(
            first.file.id, completed(lease=first.file.lease_gen), at(2), "tok-1"
        )
        assert settled is not None and not settled.ended
        assert task is not None and (task.batch_name, task.file.relpath) == ("high", "h2")
        assert (task.file.status, task.file.attempts, task.file.lease_gen) == (
            Status.PROCESSING,
            1,
            1,
        )
        assert store.get_file(first.file.id).status == Status.COMPLETED
        assert [t.file.id for t in store.claimed_by("tok-1")] == [task.file.id]
        assert store.claimed_by("tok-2") == []
        # The last of its batch: the commit ends the batch, and claims the low file.
        settled, task2 = store.finish_and_claim(
            task.file.id, completed(lease=task.file.lease_gen), at(3), "tok-1"
        )
        assert settled is not None and settled.ended and settled.batch.status == Status.COMPLETED
        assert task2 is not None and task2.file.relpath == "l1"
        assert [t.file.id for t in store.claimed_by("tok-1")] == [task2.file.id]
        # A daemon claim clears the claimant: a re-claimed file is no worker's own.
        store.requeue([task2.file.id])
        again = self.claim(store)
        assert again.file.id == task2.file.id and store.claimed_by("tok-1") == []

    def test_finish_and_claim_takes_nothing_when_the_head_was_claimed_before(
        self, store: Any
    ) -> None:
        """A re-queued file at the head is the daemon's to claim: the worker claims
        nothing, not the fresh file behind it (the order stays the store's)."""
        self.register(store, "b1", ("a", "b", "c"))
        first, second = self.claim(store), self.claim(store)
        store.requeue([second.file.id])  # back to the head of the queue, claimed once
        settled, task = store.finish_and_claim(
            first.file.id, completed(lease=first.file.lease_gen), at(2), "tok"
        )
        assert settled is not None and task is None
        assert self.claim(store).file.id == second.file.id

    def test_finish_and_claim_with_a_lost_lease_claims_nothing(self, store: Any) -> None:
        """A superseded success writes nothing and claims nothing."""
        self.register(store, "b1", ("a", "b"))
        task = self.claim(store)
        store.requeue([task.file.id])
        again = self.claim(store)
        assert store.finish_and_claim(
            task.file.id, completed(lease=task.file.lease_gen), at(2), "tok"
        ) == (None, None)
        assert store.get_file(again.file.id).status == Status.PROCESSING
        assert store.claimed_by("tok") == []
        assert [f.status for f in store.list_files(again.file.batch_id)] == [
            Status.PROCESSING,
            Status.PENDING,
        ]

    def test_refresh_counts_brings_a_running_batchs_counters_to_its_files(self, store: Any) -> None:
        """After finish_file and refresh_counts the running batch counts its finished files."""
        batch = self.register(store, "b1", ("a", "b", "c"))
        for outcome in (completed(), FAILED):
            store.finish_file(self.claim(store).file.id, outcome, at(2))
        store.refresh_counts(batch.id)
        row = store.get_batch(batch.id)
        assert (row.status, row.processed_files, row.failed_files) == (Status.PROCESSING, 1, 1)
        assert row.version > batch.version

    def test_finish_file_last_two_at_once_end_the_batch_exactly_once(self, store: Any) -> None:
        """The last two files finished at once from two threads: the batch ends, once."""
        self.register(store, "b1", ("a", "b"))
        tasks = [self.claim(store), self.claim(store)]
        start = threading.Barrier(2)
        ended: list[bool] = []
        errors: list[BaseException] = []

        def finish(task: FileTask) -> None:
            try:
                start.wait(timeout=30)
                settled = store.finish_file(task.file.id, completed(), at(2))
                ended.append(settled.ended)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
            finally:
                store.release_thread()

        threads = [threading.Thread(target=finish, args=(t,)) for t in tasks]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert errors == [] and sorted(ended) == [False, True]
        row = store.get_batch(tasks[0].file.batch_id)
        assert (row.status, row.processed_files) == (Status.COMPLETED, 2)

    def test_finish_many_records_every_outcome_and_each_items_batch(self, store: Any) -> None:
        """finish_many records several outcomes at once and returns each item's batch, in order."""
        self.register(store, "b1", ("a", "b"))
        self.register(store, "b2", ("c",))
        tasks = [self.claim(store) for _ in range(3)]
        batches = store.finish_many(
            [
                (tasks[0].file.id, completed(), at(2)),
                (tasks[2].file.id, FAILED, at(3)),
                (tasks[1].file.id, completed(), at(4)),
            ]
        )
        assert [(b.name, b.status, b.processed_files, b.failed_files) for b in batches] == [
            ("b1", Status.COMPLETED, 2, 0),
            ("b2", Status.FAILED, 0, 1),
            ("b1", Status.COMPLETED, 2, 0),
        ]
        rows = [store.get_file(t.file.id) for t in tasks]
        assert [(r.status, r.completed_at) for r in rows] == [
            (Status.COMPLETED, "2026-11-28T10:00:02.000Z"),
            (Status.COMPLETED, "2026-11-28T10:00:04.000Z"),
            (Status.FAILED, "2026-11-28T10:00:03.000Z"),
        ]

    def test_finish_many_is_all_or_nothing(self, store: Any) -> None:
        """finish_many with one unknown file raises StoreError and records none of the others."""
        self.register(store, "b1", ("a",))
        task = self.claim(store)
        unknown = "00000000-0000-4000-8000-000000000000"
        with pytest.raises(StoreError):
            store.finish_many([(task.file.id, completed(), at(2)), (unknown, completed(), at(2))])
        assert store.get_file(task.file.id).status == Status.PROCESSING

    def test_finish_needs_a_final_status(self, store: Any) -> None:
        """finish() with a non-final status is refused."""
        self.register(store, "b1")
        task = self.claim(store)
        with pytest.raises(ValueError):
            store.finish(task.file.id, Outcome(Status.PENDING), T0)

    def test_finish_unknown_file_raises(self, store: Any) -> None:
        """finish() of a file that does not exist raises StoreError."""
        with pytest.raises(StoreError):
            store.finish("no-such-file", completed(), T0)

    def test_retry_later_spends_a_retry(self, store: Any) -> None:
        """retry_later puts the file back to pending with retry_count + 1 and the error."""
        self.register(store, "b1")
        task = self.claim(store)
        store.set_progress({task.file.id: 40})
        store.retry_later(task.file.id, "RuntimeError: boom", at(4))
        row = store.get_file(task.file.id)
        assert (row.status, row.retry_count, row.error, row.progress, row.attempts) == (
            Status.PENDING,
            1,
            "RuntimeError: boom",
            0,
            1,
        )

    # -- fencing (issue 16) -----------------------------------------------------

    def test_every_claim_carries_a_new_fencing_token(self, store: Any) -> None:
        """A file claimed, requeued and claimed again gets a higher lease_gen each time."""
        self.register(store, "b1")
        first = self.claim(store)
        store.requeue([first.file.id])
        second = self.claim(store)
        assert second.file.id == first.file.id
        assert second.file.lease_gen == first.file.lease_gen + 1
        # requeue gives the attempt back, so attempts alone could not fence.
        assert second.file.attempts == first.file.attempts

    def test_outcome_of_a_superseded_attempt_is_dropped(self, store: Any) -> None:
        """finish_many with an old token writes nothing and returns None for that item."""
        self.register(store, "b1", ("a", "b"))
        old = self.claim(store)
        other = self.claim(store)
        store.requeue([old.file.id])
        new = self.claim(store)
        stale = completed(lease=old.file.lease_gen)
        fresh = completed(lease=other.file.lease_gen)
        got = store.finish_many([(old.file.id, stale, at(1)), (other.file.id, fresh, at(1))])
        assert got[0] is None and got[1] is not None
        row = store.get_file(old.file.id)
        assert (row.status, row.lease_gen) == (Status.PROCESSING, new.file.lease_gen)
        assert store.get_file(other.file.id).status == Status.COMPLETED
        # The owner's outcome still lands.
        owner = store.finish_many([(new.file.id, completed(lease=new.file.lease_gen), at(2))])
        assert owner[0] is not None and owner[0].status == Status.COMPLETED

    def test_outcome_after_an_operator_requeue_is_dropped(self, store: Any) -> None:
        """A file set back to pending by hand (not yet reclaimed) refuses the old outcome."""
        self.register(store, "b1")
        task = self.claim(store)
        store.requeue([task.file.id])  # what the operator's UPDATE ... 'pending' does
        assert store.finish_many([(task.file.id, failed_by(task), at(1))]) == [None]
        assert store.get_file(task.file.id).status == Status.PENDING

    def test_retry_progress_and_requeue_are_fenced(self, store: Any) -> None:
        """retry_later, set_progress and requeue with an old token change nothing."""
        self.register(store, "b1")
        old = self.claim(store)
        store.requeue([old.file.id])
        new = self.claim(store)
        assert store.retry_later(old.file.id, "boom", at(5), lease=old.file.lease_gen) is False
        store.set_progress({old.file.id: 70}, {old.file.id: old.file.lease_gen})
        store.requeue([old.file.id], {old.file.id: old.file.lease_gen})
        row = store.get_file(old.file.id)
        assert (row.status, row.retry_count, row.progress) == (Status.PROCESSING, 0, 0)
        store.set_progress({new.file.id: 30}, {new.file.id: new.file.lease_gen})
        assert store.get_file(new.file.id).progress == 30
        assert store.retry_later(new.file.id, "boom", at(5), lease=new.file.lease_gen) is True
        assert store.get_file(new.file.id).status == Status.PENDING

    def test_snapshot_is_the_batch_and_its_files_at_one_moment(self, store: Any) -> None:
        """snapshot() returns batch, files, counts and progress agreeing with each other."""
        batch = self.register(store, "b1", ("a", "b"))
        a = self.claim(store)
        store.set_progress({a.file.id: 40})
        snap = store.snapshot(batch.id)
        assert snap.batch.status == Status.PROCESSING
        assert [f.status for f in snap.files] == [Status.PROCESSING, Status.PENDING]
        assert snap.summary == store.file_summary(batch.id)
        assert snap.progress_sum == store.progress_sum(batch.id) == 40
        assert store.snapshot("00000000-0000-0000-0000-000000000000") is None

    def test_snapshots_are_each_batch_as_snapshot_reads_it(self, store: Any) -> None:
        """snapshots() answers several batches in one read, each as snapshot() would,
        files in their order; unknown and malformed ids (and repeats) are left out."""
        one = self.register(store, "b1", ("a", "b", "c"))
        two = self.register(store, "b2", ("d",), errors={"d": "refused"})
        three = self.register(store, "b3", ("e", "f"))
        running = self.claim(store)
        store.set_progress({running.file.id: 40})
        ids = [three.id, one.id, two.id, one.id, "00000000-0000-4000-8000-000000000000", "x"]
        snaps = store.snapshots(ids)
        assert set(snaps) == {one.id, two.id, three.id}
        for batch_id, snap in snaps.items():
            assert snap == store.snapshot(batch_id)
        assert [f.relpath for f in snaps[one.id].files] == ["a", "b", "c"]
        assert snaps[one.id].progress_sum == 40
        assert store.snapshots([]) == {}

    def test_snapshots_of_more_batches_than_one_statement_takes(self, store: Any) -> None:
        """Past SNAPSHOTS_CHUNK ids the read is split, and still answers every batch."""
        from batchd.store.reads import SNAPSHOTS_CHUNK

        batches = [
            store.register_batch(new_batch(f"n{i}", ("a",)), T0) for i in range(SNAPSHOTS_CHUNK + 3)
        ]
        snaps = store.snapshots([b.id for b in batches])
        assert set(snaps) == {b.id for b in batches}
        assert all(len(s.files) == 1 for s in snaps.values())

    def test_batch_version_grows_with_every_change(self, store: Any) -> None:
        """Each re-derivation of a batch raises its version; the end has the highest."""
        batch = self.register(store, "b1", ("a", "b"))
        v0 = batch.version
        a = self.claim(store)
        done_a = store.finish(a.file.id, completed(), at(1))
        b = self.claim(store)
        done_b = store.finish(b.file.id, completed(), at(2))
        assert v0 < done_a.version < done_b.version
        assert store.get_batch(batch.id).version == done_b.version

    def test_requeue_does_not_spend_an_attempt(self, store: Any) -> None:
        """requeue puts processing files back to pending with the attempt given back."""
        self.register(store, "b1", ("a", "b", "c"))
        a, b = self.claim(store), self.claim(store)
        store.requeue([a.file.id, b.file.id])
        rows = {f.relpath: f for f in store.list_files(a.file.batch_id)}
        assert [(rows[r].status, rows[r].attempts, rows[r].retry_count) for r in "ab"] == [
            (Status.PENDING, 0, 0),
            (Status.PENDING, 0, 0),
        ]
        assert self.drain(store) == ["b1/a", "b1/b", "b1/c"]

    def test_requeue_leaves_finished_files_alone(self, store: Any) -> None:
        """requeue of a file that already finished changes nothing."""
        self.register(store, "b1")
        task = self.claim(store)
        store.finish(task.file.id, completed(), T0)
        store.requeue([task.file.id])
        assert store.get_file(task.file.id).status == Status.COMPLETED

    def test_requeue_stale_resets_every_processing_file(self, store: Any) -> None:
        """requeue_stale (start-up) turns every processing file pending and counts them."""
        self.register(store, "b1", ("a", "b", "c"))
        a = self.claim(store)
        b = self.claim(store)
        store.retry_later(b.file.id, "boom", T0)
        self.claim(store)  # b again: attempt 2
        self.claim(store)  # c
        store.finish(a.file.id, completed(), T0)
        assert store.requeue_stale() == 2
        rows = {f.relpath: f for f in store.list_files(a.file.batch_id)}
        assert {r: (f.status, f.attempts) for r, f in rows.items()} == {
            "a": (Status.COMPLETED, 1),
            "b": (Status.PENDING, 1),
            "c": (Status.PENDING, 0),
        }
        assert store.requeue_stale() == 0

    def test_set_progress_clamps_and_skips_idle_files(self, store: Any) -> None:
        """set_progress stores 0-100 for processing files only."""
        self.register(store, "b1", ("a", "b"))
        task = self.claim(store)
        pending_id = next(f.id for f in store.list_files(task.file.batch_id) if f.relpath == "b")
        store.set_progress({task.file.id: 150, pending_id: 50})
        assert store.get_file(task.file.id).progress == 100
        assert store.get_file(pending_id).progress == 0

    def test_retry_failed_by_file_id(self, store: Any) -> None:
        """retry_failed(file id) re-queues that failed file with retries reset."""
        batch = self.register(store, "b1", ("a", "b"))
        a = self.claim(store)
        store.retry_later(a.file.id, "boom", T0)
        a = self.claim(store)
        store.finish(a.file.id, FAILED, T0)
        b = self.claim(store)
        store.finish(b.file.id, FAILED, T0)
        assert store.retry_failed(a.file.id) == 1
        row = store.get_file(a.file.id)
        assert (row.status, row.retry_count) == (Status.PENDING, 0)
        assert store.get_file(b.file.id).status == Status.FAILED
        assert self.claim(store).file.id == a.file.id
        assert store.get_batch(batch.id).status == Status.PROCESSING

    def test_retry_failed_by_batch_id(self, store: Any) -> None:
        """retry_failed(batch id) re-queues every failed file of the batch only."""
        batch = self.register(store, "b1", ("a", "b", "c"))
        other = self.register(store, "b2", ("x",), errors={"x": "refused"})
        store.finish(self.claim(store).file.id, FAILED, T0)
        store.finish(self.claim(store).file.id, completed(), T0)
        store.finish(self.claim(store).file.id, FAILED, T0)
        assert store.retry_failed(batch.id) == 2
        assert self.drain(store) == ["b1/a", "b1/c"]
        assert store.file_summary(other.id)["failed"] == 1

    def test_retry_failed_reopens_the_batch(self, store: Any) -> None:
        """After retry_failed the batch is no longer failed: counters and status follow."""
        batch = self.register(store, "b1", ("a", "b"))
        store.finish(self.claim(store).file.id, FAILED, at(1))
        done = store.finish(self.claim(store).file.id, completed(), at(2))
        assert done.status == Status.FAILED
        assert store.retry_failed(batch.id) == 1
        reopened = store.get_batch(batch.id)
        assert (reopened.status, reopened.failed_files, reopened.processed_files) == (
            Status.PROCESSING,
            0,
            1,
        )
        assert reopened.completed_at is None
        assert [b.name for b in store.unfinished_batches()] == ["b1"]

    def test_retry_failed_unknown_id_is_zero(self, store: Any) -> None:
        """retry_failed of an id that matches nothing returns 0."""
        assert store.retry_failed("nothing") == 0

    # -- queries ---------------------------------------------------------------------

    def test_list_batches_newest_first(self, store: Any) -> None:
        """list_batches orders by creation, newest first, also within the same instant."""
        self.register(store, "old", now=at(0))
        self.register(store, "mid", now=at(1))
        self.register(store, "new1", now=at(2))
        self.register(store, "new2", now=at(2))
        assert [b.name for b in store.list_batches()] == ["new2", "new1", "mid", "old"]

    def test_list_batches_limit_and_offset(self, store: Any) -> None:
        """limit and offset page through the newest-first list."""
        for n in range(5):
            self.register(store, f"b{n}", now=at(n))
        assert [b.name for b in store.list_batches(limit=2)] == ["b4", "b3"]
        assert [b.name for b in store.list_batches(limit=2, offset=2)] == ["b2", "b1"]
        assert [b.name for b in store.list_batches(limit=2, offset=4)] == ["b0"]
        assert store.list_batches(limit=2, offset=5) == []

    def test_list_batches_filters_status_and_user(self, store: Any) -> None:
        """status= and user_id= filter, alone and together."""
        self.register(store, "a1", user_id="alice", now=at(0))
        self.register(store, "b1", user_id="bob", now=at(1), batch_error="too many")
        self.register(store, "a2", user_id="alice", now=at(2), batch_error="too many")
        assert [b.name for b in store.list_batches(user_id="alice")] == ["a2", "a1"]
        assert [b.name for b in store.list_batches(status=Status.FAILED)] == ["a2", "b1"]
        assert [b.name for b in store.list_batches(status=Status.FAILED, user_id="alice")] == ["a2"]
        assert store.list_batches(status=Status.COMPLETED) == []

    def test_list_files_limit_and_offset(self, store: Any) -> None:
        """list_files returns files in registration order, paged by limit/offset."""
        batch = self.register(store, "b1", ("a", "b", "c", "d"))
        assert [f.relpath for f in store.list_files(batch.id)] == ["a", "b", "c", "d"]
        assert [f.relpath for f in store.list_files(batch.id, limit=2)] == ["a", "b"]
        assert [f.relpath for f in store.list_files(batch.id, limit=2, offset=3)] == ["d"]
        assert [f.relpath for f in store.list_files(batch.id, offset=1)] == ["b", "c", "d"]

    def test_file_summary_counts_by_status(self, store: Any) -> None:
        """file_summary counts each status and the total."""
        batch = self.register(store, "b1", ("a", "b", "c", "d"), errors={"d": "refused"})
        store.finish(self.claim(store).file.id, completed(), T0)
        self.claim(store)
        assert store.file_summary(batch.id) == {
            "total": 4,
            "pending": 1,
            "processing": 1,
            "completed": 1,
            "failed": 1,
        }

    def test_progress_sum_counts_done_files_as_100(self, store: Any) -> None:
        """progress_sum adds running progress; completed and failed files count 100."""
        batch = self.register(store, "b1", ("a", "b", "c", "d"), errors={"d": "refused"})
        store.finish(self.claim(store).file.id, completed(), T0)
        running = self.claim(store)
        store.set_progress({running.file.id: 30})
        assert store.progress_sum(batch.id) == 100 + 30 + 0 + 100

    def test_progress_sums_of_a_page_agree_with_progress_sum(self, store: Any) -> None:
        """progress_sums answers several batches in one query, as progress_sum would each;
        a batch with no files (or an unknown id) is 0."""
        one = self.register(store, "b1", ("a", "b"), errors={"b": "refused"})
        two = self.register(store, "b2", ("c", "d"))
        running = self.claim(store)
        store.set_progress({running.file.id: 25})
        ids = [one.id, two.id, "00000000-0000-4000-8000-000000000000"]
        sums = store.progress_sums(ids)
        assert sums == {i: store.progress_sum(i) for i in ids}
        assert sums[one.id] == 125 and sums[two.id] == 0
        assert store.progress_sums([]) == {}

    def test_queue_counts_and_unfinished(self, store: Any) -> None:
        """queue_counts spans all batches; unfinished_batches lists pending/processing ones."""
        self.register(store, "b1", ("a", "b"))
        self.register(store, "b2", ("a",), batch_error="too many")
        self.claim(store)
        assert store.queue_counts() == {
            "pending": 1,
            "processing": 1,
            "completed": 0,
            "failed": 1,
        }
        assert [b.name for b in store.unfinished_batches()] == ["b1"]

    def test_timestamps_are_fixed_width_utc_milliseconds(self, store: Any) -> None:
        """Every stored time reads YYYY-MM-DDTHH:MM:SS.mmmZ, converted to UTC."""
        odd = datetime(2026, 1, 2, 4, 5, 6, 7_890, tzinfo=timezone(timedelta(hours=2)))
        batch = store.register_batch(new_batch("b1", ("a",)), odd)
        assert batch.created_at == "2026-01-02T02:05:06.007Z"
        task = self.claim(store, odd + timedelta(microseconds=123_456))
        done = store.finish(task.file.id, completed(), odd + timedelta(seconds=1))
        row = store.get_file(task.file.id)
        stamps = [
            done.created_at,
            done.started_at,
            done.completed_at,
            row.created_at,
            row.started_at,
            row.completed_at,
        ]
        assert all(s is not None and STAMP.match(s) for s in stamps), stamps
        assert row.started_at == "2026-01-02T02:05:06.131Z"

    # -- uploads -------------------------------------------------------------------------

    def test_record_upload_allows_limit_per_window(self, store: Any) -> None:
        """A user gets `limit` uploads per window, the next one is refused."""
        assert [store.record_upload("alice", at(n), 3, HOUR) for n in range(4)] == [
            True,
            True,
            True,
            False,
        ]

    def test_record_upload_is_per_user(self, store: Any) -> None:
        """One user's uploads do not count against another's."""
        for n in range(3):
            store.record_upload("alice", at(n), 3, HOUR)
        assert store.record_upload("bob", at(5), 3, HOUR)
        assert not store.record_upload("alice", at(5), 3, HOUR)

    def test_record_upload_window_slides(self, store: Any) -> None:
        """Once the oldest upload leaves the window a new one is allowed."""
        for n in range(3):
            store.record_upload("alice", at(n * 60), 3, HOUR)
        assert not store.record_upload("alice", at(3599), 3, HOUR)
        assert store.record_upload("alice", at(3601), 3, HOUR)
        assert not store.record_upload("alice", at(3602), 3, HOUR)
        assert len(store.uploads_since("alice", at(3602) - HOUR)) == 3

    def test_refused_upload_is_not_counted(self, store: Any) -> None:
        """A refused upload does not extend the user's wait."""
        for n in range(3):
            store.record_upload("alice", at(n), 3, HOUR)
        for n in range(10):
            assert not store.record_upload("alice", at(100 + n), 3, HOUR)
        assert store.record_upload("alice", at(3600 + 1), 3, HOUR)

    # -- retention -------------------------------------------------------------------------

    def test_finished_before_lists_old_finished_batches(self, store: Any) -> None:
        """finished_before lists batches that ended before the cutoff, oldest first."""
        self.register(store, "old", now=at(0), batch_error="x")
        self.register(store, "recent", now=at(100), batch_error="x")
        self.register(store, "running", now=at(0))
        assert [b.name for b in store.finished_before(at(50))] == ["old"]
        assert [b.name for b in store.finished_before(at(200))] == ["old", "recent"]

    def test_delete_batch_removes_batch_and_files(self, store: Any) -> None:
        """delete_batch removes a finished batch and its files."""
        batch = self.register(store, "old", ("a", "b"), batch_error="x")
        keep = self.register(store, "keep", ("a",))
        store.delete_batch(batch.id)
        assert store.get_batch(batch.id) is None
        assert store.list_files(batch.id) == []
        assert store.get_batch(keep.id) == keep
        assert not store.name_taken("old")

    def test_delete_batch_refuses_unfinished(self, store: Any) -> None:
        """delete_batch of a batch with pending or processing files raises StoreError."""
        batch = self.register(store, "busy", ("a", "b"))
        self.claim(store)
        with pytest.raises(StoreError, match="unfinished"):
            store.delete_batch(batch.id)
        assert store.get_batch(batch.id) is not None
        assert len(store.list_files(batch.id)) == 2


# -- SQLite ---------------------------------------------------------------------------------

SPEC_BATCH_COLUMNS = {
    "id",
    "user_id",
    "status",
    "total_files",
    "processed_files",
    "failed_files",
    "priority",
    "created_at",
    "started_at",
    "completed_at",
    "error",
}
SPEC_FILE_COLUMNS = {
    "id",
    "batch_id",
    "filename",
    "file_size",
    "file_hash",
    "status",
    "progress",
    "result",
    "error",
    "retry_count",
    "created_at",
    "started_at",
    "completed_at",
}
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "batchd.db"


@pytest.fixture
def raw(db_path: Path) -> Iterator[Callable[[], sqlite3.Connection]]:
    """Opens a separate connection, as an operator's sqlite3 shell would."""
    opened: list[sqlite3.Connection] = []

    def opener() -> sqlite3.Connection:
        conn = sqlite3.connect(db_path, isolation_level=None, timeout=10)
        opened.append(conn)
        return conn

    yield opener
    for conn in opened:
        conn.close()


class TestSQLiteStore(StoreContract):
    """The contract, plus SQLite specifics, against a real database file."""

    @pytest.fixture
    def store(self, db_path: Path) -> Iterator[SQLiteStore]:
        store = SQLiteStore(db_path)
        yield store
        store.close()

    def test_failed_registration_raises_store_error(self, store: Any) -> None:
        """A refused registration raises StoreError, not a driver exception."""
        super().test_failed_registration_raises_store_error(store)

    def test_retry_failed_reopens_the_batch(self, store: Any) -> None:
        """After retry_failed the batch is no longer failed: counters and status follow."""
        super().test_retry_failed_reopens_the_batch(store)

    def test_refresh_counts_takes_no_write_lock(
        self, store: SQLiteStore, raw: Callable[[], sqlite3.Connection]
    ) -> None:
        """SQLite derives each batch in its commit (counters never trail): a status
        rewrite's refresh_counts does not queue on the write lock another writer holds."""
        batch = store.register_batch(new_batch("b1", ("a", "b")), T0)
        task = store.claim_next(T0)
        assert task is not None
        store.finish_file(task.file.id, completed(lease=task.file.lease_gen), at(1))
        writer = raw()
        writer.execute("BEGIN IMMEDIATE")
        try:
            store.refresh_counts(batch.id)  # SQLITE_BUSY after busy_timeout if it writes
        finally:
            writer.execute("ROLLBACK")
        row = store.get_batch(batch.id)
        assert row is not None and (row.status, row.processed_files) == (Status.PROCESSING, 1)

    def test_migrate_sets_user_version(
        self, store: SQLiteStore, raw: Callable[[], sqlite3.Connection]
    ) -> None:
        """A new database gets PRAGMA user_version = SCHEMA_VERSION."""
        assert store.schema_version() == SCHEMA_VERSION >= 1
        assert raw().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION

    def test_database_is_in_wal_mode(
        self, store: SQLiteStore, raw: Callable[[], sqlite3.Connection]
    ) -> None:
        """The database file is in WAL mode, seen from another connection."""
        assert raw().execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    def test_reopening_a_migrated_database_is_a_no_op(self, db_path: Path) -> None:
        """Opening an up-to-date database keeps its data and its version."""
        first = SQLiteStore(db_path)
        batch = first.register_batch(new_batch("b1"), T0)
        first.close()
        second = SQLiteStore(db_path)
        try:
            assert second.schema_version() == SCHEMA_VERSION
            assert second.get_batch(batch.id) == batch
        finally:
            second.close()

    def test_newer_schema_version_is_refused(self, db_path: Path) -> None:
        """A database from a newer batchd raises StoreError naming both versions."""
        SQLiteStore(db_path).close()
        conn = sqlite3.connect(db_path)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        conn.close()
        with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}"):
            SQLiteStore(db_path)

    def test_uncreatable_folder_is_a_store_error(self, tmp_path: Path) -> None:
        """A database path under a regular file raises StoreError."""
        (tmp_path / "file").write_text("x")
        with pytest.raises(StoreError):
            SQLiteStore(tmp_path / "file" / "state" / "batchd.db")

    def test_schema_has_every_spec_column(
        self, store: SQLiteStore, raw: Callable[[], sqlite3.Connection]
    ) -> None:
        """batch_jobs and batch_files carry every column SPEC §5 names."""
        conn = raw()
        batch_cols = {r[1] for r in conn.execute("PRAGMA table_info(batch_jobs)")}
        file_cols = {r[1] for r in conn.execute("PRAGMA table_info(batch_files)")}
        assert batch_cols >= SPEC_BATCH_COLUMNS
        assert file_cols >= SPEC_FILE_COLUMNS

    def test_register_writes_the_spec_columns(
        self, store: SQLiteStore, raw: Callable[[], sqlite3.Connection]
    ) -> None:
        """The registered rows hold UUID ids and the SPEC column values."""
        batch = store.register_batch(new_batch("b1", ("a.csv", "d/b.pdf"), Priority.LOW), at(1))
        conn = raw()
        conn.row_factory = sqlite3.Row
        job = dict(conn.execute("SELECT * FROM batch_jobs").fetchone())
        assert UUID.match(job["id"]) and job["id"] == batch.id
        assert {k: job[k] for k in SPEC_BATCH_COLUMNS - {"id"}} == {
            "user_id": "alice",
            "status": "pending",
            "total_files": 2,
            "processed_files": 0,
            "failed_files": 0,
            "priority": "low",
            "created_at": "2026-11-28T10:00:01.000Z",
            "started_at": None,
            "completed_at": None,
            "error": None,
        }
        files = [dict(r) for r in conn.execute("SELECT * FROM batch_files ORDER BY filename")]
        assert all(UUID.match(f["id"]) for f in files)
        assert [{k: f[k] for k in SPEC_FILE_COLUMNS - {"id"}} for f in files] == [
            {
                "batch_id": batch.id,
                "filename": name,
                "file_size": size,
                "file_hash": None,
                "status": "pending",
                "progress": 0,
                "result": None,
                "error": None,
                "retry_count": 0,
                "created_at": "2026-11-28T10:00:01.000Z",
                "started_at": None,
                "completed_at": None,
            }
            for name, size in (("a.csv", 100), ("b.pdf", 101))
        ]

    def test_result_column_is_json_text(
        self, store: SQLiteStore, raw: Callable[[], sqlite3.Connection]
    ) -> None:
        """batch_files.result holds the processor's dict as JSON text."""
        store.register_batch(new_batch("b1"), T0)
        task = store.claim_next(T0)
        assert task is not None
        store.finish(task.file.id, completed(), T0)
        (text,) = raw().execute("SELECT result FROM batch_files").fetchone()
        assert json.loads(text) == {"ok": True}

    def test_operator_select_statements_run_as_written(
        self, store: SQLiteStore, raw: Callable[[], sqlite3.Connection]
    ) -> None:
        """The SPEC §5 SELECTs run verbatim from a second connection while the store is open."""
        operator_queue(store)
        conn = raw()
        assert (
            conn.execute("SELECT COUNT(*) FROM batch_files WHERE status='pending';").fetchone()[0]
            == 2
        )
        rows = conn.execute(
            "SELECT id, status, total_files, processed_files, failed_files, created_at\n"
            "  FROM batch_jobs ORDER BY created_at DESC LIMIT 10;"
        ).fetchall()
        assert [r[1:] for r in rows] == [
            ("failed", 1, 0, 1, "2026-11-28T10:00:01.000Z"),
            ("processing", 3, 0, 1, "2026-11-28T10:00:00.000Z"),
        ]
        avg = conn.execute(
            "SELECT AVG(retry_count) FROM batch_files WHERE status='failed';"
        ).fetchone()[0]
        assert avg == pytest.approx(0.5)

    def test_operator_update_requeues_a_failed_file(
        self, store: SQLiteStore, raw: Callable[[], sqlite3.Connection]
    ) -> None:
        """The SPEC §5 UPDATE on a failed file makes claim_next hand it out again."""
        store.register_batch(new_batch("b1", ("a", "b")), T0)
        task = store.claim_next(T0)
        assert task is not None
        store.retry_later(task.file.id, "boom", T0)
        task = store.claim_next(T0)
        assert task is not None
        store.finish(task.file.id, FAILED, at(1))
        other = store.claim_next(T0)
        assert other is not None
        store.finish(other.file.id, completed(), at(1))
        assert store.claim_next(at(2)) is None
        conn = raw()
        conn.execute(
            "UPDATE batch_files SET status='pending', retry_count=0 WHERE id=?;",
            (task.file.id,),
        )
        again = store.claim_next(at(3))
        assert again is not None
        assert again.file.id == task.file.id
        assert (again.file.status, again.file.retry_count) == (Status.PROCESSING, 0)
        batch = store.get_batch(again.file.batch_id)
        assert (batch.status, batch.completed_at) == (Status.PROCESSING, None)

    def test_operator_update_requeues_a_refused_file(
        self, store: SQLiteStore, raw: Callable[[], sqlite3.Connection]
    ) -> None:
        """The SPEC §5 UPDATE with a literal id also revives a file refused at registration."""
        batch = store.register_batch(new_batch("b1", ("a",), errors={"a": "refused"}), T0)
        (file_id,) = [f.id for f in store.list_files(batch.id)]
        raw().execute(
            f"UPDATE batch_files SET status='pending', retry_count=0 WHERE id='{file_id}';"
        )
        task = store.claim_next(at(1))
        assert task is not None and task.file.id == file_id

    def test_store_works_from_another_thread(self, store: SQLiteStore) -> None:
        """Each thread gets its own connection; writes from one are read by another."""
        errors: list[BaseException] = []

        def work() -> None:
            try:
                store.register_batch(new_batch("threaded"), T0)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        thread = threading.Thread(target=work)
        thread.start()
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert errors == []
        assert store.name_taken("threaded")


def test_write_lock_serves_writers_in_arrival_order() -> None:
    """This process's writers get the write lock first come, first served."""
    from batchd.store.sqlite import _FairLock

    lock = _FairLock()
    entered: list[int] = []
    threads = []
    with lock:
        for i in range(5):
            t = threading.Thread(target=lambda i=i: _enter_and_record(lock, entered, i))
            t.start()
            threads.append(t)
            deadline = time.monotonic() + 10
            while lock._next_ticket != i + 2:  # this thread holds its ticket now
                assert time.monotonic() < deadline, "a writer never queued"
                time.sleep(0.001)
    for t in threads:
        t.join(10)
    assert entered == [0, 1, 2, 3, 4]


def _enter_and_record(lock: Any, entered: list[int], i: int) -> None:
    with lock:
        entered.append(i)


def _lock_taken(path: Path) -> bool:
    """Whether some open file holds the writers' ``flock`` on ``path`` (tried on
    an open file of our own, which a lock held elsewhere refuses)."""
    import fcntl
    import os

    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_write_transactions_hold_the_writers_lock_file(db_path: Path) -> None:
    """Every write transaction holds ``flock`` on ``<db>-lock`` until it ends (the
    lock batchd's processes queue on, woken at once), and not after; reads take none."""
    from batchd.store.sqlite import LOCK_SUFFIX

    store = SQLiteStore(db_path)
    try:
        lock = db_path.with_name(db_path.name + LOCK_SUFFIX)
        assert lock.exists()  # created by the migration's transaction
        with store.db.transaction():
            assert _lock_taken(lock)
        assert not _lock_taken(lock)
        with store.db.snapshot():
            assert not _lock_taken(lock)
        with pytest.raises(RuntimeError), store.db.transaction():
            raise RuntimeError("rolled back")
        assert not _lock_taken(lock)
    finally:
        store.close()


def test_writers_lock_may_be_taken_only_by_who_may_write_the_database(db_path: Path) -> None:
    """The lock file gets read and write for each class of user that may write the
    database, nothing for the others (a reader of the database must not be able to
    stop batchd's writes by holding it), whatever the creator's umask."""
    import os

    from batchd.store.sqlite import LOCK_SUFFIX

    lock = db_path.with_name(db_path.name + LOCK_SUFFIX)
    for db_mode, lock_mode in ((0o644, 0o600), (0o664, 0o660), (0o640, 0o600)):
        db_path.parent.mkdir(parents=True, exist_ok=True)
        db_path.unlink(missing_ok=True)
        lock.unlink(missing_ok=True)
        db_path.touch()
        db_path.chmod(db_mode)
        old = os.umask(0o077)
        try:
            SQLiteStore(db_path).close()
        finally:
            os.umask(old)
        assert lock.stat().st_mode & 0o777 == lock_mode, (oct(db_mode), oct(lock.stat().st_mode))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file away")
def test_writers_lock_created_by_root_belongs_to_the_database_owner(db_path: Path) -> None:
    """Root's CLI opening the database first makes the lock file the database
    owner's (as SQLite's own files are its), so the daemon can open it for writing."""
    from batchd.store.sqlite import LOCK_SUFFIX

    db_path.parent.mkdir(parents=True)
    SQLiteStore(db_path).close()
    db_path.with_name(db_path.name + LOCK_SUFFIX).unlink()
    os.chown(db_path, 65534, 65534)
    SQLiteStore(db_path).close()
    lock = db_path.with_name(db_path.name + LOCK_SUFFIX).stat()
    assert (lock.st_uid, lock.st_gid) == (65534, 65534)


def test_a_forked_child_takes_the_writers_lock_on_a_descriptor_of_its_own(tmp_path: Path) -> None:
    """A ``flock`` belongs to the open file: a child that kept its parent's would
    walk through the parent's lock. The child opens the file again."""
    import fcntl

    from batchd.store.sqlite import _WritersLock

    database = tmp_path / "db"
    database.touch()
    lock = _WritersLock(tmp_path / "db-lock", database)
    lock.acquire(1.0)
    try:
        pid = os.fork()
        if pid == 0:  # the child: its descriptor must find the lock taken
            code = 1
            try:
                fcntl.flock(lock._descriptor(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        lock.release()
    assert os.waitstatus_to_exitcode(status) == 0
    lock.close()


def test_writes_go_on_where_the_filesystem_refuses_the_lock(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where ``flock`` fails (NFS refuses it on a descriptor open for reading with
    EBADF, a filesystem without locks with ENOLCK), writes fall back to SQLite's
    busy_timeout instead of failing."""
    import errno
    import fcntl
    import types

    from batchd.store import sqlite as sqlite_module

    def flock(fd: int, op: int) -> None:
        if op & fcntl.LOCK_EX:
            raise OSError(errno.EBADF, "Bad file descriptor")
        fcntl.flock(fd, op)

    fake = types.SimpleNamespace(
        flock=flock, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB, LOCK_UN=fcntl.LOCK_UN
    )
    monkeypatch.setattr(sqlite_module, "fcntl", fake)
    _assert_writes_go_on(db_path)


def _assert_writes_go_on(db_path: Path) -> None:
    store = SQLiteStore(db_path)
    try:
        store.register_batch(new_batch("b1"), T0)
        assert store.name_taken("b1")
    finally:
        store.close()


#: a batchd process that stops itself (SIGSTOP: Ctrl-Z, a freezer, a debugger)
#: inside a write transaction.
_STOPPED_HOLDER = """
import os, signal, sys
from pathlib import Path
from batchd.store.sqlite import SQLiteStore
store = SQLiteStore(Path(sys.argv[1]))
with store.db.transaction():
    print("holding", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
"""


def test_a_writer_stopped_inside_a_transaction_times_out_the_others(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batchd process stopped while it holds the writers' lock costs the other
    writers busy_timeout and a StoreError, as SQLite's own lock did: never an
    endless wait."""
    import signal
    import subprocess
    import sys

    from batchd.store import sqlite as sqlite_module

    SQLiteStore(db_path).close()
    monkeypatch.setattr(sqlite_module, "BUSY_TIMEOUT_MS", 1000)
    repo = Path(__file__).resolve().parents[1]
    child = subprocess.Popen(
        [sys.executable, "-c", _STOPPED_HOLDER, str(db_path)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"holding"
        outcome: list[BaseException | str] = []

        def write() -> None:
            try:
                other = SQLiteStore(db_path)  # its migration is a write too
                other.register_batch(new_batch("b1"), T0)
                other.close()
            except BaseException as exc:  # reported to the test
                outcome.append(exc)
            else:
                outcome.append("written")

        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        thread.join(20)
        assert outcome, "the writer was still waiting after 20 s (busy_timeout 1 s)"
        assert isinstance(outcome[0], StoreError), outcome
        assert "locked" in str(outcome[0])
    finally:
        child.kill()
        child.send_signal(signal.SIGCONT)
        child.wait()


def test_each_writer_waits_busy_timeout_in_all_behind_an_operators_write(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind an operator's open write (sqlite3's BEGIN IMMEDIATE), three batchd
    writers each give up after busy_timeout: the time one waits for the writers'
    lock counts against it, so the last in line does not wait three times over."""
    from batchd.store import sqlite as sqlite_module

    SQLiteStore(db_path).close()
    monkeypatch.setattr(sqlite_module, "BUSY_TIMEOUT_MS", 1000)
    stores = [SQLiteStore(db_path) for _ in range(3)]  # three connectors, as three processes
    operator = sqlite3.connect(db_path, isolation_level=None)
    operator.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    took: dict[int, tuple[float, str]] = {}

    def write(i: int) -> None:
        try:
            stores[i].register_batch(new_batch(f"b{i}"), T0)
            took[i] = (time.monotonic() - started, "written")
        except StoreError:
            took[i] = (time.monotonic() - started, "StoreError")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(3)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    finally:
        operator.execute("ROLLBACK")
        operator.close()
        for store in stores:
            store.close()
    assert sorted(outcome for _, outcome in took.values()) == ["StoreError"] * 3, took
    assert max(seconds for seconds, _ in took.values()) < 2.5, took


def test_writes_go_on_when_the_writers_lock_cannot_be_opened(db_path: Path) -> None:
    """Where ``<db>-lock`` cannot be opened (here it is a link, which is never
    followed), writes fall back to SQLite's busy_timeout: slower under
    contention, never refused."""
    from batchd.store.sqlite import LOCK_SUFFIX

    db_path.parent.mkdir(parents=True, exist_ok=True)
    db_path.with_name(db_path.name + LOCK_SUFFIX).symlink_to(db_path.parent / "elsewhere")
    _assert_writes_go_on(db_path)
