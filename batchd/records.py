"""The records that flow between the store, the spool and the scheduler.

Plain frozen dataclasses: the store returns them, nobody mutates them, and
none of them knows about SQL or processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from batchd.config import Priority


class Status(StrEnum):
    """The life of a batch and of a file (the original design's four states)."""

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def done(self) -> bool:
        return self in (Status.COMPLETED, Status.FAILED)


@dataclass(frozen=True, slots=True)
class NewFile:
    """A member of a batch about to be registered.

    ``error`` set means the file was refused at registration (over the size
    limit, wrong type, a symlink ...): it is registered as failed at once.
    """

    relpath: str
    file_size: int | None
    error: str | None = None
    #: the device and inode the scan saw; every later open must find the same file.
    file_dev: int | None = None
    file_ino: int | None = None


@dataclass(frozen=True, slots=True)
class NewBatch:
    """A claimed drop, ready to be registered in one transaction."""

    name: str
    priority: Priority
    user_id: str | None
    work_path: str
    source: str
    files: tuple[NewFile, ...]
    #: set when the whole batch is refused (e.g. too many files).
    error: str | None = None


@dataclass(frozen=True, slots=True)
class BatchRow:
    """One row of ``batch_jobs``."""

    id: str
    user_id: str | None
    status: Status
    total_files: int
    processed_files: int
    failed_files: int
    priority: Priority
    created_at: str
    started_at: str | None
    completed_at: str | None
    error: str | None
    name: str
    source: str | None
    work_path: str
    #: grows at every re-derivation of the batch (issue 16): orders status.json rewrites.
    version: int = 0

    def public(self) -> dict[str, Any]:
        """The batch_jobs columns as the API shows them."""
        return {
            "id": self.id,
            "name": self.name,
            "status": str(self.status),
            "total_files": self.total_files,
            "processed_files": self.processed_files,
            "failed_files": self.failed_files,
            "priority": str(self.priority),
            "user_id": self.user_id,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "completed_at": self.completed_at,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class FileRow:
    """One row of ``batch_files``."""

    id: str
    batch_id: str
    filename: str
    relpath: str
    file_size: int | None
    file_hash: str | None
    status: Status
    progress: int
    result: str | None
    error: str | None
    retry_count: int
    attempts: int
    created_at: str
    started_at: str | None
    completed_at: str | None
    processor: str | None
    #: the fencing token: grows by one at every claim (issue 16).
    lease_gen: int = 0
    #: the device and inode the scan recorded (None: registered before they were).
    file_dev: int | None = None
    file_ino: int | None = None

    def public(self) -> dict[str, Any]:
        """The batch_files columns as the API shows them."""
        return {
            "id": self.id,
            "filename": self.filename,
            "relpath": self.relpath,
            "status": str(self.status),
            "progress": self.progress,
            "file_size": self.file_size,
            "file_hash": self.file_hash,
            "result": self.result,
            "error": self.error,
            "retry_count": self.retry_count,
            "attempts": self.attempts,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "completed_at": self.completed_at,
        }


@dataclass(frozen=True, slots=True)
class FileTask:
    """A file the store handed out for processing, with what is needed to find it."""

    file: FileRow
    batch_name: str
    work_path: str
    priority: Priority
    #: the batch's file count, fixed at registration (the batch limit re-check).
    batch_files: int = 0


@dataclass(frozen=True, slots=True)
class Settled:
    """A batch after a file of it finished (:meth:`batchd.store.Store.finish_file`)."""

    #: the batch row after the commit. While the batch runs its counters may
    #: trail its files (PostgreSQL: until the next ``refresh_counts``).
    batch: BatchRow
    #: this call moved the batch to its final status; exactly one call does,
    #: and its caller ends the batch (work/ cleared, final status.json).
    ended: bool


@dataclass(frozen=True, slots=True)
class NodeRow:
    """One row of ``nodes``: a batchd node and what it is running."""

    node_id: str
    host: str
    pid: int
    started_at: str
    last_heartbeat: str
    address: str | None
    #: files leased to this node right now.
    processing: int

    def public(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "host": self.host,
            "pid": self.pid,
            "started_at": self.started_at,
            "last_heartbeat": self.last_heartbeat,
            "address": self.address,
            "processing": self.processing,
        }


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt at a file ended, as the scheduler reports it to the store."""

    status: Status
    result: dict[str, Any] | None = None
    error: str | None = None
    file_hash: str | None = None
    file_size: int | None = None
    processor: str | None = None
    started_at: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: the fencing token of the attempt that ended (``FileRow.lease_gen`` at its
    #: claim): the outcome is recorded only while the row still carries it.
    #: None records it unconditionally (tests, tools).
    lease: int | None = None


@dataclass(frozen=True, slots=True)
class BatchSnapshot:
    """A batch and its files as one transaction saw them (status.json is built from this)."""

    batch: BatchRow
    files: tuple[FileRow, ...]
    summary: dict[str, int]
    progress_sum: int

    @classmethod
    def of(cls, batch: BatchRow, files: tuple[FileRow, ...]) -> BatchSnapshot:
        """Counts and progress derived from the snapshot's own files (as
        ``Store.file_summary`` and ``Store.progress_sum`` would)."""
        summary = {"total": len(files), **{str(s): 0 for s in Status}}
        for file in files:
            summary[str(file.status)] += 1
        progress = sum(100 if f.status.done else f.progress for f in files)
        return cls(batch, files, summary, progress)


def batch_status(counts: dict[str, int]) -> Status:
    """A batch's status from how many of its files are in each status.

    Every file done: completed when none failed (and there is at least one),
    else failed; any file started or done: processing; otherwise pending.
    Both stores derive a batch this way, so its row follows its files even
    after an operator edits ``batch_files`` by hand.
    """
    total = sum(counts.values())
    completed = counts.get(Status.COMPLETED, 0)
    failed = counts.get(Status.FAILED, 0)
    if total == completed + failed:
        return Status.COMPLETED if failed == 0 and total > 0 else Status.FAILED
    if counts.get(Status.PROCESSING, 0) or completed or failed:
        return Status.PROCESSING
    return Status.PENDING
