"""Error paths of the one-walk status.json writes (temporaries removed, folders
closed), and what the orjson log renderer does with values a dropper can influence."""

from __future__ import annotations

import enum
import errno
import io
import json
import os
from pathlib import Path

import pytest
import structlog
from test_outbox import T0, outbox, register

from batchd import log
from batchd.config import LogSettings
from batchd.outbox import Outbox, ResultSyncer
from batchd.records import Outcome, Status

__all__ = ["outbox"]


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "status.json")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_write_status_removes_its_temporary_when_the_rename_fails(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """main's write_status unlinked the staged file on any error after staging; the
    one-walk version only closes the folder, so a failed rename leaves a temporary in
    the dropper's outbox/<batch>/ (until a restart's remove_stray_temporaries)."""
    batch = register(outbox, "b1")
    outbox.write_status(batch)
    folder = outbox.spool.batch_outbox("b1")
    before = _open_fds()

    def fail(*_a: object, **_k: object) -> None:
        raise OSError(errno.EIO, "injected rename failure")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        outbox.write_status(batch)
    monkeypatch.undo()
    assert _open_fds() == before  # no descriptor leak
    assert _temporaries(folder) == []


def test_write_status_removes_its_temporary_when_the_final_fsync_fails(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for a finished batch whose fsync reports EIO/ENOSPC/EDQUOT (NFS reports
    delayed write errors there)."""
    batch = register(outbox, "b2")
    task = outbox.store.claim_next(T0)
    assert task is not None
    outbox.store.finish(task.file.id, Outcome(Status.COMPLETED, result={"n": 1}), T0)
    done = outbox.store.get_batch(batch.id)
    assert done is not None and done.status.done
    folder = outbox.spool.batch_outbox("b2")

    def fail(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "injected fsync failure")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError):
        outbox.write_status(done)
    monkeypatch.undo()
    assert _temporaries(folder) == []


def test_write_snapshots_cleans_up_and_closes_on_a_failed_rename(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The grouped path (archiver): errors reported per batch, no temporary, no fd left."""
    batches = [register(outbox, f"g{i}") for i in range(5)]
    snaps = outbox.store.snapshots([b.id for b in batches])
    before = _open_fds()

    def fail(*_a: object, **_k: object) -> None:
        raise OSError(errno.EIO, "injected rename failure")

    monkeypatch.setattr(os, "replace", fail)
    syncer = ResultSyncer()
    try:
        errors = outbox.write_snapshots(list(snaps.values()), syncer)
    finally:
        syncer.close()
        monkeypatch.undo()
    assert set(errors) == {b.id for b in batches}
    assert _open_fds() == before
    for b in batches:
        assert _temporaries(outbox.spool.batch_outbox(b.name)) == []


class Plain(enum.Enum):
    ONE = 1


def _render(**values: object) -> str:
    out = io.StringIO()
    log.configure(LogSettings(format="json"), out)
    try:
        structlog.get_logger("batchd.test").info("probe", **values)
    finally:
        structlog.reset_defaults()
    return out.getvalue()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (os.fsdecode(b"drop-\xff.csv"), os.fsdecode(b"drop-\xff.csv")),  # lone surrogate
        ({1: "a"}, {"1": "a"}),  # non-str key
        (2**70, 2**70),  # beyond 64 bits
        (b"\x00\xff", "b'\\x00\\xff'"),
        (Path("/x/y"), "/x/y"),
        (
            {
                "a",
            },
            "{'a'}",
        ),
    ],
)
def test_json_log_line_renders_values_a_dropper_can_influence(
    value: object, expected: object
) -> None:
    line = _render(v=value)
    assert json.loads(line)["v"] == expected
