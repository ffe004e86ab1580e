"""Tests for batchd.store.postgres: the store contract and the cluster API on a real PostgreSQL.

Every :class:`StoreContract` test runs against :class:`PostgresStore` on a
server started by tests/pgserver.py (skipped with the reason when PostgreSQL
is not installed). The rest is what PostgreSQL adds: the SPEC §5 schema and
operator SQL through the real ``psql``, SKIP LOCKED claiming from several
nodes at once, leases and heartbeats, LISTEN/NOTIFY wake-ups, exactly-once
registration and migrations under concurrent start.
"""

from __future__ import annotations

import re
import select
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from test_store import (
    SPEC_BATCH_COLUMNS,
    SPEC_FILE_COLUMNS,
    T0,
    StoreContract,
    at,
    completed,
    new_batch,
    operator_queue,
)

from batchd.config import Priority, Settings
from batchd.errors import StoreError
from batchd.records import Outcome, Status
from batchd.testing.wait import wait_until

if TYPE_CHECKING:
    from pgserver import PgServer

# tests/pgserver.py provides the pg_server (session) and pg_url (per test) fixtures.
pytest_plugins = ["pgserver"]
psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed")

from batchd.store import SQLiteStore, open_store  # noqa: E402
from batchd.store.postgres import (  # noqa: E402
    SCHEMA_VERSION,
    AlreadyRegistered,
    NameTaken,
    PostgresStore,
)

LEASE = 30.0
WAKE_TIMEOUT = 30.0


@pytest.fixture
def stores(pg_url: str) -> Iterator[Callable[..., PostgresStore]]:
    """Opens stores on the test's schema, as separate nodes would; closes them all."""
    opened: list[PostgresStore] = []

    def opener(node_id: str = "node-a", lease_seconds: float = LEASE) -> PostgresStore:
        store = PostgresStore(pg_url, node_id=node_id, lease_seconds=lease_seconds)
        opened.append(store)
        return store

    yield opener
    for store in opened:
        store.close()


def sql(server: PgServer, url: str, statement: str) -> list[list[str]]:
    """Rows of ``statement`` run through the real psql client, fields split on '|'."""
    return [line.split("|") for line in server.psql(url, statement).splitlines() if line]


def readable(fileno: int, timeout: float) -> bool:
    ready, _, _ = select.select([fileno], [], [], timeout)
    return bool(ready)


class TestPostgresStore(StoreContract):
    """The contract every store must honour, against PostgreSQL."""

    @pytest.fixture
    def store(self, stores: Callable[..., PostgresStore]) -> PostgresStore:
        return stores()


# -- schema and operator SQL ---------------------------------------------------------


def test_schema_has_every_spec_column_with_postgres_types(
    stores: Callable[..., PostgresStore], pg_server: PgServer, pg_url: str
) -> None:
    """batch_jobs and batch_files carry every SPEC §5 column, with uuid/timestamptz/json types."""
    store = stores()
    assert store.schema_version() == SCHEMA_VERSION
    rows = sql(
        pg_server,
        pg_url,
        "SELECT table_name, column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = current_schema()"
        " AND table_name IN ('batch_jobs', 'batch_files')",
    )
    types = {(t, c): d for t, c, d in rows}
    assert {c for t, c in types if t == "batch_jobs"} >= SPEC_BATCH_COLUMNS
    assert {c for t, c in types if t == "batch_files"} >= SPEC_FILE_COLUMNS
    assert {
        key: types[key]
        for key in (
            ("batch_jobs", "id"),
            ("batch_jobs", "created_at"),
            ("batch_jobs", "total_files"),
            ("batch_files", "batch_id"),
            ("batch_files", "result"),
            ("batch_files", "file_size"),
            ("batch_files", "completed_at"),
        )
    } == {
        ("batch_jobs", "id"): "uuid",
        ("batch_jobs", "created_at"): "timestamp with time zone",
        ("batch_jobs", "total_files"): "integer",
        ("batch_files", "batch_id"): "uuid",
        ("batch_files", "result"): "json",
        ("batch_files", "file_size"): "bigint",
        ("batch_files", "completed_at"): "timestamp with time zone",
    }


def test_operator_select_statements_run_in_psql(
    stores: Callable[..., PostgresStore], pg_server: PgServer, pg_url: str
) -> None:
    """The SPEC §5 SELECTs run verbatim in psql against a live store."""
    store = stores()
    operator_queue(store)
    assert sql(pg_server, pg_url, "SELECT COUNT(*) FROM batch_files WHERE status='pending';") == [
        ["2"]
    ]
    rows = sql(
        pg_server,
        pg_url,
        "SET TIME ZONE 'UTC'; SELECT id, status, total_files, processed_files, failed_files,"
        " created_at\n  FROM batch_jobs ORDER BY created_at DESC LIMIT 10;",
    )
    assert [r[1:] for r in rows if len(r) > 1] == [
        ["failed", "1", "0", "1", "2026-11-28 10:00:01+00"],
        ["processing", "3", "0", "1", "2026-11-28 10:00:00+00"],
    ]
    (avg,) = sql(
        pg_server, pg_url, "SELECT AVG(retry_count) FROM batch_files WHERE status='failed';"
    )
    assert float(avg[0]) == pytest.approx(0.5)


def test_operator_update_in_psql_requeues_and_wakes(
    stores: Callable[..., PostgresStore], pg_server: PgServer, pg_url: str
) -> None:
    """The SPEC §5 UPDATE in psql wakes a listening node and the file is claimed again."""
    store = stores()
    batch = store.register_batch(new_batch("b1", ("a",), errors={"a": "refused"}), T0)
    (file_id,) = [f.id for f in store.list_files(batch.id)]
    fileno = store.listen_fileno()
    assert fileno is not None
    store.drain_notifications()
    pg_server.psql(
        pg_url, f"UPDATE batch_files SET status='pending', retry_count=0 WHERE id='{file_id}';"
    )
    assert readable(fileno, WAKE_TIMEOUT)
    assert store.drain_notifications() >= 1
    task = store.claim_next(at(1))
    assert task is not None and task.file.id == file_id
    assert store.get_batch(batch.id).status == Status.PROCESSING  # type: ignore[union-attr]


# -- claiming across nodes ------------------------------------------------------------


def test_skip_locked_never_hands_a_file_twice(stores: Callable[..., PostgresStore]) -> None:
    """Four nodes claiming at once from their own connections get every file exactly once."""
    nodes = [stores(f"node-{n}") for n in range(4)]
    for n in range(6):
        nodes[0].register_batch(
            new_batch(f"b{n}", tuple(f"f{i}" for i in range(20)), Priority.NORMAL), T0
        )
    claimed: dict[str, list[str]] = {s.node_id: [] for s in nodes}
    errors: list[BaseException] = []
    start = threading.Barrier(len(nodes))

    def work(store: PostgresStore) -> None:
        try:
            start.wait(timeout=30)
            while (task := store.claim_next(T0)) is not None:
                claimed[store.node_id].append(task.file.id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert not any(t.is_alive() for t in threads)
    every = [fid for ids in claimed.values() for fid in ids]
    assert len(every) == len(set(every)) == 120
    assert nodes[0].queue_counts() == {"pending": 0, "processing": 120, "completed": 0, "failed": 0}


def test_priority_and_fifo_hold_across_nodes(stores: Callable[..., PostgresStore]) -> None:
    """Two nodes taking turns claim in one global order: priority, then registration."""
    a, b = stores("node-a"), stores("node-b")
    a.register_batch(new_batch("low1", ("x", "y"), Priority.LOW), T0)
    b.register_batch(new_batch("norm1", ("x",), Priority.NORMAL), T0)
    a.register_batch(new_batch("high1", ("x", "y"), Priority.HIGH), T0)
    b.register_batch(new_batch("norm2", ("x",), Priority.NORMAL), T0)
    order = []
    for n in range(6):
        task = (a, b)[n % 2].claim_next(T0)
        assert task is not None
        order.append(f"{task.batch_name}/{task.file.relpath}")
    assert order == ["high1/x", "high1/y", "norm1/x", "norm2/x", "low1/x", "low1/y"]


# -- leases -----------------------------------------------------------------------------


def test_expired_lease_is_requeued_without_spending_an_attempt(
    stores: Callable[..., PostgresStore],
) -> None:
    """A dead node's file goes back to pending once its lease ends, attempt given back."""
    dead, alive = stores("dead"), stores("alive")
    dead.register_batch(new_batch("b1", ("a",)), T0)
    task = dead.claim_next(T0)
    assert task is not None
    assert alive.requeue_expired(at(LEASE - 0.001)) == 0
    assert alive.requeue_expired(at(LEASE + 0.001)) == 1
    row = alive.get_file(task.file.id)
    assert row is not None
    assert (row.status, row.attempts, row.retry_count) == (Status.PENDING, 0, 0)
    again = alive.claim_next(at(LEASE + 1))
    assert again is not None and again.file.id == task.file.id
    assert again.file.attempts == 1
    assert alive.requeue_expired(at(LEASE + 2)) == 0


def test_heartbeat_extends_the_nodes_leases(stores: Callable[..., PostgresStore]) -> None:
    """A node that heart-beats keeps its files; the lease runs from the last beat."""
    node, other = stores("node"), stores("other")
    node.register_batch(new_batch("b1", ("a",)), T0)
    assert node.claim_next(T0) is not None
    node.heartbeat(at(20))
    assert other.requeue_expired(at(LEASE + 10)) == 0
    assert other.requeue_expired(at(20 + LEASE + 0.001)) == 1


def test_requeue_stale_touches_only_this_nodes_files(stores: Callable[..., PostgresStore]) -> None:
    """At start a node takes back its own processing files, never another live node's."""
    a, b = stores("node-a"), stores("node-b")
    a.register_batch(new_batch("b1", ("x", "y")), T0)
    mine, theirs = a.claim_next(T0), b.claim_next(T0)
    assert mine is not None and theirs is not None
    assert a.requeue_stale() == 1
    assert [a.get_file(t.file.id).status for t in (mine, theirs)] == [  # type: ignore[union-attr]
        Status.PENDING,
        Status.PROCESSING,
    ]


def test_nodes_lists_heartbeats_and_running_files(stores: Callable[..., PostgresStore]) -> None:
    """nodes() shows each node's last heartbeat, address and how many files it runs."""
    a, b = stores("node-a"), stores("node-b")
    a.register_batch(new_batch("b1", ("x", "y")), T0)
    a.claim_next(T0)
    a.heartbeat(at(1), address="127.0.0.1:8080")
    b.heartbeat(at(2))
    b.heartbeat(at(7))
    rows = [n.public() for n in b.nodes()]
    assert [(r["node_id"], r["last_heartbeat"], r["address"], r["processing"]) for r in rows] == [
        ("node-a", "2026-11-28T10:00:01.000Z", "127.0.0.1:8080", 1),
        ("node-b", "2026-11-28T10:00:07.000Z", None, 0),
    ]
    assert rows[1]["started_at"] == "2026-11-28T10:00:02.000Z"


# -- wake-ups ------------------------------------------------------------------------------


def test_registration_wakes_a_listening_node(stores: Callable[..., PostgresStore]) -> None:
    """Another node's registration makes the listening socket readable; drain consumes it."""
    idle, busy = stores("idle"), stores("busy")
    fileno = idle.listen_fileno()
    assert fileno is not None
    assert idle.drain_notifications() == 0
    busy.register_batch(new_batch("b1", ("a", "b", "c")), T0)
    assert readable(fileno, WAKE_TIMEOUT)
    assert idle.drain_notifications() == 1  # one transaction, one notification
    assert idle.drain_notifications() == 0


def test_requeue_and_due_retry_wake_listeners(stores: Callable[..., PostgresStore]) -> None:
    """requeue_expired and a retry already due notify; each is seen by the listener."""
    idle, busy = stores("idle"), stores("busy")
    busy.register_batch(new_batch("b1", ("a", "b")), T0)
    a, b = busy.claim_next(T0), busy.claim_next(T0)
    assert a is not None and b is not None
    fileno = idle.listen_fileno()
    assert fileno is not None
    idle.drain_notifications()
    busy.retry_later(a.file.id, "boom", datetime.now(UTC) - timedelta(seconds=1))
    assert readable(fileno, WAKE_TIMEOUT)
    assert idle.drain_notifications() == 1
    assert idle.requeue_expired(at(LEASE + 1)) == 1
    assert readable(fileno, WAKE_TIMEOUT)
    assert idle.drain_notifications() == 1


def test_listener_and_store_survive_a_server_restart(
    stores: Callable[..., PostgresStore], pg_server: PgServer
) -> None:
    """After the server restarts, drain reports the lost connection, LISTEN is
    re-established on a new socket, and store calls reconnect by themselves."""
    idle, busy = stores("idle"), stores("busy")
    busy.ping()
    old = idle.listen_fileno()
    assert old is not None
    pg_server.restart()
    assert readable(old, WAKE_TIMEOUT)  # the server closed the socket
    assert idle.drain_notifications() == 1
    fileno = idle.listen_fileno()
    assert fileno is not None
    busy.register_batch(new_batch("b1"), T0)
    assert readable(fileno, WAKE_TIMEOUT)
    assert idle.drain_notifications() == 1
    assert [b.name for b in idle.list_batches()] == ["b1"]


# -- exactly-once registration ----------------------------------------------------------------


def test_second_registration_of_a_work_path_is_already_registered(
    stores: Callable[..., PostgresStore],
) -> None:
    """Registering a claimed folder another node registered raises AlreadyRegistered."""
    a, b = stores("node-a"), stores("node-b")
    first = a.register_batch(new_batch("x", ("a", "b")), T0)
    with pytest.raises(AlreadyRegistered, match="work/normal/x"):
        b.register_batch(new_batch("x", ("a", "b")), at(1))
    assert [r.id for r in b.list_batches()] == [first.id]
    assert b.queue_counts()["pending"] == 2


def race_register(
    store: PostgresStore, name: str, start: threading.Barrier, outcomes: list[str]
) -> None:
    """Register batch ``name`` once ``start`` releases; note "won", "already" or the error."""
    start.wait(timeout=30)
    try:
        store.register_batch(new_batch(name, ("a", "b", "c")), T0)
        outcomes.append("won")
    except AlreadyRegistered:
        outcomes.append("already")
    except BaseException as exc:  # pragma: no cover - reported by the caller
        outcomes.append(repr(exc))


def test_racing_registrations_end_with_one_batch(stores: Callable[..., PostgresStore]) -> None:
    """Two nodes registering the same claim at the same instant: one batch, one loser."""
    a, b = stores("node-a"), stores("node-b")
    for n in range(10):
        outcomes: list[str] = []
        start = threading.Barrier(2)
        threads = [
            threading.Thread(target=race_register, args=(s, f"race{n}", start, outcomes))
            for s in (a, b)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sorted(outcomes) == ["already", "won"]
    assert len(a.list_batches(limit=100)) == 10
    assert a.queue_counts()["pending"] == 30


def test_name_clash_with_another_folder_is_name_taken(
    stores: Callable[..., PostgresStore],
) -> None:
    """A different folder under a name already in use raises NameTaken, a StoreError."""
    store = stores()
    store.register_batch(new_batch("x", priority=Priority.HIGH), T0)
    with pytest.raises(NameTaken) as caught:
        store.register_batch(new_batch("x", priority=Priority.LOW), T0)
    assert isinstance(caught.value, StoreError)
    assert store.batch_by_work_path("work/low/x") is None


# -- migrations -----------------------------------------------------------------------------------


def test_concurrent_start_migrates_once(pg_server: PgServer, pg_url: str) -> None:
    """Four nodes starting at once on an empty database all come up on one schema."""
    opened: list[PostgresStore] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def boot(n: int) -> None:
        try:
            start.wait(timeout=30)
            opened.append(PostgresStore(pg_url, node_id=f"n{n}"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=boot, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert errors == []
        assert len(opened) == 4
        assert sql(pg_server, pg_url, "SELECT version FROM schema_version") == [
            [str(SCHEMA_VERSION)]
        ]
        opened[0].register_batch(new_batch("b1"), T0)
        assert opened[3].name_taken("b1")
    finally:
        for store in opened:
            store.close()


def test_newer_schema_version_is_refused(
    stores: Callable[..., PostgresStore], pg_server: PgServer, pg_url: str
) -> None:
    """A database migrated by a newer batchd raises StoreError naming both versions."""
    stores()
    pg_server.psql(pg_url, f"UPDATE schema_version SET version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}"):
        stores()


# -- the rest of the boundary --------------------------------------------------------------------


def test_change_version_moves_on_a_foreign_commit(
    stores: Callable[..., PostgresStore], pg_server: PgServer, pg_url: str
) -> None:
    """change_version differs after another client commits (the HTTP cache's tag)."""
    store = stores()
    store.register_batch(new_batch("b1"), T0)
    before = store.change_version()
    assert store.change_version() == before
    pg_server.psql(pg_url, "UPDATE batch_files SET progress = 5")
    assert store.change_version() != before


def test_result_reads_back_as_the_stored_json_text(stores: Callable[..., PostgresStore]) -> None:
    """batch_files.result is json; the record carries the processor's dict as JSON text."""
    store = stores()
    store.register_batch(new_batch("b1"), T0)
    task = store.claim_next(T0)
    assert task is not None
    store.finish(task.file.id, completed(extra={}), T0)
    row = store.get_file(task.file.id)
    assert row is not None and row.result == '{"ok": true}'


def test_a_store_opened_without_migrating_connects_on_first_use() -> None:
    """migrate=False (the HTTP process) opens with the server down; each call is a StoreError."""
    from pgserver import free_port

    port = free_port()
    store = PostgresStore(f"postgresql://batchd@127.0.0.1:{port}/batchd", "n", migrate=False)
    with pytest.raises(StoreError) as caught:
        store.ping()
    assert f"127.0.0.1:{port}" in caught.value.message
    store.close()


def test_unreachable_server_is_a_store_error_without_the_password() -> None:
    """A server that does not answer raises StoreError naming host and port, not the password."""
    from pgserver import free_port

    port = free_port()
    with pytest.raises(StoreError) as caught:
        PostgresStore(f"postgresql://batchd:s3cret@127.0.0.1:{port}/batchd", node_id="n")
    assert f"127.0.0.1:{port}" in caught.value.message
    assert "s3cret" not in caught.value.message


def test_open_store_follows_database_url(pg_url: str, tmp_path: Path) -> None:
    """database.url selects PostgresStore with the cluster settings; without it, SQLite."""
    pg = open_store(
        Settings(
            spool={"root": tmp_path},
            database={"url": pg_url},
            cluster={"node_id": "n7", "lease_seconds": 12},
        )
    )
    lite = open_store(Settings(spool={"root": tmp_path}))
    try:
        assert isinstance(pg, PostgresStore)
        assert (pg.node_id, pg.lease) == ("n7", timedelta(seconds=12))
        assert isinstance(lite, SQLiteStore)
        assert lite.path == tmp_path / "state" / "batchd.db"
    finally:
        pg.close()
        lite.close()


def test_default_node_id_is_host_and_spool(tmp_path: Path) -> None:
    """Without cluster.node_id, a node is named by its host name and spool root."""
    import socket

    assert Settings(spool={"root": tmp_path}).node_id == f"{socket.gethostname()}:{tmp_path}"


@pytest.mark.parametrize(
    ("database", "cluster", "message"),
    [
        ({"url": "mysql://x"}, {}, "must start with postgresql://"),
        ({"url": "postgresql://x/y", "path": "/tmp/x.db"}, {}, "not both"),
        ({}, {"heartbeat_seconds": 30, "lease_seconds": 30}, "shorter than"),
    ],
)
def test_bad_cluster_settings_are_refused(
    database: dict[str, Any], cluster: dict[str, Any], message: str
) -> None:
    """A non-PostgreSQL url, url with path, or heartbeat not under the lease is refused."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=re.escape(message)):
        Settings(database=database, cluster=cluster)


def test_finish_file_does_not_queue_behind_the_batch_row_lock(
    stores: Callable[..., PostgresStore], pg_url: str
) -> None:
    """A success recorded by finish_file commits while another node holds its batch's row
    lock (a derivation in progress): per-file commits do not serialise on the batch."""
    store = stores()
    batch = store.register_batch(new_batch("b1", ("a", "b")), T0)
    task = store.claim_next(T0)
    assert task is not None
    done = threading.Event()
    with psycopg.connect(pg_url) as holder:  # a transaction until the block ends
        holder.execute("SELECT 1 FROM batch_jobs WHERE id = %s FOR UPDATE", (batch.id,))

        def finish() -> None:
            store.finish_file(task.file.id, completed(lease=task.file.lease_gen), at(1))
            store.release_thread()
            done.set()

        thread = threading.Thread(target=finish, daemon=True)
        thread.start()
        try:
            assert done.wait(timeout=30), "finish_file waited for the batch row lock"
        finally:
            holder.rollback()
    thread.join(timeout=30)
    row = store.get_file(task.file.id)
    assert row is not None and row.status == Status.COMPLETED


def test_finish_file_last_two_committed_before_either_looks_end_the_batch_once(
    stores: Callable[..., PostgresStore],
) -> None:
    """Two nodes commit the batch's last two files before either looks at the batch:
    both then see nothing left, one derivation ends the batch and the other does not."""
    nodes = [stores("node-a"), stores("node-b")]
    nodes[0].register_batch(new_batch("b1", ("a", "b")), T0)
    tasks = [node.claim_next(T0) for node in nodes]
    both_committed = threading.Barrier(2)
    ended: list[bool] = []
    errors: list[BaseException] = []
    for node in nodes:
        real = node.settle_batch

        def settle_after_both(batch_id: str, now: datetime, real: Any = real) -> Any:
            both_committed.wait(timeout=30)
            return real(batch_id, now)

        node.settle_batch = settle_after_both  # type: ignore[method-assign]

    def finish(node: PostgresStore, task: Any) -> None:
        try:
            settled = node.finish_file(task.file.id, completed(lease=task.file.lease_gen), at(1))
            assert settled is not None
            ended.append(settled.ended)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            node.release_thread()

    pairs = zip(nodes, tasks, strict=True)
    threads = [threading.Thread(target=finish, args=pair) for pair in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and sorted(ended) == [False, True]
    batch = nodes[0].list_batches()[0]
    assert (batch.status, batch.processed_files) == (Status.COMPLETED, 2)


def test_finish_many_ends_a_batch_whose_other_file_finish_file_committed_unseen(
    stores: Callable[..., PostgresStore],
) -> None:
    """A daemon's finish_many (a failure) derives the batch while a worker's finish_file
    of the other file is still uncommitted, which then commits and looks while the
    failure is uncommitted: neither derivation saw both, yet the batch ends."""
    daemon, worker = stores("node-a"), stores("node-b")
    daemon.register_batch(new_batch("b1", ("a", "b")), T0)
    first, second = worker.claim_next(T0), daemon.claim_next(T0)
    assert first is not None and second is not None
    derived, looked = threading.Event(), threading.Event()
    real_refresh = daemon._refresh_batch

    def refresh_then_wait(tx: Any, batch_id: str, now: datetime) -> Any:
        daemon._refresh_batch = real_refresh  # type: ignore[method-assign]
        row = real_refresh(tx, batch_id, now)
        derived.set()
        assert looked.wait(timeout=30)  # the worker commits and looks before our commit
        return row

    daemon._refresh_batch = refresh_then_wait  # type: ignore[method-assign]
    seen: list[Any] = []

    def worker_finishes() -> None:
        assert derived.wait(timeout=30)
        seen.append(worker.finish_file(first.file.id, completed(lease=first.file.lease_gen), at(1)))
        worker.release_thread()
        looked.set()

    thread = threading.Thread(target=worker_finishes, daemon=True)
    thread.start()
    (row,) = daemon.finish_many([(second.file.id, failed_outcome(second.file.lease_gen), at(2))])
    thread.join(timeout=30)
    assert seen and seen[0] is not None and not seen[0].ended  # it saw `b` still running
    assert row is not None and row.status == Status.FAILED
    assert (row.processed_files, row.failed_files) == (1, 1)
    assert daemon.get_batch(row.id).status == Status.FAILED  # type: ignore[union-attr]


def failed_outcome(lease: int) -> Outcome:
    return Outcome(Status.FAILED, error="boom", processor="noop", lease=lease)


class NodeKilled(Exception):
    """Stands for a SIGKILL between finish_file's commit and its derivation."""


def test_batch_whose_last_commit_a_dead_node_never_derived_is_ended_by_another_node(
    stores: Callable[..., PostgresStore],
) -> None:
    """A node killed between its last file's lock-free commit and the derivation leaves
    the batch processing with nothing to run; another node's heartbeat sweep ends it
    once the commit is a lease old (and not before: a live worker derives its own)."""
    dead, alive = stores("node-a"), stores("node-b")
    batch = dead.register_batch(new_batch("b1", ("a",)), T0)
    task = dead.claim_next(T0)
    assert task is not None

    def killed(batch_id: str, now: datetime) -> Any:
        raise NodeKilled

    dead.settle_batch = killed  # type: ignore[method-assign]
    with pytest.raises(NodeKilled):
        dead.finish_file(task.file.id, completed(lease=task.file.lease_gen), at(1))
    assert alive.get_batch(batch.id).status == Status.PROCESSING  # type: ignore[union-attr]
    lease = timedelta(seconds=LEASE)
    assert alive.settle_abandoned(at(2), at(2) - lease) == []  # a live worker's moment
    (settled,) = alive.settle_abandoned(at(2) + lease, at(2))
    assert settled.ended and settled.batch.id == batch.id
    row = alive.get_batch(batch.id)
    assert row is not None and (row.status, row.processed_files) == (Status.COMPLETED, 1)
    assert alive.settle_abandoned(at(3) + lease, at(3)) == []  # ended once


def waiting_on_a_lock(pg_url: str, application: str) -> bool:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT 1 FROM pg_stat_activity WHERE application_name = %s"
            " AND wait_event_type = 'Lock'",
            (application,),
        ).fetchall()
    return bool(rows)


def test_refresh_counts_waiting_on_a_retry_does_not_write_the_counts_from_before_it(
    stores: Callable[..., PostgresStore], pg_url: str
) -> None:
    """A status rewrite's refresh_counts that waits on `batchd retry`'s batch row lock
    does not then write the failed count its statement saw before the retry's commit."""
    operator, daemon = stores("node-a"), stores("node-b")
    batch = operator.register_batch(new_batch("b1", ("a", "b", "c")), T0)
    first, second, third = (daemon.claim_next(T0) for _ in range(3))
    assert first is not None and second is not None and third is not None
    daemon.finish_many([(first.file.id, failed_outcome(first.file.lease_gen), at(1))])
    # A success without the batch's lock: the counters trail it (`c` still runs).
    daemon.finish_file(second.file.id, completed(lease=second.file.lease_gen), at(1))
    derived, blocked = threading.Event(), threading.Event()
    real_refresh = operator._refresh_batch

    def refresh_then_wait(tx: Any, batch_id: str, now: datetime) -> Any:
        row = real_refresh(tx, batch_id, now)
        derived.set()
        assert blocked.wait(timeout=30)  # the rewrite's statement waits on our lock
        return row

    operator._refresh_batch = refresh_then_wait  # type: ignore[method-assign]
    retry = threading.Thread(target=operator.retry_failed, args=(first.file.id,), daemon=True)
    retry.start()
    assert derived.wait(timeout=30)
    rewrite = threading.Thread(target=daemon.refresh_counts, args=(batch.id,), daemon=True)
    rewrite.start()
    try:
        wait_until(lambda: waiting_on_a_lock(pg_url, "batchd node-b"), 30, what="the lock wait")
    finally:
        blocked.set()
    retry.join(timeout=30)
    rewrite.join(timeout=30)
    row = daemon.get_batch(batch.id)
    assert row is not None and row.status == Status.PROCESSING
    assert (row.processed_files, row.failed_files) == (1, 0)  # `a` runs again
