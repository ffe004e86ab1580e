"""Tests for batchd.safefs: opening and moving in a tree someone else can write."""

from __future__ import annotations

import contextlib
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import suidsgid

from batchd import safefs
from batchd.fsutil import write_json_atomic

DATA = b"id,value\n1,2\n"


@pytest.fixture
def umask0() -> Iterator[None]:
    """Run with umask 0000, so only explicit modes count."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def tree(tmp_path: Path) -> tuple[Path, Path]:
    """A trusted root holding work/b/sub/a.csv, and a secret outside it."""
    root = tmp_path / "root"
    (root / "work" / "b" / "sub").mkdir(parents=True)
    (root / "work" / "b" / "sub" / "a.csv").write_bytes(DATA)
    secret = tmp_path / "secret.csv"
    secret.write_bytes(b"TOP-SECRET\n")
    return root, secret


def test_open_member_reads_a_regular_file(tmp_path: Path) -> None:
    """A regular member opens, and its descriptor reads its bytes."""
    root, _ = tree(tmp_path)
    fd, st = safefs.open_member(root, "work/b/sub/a.csv")
    try:
        assert stat.S_ISREG(st.st_mode)
        assert os.pread(fd, 100, 0) == DATA
    finally:
        os.close(fd)


def test_open_member_refuses_a_link_as_the_file(tmp_path: Path) -> None:
    """A member that is a link is refused with the scan's words; the target is not opened."""
    root, secret = tree(tmp_path)
    os.symlink(secret, root / "work" / "b" / "link.csv")
    with pytest.raises(safefs.UnsafePath, match="symbolic link: not followed"):
        safefs.open_member(root, "work/b/link.csv")


def test_open_member_refuses_a_link_at_a_folder_component(tmp_path: Path) -> None:
    """A member folder swapped for a link is not walked through."""
    root, secret = tree(tmp_path)
    os.symlink(secret.parent, root / "work" / "b" / "swapped")
    with pytest.raises(safefs.UnsafePath, match="'swapped' is a symbolic link"):
        safefs.open_member(root, "work/b/swapped/secret.csv")


def test_open_member_refuses_dot_dot(tmp_path: Path) -> None:
    """A relative path climbing out of the root is refused before any open."""
    root, _ = tree(tmp_path)
    with pytest.raises(safefs.UnsafePath, match="not a plain relative path"):
        safefs.open_member(root, "work/../../secret.csv")


def test_open_member_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    """A FIFO in place of a member is refused at once (no writer needed)."""
    root, _ = tree(tmp_path)
    os.mkfifo(root / "work" / "b" / "pipe.csv")
    with pytest.raises(safefs.UnsafePath, match=r"not a regular file \(FIFO\)"):
        safefs.open_member(root, "work/b/pipe.csv")


def test_move_creates_target_folders_2750(tmp_path: Path, umask0: None) -> None:
    """move() makes missing target folders 2750 whatever the umask, and moves the file."""
    root, _ = tree(tmp_path)
    safefs.move(root, "work/b/sub/a.csv", "archive/b/sub/a.csv")
    assert (root / "archive" / "b" / "sub" / "a.csv").read_bytes() == DATA
    for folder in (root / "archive", root / "archive" / "b", root / "archive" / "b" / "sub"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o2750, folder


def test_move_refuses_a_link_in_the_target(tmp_path: Path) -> None:
    """A link planted in the target's path is refused; nothing lands where it points."""
    root, secret = tree(tmp_path)
    (root / "archive" / "b").mkdir(parents=True)
    os.symlink(secret.parent, root / "archive" / "b" / "sub")
    with pytest.raises(safefs.UnsafePath):
        safefs.move(root, "work/b/sub/a.csv", "archive/b/sub/a.csv")
    assert not (secret.parent / "a.csv").exists()
    assert (root / "work" / "b" / "sub" / "a.csv").exists()


def test_move_from_moves_out_of_the_folder_it_was_given(tmp_path: Path) -> None:
    """move_from renames the entry of the folder the caller holds open: its
    folder swapped for a link meanwhile changes nothing (no second walk to
    the source), and a source that is more than one name is refused."""
    root, secret = tree(tmp_path)
    fd = safefs.open_dir(root, "work/b/sub")
    try:
        os.rename(root / "work" / "b" / "sub", root / "work" / "b" / "elsewhere")
        os.symlink(secret.parent, root / "work" / "b" / "sub")
        (secret.parent / "a.csv").write_bytes(b"not this one")
        safefs.move_from(fd, "a.csv", root, "archive/b/sub/a.csv")
        for bad in ("../a.csv", "x/a.csv", "..", ""):
            with pytest.raises(safefs.UnsafePath):
                safefs.move_from(fd, bad, root, "archive/b/x.csv")
        for root_itself in (".", ""):  # a folder in the way is removed: never the root
            with pytest.raises(safefs.UnsafePath):
                safefs.move_from(fd, "a.csv", root, root_itself)
    finally:
        os.close(fd)
    assert (root / "archive" / "b" / "sub" / "a.csv").read_bytes() == DATA
    assert (secret.parent / "a.csv").read_bytes() == b"not this one"
    assert not (root / "work" / "b" / "elsewhere" / "a.csv").exists()


def test_write_json_atomic_under_root_is_0640_and_refuses_links(
    tmp_path: Path, umask0: None
) -> None:
    """A document written under the spool root is 0640 in 2750 folders; a link in its
    folder path is refused, and nothing is written where it points."""
    root, secret = tree(tmp_path)
    write_json_atomic(root / "outbox" / "b" / "status.json", {"a": 1}, root=root)
    assert stat.S_IMODE((root / "outbox" / "b" / "status.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((root / "outbox" / "b").stat().st_mode) == 0o2750
    os.symlink(secret.parent, root / "outbox" / "evil")
    with pytest.raises(safefs.UnsafePath):
        write_json_atomic(root / "outbox" / "evil" / "status.json", {"a": 1}, root=root)
    assert not (secret.parent / "status.json").exists()


def test_named_view_reads_the_open_file_after_a_swap(tmp_path: Path) -> None:
    """The path handed to a processor names the opened file, even once its name is a link."""
    root, secret = tree(tmp_path)
    fd, _st = safefs.open_member(root, "work/b/sub/a.csv")
    try:
        member = root / "work" / "b" / "sub" / "a.csv"
        member.unlink()
        os.symlink(secret, member)
        with safefs.named_view(fd, "sub/a.csv") as view:
            assert view.name == "a.csv"
            assert view.read_bytes() == DATA
    finally:
        os.close(fd)


def test_restrict_to_writes_an_acl_for_one_reader(tmp_path: Path) -> None:
    """restrict_to() leaves the group no access and gives one user read and search."""
    folder = tmp_path / "f"
    folder.mkdir()
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            safefs.restrict_to(fd, 12345)
        except OSError as exc:
            pytest.skip(f"this filesystem takes no ACL: {exc.strerror}")
        blob = os.getxattr(folder, "system.posix_acl_access")
    finally:
        os.close(fd)
    entries = [struct.unpack_from("<HHI", blob, 4 + 8 * i) for i in range((len(blob) - 4) // 8)]
    assert (0x02, 0o5, 12345) in entries  # user:12345:r-x
    assert (0x04, 0, 0xFFFFFFFF) in entries  # group::---
    assert (0x20, 0, 0xFFFFFFFF) in entries  # other::---
    assert stat.S_IMODE(folder.stat().st_mode) & 0o007 == 0


def test_remove_tree_removes_a_very_deep_folder(tmp_path: Path) -> None:
    """A folder 1,500 levels deep (a refused drop kept whole) is removed without RecursionError."""
    top = tmp_path / "deep"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1500):
        os.mkdir("d", dir_fd=fd)
        new = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = new
    os.close(fd)
    secret = tmp_path / "keep.csv"
    secret.write_bytes(DATA)
    os.symlink(tmp_path, top / "link")
    safefs.remove_tree(top)
    assert not top.exists()
    assert secret.read_bytes() == DATA


@pytest.mark.skipif(not suidsgid.SUPPORTED, reason="the seccomp filter is written for x86-64")
def test_outbox_folders_are_made_under_restrict_suid_sgid(tmp_path: Path) -> None:
    """Under the unit's RestrictSUIDSGID= and UMask=0007, status and result folders
    are made 2750 in a setgid outbox (inherited, no chmod), and owner mode's 2700 too."""
    root = tmp_path / "spool"
    (root / "outbox").mkdir(parents=True)
    os.chmod(root / "outbox", 0o2750)  # as deploy/batchd.tmpfiles makes it

    def body() -> None:
        # The filter is in force: naming the setgid bit fails as under systemd.
        with pytest.raises(PermissionError):
            os.chmod(root / "outbox", 0o2750)
        write_json_atomic(root / "outbox" / "b" / "status.json", {"a": 1}, root=root)
        os.close(safefs.open_dir(root, "outbox/b/results/sub", create=True))
        fd = safefs.open_dir(root, "outbox/c", create=True, mode=0o2700)
        try:
            with contextlib.suppress(OSError):  # no ACLs on this filesystem: the mode still counts
                safefs.restrict_to(fd, 12345)
        finally:
            os.close(fd)

    suidsgid.run_restricted(body)
    for folder in ("b", "b/results", "b/results/sub"):
        assert stat.S_IMODE((root / "outbox" / folder).stat().st_mode) == 0o2750, folder
    assert stat.S_IMODE((root / "outbox" / "b" / "status.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((root / "outbox" / "c").stat().st_mode) & 0o2007 == 0o2000


@pytest.mark.skipif(not suidsgid.SUPPORTED, reason="the seccomp filter is written for x86-64")
def test_processor_outputs_get_their_modes_under_restrict_suid_sgid(tmp_path: Path) -> None:
    """Under RestrictSUIDSGID= a processor's output tree still gets folders 0750, files
    0640 and the outbox's group (no chmod naming the setgid bit, which would fail)."""
    outputs = tmp_path / "outputs"
    (outputs / "sub").mkdir(parents=True)
    (outputs / "sub" / "page1.png").write_bytes(DATA)
    os.chmod(outputs / "sub", 0o777)
    gid = os.getgid() if os.getgid() != 0 else 1  # any group root may give

    def body() -> None:
        safefs.fix_modes(outputs, gid=gid)

    suidsgid.run_restricted(body)
    for folder in (outputs, outputs / "sub"):
        st = folder.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o750, gid), folder
    st = (outputs / "sub" / "page1.png").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, gid)
