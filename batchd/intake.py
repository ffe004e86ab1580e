"""Intake: the one path by which a batch enters batchd.

A ready drop in the inbox, a folder left in ``work/`` by a crash, and an
HTTP upload all end in :meth:`Intake.register`: scan the members, apply the
limits, register everything in one transaction, write the first
status.json. Claims are serialised by a lock so two threads never pick the
same batch name.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from batchd.clock import Clock
from batchd.config import Priority, Settings
from batchd.faults import crash_point
from batchd.outbox import Outbox
from batchd.records import BatchRow, NewBatch, Status
from batchd.spool import Claimed, Spool
from batchd.store import SQLiteStore

log = structlog.get_logger("batchd.intake")


class Intake:
    """Claims drops and registers batches."""

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        store: SQLiteStore,
        outbox: Outbox,
        clock: Clock,
        on_registered: Callable[[BatchRow], None] = lambda batch: None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.store = store
        self.outbox = outbox
        self.clock = clock
        self.on_registered = on_registered
        self._lock = threading.Lock()

    def take_drop(self, source: Path, priority: Priority) -> BatchRow | None:
        """Claim a ready drop from the inbox and register it (``None`` if it vanished)."""
        with self._lock:
            name = self.spool.unique_name(source.name, self.store.name_taken)
            claimed = self.spool.claim(source, priority, name)
            if claimed is None:
                log.info("drop_vanished", path=str(source))
                return None
            log.info("batch_claimed", path=str(source), batch=name, priority=str(priority))
            crash_point("after_claim")
            return self.register(claimed)

    def take_upload(
        self, folder: Path, priority: Priority, user_id: str | None, name: str
    ) -> BatchRow:
        """Register a folder batchd assembled itself (an HTTP upload)."""
        with self._lock:
            batch_name = self.spool.unique_name(name, self.store.name_taken)
            target = self.spool.adopt(folder, priority, batch_name)
            claimed = Claimed(target, batch_name, priority, "upload", user_id)
            return self.register(claimed)

    def register(self, claimed: Claimed) -> BatchRow:
        """Register a claimed folder in ``work/`` as a batch and write its first documents."""
        members = self.spool.scan(claimed.path)
        limit = self.settings.limits.max_files_per_batch
        error = None
        if len(members) > limit:
            error = (
                f"batch has {len(members)} files, over limits.max_files_per_batch ({limit});"
                " no file was processed"
            )
        elif not members:
            error = "batch has no files to process"
        new = NewBatch(
            name=claimed.name,
            priority=claimed.priority,
            user_id=claimed.user_id,
            work_path=self.spool.rel(claimed.path),
            source=claimed.source,
            files=tuple(members),
            error=error,
        )
        batch = self.store.register_batch(new, self.clock.now())
        crash_point("after_register")
        log.info(
            "batch_registered",
            batch_id=batch.id,
            batch=batch.name,
            files=batch.total_files,
            priority=str(batch.priority),
            user_id=batch.user_id,
            error=error,
        )
        if error is not None or any(m.error for m in members):
            for member in members:
                if member.error and error is None:
                    log.warning(
                        "file_refused",
                        batch_id=batch.id,
                        relpath=member.relpath,
                        error=member.error,
                    )
            if error is not None:
                log.warning("batch_rejected", batch_id=batch.id, batch=batch.name, error=error)
            # Refused files are final already: results, failed/ and status now.
            self.outbox.reconcile(batch)
        else:
            self.outbox.write_status(batch)
        if batch.status == Status.PENDING or batch.status == Status.PROCESSING:
            self.on_registered(batch)
        return batch
