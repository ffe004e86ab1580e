"""Bad input: every odd thing a user can drop ends in a documented state, and nothing is lost.

One daemon takes the whole corpus (odd names, sizes at the limit, links, FIFOs,
sockets, empty and temp-only folders); an unprivileged daemon meets unreadable
files and folders; a gated processor holds a batch while its inputs are
deleted, truncated or appended to. Each case is checked three ways: its row
and result document (status, error), where its bytes ended up, and that
nothing else is left in ``work/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from badinput_support import UnprivilegedDaemon, nobody_ids, pythonpath, unprivileged_python
from support import DaemonProcess, wait_until

from batchd.clock import SystemClock
from batchd.config import Priority
from batchd.daemon import build
from batchd.fsutil import fit_name
from batchd.spool import Spool
from batchd.testing.settings import make_settings

MAX_BYTES = 1024
ROW = b"dish,price\nsoup,4.50\n"
#: ROW truncated to its header: still a CSV (each attempt checks the member again).
SHORT = b"dish,price\n"
SYMLINK = "symbolic link: not followed, its target was not read"
NO_FILES = "batch has no files to process"
DENIED = "Permission denied"
LONG_X = "x" * 251 + ".csv"  # 255 bytes: no room left for ".json"
LONG_Y = "y" * 251 + ".csv"
DEEP = "/".join(f"l{i:02d}" for i in range(1, 31)) + "/deep.csv"  # 30 folders (limits.max_depth 32)


def sized_csv(size: int) -> bytes:
    body = b"id,value\n" + b"1,2\n" * size
    return body[: size - 1] + b"\n"


# -- looking at the spool ---------------------------------------------------------


def entries(root: Path) -> dict[str, tuple[str, Any]]:
    """Every non-folder entry under ``root`` (links to folders included, never
    followed): relative path -> (kind, bytes for a file / target for a link)."""
    out: dict[str, tuple[str, Any]] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in filenames + [d for d in dirnames if (here / d).is_symlink()]:
            path = here / name
            mode = path.lstat().st_mode
            rel = path.relative_to(root).as_posix()
            if stat.S_ISLNK(mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISFIFO(mode):
                out[rel] = ("fifo", None)
            elif stat.S_ISSOCK(mode):
                out[rel] = ("socket", None)
            elif mode & stat.S_IRUSR:
                out[rel] = ("file", path.read_bytes())
            else:
                out[rel] = ("file", None)  # unreadable by its owner: content checked elsewhere
    return out


def where_everything_is(spool: Path) -> dict[str, tuple[str, Any]]:
    """What users' entries are in inbox/, archive/ and failed/ (keys prefixed by the folder)."""
    found: dict[str, tuple[str, Any]] = {}
    for top in ("inbox", "archive", "failed"):
        for rel, value in entries(spool / top).items():
            found[f"{top}/{rel}"] = value
    return found


def work_leftovers(spool: Path) -> list[str]:
    """Anything left in ``work/`` beyond its empty skeleton."""
    skeleton = {"high", "normal", "low", ".uploads", ".scratch"}
    left = []
    for entry in (spool / "work").iterdir():
        if entry.name not in skeleton or any(entry.iterdir()):
            left.append(entry.name)
    return left


def outcomes(d: DaemonProcess) -> dict[tuple[str, str], tuple[str, str | None]]:
    """(batch name, relpath) -> (status, error) for every file row."""
    rows = d.db().execute(
        "SELECT j.name, f.relpath, f.status, f.error FROM batch_files f"
        " JOIN batch_jobs j ON j.id = f.batch_id"
    )
    return {(r[0], r[1]): (r[2], r[3]) for r in rows}


def result_docs(d: DaemonProcess, name: str) -> dict[str, dict[str, Any]]:
    """A batch's result documents keyed by the relpath written inside them."""
    base = d.spool / "outbox" / name / "results"
    docs = [json.loads(p.read_text()) for p in base.rglob("*.json")] if base.exists() else []
    return {doc["relpath"]: doc for doc in docs}


def assert_outcome(
    found: tuple[str, str | None] | None, status: str, error: str | None, case: str
) -> None:
    assert found is not None, f"{case}: no file row"
    assert found[0] == status, f"{case}: {found}"
    if error is None:
        assert found[1] is None, f"{case}: {found}"
    else:
        assert found[1] is not None and error in found[1], f"{case}: {found}"


# -- the corpus ---------------------------------------------------------------------


def test_every_bad_input_ends_documented_and_nothing_is_lost(tmp_path: Path) -> None:
    """Odd names, sizes at the limit, links, FIFOs, sockets, empty and temp-only drops:
    each ends in its documented state with a clear error, and every entry is accounted for."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"TOP-SECRET-7f3a\n")
    outside = tmp_path / "outside.csv"
    outside.write_bytes(ROW)
    staging = tmp_path / "staging"
    corpus = staging / "corpus"
    corpus.mkdir(parents=True)
    # corpus member relpath -> (status, error fragment, dropped entry); None: not a member
    members: dict[str, tuple[str, str | None]] = {}
    dropped: dict[str, tuple[str, Any]] = {}  # corpus relpath as batchd names it -> entry

    def put(rel: str, data: bytes, status: str = "completed", error: str | None = None) -> None:
        path = corpus / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        members[rel] = (status, error)
        dropped[rel] = ("file", data)

    put("empty.csv", b"", "failed", "content is empty")
    put("one.csv", b"a")
    put("at-limit.csv", sized_csv(MAX_BYTES))
    put("over-limit.csv", sized_csv(MAX_BYTES + 1), "failed", "over limits.max_file_bytes (1024)")
    for odd in ("with space.csv", "new\nline.csv", "quo\"te's.csv", "-leading-dash.csv", "--help"):
        put(odd if odd.endswith(".csv") else odd + ".csv", ROW)
    put(LONG_X, ROW)
    put(DEEP, ROW)
    (corpus / os.fsdecode(b"caf\xe9 menu.csv")).write_bytes(ROW)  # Latin-1 name: not UTF-8
    members["caf\\xe9 menu.csv"] = ("completed", None)
    dropped["caf\\xe9 menu.csv"] = ("file", ROW)
    os.link(outside, corpus / "hardlink.csv")  # a hard link to a file outside the drop
    members["hardlink.csv"] = ("completed", None)
    dropped["hardlink.csv"] = ("file", ROW)
    links = {
        "link-file": "one.csv",
        "link-dir": "l01",
        "dangling": "/nonexistent/batchd-test",
        "loop": "loop",
        "link-secret.csv": str(secret),
    }
    for rel, target in links.items():
        os.symlink(target, corpus / rel)
        members[rel] = ("failed", SYMLINK)
        dropped[rel] = ("link", target)
    os.mkfifo(corpus / "fifo.csv")
    members["fifo.csv"] = ("failed", "not a regular file (FIFO): not read")
    dropped["fifo.csv"] = ("fifo", None)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(corpus / "s.sock"))
    sock.close()
    members["s.sock"] = ("failed", "not a regular file (socket): not read")
    dropped["s.sock"] = ("socket", None)
    (corpus / "empty-dir").mkdir()
    (corpus / "only-temp").mkdir()
    for rel in ("only-temp/draft.tmp", "only-temp/.~lock.csv#"):
        (corpus / rel).write_bytes(b"work in progress")
        dropped[rel] = ("file", b"work in progress")  # not members: archived with the batch

    d = DaemonProcess(tmp_path, limits={"max_file_bytes": MAX_BYTES})
    d.spool.mkdir()
    normal, high = d.spool / "inbox" / "normal", d.spool / "inbox" / "high"
    normal.mkdir(parents=True)
    high.mkdir(parents=True)
    os.rename(corpus, normal / "corpus")
    # Loose drops: batch name -> (inbox entry, status, error, entry)
    not_utf8 = normal / os.fsdecode(b"loose\xff.csv")
    loose: dict[str, tuple[Path, str, str | None, tuple[str, Any]]] = {
        "loose\\xff.csv": (not_utf8, "completed", None, ("file", ROW)),
        LONG_Y: (high / LONG_Y, "completed", None, ("file", ROW)),
        fit_name(LONG_Y, ".2"): (normal / LONG_Y, "completed", None, ("file", ROW)),
        "-n.csv": (normal / "-n.csv", "completed", None, ("file", ROW)),
        "two\nlines.csv": (normal / "two\nlines.csv", "completed", None, ("file", ROW)),
        "toplink.csv": (normal / "toplink.csv", "failed", SYMLINK, ("link", str(secret))),
        "topfifo": (normal / "topfifo", "failed", "not a regular file (FIFO)", ("fifo", None)),
    }
    for path, _status, _error, (kind, payload) in loose.values():
        if kind == "file":
            path.write_bytes(payload)
        elif kind == "link":
            os.symlink(payload, path)
        else:
            os.mkfifo(path)
    # Drops that must wait in the inbox, untouched.
    waiting = {
        "inbox/normal/.hidden.csv": ("file", ROW),
        "inbox/normal/draft.csv.part": ("file", ROW),
        "inbox/normal/temp-only/a.tmp": ("file", b"half"),
    }
    for rel, (_kind, data) in waiting.items():
        (d.spool / rel).parent.mkdir(parents=True, exist_ok=True)
        (d.spool / rel).write_bytes(data)
    (normal / "empty-drop").mkdir()
    for name, extra in (("empty-marked", None), ("temp-marked", "b.part")):
        (normal / name).mkdir()
        (normal / name / ".ready").touch()
        if extra:
            (normal / name / extra).write_bytes(b"partial")
    total_entries = len(dropped) + len(loose) + len(waiting) + 1

    d.start()
    try:
        names = ["corpus", "empty-marked", "temp-marked", *loose]
        for name in names:
            d.wait_batch(name)
    finally:
        assert d.stop() == 0

    rows = outcomes(d)
    batches = {
        r[0]: (r[1], r[2], r[3])
        for r in d.db().execute("SELECT name, status, total_files, error FROM batch_jobs")
    }
    assert sorted(batches) == sorted(names)
    assert batches["corpus"][:2] == ("failed", len(members))
    for name in ("empty-marked", "temp-marked"):
        assert batches[name] == ("failed", 0, NO_FILES), name
    corpus_docs = result_docs(d, "corpus")
    assert sorted(corpus_docs) == sorted(members)
    for rel, (status, error) in members.items():
        assert_outcome(rows.get(("corpus", rel)), status, error, f"corpus/{rel!r}")
        assert corpus_docs[rel]["status"] == status, rel
    for name, (_path, status, error, _entry) in loose.items():
        assert batches[name][:2] == (status, 1), name
        relpath = name if name != fit_name(LONG_Y, ".2") else LONG_Y
        assert_outcome(rows.get((name, relpath)), status, error, f"loose {name!r}")
        assert sorted(result_docs(d, name)) == [relpath], name

    # Where every entry ended: members by outcome, the rest archived or still waiting.
    expected: dict[str, tuple[str, Any]] = dict(waiting)
    for rel, entry in dropped.items():
        status = members.get(rel, ("completed", None))[0]
        expected[f"{'archive' if status == 'completed' else 'failed'}/corpus/{rel}"] = entry
    for name, (_path, status, _error, entry) in loose.items():
        relpath = name if name != fit_name(LONG_Y, ".2") else LONG_Y
        expected[f"{'archive' if status == 'completed' else 'failed'}/{name}/{relpath}"] = entry
    expected["archive/temp-marked/b.part"] = ("file", b"partial")
    assert where_everything_is(d.spool) == expected
    assert len(expected) == total_entries  # lost: 0
    assert (normal / "empty-drop").is_dir()  # an empty folder waits
    assert work_leftovers(d.spool) == []
    assert outside.read_bytes() == ROW and os.stat(outside).st_nlink == 2
    # A link's target is never read: its bytes are nowhere in the outbox.
    for path in (d.spool / "outbox").rglob("*"):
        if path.is_file():
            assert b"TOP-SECRET" not in path.read_bytes(), path
    # A name with no room for ".json" gets a shortened result file that names it whole.
    long_results = [p.name for p in (d.spool / "outbox" / "corpus" / "results").iterdir()]
    assert fit_name(LONG_X, ".json") in long_results
    assert corpus_docs[LONG_X]["filename"] == LONG_X
    # Documents are 0640 whatever the daemon's umask: the group reads them
    # (not mkstemp's 0600), only batchd may change them.
    outbox = d.spool / "outbox" / "corpus"
    for doc in (outbox / "status.json", outbox / "results" / "one.csv.json"):
        assert stat.S_IMODE(doc.stat().st_mode) == 0o640, doc


# -- unreadable input (a daemon without root's privileges) ---------------------------


@pytest.fixture(scope="module")
def unreadable_run() -> Iterator[UnprivilegedDaemon]:
    """One run of an unprivileged daemon over unreadable files and folders."""
    python = unprivileged_python()
    if python is None:
        pytest.skip("needs root, setpriv and a Python the user nobody can run")
    # Not tmp_path: pytest's base folder is private to root, and nobody must reach the spool.
    tmp = Path(tempfile.mkdtemp(prefix="batchd-unreadable-"))
    try:
        os.chmod(tmp, 0o755)
        uid, gid = nobody_ids()
        os.chown(tmp, uid, gid)
        d = UnprivilegedDaemon(tmp, python)
        normal = d.spool / "inbox" / "normal"
        normal.mkdir(parents=True)
        for path in (d.spool, d.spool / "inbox", normal):
            os.chown(path, uid, gid)
        # A loose file of root's, mode 0600: batchd may move it, never read it.
        (normal / "secret.csv").write_bytes(ROW)
        os.chmod(normal / "secret.csv", 0o600)
        mixed = tmp / "mixed"
        (mixed / "locked-dir").mkdir(parents=True)
        (mixed / "ok.csv").write_bytes(ROW)
        (mixed / "locked.csv").write_bytes(ROW)
        (mixed / "locked-dir" / "inside.csv").write_bytes(ROW)
        sealed = tmp / "sealed"
        sealed.mkdir()
        (sealed / "inside.csv").write_bytes(ROW)
        for path in (mixed, *mixed.rglob("*"), sealed, *sealed.rglob("*")):
            os.chown(path, uid, gid)
        for path in (mixed / "locked.csv", mixed / "locked-dir", sealed):
            os.chmod(path, 0)
        os.rename(mixed, normal / "mixed")
        os.rename(sealed, normal / "sealed")
        d.start()
        try:
            d.wait_batch("secret.csv")
            d.wait_batch("mixed")
        finally:
            assert d.stop() == 0
        yield d
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_unreadable_files_and_folders_fail_with_the_os_error(
    unreadable_run: UnprivilegedDaemon,
) -> None:
    """An unreadable file or folder fails with "Permission denied" and moves to failed/
    with its mode kept; its readable siblings complete."""
    d = unreadable_run
    rows = outcomes(d)
    assert_outcome(rows.get(("secret.csv", "secret.csv")), "failed", DENIED, "secret.csv")
    assert_outcome(rows.get(("mixed", "locked.csv")), "failed", f"cannot read file: {DENIED}", "")
    assert_outcome(
        rows.get(("mixed", "locked-dir")), "failed", f"cannot read folder: {DENIED}", "locked-dir"
    )
    assert_outcome(rows.get(("mixed", "ok.csv")), "completed", None, "ok.csv")
    assert sorted(result_docs(d, "mixed")) == ["locked-dir", "locked.csv", "ok.csv"]
    failed = d.spool / "failed"
    assert stat.S_IMODE((failed / "mixed" / "locked-dir").lstat().st_mode) == 0
    assert stat.S_IMODE((failed / "mixed" / "locked.csv").lstat().st_mode) == 0
    assert (failed / "mixed" / "locked-dir" / "inside.csv").read_bytes() == ROW
    assert (failed / "secret.csv" / "secret.csv").read_bytes() == ROW
    assert (d.spool / "archive" / "mixed" / "ok.csv").read_bytes() == ROW
    assert work_leftovers(d.spool) == []


def test_unreadable_dropped_folder_waits_in_the_inbox(unreadable_run: UnprivilegedDaemon) -> None:
    """A dropped folder batchd cannot read stays in the inbox, whole (it cannot be moved)."""
    sealed = unreadable_run.spool / "inbox" / "normal" / "sealed"
    assert (sealed / "inside.csv").read_bytes() == ROW
    assert stat.S_IMODE(sealed.lstat().st_mode) == 0
    names = [r[0] for r in unreadable_run.db().execute("SELECT name FROM batch_jobs")]
    assert "sealed" not in names


def test_unreadable_dropped_folder_is_reported(unreadable_run: UnprivilegedDaemon) -> None:
    """A dropped folder batchd cannot read is named in a drop_unreadable warning."""
    events = unreadable_run.events("drop_unreadable")
    assert [e["path"].rsplit("/", 1)[-1] for e in events][:1] == ["sealed"]
    assert DENIED in events[0]["error"]


# -- inputs that change under batchd -------------------------------------------------


def test_drop_deleted_or_truncated_between_readiness_and_claim(tmp_path: Path) -> None:
    """A drop gone before its claim registers nothing; one truncated is registered as it
    now is (an empty .csv is refused as empty)."""
    settings = make_settings(tmp_path)
    Spool(settings).init()
    parts = build(settings, SystemClock())  # the daemon's own assembly; nothing started
    spool, store, intake = parts.spool, parts.store, parts.intake
    try:
        inbox = spool.inbox_for(Priority.NORMAL)
        gone = inbox / "gone.csv"
        gone.write_bytes(ROW)
        shrunk = inbox / "shrunk.csv"
        shrunk.write_bytes(ROW)
        gone.unlink()  # deleted after the watcher found it ready
        assert intake.take_drop(gone, Priority.NORMAL) is None
        shrunk.write_bytes(b"")  # truncated after the watcher found it ready
        batch = intake.take_drop(shrunk, Priority.NORMAL)
        assert batch is not None and batch.status == "failed"
        [file] = store.list_files(batch.id)
        assert (file.relpath, file.file_size, file.status) == ("shrunk.csv", 0, "failed")
        assert file.error is not None and "content is empty" in file.error
        assert [b.name for b in store.list_batches(10, 0, None, None)] == ["shrunk.csv"]
        assert (spool.failed / "shrunk.csv" / "shrunk.csv").read_bytes() == b""
        assert work_leftovers(spool.root) == []
    finally:
        store.close()


def held_daemon(tmp_path: Path) -> DaemonProcess:
    d = DaemonProcess(
        tmp_path,
        processing={"processor": "batchd.testing.procs:held", "concurrency": 1},
    )
    return d


def test_input_deleted_or_truncated_while_queued(tmp_path: Path) -> None:
    """A queued input deleted from work/ fails with a clear error; one truncated (still
    a valid member) is processed as it now is; the rest of the batch goes on."""
    d = held_daemon(tmp_path)
    (d.state / "hold-a-gate.csv").touch()
    d.start(PYTHONPATH=pythonpath())
    try:
        files = {"a-gate.csv": ROW, "b-deleted.csv": ROW, "c-truncated.csv": ROW, "d-ok.csv": ROW}
        staging = tmp_path / "staging" / "held"
        staging.mkdir(parents=True)
        for name, data in files.items():
            (staging / name).write_bytes(data)
        os.rename(staging, d.inbox() / "held")
        wait_until((d.state / "started-a-gate.csv").exists, 60, what="the gate file to start")
        work = d.spool / "work" / "normal" / "held"
        (work / "b-deleted.csv").unlink()
        (work / "c-truncated.csv").write_bytes(SHORT)
        (d.state / "hold-a-gate.csv").unlink()
        status = d.wait_batch("held", 60)
    finally:
        assert d.stop() == 0
    assert status["batch"]["status"] == "failed"
    rows = outcomes(d)
    assert_outcome(rows.get(("held", "b-deleted.csv")), "failed", "no longer in the spool", "b")
    for name in ("a-gate.csv", "c-truncated.csv", "d-ok.csv"):
        assert_outcome(rows.get(("held", name)), "completed", None, name)
    docs = result_docs(d, "held")
    assert sorted(docs) == sorted(files)
    assert docs["c-truncated.csv"]["file_size"] == len(SHORT)
    assert docs["c-truncated.csv"]["result"] == {
        "bytes": len(SHORT),
        "sha256": hashlib.sha256(SHORT).hexdigest(),
    }
    assert where_everything_is(d.spool) == {
        "archive/held/a-gate.csv": ("file", ROW),
        "archive/held/c-truncated.csv": ("file", SHORT),
        "archive/held/d-ok.csv": ("file", ROW),
    }
    assert work_leftovers(d.spool) == []


def test_input_appended_while_processing_is_not_reported_stale(tmp_path: Path) -> None:
    """A file a writer still appends to while it is processed is not reported with the
    hash and size of bytes it no longer has: the result describes the archived file."""
    d = held_daemon(tmp_path)
    (d.state / "hold-growing.csv").touch()
    d.start(PYTHONPATH=pythonpath())
    try:
        staging = tmp_path / "staging"
        staging.mkdir()
        # A slow writer keeps its file open across the claim (a pause longer than
        # settle_seconds), then writes again while the file is being processed.
        with (staging / "growing.csv").open("ab") as writer:
            writer.write(ROW)
            writer.flush()
            os.rename(staging / "growing.csv", d.inbox() / "growing.csv")
            wait_until((d.state / "started-growing.csv").exists, 60, what="processing to start")
            writer.write(b"late,1.00\n")
        (d.state / "hold-growing.csv").unlink()
        d.wait_batch("growing.csv", 60)
    finally:
        assert d.stop() == 0
    archived = (d.spool / "archive" / "growing.csv" / "growing.csv").read_bytes()
    assert archived == ROW + b"late,1.00\n"  # nothing lost
    doc = result_docs(d, "growing.csv")["growing.csv"]
    assert doc["status"] == "completed"
    assert doc["file_size"] == len(archived)
    assert doc["file_hash"] == "sha256:" + hashlib.sha256(archived).hexdigest()
    assert doc["result"]["sha256"] == hashlib.sha256(archived).hexdigest()
