"""The messages between the scheduler, the pool and the worker processes.

The scheduler hands the pool a :class:`Job` (with a :class:`Delivery` when
the worker writes the result itself); a worker answers with
:class:`Progress` and then exactly one :class:`Done` or :class:`Failed`; the
pool adds :class:`Lost` (the worker died) and :class:`TimedOut` (it ran past
``processing.timeout_seconds`` and was killed). Every message crosses a
process boundary by pickle, so each is a frozen, slotted dataclass of plain
values, and each carries the claim's fencing token (``lease``) so that the
reports of a superseded attempt are told apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batchd.records import FileRow


@dataclass(frozen=True, slots=True)
class Delivery:
    """Where a successful attempt's result goes, and the row it describes."""

    file: FileRow
    started_at: str
    result_path: str
    outputs_path: str
    #: fsync the result before reporting Done. False when the daemon makes
    #: each group of results durable itself before committing them (one
    #: barrier for many files instead of a disk flush per file in the worker).
    fsync: bool = True
    #: the spool root: the result and outputs are written below it through
    #: folder descriptors, no link followed, with batchd's modes.
    spool_root: str = ""


@dataclass(frozen=True, slots=True)
class Job:
    """One attempt at one file. Without ``delivery`` the worker only reports
    the result (the pool's own tests); with it, it also writes the result."""

    file_id: str
    batch_id: str
    relpath: str
    path: str
    processor: str
    output_dir: str
    delivery: Delivery | None = None
    #: the claim's fencing token (``FileRow.lease_gen``); the pool stamps it on
    #: this job's events, so a superseded attempt's reports are told apart.
    lease: int = 0
    #: the device and inode the scan recorded for the input (None: not known).
    file_dev: int | None = None
    file_ino: int | None = None


@dataclass(frozen=True, slots=True)
class Progress:
    file_id: str
    percent: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Done:
    file_id: str
    result: dict[str, Any]
    file_hash: str
    file_size: int
    seconds: float
    #: when the attempt ended, as written into the result file.
    completed_at: str = ""
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Failed:
    file_id: str
    error: str
    permanent: bool
    seconds: float
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Lost:
    """The worker running a file died; the attempt is spent."""

    file_id: str
    error: str
    lease: int = 0
    #: the worker ended over the memory limit (a permanent failure).
    out_of_memory: bool = False


@dataclass(frozen=True, slots=True)
class TimedOut:
    """A file ran past ``processing.timeout_seconds``; its worker was killed."""

    file_id: str
    error: str = "Processing timeout exceeded"
    lease: int = 0


#: What the pool reports to the scheduler.
Event = Progress | Done | Failed | Lost | TimedOut
