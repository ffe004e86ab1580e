"""What the store keeps beside the queue: upload rate counts, retention deletes,
and the cluster's node rows and leases.

A mixin of :class:`batchd.store.sql.SqlStore` (which is the one class the
:class:`batchd.store.Store` contract is on); it needs the store's connector
(``db``), named statements (``q``), this node's id and its lease length.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from batchd.errors import StoreError
from batchd.records import BatchRow, NodeRow
from batchd.store.connector import Connector
from batchd.store.rows import batch_row, text_time


class SqlUpkeep:
    """Uploads, retention and nodes: the contract methods outside a file's lifecycle."""

    db: Connector
    q: Mapping[str, str]
    node_id: str
    lease: timedelta
    _started: Any

    # -- uploads (rate limiting) ----------------------------------------------

    def uploads_since(self, user_id: str, since: datetime) -> list[str]:
        """Times of ``user_id``'s uploads at or after ``since``, oldest first."""
        rows = self.db.read(self.q["uploads_since"], (user_id, self.db.ts(since)))
        return [text_time(r["created_at"]) or "" for r in rows]

    def record_upload(self, user_id: str, now: datetime, limit: int, window: timedelta) -> bool:
        """Atomically count an upload for ``user_id`` unless ``limit`` are already in
        the window; True when it was counted (the upload may go ahead).

        PostgreSQL takes a per-user advisory lock, so two nodes taking uploads
        from one user at once cannot both squeeze in.
        """
        with self.db.transaction() as tx:
            if self.q["lock_uploads"]:
                tx.one(self.q["lock_uploads"], (user_id,))
            n = tx.row(self.q["count_uploads"], (user_id, self.db.ts(now - window)))["n"]
            if n >= limit:
                return False
            tx.run(self.q["insert_upload"], (user_id, self.db.ts(now)))
            tx.run(self.q["prune_uploads"], (self.db.ts(now - 2 * window),))
            return True

    # -- retention -----------------------------------------------------------

    def finished_before(self, cutoff: datetime) -> list[BatchRow]:
        """Completed or failed batches that ended before ``cutoff``."""
        return [
            batch_row(r) for r in self.db.read(self.q["finished_before"], (self.db.ts(cutoff),))
        ]

    def delete_batch(self, batch_id: str) -> None:
        """Delete a finished batch and its files (refuses unfinished ones)."""
        if self.db.key(batch_id) is None:
            return
        with self.db.transaction() as tx:
            busy = tx.row(self.q["count_unfinished_files"], (batch_id,))["n"]
            if busy:
                raise StoreError(f"batch {batch_id} still has {busy} unfinished files")
            tx.run(self.q["delete_files"], (batch_id,))
            tx.run(self.q["delete_batch"], (batch_id,))

    # -- nodes ----------------------------------------------------------------

    def heartbeat(
        self,
        now: datetime,
        address: str | None = None,
        running: Sequence[str] | None = None,
        leases: Mapping[str, int] | None = None,
    ) -> None:
        """Atomically record that this node is alive and extend its files' leases.

        ``address`` is where this node's HTTP API listens, if it serves one.
        ``running``: the files this node really runs; only their leases are
        extended, so a file leased to this node that it lost track of expires
        and is requeued. ``None`` extends every file leased to this node. A
        file in ``leases`` is extended only while it still carries that
        token. SQLite keeps no leases: there only the node row is written.
        """
        stamp = self.db.ts(now)
        if self._started is None:
            self._started = stamp
        host, pid = socket.gethostname(), os.getpid()
        with self.db.transaction() as tx:
            tx.run(
                self.q["upsert_node"],
                (self.node_id, host, pid, self._started, stamp, address),
            )
            if not self.q["extend_leases"]:
                return
            until = self.db.ts(now + self.lease)
            if running is None:
                tx.run(self.q["extend_all_leases"], (until, self.node_id))
            elif ids := [fid for fid in running if self.db.key(fid) is not None]:
                gens = [(leases or {}).get(fid) for fid in ids]
                tx.run(self.q["extend_leases"], (until, ids, gens, self.node_id))

    def nodes(self) -> list[NodeRow]:
        """Every node that heart-beat, with how many files it runs, by node id."""
        return [
            NodeRow(
                node_id=r["node_id"],
                host=r["host"],
                pid=r["pid"],
                started_at=text_time(r["started_at"]) or "",
                last_heartbeat=text_time(r["last_heartbeat"]) or "",
                address=r["address"],
                processing=int(r["processing"]),
            )
            for r in self.db.read(self.q["nodes"], {"node_id": self.node_id})
        ]
