"""Daemon.problems() (behind /healthz) sees a dead watcher and dead workers."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

from structlog.testing import capture_logs

from batchd.clock import SystemClock
from batchd.config import Priority, Settings
from batchd.daemon import Daemon, build
from batchd.http import HttpServer
from batchd.intake import Intake
from batchd.outbox import Outbox
from batchd.store import SQLiteStore


def healthz(port: int) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_healthz_503_when_watcher_and_workers_die(tmp_path: Path) -> None:
    """Stopping the real watcher thread and SIGKILLing the workers turns /healthz 503."""
    settings = Settings.model_validate(
        {
            "spool": {"root": tmp_path / "spool"},
            "http": {"port": 0},
            "processing": {"concurrency": 2},
        }
    )
    daemon = Daemon(settings)
    daemon.spool.init()
    parts = build(settings, SystemClock(), spool=daemon.spool, metrics=daemon.metrics)
    parts.health = daemon.problems
    store = daemon.store = parts.store
    daemon.pool, daemon.watcher = parts.pool, parts.watcher
    daemon.pool.start()
    daemon.watcher.start()
    server = parts.http
    assert server is not None
    server.start()
    try:
        assert healthz(server.port)[0] == 200
        daemon.watcher.stop()
        for pid in daemon.pool.pids():
            os.kill(pid, signal.SIGKILL)
        # Nothing respawns them until the scheduler's next turn, which this
        # test never runs; wait (with a deadline) for the kills to land.
        deadline = time.monotonic() + 10
        while daemon.pool.alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        status, body = healthz(server.port)
        assert status == 503
        problems = body["problems"]
        assert isinstance(problems, dict)
        assert problems["watcher"] == "watcher thread is not running"
        assert problems["workers"] == "0 of 2 worker processes alive"
    finally:
        server.stop()
        daemon.pool.stop()
        store.close()


def test_claims_wait_and_healthz_says_why_under_the_free_space_floor(tmp_path: Path) -> None:
    """Under limits.min_free_bytes a ready drop stays in the inbox (claim_postponed) and
    /healthz is 503 naming the disk; with the floor lowered the drop is claimed."""
    settings = Settings.model_validate(
        {
            "spool": {"root": tmp_path / "spool"},
            "http": {"port": 0},
            "limits": {"min_free_bytes": 1 << 60},  # more than any disk has free
        }
    )
    daemon = Daemon(settings)
    clock = SystemClock()
    daemon.spool.init()
    store = daemon.store = SQLiteStore(settings.db_path)
    daemon.intake = intake = Intake(
        settings, daemon.spool, store, Outbox(daemon.spool, store), clock
    )
    server = HttpServer(
        settings, store, daemon.spool, intake, daemon.metrics, daemon.problems, clock
    )
    server.start()
    drop = daemon.spool.inbox_for(Priority.NORMAL) / "menu.csv"
    drop.write_bytes(b"name,qty\nmenu,1\n")
    try:
        with capture_logs() as logs:
            assert daemon._take(drop, Priority.NORMAL) is None
        assert drop.exists() and store.list_batches() == []
        postponed = [e for e in logs if e["event"] == "claim_postponed"]
        assert postponed and "limits.min_free_bytes" in postponed[0]["reason"]
        status, body = healthz(server.port)
        assert status == 503
        problems = body["problems"]
        assert isinstance(problems, dict) and "limits.min_free_bytes" in problems["disk"]
        daemon.settings = Settings.model_validate(
            {"spool": {"root": tmp_path / "spool"}, "limits": {"min_free_bytes": 0}}
        )
        assert daemon._take(drop, Priority.NORMAL) is not None
        assert not drop.exists() and len(store.list_batches()) == 1
        assert "disk" not in daemon.problems()
    finally:
        server.stop()
        store.close()
