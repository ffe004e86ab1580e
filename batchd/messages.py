"""The messages between the scheduler, the pool and the worker processes.

The scheduler hands the pool a :class:`Job` (with a :class:`Delivery` when
the worker writes the result itself); a worker answers with
:class:`Progress` and then exactly one :class:`Done` or :class:`Failed`; the
pool adds :class:`Lost` (the worker died) and :class:`TimedOut` (it ran past
``processing.timeout_seconds`` and was killed). Every message crosses a
process boundary by pickle, so each is a frozen dataclass of plain values
(not slotted: a slotted dataclass pickles through ``dataclasses.fields()``,
which cost the daemon's loop more than the rest of the message; issue 15),
and each carries the claim's fencing token (``lease``) so that the reports
of a superseded attempt are told apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batchd.records import BatchRow, FileRow, FileTask


@dataclass(frozen=True)
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
    #: the worker records a success itself (issue 15): it commits the outcome
    #: to the store, moves the input to archive/ and ends the batch when its
    #: file was the last, so the daemon's loop only hears that it happened.
    #: Needs ``fsync``: the result is durable before the commit says so.
    record: bool = False
    #: where the batch lives (``FileTask.work_path`` and ``batch_name``), for
    #: the input move and the batch end.
    work_path: str = ""
    batch_name: str = ""
    #: ``limits.max_inline_result_bytes``: the store keeps a bounded copy.
    max_inline_result_bytes: int = 0
    #: the daemon's permit (issue 15): after recording this success the worker
    #: may claim its next file itself, in the same commit, and start it at
    #: once, while the pool's standing permit for it holds
    #: (:meth:`batchd.pool.WorkerPool.allow_claims`). Needs ``record``.
    may_claim: bool = False


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class Progress:
    file_id: str
    percent: int
    lease: int = 0


@dataclass(frozen=True)
class Done:
    file_id: str
    result: dict[str, Any]
    file_hash: str
    file_size: int
    seconds: float
    #: when the attempt ended, as written into the result file.
    completed_at: str = ""
    lease: int = 0
    #: what the worker did itself (``Delivery.record``); None when it left
    #: the recording to the daemon (no ``record``, or the store failed).
    recorded: Recorded | None = None
    #: the worker's resident size after the job, measured by the worker
    #: (the pool replaces a worker grown past worker_recycle_rss_mb).
    rss_bytes: int = 0
    #: the worker offered a claim in the commit of its success but its record
    #: failed (``recorded`` None): the store may have committed that claim
    #: before the error (PostgreSQL derives the batch after the commit), so
    #: the daemon looks its claims up by the worker's token.
    claim_unknown: bool = False


@dataclass(frozen=True)
class Recorded:
    """What a worker that recorded its own success did after the commit."""

    #: the batch as the commit left it; None: the commit found the attempt
    #: superseded (re-queued or claimed again), and nothing else was done.
    batch: BatchRow | None
    #: the input was moved to archive/ (False: the daemon's archiver retries).
    archived: bool = False
    #: the batch was done and its end (work/ cleared, final status.json)
    #: was carried out here, or is the business of the call that ended it
    #: (False while the batch goes on, or on an error).
    ended: bool = False
    #: the file this worker claimed in the same commit (``Delivery.may_claim``),
    #: as the claim returned it; None: it claimed nothing.
    claimed: FileTask | None = None
    #: the job the worker started for ``claimed`` (the daemon follows it as
    #: if it had submitted it); None with a claim: the worker could not start
    #: it (its input is not in work/, its batch is over a limit), and the
    #: daemon does what its own claim would.
    started: Job | None = None
    #: ``time.monotonic()`` in the worker just after the commit that claimed
    #: (CLOCK_MONOTONIC: one clock for every process of the machine): the
    #: claimed file's timeout counts from there, not from when the daemon
    #: reads this message (0.0: no claim).
    claimed_at: float = 0.0


@dataclass(frozen=True)
class Failed:
    file_id: str
    error: str
    permanent: bool
    seconds: float
    lease: int = 0
    rss_bytes: int = 0


@dataclass(frozen=True)
class Lost:
    """The worker running a file died; the attempt is spent."""

    file_id: str
    error: str
    lease: int = 0
    #: the worker ended over the memory limit (a permanent failure).
    out_of_memory: bool = False


@dataclass(frozen=True)
class TimedOut:
    """A file ran past ``processing.timeout_seconds``; its worker was killed."""

    file_id: str
    error: str = "Processing timeout exceeded"
    lease: int = 0


#: What the pool reports to the scheduler.
Event = Progress | Done | Failed | Lost | TimedOut
