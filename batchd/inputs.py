"""Where a claimed batch's inputs go: to ``archive/`` or ``failed/`` (or deleted)
as each file ends, what is left of its folder at the end, a drop refused whole,
and an archived input brought back into ``work/`` when its file is re-queued.

A mixin of :class:`batchd.spool.Spool` (callers say ``spool.settle_input``).
Every move goes through folder descriptors opened without following links
(:mod:`batchd.safefs`): a member folder its dropper swapped for a link is
refused, never moved through.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

import structlog

from batchd import safefs
from batchd.config import Settings
from batchd.fsutil import move_contents, move_locked_folder

log = structlog.get_logger("batchd.spool")


class InputMoves:
    """The moves of a batch's inputs out of ``work/``, under ``root``."""

    root: Path
    settings: Settings

    def input_path(self, work_path: str, relpath: str) -> Path:
        return self.root / work_path / relpath

    def input_file(self, work_path: str, relpath: str) -> str:
        """:meth:`input_path` as a string: a worker's own claim checks it and
        puts it in the job as one (issue 15). Both are relative paths of names."""
        return f"{self.root}/{work_path}/{relpath}"

    def locate_input(self, work_path: str, name: str, relpath: str) -> Path | None:
        """Where a file's input is now, moving it back into ``work/`` if an
        operator re-queued a file that had already been archived or failed.

        The move goes through folder descriptors (no link followed); the
        worker then opens the input the same way and checks it again."""
        here = self.input_path(work_path, relpath)
        if os.path.lexists(here):
            return here
        for base in ("failed", "archive"):
            there = f"{base}/{name}/{relpath}"
            if os.path.lexists(self.root / there):
                safefs.move(self.root, there, f"{work_path}/{relpath}")
                return here
        return None

    def inputs_left(self, work_path: str) -> bool:
        """Whether a batch's folder in ``work/`` still holds anything (reached with
        no link followed); True when that cannot be told, False when it is gone.

        A batch's end settles each finished member by its own status; when the
        folder is empty (every worker moved its own input) none is left to
        settle, and 50 walks to find each one gone are saved (issue 15).
        """
        try:
            dir_fd = safefs.open_dir(self.root, work_path)
        except FileNotFoundError:
            return False
        except (OSError, safefs.UnsafePath):
            return True
        try:
            return bool(os.listdir(dir_fd))
        finally:
            os.close(dir_fd)

    def settle_input(self, work_path: str, name: str, relpath: str, ok: bool) -> None:
        """Move a finished file's input to ``archive/`` (or delete it, with
        ``spool.keep_inputs = false``) on success, or to ``failed/``.

        Both ends are reached through folder descriptors opened without
        following links: a member folder its dropper swapped for a link
        (to ``state/``, say) is refused, never moved through."""
        source = f"{work_path}/{relpath}"
        parent, _, leaf = source.rpartition("/")
        try:
            dir_fd = safefs.open_dir(self.root, parent)
        except FileNotFoundError:
            return  # already settled (recovery after a crash, or a re-run)
        except safefs.UnsafePath as exc:
            # Not retried: it would be refused every time. What is left in
            # the batch folder is archived by finalize(), links as links.
            log.error("input_not_moved", work_path=work_path, relpath=relpath, error=exc.message)
            return
        try:
            try:
                st = os.stat(leaf, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                return
            if ok and not self.settings.spool.keep_inputs:
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(safefs.fd_path(dir_fd, leaf))
                else:
                    os.unlink(leaf, dir_fd=dir_fd)
                return
            target = f"{'archive' if ok else 'failed'}/{name}/{relpath}"
            try:
                safefs.move_from(dir_fd, leaf, self.root, target)
            except safefs.UnsafePath as exc:
                # A link planted where the input should go: never followed;
                # the input stays in work/ (an operator can see it there).
                log.error(
                    "input_not_moved", work_path=work_path, relpath=relpath, error=exc.message
                )
            except PermissionError:
                if not stat.S_ISDIR(st.st_mode):
                    raise
                dst_parent = target.rpartition("/")[0]
                dst_fd = safefs.open_dir(self.root, dst_parent, create=True)
                try:
                    move_locked_folder(safefs.fd_path(dir_fd, leaf), safefs.fd_path(dst_fd, leaf))
                finally:
                    os.close(dst_fd)
        finally:
            os.close(dir_fd)

    def finalize(self, work_path: str, name: str) -> None:
        """Empty a finished batch's folder in ``work/``, leaving the folder itself.

        What is left there is not a member (the marker, ignored temporary
        names): it goes to ``archive/<name>/`` so nothing dropped is lost;
        the marker itself is deleted. The empty folder stays until
        :meth:`release`: as long as it is there, start-up recovery finds the
        batch and rewrites its final status.json, which a crash may have kept
        from being written.

        Iterative and through folder descriptors: links are moved as links,
        never followed; below ``limits.max_depth`` a folder moves whole.
        """
        try:
            top = safefs.open_dir(self.root, work_path)
        except FileNotFoundError:
            return
        except safefs.UnsafePath as exc:
            log.error("batch_folder_not_finalized", work_path=work_path, error=exc.message)
            return
        try:
            marker = self.settings.watch.marker
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.stat(marker, dir_fd=top, follow_symlinks=False).st_mode):
                    os.unlink(marker, dir_fd=top)
        finally:
            os.close(top)
        move_contents(self.root, work_path, f"archive/{name}", self.settings.limits.max_depth)
        # No fsync of work/<prio>/ here: the database already says the batch
        # is finished, so if a power cut undoes these moves, start-up recovery
        # simply finalizes the batch again. Durability is not needed, only the
        # atomicity each rename already has.

    def release(self, work_path: str) -> None:
        """Remove a finished batch's folder from ``work/`` once its final
        status.json is written (see :meth:`finalize`).

        Only an empty folder goes: anything that appeared in it since is left
        for the next :meth:`finalize` (start-up recovery), never deleted.
        """
        with contextlib.suppress(FileNotFoundError, OSError):
            os.rmdir(self.root / work_path)

    def refuse_whole(self, work_path: str, name: str) -> None:
        """Move a refused drop's folder to ``failed/<name>`` as it is, in one rename
        (a drop over a cap of the scan is never walked again)."""
        try:
            safefs.move(self.root, work_path, f"failed/{name}")
        except (OSError, safefs.UnsafePath) as exc:
            # The folder may not be movable (its owner gave batchd no write on
            # it); it stays in work/, and finalize() archives what it can.
            log.error("refused_drop_not_moved", work_path=work_path, error=str(exc))
