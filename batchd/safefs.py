"""Opening and moving inside a tree someone else can write.

A claimed batch folder in ``work/`` still belongs to the user who dropped it,
and that user may keep a shell (a working directory, an open folder
descriptor) inside it: after the scan they can replace a member with a
symbolic link, or a member folder with a link to ``state/``. So nothing here
ever resolves a path by name through such a tree. Every path is walked one
component at a time from a trusted folder's descriptor with ``O_NOFOLLOW``
(and ``O_DIRECTORY`` for folders), so a link at any component is refused
with ``ELOOP``/``ENOTDIR`` instead of followed, and ``..`` is never taken.
Moves are ``renameat`` between two folder descriptors opened that way; a
folder batchd creates is made with the mode it must have, whatever the umask.

Functions that must hand a *path* to code expecting one (a processor, the
cross-filesystem copy) use ``/proc/<pid>/fd/<n>``: it names the open file or
folder itself, not whatever now sits at its old name.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import shutil
import stat
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from batchd.errors import BatchdError

#: Every folder batchd creates under outbox/, archive/ and failed/: the group
#: may look in and read, only batchd may change what is there (setgid keeps
#: the group of the top folder).
DIR_MODE = 0o2750
#: Every file batchd creates there: readable by the group, written by batchd only.
FILE_MODE = 0o640

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted in place of a member must not block the open;
# O_NOCTTY: nor may a terminal device become ours.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

#: The refusal of a symbolic link member, the same at the scan and at every later open.
LINK_REFUSED = "symbolic link: not followed, its target was not read"


class UnsafePath(BatchdError):
    """A path inside a claimed tree is a link or not what the scan saw; it was not followed."""


def split(rel: str) -> list[str]:
    """The components of a relative path; refuses absolute paths, ``.`` and ``..``."""
    if rel in ("", "."):
        return []
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise UnsafePath(f"{rel!r} is not a plain relative path inside the spool: not opened")
    return parts


def fd_path(fd: int, name: str | None = None) -> Path:
    """A path naming the open file or folder ``fd`` (and ``name`` inside it),
    valid in this process and in the commands it starts."""
    base = f"/proc/{os.getpid()}/fd/{fd}"
    return Path(base if name is None else f"{base}/{name}")


def kind(mode: int) -> str:
    """What a file that is not regular is, in words."""
    for test, word in (
        (stat.S_ISDIR, "folder"),
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return word
    return "unknown type"


def open_dir(root: Path, rel: str, create: bool = False, mode: int = DIR_MODE) -> int:
    """A descriptor of folder ``root/rel``, reached without following any link below ``root``.

    ``root`` itself is trusted (it comes from the configuration). With
    ``create``, missing folders are made with exactly ``mode``. Raises
    :class:`UnsafePath` when a component is a link or not a folder, and
    ``FileNotFoundError`` when one is missing (without ``create``).
    """
    parts = split(rel)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    for part in parts:
        fd = _step(fd, part, create, mode, root, rel)  # closes the fd it was given
    return fd


def _step(fd: int, part: str, create: bool, mode: int, root: Path, rel: str) -> int:
    """Open folder ``part`` inside ``fd`` (closing ``fd``); returns the new descriptor."""
    try:
        try:
            new = os.open(part, _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise
            with contextlib.suppress(FileExistsError):
                # Made with the permission bits wanted (the umask can only take
                # some away): in a setgid parent the kernel adds the setgid bit
                # itself, so no chmod is needed. Under systemd's
                # RestrictSUIDSGID= (deploy/batchd.service) any chmod naming
                # the setgid bit fails with EPERM.
                os.mkdir(part, mode & 0o777, dir_fd=fd)
            new = os.open(part, _DIR_FLAGS, dir_fd=fd)
            # Explicit, not left to the umask: a group-writable folder here
            # would let a group member plant links in what batchd writes.
            if stat.S_IMODE(os.fstat(new).st_mode) != mode:
                os.fchmod(new, mode)
    except OSError as exc:
        # With O_DIRECTORY a link gives ENOTDIR, as a plain file does: only a
        # link is an attack (refused for good); a file in the way is an
        # ordinary error that may be retried once it is gone.
        if exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR and _is_link(fd, part)):
            raise UnsafePath(f"{root / rel}: {part!r} is a symbolic link: not followed") from exc
        raise
    finally:
        os.close(fd)
    return new


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def open_file(dir_fd: int, name: str) -> tuple[int, os.stat_result]:
    """Open regular file ``name`` inside folder ``dir_fd`` for reading, never following a link.

    Raises :class:`UnsafePath` with the same words the scan uses when it is a
    link or not a regular file; nothing it points to is opened.
    """
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(LINK_REFUSED) from exc
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafePath(f"not a regular file ({kind(st.st_mode)}): not read")
    return fd, st


def open_member(root: Path, rel: str) -> tuple[int, os.stat_result]:
    """Open the regular file at ``root/rel`` with no link followed at any component."""
    parent, _, leaf = rel.rpartition("/")
    dir_fd = open_dir(root, parent)
    try:
        return open_file(dir_fd, leaf)
    finally:
        os.close(dir_fd)


def make_dirs(root: Path, rel: str) -> None:
    """Create ``root/rel`` and its missing parents with :data:`DIR_MODE`, following no link."""
    os.close(open_dir(root, rel, create=True))


def move(root: Path, source: str, target: str) -> None:
    """Rename ``root/source`` to ``root/target`` (both relative to ``root``),
    creating the target's parents, through folder descriptors only.

    The source's parent and the target's parent are each reached without
    following a link; rename(2) itself never follows the last component.
    Across filesystems (an archive on another mount) it copies through the
    same descriptors (see :func:`batchd.fsutil.replace_across`).
    """
    src_parent, _, src_leaf = source.rpartition("/")
    split(source)
    src_fd = open_dir(root, src_parent)
    try:
        move_from(src_fd, src_leaf, root, target)
    finally:
        os.close(src_fd)


def move_from(src_fd: int, src_leaf: str, root: Path, target: str) -> None:
    """:func:`move` of entry ``src_leaf`` of a folder the caller holds open
    (``src_fd``, reached without following links): no second walk to the
    source, and no moment in which its folder could be another one."""
    from batchd.fsutil import replace_across  # fsutil imports this module

    if len(split(src_leaf)) != 1:
        raise UnsafePath(f"{src_leaf!r} is not one name: not moved")
    dst_parent, _, dst_leaf = target.rpartition("/")
    if not split(target):
        # "" or ".": the root itself, which the rmtree below would empty.
        raise UnsafePath(f"{target!r} names no entry inside the spool: not moved")
    dst_fd = open_dir(root, dst_parent, create=True)
    try:
        try:
            os.rename(src_leaf, dst_leaf, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                replace_across(fd_path(src_fd, src_leaf), fd_path(dst_fd, dst_leaf))
            elif exc.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                # A folder of that name is in the way (an earlier run's):
                # this move wins, as os.replace would for a file.
                shutil.rmtree(fd_path(dst_fd, dst_leaf))
                os.rename(src_leaf, dst_leaf, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
            else:
                raise
    finally:
        os.close(dst_fd)


def remove_tree(path: Path) -> None:
    """Remove ``path`` (a file, a link, or a folder of any depth), following no link.

    shutil.rmtree recurses once per level: a refused drop kept whole in
    failed/ can be 1,500 levels deep and would raise RecursionError. For such
    a tree coreutils' ``rm -rf`` (iterative, never follows links) does it.
    """
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        os.unlink(path)
    except RecursionError:
        done = subprocess.run(
            ["rm", "-rf", "--one-file-system", "--", str(path)], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise OSError(errno.EIO, f"rm -rf failed: {done.stderr.strip()}", str(path)) from None


def write_new(
    dir_fd: int, name: str, data: bytes, mode: int = FILE_MODE, sync: bool = False
) -> None:
    """Create file ``name`` in ``dir_fd`` (it must not exist) holding ``data``, with ``mode``;
    with ``sync``, flushed to disk before it is closed."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dir_fd)  # fmt: skip
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            # On the descriptor just written: opening the file again by name
            # only to flush it would cost two more system calls.
            os.fsync(fd)
    finally:
        os.close(fd)


def fix_modes(root: Path, gid: int = -1) -> None:
    """Give a tree batchd made itself (a processor's outputs) folders 0750 and
    :data:`FILE_MODE` files, and group ``gid`` (the outbox's; -1 keeps it),
    without following links; iterative.

    No setgid bit: the unit's ``RestrictSUIDSGID=`` refuses every chmod that
    names it (EPERM), and these folders are made in work/ (no setgid there),
    so the group that lets the drop group read them is given by chown instead,
    which batchd, a member of that group, may do.
    """
    stack = [os.open(root, _DIR_FLAGS)]
    try:
        _own(stack[0], None, gid, DIR_MODE & 0o777)
        while stack:
            fd = stack.pop()
            try:
                for entry in list(os.scandir(fd)):
                    if entry.is_symlink():
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        sub = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
                        stack.append(sub)
                        _own(sub, None, gid, DIR_MODE & 0o777)
                    elif entry.is_file(follow_symlinks=False):
                        # A processor's own scratch tree: nobody else can swap a name here.
                        _own(fd, entry.name, gid, FILE_MODE)
            finally:
                os.close(fd)
    finally:
        for fd in stack:
            with contextlib.suppress(OSError):
                os.close(fd)


def _own(fd: int, name: str | None, gid: int, mode: int) -> None:
    """chown to group ``gid`` (first: a chown clears set-id bits), then chmod ``mode``;
    ``fd`` itself, or ``name`` inside folder ``fd``."""
    if gid != -1:
        with contextlib.suppress(PermissionError):  # not a member: the group stays
            if name is None:
                os.fchown(fd, -1, gid)
            else:
                os.chown(name, -1, gid, dir_fd=fd, follow_symlinks=False)
    if name is None:
        os.fchmod(fd, mode)
    else:
        os.chmod(name, mode, dir_fd=fd)


# POSIX ACL xattr format (linux/posix_acl_xattr.h): a version word, then
# (tag u16, perm u16, id u32) entries sorted by tag, then id.
_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_ACL_UNDEFINED_ID = 0xFFFFFFFF


def restrict_to(fd: int, reader_uid: int | None) -> None:
    """Make folder ``fd`` (batchd's own) readable by batchd, root and ``reader_uid``
    only: the group loses access, the reader gets read and search by an ACL.

    Written as the ``system.posix_acl_access`` attribute straight from Python:
    an owner may set its files' ACLs without privilege, and no ``setfacl``
    process is started per batch. ``None``: nobody but batchd and root.
    """
    # setgid kept: what batchd writes below still gets the drop group, which
    # only those let through this folder (the reader) can use. A folder made
    # 2700 already is left alone: under RestrictSUIDSGID= this chmod fails.
    if stat.S_IMODE(os.fstat(fd).st_mode) != 0o2700:
        os.fchmod(fd, 0o2700)
    entries = [(_ACL_USER_OBJ, 0o7, _ACL_UNDEFINED_ID)]
    if reader_uid is not None and reader_uid != os.geteuid():
        entries.append((_ACL_USER, 0o5, reader_uid))
    entries += [
        (_ACL_GROUP_OBJ, 0, _ACL_UNDEFINED_ID),
        (_ACL_MASK, 0o5, _ACL_UNDEFINED_ID),
        (_ACL_OTHER, 0, _ACL_UNDEFINED_ID),
    ]
    blob = struct.pack("<I", _ACL_VERSION) + b"".join(
        struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in entries
    )
    os.setxattr(fd, _ACL_XATTR, blob)


@contextlib.contextmanager
def named_view(fd: int, name: str) -> Iterator[Path]:
    """A path ending in ``name`` that refers to open file ``fd``, for code that
    wants a path and its suffix (processors, content sniffing, exec's ``{input}``).

    A private folder (0700, under the temporary directory) holds a link named
    ``name`` to ``/proc/<pid>/fd/<fd>``: whoever opens it gets the very file
    batchd opened and checked, never what sits at its old name now. The
    folders are kept for reuse within a process: removing a folder costs
    milliseconds on some filesystems, a link microseconds.
    """
    folder = _take_view_folder()
    link = Path(folder) / (name.rsplit("/", 1)[-1] or "input")
    try:
        os.symlink(fd_path(fd), link)
        try:
            yield link
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)
    finally:
        _give_view_folder(folder)


_views_lock = threading.Lock()
_views: dict[int, list[str]] = {}  # by pid: a forked worker makes its own


def _take_view_folder() -> str:
    with _views_lock:
        free = _views.setdefault(os.getpid(), [])
        if free:
            return free.pop()
    folder = tempfile.mkdtemp(prefix="batchd-input-")
    if not _cleanup_registered.get(os.getpid()):
        _cleanup_registered[os.getpid()] = True
        atexit.register(_remove_view_folders, os.getpid())
    return folder


def _give_view_folder(folder: str) -> None:
    with _views_lock:
        free = _views.setdefault(os.getpid(), [])
        if len(free) < VIEW_FOLDERS_KEPT:
            free.append(folder)
            return
    shutil.rmtree(folder, ignore_errors=True)


_cleanup_registered: dict[int, bool] = {}
#: Private view folders a process keeps for reuse (one per concurrent view).
VIEW_FOLDERS_KEPT = 8


def _remove_view_folders(pid: int) -> None:
    if pid != os.getpid():
        return  # a forked child: the folders are its parent's
    for folder in _views.get(pid, []):
        shutil.rmtree(folder, ignore_errors=True)
