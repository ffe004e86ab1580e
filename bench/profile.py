"""Where the time goes: py-spy on the daemon (and its workers) during a no-op run.

``py-spy record --nonblocking --subprocesses --format raw`` samples the
running daemon from outside; the collapsed stacks are reduced to the top
frames by own time (leaf) and by total time (anywhere on the stack), per
process kind (daemon main process or worker).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from bench import daemon as bd

PY_SPY = Path(sys.executable).with_name("py-spy")
# Leaf frames that are a thread blocked in a wait (py-spy --nonblocking
# cannot always tell idle from busy): listed, but left out of "own_busy".
WAITING = (
    "Condition.wait ",
    "_PollLikeSelector.select ",
    "InotifyFD._check_inotify_fd ",
    "wait (multiprocessing",
    "Connection._recv ",
    "select (",
    "Event.wait ",
)


def have_py_spy() -> bool:
    return PY_SPY.exists() or shutil.which("py-spy") is not None


def _frame(raw: str) -> str:
    """``func (path/to/module.py:123)`` -> ``func (module.py)``: lines vary, functions do not."""
    name, _, where = raw.partition(" (")
    file = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{name} ({file})"


def top_frames(raw: Path, limit: int = 15) -> dict[str, Any]:
    own: dict[str, Counter[str]] = {"daemon": Counter(), "workers": Counter()}
    total: dict[str, Counter[str]] = {"daemon": Counter(), "workers": Counter()}
    samples = {"daemon": 0, "workers": 0}
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        # With --subprocesses the first frame names the process.
        head = frames[0]
        kind = "workers" if "spawn_main" in stack or "multiprocessing" in head else "daemon"
        # Keep real frames: "func (file:line)"; drop the process-name pseudo frames.
        frames = [f for f in frames if "(" in f and not _frame(f).endswith(" ()")]
        if not frames:
            continue
        samples[kind] += count
        own[kind][_frame(frames[-1])] += count
        for f in {_frame(f) for f in frames}:
            total[kind][f] += count
    out: dict[str, Any] = {"samples": samples}
    for kind in ("daemon", "workers"):
        n = max(1, samples[kind])
        busy = [(f, c) for f, c in own[kind].most_common() if not f.startswith(WAITING)]
        out[kind] = {
            "own": [(f, round(100 * c / n, 1)) for f, c in own[kind].most_common(limit)],
            "own_busy": [(f, round(100 * c / n, 1)) for f, c in busy[:limit]],
            "total": [(f, round(100 * c / n, 1)) for f, c in total[kind].most_common(limit * 2)],
        }
    return out


def run(folders: int, per_folder: int, loose: bool = False) -> dict[str, Any]:
    """A no-op overhead run under py-spy; its throughput is not a benchmark figure."""
    if not have_py_spy():
        return {"profiled": False, "reason": "py-spy not installed (make bench installs it)"}
    exe = str(PY_SPY if PY_SPY.exists() else shutil.which("py-spy"))
    with tempfile.TemporaryDirectory(prefix="batchd-bench-prof-") as t:
        raw = Path(t) / "profile.txt"
        spy: list[subprocess.Popen[bytes]] = []

        def attach(pid: int) -> None:
            spy.append(
                subprocess.Popen(
                    [
                        *(exe, "record", "--pid", str(pid), "--nonblocking", "--subprocesses"),
                        *("--rate", "250", "--format", "raw", "--output", str(raw)),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=(Path(t) / "py-spy.err").open("wb"),
                )
            )

        figures = bd.throughput(folders, per_folder, 2, loose, tmp=Path(t), on_start=attach)
        for proc in spy:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait(30)
        if not raw.exists():
            err = (Path(t) / "py-spy.err").read_text(errors="replace")[-500:]
            return {"profiled": False, "reason": f"py-spy wrote nothing: {err}"}
        frames = top_frames(raw)
    return {"profiled": True, "run": figures, **frames}
