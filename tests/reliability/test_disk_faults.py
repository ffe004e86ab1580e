"""Disk faults under the outbox and the archive: full, read-only, another filesystem.

Each test mounts a small tmpfs over ``spool/outbox`` or ``spool/archive``
(root only; skipped otherwise) and unmounts it in teardown. The promises:
a file is never ``completed`` in the database without its result on disk,
it stays pending (or fails with a clear error) while the disk is bad, it
completes once space returns, and no input is ever lost.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import DaemonProcess, csv_bytes, drop_folder, files_under, wait_until

from batchd.testing.procs import runs

Mount = Callable[[Path, str], Path]


@pytest.fixture
def tmpfs() -> Iterator[Mount]:
    """Mount a tmpfs of a given size over a folder; everything is unmounted in teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(where: Path, size: str) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount(where: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True)


def fill(where: Path) -> Path:
    """Write a filler file until the filesystem under ``where`` is full."""
    filler = where / ".filler"
    chunk = b"\0" * 65536
    with filler.open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    # Small writes may still fit in the last partial page: take that too.
    with filler.open("ab", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0")
    return filler


def completed_without_result(d: DaemonProcess) -> list[str]:
    """Files the database calls completed whose result document is not on disk."""
    with contextlib.closing(d.db()) as conn:
        rows = conn.execute(
            "SELECT j.name, f.relpath FROM batch_files f JOIN batch_jobs j ON j.id = f.batch_id"
            " WHERE f.status = 'completed'"
        ).fetchall()
    missing = []
    for name, relpath in rows:
        if not (d.spool / "outbox" / name / "results" / f"{relpath}.json").exists():
            missing.append(f"{name}/{relpath}")
    return missing


def write_failures(d: DaemonProcess) -> set[str]:
    """Files whose attempt was put back because its result file could not be written."""
    return {
        e["relpath"]
        for e in d.events("file_retry_scheduled")
        if e["error"].startswith("cannot write the result file")
    }


def file_rows(d: DaemonProcess) -> dict[str, tuple[str, int, str | None]]:
    with contextlib.closing(d.db()) as conn:
        rows = conn.execute("SELECT relpath, status, attempts, error FROM batch_files").fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def daemon(tmp_path: Path, **processing: object) -> DaemonProcess:
    settings: dict[str, object] = {"processor": "batchd.testing.procs:counted"}
    settings.update(processing)
    d = DaemonProcess(tmp_path, processing=settings)
    for folder in ("outbox", "archive"):
        (d.spool / folder).mkdir(parents=True, exist_ok=True)
    return d


FILES = {f"f{i}.csv": csv_bytes(i) for i in range(4)}


@pytest.mark.parametrize("fault", ["full", "readonly"])
def test_bad_outbox_keeps_files_pending_until_it_recovers(
    tmp_path: Path, tmpfs: Mount, fault: str
) -> None:
    """With the outbox full or read-only, nothing is completed without its result; once
    the outbox is writable again every file completes, once, with its result and status."""
    d = daemon(tmp_path, retry_backoff_seconds=1.0, max_retries=6)
    outbox = tmpfs(d.spool / "outbox", "1m")
    d.start()
    try:
        filler = fill(outbox) if fault == "full" else None
        if fault == "readonly":
            remount(outbox, "ro")
        drop_folder(d.inbox() / "job", FILES, tmp_path / "staging")
        wait_until(lambda: write_failures(d) == set(FILES), 60, what="every file's write to fail")
        assert completed_without_result(d) == []
        rows = file_rows(d)
        reason = "No space left on device" if fault == "full" else "Read-only file system"
        assert {rel: (st, err) for rel, (st, _, err) in rows.items()} == dict.fromkeys(
            FILES, ("pending", f"cannot write the result file: {reason}")
        )
        assert files_under(d.spool / "work" / "normal" / "job") == sorted(FILES)

        if filler is not None:
            filler.unlink()
        else:
            remount(outbox, "rw")
        status = d.wait_batch("job", 60)
        assert status["batch"]["status"] == "completed"
        assert completed_without_result(d) == []
        assert sorted(d.results("job")) == sorted(FILES)
        assert all(doc["attempts"] >= 2 for doc in d.results("job").values())
        assert files_under(d.spool / "archive" / "job") == sorted(FILES)
        assert files_under(d.spool / "work") == []
        assert [f for f in os.listdir(outbox / "job" / "results") if f.startswith(".")] == []
    finally:
        assert d.stop(60) == 0


def test_full_outbox_past_retries_fails_clearly_then_retry_completes(
    tmp_path: Path, tmpfs: Mount
) -> None:
    """A full outbox past the retries fails the file with the reason and keeps its input;
    after space returns, ``batchd retry`` completes it with its result on disk."""
    d = daemon(tmp_path, max_retries=1)
    outbox = tmpfs(d.spool / "outbox", "1m")
    d.start()
    try:
        filler = fill(outbox)
        (d.inbox() / "one.csv").write_bytes(csv_bytes(1))
        wait_until(
            lambda: file_rows(d).get("one.csv", ("",))[0] == "failed", 60, what="file to fail"
        )
        assert file_rows(d) == {
            "one.csv": ("failed", 2, "cannot write the result file: No space left on device")
        }
        assert completed_without_result(d) == []
        wait_until(  # the input moves after the database row is final
            lambda: files_under(d.spool / "failed" / "one.csv") == ["one.csv"],
            30,
            what="the input to reach failed/",
        )

        filler.unlink()
        with contextlib.closing(d.db()) as conn:
            batch_id = conn.execute("SELECT id FROM batch_jobs").fetchone()[0]
        retry = subprocess.run(
            [sys.executable, "-m", "batchd", "retry", batch_id],
            env=d.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert retry.returncode == 0, retry.stderr
        wait_until(
            lambda: (d.status("one.csv") or {}).get("batch", {}).get("status") == "completed",
            60,
            what="the retried batch to complete",
        )
        assert d.results("one.csv")["one.csv"]["status"] == "completed"
        assert files_under(d.spool / "archive" / "one.csv") == ["one.csv"]
        assert completed_without_result(d) == []
    finally:
        assert d.stop(60) == 0


def test_outbox_and_archive_on_other_filesystems_lose_nothing(tmp_path: Path, tmpfs: Mount) -> None:
    """Outbox and archive each on a filesystem of their own (rename gives EXDEV): results,
    processor outputs and inputs all land where documented, once, and work/ is emptied."""
    d = daemon(tmp_path, processor="batchd.testing.procs:with_outputs")
    tmpfs(d.spool / "outbox", "16m")
    tmpfs(d.spool / "archive", "16m")
    d.start()
    try:
        drop_folder(d.inbox() / "job", FILES, tmp_path / "staging")
        (d.inbox() / "loose.csv").write_bytes(csv_bytes(9))
        assert d.wait_batch("job", 60)["batch"]["status"] == "completed"
        assert d.wait_batch("loose.csv", 60)["batch"]["status"] == "completed"
        wait_until(lambda: files_under(d.spool / "work") == [], 30, what="work/ to empty")
        assert files_under(d.spool / "archive" / "job") == sorted(FILES)
        assert files_under(d.spool / "archive" / "loose.csv") == ["loose.csv"]
        assert files_under(d.spool / "outbox" / "job" / "results") == sorted(
            [f"{rel}.json" for rel in FILES] + [f"{rel}.files/copy.txt" for rel in FILES]
        )
        for rel, data in FILES.items():
            assert (
                d.spool / "outbox" / "job" / "results" / f"{rel}.files/copy.txt"
            ).read_bytes() == data
        assert {rel: runs(d.state, "done", rel) for rel in FILES} == dict.fromkeys(FILES, 1)
    finally:
        assert d.stop(60) == 0


def test_full_archive_keeps_inputs_and_restart_moves_them(tmp_path: Path, tmpfs: Mount) -> None:
    """With the archive full, files complete with their results and the inputs wait in
    work/; a restart with the archive still full starts fine, and once space returns a
    restart archives every input once."""
    d = daemon(tmp_path)
    archive = tmpfs(d.spool / "archive", "1m")
    filler = fill(archive)
    d.start()
    try:
        drop_folder(d.inbox() / "job", FILES, tmp_path / "staging")
        status = d.wait_batch("job", 60)
        assert status["batch"]["status"] == "completed"
        assert sorted(d.results("job")) == sorted(FILES)
        assert files_under(d.spool / "work" / "normal" / "job") == sorted(FILES)
        assert d.events("input_move_failed")
    finally:
        assert d.stop(60) == 0

    d.start()  # archive still full: recovery must not stop start-up
    assert d.stop(60) == 0
    assert "No space left on device" in d.events("recovery_reconcile_failed")[0]["error"]
    assert files_under(d.spool / "work" / "normal" / "job") == sorted(FILES)

    filler.unlink()
    d.start()
    try:
        wait_until(lambda: files_under(d.spool / "work") == [], 30, what="work/ to empty")
        assert files_under(d.spool / "archive" / "job") == sorted(FILES)
        assert {rel: runs(d.state, "done", rel) for rel in FILES} == dict.fromkeys(FILES, 1)
        status = d.status("job")
        assert status is not None and status["batch"]["status"] == "completed"
    finally:
        assert d.stop(60) == 0


def test_full_outbox_at_registration_is_not_a_claim_failure(tmp_path: Path, tmpfs: Mount) -> None:
    """A batch registered while the outbox is full is not reported as a failed claim (an
    upload would answer 500 for a batch that then runs); the status write failure is logged."""
    d = daemon(tmp_path, max_retries=0)
    outbox = tmpfs(d.spool / "outbox", "1m")
    d.start()
    try:
        fill(outbox)
        (d.inbox() / "one.csv").write_bytes(csv_bytes(1))
        wait_until(
            lambda: file_rows(d).get("one.csv", ("",))[0] == "failed", 60, what="file to end"
        )
        assert d.events("batch_registered")
        assert d.events("claim_failed") == []
    finally:
        assert d.stop(60) == 0
