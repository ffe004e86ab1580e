"""Tests for batchd.spool: layout, claiming, member scanning, outbox writes, input moves."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchd.config import Priority
from batchd.fsutil import owner_name, write_json_atomic
from batchd.records import NewFile
from batchd.spool import XDEV_SUFFIX, Spool
from batchd.testing.settings import make_settings

PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n"
CSV = b"name,qty\napple,3\npear,5\n"
IS_ROOT = os.geteuid() == 0


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(make_settings(tmp_path))
    spool.init()
    return spool


def make_spool(tmp_path: Path, **env: str) -> Spool:
    spool = Spool(make_settings(tmp_path, **env))
    spool.init()
    return spool


def write(path: Path, data: bytes = CSV) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def by_relpath(members: list[NewFile]) -> dict[str, NewFile]:
    return {m.relpath: m for m in members}


def tree(folder: Path) -> set[str]:
    """Every entry under ``folder``, relative, folders with a trailing slash."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        out |= {(here / d).relative_to(folder).as_posix() + "/" for d in dirnames}
        out |= {(here / f).relative_to(folder).as_posix() for f in filenames}
    return out


# -- layout ---------------------------------------------------------------------


def test_init_creates_the_spec_layout(tmp_path: Path) -> None:
    """init creates inbox/<prio>, work, outbox, archive, failed and state, without warnings."""
    spool = Spool(make_settings(tmp_path))
    assert spool.init() == []
    root = tmp_path / "spool"
    for folder in ("inbox/high", "inbox/normal", "inbox/low", "work", "outbox", "archive"):
        assert (root / folder).is_dir(), folder
    assert (root / "failed").is_dir()
    assert (root / "state").is_dir()
    assert {p.name for p in (root / "inbox").iterdir()} == {"high", "normal", "low"}


def test_init_is_idempotent(spool: Spool) -> None:
    """A second init on an existing spool changes nothing and warns of nothing."""
    write(spool.inbox_for(Priority.LOW) / "keep.csv")
    assert spool.init() == []
    assert (spool.inbox_for(Priority.LOW) / "keep.csv").read_bytes() == CSV


def test_init_refuses_a_root_that_is_a_file(tmp_path: Path) -> None:
    """A spool root that is a regular file raises SpoolError naming the folder."""
    from batchd.errors import SpoolError

    (tmp_path / "spool").write_text("not a folder")
    with pytest.raises(SpoolError, match="cannot create"):
        Spool(make_settings(tmp_path)).init()


def test_ignored_names_follow_watch_ignore(spool: Spool) -> None:
    """The default ignore patterns match work-in-progress names only."""
    for name in (".hidden", "~$book.xlsx", "a.tmp", "a.part", "a.partial", "a.crdownload", "a.swp"):
        assert spool.ignored(name), name
    for name in ("a.csv", "report.pdf", "tmp", "part.csv"):
        assert not spool.ignored(name), name


def test_priority_of_maps_any_path_to_its_drop(spool: Spool) -> None:
    """A path deep inside an inbox drop maps to its priority and top-level drop."""
    deep = spool.inbox_for(Priority.HIGH) / "drop" / "a" / "b.csv"
    assert spool.priority_of(deep) == (Priority.HIGH, spool.inbox_for(Priority.HIGH) / "drop")
    assert spool.priority_of(spool.inbox_for(Priority.HIGH)) is None
    assert spool.priority_of(spool.outbox / "x") is None


# -- claiming ---------------------------------------------------------------------


def test_claim_folder_moves_it_into_work(spool: Spool) -> None:
    """A claimed folder becomes work/<prio>/<name> with its tree intact and leaves the inbox."""
    source = spool.inbox_for(Priority.HIGH) / "drop"
    write(source / "a.csv")
    write(source / "sub" / "b.pdf", PDF)
    owner = owner_name(source.lstat())
    claimed = spool.claim(source, Priority.HIGH, "drop")
    assert claimed is not None
    assert claimed.path == spool.work / "high" / "drop"
    assert (claimed.name, claimed.priority, claimed.source, claimed.user_id) == (
        "drop",
        Priority.HIGH,
        str(source),
        owner,
    )
    assert tree(claimed.path) == {"a.csv", "sub/", "sub/b.pdf"}
    assert not source.exists()
    assert list(spool.inbox_for(Priority.HIGH).iterdir()) == []


def test_claim_loose_file_becomes_a_folder(spool: Spool) -> None:
    """A loose file is claimed into work/<prio>/<name>/<file>."""
    source = write(spool.inbox_for(Priority.NORMAL) / "menu.pdf", PDF)
    claimed = spool.claim(source, Priority.NORMAL, "menu.pdf.2")
    assert claimed is not None
    assert claimed.path == spool.work / "normal" / "menu.pdf.2"
    assert (claimed.path / "menu.pdf").read_bytes() == PDF
    assert not source.exists()


def test_claim_of_top_level_symlink_moves_the_link_only(spool: Spool, tmp_path: Path) -> None:
    """A symlink dropped in the inbox is claimed as a link; its target stays untouched."""
    target = write(tmp_path / "elsewhere" / "secret.csv")
    link = spool.inbox_for(Priority.NORMAL) / "link.csv"
    link.symlink_to(target)
    claimed = spool.claim(link, Priority.NORMAL, "link.csv")
    assert claimed is not None
    moved = claimed.path / "link.csv"
    assert moved.is_symlink()
    assert target.read_bytes() == CSV
    (member,) = spool.scan(claimed.path)
    assert member.error is not None and "symbolic link" in member.error


def test_claim_of_vanished_source_returns_none(spool: Spool) -> None:
    """A drop that disappeared before the claim gives None and leaves no folder behind."""
    gone = spool.inbox_for(Priority.NORMAL) / "gone.csv"
    assert spool.claim(gone, Priority.NORMAL, "gone.csv") is None
    assert list((spool.work / "normal").iterdir()) == []


def test_unique_name_counts_up_past_taken_names(spool: Spool) -> None:
    """unique_name gives name, then name.2, name.3 while outbox/<name> exists."""
    never = lambda name: False  # noqa: E731
    assert spool.unique_name("drop", never) == "drop"
    (spool.outbox / "drop").mkdir()
    assert spool.unique_name("drop", never) == "drop.2"
    (spool.outbox / "drop.2").mkdir()
    assert spool.unique_name("drop", never) == "drop.3"


def test_unique_name_asks_the_store_too(spool: Spool) -> None:
    """A name the store knows (or one in archive/, failed/, work/) is not reused."""
    (spool.archive / "x").mkdir()
    (spool.failed / "x.2").mkdir()
    (spool.work / "low" / "x.3").mkdir()
    assert spool.unique_name("x", lambda name: name == "x.4") == "x.5"


def test_finish_cross_device_removes_the_redundant_source(spool: Spool) -> None:
    """A claim copied across devices whose source delete was cut short is completed."""
    source = spool.inbox_for(Priority.NORMAL) / "drop"
    write(source / "a.csv")
    target = spool.work / "normal" / "drop"
    shutil.copytree(source, target)
    st = source.lstat()
    write_json_atomic(
        target.with_name("drop" + XDEV_SUFFIX),
        {"source": str(source), "ino": st.st_ino, "dev": st.st_dev},
    )
    spool.finish_cross_device()
    assert not source.exists()
    assert (target / "a.csv").read_bytes() == CSV
    assert tree(spool.work / "normal") == {"drop/", "drop/a.csv"}


def test_finish_cross_device_keeps_a_new_drop_of_the_same_name(spool: Spool) -> None:
    """When the inbox entry is a different file (new inode), it is not deleted."""
    source = write(spool.inbox_for(Priority.NORMAL) / "drop" / "a.csv")
    target = spool.work / "normal" / "drop"
    shutil.copytree(source.parent, target)
    write_json_atomic(
        target.with_name("drop" + XDEV_SUFFIX),
        {"source": str(source.parent), "ino": source.parent.lstat().st_ino + 1, "dev": 0},
    )
    spool.finish_cross_device()
    assert source.read_bytes() == CSV
    assert not target.with_name("drop" + XDEV_SUFFIX).exists()


def test_finish_cross_device_drops_an_incomplete_copy(spool: Spool) -> None:
    """A copy cut short before its rename is removed and the inbox source kept."""
    source = write(spool.inbox_for(Priority.NORMAL) / "drop" / "a.csv")
    partial = spool.work / "normal" / ".drop.incoming"
    write(partial / "a.csv", b"name,q")
    st = source.parent.lstat()
    write_json_atomic(
        spool.work / "normal" / ("drop" + XDEV_SUFFIX),
        {"source": str(source.parent), "ino": st.st_ino, "dev": st.st_dev},
    )
    spool.finish_cross_device()
    assert source.read_bytes() == CSV
    assert list((spool.work / "normal").iterdir()) == []


def test_finish_cross_device_completes_a_loose_file_claim(spool: Spool) -> None:
    """A loose file copied across devices has its redundant inbox source removed."""
    source = write(spool.inbox_for(Priority.NORMAL) / "f.csv")
    batch = spool.work / "normal" / "f.csv"
    batch.mkdir()
    target = batch / "f.csv"
    shutil.copy2(source, target)
    st = source.lstat()
    # Exactly where _copy_claim writes its marker: beside the batch folder.
    write_json_atomic(
        batch.with_name(batch.name + XDEV_SUFFIX),
        {"source": str(source), "ino": st.st_ino, "dev": st.st_dev},
    )
    spool.finish_cross_device()
    assert not source.exists()
    assert tree(batch) == {"f.csv"}


@pytest.fixture
def other_device_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder on another filesystem than tmp_path (skips when there is none)."""
    base = Path("/dev/shm")
    if not base.is_dir() or base.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem (/dev/shm) to claim across")
    try:
        folder = Path(tempfile.mkdtemp(prefix="batchd-test-", dir=base))
    except OSError as exc:
        pytest.skip(f"/dev/shm is not writable: {exc}")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_claim_across_devices_copies_then_removes(tmp_path: Path, other_device_dir: Path) -> None:
    """With the inbox on another filesystem, a folder claim copies, then deletes the source."""
    spool = make_spool(tmp_path)
    inbox = spool.inbox_for(Priority.LOW)
    inbox.rmdir()
    inbox.symlink_to(other_device_dir)
    source = inbox / "drop"
    write(source / "a.csv")
    write(source / "d" / "b.pdf", PDF)
    claimed = spool.claim(source, Priority.LOW, "drop")
    assert claimed is not None
    assert tree(claimed.path) == {"a.csv", "d/", "d/b.pdf"}
    assert (claimed.path / "d" / "b.pdf").read_bytes() == PDF
    assert list(other_device_dir.iterdir()) == []
    assert tree(spool.work / "low") == {"drop/", "drop/a.csv", "drop/d/", "drop/d/b.pdf"}


# -- scanning members -----------------------------------------------------------------


def test_scan_lists_nested_relpaths(spool: Spool) -> None:
    """Every regular file in the tree is a member, with its relative path and size."""
    folder = spool.work / "normal" / "b"
    write(folder / "top.csv")
    write(folder / "a" / "b" / "c.csv")
    write(folder / "a" / "doc.pdf", PDF)
    found = spool.scan(folder)
    assert [(m.relpath, m.file_size, m.error) for m in found] == [
        ("a/b/c.csv", len(CSV), None),
        ("a/doc.pdf", len(PDF), None),
        ("top.csv", len(CSV), None),
    ]
    # Each member carries the device and inode the scan saw.
    top = (folder / "top.csv").stat()
    assert (found[2].file_dev, found[2].file_ino) == (top.st_dev, top.st_ino)


def test_scan_leaves_out_marker_and_ignored_names(spool: Spool) -> None:
    """The top-level marker and ignored names are not members; a nested '.ready' is ignored too."""
    folder = spool.work / "normal" / "b"
    write(folder / "a.csv")
    write(folder / ".ready", b"")
    write(folder / "upload.part", b"x")
    write(folder / "~$lock.xlsx", b"x")
    write(folder / "sub" / "x.tmp", b"x")
    write(folder / ".git" / "config", b"x")
    assert [m.relpath for m in spool.scan(folder)] == ["a.csv"]


def test_scan_marker_below_top_is_a_member(tmp_path: Path) -> None:
    """Only the marker at the folder's top is special; a same-named file deeper is a member."""
    spool = make_spool(tmp_path, watch__marker="READY", limits__allowed_types='["*"]')
    folder = spool.work / "normal" / "b"
    write(folder / "READY", b"")
    write(folder / "sub" / "READY", b"")
    assert [m.relpath for m in spool.scan(folder)] == ["sub/READY"]


def test_scan_symlink_is_a_failed_member_and_not_followed(spool: Spool, tmp_path: Path) -> None:
    """A symlink is recorded with an error; its target is neither read nor listed."""
    secret = write(tmp_path / "secret.csv")
    folder = spool.work / "normal" / "b"
    write(folder / "ok.csv")
    (folder / "link.csv").symlink_to(secret)
    (folder / "linkdir").symlink_to(tmp_path)
    members = by_relpath(spool.scan(folder))
    assert set(members) == {"ok.csv", "link.csv", "linkdir"}
    for name in ("link.csv", "linkdir"):
        assert members[name].file_size is None
        assert members[name].error is not None
        assert "symbolic link" in members[name].error
    assert members["ok.csv"].error is None


def test_scan_fifo_is_not_read(spool: Spool) -> None:
    """A FIFO is a failed member whose error says FIFO (and scanning does not block)."""
    folder = spool.work / "normal" / "b"
    folder.mkdir(parents=True)
    os.mkfifo(folder / "pipe")
    (member,) = spool.scan(folder)
    assert member.relpath == "pipe"
    assert member.error is not None
    assert "FIFO" in member.error


def test_scan_socket_is_not_read(spool: Spool, tmp_path: Path) -> None:
    """A Unix socket is a failed member whose error says socket."""
    folder = spool.work / "normal" / "b"
    folder.mkdir(parents=True)
    path = folder / "s"
    if len(str(path)) > 100:
        pytest.skip("tmp_path too long for an AF_UNIX address")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        (member,) = spool.scan(folder)
    finally:
        sock.close()
    assert member.error is not None
    assert "socket" in member.error


def test_scan_over_size_names_the_limit(tmp_path: Path) -> None:
    """A file over max_file_bytes fails with an error naming limits.max_file_bytes."""
    spool = make_spool(tmp_path, limits__max_file_bytes="10")
    folder = spool.work / "normal" / "b"
    write(folder / "big.csv", CSV)
    write(folder / "small.csv", b"a,b\n1,2\n")
    members = by_relpath(spool.scan(folder))
    assert members["big.csv"].error is not None
    assert "limits.max_file_bytes" in members["big.csv"].error
    assert str(len(CSV)) in members["big.csv"].error
    assert members["big.csv"].file_size == len(CSV)
    assert members["small.csv"].error is None


def test_scan_wrong_content_names_allowed_types(spool: Spool) -> None:
    """A .pdf holding plain text fails with an error naming the allowed types."""
    folder = spool.work / "normal" / "b"
    write(folder / "fake.pdf", b"Just some words.\nNot a PDF at all.\n")
    write(folder / "real.pdf", PDF)
    members = by_relpath(spool.scan(folder))
    error = members["fake.pdf"].error
    assert error is not None
    assert "limits.allowed_types" in error
    assert "pdf, xlsx, xls, csv" in error
    assert members["real.pdf"].error is None


def test_scan_star_allows_any_content(tmp_path: Path) -> None:
    """allowed_types = ["*"] accepts any regular file."""
    spool = make_spool(tmp_path, limits__allowed_types='["*"]')
    folder = spool.work / "normal" / "b"
    write(folder / "fake.pdf", b"plain words\n")
    write(folder / "blob.bin", bytes(range(256)))
    write(folder / "empty", b"")
    assert all(m.error is None for m in spool.scan(folder))


@pytest.mark.skipif(IS_ROOT, reason="root reads every file whatever its mode")
def test_scan_unreadable_file_gives_the_os_error(spool: Spool) -> None:
    """A file without read permission fails with the OS error text."""
    folder = spool.work / "normal" / "b"
    path = write(folder / "locked.csv")
    path.chmod(0)
    try:
        (member,) = spool.scan(folder)
    finally:
        path.chmod(0o644)
    assert member.error is not None
    assert "Permission denied" in member.error


# -- inputs after processing -------------------------------------------------------------


def claimed_batch(spool: Spool, name: str = "b") -> str:
    """A claimed folder with a nested file; returns its work path."""
    folder = spool.work / "normal" / name
    write(folder / "d" / "a.csv")
    return spool.rel(folder)


def test_settle_input_success_goes_to_archive(spool: Spool) -> None:
    """A completed file's input moves to archive/<batch>/<relpath>."""
    work = claimed_batch(spool)
    spool.settle_input(work, "b", "d/a.csv", ok=True)
    assert (spool.archive / "b" / "d" / "a.csv").read_bytes() == CSV
    assert not (spool.root / work / "d" / "a.csv").exists()


def test_settle_input_failure_goes_to_failed(spool: Spool) -> None:
    """A failed file's input moves to failed/<batch>/<relpath>."""
    work = claimed_batch(spool)
    spool.settle_input(work, "b", "d/a.csv", ok=False)
    assert (spool.failed / "b" / "d" / "a.csv").read_bytes() == CSV
    assert not (spool.archive / "b").exists()


def test_settle_input_deletes_without_keep_inputs(tmp_path: Path) -> None:
    """With spool.keep_inputs = false a completed input is deleted, not archived."""
    spool = make_spool(tmp_path, spool__keep_inputs="false")
    work = claimed_batch(spool)
    spool.settle_input(work, "b", "d/a.csv", ok=True)
    assert not (spool.root / work / "d" / "a.csv").exists()
    assert not (spool.archive / "b").exists()


def test_settle_input_keeps_failed_inputs_without_keep_inputs(tmp_path: Path) -> None:
    """keep_inputs = false never deletes a failed input: it goes to failed/."""
    spool = make_spool(tmp_path, spool__keep_inputs="false")
    work = claimed_batch(spool)
    spool.settle_input(work, "b", "d/a.csv", ok=False)
    assert (spool.failed / "b" / "d" / "a.csv").exists()


def test_settle_input_twice_is_harmless(spool: Spool) -> None:
    """Settling an input that was already moved does nothing (recovery re-runs)."""
    work = claimed_batch(spool)
    spool.settle_input(work, "b", "d/a.csv", ok=True)
    spool.settle_input(work, "b", "d/a.csv", ok=True)
    assert (spool.archive / "b" / "d" / "a.csv").exists()


def test_finalize_archives_leftovers_and_release_removes_work_folder(spool: Spool) -> None:
    """finalize moves non-members to archive/, deletes the marker and empties the batch's
    folder in work/; release then removes the folder."""
    folder = spool.work / "normal" / "b"
    write(folder / ".ready", b"")
    write(folder / "notes.tmp", b"draft")
    write(folder / "sub" / ".DS_Store", b"junk")
    (folder / "empty").mkdir()
    spool.finalize(spool.rel(folder), "b")
    assert list(folder.iterdir()) == []
    spool.release(spool.rel(folder))
    assert not folder.exists()
    assert (spool.archive / "b" / "notes.tmp").read_bytes() == b"draft"
    assert (spool.archive / "b" / "sub" / ".DS_Store").read_bytes() == b"junk"
    assert not (spool.archive / "b" / ".ready").exists()


def test_finalize_of_missing_folder_is_a_no_op(spool: Spool) -> None:
    """finalize of a batch already gone from work/ does nothing."""
    spool.finalize("work/normal/nothing", "nothing")
    assert not (spool.archive / "nothing").exists()


def test_locate_input_brings_back_a_failed_input(spool: Spool) -> None:
    """locate_input moves a re-queued file back from failed/ into work/."""
    work = claimed_batch(spool)
    spool.settle_input(work, "b", "d/a.csv", ok=False)
    path = spool.locate_input(work, "b", "d/a.csv")
    assert path == spool.root / work / "d" / "a.csv"
    assert path.read_bytes() == CSV
    assert not (spool.failed / "b" / "d" / "a.csv").exists()


def test_locate_input_brings_back_an_archived_input(spool: Spool) -> None:
    """locate_input also finds an input already archived (after finalize)."""
    work = claimed_batch(spool)
    spool.settle_input(work, "b", "d/a.csv", ok=True)
    spool.finalize(work, "b")
    path = spool.locate_input(work, "b", "d/a.csv")
    assert path is not None and path.read_bytes() == CSV


def test_locate_input_in_place_and_missing(spool: Spool) -> None:
    """locate_input returns the work path when present, None when nowhere."""
    work = claimed_batch(spool)
    assert spool.locate_input(work, "b", "d/a.csv") == spool.root / work / "d" / "a.csv"
    assert spool.locate_input(work, "b", "nope.csv") is None


# -- outbox writes ---------------------------------------------------------------------------


def test_write_json_atomic_writes_and_leaves_no_temp(tmp_path: Path) -> None:
    """write_json_atomic creates parent folders, writes the JSON, leaves no temp file."""
    path = tmp_path / "out" / "b" / "status.json"
    write_json_atomic(path, {"batch_id": "x", "n": [1, 2]})
    assert json.loads(path.read_text()) == {"batch_id": "x", "n": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["status.json"]


def test_write_json_atomic_replaces_by_rename(tmp_path: Path) -> None:
    """A reader holding the old file keeps the old content: the new one is a new inode."""
    path = tmp_path / "status.json"
    write_json_atomic(path, {"v": 1})
    with path.open() as old:
        write_json_atomic(path, {"v": 2})
        assert json.load(old) == {"v": 1}
    assert json.loads(path.read_text()) == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_write_json_atomic_failure_keeps_old_file(tmp_path: Path) -> None:
    """Data that cannot be serialised leaves the old file and no temporary behind."""
    path = tmp_path / "status.json"
    write_json_atomic(path, {"v": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"v": object()})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_readers_never_see_a_partial_file(tmp_path: Path) -> None:
    """While a writer rewrites the file repeatedly, every read parses as whole JSON."""
    path = tmp_path / "status.json"
    write_json_atomic(path, {"n": 0, "pad": "x" * 50_000})
    stop = threading.Event()
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                json.loads(path.read_text())
            except ValueError as exc:
                bad.append(str(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for n in range(1, 100):
            write_json_atomic(path, {"n": n, "pad": "x" * 50_000})
    finally:
        stop.set()
        thread.join(timeout=30)
    assert bad == []


def test_result_and_status_paths(spool: Spool) -> None:
    """Results go to outbox/<batch>/results/<relpath>.json, status to <batch>/status.json."""
    assert spool.result_path("b", "a/b/c.csv") == spool.outbox / "b" / "results" / "a/b/c.csv.json"
    assert spool.status_path("b") == spool.outbox / "b" / "status.json"


def test_release_leaves_a_folder_that_is_not_empty(spool: Spool) -> None:
    """release removes only an empty folder: a file that appeared since is never deleted."""
    folder = spool.work / "normal" / "late"
    write(folder / "arrived-late.csv")
    spool.release(spool.rel(folder))
    assert (folder / "arrived-late.csv").read_bytes() == CSV


def test_adopt_does_not_take_a_name_another_process_reserved(spool: Spool) -> None:
    """An upload is not renamed onto an empty folder a claim in another process
    reserved after the name was checked: FileExistsError, both folders kept."""
    reserved = spool.work / "normal" / "upload-1"
    reserved.mkdir()
    upload = spool.new_upload_folder()
    write(upload / "a.csv")
    with pytest.raises(FileExistsError):
        spool.adopt(upload, Priority.NORMAL, "upload-1")
    assert reserved.is_dir() and list(reserved.iterdir()) == []
    assert (upload / "a.csv").exists()
    assert spool.adopt(upload, Priority.NORMAL, "upload-2") == spool.work / "normal" / "upload-2"
    assert (spool.work / "normal" / "upload-2" / "a.csv").exists()


def test_owner_name_asks_the_user_database_once_per_user_a_minute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every claim names the drop's owner; a burst of drops by one user asks
    getpwuid once, a renamed user shows once the name is older than
    OWNER_NAME_TTL_SECONDS, and a failed lookup is never remembered."""
    from batchd import fsutil

    asked: list[int] = []
    names = {"now": "alice"}

    class Entry:
        def __init__(self, name: str) -> None:
            self.pw_name = name

    def getpwuid(uid: int) -> Entry:
        asked.append(uid)
        if uid == 4242:
            raise KeyError(uid)
        return Entry(names["now"])

    clock = {"t": 1000.0}
    monkeypatch.setattr(fsutil.pwd, "getpwuid", getpwuid)
    monkeypatch.setattr(fsutil, "_monotonic", lambda: clock["t"])
    monkeypatch.setattr(fsutil, "_owner_names", {})
    st = os.stat_result((0o100644, 1, 1, 1, 4241, 0, 0, 0, 0, 0))
    gone = os.stat_result((0o100644, 1, 1, 1, 4242, 0, 0, 0, 0, 0))
    assert [owner_name(st) for _ in range(100)] == ["alice"] * 100
    # A failed lookup (no such user, or the directory away) is asked again.
    assert owner_name(gone) == "4242" and owner_name(gone) == "4242"
    assert asked == [4241, 4242, 4242]
    names["now"] = "alice2"
    clock["t"] += fsutil.OWNER_NAME_TTL_SECONDS - 1
    assert owner_name(st) == "alice"
    clock["t"] += 1
    assert owner_name(st) == "alice2"
    assert asked == [4241, 4242, 4242, 4241]
