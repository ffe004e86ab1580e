"""An attempt at a file while the daemon follows it, and what it ends as.

:class:`Running` is an attempt in flight (the loop adds it when it hands the
file to a worker); :class:`Retry` and :class:`Final` are how it ended, held
by :class:`batchd.outcomes.Outcomes` until the database has taken them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from batchd.records import FileRow, FileTask, Outcome


@dataclass
class Running:
    """An attempt in flight: the claimed file, its processor, when it started."""

    task: FileTask
    processor: str
    started_at: str
    started_mono: float
    #: where this attempt's result file goes (written by the worker).
    result_path: str


@dataclass
class Retry:
    """A failed attempt waiting to be put back in the queue (see :meth:`Outcomes.commit`)."""

    running: Running
    error: str
    available_at: datetime


@dataclass
class Final:
    """A final outcome waiting for the grouped database commit."""

    running: Running
    outcome: Outcome
    ended: datetime
    #: a result file the worker wrote without fsync: made durable (in a group)
    #: before the commit that says "completed".
    unsynced: str | None = None
    #: a failure's result document, written once the commit accepted the
    #: outcome (a superseded attempt writes nothing: issue 16).
    document: FileRow | None = None
