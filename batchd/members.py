"""What in a claimed folder is processed: the scan, its caps, the content check, name repair.

Every walk here is iterative and goes through folder descriptors opened
without following links (:mod:`batchd.safefs`), so neither a drop nested
thousands of levels deep nor a member swapped for a link can make batchd
recurse without end or read outside the claimed tree. A drop deeper than
``limits.max_depth`` or with more than ``limits.max_entries_per_drop``
entries is refused whole (:class:`DropRefused`).

The same :func:`check` runs at the scan and again in the worker before each
attempt, so a file re-queued by any means (``batchd retry``, an operator's
SQL) is held to exactly the rules a new member is.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import os
import re
import stat
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path

from batchd import safefs
from batchd.config import LimitsSettings, Settings
from batchd.errors import BatchdError
from batchd.fsutil import fit_name, printable
from batchd.records import NewFile

# A file whose name promises one of these types must have that content: a
# ".pdf" holding text is refused even where text (csv) is allowed.
_KINDS_BY_SUFFIX: dict[str, frozenset[str]] = {
    ".pdf": frozenset({"pdf"}),
    ".xlsx": frozenset({"xlsx"}),
    ".xls": frozenset({"xls", "xlsx"}),
    ".csv": frozenset({"csv", "txt", "empty"}),
}


class DropRefused(BatchdError):
    """The drop is over a cap of the scan (too deep, too many entries); none of it is processed."""


class NameNotText(BatchdError):
    """A name in the drop is not valid UTF-8: :func:`repair_names` first (see :func:`scan`)."""


def ignored(name: str, settings: Settings) -> bool:
    """True for names writers use for work in progress (``watch.ignore``)."""
    return _ignore_matcher(settings.watch.ignore)(name) is not None


@functools.lru_cache(maxsize=8)
def _ignore_matcher(patterns: tuple[str, ...]) -> Callable[[str], object]:
    """One compiled pattern for every glob: ``fnmatchcase`` per glob was a
    regex cache lookup and a match each, 8 per name (issue 15)."""
    if not patterns:
        return lambda name: None
    return re.compile("|".join(f"(?:{fnmatch.translate(pat)})" for pat in patterns)).match


def is_member(name: str, top: bool, settings: Settings) -> bool:
    """Whether an entry of this name is a member: not the top-level marker, not ignored."""
    if top and name == settings.watch.marker:
        return False
    return not ignored(name, settings)


def batch_limit_error(count: int, limits: LimitsSettings) -> str | None:
    """Why a batch of ``count`` members is refused as a whole, or None."""
    if count > limits.max_files_per_batch:
        return (
            f"batch has {count} files, over limits.max_files_per_batch"
            f" ({limits.max_files_per_batch}); no file was processed"
        )
    return None


def _caps(limits: LimitsSettings, depth: int, examined: int, where: str) -> None:
    if depth > limits.max_depth:
        raise DropRefused(
            f"folders are nested deeper than limits.max_depth ({limits.max_depth}) at"
            f" {where!r}: no file was processed; flatten the folder and drop it again"
        )
    if examined > limits.max_entries_per_drop:
        raise DropRefused(
            f"the drop has more than limits.max_entries_per_drop"
            f" ({limits.max_entries_per_drop}) files and folders: no file was processed;"
            " split it into several drops"
        )


def scan(folder: Path, settings: Settings, require_text: bool = False) -> list[NewFile]:
    """The members of a claimed batch folder, each checked against the limits.

    Never follows symbolic links. Symlinks, FIFOs, sockets and devices are
    members that fail at once with a clear error; so do files over the
    size limit, of a refused type, or unreadable. The marker file and
    names matched by ``watch.ignore`` are not members (they stay in the
    folder and are archived with it). Raises :class:`DropRefused` over a cap.

    With ``require_text``, raises :class:`NameNotText` at the first entry
    (member or not) whose name is not valid UTF-8: the caller repairs the
    names and scans again, so a drop whose names are all text is walked
    once, not twice (issue 15).
    """
    limits = settings.limits
    out: list[NewFile] = []
    examined = 0

    def unreadable(rel: str, error: str) -> None:
        out.append(NewFile(rel, None, error))

    with contextlib.closing(_walk(folder, unreadable)) as folders:
        for here in folders:
            examined += len(here.names)
            _caps(limits, here.depth, examined, here.rel or ".")
            for name in here.names:
                if require_text and not name.isascii() and printable(name) != name:
                    raise NameNotText(f"{here.path(name)!r} is not valid UTF-8")
                if not is_member(name, here.depth == 0, settings):
                    continue
                relpath = here.path(name)
                member = _member(here.fd, name, relpath, settings)
                if member is None:
                    _caps(limits, here.depth + 1, examined, relpath)
                    here.descend.append(name)
                else:
                    out.append(member)
    out.sort(key=lambda m: m.relpath)
    return out


@dataclass
class _Listing:
    """One folder of a walk: its entry names, and its descriptor, open while the
    walk's caller looks at them."""

    rel: str
    depth: int
    fd: int
    names: list[str]
    #: filled by the caller: the entries that are folders to walk next.
    descend: list[str] = field(default_factory=list)

    def path(self, name: str) -> str:
        """The relative path of entry ``name``."""
        return f"{self.rel}/{name}" if self.rel else name


def _walk(folder: Path, unreadable: Callable[[str, str], None]) -> Generator[_Listing, None, None]:
    """Every folder of the tree under ``folder`` that the caller descends into,
    the top first; a folder that cannot be opened or listed goes to
    ``unreadable(relpath, error)`` instead. Close the generator when done
    (``contextlib.closing``): it holds the current folder's descriptor.

    Folders still to list wait as (relpath, depth); each is reopened from
    the top when its turn comes (at most max_depth steps, none following a
    link), so a folder with thousands of subfolders never holds thousands of
    descriptors open.
    """
    stack: list[tuple[str, int]] = [("", 0)]
    while stack:
        rel, depth = stack.pop()
        try:
            fd = safefs.open_dir(folder, rel)
        except safefs.UnsafePath:
            unreadable(rel, safefs.LINK_REFUSED)
            continue
        except OSError as exc:
            unreadable(rel or ".", f"cannot read folder: {exc.strerror}")
            continue
        try:
            try:
                names = os.listdir(fd)
            except OSError as exc:
                unreadable(rel or ".", f"cannot read folder: {exc.strerror}")
                continue
            here = _Listing(rel, depth, fd, names)
            yield here
            stack.extend((here.path(name), depth + 1) for name in here.descend)
        finally:
            os.close(fd)


def _member(dir_fd: int, name: str, relpath: str, settings: Settings) -> NewFile | None:
    """One entry: a checked member, or ``None`` for a subfolder to walk."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        return NewFile(relpath, None, f"cannot stat: {exc.strerror}")
    if stat.S_ISLNK(st.st_mode):
        return NewFile(relpath, None, safefs.LINK_REFUSED)
    if stat.S_ISDIR(st.st_mode):
        return None
    if not stat.S_ISREG(st.st_mode):
        return NewFile(relpath, None, f"not a regular file ({safefs.kind(st.st_mode)}): not read")
    if st.st_size > settings.limits.max_file_bytes:
        return NewFile(relpath, st.st_size, size_error(st.st_size, settings.limits))
    try:
        fd, fst = safefs.open_file(dir_fd, name)
    except safefs.UnsafePath as exc:
        return NewFile(relpath, None, exc.message)
    except OSError as exc:
        return NewFile(relpath, st.st_size, f"cannot read file: {exc.strerror}")
    try:
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            return NewFile(relpath, None, "replaced while it was being scanned: not read")
        return NewFile(
            relpath,
            fst.st_size,
            check(fd, fst, name, settings.limits),
            file_dev=fst.st_dev,
            file_ino=fst.st_ino,
        )
    finally:
        os.close(fd)


def size_error(size: int, limits: LimitsSettings) -> str:
    return f"file is {size} bytes, over limits.max_file_bytes ({limits.max_file_bytes})"


def check(fd: int, st: os.stat_result, name: str, limits: LimitsSettings) -> str | None:
    """Why open regular file ``fd`` (named ``name``) must be refused, or ``None``.

    The content is read through the descriptor, never by name.
    """
    from batchd.sniff import sniff  # imported late: filetype is only needed here

    if st.st_size > limits.max_file_bytes:
        return size_error(st.st_size, limits)
    if "*" in limits.allowed_types:
        return None
    try:
        with safefs.named_view(fd, name) as view:
            kind = sniff(view)
    except OSError as exc:
        return f"cannot read file: {exc.strerror}"
    allowed = ", ".join(limits.allowed_types)
    suffix = Path(name).suffix.lower()
    expected = _KINDS_BY_SUFFIX.get(suffix)
    if expected is not None and kind.kind not in expected:
        return (
            f"content is {kind.kind} ({kind.mime}), not an allowed type for a {suffix} file"
            f" (allowed: {allowed}; see limits.allowed_types)"
        )
    if not limits.allows(kind.kind):
        return (
            f"content is {kind.kind} ({kind.mime}), not an allowed type ({allowed});"
            " see limits.allowed_types"
        )
    return None


def check_path(path: Path, settings: Settings) -> str | None:
    """:func:`check` for a file batchd assembled itself (an upload), opened without following."""
    try:
        fd, st = safefs.open_member(path.parent, path.name)
    except safefs.UnsafePath as exc:
        return exc.message
    except OSError as exc:
        return f"cannot read file: {exc.strerror}"
    try:
        return check(fd, st, path.name, settings.limits)
    finally:
        os.close(fd)


def repair_names(folder: Path, settings: Settings) -> list[str]:
    """Rename every entry under a claimed ``folder`` whose name is not valid
    UTF-8 to its printable form; returns the new relative paths.

    The database and the JSON documents hold text, so such a name could
    never be registered; renamed, the file is processed like any other
    (``caf\\xe9.csv``). Runs on batchd's own copy in ``work/``, before
    :func:`scan`; links are renamed, never followed. Iterative, and it stops
    at the scan's caps (the scan then refuses the drop).
    """
    limits = settings.limits
    renamed: list[str] = []
    examined = 0
    # A folder that cannot be opened or listed: the scan reports it.
    with contextlib.closing(_walk(folder, lambda rel, error: None)) as folders:
        for here in folders:
            examined += len(here.names)
            if here.depth > limits.max_depth or examined > limits.max_entries_per_drop:
                return renamed  # the scan refuses the drop
            taken = set(here.names)
            for name in here.names:
                fixed = printable(name)
                if fixed != name:
                    fixed, n = fit_name(fixed), 1
                    while fixed in taken:
                        n += 1
                        fixed = fit_name(printable(name), f"~{n}")
                    os.rename(name, fixed, src_dir_fd=here.fd, dst_dir_fd=here.fd)
                    taken.add(fixed)
                    renamed.append(here.path(fixed))
                with contextlib.suppress(OSError):
                    st = os.stat(fixed, dir_fd=here.fd, follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        here.descend.append(fixed)
    return renamed
