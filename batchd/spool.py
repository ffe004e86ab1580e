"""The spool folder: its layout, claiming drops, and every write into the outbox.

The moves of inputs out of ``work/`` (archive, failed, finalize) are
:class:`batchd.inputs.InputMoves`, a mixin of :class:`Spool`.

All paths live under one root on one filesystem, so moving a drop from
``inbox/`` to ``work/`` and on to ``archive/`` or ``failed/`` is an atomic
``rename(2)``: at every instant a user's file is in exactly one place.

Layout inside ``work/`` (batchd's own)::

    work/<priority>/<batch name>/<relpath>   a claimed batch, always a folder
    work/.uploads/<id>/                      an HTTP upload being received
    work/.scratch/<file id>/                 a processor's output folder
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import stat
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from batchd import members, safefs
from batchd.config import PRIORITY_ORDER, Priority, Settings
from batchd.errors import SpoolError
from batchd.fsutil import (
    clear_folder,
    copy_across,
    finish_copies,
    fit_name,
    group_name,
    owner_name,
    printable,
)
from batchd.inputs import InputMoves
from batchd.records import NewFile

log = structlog.get_logger("batchd.spool")

TOP_FOLDERS = ("inbox", "work", "outbox", "archive", "failed", "state")
#: The mode of a folder :meth:`Spool.init` creates, by top folder (the inbox's
#: priority folders are where the group drops; the rest the group only reads).
_INIT_MODES = {"inbox": 0o2750, "outbox": 0o2750, "archive": 0o2750, "failed": 0o2750,
               "state": 0o700, "work": 0o750}  # fmt: skip
RESULTS = "results"
STATUS_FILE = "status.json"
UPLOADS = ".uploads"
SCRATCH = ".scratch"
XDEV_SUFFIX = ".xdev-source"


class ClaimRefused(SpoolError):
    """A ready drop batchd may not move out of the inbox; it stays there, with the reason."""


@dataclass(frozen=True, slots=True)
class Claimed:
    """A drop moved into ``work/``: where it is now and where it came from."""

    path: Path
    name: str
    priority: Priority
    source: str
    user_id: str | None


class Spool(InputMoves):
    """Paths and file moves under ``spool.root``. Knows nothing of the database."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.spool.root.absolute()
        self.inbox = self.root / "inbox"
        self.work = self.root / "work"
        self.outbox = self.root / "outbox"
        self.archive = self.root / "archive"
        self.failed = self.root / "failed"
        self.state = self.root / "state"
        self.uploads = self.work / UPLOADS
        self.scratch = self.work / SCRATCH
        #: where a batch's name is in use, as strings (:meth:`name_in_use`).
        works = [self.work / p.value for p in PRIORITY_ORDER]
        self._name_bases = tuple(str(b) for b in (self.outbox, self.archive, self.failed, *works))

    # -- layout --------------------------------------------------------------

    def inbox_for(self, priority: Priority) -> Path:
        return self.inbox / priority.value

    def init(self) -> list[str]:
        """Create the layout where missing and check it; returns warnings.

        Raises :class:`SpoolError` when a folder cannot be created or written.
        """
        folders = [self.root / name for name in TOP_FOLDERS]
        folders += [self.inbox_for(p) for p in PRIORITY_ORDER]
        folders += [self.work / p.value for p in PRIORITY_ORDER]
        folders += [self.uploads, self.scratch]
        for folder in folders:
            try:
                created = not folder.exists()
                folder.mkdir(parents=True, exist_ok=True)
                if created:
                    # Explicit, whatever the umask (deploy/batchd.tmpfiles sets
                    # the same modes where the service manager makes them).
                    folder.chmod(_init_mode(folder.relative_to(self.root).parts))
            except OSError as exc:
                if exc.errno == errno.EROFS:
                    raise SpoolError(
                        f"cannot create {folder}: the filesystem is mounted read-only;"
                        " remount it read-write or choose another spool.root"
                    ) from exc
                raise SpoolError(f"cannot create {folder}: {exc.strerror}") from exc
            if not os.access(folder, os.W_OK | os.X_OK):
                if os.statvfs(folder).f_flag & os.ST_RDONLY:
                    raise SpoolError(
                        f"{folder} is on a filesystem mounted read-only;"
                        " remount it read-write or choose another spool.root"
                    )
                raise SpoolError(f"{folder} is not writable by this user (uid {os.getuid()})")
        warnings = []
        root_dev = self.root.stat().st_dev
        for folder in folders:
            if folder.stat().st_dev != root_dev:
                warnings.append(
                    f"{folder} is on another filesystem than {self.root}: claims will copy"
                    " instead of rename (slower; still safe)"
                )
        return warnings

    def ignored(self, name: str) -> bool:
        """True for names writers use for work in progress (``watch.ignore``)."""
        return members.ignored(name, self.settings)

    def drops(self) -> Iterator[tuple[Priority, Path]]:
        """Every entry waiting in the inbox folders (ignored names left out)."""
        for priority in PRIORITY_ORDER:
            folder = self.inbox_for(priority)
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except FileNotFoundError:
                continue
            for entry in entries:
                if not self.ignored(entry.name):
                    yield priority, Path(entry.path)

    def priority_of(self, path: Path) -> tuple[Priority, Path] | None:
        """For a path anywhere under an inbox folder: its priority and its top-level drop."""
        try:
            rel = path.absolute().relative_to(self.inbox)
        except ValueError:
            return None
        parts = rel.parts
        if len(parts) < 2 or parts[0] not in {p.value for p in PRIORITY_ORDER}:
            return None
        return Priority(parts[0]), self.inbox / parts[0] / parts[1]

    # -- claiming ------------------------------------------------------------

    def name_in_use(self, name: str) -> bool:
        """True when ``name`` already has a folder anywhere a batch's name is used.

        ``os.path.exists`` on strings, not ``Path.exists``: this runs for every
        drop claimed, and six Path joins cost more than the six stat calls
        (issue 15). False where this user may not look (work/ is 0750 batchd's
        own: a drop-group member's ``batchd submit`` cannot tell, and the
        daemon picks the next free name itself if the name is taken there).
        """
        return any(os.path.exists(f"{base}/{name}") for base in self._name_bases)

    def unique_name(self, base: str, taken: Callable[[str], bool]) -> str:
        """``base``, else ``base.2``, ``base.3`` ... whichever is free on disk and in ``taken``."""
        candidate, n = fit_name(base), 1
        while self.name_in_use(candidate) or taken(candidate):
            n += 1
            candidate = fit_name(base, f".{n}")
        return candidate

    def claim(self, source: Path, priority: Priority, name: str) -> Claimed | None:
        """Move a ready drop (file or folder) out of the inbox into ``work/``.

        Returns ``None`` when the drop vanished before it could be claimed
        (another node claimed it). A folder is renamed to
        ``work/<priority>/<name>``; a loose file to
        ``work/<priority>/<name>/<its name>``, so every batch is a folder.

        The target is reserved first with ``mkdir``, which fails with
        :class:`FileExistsError` when the name is in use: ``rename(2)`` of a
        folder onto an *empty* folder succeeds, so without the reservation
        two nodes claiming two drops of one name at the same instant could
        both "succeed" onto one path. The caller picks the next name.
        """
        try:
            st = source.lstat()
        except FileNotFoundError:
            return None
        target = self.work / priority.value / name
        user = owner_name(st)
        is_dir = stat.S_ISDIR(st.st_mode)
        target.mkdir()  # the reservation; FileExistsError: name in use
        try:
            # A folder replaces our own empty reservation atomically.
            os.rename(source, target if is_dir else target / source.name)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                target.rmdir()
            return None
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                with contextlib.suppress(OSError):
                    target.rmdir()
                if is_dir and exc.errno in (errno.EACCES, errno.EPERM):
                    # Moving a folder rewrites its "..", which needs write
                    # permission on it: a folder copied with a umask of 0022
                    # (mode 0750) cannot be claimed. Say what to run.
                    raise ClaimRefused(self._unclaimable(source, st)) from exc
                raise
            copy_across(source, target, is_dir, XDEV_SUFFIX)
        return Claimed(target, name, priority, printable(str(source)), user)

    def _unclaimable(self, source: Path, st: os.stat_result) -> str:
        """Why a dropped folder cannot be moved, and the command that fixes it."""
        why = "it is not writable by the group"
        return f"{printable(str(source))}: batchd cannot claim this folder: " + self.access_fix(
            source, st, why, "w"
        )

    def access_fix(self, drop: Path, st: os.stat_result, why: str, need: str) -> str:
        """``why`` batchd may not read or move dropped folder ``drop``, with its
        mode, and the command that fixes it: ``chmod -R g+<need>``, after a
        chgrp to the inbox's group when the folder is in its owner's own group
        (moved in with mv, or unpacked as its owner), which batchd is not in,
        so a chmod alone changes nothing."""
        where = printable(str(drop))
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid != os.geteuid() and st.st_gid not in {os.getegid(), *os.getgroups()}:
            group = group_name(drop.parent.stat().st_gid)
            return (
                f"its group ({group_name(st.st_gid)}) is not the drop group (mode {mode:o})."
                f" Run: chgrp -R {group} '{where}' && chmod -R g+{need} '{where}'"
                "  (it is claimed once it changes)"
            )
        return (
            f"{why} (mode {mode:o}). Run: chmod -R g+{need} '{where}'"
            "  (it is claimed once it changes)"
        )

    def rename_claim(self, claimed: Claimed, name: str) -> Claimed:
        """Give a claimed folder another name (the database had its name already).

        Reserved with ``mkdir`` as in :meth:`claim`; raises
        :class:`FileExistsError` when ``name`` is in use.
        """
        target = self.work / claimed.priority.value / name
        target.mkdir()
        try:
            os.rename(claimed.path, target)
        except OSError:
            with contextlib.suppress(OSError):
                target.rmdir()
            raise
        return Claimed(target, name, claimed.priority, claimed.source, claimed.user_id)

    def adopt(self, folder: Path, priority: Priority, name: str) -> Path:
        """Move a folder batchd assembled itself (an upload) into ``work/``.

        Reserved with ``mkdir`` as in :meth:`claim`: uploads are registered
        in the HTTP process and drops in the daemon, so a name free a moment
        ago may be another process's reservation now (an empty folder a
        rename would silently replace). Raises :class:`FileExistsError`
        when ``name`` is in use; the caller picks the next.
        """
        target = self.work / priority.value / name
        target.mkdir()
        try:
            os.rename(folder, target)
        except OSError:
            with contextlib.suppress(OSError):
                target.rmdir()
            raise
        return target

    def finish_cross_device(self) -> None:
        """Complete cross-filesystem claims a crash interrupted (run at start-up)."""
        for priority in PRIORITY_ORDER:
            finish_copies(self.work / priority.value, XDEV_SUFFIX)

    def work_entries(self) -> Iterator[tuple[Priority, Path]]:
        """Every claimed batch folder in ``work/``."""
        for priority in PRIORITY_ORDER:
            folder = self.work / priority.value
            if not folder.exists():
                continue
            for entry in sorted(folder.iterdir()):
                if not entry.name.startswith("."):
                    yield priority, entry

    def rel(self, path: Path) -> str:
        """``path`` relative to the spool root, as stored in the database."""
        return path.relative_to(self.root).as_posix()

    # -- members ---------------------------------------------------------------

    def repair_names(self, folder: Path) -> list[str]:
        """See :func:`batchd.members.repair_names`."""
        return members.repair_names(folder, self.settings)

    def scan(self, folder: Path, require_text: bool = False) -> list[NewFile]:
        """See :func:`batchd.members.scan` (raises :class:`members.DropRefused` over a
        cap; with ``require_text``, :class:`members.NameNotText`)."""
        return members.scan(folder, self.settings, require_text)

    def check_file(self, path: Path, st: os.stat_result) -> str | None:
        """Why a regular file batchd assembled (an upload) must be refused, or ``None``."""
        return members.check_path(path, self.settings)

    def prepare_batch(self, name: str, user_id: str | None, refused: bool = False) -> None:
        """With ``spool.result_access = "owner"``: make the batch's folders in
        outbox/, archive/ and failed/ now, readable by batchd, root and the user
        who dropped it only (see :func:`batchd.safefs.restrict_to`). With
        "group" they are made when first needed, readable by the drop group.

        A drop refused whole keeps its own folder in failed/ (its dropper's,
        with the modes it had in the inbox), so only its outbox folder is made.
        """
        if self.settings.spool.result_access != "owner":
            return
        try:
            reader: int | None = pwd.getpwnam(user_id).pw_uid if user_id else None
        except KeyError:
            reader = None  # an HTTP user name that is no local user: batchd and root only
        for top in ("outbox",) if refused else ("outbox", "archive", "failed"):
            # Made 2700 at once (setgid from the parent), so restrict_to() needs
            # no chmod, which RestrictSUIDSGID= refuses for a setgid folder.
            fd = safefs.open_dir(self.root, f"{top}/{name}", create=True, mode=0o2700)
            try:
                safefs.restrict_to(fd, reader)
            finally:
                os.close(fd)

    # -- outbox ----------------------------------------------------------------

    def batch_outbox(self, name: str) -> Path:
        return self.outbox / name

    def status_path(self, name: str) -> Path:
        return self.outbox / name / STATUS_FILE

    def result_path(self, name: str, relpath: str) -> Path:
        """``outbox/<name>/results/<relpath>.json``; a name with no room left
        for ``.json`` is shortened (:func:`fit_name`), the document keeps it whole."""
        return Path(self.result_file(name, relpath))

    def outputs_path(self, name: str, relpath: str) -> Path:
        return Path(self.outputs_file(name, relpath))

    def result_file(self, name: str, relpath: str) -> str:
        """:meth:`result_path` as a string: the job of every file dispatched
        carries it as one, so no path object is built for it (issue 15)."""
        return self._beside_result(name, relpath, ".json")

    def outputs_file(self, name: str, relpath: str) -> str:
        """:meth:`outputs_path` as a string (see :meth:`result_file`)."""
        return self._beside_result(name, relpath, ".files")

    def _beside_result(self, name: str, relpath: str, suffix: str) -> str:
        parent, _, leaf = relpath.rpartition("/")
        # One string, not four joins: this runs twice per file dispatched
        # (issue 15). ``name`` and ``relpath`` are single names and a
        # relative path of names, as every join here assumed.
        where = (
            f"{self.outbox}/{name}/{RESULTS}/{parent}/"
            if parent
            else f"{self.outbox}/{name}/{RESULTS}/"
        )
        return where + fit_name(leaf, suffix)

    def scratch_for(self, file_id: str) -> Path:
        return self.scratch / file_id

    def scratch_file(self, file_id: str) -> str:
        """:meth:`scratch_for` as a string (see :meth:`result_file`)."""
        return f"{self.scratch}/{file_id}"

    # -- uploads -------------------------------------------------------------------

    def new_upload_folder(self) -> Path:
        """A fresh, private folder under ``work/.uploads`` to receive an upload."""
        folder = self.uploads / uuid.uuid4().hex
        folder.mkdir(parents=True)
        return folder

    def clear_uploads(self, keep: Callable[[Path], bool] = lambda entry: False) -> None:
        """Remove uploads a crash left half-received (they were never registered),
        except those ``keep`` says may still be in use (another node's)."""
        clear_folder(self.uploads, keep)

    def clear_scratch(self, keep: Callable[[Path], bool] = lambda entry: False) -> None:
        """Remove processors' output folders a crash left, except those ``keep`` names."""
        clear_folder(self.scratch, keep)


def _init_mode(parts: tuple[str, ...]) -> int:
    """The mode ``batchd init`` gives a spool folder (as deploy/batchd.tmpfiles does):
    only inbox/<priority>/ is group-writable; inbox/ itself is not, or a dropper
    could rename or replace a priority folder."""
    if parts[0] == "inbox" and len(parts) > 1:
        return 0o2770
    return _INIT_MODES.get(parts[0], 0o750)
