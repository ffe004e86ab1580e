"""Issue 15's peer: the stack a user would build instead of batchd.

A watchdog ``Observer`` on ``<root>/inbox`` (recursive, so ``high``,
``normal`` and ``low`` and every folder dropped into them), one huey
``SqliteHuey`` task per new file (``bench.hueyapp.process_file``), and
``huey_consumer bench.hueyapp.huey -k process -w 2`` running them. Each task
does the file work batchd does for a no-op processor: read the input and
hash it (sha256), write a JSON result under a temporary name, fsync it,
rename it into ``<root>/outbox/``, and rename the input into
``<root>/archive/``.

Settling is done the simple way a user would: a folder renamed into an
inbox is complete (every file in it becomes a task at once), and a loose
file renamed in is complete. The benchmark drops exactly as it drops to
batchd (``bench.common.drop_all``: one rename per folder or file).

    python -m bench.peerstack watch <root>   # the watcher process (prints "ready")
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchd.testing import wait_until
from bench.common import POLL_SECONDS, REPO, drop_all, make_drops
from bench.peers import HueyPeer

PRIORITIES = ("high", "normal", "low")


def file_work(path: Path, root: Path) -> int:
    """batchd's per-file work, by hand: hash, durable JSON result, input archived."""
    rel = path.relative_to(root / "inbox")
    data = path.read_bytes()
    result = {
        "file": str(rel),
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "status": "completed",
    }
    name = str(rel).replace("/", "__") + ".json"
    tmp = root / "outbox" / f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, json.dumps(result).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, root / "outbox" / name)
    target = root / "archive" / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(path, target)
    return 1


def make_root(root: Path) -> None:
    for p in PRIORITIES:
        (root / "inbox" / p).mkdir(parents=True, exist_ok=True)
    (root / "outbox").mkdir(exist_ok=True)
    (root / "archive").mkdir(exist_ok=True)


def watch(root: Path) -> None:
    """The watcher process: every file renamed or created into an inbox becomes one task."""
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    from bench.hueyapp import process_file

    inboxes = {str(root / "inbox" / p) for p in PRIORITIES}

    def enqueue(path: str) -> None:
        process_file(path, str(root))

    class Handler(FileSystemEventHandler):
        def on_created(self, event: FileSystemEvent) -> None:
            self.arrived(os.fsdecode(event.src_path), event.is_directory)

        def on_moved(self, event: FileSystemEvent) -> None:
            self.arrived(os.fsdecode(event.dest_path), event.is_directory)

        def arrived(self, path: str, is_dir: bool) -> None:
            # Only what lands directly in an inbox: a folder's files are taken by
            # walking the folder once (it is complete when renamed in), so the
            # events watchdog makes up for its contents are left alone.
            if os.path.dirname(path) not in inboxes:
                return
            if not is_dir:
                enqueue(path)
                return
            for top, _dirs, files in os.walk(path):
                for name in sorted(files):
                    enqueue(os.path.join(top, name))

    observer = Observer()
    observer.schedule(Handler(), str(root / "inbox"), recursive=True)
    observer.start()
    print("ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    observer.stop()
    observer.join()


class Watcher:
    """``python -m bench.peerstack watch <root>`` as a child; ready once it printed so."""

    def __init__(self, root: Path, log: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.out = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.peerstack", "watch", str(root)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=self.out,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until ready (or exit: b"")
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError(f"peer watcher did not start:\n{log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()


def count_files(path: Path) -> int:
    return sum(len(files) for _top, _dirs, files in os.walk(path))


def run(tmp: Path, folders: int, per_folder: int, loose: bool, workers: int = 2) -> dict[str, Any]:
    """``folders x per_folder`` files (or as many loose files) through the stack: files/s
    from the first rename into the inbox to the last task's result stored."""
    total = folders * per_folder
    base = tmp / f"peerstack-{'loose' if loose else 'folders'}"
    root = base / "root"
    make_root(root)
    drops = make_drops(base / "staging", folders, per_folder, loose)
    consumer = HueyPeer(base, workers)
    watcher: Watcher | None = None
    try:
        watcher = Watcher(root, base / "watcher.log")
        done: Callable[[], bool] = lambda: consumer.results() >= total  # noqa: E731
        t0 = time.perf_counter()
        drop_all(drops, root / "inbox" / "normal")
        wait_until(done, 600, what=f"{total} peer-stack tasks", interval=POLL_SECONDS)
        elapsed = time.perf_counter() - t0
    finally:
        if watcher is not None:
            watcher.stop()
        consumer.stop()
    results, archived = count_files(root / "outbox"), count_files(root / "archive")
    if results != total or archived != total:
        raise RuntimeError(f"peer stack: {results} results, {archived} archived of {total} files")
    return {
        "files": total,
        "loose": loose,
        "workers": workers,
        "seconds": round(elapsed, 3),
        "files_per_second": round(total / elapsed, 1),
    }


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "watch":
        watch(Path(argv[1]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
