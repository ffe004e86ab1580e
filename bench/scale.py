"""Scale: ``folders x 50`` real files dropped at once into a running daemon.

Measured with the real daemon (no-op processor, 2 workers, HTTP on):

* registration rate: first rename until every file has its row;
* daemon RSS (``VmHWM``), and the workers' separately;
* HTTP list/detail times with every row in the database, processing running;
* dispatch as the queue drains: files/s and service time per slice of the
  drain, by queue depth. The drain runs until done or ``drain_cap`` seconds;
  then a SIGKILL with the rest pending, a restart (recovery time: ``batchd
  run`` until ``daemon_started``), and a window of dispatches after it;
* ``status.json`` writes and bytes (``inotifywait -m -r`` on the outbox);
* the next-file query itself at each tenth of the queue depth, through the
  store's own ``claim_next`` on a copy of the database.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import peers
from bench.common import POLL_SECONDS, Daemon, children, median, vm_hwm_kib, wait_until, write_small
from bench.httpload import timed_get

PER_FOLDER = 50


def _parse(ts: str) -> float:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def _make(staging: Path, folders: int) -> None:
    for f in range(folders):
        d = staging / f"s{f:05}"
        d.mkdir(parents=True)
        for i in range(PER_FOLDER):
            write_small(d / f"f{i:03}.csv", b"a,b\n1,2\n")


class _Rss:
    """Peak RSS of the daemon and of its workers, sampled from /proc while it runs."""

    def __init__(self) -> None:
        self.daemon_kib = 0
        self.worker_kib = 0

    def sample(self, pid: int) -> None:
        self.daemon_kib = max(self.daemon_kib, vm_hwm_kib(pid))
        for child in children(pid):
            self.worker_kib = max(self.worker_kib, vm_hwm_kib(child))


def _slices(conn: sqlite3.Connection, total: int, parts: int = 10) -> list[dict[str, Any]]:
    """Processed files in claim order, cut in ``parts``: depth, files/s, service ms."""
    rows = conn.execute(
        "SELECT started_at, completed_at FROM batch_files"
        " WHERE status='completed' ORDER BY started_at"
    ).fetchall()
    out: list[dict[str, Any]] = []
    if len(rows) < parts * 2:
        return out
    size = len(rows) // parts
    for k in range(parts):
        chunk = rows[k * size : (k + 1) * size]
        starts = [_parse(r[0]) for r in chunk]
        ends = [_parse(r[1]) for r in chunk]
        span = max(ends) - min(starts)
        out.append(
            {
                "queue_depth_at_start": total - k * size,
                "files": len(chunk),
                "files_per_second": round(len(chunk) / span, 1) if span > 0 else None,
                "service_ms_median": round(
                    median((e - s) * 1000 for s, e in zip(starts, ends, strict=True)), 2
                ),
            }
        )
    return out


def _claim_probe(db: Path, total: int, per_step: int = 200) -> list[dict[str, Any]]:
    """``claim_next`` latency at 100 %, 90 %, ... 10 % of ``total`` pending (a copy of the DB)."""
    from batchd.clock import SystemClock
    from batchd.daemon import build
    from batchd.testing.settings import make_settings

    conn = sqlite3.connect(db, timeout=30)
    conn.execute("UPDATE batch_files SET status='pending' WHERE status='processing'")
    pending = conn.execute("SELECT COUNT(*) FROM batch_files WHERE status='pending'").fetchone()[0]
    # Top the queue up to ``total`` pending rows, whatever the drain reached.
    conn.execute(
        "UPDATE batch_files SET status='pending', started_at=NULL, completed_at=NULL"
        " WHERE id IN (SELECT id FROM batch_files WHERE status!='pending' LIMIT ?)",
        (max(0, total - pending),),
    )
    conn.commit()
    # The daemon's own assembly over the copy (nothing started); only its store is used.
    probe = db.parent / "probe"
    probe.mkdir(exist_ok=True)
    store = build(make_settings(probe, database__path=str(db)), SystemClock()).store
    out = []
    try:
        for tenth in range(10, 0, -1):
            depth = total * tenth // 10
            have = conn.execute(
                "SELECT COUNT(*) FROM batch_files WHERE status='pending'"
            ).fetchone()[0]
            conn.execute(
                "UPDATE batch_files SET status='completed' WHERE id IN (SELECT id FROM"
                " batch_files WHERE status='pending' ORDER BY priority_rank, seq LIMIT ?)",
                (max(0, have - depth),),
            )
            conn.commit()
            times = []
            for _ in range(per_step):
                t0 = time.perf_counter()
                store.claim_next(datetime.now(UTC))
                times.append((time.perf_counter() - t0) * 1000)
            out.append(
                {
                    "pending": depth,
                    "claim_ms_median": round(median(times), 3),
                    "claim_ms_max": round(max(times), 3),
                }
            )
    finally:
        store.close()
        conn.close()
    return out


def _watch_status(outbox: Path, tmp: Path) -> subprocess.Popen[bytes] | None:
    if not peers.have_inotifywait():
        return None
    err = tmp / "status-watch.err"
    proc = subprocess.Popen(
        ["inotifywait", "-m", "-r", "-e", "moved_to", "--format", "%w%f", str(outbox)],
        stdout=(tmp / "status-watch.out").open("wb"),
        stderr=err.open("wb"),
    )
    wait_until(
        lambda: b"Watches established" in err.read_bytes(),
        60,
        what="inotifywait -r ready",
        interval=POLL_SECONDS,
    )
    return proc


def _status_volume(tmp: Path, files: int) -> dict[str, Any]:
    out = tmp / "status-watch.out"
    if not out.exists():
        return {"measured": False}
    writes = 0
    nbytes = 0
    sizes: dict[str, int] = {}
    for line in out.read_text(errors="replace").splitlines():
        if not line.endswith("/status.json"):
            continue
        writes += 1
        if line not in sizes:
            try:
                sizes[line] = os.stat(line).st_size
            except OSError:
                sizes[line] = 0
        nbytes += sizes[line]
    return {
        "measured": True,
        "writes": writes,
        "approx_mib": round(nbytes / 2**20, 1),
        "writes_per_file": round(writes / files, 3) if files else None,
        "note": "at least (inotifywait -r can miss the first write in a new folder);"
        " bytes = writes x each status.json's final size",
    }


def run(folders: int, drain_cap: float, after_restart: float = 15.0) -> dict[str, Any]:
    total = folders * PER_FOLDER
    result: dict[str, Any] = {"files": total, "layout": f"{folders} folders x {PER_FOLDER}"}
    with tempfile.TemporaryDirectory(prefix="batchd-bench-scale-") as t:
        tmp = Path(t)
        staging = tmp / "staging"
        c0 = time.perf_counter()
        _make(staging, folders)
        result["create_files_s"] = round(time.perf_counter() - c0, 1)
        daemon = Daemon(
            tmp,
            BATCHD_HTTP__ENABLED="true",
            BATCHD_HTTP__PORT="0",
            BATCHD_PROCESSING__CONCURRENCY="2",
        ).start()
        watcher = _watch_status(daemon.spool / "outbox", tmp)
        rss = _Rss()
        db = daemon.db()
        done_sql = "SELECT COUNT(*) FROM batch_files WHERE status IN ('completed','failed')"
        try:
            t0 = time.perf_counter()
            for d in sorted(staging.iterdir()):
                os.rename(d, daemon.inbox("normal") / d.name)
            result["rename_s"] = round(time.perf_counter() - t0, 2)
            timeline = []
            while True:
                (registered,) = db.execute("SELECT COUNT(*) FROM batch_files").fetchone()
                (done,) = db.execute(done_sql).fetchone()
                rss.sample(daemon.pid)
                timeline.append((round(time.perf_counter() - t0, 1), registered, done))
                if registered >= total:
                    break
                if time.perf_counter() - t0 > 900:
                    raise TimeoutError(f"registration stuck at {registered} of {total}")
                time.sleep(0.5)
            reg_s = time.perf_counter() - t0
            result["registration"] = {
                "seconds": round(reg_s, 1),
                "files_per_second": round(total / reg_s, 1),
                "done_meanwhile": done,
            }
            port = daemon.http_port()
            (batch_id,) = db.execute(
                "SELECT id FROM batch_jobs ORDER BY created_at DESC LIMIT 1"
            ).fetchone()
            result["http_with_all_rows"] = {
                "list": timed_get(port, "/api/batch/jobs?limit=50", 30),
                "list_pending": timed_get(port, "/api/batch/jobs?limit=50&status=pending", 30),
                "detail": timed_get(port, f"/api/batch/jobs/{batch_id}", 30),
            }
            while True:
                (done,) = db.execute(done_sql).fetchone()
                rss.sample(daemon.pid)
                elapsed = time.perf_counter() - t0
                if len(timeline) % 10 == 0:
                    timeline.append((round(elapsed, 1), total, done))
                if done >= total or elapsed - reg_s > drain_cap:
                    break
                time.sleep(0.5)
            result["drain"] = {
                "seconds_after_registration": round(elapsed - reg_s, 1),
                "done": done,
                "complete": done >= total,
            }
            result["rss_mib"] = {
                "daemon_peak": round(rss.daemon_kib / 1024, 1),
                "worker_peak": round(rss.worker_kib / 1024, 1),
                "target_daemon": 150,
            }
            result["slices_first_run"] = _slices(db, total)
            db.close()
            if done < total:
                daemon.kill()
                pending = daemon.count_files("pending") + daemon.count_files("processing")
                daemon.start(idle_seconds=0)
                result["recovery"] = {
                    "pending_rows": pending,
                    "start_to_daemon_started_s": round(daemon.started_in, 2),
                    "target_s": 5,
                }
                rss.daemon_kib = 0
                before = daemon.count_files("completed")
                deadline = time.monotonic() + after_restart
                while time.monotonic() < deadline:
                    rss.sample(daemon.pid)
                    time.sleep(0.5)
                got = daemon.count_files("completed") - before
                result["after_restart"] = {
                    "window_s": after_restart,
                    "files": got,
                    "files_per_second": round(got / after_restart, 1),
                    "daemon_rss_peak_mib": round(rss.daemon_kib / 1024, 1),
                }
            result["timeline_s_registered_done"] = timeline[:: max(1, len(timeline) // 40)]
        finally:
            daemon.stop()
            if watcher is not None:
                watcher.terminate()
                watcher.wait(30)
        done_total = daemon.count_files("completed") + daemon.count_files("failed")
        result["files_done_total"] = done_total
        result["status_json"] = _status_volume(tmp, done_total)
        copy = tmp / "probe.db"
        with sqlite3.connect(daemon.db_path) as src, sqlite3.connect(copy) as dst:
            src.backup(dst)
        result["claim_next_by_depth"] = _claim_probe(copy, total)
        shutil.rmtree(daemon.spool, ignore_errors=True)
    return result
