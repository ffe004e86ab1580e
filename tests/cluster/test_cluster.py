"""Several ``batchd run`` nodes on one spool and one real PostgreSQL database (issue 8).

Each test starts three real daemons (separate processes, separate HTTP ports,
separate node ids) on the same spool folder and the same database schema,
drops real folders into the shared inbox, and checks the end state: every
file exactly once in the database and exactly one result file each, with the
work spread over the nodes. Faults are real: a SIGKILLed node, a PostgreSQL
server stopped and started under the nodes' feet.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from support import DaemonProcess, csv_bytes, drop_folder, wait_until

if TYPE_CHECKING:
    from pgserver import PgServer

# tests/pgserver.py: the session's PostgreSQL server and a fresh schema per test.
pytest_plugins = ["pgserver"]
psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed")

NODES = 3
#: Short leases so a dead node's files come back within seconds.
LEASE_SECONDS = 3.0
HEARTBEAT_SECONDS = 1.0
DEADLINE = 90.0


class Node(DaemonProcess):
    """One cluster node: its own config, log and HTTP port; the shared spool and database."""

    def __init__(self, tmp: Path, name: str, spool: Path, url: str, **sections: Any) -> None:
        base = tmp / name
        base.mkdir()
        merged: dict[str, dict[str, Any]] = {
            "spool": {"root": str(spool)},
            "database": {"url": url},
            "cluster": {
                "node_id": name,
                "lease_seconds": LEASE_SECONDS,
                "heartbeat_seconds": HEARTBEAT_SECONDS,
            },
            "http": {"enabled": True, "port": 0},
            "processing": {"concurrency": 2, "processor": "noop"},
            "log": {"format": "json", "level": "info"},
        }
        for section, keys in sections.items():
            merged.setdefault(section, {}).update(keys)
        super().__init__(base, **merged)
        self.name = name
        self.spool = spool
        self.port_file = base / "port"

    def start(self, wait: bool = True, **extra_env: str) -> Node:
        super().start(wait, BATCHD_PORT_FILE=str(self.port_file), **extra_env)
        return self

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port_file.read_text()}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def completed_ids(self) -> list[str]:
        return [e["file_id"] for e in self.events("file_completed")]


@pytest.fixture
def cluster(tmp_path: Path, pg_url: str) -> Iterator[Callable[..., list[Node]]]:
    """Makes three nodes on tmp_path/spool and one fresh schema; kills leftovers afterwards."""
    made: list[Node] = []

    def make(**sections: Any) -> list[Node]:
        spool = tmp_path / "spool"
        nodes = [Node(tmp_path, f"node{i}", spool, pg_url, **sections) for i in range(1, 4)]
        made.extend(nodes)
        return nodes

    try:
        yield make
    finally:
        for node in made:
            if node.proc is not None and node.proc.poll() is None:
                node.kill()


def start_all(nodes: list[Node], **env: str) -> None:
    for node in nodes:
        node.start(wait=False, **env)
    for node in nodes:
        wait_until(
            lambda n=node: "daemon_started" in n.log() or n.proc.poll() is not None,  # type: ignore[misc]
            60,
            what=f"{node.name} to start",
        )
        assert node.proc is not None and node.proc.poll() is None, node.log()


def drop(nodes: list[Node], folders: int, per_folder: int, tmp: Path, prefix: str = "f") -> None:
    inbox = nodes[0].spool / "inbox" / "normal"
    for f in range(folders):
        files = {f"d{f}/{i:03}.csv": csv_bytes(i) for i in range(per_folder)}
        drop_folder(inbox / f"{prefix}{f:02}", files, tmp / "staging")


def query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[no-any-return]


def all_done(url: str, total: int) -> bool:
    rows = query(
        url,
        "SELECT COUNT(*) FROM batch_files WHERE status IN ('completed', 'failed')",
    )
    return int(rows[0][0]) == total


def result_files(spool: Path) -> list[Path]:
    return sorted((spool / "outbox").glob("*/results/**/*.json"))


def assert_exactly_once(url: str, spool: Path, total: int, batches: int) -> None:
    """Every file completed once in the database, one result file each, batches registered once."""
    rows = query(url, "SELECT status, COUNT(*) FROM batch_files GROUP BY status")
    assert dict(rows) == {"completed": total}
    jobs = query(url, "SELECT name, status FROM batch_jobs ORDER BY name")
    assert len(jobs) == batches
    assert {status for _name, status in jobs} == {"completed"}
    results = result_files(spool)
    assert len(results) == total
    ids = [json.loads(p.read_text())["file_id"] for p in results]
    assert len(set(ids)) == total
    assert list((spool / "inbox" / "normal").iterdir()) == []


def test_three_nodes_process_1000_files_once_each_spread_over_all_nodes(
    cluster: Callable[..., list[Node]], pg_url: str, tmp_path: Path
) -> None:
    """1,000 files in 20 folders on three nodes end with exactly one result each, on all nodes."""
    nodes = cluster()
    start_all(nodes)
    drop(nodes, folders=20, per_folder=50, tmp=tmp_path)
    wait_until(lambda: all_done(pg_url, 1000), DEADLINE, interval=0.5, what="1,000 files")
    assert_exactly_once(pg_url, nodes[0].spool, 1000, 20)
    # A worker logs file_completed right after its commit: the log may trail the database.
    wait_until(
        lambda: sum(len(n.completed_ids()) for n in nodes) >= 1000,
        30,
        what="a file_completed line for every file",
    )
    by_node = {n.name: n.completed_ids() for n in nodes}
    finished = [fid for ids in by_node.values() for fid in ids]
    assert len(finished) == len(set(finished)) == 1000, {k: len(v) for k, v in by_node.items()}
    assert all(by_node.values()), {k: len(v) for k, v in by_node.items()}
    in_db = dict(query(pg_url, "SELECT node_id, COUNT(*) FROM batch_files GROUP BY node_id"))
    assert in_db == {k: len(v) for k, v in by_node.items()}
    status, health = nodes[0].get("/healthz")
    assert status == 200, health
    assert sorted(n["node_id"] for n in health["data"]["nodes"]) == ["node1", "node2", "node3"]
    listed = subprocess.run(
        [sys.executable, "-m", "batchd", "nodes", "--json"],
        env=nodes[1].env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert sorted(n["node_id"] for n in json.loads(listed.stdout)) == ["node1", "node2", "node3"]
    metrics = urllib.request.urlopen(
        f"http://127.0.0.1:{nodes[2].port_file.read_text()}/metrics", timeout=10
    ).read()
    assert b'batchd_node_last_heartbeat_timestamp_seconds{node="node1"}' in metrics
    # A fourth process under a live node's id is refused (exit 78), not let in.
    twin = subprocess.run(
        [sys.executable, "-m", "batchd", "run"],
        env=nodes[0].env(BATCHD_HTTP__ENABLED="false"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert twin.returncode == 78, twin.stderr
    assert "node1" in twin.stderr
    for node in nodes:
        assert node.stop() == 0


def test_sigkilled_node_files_finish_on_the_others_after_the_lease(
    cluster: Callable[..., list[Node]], pg_url: str, tmp_path: Path
) -> None:
    """A SIGKILLed node's running files are requeued by the others after the lease, once each."""
    nodes = cluster(processing={"processor": "batchd.testing.procs:sleepy"})
    start_all(nodes, BATCHD_TEST_DELAY="0.1")
    drop(nodes, folders=4, per_folder=40, tmp=tmp_path)
    victim = nodes[1]

    def victim_running() -> list[str]:
        rows = query(
            pg_url,
            "SELECT id::text FROM batch_files WHERE status = 'processing' AND node_id = 'node2'",
        )
        return [r[0] for r in rows] if len(rows) >= 2 else []

    cut = wait_until(victim_running, 60, interval=0.02, what="node2 to run files")
    victim.kill()
    wait_until(lambda: all_done(pg_url, 160), DEADLINE, interval=0.5, what="160 files")
    assert_exactly_once(pg_url, victim.spool, 160, 4)
    taken_back = query(
        pg_url,
        "SELECT node_id, retry_count FROM batch_files WHERE id = ANY(%s::uuid[])",
        (cut,),
    )
    # Finished by a survivor, without spending a retry.
    assert {node for node, _ in taken_back} <= {"node1", "node3"}
    assert {retries for _, retries in taken_back} == {0}
    survivors = (nodes[0], nodes[2])
    requeued = sum(e["files"] for n in survivors for e in n.events("leases_expired_requeued"))
    assert requeued >= len(cut)
    for node in survivors:
        assert node.stop() == 0


def test_batch_whose_last_commit_a_killed_node_never_derived_is_ended_by_a_live_node(
    cluster: Callable[..., list[Node]], pg_url: str, tmp_path: Path
) -> None:
    """A node killed between its last file's lock-free commit and the batch's derivation:
    a node that was running all along ends the batch (final status.json, input archived)."""
    nodes = cluster(processing={"processor": "batchd.testing.procs:sleepy"})
    victim, survivor = nodes[0], nodes[1]
    # Long enough for the survivor to start (and pass its own recovery) meanwhile.
    victim.start(BATCHD_CRASH_AT="after_file_commit", BATCHD_TEST_DELAY="4")
    drop([victim], folders=1, per_folder=1, tmp=tmp_path)

    def victim_runs() -> bool:
        rows = query(
            pg_url,
            "SELECT 1 FROM batch_files WHERE status = 'processing' AND node_id = 'node1'",
        )
        return bool(rows)

    wait_until(victim_runs, 60, interval=0.05, what="node1 to run the file")
    survivor.start(BATCHD_TEST_DELAY="0.1")
    assert victim.proc is not None
    proc = victim.proc
    wait_until(lambda: proc.poll() is not None, 60, what="node1 to crash after its commit")
    assert proc.returncode == 86, victim.log()[-3000:]
    assert query(pg_url, "SELECT status FROM batch_files") == [("completed",)]

    def ended() -> bool:
        return query(pg_url, "SELECT status FROM batch_jobs") == [("completed",)]

    wait_until(ended, 30, interval=0.2, what=f"the batch to end\n{survivor.log()[-3000:]}")
    status = survivor.wait_batch("f00", 30)
    assert (status["batch"]["status"], status["batch"]["processed_files"]) == ("completed", 1)
    assert survivor.events("abandoned_batch_ended")
    archived = survivor.spool / "archive" / "f00" / "d0" / "000.csv"
    wait_until(archived.exists, 30, what="the input in archive/")
    assert survivor.stop() == 0


def test_database_restart_mid_run_loses_nothing(
    cluster: Callable[..., list[Node]], pg_url: str, pg_server: PgServer, tmp_path: Path
) -> None:
    """With PostgreSQL stopped mid-run, /healthz says 503; restarted, every file completes once."""
    nodes = cluster(processing={"processor": "batchd.testing.procs:sleepy"})
    start_all(nodes, BATCHD_TEST_DELAY="0.05")
    drop(nodes, folders=4, per_folder=40, tmp=tmp_path)
    wait_until(
        lambda: (
            query(pg_url, "SELECT COUNT(*) FROM batch_files WHERE status = 'completed'")[0][0] >= 20
        ),
        60,
        interval=0.05,
        what="the run to be under way",
    )
    pg_server.stop()
    try:
        wait_until(lambda: nodes[0].get("/healthz")[0] == 503, 30, what="/healthz to report 503")
        # A drop made while the database is away waits in the inbox, and runs once it is back.
        drop(nodes, folders=1, per_folder=10, tmp=tmp_path, prefix="late")
        wait_until(
            lambda: any(n.events("claim_postponed") for n in nodes), 30, what="a postponed claim"
        )
    finally:
        pg_server.start()
    wait_until(lambda: all_done(pg_url, 170), DEADLINE, interval=0.5, what="170 files")
    assert_exactly_once(pg_url, nodes[0].spool, 170, 5)
    wait_until(lambda: nodes[0].get("/healthz")[0] == 200, 30, what="/healthz back to 200")
    assert any(n.events("database_unavailable") for n in nodes)
    for node in nodes:
        assert node.stop() == 0
