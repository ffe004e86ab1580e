"""Every SQL statement the store runs, by name, for SQLite and PostgreSQL.

The statements are written once, in SQLite's form (``?`` and ``:name``
placeholders), with a handful of ``{fragments}`` for the spots where the
dialects spell one thing two ways (``MAX`` / ``GREATEST``, the casts
PostgreSQL needs to type a bare parameter, the lease columns only
PostgreSQL has). :func:`for_dialect` fills the fragments in and, for
PostgreSQL, turns the placeholders into psycopg's ``%s`` / ``%(name)s``
mechanically. The statements that differ in substance (the claim with
``SKIP LOCKED``, row and advisory locks, lease renewal, the nodes count)
are written out per dialect in ``POSTGRES`` and ``SQLITE``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

BATCH_COLS = (
    "id, user_id, status, total_files, processed_files, failed_files, priority, "
    "created_at, started_at, completed_at, error, name, source, work_path, version"
)
FILE_FIELDS = (
    *("id", "batch_id", "filename", "relpath", "file_size", "file_hash", "status"),
    *("progress", "result", "error", "retry_count", "attempts", "created_at", "started_at"),
    *("completed_at", "processor", "lease_gen", "file_dev", "file_ino"),
)


def file_cols(prefix: str = "", result_as_text: bool = False) -> str:
    """The FileRow columns (PostgreSQL: ``result`` as its stored text, read back verbatim)."""
    return ", ".join(
        f"{prefix}{c}::text AS {c}" if c == "result" and result_as_text else f"{prefix}{c}"
        for c in FILE_FIELDS
    )


#: Per dialect: how each ``{fragment}`` of the common statements is spelt.
FRAGMENTS: dict[str, dict[str, str]] = {
    "sqlite": {
        "greatest": "MAX",
        "int": "",
        "json": "",
        "ts": "",
        "clear_lease": "",
        "ord": "rowid",
        "file_cols": file_cols(),
    },
    "postgres": {
        "greatest": "GREATEST",
        "int": "::integer",
        "json": "::json",
        "ts": "::timestamptz",
        "clear_lease": ", lease_until = NULL",
        "ord": "ord",
        "file_cols": file_cols(result_as_text=True),
    },
}

_REQUEUE_SET = (
    "UPDATE batch_files SET status = 'pending', progress = 0,"
    " attempts = {greatest}(attempts - 1, 0){clear_lease}"
)

#: The statements both dialects share, in SQLite's placeholders.
COMMON: dict[str, str] = {
    "ping": "SELECT 1 AS one",
    "counter_take": (
        "UPDATE counters SET value = value + ? WHERE name = 'file_seq' RETURNING value"
    ),
    "work_path_taken": "SELECT 1 AS one FROM batch_jobs WHERE work_path = ?",
    "name_taken": "SELECT 1 AS one FROM batch_jobs WHERE name = ?",
    "insert_batch": (
        "INSERT INTO batch_jobs (id, user_id, status, total_files, priority, created_at,"
        " error, name, source, work_path) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    ),
    "insert_file": (
        "INSERT INTO batch_files (id, batch_id, filename, relpath, file_size, status,"
        " error, created_at, completed_at, seq, priority, priority_rank, file_dev,"
        " file_ino) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    ),
    "batch_by_work_path": (
        "SELECT {batch_cols} FROM batch_jobs WHERE work_path = ? ORDER BY created_at DESC LIMIT 1"
    ),
    "finish": (
        "UPDATE batch_files SET status = ?, result = ?{json}, error = ?, completed_at = ?,"
        " progress = CASE WHEN ? = 'completed' THEN 100 ELSE progress END,"
        " file_hash = COALESCE(?, file_hash), file_size = COALESCE(?, file_size),"
        " processor = COALESCE(?, processor), started_at = COALESCE(?{ts}, started_at)"
        "{clear_lease}"
        " WHERE id = ? AND (?{int} IS NULL OR (status = 'processing' AND lease_gen = ?{int}))"
        " RETURNING batch_id"
    ),
    "retry_later": (
        "UPDATE batch_files SET status = 'pending', retry_count = retry_count + 1,"
        " error = ?, available_at = ?, progress = 0{clear_lease} WHERE id = ?"
        " AND (?{int} IS NULL OR (status = 'processing' AND lease_gen = ?{int}))"
    ),
    # attempts - 1: an attempt cut short by us (shutdown, crash) is not spent.
    "requeue": (
        _REQUEUE_SET + " WHERE id = ? AND status = 'processing'"
        " AND (?{int} IS NULL OR lease_gen = ?{int})"
    ),
    "set_progress": (
        "UPDATE batch_files SET progress = ? WHERE id = ? AND status = 'processing'"
        " AND (?{int} IS NULL OR lease_gen = ?{int})"
    ),
    "retry_failed": (
        "UPDATE batch_files SET status = 'pending', retry_count = 0, progress = 0,"
        " available_at = NULL WHERE status = 'failed' AND (id = ? OR batch_id = ?)"
        " RETURNING batch_id"
    ),
    "count_files": (
        "SELECT status, COUNT(*) AS n FROM batch_files WHERE batch_id = ? GROUP BY status"
    ),
    # No row lock in SQLite: BEGIN IMMEDIATE already holds the whole database.
    "lock_batch": "",
    "refresh_batch": (
        "UPDATE batch_jobs SET status = :status, total_files = :total,"
        " processed_files = :completed, failed_files = :failed,"
        " started_at = CASE WHEN :status IN ('processing', 'completed', 'failed')"
        "   THEN COALESCE(started_at, :now) ELSE started_at END,"
        " completed_at = CASE WHEN :status IN ('completed', 'failed')"
        "   THEN COALESCE(completed_at, :now) ELSE NULL END, version = version + 1"
        " WHERE id = :id RETURNING {batch_cols}"
    ),
    # A file of a pending batch was claimed: the batch is processing now, and
    # its counters (done files) are as they were, so no count is needed.
    "start_batch": (
        "UPDATE batch_jobs SET status = 'processing', started_at = COALESCE(started_at, :now),"
        " version = version + 1 WHERE id = :id AND status = 'pending' RETURNING {batch_cols}"
    ),
    "get_batch": "SELECT {batch_cols} FROM batch_jobs WHERE id = ?",
    "find_batch": (
        "SELECT {batch_cols} FROM batch_jobs WHERE id = ? OR name = ? ORDER BY id = ? DESC LIMIT 1"
    ),
    # find_batch's row, narrowed to what tells whether a cached answer is current.
    "find_batch_version": (
        "SELECT id, version, status FROM batch_jobs WHERE id = ? OR name = ?"
        " ORDER BY id = ? DESC LIMIT 1"
    ),
    "snapshot_files": "SELECT {file_cols} FROM batch_files WHERE batch_id = ? ORDER BY seq",
    # snapshots(): several batches and their files in one read (first status documents).
    "get_batches": "SELECT {batch_cols} FROM batch_jobs WHERE id IN ({marks})",
    "snapshots_files": (
        "SELECT {file_cols} FROM batch_files WHERE batch_id IN ({marks}) ORDER BY batch_id, seq"
    ),
    "ids_with_prefix": (
        "SELECT id FROM batch_jobs WHERE id LIKE ? ESCAPE '\\' ORDER BY id LIMIT ?"
    ),
    "get_file": "SELECT {file_cols} FROM batch_files WHERE id = ?",
    "list_batches": (
        "SELECT {batch_cols} FROM batch_jobs {where}"
        " ORDER BY created_at DESC, {ord} DESC LIMIT ? OFFSET ?"
    ),
    "list_files": (
        "SELECT {file_cols} FROM batch_files WHERE batch_id = ? ORDER BY seq LIMIT ? OFFSET ?"
    ),
    "progress_sum": (
        "SELECT COALESCE(SUM(CASE WHEN status IN ('completed', 'failed') THEN 100"
        " ELSE progress END), 0) AS n FROM batch_files WHERE batch_id = ?"
    ),
    "unfinished_batches": (
        "SELECT {batch_cols} FROM batch_jobs WHERE status IN ('pending', 'processing')"
        " ORDER BY created_at, {ord}"
    ),
    "progress_sums": (
        "SELECT batch_id, COALESCE(SUM(CASE WHEN status IN ('completed', 'failed') THEN 100"
        " ELSE progress END), 0) AS n FROM batch_files WHERE batch_id IN ({marks})"
        " GROUP BY batch_id"
    ),
    "batches_with_files_in": (
        "SELECT DISTINCT batch_id FROM batch_files WHERE status IN ({marks})"
    ),
    "next_due": (
        "SELECT MIN(available_at) AS due FROM batch_files"
        " WHERE status = 'pending' AND available_at IS NOT NULL"
    ),
    "queue_counts": "SELECT status, COUNT(*) AS n FROM batch_files GROUP BY status",
    "counts_files": (
        "SELECT status, priority, COUNT(*) AS n FROM batch_files GROUP BY status, priority"
    ),
    "counts_batches": (
        "SELECT status, priority, COUNT(*) AS n FROM batch_jobs GROUP BY status, priority"
    ),
    "uploads_since": (
        "SELECT created_at FROM uploads WHERE user_id = ? AND created_at >= ? ORDER BY created_at"
    ),
    # No per-user lock in SQLite: BEGIN IMMEDIATE serialises every writer.
    "lock_uploads": "",
    "count_uploads": "SELECT COUNT(*) AS n FROM uploads WHERE user_id = ? AND created_at >= ?",
    "insert_upload": "INSERT INTO uploads (user_id, created_at) VALUES (?, ?)",
    "prune_uploads": "DELETE FROM uploads WHERE created_at < ?",
    "finished_before": (
        "SELECT {batch_cols} FROM batch_jobs WHERE status IN ('completed', 'failed')"
        " AND completed_at < ? ORDER BY completed_at, {ord}"
    ),
    "count_unfinished_files": (
        "SELECT COUNT(*) AS n FROM batch_files WHERE batch_id = ?"
        " AND status IN ('pending', 'processing')"
    ),
    # The batch as it is now, with how many of its files are still to finish:
    # one round trip after a success committed without the batch's row lock.
    "batch_with_unfinished": (
        "SELECT {batch_cols}, (SELECT COUNT(*) FROM batch_files f WHERE f.batch_id = b.id"
        " AND f.status IN ('pending', 'processing')) AS unfinished"
        " FROM batch_jobs b WHERE b.id = ?"
    ),
    # The batch before a derivation (PostgreSQL: under its row lock).
    "lock_batch_status": "SELECT {batch_cols} FROM batch_jobs WHERE id = ?",
    # Counters only, for a batch still running: one statement, so the row lock
    # lasts one statement; a batch's status moves on only by a derivation.
    # c.seen: the batch's version the counts were taken with. A statement that
    # waited on the row lock of a change (a retry's derivation) finds another
    # version after it (PostgreSQL re-checks the WHERE on the new row, not the
    # counts) and writes nothing: its counts are from before that change.
    "refresh_counts": (
        "UPDATE batch_jobs SET processed_files = c.completed, failed_files = c.failed,"
        " version = version + 1"
        " FROM (SELECT COALESCE(SUM(CASE WHEN status = 'completed' THEN 1 ELSE 0 END), 0)"
        "   AS completed, COALESCE(SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END), 0)"
        "   AS failed, (SELECT version FROM batch_jobs WHERE id = :id) AS seen"
        "   FROM batch_files WHERE batch_id = :id) AS c"
        " WHERE batch_jobs.id = :id AND batch_jobs.status IN ('pending', 'processing')"
        " AND batch_jobs.version = c.seen"
        " AND (batch_jobs.processed_files <> c.completed OR batch_jobs.failed_files <> c.failed)"
    ),
    # Running batches with no file left to finish whose last file finished
    # before the cutoff: their last lock-free commit was never derived (its
    # node died between the commit and the derivation, Store.finish_file).
    "abandoned_batches": (
        "SELECT b.id FROM batch_jobs b WHERE b.status IN ('pending', 'processing')"
        " AND NOT EXISTS (SELECT 1 FROM batch_files f WHERE f.batch_id = b.id"
        "   AND (f.status IN ('pending', 'processing') OR f.completed_at >= ?))"
        " ORDER BY b.created_at"
    ),
    # The files a worker claimed itself and still holds (Store.claimed_by).
    "claimed_by": (
        "SELECT {file_cols} FROM batch_files WHERE claimant = ? AND status = 'processing'"
    ),
    "delete_files": "DELETE FROM batch_files WHERE batch_id = ?",
    "delete_batch": "DELETE FROM batch_jobs WHERE id = ?",
    "upsert_node": (
        "INSERT INTO nodes (node_id, host, pid, started_at, last_heartbeat, address)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET"
        " host = excluded.host, pid = excluded.pid, started_at = excluded.started_at,"
        " last_heartbeat = excluded.last_heartbeat, address = excluded.address"
    ),
}

#: SQLite's own spelling of the statements that differ in substance.
SQLITE: dict[str, str] = {
    # The index hint keeps the claim an O(log n) walk of the queue index.
    "claim": (
        "UPDATE batch_files SET status = 'processing', started_at = :now, progress = 0,"
        " completed_at = NULL, lease_gen = lease_gen + 1, attempts = attempts + 1,"
        " available_at = NULL, claimant = :claimant WHERE id = ("
        "  SELECT f.id FROM batch_files f INDEXED BY batch_files_queue"
        "  WHERE f.status = 'pending' AND (f.available_at IS NULL OR f.available_at <= :now)"
        "  ORDER BY f.priority_rank, f.seq LIMIT 1)"
        # :fresh (a worker's own claim): the head of the order only when it was
        # never claimed, else nothing (the daemon claims it, as it claims every
        # re-queued file: Store.finish_and_claim).
        " AND (:fresh = 0 OR (lease_gen = 0 AND attempts = 0 AND retry_count = 0))"
        " RETURNING {file_cols}"
    ),
    # One node: every processing file at start-up is this node's predecessor's.
    "requeue_stale": _REQUEUE_SET + " WHERE status = 'processing'",
    "requeue_expired": "",
    "extend_all_leases": "",
    "extend_leases": "",
    "nodes": (
        "SELECT n.node_id, n.host, n.pid, n.started_at, n.last_heartbeat, n.address,"
        " CASE WHEN n.node_id = :node_id THEN"
        "   (SELECT COUNT(*) FROM batch_files WHERE status = 'processing') ELSE 0 END"
        " AS processing FROM nodes n ORDER BY n.node_id"
    ),
}

#: PostgreSQL's own spelling, in psycopg's placeholders (not converted).
POSTGRES: dict[str, str] = {
    # SKIP LOCKED: a file another node is claiming this instant is passed over.
    # The batch's columns come back with the file (batch_*): one round trip
    # less per claim than reading the batch after it.
    "claim": (
        "WITH next AS ("
        "  SELECT id FROM batch_files"
        "  WHERE status = 'pending' AND (available_at IS NULL OR available_at <= %(now)s)"
        "  ORDER BY priority_rank, seq LIMIT 1 FOR UPDATE SKIP LOCKED),"
        " claimed AS (UPDATE batch_files f SET status = 'processing', started_at = %(now)s,"
        " progress = 0, completed_at = NULL, attempts = attempts + 1,"
        " available_at = NULL, node_id = %(node_id)s, lease_until = %(lease_until)s,"
        " lease_gen = f.lease_gen + 1, claimant = %(claimant)s"
        " FROM next WHERE f.id = next.id"
        " AND (%(fresh)s = 0 OR (f.lease_gen = 0 AND f.attempts = 0 AND f.retry_count = 0))"
        " RETURNING {prefixed_file_cols})"
        " SELECT claimed.*, b.status AS batch_status, b.name AS batch_name,"
        " b.work_path AS batch_work_path, b.priority AS batch_priority,"
        " b.total_files AS batch_total_files"
        " FROM claimed JOIN batch_jobs b ON b.id = claimed.batch_id"
    ),
    # ON CONFLICT: a second node registering the same folder waits, inserts nothing.
    "insert_batch": (
        "INSERT INTO batch_jobs (id, user_id, status, total_files, priority,"
        " created_at, error, name, source, work_path)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (work_path) DO NOTHING"
    ),
    "lock_batch": "SELECT 1 AS one FROM batch_jobs WHERE id = %s FOR UPDATE",
    "lock_batch_status": "SELECT {batch_cols} FROM batch_jobs WHERE id = %s FOR UPDATE",
    "ids_with_prefix": (
        "SELECT id::text AS id FROM batch_jobs WHERE id::text LIKE %s ESCAPE '\\'"
        " ORDER BY id LIMIT %s"
    ),
    "lock_uploads": ("SELECT pg_advisory_xact_lock(hashtextextended('batchd.upload:' || %s, 0))"),
    "requeue_stale": (_REQUEUE_SET + " WHERE status = 'processing' AND node_id = %(node_id)s"),
    # A processing file without a lease (set by hand) counts as expired.
    "requeue_expired": (
        _REQUEUE_SET + " WHERE status = 'processing' AND (lease_until IS NULL OR lease_until < %s)"
    ),
    "extend_all_leases": (
        "UPDATE batch_files SET lease_until = %s WHERE status = 'processing' AND node_id = %s"
    ),
    "extend_leases": (
        "UPDATE batch_files f SET lease_until = %s"
        " FROM unnest(%s::uuid[], %s::integer[]) AS t (id, gen)"
        " WHERE f.id = t.id AND f.status = 'processing' AND f.node_id = %s"
        " AND (t.gen IS NULL OR f.lease_gen = t.gen)"
    ),
    "nodes": (
        "SELECT n.node_id, n.host, n.pid, n.started_at, n.last_heartbeat, n.address,"
        " COUNT(f.id) AS processing FROM nodes n"
        " LEFT JOIN batch_files f ON f.node_id = n.node_id AND f.status = 'processing'"
        " GROUP BY n.node_id ORDER BY n.node_id"
    ),
}

_NAMED = re.compile(r"(?<![:\w]):([a-z_]+)")


def _to_psycopg(sql: str) -> str:
    """SQLite placeholders as psycopg's: ``?`` -> ``%s``, ``:name`` -> ``%(name)s``."""
    return _NAMED.sub(r"%(\1)s", sql.replace("?", "%s"))


def for_dialect(dialect: str) -> Mapping[str, str]:
    """Every named statement, ready to run on ``dialect`` (``sqlite`` or ``postgres``).

    ``{where}`` and ``{marks}`` stay open: their callers fill them per call.
    """
    frag = {
        **FRAGMENTS[dialect],
        "batch_cols": BATCH_COLS,
        "prefixed_file_cols": file_cols("f.", result_as_text=True),
        "where": "{where}",
        "marks": "{marks}",
    }
    if dialect == "postgres":
        common = {name: _to_psycopg(sql) for name, sql in COMMON.items()}
        own = POSTGRES
    else:
        common, own = dict(COMMON), SQLITE
    return {name: sql.format(**frag) for name, sql in {**common, **own}.items()}
