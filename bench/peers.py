"""The comparisons: huey (SqliteHuey, process workers), an ``inotifywait -m`` pipeline,
``xargs -P`` over a tiny script, and a static ``http.server`` floor.

Each runs here in the same way and on the same machine as batchd, in the
same round, so that the ratio is taken between figures measured side by side.
"""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import BENCH, POLL_SECONDS, REPO, wait_until

HUEY_CONSUMER = Path(sys.executable).with_name("huey_consumer")
# huey's consumer defaults (huey/consumer.py): an idle worker polls after
# initial_delay, then backs off by 1.15 per empty poll up to max_delay.
HUEY_INITIAL_DELAY = 0.1
HUEY_MAX_DELAY = 10.0
ORIGINAL_POLL_SECONDS = 5.0


def have_huey() -> bool:
    try:
        import huey  # noqa: F401
    except ImportError:
        return False
    return HUEY_CONSUMER.exists()


def have_inotifywait() -> bool:
    return shutil.which("inotifywait") is not None


class HueyPeer:
    """``huey_consumer bench.hueyapp.huey -w N -k process`` with its SQLite file under ``tmp``."""

    def __init__(self, tmp: Path, workers: int = 2, sync: str = "default") -> None:
        self.db = tmp / f"huey-{sync}.db"
        # Both read when bench.hueyapp is imported (here and in the consumer).
        os.environ["BENCH_HUEY_DB"] = str(self.db)
        os.environ["BENCH_HUEY_SYNC"] = sync
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.log = (tmp / "huey.log").open("wb")
        self.proc = subprocess.Popen(
            [str(HUEY_CONSUMER), "bench.hueyapp.huey", "-w", str(workers), "-k", "process"],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=tmp,
        )
        import importlib

        from bench import hueyapp

        self.app = importlib.reload(hueyapp)  # bind to this round's database file
        # Ready when a first task has gone through (workers started, tables made).
        res = self.app.noop()
        wait_until(
            lambda: res.get() is not None, 60, what="huey consumer start", interval=POLL_SECONDS
        )
        self.app.huey.storage.flush_results()

    def results(self) -> int:
        return int(self.app.huey.storage.result_store_size())

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def huey_overhead(tmp: Path, tasks: int, workers: int = 2, sync: str = "default") -> dict[str, Any]:
    """Enqueue ``tasks`` no-op tasks, time until the last result is stored."""
    peer = HueyPeer(tmp, workers, sync)
    try:
        t0 = time.perf_counter()
        for _ in range(tasks):
            peer.app.noop()
        wait_until(
            lambda: peer.results() >= tasks,
            600,
            what=f"{tasks} huey results",
            interval=POLL_SECONDS,
        )
        elapsed = time.perf_counter() - t0
    finally:
        peer.stop()
    return {
        "tasks": tasks,
        "workers": workers,
        "seconds": round(elapsed, 3),
        "tasks_per_second": round(tasks / elapsed, 1),
    }


def huey_latency(tmp: Path, samples: int, gap: float) -> list[float]:
    """One copy task per sample, ``gap`` s after the previous output: ms until the copy exists."""
    peer = HueyPeer(tmp, 2)
    staging, out = tmp / "h-staging", tmp / "h-out"
    staging.mkdir()
    out.mkdir()
    times = []
    try:
        for i in range(samples):
            src = staging / f"f{i}.csv"
            src.write_bytes(b"a,b\n1,2\n")
            dst = out / src.name
            t0 = time.perf_counter()
            peer.app.copy(str(src), str(dst))
            poll_exists(dst, 60)
            times.append((time.perf_counter() - t0) * 1000)
            time.sleep(gap)
    finally:
        peer.stop()
    return times


def poll_exists(path: Path, timeout: float) -> None:
    """The one way every latency figure is read: stat every 0.2 ms."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.0002)


def inotify_latency(tmp: Path, samples: int, gap: float) -> list[float]:
    """``inotifywait -m`` on an inbox piped to a shell loop that copies each file out: the floor."""
    inbox, out, staging = tmp / "i-inbox", tmp / "i-out", tmp / "i-staging"
    for d in (inbox, out, staging):
        d.mkdir()
    script = (
        f"inotifywait -m -e moved_to --format '%f' {inbox} "
        f'| while IFS= read -r f; do cp "{inbox}/$f" "{out}/$f"; done'
    )
    err = tmp / "inotify.err"
    with err.open("wb") as errf:
        proc = subprocess.Popen(["bash", "-c", script], stderr=errf, start_new_session=True)
    times = []
    try:
        wait_until(
            lambda: b"Watches established" in err.read_bytes(),
            30,
            what="inotifywait ready",
            interval=POLL_SECONDS,
        )
        for i in range(samples):
            src = staging / f"f{i}.csv"
            src.write_bytes(b"a,b\n1,2\n")
            dst = out / src.name
            t0 = time.perf_counter()
            os.rename(src, inbox / src.name)
            poll_exists(dst, 60)
            times.append((time.perf_counter() - t0) * 1000)
            time.sleep(gap)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    return times


def xargs_burn(tmp: Path, inputs: Path, procs: int) -> float:
    """``find | xargs -P procs`` running bench/burn_one.py once per file; wall seconds."""
    out = tmp / "x-out"
    out.mkdir()
    t0 = time.perf_counter()
    subprocess.run(
        f"find {inputs} -type f -print0 | xargs -0 -P {procs} -n 1 "
        f"{sys.executable} {BENCH / 'burn_one.py'} {out}",
        shell=True,
        check=True,
    )
    elapsed = time.perf_counter() - t0
    made = sum(1 for _ in out.iterdir())
    expected = sum(1 for p in inputs.rglob("*") if p.is_file())
    if made != expected:
        raise RuntimeError(f"xargs peer wrote {made} results for {expected} files")
    return elapsed


class StaticHttp:
    """The floor for the API: the same ``http.server`` stack answering pre-rendered bodies."""

    def __init__(self, bodies: dict[str, bytes]) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # As batchd's handler: one buffered write per answer, no Nagle delay.
            wbufsize = 64 * 1024
            disable_nagle_algorithm = True

            def do_GET(self) -> None:
                body = bodies.get(self.path, b'{"success": false}')
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
