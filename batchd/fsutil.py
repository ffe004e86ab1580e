"""Filesystem primitives: atomic JSON writes, fsync, moves across filesystems,
file names that fit NAME_MAX and that a UTF-8 document can hold.

Nothing here knows the spool's layout; :mod:`batchd.spool` says where things
go and uses these to put them there.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import hashlib
import json
import os
import pwd
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from batchd import jsonio, safefs
from batchd.errors import SpoolError

#: A cross-filesystem move in progress (see :func:`replace_across`).
XDEV_PARTIAL_SUFFIX = ".xdev-partial"
#: The longest file name the filesystem allows (NAME_MAX), in bytes.
NAME_MAX_BYTES = 255
#: How much of a target's name a temporary file next to it carries.
TEMP_NAME_BYTES = 100

log = structlog.get_logger("batchd.spool")


def fsync_file(path: str) -> None:
    """Flush one file's data and size to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(
    path: Path, data: Any, durable: bool = True, root: Path | None = None
) -> None:
    """Write JSON so that a reader sees the old file or the new one, never half.

    Temporary file in the same folder, then rename over the target. With
    ``durable`` (the default) the file is fsynced before the rename, so the
    rename never exposes a file whose blocks are not on disk yet. A worker
    passes ``durable=False`` when the daemon fsyncs a group of results
    itself before recording them (see :class:`batchd.outbox.ResultSyncer`).

    With ``root`` (the spool root; always, for the outbox), the folder is
    reached from ``root`` without following a link at any component and
    missing folders are made 2750; the file is 0640 whatever the umask.
    """
    if root is None:
        tmp = stage_json(path, data)
        try:
            if durable:
                fsync_file(tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    write_json_in(root, _rel_to(path, root), data, durable)


def write_json_in(root: Path, rel: str, data: Any, durable: bool = True) -> None:
    """:func:`write_json_atomic` of the file ``rel`` (a relative path of names)
    under the spool ``root``: the same walk, modes and order, with no path
    objects (a worker writes one result per file this way, issue 15)."""
    parent, _, name = rel.rpartition("/")
    dir_fd = safefs.open_dir(root, parent, create=True)
    try:
        tmp = stage_in(dir_fd, name, data, sync=durable)
        try:
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
    finally:
        os.close(dir_fd)


def _rel_to(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        raise SpoolError(f"{path} is not inside the spool {root}: not written") from None


def stage_in(dir_fd: int, name: str, data: Any, sync: bool = False) -> str:
    """Write ``data`` as a new temporary file beside ``name`` in ``dir_fd`` (with
    ``sync``, flushed to disk); its name."""
    body = jsonio.document(data)
    while True:
        tmp = f"{_temp_prefix_of(name)}{uuid.uuid4().hex[:8]}.tmp"
        try:
            safefs.write_new(dir_fd, tmp, body, sync=sync)
        except FileExistsError:
            continue
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        return tmp


def stage_json(path: Path, data: Any, sync: bool = False) -> str:
    """Write ``data`` to a temporary file beside ``path`` (not yet visible under
    its name; synced only with ``sync``); returns the temporary file's path.

    The first half of an atomic write outside the spool: fsync it (or pass
    ``sync``), then ``os.replace`` it onto ``path``. Under the spool root,
    :func:`stage_in` stages through a folder reached without following links.
    """
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600: give it the mode every file batchd
        # writes has (0640: the group reads, only batchd writes), whatever the umask.
        os.fchmod(fd, safefs.FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(jsonio.document(data))
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def move_outputs(scratch: Path | str, target: Path | str, root: Path | None = None) -> None:
    """Move what a processor left in its output folder to ``target`` (next to
    its result); an empty or missing folder is simply removed.

    With ``root`` (the spool root) the outputs get batchd's modes (folders
    0750, files 0640, the outbox's group) and move through folder
    descriptors, no link followed.
    """
    try:
        empty = not os.listdir(scratch)
    except FileNotFoundError:
        return
    if empty:
        os.rmdir(scratch)
        return
    # Paths only past here: most processors leave no outputs (issue 15).
    scratch, target = Path(scratch), Path(target)
    if root is not None:
        safefs.fix_modes(scratch, gid=os.stat(root / "outbox").st_gid)
        safefs.move(root, _rel_to(scratch, root), _rel_to(target, root))
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        remove(target)  # an earlier attempt's outputs; this attempt wins
    replace_across(scratch, target)  # the outbox may be a mount of its own


def replace_across(source: Path, target: Path) -> None:
    """``os.replace`` that still works when ``target`` is on another filesystem.

    The spool is meant to be one filesystem, but an operator may mount
    ``archive/`` or ``failed/`` elsewhere (a bigger disk), and rename(2) then
    fails with EXDEV. Copy to a hidden name beside the target, fsync it,
    rename it into place, and only then delete the source: a crash in between
    leaves the input in both places (the next settle replaces the copy),
    never in neither. A failed copy (disk full) leaves the source untouched.
    """
    try:
        os.replace(source, target)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    partial = target.with_name(fit_name(f".{target.name}", XDEV_PARTIAL_SUFFIX))
    try:
        if os.path.lexists(partial):
            remove(partial)  # left by a crash mid-copy
        if source.is_dir() and not source.is_symlink():
            shutil.copytree(source, partial, symlinks=True)
        else:
            shutil.copy2(source, partial, follow_symlinks=False)
        if not partial.is_symlink():
            fsync_tree(partial)
        os.replace(partial, target)
    except BaseException:
        with contextlib.suppress(OSError):
            remove(partial)
        raise
    fsync_dir(target.parent)
    remove(source)


def _temp_prefix(path: Path) -> str:
    return _temp_prefix_of(path.name)


def _temp_prefix_of(name: str) -> str:
    # Only the start of the name: a 255-byte target must still get a temporary file.
    head = os.fsencode(name)[:TEMP_NAME_BYTES].decode("utf-8", "ignore")
    return f".{head}."


def printable(name: str) -> str:
    """``name`` with every byte that is not UTF-8 written as ``\\xNN``.

    Python hands such names over with lone surrogates, which neither SQLite
    nor a UTF-8 JSON file can hold; the escaped form is plain text that still
    shows the bytes.
    """
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def fit_name(name: str, suffix: str = "") -> str:
    """``name + suffix`` as one file name, shortened when over NAME_MAX_BYTES.

    A name too long keeps its first bytes and gains ``~`` and 8 hex digits of
    its sha256, so long names sharing a beginning stay apart and the same name
    always maps to the same file name.
    """
    full = name + suffix
    if len(os.fsencode(full)) <= NAME_MAX_BYTES:
        return full
    tag = "~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:8]
    budget = NAME_MAX_BYTES - len(os.fsencode(tag + suffix))
    return os.fsencode(name)[:budget].decode("utf-8", "ignore") + tag + suffix


#: How long a user id's name is remembered (a user renamed or created shows
#: within this; long enough that a burst of drops asks the user database once).
OWNER_NAME_TTL_SECONDS = 60.0
_OWNER_NAMES_MAX = 4096
_owner_names: dict[int, tuple[float, str]] = {}
_monotonic = time.monotonic  # tests move it


def owner_name(st: os.stat_result) -> str:
    """The user name owning a file (its numeric id when no such user exists).

    A name found is remembered per user id for ``OWNER_NAME_TTL_SECONDS``:
    every claim asks, and each ``getpwuid`` re-reads /etc/passwd (six system
    calls and a parse; with LDAP or sssd, a round trip).
    """
    now = _monotonic()
    known = _owner_names.get(st.st_uid)
    if known is not None and now - known[0] < OWNER_NAME_TTL_SECONDS:
        return known[1]
    try:
        name = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        # Not remembered: with LDAP or sssd away for a moment, one failed
        # lookup must not name a minute of that user's drops by number.
        return str(st.st_uid)
    if len(_owner_names) >= _OWNER_NAMES_MAX:
        _owner_names.clear()
    _owner_names[st.st_uid] = (now, name)
    return name


def group_name(gid: int) -> str:
    """The name of group ``gid`` (its number when no such group exists)."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def move_locked_folder(source: Path, target: Path) -> None:
    """Move a folder its owner may not write (an unreadable member, mode 000).

    Moving a folder to a new parent rewrites its ``..`` entry, which needs
    write permission on it. batchd lends that permission for the move only,
    so the folder arrives in ``failed/`` with the mode its user gave it.
    Raises PermissionError when batchd does not own the folder.
    """
    mode = stat.S_IMODE(source.lstat().st_mode)
    os.chmod(source, mode | stat.S_IWUSR)
    try:
        os.replace(source, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.chmod(source, mode)
        raise
    os.chmod(target, mode)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def fsync_tree(path: Path) -> None:
    if path.is_file() and not path.is_symlink():
        with path.open("rb") as fh:
            os.fsync(fh.fileno())
        return
    for dirpath, _dirs, files in os.walk(path):
        for fname in files:
            p = Path(dirpath) / fname
            if p.is_file() and not p.is_symlink():
                with p.open("rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))


def copy_across(source: Path, target: Path, is_dir: bool, marker_suffix: str) -> None:
    """Move ``source`` to the folder ``target`` across filesystems (an inbox
    on a bind mount, say); a file lands as ``target/<its name>``.

    Build the folder under a hidden name, make it durable, record beside it
    (``<target><marker_suffix>``) that the source is now redundant, rename
    the folder into place, then delete the source. :func:`finish_copies`
    completes an interrupted delete, so the source is never taken twice.
    """
    partial = target.with_name(f".{target.name}.incoming")
    with contextlib.suppress(FileNotFoundError):
        remove(partial)
    if is_dir:
        shutil.copytree(source, partial, symlinks=True)
    else:
        partial.mkdir()
        shutil.copy2(source, partial / source.name, follow_symlinks=False)
    fsync_tree(partial)
    st = source.lstat()
    marker = target.with_name(target.name + marker_suffix)
    write_json_atomic(marker, {"source": str(source), "ino": st.st_ino, "dev": st.st_dev})
    os.rename(partial, target)
    fsync_dir(target.parent)
    remove(source)
    marker.unlink()


def finish_copies(folder: Path, marker_suffix: str) -> None:
    """Complete the :func:`copy_across` into ``folder`` that a crash interrupted."""
    for entry in list(folder.iterdir()) if folder.exists() else []:
        if entry.name.endswith(".incoming") and entry.name.startswith("."):
            remove(entry)  # the copy never completed; the source is still in place
        elif entry.name.endswith(marker_suffix):
            target = entry.with_name(entry.name[: -len(marker_suffix)])
            info = json.loads(entry.read_text())
            src = Path(info["source"])
            with contextlib.suppress(FileNotFoundError):
                st = src.lstat()
                if target.exists() and (st.st_ino, st.st_dev) == (info["ino"], info["dev"]):
                    remove(src)
            entry.unlink()


def move_contents(root: Path, source: str, target: str, max_depth: int) -> None:
    """Move everything inside ``root/source`` to ``root/target`` (both relative
    to ``root``), leaving ``source`` itself, empty where it could be emptied.

    Iterative and through folder descriptors: links are moved as links,
    never followed; below ``max_depth`` a folder moves whole. What cannot be
    moved safely (swapped for a link, unreadable) is left where it is.
    """
    folder = root / source
    dirs = [""]
    for rel in dirs:  # grows while it is walked: breadth first, no recursion
        depth = rel.count("/") + 1 if rel else 0
        try:
            fd = safefs.open_dir(folder, rel)
        except (OSError, safefs.UnsafePath):
            continue  # swapped or unreadable: left where it is
        try:
            entries = os.listdir(fd)
            for entry in entries:
                sub = f"{rel}/{entry}" if rel else entry
                try:
                    st = os.stat(entry, dir_fd=fd, follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode) and depth < max_depth:
                        dirs.append(sub)
                        continue
                    safefs.move(root, f"{source}/{sub}", f"{target}/{sub}")
                except FileNotFoundError:
                    continue
                except safefs.UnsafePath as exc:
                    log.error("leftover_not_moved", work_path=source, relpath=sub,
                              error=exc.message)  # fmt: skip
        finally:
            os.close(fd)
    for rel in reversed(dirs[1:]):
        parent, _, leaf = rel.rpartition("/")
        with contextlib.suppress(OSError, safefs.UnsafePath):
            fd = safefs.open_dir(folder, parent)
            try:
                os.rmdir(leaf, dir_fd=fd)
            finally:
                os.close(fd)


def clear_folder(folder: Path, keep: Callable[[Path], bool]) -> None:
    """Remove every entry of ``folder`` except those ``keep`` names."""
    if folder.exists():
        for entry in folder.iterdir():
            if not keep(entry):
                remove(entry)
