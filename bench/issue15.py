"""Issue 15's scenarios: is the daemon the bottleneck? (``--only peer15,daemon_cpu,floor``)

* ``peer15``: batchd against the watchdog + huey stack a user would build
  instead (bench/peerstack.py), on files in folders and on loose files, plus
  raw huey no-op tasks/s as a reference line;
* ``daemon_cpu``: CPU seconds the daemon process spends per file (utime +
  stime from /proc, all its threads) and, apart, its worker processes, with
  the no-op processor, 1 and 2 workers, folders and loose; files/s of each;
* ``floor``: the same filesystem and SQLite operations done by a minimal
  script (bench/floor.py), 1 and 2 processes; batchd / floor.

Everything is measured from outside: the CLI (``batchd run``), the spool,
the database file and /proc, so the same scenarios measure later designs.
(The HTTP and scale-out parts of the issue are in scenarios.http and
cluster.scaleout.)
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import floor as floor_script
from bench import peers, peerstack
from bench.common import Daemon, drop_all, make_drops, median

TARGET_RATIO_VS_PEER = 1.5
TARGET_DAEMON_CPU_MS = 0.5
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _med(rounds: list[dict[str, Any]], key: str) -> float:
    return round(median(r[key] for r in rounds), 3)


def _batchd_fps(tmp: Path, folders: int, per_folder: int, loose: bool, workers: int = 2) -> float:
    from bench import daemon as bd

    return float(bd.throughput(folders, per_folder, workers, loose, tmp=tmp)["files_per_second"])


def peer15(rounds: int, folders: int, per_folder: int, workers: int = 2) -> dict[str, Any]:
    """batchd (no-op processor) vs watchdog + huey doing the file work, side by side per round."""
    total = folders * per_folder
    per_round = []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="batchd-bench-") as t:
            tmp = Path(t)
            row: dict[str, Any] = {
                "batchd_folders_fps": _batchd_fps(tmp, folders, per_folder, False, workers),
                "batchd_loose_fps": _batchd_fps(tmp, folders, per_folder, True, workers),
            }
            if peers.have_huey():
                row["stack_folders_fps"] = peerstack.run(tmp, folders, per_folder, False, workers)[
                    "files_per_second"
                ]
                row["stack_loose_fps"] = peerstack.run(tmp, folders, per_folder, True, workers)[
                    "files_per_second"
                ]
                row["huey_noop_tps"] = peers.huey_overhead(tmp, total, workers)["tasks_per_second"]
            per_round.append(row)
    out: dict[str, Any] = {
        "files": total,
        "layout": f"{folders} folders x {per_folder}, then {total} loose files",
        "workers": workers,
        "rounds": per_round,
        "batchd_folders_fps": _med(per_round, "batchd_folders_fps"),
        "batchd_loose_fps": _med(per_round, "batchd_loose_fps"),
        "target": f"batchd files/s >= {TARGET_RATIO_VS_PEER} x the watchdog + huey stack's",
    }
    if not all("stack_folders_fps" in r for r in per_round):
        out["skipped_peer"] = "huey is not installed (pip install -e '.[bench]')"
        return out
    for key in ("stack_folders_fps", "stack_loose_fps", "huey_noop_tps"):
        out[key] = _med(per_round, key)
    out["ratio_folders"] = round(out["batchd_folders_fps"] / out["stack_folders_fps"], 2)
    out["ratio_loose"] = round(out["batchd_loose_fps"] / out["stack_loose_fps"], 2)
    out["met"] = min(out["ratio_folders"], out["ratio_loose"]) >= TARGET_RATIO_VS_PEER
    return out


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime + stime of the process, all threads; cutime + cstime of its reaped children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is fields[0], so utime/stime/cutime/cstime are 11..14.
    own = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    reaped = (int(fields[13]) + int(fields[14])) / CLOCK_TICKS
    return own, reaped


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (workers, and whatever a later design starts)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def _tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (own + reaped children) of every live descendant, by pid."""
    out = {}
    for kid in descendants(pid):
        try:
            own, reaped = cpu_seconds(kid)
        except (OSError, IndexError):
            continue
        out[kid] = own + reaped
    return out


def _cpu_per_file(daemon: Daemon, files: int, run: Callable[[], None]) -> dict[str, Any]:
    """``run()`` (it drops ``files`` files and waits for them): files/s, and the
    daemon's and its workers' CPU ms per file meanwhile."""
    own0, reaped0 = cpu_seconds(daemon.pid)
    kids0 = _tree_cpu(daemon.pid)
    t0 = time.perf_counter()
    run()
    elapsed = time.perf_counter() - t0
    own1, reaped1 = cpu_seconds(daemon.pid)
    kids1 = _tree_cpu(daemon.pid)
    completed = daemon.count_files("completed")
    if completed != files:
        raise RuntimeError(f"daemon_cpu: only {completed} of {files} files completed")
    # Workers: what live ones spent since the start (new ones: all of it), plus
    # what replaced, reaped ones had spent (the daemon's cutime + cstime).
    kids = sum(v - kids0.get(pid, 0.0) for pid, v in kids1.items()) + (reaped1 - reaped0)
    return {
        "files_per_second": round(files / elapsed, 1),
        "daemon_ms_per_file": round((own1 - own0) * 1000 / files, 3),
        "workers_ms_per_file": round(kids * 1000 / files, 3),
    }


def daemon_cpu_run(
    tmp: Path, folders: int, per_folder: int, workers: int, loose: bool
) -> dict[str, Any]:
    """One drop of ``folders x per_folder`` no-op files: daemon and worker CPU ms per file."""
    total = folders * per_folder
    with tempfile.TemporaryDirectory(dir=tmp) as t:
        daemon = Daemon(Path(t), BATCHD_PROCESSING__CONCURRENCY=str(workers)).start()
        drops = make_drops(Path(t) / "staging", folders, per_folder, loose)

        def run() -> None:
            drop_all(drops, daemon.inbox("normal"))
            daemon.wait_done(total, 600)

        try:
            return _cpu_per_file(daemon, total, run)
        finally:
            daemon.stop()


#: Loose files written into the inbox one by one, at this pace, in
#: daemon_cpu's "trickle" case: drops arriving while others settle.
TRICKLE_FILES_PER_SECOND = 300.0


def daemon_cpu_trickle_run(tmp: Path, files: int, workers: int) -> dict[str, Any]:
    """``files`` loose files written straight into the inbox (open, write, close)
    at TRICKLE_FILES_PER_SECOND, with the default ``watch.settle_seconds``:
    daemon and worker CPU ms per file while drops keep arriving as others
    settle (the readiness work grows with the drops waiting, issue 15)."""
    from batchd.config import WatchSettings

    settle = str(WatchSettings().settle_seconds)
    with tempfile.TemporaryDirectory(dir=tmp) as t:
        daemon = Daemon(
            Path(t),
            BATCHD_PROCESSING__CONCURRENCY=str(workers),
            BATCHD_WATCH__SETTLE_SECONDS=settle,
        ).start()
        inbox = daemon.inbox("normal")

        def run() -> None:
            t0 = time.perf_counter()
            for i in range(files):
                (inbox / f"t{i:05d}.csv").write_bytes(b"id,qty\n1,2\n")
                # Pacing, not synchronisation: the writer's schedule is the scenario.
                ahead = t0 + (i + 1) / TRICKLE_FILES_PER_SECOND - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
            daemon.wait_done(files, 600)

        try:
            return {**_cpu_per_file(daemon, files, run), "settle_seconds": float(settle)}
        finally:
            daemon.stop()


def daemon_cpu(rounds: int, folders: int, per_folder: int) -> dict[str, Any]:
    """Daemon CPU per file and files/s, no-op processor: folders and loose, 1 and 2 workers."""
    cases = [(w, loose) for w in (1, 2) for loose in (False, True)]
    per_round: list[dict[str, Any]] = []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="batchd-bench-") as t:
            row = {}
            for w, loose in cases:
                label = f"{'loose' if loose else 'folders'}-{w}w"
                row[label] = daemon_cpu_run(Path(t), folders, per_folder, w, loose)
            row["trickle-2w"] = daemon_cpu_trickle_run(Path(t), folders * per_folder, 2)
            per_round.append(row)
    out: dict[str, Any] = {
        "files": folders * per_folder,
        "rounds": per_round,
        "target": f"daemon CPU <= {TARGET_DAEMON_CPU_MS} ms per file; files/s grows with workers",
        "clock_tick_ms": round(1000 / CLOCK_TICKS, 1),
    }
    for label in per_round[0]:
        out[label] = {
            k: round(median(r[label][k] for r in per_round), 3)
            for k in ("files_per_second", "daemon_ms_per_file", "workers_ms_per_file")
        }
    # The target is the no-op drops (folders, loose); the trickle is
    # reported beside them.
    out["met"] = all(
        out[label]["daemon_ms_per_file"] <= TARGET_DAEMON_CPU_MS
        for label in per_round[0]
        if not label.startswith("trickle")
    )
    return out


def floor(rounds: int, files: int, workers: int = 2) -> dict[str, Any]:
    """bench/floor.py with 1 and 2 processes against batchd (2 workers, no-op), per round."""
    folders, per_folder = files // 50, 50
    per_round = []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="batchd-bench-") as t:
            tmp = Path(t)
            per_round.append(
                {
                    "floor_1p_fps": floor_script.run(files, 1, tmp)["files_per_second"],
                    "floor_2p_fps": floor_script.run(files, 2, tmp)["files_per_second"],
                    "batchd_folders_fps": _batchd_fps(tmp, folders, per_folder, False, workers),
                    "batchd_loose_fps": _batchd_fps(tmp, folders, per_folder, True, workers),
                }
            )
    out: dict[str, Any] = {"files": folders * per_folder, "workers": workers, "rounds": per_round}
    for key in per_round[0]:
        out[key] = _med(per_round, key)
    best = max(out["floor_1p_fps"], out["floor_2p_fps"])
    out["floor_best_fps"] = best
    out["ratio_folders"] = round(out["batchd_folders_fps"] / best, 2)
    out["ratio_loose"] = round(out["batchd_loose_fps"] / best, 2)
    return out


def _f(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        value = f"{value:,.1f}" if abs(value) >= 10 else f"{value:,.2f}"
    return f"{value}{unit}"


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """The table rows of the issue-15 scenarios present in ``results``."""
    out: list[tuple[str, str, str, str, str]] = []

    def met(ok: bool) -> str:
        return " yes" if ok else " NO"

    p = results.get("peer15")
    if p and "skipped_peer" not in p:
        for kind in ("folders", "loose"):
            ratio = p[f"ratio_{kind}"]
            out.append(
                (
                    f"issue 15: {p['files']} {'in 40 folders' if kind == 'folders' else kind}"
                    " vs watchdog+huey",
                    _f(p[f"batchd_{kind}_fps"], " files/s"),
                    _f(p[f"stack_{kind}_fps"], " files/s stack"),
                    _f(ratio, "x"),
                    f">= {TARGET_RATIO_VS_PEER}x" + met(ratio >= TARGET_RATIO_VS_PEER),
                )
            )
        out.append(
            (
                "  reference: raw huey no-op tasks",
                "",
                _f(p["huey_noop_tps"], " tasks/s"),
                "",
                "",
            )
        )
    c = results.get("daemon_cpu")
    if c:
        for kind in ("folders", "loose"):
            one, two = c[f"{kind}-1w"], c[f"{kind}-2w"]
            worst = max(one["daemon_ms_per_file"], two["daemon_ms_per_file"])
            out.append(
                (
                    f"issue 15: daemon CPU/file, {kind}, 1 / 2 workers",
                    f"{_f(one['daemon_ms_per_file'])} / {_f(two['daemon_ms_per_file'])} ms",
                    f"workers {_f(one['workers_ms_per_file'])} / "
                    f"{_f(two['workers_ms_per_file'])} ms",
                    "",
                    f"<= {TARGET_DAEMON_CPU_MS} ms" + met(worst <= TARGET_DAEMON_CPU_MS),
                )
            )
            out.append(
                (
                    f"  files/s, {kind}, 1 / 2 workers",
                    f"{_f(one['files_per_second'])} / {_f(two['files_per_second'])}",
                    "",
                    _f(round(two["files_per_second"] / one["files_per_second"], 2), "x"),
                    "grows",
                )
            )
        tr = c.get("trickle-2w")
        if tr:
            out.append(
                (
                    f"  daemon CPU/file, loose written at {TRICKLE_FILES_PER_SECOND:.0f}/s,"
                    " default settle, 2 workers",
                    f"{_f(tr['daemon_ms_per_file'])} ms",
                    f"workers {_f(tr['workers_ms_per_file'])} ms",
                    "",
                    "(reference)",
                )
            )
    fl = results.get("floor")
    if fl:
        out.append(
            (
                f"issue 15: floor, {fl['files']} files, 1 / 2 processes",
                f"{_f(fl['batchd_folders_fps'])} / {_f(fl['batchd_loose_fps'])} files/s"
                " (folders / loose)",
                f"{_f(fl['floor_1p_fps'])} / {_f(fl['floor_2p_fps'])} files/s floor",
                f"{_f(fl['ratio_folders'])}x / {_f(fl['ratio_loose'])}x best floor",
                "(reference)",
            )
        )
    return out
