"""The queue's state: batches and files in SQLite or PostgreSQL, behind one narrow contract.

The rest of the daemon talks to the :class:`Store` protocol; :func:`open_store`
picks the database. The package:

* ``sql.py``: :class:`~batchd.store.sql.SqlStore`, every contract method once,
  written against a small connector (read, transaction, snapshot, listen);
  it holds the batch and file lifecycle, and takes the reads from ``reads.py``
  and uploads, retention and nodes from ``upkeep.py`` (mixins);
* ``connector.py``: that connector's contract, and what both connectors share
  (per-thread connections, the transaction handle, the migration loader);
* ``queries.py``: every SQL statement, by name, with the few that differ per
  dialect written out for each;
* ``rows.py``: result rows to :mod:`batchd.records` (ids and times as text);
* ``sqlite.py`` and ``postgres.py``: the connectors (connections, pragmas,
  transactions, migrations, wake-ups, driver errors as :class:`StoreError`)
  and the :class:`SQLiteStore` / ``PostgresStore`` that pair each with SqlStore;
* ``migrations/<dialect>/NNNN_*.sql``: forward-only schema migrations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Protocol

from batchd.config import Settings
from batchd.errors import ConfigError
from batchd.records import (
    BatchRow,
    BatchSnapshot,
    FileRow,
    FileTask,
    NewBatch,
    NodeRow,
    Outcome,
    Settled,
    Status,
)
from batchd.store.sqlite import SQLiteStore

__all__ = ["SQLiteStore", "Store", "open_store"]


class Store(Protocol):
    """What the daemon, the HTTP server and the CLI need from a queue store.

    One implementation, :class:`batchd.store.sql.SqlStore`, over two connectors:
    :class:`SQLiteStore` (embedded, one node) and
    :class:`batchd.store.postgres.PostgresStore` (several nodes on one spool).
    Every method raises :class:`StoreError` when the database cannot be
    reached; the caller decides whether to retry (the scheduler does).
    """

    #: this node's name in ``nodes`` (``cluster.node_id``).
    node_id: str

    def close(self) -> None:
        """Close every connection this store opened."""

    def release_thread(self) -> None:
        """Close the calling thread's connection, if it opened one."""

    def ping(self) -> None:
        """Raise :class:`StoreError` unless the database answers."""

    def schema_version(self) -> int:
        """The schema version the database is at."""

    def change_version(self) -> int:
        """A number that changes after every commit (any connection): cache key."""

    def register_batch(self, batch: NewBatch, now: datetime) -> BatchRow:
        """Insert a batch and all its files in one transaction and return it.

        Raises :class:`AlreadyRegistered` when ``work_path`` already is a
        batch (another node registered it), :class:`NameTaken` when another
        batch has the name.
        """

    def register_batches(self, batches: Sequence[NewBatch], now: datetime) -> list[BatchRow]:
        """:meth:`register_batch` for several batches in ONE transaction, all or none.

        In list order (FIFO). Raises as :meth:`register_batch` for the first
        batch that fails its checks, and then registers none of them: the
        caller registers them one by one to learn which (intake does).
        """

    def name_taken(self, name: str) -> bool:
        """True when a batch already uses ``name`` as its outbox folder."""

    def batch_by_work_path(self, work_path: str) -> BatchRow | None:
        """The batch registered from ``work_path`` (relative to the spool root)."""

    def claim_next(self, now: datetime) -> FileTask | None:
        """Atomically move the next due pending file to ``processing``.

        Order: priority (high first), then registration order. Files whose
        back-off has not expired are skipped. ``None`` when nothing is due.
        """

    def finish(self, file_id: str, outcome: Outcome, now: datetime) -> BatchRow:
        """Atomically record a file's final outcome and refresh its batch."""

    def finish_many(self, items: Sequence[tuple[str, Outcome, datetime]]) -> list[BatchRow | None]:
        """Atomically record several final outcomes; each item's batch, refreshed.

        An item whose ``Outcome.lease`` no longer matches the row (the file was
        re-queued or claimed again since) is not written: its entry is None.
        """

    def finish_file(self, file_id: str, outcome: Outcome, now: datetime) -> Settled | None:
        """Record one file's final outcome (fenced by ``Outcome.lease``: None when
        superseded) without waiting for its batch's lock; the batch is derived
        when its last file commits, and ``Settled.ended`` is True for the one
        call that ended it. A running batch's counters may trail its files."""

    def finish_and_claim(
        self, file_id: str, outcome: Outcome, now: datetime, claimant: str
    ) -> tuple[Settled | None, FileTask | None]:
        """:meth:`finish_file` and, in the same transaction, a worker's claim of the
        head of the queue when it was never tried (recorded as ``claimant``'s);
        (None, None) when the outcome is superseded."""

    def claimed_by(self, claimant: str) -> list[FileTask]:
        """The files still processing under the claim of worker ``claimant``."""

    def settle_batch(self, batch_id: str, now: datetime) -> Settled | None:
        """Derive the batch if none of its files is left to finish (else its row as it
        is); ``ended`` when this call moved it to its final status. None: no such batch."""

    def settle_abandoned(self, now: datetime, finished_before: datetime) -> list[Settled]:
        """Derive every running batch none of whose files is left to finish and whose
        last file finished before ``finished_before`` (a node died between its last
        commit and the derivation); the batches this call ended. SQLite: none."""

    def refresh_counts(self, batch_id: str) -> None:
        """Bring a running batch's processed/failed counters up to its files."""

    def retry_later(
        self, file_id: str, error: str, available_at: datetime, lease: int | None = None
    ) -> bool:
        """Atomically put a failed attempt back to pending, one retry spent.

        With ``lease``, only while the file still carries that fencing token;
        False when it did not (the attempt was superseded).
        """

    def requeue(self, file_ids: Sequence[str], leases: Mapping[str, int] | None = None) -> None:
        """Put processing files back to pending without spending an attempt
        (those in ``leases`` only while they still carry that token)."""

    def requeue_stale(self) -> int:
        """At start-up: this node's ``processing`` files back to pending; returns how many."""

    def requeue_expired(self, now: datetime) -> int:
        """Files whose node's lease ended before ``now`` back to pending; how many."""

    def heartbeat(
        self,
        now: datetime,
        address: str | None = None,
        running: Sequence[str] | None = None,
        leases: Mapping[str, int] | None = None,
    ) -> None:
        """Record that this node is alive and extend the leases of its ``running`` files
        (those in ``leases`` only while they still carry that token)."""

    def nodes(self) -> list[NodeRow]:
        """Every node that heart-beat, with how many files it runs."""

    def listen_fileno(self) -> int | None:
        """A descriptor that turns readable when work arrives (None: poll)."""

    def drain_notifications(self) -> int:
        """Consume arrived wake-ups without blocking; how many."""

    def set_progress(
        self, progress: Mapping[str, int], leases: Mapping[str, int] | None = None
    ) -> None:
        """Record progress percentages for running files, in one transaction
        (those in ``leases`` only while they still carry that token)."""

    def retry_failed(self, target_id: str) -> int:
        """Failed file ``target_id``, or every failed file of batch ``target_id``,
        back to pending with retries reset; returns how many."""

    def get_batch(self, batch_id: str) -> BatchRow | None: ...

    def snapshot(self, batch_id: str) -> BatchSnapshot | None:
        """A batch and all its files from one consistent read (status.json)."""

    def snapshots(self, batch_ids: Sequence[str]) -> dict[str, BatchSnapshot]:
        """:meth:`snapshot` of each of ``batch_ids`` from one consistent read, by id
        (a batch no longer in the database is left out)."""

    def find_batch(self, id_or_name: str) -> BatchRow | None: ...

    def find_batch_version(self, id_or_name: str) -> tuple[str, int, Status] | None:
        """The id, version and status of the batch :meth:`find_batch` would return:
        one narrow row, for read caches of a finished batch's answer (HTTP detail)."""

    def batch_ids_with_prefix(self, prefix: str, limit: int = 2) -> list[str]:
        """Up to ``limit`` batch ids starting with ``prefix`` (the CLI's short ids)."""

    def get_file(self, file_id: str) -> FileRow | None: ...

    def list_batches(
        self,
        limit: int = 50,
        offset: int = 0,
        status: Status | None = None,
        user_id: str | None = None,
    ) -> list[BatchRow]: ...

    def list_files(
        self, batch_id: str, limit: int | None = None, offset: int = 0
    ) -> list[FileRow]: ...

    def file_summary(self, batch_id: str) -> dict[str, int]:
        """Counts of the batch's files by status, plus ``total``."""

    def progress_sum(self, batch_id: str) -> int:
        """Sum of the files' progress, done files counting 100."""

    def progress_sums(self, batch_ids: Sequence[str]) -> dict[str, int]:
        """:meth:`progress_sum` of several batches in one query (a page of the list)."""

    def unfinished_batches(self) -> list[BatchRow]:
        """Batches not yet completed or failed."""

    def batches_with_files_in(self, statuses: Sequence[Status]) -> list[str]:
        """Ids of batches that have a file in one of ``statuses``."""

    def next_due(self) -> datetime | None:
        """When the earliest backed-off pending file becomes due, if any."""

    def queue_counts(self) -> dict[str, int]:
        """Files by status across the whole database."""

    def counts_by_status_priority(self) -> dict[str, dict[tuple[str, str], int]]:
        """Files and batches by (status, priority), for /metrics."""

    def uploads_since(self, user_id: str, since: datetime) -> list[str]:
        """The user's upload times since ``since`` (rate limit)."""

    def record_upload(self, user_id: str, now: datetime, limit: int, window: timedelta) -> bool:
        """Atomically count an upload unless ``limit`` were made within ``window``."""

    def finished_before(self, cutoff: datetime) -> list[BatchRow]:
        """Finished batches that completed before ``cutoff`` (retention)."""

    def delete_batch(self, batch_id: str) -> None:
        """Delete a finished batch and its files (refuses unfinished ones)."""


def open_store(settings: Settings, migrate: bool = True) -> Store:
    """The store ``settings`` ask for: PostgreSQL when ``database.url`` is set, else SQLite.

    ``migrate=False``: a second process of a running daemon (the HTTP
    process); on PostgreSQL it then connects on first use, so it starts, and
    answers 503, while the database is down.

    psycopg is imported only here, on demand, so single-node users need not
    install it.
    """
    if settings.database.url:
        try:
            from batchd.store.postgres import PostgresStore
        except ImportError as exc:
            raise ConfigError(
                "database.url needs the PostgreSQL driver psycopg, which is not installed:"
                " pip install 'batchd[postgres]' (or unset database.url to use SQLite)"
            ) from exc
        return PostgresStore(
            settings.database.url,
            node_id=settings.node_id,
            lease_seconds=settings.cluster.lease_seconds,
            migrate=migrate,
        )
    return SQLiteStore(
        settings.db_path, node_id=settings.node_id, lease_seconds=settings.cluster.lease_seconds
    )
