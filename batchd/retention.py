"""Retention: removing finished batches past an age.

Only completed or failed batches are ever purged: their database rows and
their outbox, archive and failed folders. Nothing pending or processing is
touched.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import structlog

from batchd.safefs import remove_tree
from batchd.spool import Spool
from batchd.store import Store

log = structlog.get_logger("batchd.retention")


def purge(
    spool: Spool, store: Store, cutoff: datetime, dry_run: bool = False
) -> list[dict[str, Any]]:
    """Remove every batch that finished before ``cutoff``; returns what went (or would go)."""
    removed = []
    for batch in store.finished_before(cutoff):
        removed.append(batch.public())
        if dry_run:
            continue
        for base in (spool.outbox, spool.archive, spool.failed):
            try:
                # Iterative where it must be: a drop refused whole may be very deep.
                remove_tree(base / batch.name)
            except OSError as exc:
                log.error("purge_incomplete", batch=batch.name, path=str(base), error=str(exc))
        store.delete_batch(batch.id)
        log.info(
            "batch_purged", batch_id=batch.id, batch=batch.name, completed_at=batch.completed_at
        )
    return removed
