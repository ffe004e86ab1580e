"""Cluster correctness on the real PostgreSQL (issue 16): fencing and status.json ordering.

Three real nodes on one spool and one database, as in test_cluster.py. A
node that lost its lease (stopped with SIGSTOP, or cut off by a database
outage longer than the lease) must not record its old outcome over the
attempt that took the file over, and the last status.json of every batch
must match the database.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from support import wait_until
from test_cluster import (
    DEADLINE,
    LEASE_SECONDS,
    Node,
    all_done,
    cluster,
    drop,
    query,
    result_files,
    start_all,
)

if TYPE_CHECKING:
    from pgserver import PgServer

pytest_plugins = ["pgserver"]
psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed")

__all__ = ["cluster"]  # the fixture, re-exported for pytest

#: The disk load of the status.json test: at most this long, this many MiB a write.
LOAD_MAX_SECONDS = 180.0
LOAD_CHUNK_MIB = 4
#: Files of the outage test (in four folders).
FILES = 48


def test_outcome_of_a_node_whose_lease_was_taken_over_is_rejected(
    cluster: Callable[..., list[Node]], pg_url: str, tmp_path: Path
) -> None:
    """A node frozen past its lease reports after another node took the file: it is dropped."""
    nodes = cluster(processing={"processor": "batchd.testing.procs:gated", "concurrency": 1})
    gates = tmp_path / "gates"
    gates.mkdir()
    start_all(nodes, BATCHD_TEST_STATE=str(gates))
    drop(nodes, folders=1, per_folder=1, tmp=tmp_path)
    wait_until(lambda: (gates / "started-1").exists(), 60, what="attempt 1 to start")
    owner_name = query(pg_url, "SELECT node_id FROM batch_files")[0][0]
    owner = next(n for n in nodes if n.name == owner_name)
    # The daemon stops heart-beating; its worker (its own process group) runs on.
    owner.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: (gates / "started-2").exists(), 60, what="another node to take over")
        (taker_name,) = query(pg_url, "SELECT node_id FROM batch_files")[0]
        assert taker_name != owner_name
        # The frozen node's worker finishes attempt 1 and reports into its pipe.
        (gates / "release-1").touch()
        wait_until(lambda: result_files(owner.spool), 30, what="attempt 1's result file")
    finally:
        owner.signal(signal.SIGCONT)
    wait_until(
        lambda: owner.events("outcome_superseded"), 30, what=f"outcome_superseded\n{owner.log()}"
    )
    status, node = query(pg_url, "SELECT status, node_id FROM batch_files")[0]
    assert (status, node) == ("processing", taker_name), "the old outcome was recorded"
    assert any((owner.spool / "work").rglob("000.csv")), "the input was moved under attempt 2"
    (gates / "release-2").touch()
    wait_until(lambda: all_done(pg_url, 1), DEADLINE, interval=0.2, what="the file to finish")
    status, result, node = query(pg_url, "SELECT status, result::text, node_id FROM batch_files")[0]
    assert (status, json.loads(result), node) == ("completed", {"attempt": 2}, taker_name)
    (doc,) = [json.loads(p.read_text()) for p in result_files(owner.spool)]
    assert (doc["status"], doc["result"]) == ("completed", {"attempt": 2})
    # The input move and the log line follow the commit (in the worker that made it).
    wait_until(
        lambda: [p.name for p in (owner.spool / "archive").rglob("*.csv")] == ["000.csv"],
        30,
        what="the input in archive/",
    )
    wait_until(
        lambda: sum(len(n.completed_ids()) for n in nodes) == 1, 30, what="file_completed logged"
    )
    assert not any(n.events("file_failed") for n in nodes)
    assert sum(len(n.completed_ids()) for n in nodes) == 1
    for n in nodes:
        assert n.stop() == 0


def test_outage_longer_than_the_lease_without_kept_inputs_completes_every_file_once(
    cluster: Callable[..., list[Node]], pg_url: str, pg_server: PgServer, tmp_path: Path
) -> None:
    """PostgreSQL away past the lease, keep_inputs=false: each file completed once, result whole."""
    nodes = cluster(processing={"processor": "batchd.testing.procs:sleepy"})
    # Node's own ``spool`` argument is the folder: the setting goes by environment.
    # A second a file: a re-run of a taken-back file is still running when the
    # node that lost it reconnects and reports its old outcome.
    start_all(nodes, BATCHD_TEST_DELAY="1.0", BATCHD_SPOOL__KEEP_INPUTS="false")
    drop(nodes, folders=4, per_folder=FILES // 4, tmp=tmp_path)
    wait_until(
        lambda: (
            query(pg_url, "SELECT COUNT(*) FROM batch_files WHERE status = 'completed'")[0][0] >= 6
        ),
        60,
        interval=0.05,
        what="the run to be under way",
    )
    late = nodes[0]
    running = [
        r[0]
        for r in query(
            pg_url,
            "SELECT id::text FROM batch_files WHERE status = 'processing' AND node_id = %s",
            (late.name,),
        )
    ]
    pg_server.stop()
    # Longer than the lease: every lease has expired when the nodes reconnect.
    outage_ends = time.monotonic() + 2 * LEASE_SECONDS + 1
    try:
        wait_until(
            lambda: (
                time.monotonic() >= outage_ends
                and all(n.events("database_unavailable") for n in nodes)
            ),
            60,
            interval=0.2,
            what="an outage past the lease, seen by every node",
        )
        # One node comes back last (a longer back-off): the others take its
        # files back first. Its workers run on and finish their files.
        late.signal(signal.SIGSTOP)
    finally:
        pg_server.start()
    try:
        # Until another node runs one of the late node's files again.
        wait_until(
            lambda: query(
                pg_url,
                "SELECT 1 FROM batch_files WHERE id = ANY(%s::uuid[])"
                " AND status = 'processing' AND node_id <> %s",
                (running, late.name),
            ),
            60,
            interval=0.05,
            what="another node to run one of the late node's files again",
        )
    finally:
        late.signal(signal.SIGCONT)
    wait_until(lambda: all_done(pg_url, FILES), DEADLINE, interval=0.5, what=f"{FILES} files")
    rows = query(pg_url, "SELECT status, COUNT(*) FROM batch_files GROUP BY status")
    assert dict(rows) == {"completed": FILES}, rows
    jobs = query(pg_url, "SELECT status, COUNT(*) FROM batch_jobs GROUP BY status")
    assert dict(jobs) == {"completed": 4}
    docs = [json.loads(p.read_text()) for p in result_files(nodes[0].spool)]
    assert len(docs) == FILES
    assert len({d["file_id"] for d in docs}) == FILES
    assert {d["status"] for d in docs} == {"completed"}
    assert all(d["result"] and d["result"]["name"] == Path(d["relpath"]).name for d in docs)
    leftovers = [p for p in (nodes[0].spool / "work").rglob("*") if p.is_file()]
    assert leftovers == []
    assert late.events("outcome_superseded"), "the late node's old outcomes were not refused"
    assert not any(n.events("file_failed") for n in nodes)
    for n in nodes:
        assert n.stop() == 0


def _disk_load(folder: Path, stop: threading.Event) -> None:
    """Write and fsync chunks until told to stop (or LOAD_MAX_SECONDS pass)."""
    folder.mkdir(exist_ok=True)
    chunk = os.urandom(LOAD_CHUNK_MIB * 1024 * 1024)
    ends = time.monotonic() + LOAD_MAX_SECONDS
    i = 0
    while not stop.is_set() and time.monotonic() < ends:
        path = folder / f"load-{i % 4}"
        with path.open("wb") as fh:
            fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        i += 1


def _mismatches(url: str, spool: Path) -> list[str]:
    """Batches whose status.json does not say what the database says."""
    out = []
    for bid, name, status, done, failed in query(
        url, "SELECT id::text, name, status, processed_files, failed_files FROM batch_jobs"
    ):
        try:
            doc: dict[str, Any] = json.loads((spool / "outbox" / name / "status.json").read_text())
        except (OSError, ValueError) as exc:
            out.append(f"{name}: {exc}")
            continue
        head = doc["batch"]
        got = (head["id"], head["status"], head["processed_files"], head["failed_files"])
        if got != (bid, status, done, failed) or any(
            f["status"] != "completed" for f in doc["files"]
        ):
            out.append(f"{name}: status.json {got[1:]}, database {(status, done, failed)}")
    return out


def test_status_json_matches_the_database_after_batches_end_on_three_nodes_at_once(
    cluster: Callable[..., list[Node]], pg_url: str, tmp_path: Path
) -> None:
    """150 two-file batches ending on three nodes under disk load: every status.json is final."""
    nodes = cluster(processing={"processor": "noop", "status_interval_seconds": 0.01})
    start_all(nodes)
    stop = threading.Event()
    load = threading.Thread(target=_disk_load, args=(tmp_path / "load", stop), daemon=True)
    load.start()
    try:
        drop(nodes, folders=150, per_folder=2, tmp=tmp_path)
        wait_until(lambda: all_done(pg_url, 300), DEADLINE * 2, interval=0.5, what="300 files")
    finally:
        stop.set()
        load.join(60)
    # Each node writes its documents after its commit: give the last ones a moment.
    try:
        wait_until(lambda: not _mismatches(pg_url, nodes[0].spool), 30, interval=0.5)
    except AssertionError:
        pytest.fail("\n".join(_mismatches(pg_url, nodes[0].spool)))
    docs = [
        json.loads((nodes[0].spool / "outbox" / name / "status.json").read_text())
        for (name,) in query(pg_url, "SELECT name FROM batch_jobs")
    ]
    versions = dict(query(pg_url, "SELECT name, version FROM batch_jobs"))
    assert all(d["version"] == versions[d["batch"]["name"]] for d in docs)
    for n in nodes:
        assert n.stop() == 0
