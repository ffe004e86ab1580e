"""Unit tests for batchd.outcomes: how each attempt's end is recorded.

A fake clock and a fake pool (tests/schedworld.py) over a real spool and a
real SQLite store: timeouts, retries and their back-off, permanent errors,
the fsync barrier, and attempts whose claim was superseded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from schedworld import DEFAULTS, WAIT_SECONDS, World, make_world
from structlog.testing import capture_logs

from batchd.intake import Intake
from batchd.messages import Progress
from batchd.outbox import Outbox
from batchd.recorder import Recorder
from batchd.records import Outcome, Status
from batchd.recovery import recover


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path, **DEFAULTS)


def test_timeout_fails_the_file_without_a_retry(world: World) -> None:
    """A TimedOut attempt fails the file with "Processing timeout exceeded", retries unspent."""
    w = world
    batch = w.batch("b", ("a.csv",))
    w.turn()
    w.pool.timed_out("a.csv")
    w.turn(2)
    file = w.file(batch, "a.csv")
    assert file.status == Status.FAILED
    assert file.error == "Processing timeout exceeded"
    assert file.retry_count == 0
    assert w.pool.jobs == {}  # not started again
    assert w.scheduler.archiver.wait_idle(WAIT_SECONDS)
    document = json.loads(w.spool.result_path(batch.name, "a.csv").read_text())
    assert document["error"] == "Processing timeout exceeded"


def test_retries_back_off_doubling_then_fail(world: World) -> None:
    """A retryable failure requeues the file at now + 2 s, then now + 4 s; with
    processing.max_retries = 2 spent, the third failure is final."""
    w = world
    batch = w.batch("b", ("a.csv",))
    for retry, delay in ((1, 2.0), (2, 4.0)):
        w.turn()
        w.pool.failed("a.csv", error=f"try {retry}")
        failed_at = w.clock.now()
        w.turn()
        file = w.file(batch, "a.csv")
        assert (file.status, file.retry_count, file.error) == (
            Status.PENDING,
            retry,
            f"try {retry}",
        )
        assert w.store.next_due() == failed_at + timedelta(seconds=delay)
        w.clock.advance(delay)
    w.turn()
    w.pool.failed("a.csv", error="try 3")
    w.turn()
    file = w.file(batch, "a.csv")
    assert (file.status, file.retry_count, file.error) == (Status.FAILED, 2, "try 3")
    assert file.attempts == 3


def test_permanent_error_fails_at_once(world: World) -> None:
    """A Failed(permanent=True) fails the file at its first attempt, retries unspent."""
    w = world
    batch = w.batch("b", ("a.csv",))
    w.turn()
    w.pool.failed("a.csv", permanent=True, error="not a CSV file")
    w.turn()
    file = w.file(batch, "a.csv")
    assert (file.status, file.retry_count, file.error) == (Status.FAILED, 0, "not a CSV file")


def test_a_lost_worker_spends_an_attempt_and_retries(world: World) -> None:
    """A worker that died (Lost) puts its file back for a retry, naming the death."""
    w = world
    batch = w.batch("b", ("a.csv",))
    w.turn()
    w.pool.lost("a.csv")
    w.turn()
    file = w.file(batch, "a.csv")
    assert (file.status, file.retry_count) == (Status.PENDING, 1)
    assert file.error == "worker died (SIGKILL)"


def test_completed_outcomes_commit_together_and_finish_the_batch(world: World) -> None:
    """Two Done events in one turn are recorded completed, the batch ends, and the
    archiver moves both inputs to archive/."""
    w = world
    batch = w.batch("b", ("a.csv", "b.csv"))
    w.turn()
    w.pool.done("a.csv")
    w.pool.done("b.csv")
    w.turn()
    assert [f.status for f in w.store.list_files(batch.id)] == [Status.COMPLETED] * 2
    final = w.store.get_batch(batch.id)
    assert final is not None and final.status == Status.COMPLETED
    assert w.scheduler.finished_count == 2
    assert w.scheduler.archiver.wait_idle(WAIT_SECONDS)
    assert sorted(p.name for p in (w.spool.archive / batch.name).iterdir()) == ["a.csv", "b.csv"]


def test_a_success_its_worker_recorded_is_only_counted_by_the_loop(world: World) -> None:
    """Issue 15: a Done the worker committed (and archived, and whose batch it
    ended) is not committed again; the loop frees the worker, refills it at once,
    and leaves the input and status.json as the worker left them."""
    w = world
    recorder = Recorder(w.settings, None)
    batch = w.batch("b", ("a.csv", "b.csv", "c.csv"))
    w.turn()
    assert sorted(j.relpath for j in w.pool.jobs.values()) == ["a.csv", "b.csv"]
    _job, recorded = w.pool.done_recorded("a.csv", recorder)
    assert recorded is not None and recorded.archived and not recorded.ended
    assert w.file(batch, "a.csv").status == Status.COMPLETED  # before the loop hears of it
    w.turn()
    assert w.scheduler.finished_count == 1
    assert sorted(j.relpath for j in w.pool.jobs.values()) == ["b.csv", "c.csv"]  # refilled
    w.pool.done_recorded("b.csv", recorder)
    _job, recorded = w.pool.done_recorded("c.csv", recorder)
    assert recorded is not None and recorded.ended
    w.turn()
    assert w.scheduler.finished_count == 3
    assert w.scheduler.archiver.wait_idle(WAIT_SECONDS)
    final = w.store.get_batch(batch.id)
    assert final is not None and final.status == Status.COMPLETED
    status = json.loads(w.spool.status_path(batch.name).read_text())
    assert status["batch"]["status"] == "completed" and status["version"] == final.version
    archived = sorted(p.name for p in (w.spool.archive / batch.name).iterdir())
    assert archived == ["a.csv", "b.csv", "c.csv"]
    assert not (w.spool.root / batch.work_path).exists()
    recorder.close()


def test_a_result_that_cannot_be_made_durable_is_retried_not_completed(world: World) -> None:
    """The fsync barrier: a Done whose result file is missing is never recorded completed."""
    w = world
    batch = w.batch("b", ("a.csv",))
    w.turn()
    job = w.pool.done("a.csv")
    assert job.delivery is not None
    Path(job.delivery.result_path).unlink()
    w.turn(2)  # the barrier queues the retry; the next commit records it
    file = w.file(batch, "a.csv")
    assert file.status == Status.PENDING
    assert file.retry_count == 1
    assert file.error is not None and file.error.startswith("cannot write the result file")


def test_superseded_outcome_is_dropped(world: World) -> None:
    """An attempt whose claim was taken over (requeued and claimed again elsewhere)
    records nothing: the file stays with its new owner, outcome_superseded is logged."""
    w = world
    batch = w.batch("b", ("a.csv",))
    w.turn()
    old = w.pool.job("a.csv")
    # An operator requeues the running file and another node claims it.
    w.store.requeue([old.file_id])
    other = w.store.claim_next(w.clock.now())
    assert other is not None and other.file.lease_gen == old.lease + 1
    w.pool.done("a.csv")
    with capture_logs() as logs:
        w.turn()
    file = w.file(batch, "a.csv")
    assert (file.status, file.lease_gen) == (Status.PROCESSING, other.file.lease_gen)
    assert w.scheduler.finished_count == 0
    superseded = [e for e in logs if e["event"] == "outcome_superseded"]
    assert [(e["file_id"], e["reason"]) for e in superseded] == [(old.file_id, "lease_lost")]


def test_reports_of_an_unknown_lease_are_ignored(world: World) -> None:
    """Progress stamped with another lease than the running attempt's is dropped."""
    w = world
    batch = w.batch("b", ("a.csv",))
    w.turn()
    job = w.pool.job("a.csv")
    w.pool.events.append(Progress(job.file_id, 50, lease=job.lease + 7))
    w.turn()
    w.clock.advance(w.settings.processing.status_interval_seconds)
    w.turn()
    assert w.file(batch, "a.csv").progress == 0
    w.pool.events.append(Progress(job.file_id, 50, lease=job.lease))
    w.turn()
    w.clock.advance(w.settings.processing.status_interval_seconds)
    w.turn()
    assert w.file(batch, "a.csv").progress == 50


def _processing(w: World) -> int:
    """Files the database shows processing (what operators count)."""
    batches = w.store.list_batches(100)
    return sum(f.status == Status.PROCESSING for b in batches for f in w.store.list_files(b.id))


def test_a_recorded_success_beside_a_retry_keeps_the_concurrency_bound(world: World) -> None:
    """A retryable failure (its row processing until this turn's commit) and a
    worker-recorded success in one wait: the freed workers are refilled only once
    the failure is committed, never past processing.concurrency."""
    w = world
    recorder = Recorder(w.settings, None)
    w.batch("b", ("a.csv", "b.csv", "c.csv", "d.csv"))
    w.turn()
    assert len(w.pool.jobs) == 2
    seen = []
    dispatch = w.scheduler.outcomes.refill

    def watched() -> None:
        dispatch()
        seen.append(_processing(w))

    w.scheduler.outcomes.refill = watched
    w.pool.failed("a.csv")
    w.pool.done_recorded("b.csv", recorder)
    w.turn(2)
    recorder.close()
    assert max(seen, default=0) <= w.settings.processing.concurrency
    assert _processing(w) <= w.settings.processing.concurrency
    assert len(w.pool.jobs) == 2  # both workers busy again


def test_a_worker_dying_before_deriving_its_last_files_batch_leaves_it_to_the_daemon(
    world: World,
) -> None:
    """The worker committed the batch's last file without its batch (PostgreSQL's
    finish_file) and was killed before deriving it: the daemon derives the batch from
    its files and ends it, instead of leaving it processing with every file done."""
    w = world
    batch = w.batch("c", ("a.csv",))
    w.turn()
    job = w.pool.job("a.csv")
    conn = w.store.db._conn()  # the file's row alone, as a lock-free commit leaves it
    conn.execute(
        "UPDATE batch_files SET status = 'completed', progress = 100, completed_at = ?"
        " WHERE id = ?",
        ("2026-11-28T10:00:05.000Z", job.file_id),
    )
    conn.commit()
    assert w.store.get_batch(batch.id).status == Status.PROCESSING  # type: ignore[union-attr]
    w.pool.lost("a.csv")
    w.turn()
    assert w.scheduler.archiver.wait_idle(WAIT_SECONDS)
    row = w.store.get_batch(batch.id)
    assert row is not None and (row.status, row.processed_files) == (Status.COMPLETED, 1)
    assert not (w.spool.root / batch.work_path).exists()
    status = json.loads(w.spool.status_path(batch.name).read_text())
    assert status["batch"]["status"] == "completed"


def test_start_up_recovery_ends_a_batch_whose_last_commit_was_never_derived(
    world: World,
) -> None:
    """The whole node was killed between a lock-free commit of a batch's last file and
    the batch's derivation: the next start's recovery derives the batch and ends it."""
    w = world
    batch = w.batch("c", ("a.csv",))
    w.turn()
    job = w.pool.job("a.csv")
    conn = w.store.db._conn()
    conn.execute(
        "UPDATE batch_files SET status = 'completed', progress = 100, completed_at = ?"
        " WHERE id = ?",
        ("2026-11-28T10:00:05.000Z", job.file_id),
    )
    outbox = Outbox(w.spool, w.store)
    recover(w.spool, w.store, outbox, Intake(w.settings, w.spool, w.store, outbox, w.clock))
    row = w.store.get_batch(batch.id)
    assert row is not None and (row.status, row.processed_files) == (Status.COMPLETED, 1)
    assert (w.spool.archive / batch.name / "a.csv").is_file()
    status = json.loads(w.spool.status_path(batch.name).read_text())
    assert status["batch"]["status"] == "completed"


@pytest.mark.parametrize("end", ["lost", "timed_out"])
def test_an_attempt_its_worker_recorded_before_dying_is_archived_and_ended(
    world: World, end: str
) -> None:
    """The worker committed the success, then died (killed at its deadline, OOM)
    before its Done: the daemon's refused write finds the row done under this
    attempt's lease, and moves the input and ends the batch itself."""
    w = world
    batch = w.batch("c", ("a.csv",))
    w.turn()
    job = w.pool.job("a.csv")
    # What the worker's recorder committed before it died.
    outcome = Outcome(Status.COMPLETED, processor=job.processor, lease=job.lease)
    (row,) = w.store.finish_many([(job.file_id, outcome, w.clock.now())])
    assert row is not None and row.status.done
    getattr(w.pool, end)("a.csv")
    with capture_logs() as logs:
        w.turn()
    assert "outcome_already_recorded" in [e["event"] for e in logs]
    assert "outcome_superseded" not in [e["event"] for e in logs]
    assert w.scheduler.archiver.wait_idle(WAIT_SECONDS)
    assert w.file(batch, "a.csv").status == Status.COMPLETED
    assert (w.spool.archive / batch.name / "a.csv").is_file()
    assert not (w.spool.root / batch.work_path).exists()
    status = json.loads(w.spool.status_path(batch.name).read_text())
    assert status["batch"]["status"] == "completed"
