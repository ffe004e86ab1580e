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
from pathlib import Path

import structlog

from batchd import safefs
from batchd.errors import BatchdError
from batchd.faults import crash_point
from batchd.fsutil import fsync_file, stage_json, write_json_atomic
from batchd.records import BatchRow, BatchSnapshot, FileRow, Status
from batchd.spool import STATUS_FILE, Spool
from batchd.store import Store
from batchd.views import Json, detail_of, result_document

log = structlog.get_logger("batchd.outbox")

#: status.json starts with its version (the first key), so a rewrite reads
#: only this much of the document in place to compare.
_VERSION_HEAD_BYTES = 64
_VERSION_RE = re.compile(rb'\{\s*"version":\s*(\d+)')

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
        is a live view that start-up recovery rewrites from the database, so
        syncing every progress update would cost a disk flush for nothing.
        """
        self._write_document(batch.name, self.status_document(batch))

    def write_snapshot(self, snap: BatchSnapshot) -> None:
        """:meth:`write_status` from a snapshot the caller already read (a worker's
        batch end reads the batch and its files once, for the moves and this)."""
        self._write_document(snap.batch.name, self._document(snap))

    def _write_document(self, name: str, doc: Json) -> None:
        done = doc["batch"]["status"] in (Status.COMPLETED, Status.FAILED)
        path = self.spool.status_path(name)
        tmp = stage_json(path, doc, root=self.spool.root, sync=done)
        try:
            crash_point("during_status_write")
            self._install(path, tmp, int(doc["version"]))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _install(self, path: Path, tmp: str, version: int) -> bool:
        """Rename a staged status.json into place unless the one there is newer.

        Several nodes (and the archiver and recovery on one node) rewrite a
        batch's document; each builds it from its own snapshot, and without
        this check the slowest writer wins, even when its snapshot predates
        the batch's end (issue 16). The check and the rename happen under an
        exclusive ``flock`` on the batch's outbox folder, so they are one step
        for every writer on this filesystem. False when the staged document
        was older and dropped.
        """
        # Reached from the spool root with no link followed (the folder is
        # batchd's own, 2750, so the rename by name below stays inside it).
        fd = safefs.open_dir(self.spool.root, self.spool.rel(path.parent))
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                # NFS emulates flock with a write lock, which a directory opened
                # read-only cannot take (EBADF): the version check alone then
                # still refuses every older snapshot but one that races it.
                log.debug("status_lock_unavailable", path=str(path), error=str(exc))
            current = _document_version(path)
            if current is not None and current > version:
                os.unlink(tmp)
                log.info("status_write_stale", path=str(path), version=version, current=current)
                return False
            os.replace(tmp, path)
            return True
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def write_statuses(
        self, batches: Sequence[BatchRow], syncer: ResultSyncer
    ) -> dict[str, Exception]:
        """Rewrite several batches' status.json with one shared disk flush.

        Each document is still written atomically and synced before it is
        renamed into place (SPEC section 3); the fsyncs run concurrently, so
        the filesystem journal commits them together. Returns the batches
        (by id) whose document could not be written, with the error.
        """
        errors: dict[str, Exception] = {}
        staged: list[tuple[BatchRow, str, int]] = []
        for batch in batches:
            try:
                doc = self.status_document(batch)
                tmp = stage_json(self.spool.status_path(batch.name), doc, root=self.spool.root)
                staged.append((batch, tmp, int(doc["version"])))
            except (OSError, BatchdError) as exc:
                errors[batch.id] = exc
        failed = syncer.sync([tmp for _b, tmp, _v in staged])
        for batch, tmp, version in staged:
            crash_point("during_status_write")
            try:
                if tmp in failed:
                    raise failed[tmp]
                self._install(self.spool.status_path(batch.name), tmp, version)
            except OSError as exc:
                errors[batch.id] = exc
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
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
        status = self.spool.status_path(batch.name)
        if changed or force_status or not status.exists():
            self.write_status(batch)
        if batch.status.done:
            # Only now: the folder in work/ is what makes recovery rewrite status.json.
            self.spool.release(batch.work_path)
        return batch

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


def _document_version(path: Path) -> int | None:
    """The ``version`` a status.json starts with; None when absent or unreadable."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_VERSION_HEAD_BYTES)
    except OSError:
        return None
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
