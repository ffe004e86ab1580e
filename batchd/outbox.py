"""Everything batchd writes for users to read: status.json and result files.

Every write is atomic (see :func:`batchd.spool.write_json_atomic`), so a
script polling the outbox never parses half a file.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from batchd.faults import crash_point
from batchd.records import BatchRow, FileRow, Status
from batchd.spool import Spool, write_json_atomic
from batchd.store import SQLiteStore
from batchd.views import Json, batch_detail, result_document


class Outbox:
    """Writes a batch's documents from what the store says."""

    def __init__(self, spool: Spool, store: SQLiteStore) -> None:
        self.spool = spool
        self.store = store

    def status_document(self, batch: BatchRow) -> Json:
        """The ``GET /api/batch/jobs/<id>`` data object plus ``outbox`` and ``source``."""
        doc = batch_detail(self.store, batch)
        doc["outbox"] = str(self.spool.batch_outbox(batch.name))
        doc["source"] = batch.source
        return doc

    def write_status(self, batch: BatchRow) -> None:
        """Rewrite ``outbox/<name>/status.json`` from the current database state."""
        fresh = self.store.get_batch(batch.id) or batch
        doc = self.status_document(fresh)
        crash_point("during_status_write")
        write_json_atomic(self.spool.status_path(batch.name), doc)

    def write_result(self, batch_name: str, file: FileRow) -> Path:
        """Write one file's result document; returns its path."""
        path = self.spool.result_path(batch_name, file.relpath)
        write_json_atomic(path, result_document(file))
        return path

    def reconcile(self, batch: BatchRow) -> BatchRow:
        """Bring the spool in line with the database for one batch.

        Every finished file gets its result document (if missing) and its
        input moved out of ``work/``; a finished batch leaves ``work/``.
        Safe to run any number of times: this is what start-up recovery and
        registration of pre-refused files both rely on.
        """
        for file in self.store.list_files(batch.id):
            if not file.status.done:
                continue
            result = self.spool.result_path(batch.name, file.relpath)
            if not result.exists():
                self.write_result(batch.name, file)
            self.spool.settle_input(
                batch.work_path, batch.name, file.relpath, ok=file.status == Status.COMPLETED
            )
        if batch.status.done:
            self.spool.finalize(batch.work_path, batch.name)
        self.write_status(batch)
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
