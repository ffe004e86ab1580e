"""Workers claiming their next file themselves (issue 15), as the daemon follows them.

A real spool and SQLite store with the scheduler on a fake clock and a fake
pool (tests/schedworld.py); the recorder runs in-process, as in a worker, and
makes the worker's claim in the commit of its success. The worker's side of
the permit runs over a real pipe and a real shared byte.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from schedworld import DEFAULTS, World, make_world
from structlog.testing import capture_logs

from batchd.clock import iso
from batchd.errors import StoreError
from batchd.messages import Done, Lost
from batchd.recorder import Recorder
from batchd.records import FileTask, Status
from batchd.worker import _Permit, run_job


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path, **{**DEFAULTS, "concurrency": 1})


@pytest.fixture
def recorder(world: World) -> Iterator[Recorder]:
    recorder = Recorder(world.settings, None)
    yield recorder
    recorder.close()


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path, **{**DEFAULTS, "concurrency": 2})


@pytest.fixture
def recorder2(two_workers: World) -> Iterator[Recorder]:
    recorder = Recorder(two_workers.settings, None)
    yield recorder
    recorder.close()


def count_daemon_claims(world: World) -> list[FileTask]:
    """Replace the store's claim_next with one that notes every file the daemon claims."""
    claimed: list[FileTask] = []
    claim_next = world.store.claim_next

    def counting(now: Any) -> FileTask | None:
        task = claim_next(now)
        if task is not None:
            claimed.append(task)
        return task

    world.store.claim_next = counting  # type: ignore[method-assign]
    return claimed


def test_a_worker_claim_is_followed_like_a_dispatched_attempt(
    world: World, recorder: Recorder
) -> None:
    """The daemon claims the first file only; the worker claims the next two in its
    commits, and the daemon follows each (running, lease, outcome) to the batch's end."""
    w = world
    claimed = count_daemon_claims(w)
    batch = w.batch("b", ("a.csv", "b.csv", "c.csv"))
    w.turn()
    job = w.pool.job("a.csv")
    assert job.delivery is not None and job.delivery.may_claim
    assert w.pool.claims_allowed
    for relpath, following in (("a.csv", "b.csv"), ("b.csv", "c.csv"), ("c.csv", None)):
        _job, recorded = w.pool.done_recorded(relpath, recorder, claimant="tok")
        assert recorded is not None
        assert (recorded.claimed and recorded.claimed.file.relpath) == following
        w.turn()
        if following is not None:
            running = w.scheduler.outcomes.running[w.file(batch, following).id]
            assert running.task.file.lease_gen == w.file(batch, following).lease_gen
            assert w.file(batch, following).status == Status.PROCESSING
    assert [t.file.relpath for t in claimed] == ["a.csv"]
    assert [f.status for f in w.store.list_files(batch.id)] == [Status.COMPLETED] * 3
    assert w.scheduler.outcomes.running == {}
    assert w.scheduler.finished_count == 3
    assert w.store.get_batch(batch.id).status == Status.COMPLETED


def test_a_followed_claim_counts_its_time_from_the_claim(world: World, recorder: Recorder) -> None:
    """The worker stamps its claim's commit; the daemon, reading the message later,
    counts the attempt from that stamp (its duration, as the pool its deadline)."""
    w = world
    batch = w.batch("b", ("a.csv", "b.csv"))
    w.turn()
    before = time.monotonic()
    _job, recorded = w.pool.done_recorded("a.csv", recorder, claimant="tok")
    assert recorded is not None and recorded.claimed is not None
    assert before <= recorded.claimed_at <= time.monotonic()
    # As if the message had waited 100 s in its pipe behind a long turn.
    done = w.pool.events[-1]
    assert isinstance(done, Done) and done.recorded is not None
    w.pool.events[-1] = replace(
        done, recorded=replace(done.recorded, claimed_at=done.recorded.claimed_at - 100.0)
    )
    w.turn()
    running = w.scheduler.outcomes.running[w.file(batch, "b.csv").id]
    assert 100.0 <= w.clock.monotonic() - running.started_mono < 160.0


def test_a_worker_dead_after_its_claim_has_that_file_retried_as_a_lost_attempt(
    world: World, recorder: Recorder
) -> None:
    """Killed between its claim's commit and its message: the daemon finds the file by
    the worker's token, retries it as a lost attempt, and it completes once."""
    w = world
    batch = w.batch("b", ("a.csv", "b.csv"))
    w.turn()
    job_a, recorded = w.pool.done_recorded("a.csv", recorder, claimant="tok", report=False)
    assert recorded is not None and recorded.claimed is not None
    assert w.file(batch, "b.csv").status == Status.PROCESSING
    w.pool.events.append(Lost(job_a.file_id, "worker process killed by signal 9", job_a.lease))
    w.pool.gone_tokens.append("tok")
    with capture_logs() as logs:
        w.turn()
    b = w.file(batch, "b.csv")
    assert (b.status, b.retry_count) == (Status.PENDING, 1)
    assert b.error == "worker process died after claiming the file, before reporting the claim"
    assert w.file(batch, "a.csv").status == Status.COMPLETED
    events = [e["event"] for e in logs]
    assert "worker_claim_lost" in events and "outcome_already_recorded" in events
    w.clock.advance(60)  # its back-off
    w.turn()
    w.pool.done_recorded("b.csv", recorder)
    w.turn()
    w.scheduler.archiver.wait_idle(30)
    assert [f.status for f in w.store.list_files(batch.id)] == [Status.COMPLETED] * 2
    assert w.file(batch, "b.csv").attempts == 2
    assert sorted(p.name for p in (w.spool.archive / "b").iterdir()) == ["a.csv", "b.csv"]


def test_a_reported_claim_of_a_dead_worker_is_lost_once(world: World, recorder: Recorder) -> None:
    """The daemon heard of the claim before the worker died: its Lost is the one retry,
    the sweep by the token does not count the attempt a second time."""
    w = world
    batch = w.batch("b", ("a.csv", "b.csv"))
    w.turn()
    w.pool.done_recorded("a.csv", recorder, claimant="tok")
    w.turn()
    w.pool.lost("b.csv")
    w.pool.gone_tokens.append("tok")
    with capture_logs() as logs:
        w.turn()
    b = w.file(batch, "b.csv")
    assert (b.status, b.retry_count) == (Status.PENDING, 1)
    assert "worker_claim_lost" not in [e["event"] for e in logs]


def test_a_claim_unreported_at_shutdown_goes_back_without_spending_an_attempt(
    tmp_path: Path,
) -> None:
    """A worker stopped at the end of the drain had claimed its next file without
    saying so: the daemon puts it back to pending by the worker's token, unspent."""
    for w in make_world(tmp_path, start_archiver=False, concurrency=1, shutdown_grace_seconds=1.0):
        recorder = Recorder(w.settings, None)
        batch = w.batch("b", ("a.csv", "b.csv"))
        w.turn()
        w.pool.done_recorded("a.csv", recorder, claimant="tok", report=False)
        w.pool.tokens_at_stop.append("tok")
        w.scheduler.request_stop()
        with capture_logs() as logs:
            w.scheduler.run()
        recorder.close()
        b = w.file(batch, "b.csv")
        assert (b.status, b.attempts, b.retry_count) == (Status.PENDING, 0, 0)
        assert w.file(batch, "a.csv").status == Status.COMPLETED
        assert {
            "event": "shutdown_requeued",
            "files": 1,
            "claimed_by_worker": True,
            "log_level": "warning",
        } in logs


def test_the_permit_is_withheld_while_stopping_and_while_the_database_is_away(
    world: World,
) -> None:
    """The standing permit holds while the loop runs, goes at once on a stop signal,
    and is withheld while the database is away."""
    w = world
    w.batch("b", ("a.csv",))
    w.turn()
    assert w.pool.claims_allowed
    w.scheduler.outcomes.db_failed(StoreError("database gone"))
    w.turn()
    assert not w.pool.claims_allowed
    w.scheduler.outcomes.db_error = None
    w.turn()
    assert w.pool.claims_allowed
    w.scheduler.signal_stop()
    assert not w.pool.claims_allowed
    w.turn()
    assert not w.pool.claims_allowed


def test_worker_claims_off_gives_no_permit(tmp_path: Path) -> None:
    """processing.worker_claims = false: no job carries the permit, none stands."""
    for w in make_world(tmp_path, **{**DEFAULTS, "worker_claims": False}):
        w.batch("b", ("a.csv",))
        w.turn()
        job = w.pool.job("a.csv")
        assert job.delivery is not None and not job.delivery.may_claim
        assert not w.pool.claims_allowed


def test_a_claim_the_worker_cannot_start_is_the_daemons(world: World, recorder: Recorder) -> None:
    """The claimed file's input is gone from work/: the worker starts nothing and the
    daemon fails it as its own dispatch would."""
    w = world
    batch = w.batch("b", ("a.csv", "b.csv"))
    w.turn()
    (w.spool.root / batch.work_path / "b.csv").unlink()
    _job, recorded = w.pool.done_recorded("a.csv", recorder, claimant="tok")
    assert recorded is not None and recorded.claimed is not None and recorded.started is None
    w.turn(2)
    b = w.file(batch, "b.csv")
    assert b.status == Status.FAILED
    assert b.error == "input file is no longer in the spool (moved or deleted)"


def test_the_worker_reads_its_permit_and_the_daemons_messages_before_claiming(
    world: World,
) -> None:
    """A worker claims under its token only while the shared byte says so, applies a
    reload sent meanwhile, and claims nothing once told to retire."""
    parent, child = multiprocessing.Pipe()
    flag = multiprocessing.RawValue("b", 1)
    reloads: list[object] = []
    permit = _Permit(child, "tok", flag, reloads.append)
    assert permit() == "tok"
    flag.value = 0
    assert permit() is None
    flag.value = 1
    parent.send(world.settings)
    assert permit() == "tok" and reloads == [world.settings]
    parent.send(None)
    assert permit() is None and permit.stop
    assert _Permit(child, "", flag, reloads.append)() is None
    # Grown past processing.worker_recycle_rss_mb: the daemon replaces it, no claim.
    assert _Permit(child, "tok", flag, reloads.append, lambda: 1)() is None
    assert _Permit(child, "tok", flag, reloads.append, lambda: 1 << 20)() == "tok"


def test_a_claim_reported_after_the_file_was_claimed_again_stays_superseded(
    two_workers: World, recorder2: Recorder
) -> None:
    """An operator re-queues a file its worker just claimed and the daemon claims it
    again before the worker's Done is read: the stale claim is stopped, and the daemon
    keeps following the new attempt (its timeout ends the file, never stuck processing)."""
    w = two_workers
    batch = w.batch("b", ("a.csv", "b.csv", "c.csv"))
    w.turn()
    job_a, recorded = w.pool.done_recorded("a.csv", recorder2, claimant="tok", report=False)
    assert recorded is not None and recorded.claimed is not None
    assert recorded.started is not None
    stale = recorded.started
    # The operator's re-queue of the file the worker runs now (lease 1).
    w.store.requeue([stale.file_id])
    w.turn()
    fresh = w.pool.job("c.csv")
    assert fresh.lease == stale.lease + 1
    cancelled: list[tuple[str, int]] = []

    def cancel(file_id: str, lease: int) -> bool:
        # The fake pool keys jobs by file: the stale attempt is not among them.
        cancelled.append((file_id, lease))
        return True

    w.pool.cancel = cancel  # type: ignore[method-assign]
    w.pool.events.append(
        Done(
            job_a.file_id,
            {},
            "sha256:x",
            1,
            0.1,
            completed_at=iso(w.clock.now()),
            lease=job_a.lease,
            recorded=recorded,
        )
    )
    w.turn()
    running = w.scheduler.outcomes.running[fresh.file_id]
    assert running.task.file.lease_gen == fresh.lease
    assert cancelled == [(stale.file_id, stale.lease)]
    w.pool.timed_out("c.csv")
    w.turn()
    c = w.file(batch, "c.csv")
    assert c.status == Status.FAILED
    assert fresh.file_id not in w.scheduler.outcomes.running


def test_a_claim_committed_before_the_record_failed_goes_back_to_pending(
    world: World, recorder: Recorder
) -> None:
    """The store commits a worker's success and claim, then fails (PostgreSQL derives
    the batch after the commit): the worker says its claim is unknown, and the daemon
    gives that file back to the queue unspent instead of leaving it processing."""
    w = world
    batch = w.batch("b", ("a.csv", "b.csv"))
    w.turn()
    job = w.pool.jobs.pop(w.pool.job("a.csv").file_id)
    store = recorder._opened()
    finish_and_claim = store.finish_and_claim

    def committed_then_failed(*args: Any) -> Any:
        finish_and_claim(*args)
        raise StoreError("connection lost after the commit")

    store.finish_and_claim = committed_then_failed  # type: ignore[method-assign]
    parent, child = multiprocessing.Pipe()
    with capture_logs() as logs:
        done = run_job(job, w.settings, child, recorder, lambda: "tok")
    assert isinstance(done, Done) and done.recorded is None
    assert "worker_record_deferred" in [e["event"] for e in logs]
    assert w.file(batch, "b.csv").status == Status.PROCESSING  # claimed, unreported
    # As the pool reads it (WorkerPool._drain): its lease, and the worker's token.
    w.pool.events.append(replace(done, lease=job.lease))
    if getattr(done, "claim_unknown", False):
        w.pool.unsure_tokens.append("tok")
    with capture_logs() as logs:
        w.turn()
    b = w.file(batch, "b.csv")
    # Given back unspent, and the daemon's own dispatch runs it at once.
    assert b.id in w.scheduler.outcomes.running
    assert w.pool.job("b.csv").lease == b.lease_gen
    assert (b.status, b.attempts, b.retry_count) == (Status.PROCESSING, 1, 0)
    assert "worker_claim_returned" in [e["event"] for e in logs]
    assert w.file(batch, "a.csv").status == Status.COMPLETED
    parent.close()
    child.close()
