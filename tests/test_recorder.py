"""Unit tests for batchd.recorder: a worker recording its own success (issue 15).

A real spool and a real SQLite store, the scheduler's dispatch on a fake
clock and a fake pool (tests/schedworld.py) to make real claims; the
recorder runs in-process, as it does in a worker.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from schedworld import DEFAULTS, World, make_world
from structlog.testing import capture_logs

from batchd.recorder import Recorder
from batchd.records import Status
from batchd.spool import Spool


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path, **DEFAULTS)


def test_a_recorded_success_is_committed_archived_and_ends_its_batch(world: World) -> None:
    """The commit, the input move to archive/, the batch end (work/ cleared, final
    status.json) and the two log events, all done by the recorder."""
    w = world
    recorder = Recorder(w.settings, None)
    batch = w.batch("one", ("a.csv",))
    w.turn()
    with capture_logs() as logs:
        _job, recorded = w.pool.done_recorded("a.csv", recorder)
    assert recorded is not None and recorded.batch is not None
    assert (recorded.archived, recorded.ended) == (True, True)
    file = w.file(batch, "a.csv")
    assert (file.status, file.progress) == (Status.COMPLETED, 100)
    assert file.file_hash is not None and file.file_hash.startswith("sha256:")
    assert json.loads(file.result or "null") == {"rows": 1}
    assert (w.spool.archive / batch.name / "a.csv").is_file()
    assert not (w.spool.root / batch.work_path).exists()
    status = json.loads(w.spool.status_path(batch.name).read_text())
    assert status["batch"]["status"] == "completed"
    events = [e["event"] for e in logs]
    assert events == ["file_completed", "batch_finished"]
    recorder.close()


def test_a_batch_end_with_an_empty_work_folder_looks_no_further(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every input moved by its own worker: the batch end neither settles
    members nor finalizes (nothing is left to archive); with something left
    in the folder (an ignored temporary name) it does, and that is archived."""
    w = world
    recorder = Recorder(w.settings, None)
    finalized: list[str] = []
    real_finalize = Spool.finalize

    def counting_finalize(self: Spool, work_path: str, name: str) -> None:
        finalized.append(name)
        real_finalize(self, work_path, name)

    # The class: the recorder has a Spool of its own, as in a worker.
    monkeypatch.setattr(Spool, "finalize", counting_finalize)
    empty = w.batch("empty", ("a.csv",))
    w.turn()
    _job, recorded = w.pool.done_recorded("a.csv", recorder)
    assert recorded is not None and recorded.ended
    assert finalized == []
    assert not (w.spool.root / empty.work_path).exists()
    left = w.batch("left", ("b.csv",))
    (w.spool.root / left.work_path / "upload.tmp").write_bytes(b"partial")
    w.turn()
    _job, recorded = w.pool.done_recorded("b.csv", recorder)
    assert recorded is not None and recorded.ended
    assert finalized == ["left"]
    assert (w.spool.archive / "left" / "upload.tmp").read_bytes() == b"partial"
    assert not (w.spool.root / left.work_path).exists()
    recorder.close()


def test_a_superseded_attempt_changes_nothing(world: World) -> None:
    """Re-queued and claimed again while it ran: the commit is refused by the fence,
    the input is not moved, the row stays with its new owner."""
    w = world
    recorder = Recorder(w.settings, None)
    batch = w.batch("b", ("a.csv",))
    w.turn()
    old = w.pool.job("a.csv")
    w.store.requeue([old.file_id])
    again = w.store.claim_next(w.clock.now())
    assert again is not None
    _job, recorded = w.pool.done_recorded("a.csv", recorder)
    assert recorded is not None and recorded.batch is None
    file = w.file(batch, "a.csv")
    assert (file.status, file.lease_gen) == (Status.PROCESSING, again.file.lease_gen)
    assert (w.spool.root / batch.work_path / "a.csv").is_file()
    assert not (w.spool.archive / batch.name).exists()
    recorder.close()


def test_an_unreachable_store_hands_the_outcome_back(world: World) -> None:
    """The database is away: nothing is recorded or moved, and the worker says so
    (None), so the daemon queues the outcome and retries it."""
    w = world
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://batchd@127.0.0.1:{port}/batchd?connect_timeout=2"
    recorder = Recorder(w.settings, url)
    batch = w.batch("b", ("a.csv",))
    w.turn()
    with capture_logs() as logs:
        _job, recorded = w.pool.done_recorded("a.csv", recorder)
    assert recorded is None
    assert [e["event"] for e in logs] == ["worker_record_deferred"]
    assert w.file(batch, "a.csv").status == Status.PROCESSING
    assert (w.spool.root / batch.work_path / "a.csv").is_file()
    w.turn()  # the loop records it itself
    assert w.file(batch, "a.csv").status == Status.COMPLETED


def test_a_failed_input_move_is_left_to_the_daemon(world: World) -> None:
    """Committed, but the input cannot go to archive/ (a file stands where its folder
    goes): archived is False, the input stays safe in work/, the daemon's archiver
    retries it later."""
    w = world
    recorder = Recorder(w.settings, None)
    batch = w.batch("b", ("a.csv", "b.csv"))
    w.spool.archive.mkdir(parents=True, exist_ok=True)
    (w.spool.archive / batch.name).write_text("in the way")
    w.turn()
    with capture_logs() as logs:
        _job, recorded = w.pool.done_recorded("a.csv", recorder)
    assert recorded is not None and recorded.batch is not None
    assert not recorded.archived and not recorded.ended
    assert w.file(batch, "a.csv").status == Status.COMPLETED
    assert (w.spool.root / batch.work_path / "a.csv").is_file()
    assert "input_move_failed" in [e["event"] for e in logs]
    recorder.close()


@pytest.fixture
def idle_archiver_world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path, start_archiver=False, **DEFAULTS)


def test_a_worker_ending_the_batch_moves_a_failed_input_to_failed(
    idle_archiver_world: World,
) -> None:
    """a failed (its move to failed/ still queued on the daemon's archiver), then b's
    worker records the batch's last success and ends the batch: a.csv goes to
    failed/ by its own status, not swept into archive/ with the rest."""
    w = idle_archiver_world
    recorder = Recorder(w.settings, None)
    batch = w.batch("f", ("a.csv", "b.csv"))
    w.turn()
    w.pool.failed("a.csv", permanent=True)
    w.turn()
    assert w.file(batch, "a.csv").status == Status.FAILED
    _job, recorded = w.pool.done_recorded("b.csv", recorder)
    assert recorded is not None and recorded.ended
    w.scheduler.archiver.start()
    w.turn()
    assert w.scheduler.archiver.wait_idle(30)
    assert (w.spool.failed / batch.name / "a.csv").is_file()
    assert not (w.spool.archive / batch.name / "a.csv").exists()
    assert (w.spool.archive / batch.name / "b.csv").is_file()
    recorder.close()


def test_a_batch_reopened_before_the_worker_ends_it_is_left_running(world: World) -> None:
    """`batchd retry` re-queued the batch's failed file between the worker's commit of
    the last success and its batch end: the worker leaves the batch running, and
    nothing of it is swept out of work/."""
    w = world
    recorder = Recorder(w.settings, None)
    batch = w.batch("r", ("a.csv", "b.csv"))
    w.turn()
    w.pool.failed("a.csv", permanent=True)
    w.turn()
    assert w.scheduler.archiver.wait_idle(30)
    assert (w.spool.failed / batch.name / "a.csv").is_file()
    store = recorder._opened()
    real = store.finish_many

    def then_retry(items):  # type: ignore[no-untyped-def]
        out = real(items)
        assert w.store.retry_failed(batch.id) == 1  # the operator, right after the commit
        # ... and the daemon claims it again, bringing its input back into work/.
        assert w.spool.locate_input(batch.work_path, batch.name, "a.csv") is not None
        return out

    store.finish_many = then_retry  # type: ignore[method-assign]
    _job, recorded = w.pool.done_recorded("b.csv", recorder)
    assert recorded is not None and recorded.batch is not None
    assert recorded.batch.status.done and not recorded.ended
    again = w.store.get_batch(batch.id)
    assert again is not None and not again.status.done
    assert w.file(batch, "a.csv").status == Status.PENDING
    assert (w.spool.root / batch.work_path / "a.csv").is_file()  # not swept into archive/
    assert not (w.spool.archive / batch.name / "a.csv").exists()
    recorder.close()
