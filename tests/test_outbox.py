"""Tests for batchd.outbox: status.json rewrites, recovery's reconcile, the result syncer.

Real spool folders under tmp_path and a real SQLite store.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from batchd.config import Priority, load_settings
from batchd.outbox import Outbox, ResultSyncer
from batchd.records import BatchRow, NewBatch, NewFile, Outcome, Status
from batchd.spool import Spool
from batchd.store import SQLiteStore

T0 = datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC)


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    config = tmp_path / "config.toml"
    config.write_text("")
    spool = Spool(load_settings(config, {"BATCHD_SPOOL__ROOT": str(tmp_path / "spool")}))
    spool.init()
    store = SQLiteStore(spool.state / "batchd.db")
    yield Outbox(spool, store)
    store.close()


def register(outbox: Outbox, name: str, relpaths: tuple[str, ...] = ("a.csv",)) -> BatchRow:
    folder = outbox.spool.work / "normal" / name
    folder.mkdir(parents=True)
    for rel in relpaths:
        (folder / rel).write_text("id\n1\n")
    return outbox.store.register_batch(
        NewBatch(
            name=name,
            priority=Priority.NORMAL,
            user_id=None,
            work_path=f"work/normal/{name}",
            source=f"inbox/normal/{name}",
            files=tuple(NewFile(rel, 5, None) for rel in relpaths),
        ),
        T0,
    )


def test_reconcile_leaves_an_unchanged_waiting_batch_alone(outbox: Outbox) -> None:
    """Without force_status, a batch with nothing to move keeps its status.json untouched."""
    batch = register(outbox, "waiting")
    outbox.write_status(batch)
    status = outbox.spool.status_path("waiting")
    os.utime(status, ns=(1, 1))
    outbox.reconcile(batch, force_status=False)
    assert status.stat().st_mtime_ns == 1
    outbox.reconcile(batch, force_status=True)
    assert status.stat().st_mtime_ns != 1


def test_reconcile_writes_a_missing_status(outbox: Outbox) -> None:
    """A batch whose status.json was never written gets one, even without force_status."""
    batch = register(outbox, "fresh")
    outbox.reconcile(batch, force_status=False)
    doc = json.loads(outbox.spool.status_path("fresh").read_text())
    assert doc["batch"]["status"] == "pending"


@pytest.mark.parametrize("left", [b"", b'{"version": %d, "batch": {"sta', b"\0" * 40])
def test_reconcile_rewrites_an_unreadable_status(outbox: Outbox, left: bytes) -> None:
    """A waiting batch's status.json is renamed into place unsynced, so a power cut can
    leave it empty or cut short: recovery's reconcile rewrites it, even without force_status."""
    batch = register(outbox, "cut")
    outbox.write_status(batch)
    status = outbox.spool.status_path("cut")
    status.write_bytes(left.replace(b"%d", str(batch.version).encode()))
    outbox.reconcile(batch, force_status=False)
    doc = json.loads(status.read_text())
    assert (doc["batch"]["status"], doc["version"]) == ("pending", batch.version)


def test_only_finished_batches_documents_are_synced(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """write_snapshots (the archiver's groups) and write_status fsync the document of a
    batch that has ended, and not the live view of one still waiting or running."""
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    waiting = register(outbox, "waiting")
    done = register(outbox, "done")
    task = outbox.store.claim_next(T0)
    assert task is not None and task.batch_name == "waiting"
    outbox.store.finish(task.file.id, Outcome(Status.COMPLETED, result={"n": 1}), T0)
    syncer = ResultSyncer()
    try:
        snaps = outbox.store.snapshots([waiting.id, done.id])
        # "waiting" was claimed first (FIFO): it is the one that ended.
        assert snaps[waiting.id].batch.status == Status.COMPLETED
        assert outbox.write_snapshots(list(snaps.values()), syncer) == {}
    finally:
        syncer.close()
    outbox.write_status(done)
    folders = [Path(p).parent.name for p in synced]
    assert folders == ["waiting"], synced
    for name in ("waiting", "done"):
        assert json.loads(outbox.spool.status_path(name).read_text())["outbox"]


def test_reconcile_finishes_a_done_batch_and_releases_its_folder(outbox: Outbox) -> None:
    """A finished batch still in work/ gets its result, archived input, final status, no folder."""
    batch = register(outbox, "done")
    task = outbox.store.claim_next(T0)
    assert task is not None
    final = outbox.store.finish(task.file.id, Outcome(Status.COMPLETED, result={"n": 1}), T0)
    outbox.reconcile(final, force_status=False)
    assert json.loads(outbox.spool.result_path("done", "a.csv").read_text())["result"] == {"n": 1}
    assert (outbox.spool.archive / "done" / "a.csv").is_file()
    assert json.loads(outbox.spool.status_path("done").read_text())["batch"]["status"] == (
        "completed"
    )
    assert not (outbox.spool.root / batch.work_path).exists()


def test_syncer_syncs_a_group_and_reports_failures(tmp_path: Path) -> None:
    """sync() fsyncs every path (on threads for a group) and names the ones it could not."""
    paths = []
    for i in range(5):
        path = tmp_path / f"r{i}.json"
        path.write_text("{}")
        paths.append(str(path))
    missing = str(tmp_path / "gone.json")
    syncer = ResultSyncer(threads=3)
    try:
        assert syncer.sync(paths) == {}
        assert syncer.sync([paths[0]]) == {}
        assert syncer.sync([]) == {}
        failed = syncer.sync([*paths, missing])
        assert list(failed) == [missing]
        assert isinstance(failed[missing], FileNotFoundError)
        assert list(syncer.sync([missing])) == [missing]
    finally:
        syncer.close()


def test_an_older_snapshot_never_replaces_a_newer_status(outbox: Outbox) -> None:
    """A status.json staged from an older snapshot is dropped when a newer one is in place."""
    batch = register(outbox, "race")
    stale = outbox.status_document(batch)  # built before the batch ends
    task = outbox.store.claim_next(T0)
    assert task is not None
    final = outbox.store.finish(task.file.id, Outcome(Status.COMPLETED, result={"n": 1}), T0)
    outbox.write_status(final)
    path = outbox.spool.status_path("race")
    tmp = path.with_name(".stale.tmp")
    tmp.write_text(json.dumps(stale, indent=1))
    assert outbox._install(path, str(tmp), int(stale["version"])) is False
    doc = json.loads(path.read_text())
    assert (doc["batch"]["status"], doc["version"]) == ("completed", final.version)
    assert not tmp.exists()


def test_status_document_comes_from_one_snapshot(outbox: Outbox) -> None:
    """The batch head, the file list and the summary of status.json agree with each other."""
    batch = register(outbox, "snap", ("a.csv", "b.csv"))
    task = outbox.store.claim_next(T0)
    assert task is not None
    final = outbox.store.finish(task.file.id, Outcome(Status.COMPLETED, result={"n": 1}), T0)
    doc = outbox.status_document(final)
    assert doc["version"] == final.version
    assert doc["batch"]["processed_files"] == doc["summary"]["completed"] == 1
    assert [f["status"] for f in doc["files"]] == ["completed", "pending"]
    assert doc["batch"]["progressPercent"] == 50
    assert batch.version < final.version
