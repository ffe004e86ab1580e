"""Everything batchd writes for users to read: status.json and result files.

Every write is atomic (see :func:`batchd.fsutil.write_json_atomic`), so a
script polling the outbox never parses half a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog

from batchd import safefs
from batchd.errors import BatchdError
from batchd.faults import crash_point
from batchd.fsutil import fsync_file, stage_in, write_json_atomic
from batchd.records import BatchRow, BatchSnapshot, FileRow, Status
from batchd.spool import STATUS_FILE, Spool
from batchd.store import Store
from batchd.views import Json, detail_of, result_document

log = structlog.get_logger("batchd.outbox")

#: status.json starts with its version (the first key), so a rewrite reads
#: only this much of the document in place to compare.
_VERSION_HEAD_BYTES = 64
_VERSION_RE = re.compile(rb'\{\s*"version":\s*(\d+)')

#: Documents staged at once by :meth:`Outbox.write_snapshots`: each holds its
#: folder open until its rename, and a restart may hold thousands of batches.
STATUS_GROUP_MAX = 64

#: The ``status`` of the status.json of a drop still in the inbox that batchd cannot claim.
INBOX_REFUSED = "refused_in_inbox"


class Outbox:
    """Writes a batch's documents from what the store says."""

    def __init__(self, spool: Spool, store: Store) -> None:
        self.spool = spool
        self.store = store

    def status_document(self, batch: BatchRow) -> Json:
        """The ``GET /api/batch/jobs/<id>`` data object plus ``outbox``, ``source``
        and ``version``, from one consistent snapshot of the batch and its files.

        ``version`` is the batch row's (it grows at every change of the batch):
        :meth:`_install` never lets a document replace one of a higher version.
        """
        snap = self.store.snapshot(batch.id)
        if snap is None:
            raise BatchdError(f"batch {batch.id} ({batch.name}) is no longer in the database")
        return self._document(snap)

    def _document(self, snap: BatchSnapshot) -> Json:
        batch = snap.batch
        doc: Json = {"version": batch.version}
        doc.update(detail_of(batch, snap.files, snap.summary, snap.progress_sum))
        doc["outbox"] = str(self.spool.batch_outbox(batch.name))
        doc["source"] = batch.source
        return doc

    def write_status(self, batch: BatchRow) -> None:
        """Rewrite ``outbox/<name>/status.json`` for ``batch`` from a fresh snapshot.

        Only a finished batch's document is fsynced: until then status.json
        is a live view that start-up recovery rewrites from the database
        (every unfinished batch's document that is missing or unreadable),
        so syncing every update would cost a disk flush for nothing.
        """
        snap = self.store.snapshot(batch.id)
        if snap is None:
            raise BatchdError(f"batch {batch.id} ({batch.name}) is no longer in the database")
        self.write_snapshot(snap)

    def write_snapshot(self, snap: BatchSnapshot) -> None:
        """:meth:`write_status` from a snapshot the caller already read (a worker's
        batch end reads the batch and its files once, for the moves and this)."""
        # A finished batch's document is flushed by the descriptor that wrote it.
        staged = self._stage(snap, sync=snap.batch.status.done)
        try:
            crash_point("during_status_write")
            self._install_staged(staged)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(staged.tmp, dir_fd=staged.dir_fd)
            raise
        finally:
            staged.close()

    def _stage(self, snap: BatchSnapshot, sync: bool = False) -> _Staged:
        """Write ``snap``'s document beside its status.json (with ``sync`` flushed
        to disk; not yet in place).

        The folder is reached from the spool root with no link followed and
        kept open for the rename (one walk per document, not two); it is
        batchd's own (2750), so names inside it stay inside it.
        """
        doc = self._document(snap)
        folder = self.spool.batch_outbox(snap.batch.name)
        dir_fd = safefs.open_dir(self.spool.root, self.spool.rel(folder), create=True)
        try:
            tmp = stage_in(dir_fd, STATUS_FILE, doc, sync=sync)
        except BaseException:
            os.close(dir_fd)
            raise
        version, final = int(doc["version"]), snap.batch.status.done
        return _Staged(snap.batch.id, folder, dir_fd, tmp, version, final)

    def _install(self, path: Path, tmp: str, version: int) -> bool:
        """Rename staged ``tmp`` (a path beside ``path``) onto status.json ``path``
        unless the document there is newer (:meth:`_install_staged`)."""
        dir_fd = safefs.open_dir(self.spool.root, self.spool.rel(path.parent))
        staged = _Staged("", path.parent, dir_fd, os.path.basename(tmp), version, False)
        try:
            return self._install_staged(staged)
        finally:
            staged.close()

    def _install_staged(self, staged: _Staged) -> bool:
        """Rename a staged status.json into place unless the one there is newer.

        Several nodes (and the archiver and recovery on one node) rewrite a
        batch's document; each builds it from its own snapshot, and without
        this check the slowest writer wins, even when its snapshot predates
        the batch's end (issue 16). The check and the rename happen under an
        exclusive ``flock`` on the batch's outbox folder, so they are one step
        for every writer on this filesystem. False when the staged document
        was older and dropped.
        """
        fd = staged.dir_fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            # NFS emulates flock with a write lock, which a directory opened
            # read-only cannot take (EBADF): the version check alone then
            # still refuses every older snapshot but one that races it.
            log.debug("status_lock_unavailable", path=str(staged.folder), error=str(exc))
        try:
            current = _document_version(fd)
            if current is not None and current > staged.version:
                os.unlink(staged.tmp, dir_fd=fd)
                log.info(
                    "status_write_stale",
                    path=str(staged.folder / STATUS_FILE),
                    version=staged.version,
                    current=current,
                )
                return False
            os.replace(staged.tmp, STATUS_FILE, src_dir_fd=fd, dst_dir_fd=fd)
            return True
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)

    def write_statuses(
        self, batches: Sequence[BatchRow], syncer: ResultSyncer
    ) -> dict[str, Exception]:
        """Rewrite several batches' status.json from one snapshot read (:meth:`write_snapshots`)."""
        snaps = self.store.snapshots([b.id for b in batches])
        errors: dict[str, Exception] = {
            b.id: BatchdError(f"batch {b.id} ({b.name}) is no longer in the database")
            for b in batches
            if b.id not in snaps
        }
        errors.update(self.write_snapshots(list(snaps.values()), syncer))
        return errors

    def write_snapshots(
        self, snaps: Sequence[BatchSnapshot], syncer: ResultSyncer
    ) -> dict[str, Exception]:
        """Write several batches' status.json; the finished ones share one disk flush.

        Each document is written atomically (SPEC section 3); those of
        finished batches are synced before they are renamed into place, the
        fsyncs running concurrently so the filesystem journal commits them
        together; the others, as in :meth:`write_status`, are not. Returns
        the batches (by id) whose document could not be written, with the
        error.
        """
        errors: dict[str, Exception] = {}
        for start in range(0, len(snaps), STATUS_GROUP_MAX):
            errors.update(self._write_group(snaps[start : start + STATUS_GROUP_MAX], syncer))
        return errors

    def _write_group(
        self, snaps: Sequence[BatchSnapshot], syncer: ResultSyncer
    ) -> dict[str, Exception]:
        errors: dict[str, Exception] = {}
        staged: list[_Staged] = []
        try:
            for snap in snaps:
                try:
                    staged.append(self._stage(snap))
                except (OSError, BatchdError) as exc:
                    errors[snap.batch.id] = exc
            final = [str(s.folder / s.tmp) for s in staged if s.final]
            failed = syncer.sync(final)
            for s in staged:
                crash_point("during_status_write")
                try:
                    if (error := failed.get(str(s.folder / s.tmp))) is not None:
                        raise error
                    self._install_staged(s)
                except OSError as exc:
                    errors[s.batch_id] = exc
                    with contextlib.suppress(OSError):
                        os.unlink(s.tmp, dir_fd=s.dir_fd)
        finally:
            for s in staged:
                s.close()
        return errors

    def write_inbox_refusal(self, name: str, source: str, priority: str, reason: str) -> None:
        """``outbox/<name>/status.json`` for a drop that could not be claimed
        (no batch yet): the dropper finds the reason where results would be."""
        # The shape of a batch's status.json, so scripts reading batch.status
        # and batch.error see the refusal; no id: nothing is registered yet.
        doc: Json = {
            "batch": {
                "id": None,
                "name": name,
                "status": INBOX_REFUSED,
                "priority": priority,
                "error": reason,
            },
            "files": [],
            "source": source,
        }
        write_json_atomic(self.spool.status_path(name), doc, root=self.spool.root)

    def clear_inbox_refusal(self, name: str) -> None:
        """Remove the document :meth:`write_inbox_refusal` left for ``name`` (the
        drop is now claimed), so the batch gets that name, not ``name.2``."""
        # Strings, not Paths, until a document is there: this runs for every
        # drop claimed, and almost never finds one (issue 15).
        folder = f"{self.spool.outbox}/{name}"
        try:
            if os.listdir(folder) != [STATUS_FILE]:
                return
            status = self.spool.status_path(name)
            if json.loads(status.read_bytes()).get("batch", {}).get("status") != INBOX_REFUSED:
                return
            status.unlink()
            os.rmdir(folder)
        except (OSError, ValueError):
            return

    def refresh_status(self, batch_id: str) -> BatchRow | None:
        """Read a batch afresh and rewrite its status.json; None if it is gone."""
        # Its counters may trail its files (Store.finish_file): the document's
        # batch row and file list must agree.
        self.store.refresh_counts(batch_id)
        batch = self.store.get_batch(batch_id)
        if batch is not None:
            self.write_status(batch)
        return batch

    def write_result(self, batch_name: str, file: FileRow) -> Path:
        """Write one file's result document; returns its path."""
        path = self.spool.result_path(batch_name, file.relpath)
        write_json_atomic(path, result_document(file), root=self.spool.root)
        return path

    def reconcile(self, batch: BatchRow, force_status: bool = True) -> BatchRow:
        """Bring the spool in line with the database for one batch.

        Every finished file gets its result document (if missing) and its
        input moved out of ``work/``; a finished batch leaves ``work/``.
        Safe to run any number of times: this is what start-up recovery and
        registration of pre-refused files both rely on.

        status.json is rewritten when anything moved, when it is missing, or
        with ``force_status``. Start-up recovery passes False for batches
        that were only waiting, so a restart with thousands of pending
        batches does not pay an fsync for each unchanged document.
        """
        changed = False
        for file in self.store.list_files(batch.id):
            if not file.status.done:
                continue
            result = self.spool.result_path(batch.name, file.relpath)
            if not result.exists():
                self.write_result(batch.name, file)
                changed = True
            if os.path.lexists(self.spool.input_path(batch.work_path, file.relpath)):
                self.spool.settle_input(
                    batch.work_path, batch.name, file.relpath, ok=file.status == Status.COMPLETED
                )
                changed = True
        if batch.status.done:
            self.spool.finalize(batch.work_path, batch.name)
            changed = True
        # Missing or unreadable: a document of an unfinished batch is renamed
        # into place unsynced (write_status), so a power cut can leave it empty.
        if changed or force_status or self.status_version(batch.name) is None:
            self.write_status(batch)
        if batch.status.done:
            # Only now: the folder in work/ is what makes recovery rewrite status.json.
            self.spool.release(batch.work_path)
        return batch

    def status_version(self, batch_name: str) -> int | None:
        """The version of the batch's status.json in place, read whole; None when
        it is missing or unreadable (empty, cut short, not batchd's document)."""
        try:
            folder = self.spool.rel(self.spool.batch_outbox(batch_name))
            fd = safefs.open_dir(self.spool.root, folder)
        except (OSError, safefs.UnsafePath):
            return None
        try:
            with os.fdopen(
                os.open(STATUS_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd), "rb"
            ) as fh:
                doc = json.loads(fh.read())
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
        version = doc.get("version") if isinstance(doc, dict) else None
        return version if isinstance(version, int) else None

    def remove_stray_temporaries(self, batch: BatchRow) -> None:
        """Delete temporary files a crash left mid-write in a batch's outbox."""
        folder = self.spool.batch_outbox(batch.name)
        if not folder.exists():
            return
        for dirpath, _dirs, files in os.walk(folder):
            for fname in files:
                if fname.startswith(".") and fname.endswith(".tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(dirpath, fname))


@dataclass
class _Staged:
    """A status.json written beside its name, waiting to be renamed into place."""

    batch_id: str
    folder: Path
    dir_fd: int  # the batch's outbox folder, open until close()
    tmp: str  # the staged file's name in it
    version: int
    final: bool  # the batch has ended: the document is synced before the rename

    def close(self) -> None:
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


def _document_version(dir_fd: int) -> int | None:
    """The ``version`` the status.json in ``dir_fd`` starts with; None when absent or unreadable."""
    try:
        fd = os.open(STATUS_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        head = os.read(fd, _VERSION_HEAD_BYTES)
    except OSError:
        return None
    finally:
        os.close(fd)
    found = _VERSION_RE.match(head)
    return int(found.group(1)) if found else None


class ResultSyncer:
    """Makes a group of result files durable at once, before their commit.

    Workers write results without fsync; before the scheduler records a
    group of files as completed it calls :meth:`sync` with their result
    paths. The fsyncs run concurrently on a few threads, so the filesystem
    journal commits them together: one disk flush for the group, where a
    flush per file in each worker capped throughput at a few hundred files
    a second. "Completed in the database" still always means "result on
    disk", even across a power cut.
    """

    def __init__(self, threads: int = 8) -> None:
        self._threads = threads
        self._executor: ThreadPoolExecutor | None = None

    def sync(self, paths: Sequence[str]) -> dict[str, OSError]:
        """fsync every path; returns the ones that failed, with their error."""
        if not paths:
            return {}
        if len(paths) == 1:
            return {p: e for p, e in [(paths[0], _try_fsync(paths[0]))] if e is not None}
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="batchd-sync")
        errors = self._executor.map(_try_fsync, paths)
        return {p: e for p, e in zip(paths, errors, strict=True) if e is not None}

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def _try_fsync(path: str) -> OSError | None:
    try:
        fsync_file(path)
    except OSError as exc:
        return exc
    return None
