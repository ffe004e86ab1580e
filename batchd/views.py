"""The JSON documents batchd shows: batch detail (API and status.json) and result files.

One function builds each shape, so ``GET /api/batch/jobs/<id>`` and
``outbox/<batch>/status.json`` can never drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from batchd import jsonio
from batchd.clock import parse_iso
from batchd.records import BatchRow, FileRow

if TYPE_CHECKING:  # workers import this module for result_document only
    from batchd.store import Store

Json = dict[str, Any]


def progress_percent(total: int, progress_sum: int) -> int:
    """Mean of the files' progress, done files counting 100 (0 for an empty batch)."""
    return round(progress_sum / total) if total else 0


def batch_percent(store: Store, batch: BatchRow) -> int:
    """SPEC section 6's progressPercent of one batch."""
    if batch.status.done:
        # Every file of a finished batch is finished and counts 100: no query
        # (a list of 50 batches asked the database 50 times; issue 15).
        return progress_percent(batch.total_files, 100 * batch.total_files)
    return progress_percent(batch.total_files, store.progress_sum(batch.id))


def batch_percents(store: Store, batches: Sequence[BatchRow]) -> dict[str, int]:
    """:func:`batch_percent` of a page of batches, with one query for the unfinished."""
    sums = store.progress_sums([b.id for b in batches if not b.status.done])
    return {
        b.id: progress_percent(
            b.total_files, 100 * b.total_files if b.status.done else sums.get(b.id, 0)
        )
        for b in batches
    }


def batch_detail(
    store: Store,
    batch: BatchRow,
    files_limit: int | None = None,
    files_offset: int = 0,
) -> Json:
    """``{"batch": {..., "progressPercent"}, "files": [...], "summary": {...}}``."""
    summary = store.file_summary(batch.id)
    files = store.list_files(batch.id, limit=files_limit, offset=files_offset)
    return detail_of(batch, files, summary, store.progress_sum(batch.id))


def detail_of(
    batch: BatchRow, files: Sequence[FileRow], summary: dict[str, int], progress_sum: int
) -> Json:
    """The :func:`batch_detail` shape from rows already read (one snapshot)."""
    head = batch.public()
    head["progressPercent"] = progress_percent(summary["total"], progress_sum)
    return {
        "batch": head,
        "files": [f.public() for f in files],
        "summary": summary,
    }


def duration_ms(file: FileRow) -> int | None:
    """Milliseconds from the last attempt's start to completion, when both are known."""
    if not file.started_at or not file.completed_at:
        return None
    delta = parse_iso(file.completed_at) - parse_iso(file.started_at)
    return max(0, round(delta.total_seconds() * 1000))


def result_document(file: FileRow) -> Json:
    """The content of ``outbox/<batch>/results/<relpath>.json`` (SPEC section 4)."""
    return {
        "batch_id": file.batch_id,
        "file_id": file.id,
        "filename": file.filename,
        "relpath": file.relpath,
        "status": str(file.status),
        "attempts": file.attempts,
        "file_size": file.file_size,
        "file_hash": file.file_hash,
        "processor": file.processor,
        "started_at": file.started_at,
        "completed_at": file.completed_at,
        "duration_ms": duration_ms(file),
        "result": jsonio.loads(file.result) if file.result else None,
        "error": file.error,
    }
