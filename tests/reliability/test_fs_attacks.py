"""Filesystem attacks by a member of the drop group on an unprivileged daemon (issue 12, 14.1).

The daemon runs as its own user (in the drop group, umask 0000) on a spool laid
out as deploy/ lays it out; the attacker is another member of the drop group,
acting through its own process, which keeps its working directory inside the
folder it dropped. Each test runs one attack and checks that nothing batchd
alone may read came out, that nothing batchd owns moved, and that the
attacked drop ended with a clear error.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from badinput_support import unprivileged_python
from fsattack_support import (
    ATTACKER,
    DAEMON_USER,
    DROP_GROUP,
    NEIGHBOUR,
    Attacker,
    SpoolDaemon,
    can_read,
    chown_deep,
    ensure_users,
    gid,
    make_deep,
    remove_deep,
    runs_as,
    uid,
)
from support import wait_until, write_config

TOKEN = "TOKEN-batchd-only-5f0c2e"
ROW = b"dish,price\nsoup,4.50\n"
SYMLINK = "symbolic link: not followed, its target was not read"
#: The members the SQL re-queue test refuses, re-queues and expects refused again.
REFUSED = "relpath = 'fake.pdf' OR relpath LIKE 'f_.csv'"


class World:
    """The running daemon, its attacker, and helpers to reach both."""

    def __init__(self, tmp: Path, daemon: SpoolDaemon, attacker: Attacker, home: Path) -> None:
        self.tmp = tmp
        self.d = daemon
        self.attacker = attacker
        self.home = home  # the attacker's own folder, on the spool's filesystem
        self.port = 0

    @property
    def spool(self) -> Path:
        return self.d.spool

    def http(self, path: str) -> tuple[int, Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def drop(self, name: str, files: dict[str, bytes], mode: str = "2770") -> None:
        """The attacker builds ``name`` in its home folder and moves it into the inbox,
        its working directory staying inside it."""
        a = self.attacker
        assert a.do("chdir", str(self.home)) == "ok"
        assert a.do("mkdir", name, mode) == "ok"
        for rel, data in files.items():
            parts = rel.split("/")
            for i in range(1, len(parts)):
                a.do("mkdir", f"{name}/{'/'.join(parts[:i])}", mode)
            assert a.do("write", f"{name}/{rel}", data.decode()) == "ok"
        assert a.do("chdir", name) == "ok"
        assert (
            a.do("rename", str(self.home / name), str(self.spool / "inbox/normal" / name)) == "ok"
        )

    def files(self, name: str) -> dict[str, dict[str, Any]]:
        status = self.d.status(name)
        assert status is not None
        return {f["relpath"]: f for f in status["files"]}

    def hold(self, relpath_leaf: str) -> Path:
        hold = self.d.state / f"hold-{relpath_leaf}"
        hold.touch()
        os.chmod(hold, 0o666)
        return hold

    def wait_started(self, leaf: str) -> None:
        wait_until(
            lambda: (self.d.state / f"started-{leaf}").exists(),
            30,
            what=f"{leaf} to start\n{self.d.log()[-3000:]}",
        )


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    """One daemon as the daemon user, one attacker, one deploy-like spool."""
    python = unprivileged_python()
    if python is None or os.geteuid() != 0:
        pytest.skip("needs root (to create the daemon and attacker users), setpriv and a Python")
    ensure_users()
    if not runs_as(DAEMON_USER, python):
        pytest.skip(
            f"user {DAEMON_USER} cannot import batchd from this checkout (a private folder)"
        )
    # Not tmp_path: pytest's base folder is private to root.
    tmp = Path(tempfile.mkdtemp(prefix="batchd-fsattack-"))
    os.chmod(tmp, 0o755)
    home = tmp / "mallory"
    home.mkdir()
    # setgid to the drop group, as a folder copied into the inbox would be.
    os.chown(home, uid(ATTACKER), gid(DROP_GROUP))
    os.chmod(home, 0o2770)
    daemon = SpoolDaemon(
        tmp,
        python,
        processing={"processor": "batchd.testing.procs:held", "concurrency": 1},
        watch={"settle_seconds": 0.2, "rescan_seconds": 1.0},
        limits={"max_files_per_batch": 4},
        http={"enabled": True, "port": 0, "token": TOKEN},
    )
    port_file = daemon.state / "port"
    attacker = Attacker(python, home)
    w = World(tmp, daemon, attacker, home)
    daemon.start(BATCHD_PORT_FILE=str(port_file))
    w.port = int(wait_until(lambda: port_file.exists() and port_file.read_text().strip(), 30))
    try:
        yield w
    finally:
        attacker.close()
        daemon.stop()
        remove_deep(tmp)


def assert_secret_nowhere(w: World) -> None:
    """The configuration's token is in no file the group can read."""
    for top in ("outbox", "archive", "failed"):
        for path in (w.spool / top).rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert TOKEN.encode() not in path.read_bytes(), path


def assert_database_in_place(w: World, ino: int) -> None:
    db = w.spool / "state" / "batchd.db"
    assert db.lstat().st_ino == ino and stat.S_ISREG(db.lstat().st_mode)
    assert db.lstat().st_uid == uid(DAEMON_USER)
    code, body = w.http("/healthz")
    assert code == 200, body


def test_member_swapped_for_a_link_after_registration_is_not_read(world: World) -> None:
    """A member file swapped for a link to the config, a member folder swapped for a link
    to state/ and a member replaced by another file, after the claim: each fails with a
    clear error, the config is read by nobody, the live database stays where it is."""
    w = world
    ino = (w.spool / "state" / "batchd.db").lstat().st_ino
    hold = w.hold("a.csv")
    w.drop("swap", {"a.csv": ROW, "b.csv": ROW, "c/batchd.db": ROW, "d.csv": ROW})
    w.wait_started("a.csv")  # registered; a.csv runs, b.csv and c/ wait
    a = w.attacker
    assert a.do("unlink", "b.csv") == "ok"  # the cwd is the claimed folder in work/
    assert a.do("symlink", str(w.d.config), "b.csv") == "ok"
    assert a.do("rmtree", "c") == "ok"
    assert a.do("symlink", str(w.spool / "state"), "c") == "ok"
    assert a.do("write", "d.new", "other,bytes\n1,2\n") == "ok"
    assert a.do("rename", "d.new", "d.csv") == "ok"  # another file (inode) under the name
    hold.unlink()
    w.d.wait_batch("swap")
    files = w.files("swap")
    assert files["a.csv"]["status"] == "completed"
    assert files["b.csv"]["status"] == "failed"
    assert SYMLINK in files["b.csv"]["error"]
    assert files["c/batchd.db"]["status"] == "failed"
    assert "symbolic link" in files["c/batchd.db"]["error"]
    assert files["d.csv"]["status"] == "failed"
    assert "replaced by another file after it was registered" in files["d.csv"]["error"]
    assert_secret_nowhere(w)
    assert_database_in_place(w, ino)
    # The links themselves are archived as links, never followed.
    assert (w.spool / "archive" / "swap" / "c").is_symlink()


def test_outbox_archive_and_failed_entries_are_2750_and_0640(world: World) -> None:
    """Every folder batchd creates under outbox/, archive/ and failed/ is 2750 and every
    file 0640 (the daemon's umask is 0000), and the attacker can write in none of them."""
    w = world
    w.drop("modes", {"ok.csv": ROW, "sub/deeper/ok.csv": ROW, "bad.pdf": b"not a pdf\n"})
    w.d.wait_batch("modes")
    daemon = uid(DAEMON_USER)
    checked = 0
    for top in ("outbox", "archive", "failed"):
        for path in [w.spool / top / "modes", *(w.spool / top / "modes").rglob("*")]:
            st = path.lstat()
            if st.st_uid != daemon:
                continue  # a dropped file, moved as it is
            want = 0o2750 if stat.S_ISDIR(st.st_mode) else 0o640
            assert stat.S_IMODE(st.st_mode) == want, f"{path}: {stat.S_IMODE(st.st_mode):o}"
            checked += 1
    assert checked >= 8
    a = w.attacker
    for target in (
        w.spool / "outbox" / "modes" / "results" / "planted",
        w.spool / "archive" / "modes" / "planted",
        w.spool / "archive" / "modes" / "sub" / "planted",
        w.spool / "failed" / "modes" / "planted",
    ):
        assert a.do("symlink", str(w.spool / "state"), str(target)).startswith("PermissionError")


def test_link_planted_in_archive_is_not_followed(world: World) -> None:
    """The attacker cannot plant archive/<batch>/sub -> state/ while the batch runs; a link
    planted there anyway (left by an older install) is not followed: the database stays."""
    w = world
    ino = (w.spool / "state" / "batchd.db").lstat().st_ino
    hold = w.hold("b.csv")
    w.drop("plant", {"a.csv": ROW, "b.csv": ROW, "sub/batchd.db": ROW})
    w.wait_started("b.csv")  # a.csv is archived: archive/plant/ exists now
    wait_until(lambda: (w.spool / "archive" / "plant" / "a.csv").exists(), 10)
    link = w.spool / "archive" / "plant" / "sub"
    answer = w.attacker.do("symlink", str(w.spool / "state"), str(link))
    assert answer.startswith("PermissionError"), answer
    os.symlink(w.spool / "state", link)  # as an older group-writable folder allowed
    os.lchown(link, uid(ATTACKER), -1)
    hold.unlink()
    w.d.wait_batch("plant")
    assert_database_in_place(w, ino)
    assert sorted(p.name for p in (w.spool / "state").iterdir() if p.name.startswith("batchd.db"))[
        0
    ] == ("batchd.db")
    assert not (w.spool / "state" / "sub").exists()
    assert w.d.events("input_not_moved")


def test_retry_of_a_refused_link_member_is_refused_again(world: World) -> None:
    """`batchd retry` of a refused symlink member fails it again with the same error;
    its target (the config) is never read."""
    w = world
    w.drop("retry", {"ok.csv": ROW})
    assert w.attacker.do("symlink", str(w.d.config), "link.csv") == "ok"
    status = w.d.wait_batch("retry")
    assert SYMLINK in w.files("retry")["link.csv"]["error"]
    done = w.d.cli("retry", status["batch"]["id"])
    assert done.returncode == 0, done.stderr
    wait_until(
        lambda: (
            w.d.db()
            .execute("SELECT status, attempts FROM batch_files WHERE relpath = 'link.csv'")
            .fetchone()[:]
            == ("failed", 1)
        ),
        30,
        what="the retried link to fail again",
    )
    error = w.d.db().execute("SELECT error FROM batch_files WHERE relpath = 'link.csv'").fetchone()
    assert SYMLINK in error[0]
    assert_secret_nowhere(w)


def test_sql_requeue_of_refused_members_keeps_their_refusal(world: World) -> None:
    """An operator's UPDATE ... SET status='pending' of a wrong-type file and of a batch
    over max_files_per_batch fails them again with their original refusal."""
    w = world
    w.drop("wrongtype", {"fake.pdf": b"plain words\n", "ok.csv": ROW})
    w.drop("toomany", {f"f{i}.csv": ROW for i in range(5)})
    w.d.wait_batch("wrongtype")
    w.d.wait_batch("toomany")
    before = {
        r["relpath"]: r["error"]
        for r in w.d.db().execute(f"SELECT relpath, error FROM batch_files WHERE {REFUSED}")
    }
    with w.d.db() as conn:
        conn.execute(
            f"UPDATE batch_files SET status = 'pending', completed_at = NULL WHERE {REFUSED}"
        )

    def refused_again() -> bool:
        rows = w.d.db().execute(f"SELECT status, attempts FROM batch_files WHERE {REFUSED}")
        return all(tuple(r) == ("failed", 1) for r in rows)

    wait_until(refused_again, 30, what=f"re-queued files to fail again\n{w.d.log()[-2000:]}")
    after = {
        r["relpath"]: r["error"]
        for r in w.d.db().execute(f"SELECT relpath, error FROM batch_files WHERE {REFUSED}")
    }
    assert "limits.allowed_types" in after.pop("fake.pdf")
    before.pop("fake.pdf")
    assert after == before and all("max_files_per_batch" in e for e in after.values())
    assert not any(
        r
        for r in w.d.db().execute(
            "SELECT 1 FROM batch_files WHERE status='completed' AND relpath LIKE 'f_.csv'"
        )
    )


def test_folder_moved_in_with_its_owners_group_names_the_chgrp_to_run(world: World) -> None:
    """A folder moved in with mv keeps its owner's own group: even group-writable,
    batchd (not in that group) cannot move it. The refusal names the chgrp to
    run; after the chgrp alone (no mode or mtime change) it is claimed."""
    w = world  # one daemon for the module: a name of its own ("mine" is another test's)
    a = w.attacker
    assert a.do("chdir", str(w.home)) == "ok"
    assert a.do("mkdir", "moved-in", "775") == "ok"
    assert a.do("write", "moved-in/a.csv", ROW.decode()) == "ok"
    assert a.do("chgrp", "moved-in", ATTACKER) == "ok"  # useradd --user-group: its own group
    assert a.do("chmod", "moved-in", "775") == "ok"  # readable by all: only the move fails
    assert a.do("rename", str(w.home / "moved-in"), str(w.spool / "inbox/normal/moved-in")) == "ok"
    wait_until(lambda: w.d.status("moved-in"), 30, what=f"the refusal's status.json\n{w.d.log()}")
    doc = w.d.status("moved-in")
    assert doc is not None and doc["batch"]["status"] == "refused_in_inbox"
    error = doc["batch"]["error"]
    assert f"its group ({ATTACKER}) is not the drop group" in error, error
    assert f"chgrp -R {DROP_GROUP} " in error and "inbox/normal/moved-in" in error, error
    assert a.do("chgrp", str(w.spool / "inbox/normal/moved-in"), DROP_GROUP) == "ok"
    status = w.d.wait_batch("moved-in")
    assert status["batch"]["name"] == "moved-in" and status["batch"]["status"] == "completed"


def test_unreadable_folder_in_its_owners_group_names_the_chgrp_to_run(world: World) -> None:
    """The same move with the dropper's umask 0007 (mode 2770, its own group):
    batchd cannot even read it. The warning and GET /api/inbox name the chgrp
    to run, not a chmod; after the chgrp alone it is claimed."""
    w = world
    a = w.attacker
    assert a.do("chdir", str(w.home)) == "ok"
    assert a.do("mkdir", "unread", "2770") == "ok"
    assert a.do("write", "unread/a.csv", ROW.decode()) == "ok"
    assert a.do("chgrp", "unread", ATTACKER) == "ok"
    assert a.do("rename", str(w.home / "unread"), str(w.spool / "inbox/normal/unread")) == "ok"

    def reason() -> str | None:
        code, body = w.http("/api/inbox")
        entries = [e for e in body["data"] if e["name"] == "unread"] if code == 200 else []
        return entries[0]["reason"] if entries and entries[0]["state"] == "refused" else None

    text = wait_until(reason, 30, what=f"the inbox entry's refusal\n{w.d.log()}")
    assert text.startswith("cannot read folder: Permission denied"), text
    assert f"its group ({ATTACKER}) is not the drop group" in text, text
    assert f"chgrp -R {DROP_GROUP} " in text and "chmod -R g+rwX" in text, text
    [warning] = [e for e in w.d.events("drop_unreadable") if e["path"].endswith("/unread")]
    assert warning["error"] == text
    assert a.do("chgrp", str(w.spool / "inbox/normal/unread"), DROP_GROUP) == "ok"
    status = w.d.wait_batch("unread")
    assert status["batch"]["status"] == "completed"


def test_folder_without_group_write_is_refused_visibly(world: World) -> None:
    """A 0755 folder (umask 0022) batchd cannot move says so in outbox/<name>/status.json
    and GET /api/inbox with the chmod to run, logged once without a traceback; after the
    chmod it is claimed under its own name."""
    w = world
    w.drop("private", {"a.csv": ROW}, mode="755")
    wait_until(lambda: w.d.status("private"), 30, what="the refusal's status.json")
    doc = w.d.status("private")
    assert doc is not None and doc["batch"]["status"] == "refused_in_inbox"
    assert "chmod -R g+w" in doc["batch"]["error"]
    assert "inbox/normal/private" in doc["batch"]["error"]

    def listed() -> list[dict[str, Any]]:
        # The HTTP process reuses the daemon's answer for up to a second
        # (ANSWER_MAX_AGE_SECONDS): an earlier test's question may be that fresh.
        code, body = w.http("/api/inbox")
        assert code == 200
        return [e for e in body["data"] if e["name"] == "private"]

    [entry] = wait_until(listed, 30, what="'private' in GET /api/inbox")
    assert entry["state"] == "refused" and entry["priority"] == "normal"
    assert "chmod -R g+w" in entry["reason"]
    assert (w.spool / "inbox" / "normal" / "private" / "a.csv").exists()
    assert w.attacker.do("chmod", str(w.spool / "inbox" / "normal" / "private"), "2770") == "ok"
    status = w.d.wait_batch("private")
    assert status["batch"]["name"] == "private" and status["batch"]["status"] == "completed"
    assert len([e for e in w.d.events("drop_refused") if e["path"].endswith("/private")]) == 1
    assert not [e for e in w.d.events("claim_failed") if e["path"].endswith("/private")]


def test_deep_folder_is_refused_and_does_not_stop_intake(world: World) -> None:
    """A drop nested 1,500 levels deep is a refused batch (failed/, status.json naming
    limits.max_depth); a drop made after it is processed; /healthz stays 200."""
    w = world
    staging = w.tmp / "deep-staging"
    make_deep(staging, 1500, ROW)
    chown_deep(staging, ATTACKER)
    started = time.monotonic()
    os.rename(staging, w.spool / "inbox" / "normal" / "deep")
    after = w.home / "after.csv"
    after.write_bytes(ROW)
    os.chown(after, uid(ATTACKER), -1)
    os.rename(after, w.spool / "inbox" / "normal" / "after.csv")
    status = w.d.wait_batch("deep")
    refused_in = time.monotonic() - started
    assert status["batch"]["status"] == "failed"
    assert "limits.max_depth (32)" in status["batch"]["error"]
    assert (w.spool / "failed" / "deep" / "d" / "d").is_dir()
    assert w.d.wait_batch("after.csv")["batch"]["status"] == "completed"
    code, body = w.http("/healthz")
    assert code == 200, body
    print(f"deep drop (1500 levels) refused in {refused_in:.2f} s")


def test_deep_orphan_in_work_does_not_stop_start_up(world: World) -> None:
    """A 990-level folder left in work/ unregistered is refused at start-up (moved to
    failed/) and the daemon starts and serves."""
    w = world
    assert w.d.stop() == 0
    orphan = w.spool / "work" / "normal" / "orphan"
    make_deep(orphan, 990, ROW)
    chown_deep(orphan, ATTACKER)
    port_file = w.d.state / "port"
    port_file.unlink()
    w.d.start(BATCHD_PORT_FILE=str(port_file))
    w.port = int(wait_until(lambda: port_file.exists() and port_file.read_text().strip(), 30))
    status = w.d.wait_batch("orphan")
    assert "limits.max_depth" in status["batch"]["error"]
    assert (w.spool / "failed" / "orphan").is_dir()
    assert not orphan.exists()
    code, body = w.http("/healthz")
    assert code == 200, body


def test_result_access_owner_keeps_results_from_other_group_members(world: World) -> None:
    """With spool.result_access = "owner", a batch's outbox, archive and failed folders
    are readable by its dropper (an ACL) and by no other member of the drop group."""
    w = world
    assert w.d.stop() == 0
    w.d.sections["spool"]["result_access"] = "owner"
    write_config(w.d.config, w.d.sections)
    port_file = w.d.state / "port"
    port_file.unlink()
    w.d.start(BATCHD_PORT_FILE=str(port_file))
    w.drop("mine", {"ok.csv": ROW, "bad.pdf": b"not a pdf\n"})
    w.d.wait_batch("mine")
    status = w.spool / "outbox" / "mine" / "status.json"
    result = w.spool / "outbox" / "mine" / "results" / "ok.csv.json"
    archived = w.spool / "archive" / "mine" / "ok.csv"
    failed = w.spool / "failed" / "mine" / "bad.pdf"
    for path in (status, result, archived, failed):
        assert can_read(ATTACKER, path), path
        assert not can_read(NEIGHBOUR, path), path
    # In "group" mode (the batches before) every member reads every result.
    assert can_read(NEIGHBOUR, w.spool / "outbox" / "modes" / "status.json")
