"""Result rows to batchd's records: ids as strings, times as :func:`batchd.clock.iso` text.

SQLite stores times as that text already; PostgreSQL hands out ``timestamptz``
values and ``uuid.UUID`` ids, converted here so callers get the very same
records from both databases.
"""

from __future__ import annotations

import dataclasses
import functools
from datetime import datetime
from typing import Any

from batchd.clock import iso
from batchd.config import Priority
from batchd.records import BatchRow, FileRow, Status
from batchd.store.connector import Row


def text_time(value: str | datetime | None) -> str | None:
    """A stored time as :func:`iso` text (SQLite stores the text, PostgreSQL a timestamptz)."""
    if value is None or isinstance(value, str):
        return value
    return iso(value)


@functools.cache
def _field_names(record: type) -> tuple[str, ...]:
    # dataclasses.fields() builds a tuple per call: a claim or a finish ran it per row.
    return tuple(f.name for f in dataclasses.fields(record))


def _columns(record: type, row: Row) -> dict[str, Any]:
    """The row's columns named like ``record``'s fields: ids as text, times as iso text."""
    out = {name: row[name] for name in _field_names(record)}
    for name in ("id", "batch_id"):
        if name in out:
            out[name] = str(out[name])  # PostgreSQL hands out uuid.UUID
    for name in ("created_at", "started_at", "completed_at"):
        out[name] = text_time(out[name])
    out["status"] = Status(out["status"])
    return out


def batch_row(row: Row) -> BatchRow:
    columns = _columns(BatchRow, row)
    return BatchRow(
        **{**columns, "priority": Priority(row["priority"]), "version": int(row["version"])}
    )


def file_row(row: Row) -> FileRow:
    return FileRow(**_columns(FileRow, row))
