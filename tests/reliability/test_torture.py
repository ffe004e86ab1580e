"""kill -9 torture: SIGKILL the daemon at random moments, over and over, while drops keep
arriving; at the end every input is processed and archived exactly once.

Short form (``make test``): ~80 files, 12 kills. Long form (``make torture``, or
``pytest tests/reliability --long``): >= 300 files, 120 kills. The plan (drops,
their timing, the kill moments) comes from the seed printed in the report
header; replay with ``--seed N`` (same form). The interleaving with the
daemon's own timing is not replayed exactly, but the same moments are aimed at.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from invariants import INBOX_PRIORITIES, ExpectedDrop, check_spool, daemon_processes
from support import DaemonProcess, csv_bytes, wait_until


@dataclass(frozen=True)
class Form:
    """The size of one torture run."""

    files: int
    kills: int
    #: how long each file takes in the ``sleepy`` processor, so kills land mid-file
    delay_seconds: float
    #: deadline for the final run to finish everything
    finish_seconds: float


SHORT = Form(files=80, kills=12, delay_seconds=0.3, finish_seconds=90)
LONG = Form(files=320, kills=120, delay_seconds=0.6, finish_seconds=300)
#: A kill lands this often while the daemon is still starting (imports, recovery),
#: that many seconds after the process was started.
EARLY_KILL_SHARE = 0.25
EARLY_KILL_SECONDS = (0.05, 0.6)
#: Otherwise the daemon runs this long after it said ``daemon_started``.
KILL_AFTER_SECONDS = (0.2, 1.5)


@dataclass(frozen=True)
class Plan:
    drops: list[ExpectedDrop]
    #: pause before each drop, seconds
    drop_gaps: list[float]
    #: (kill while starting?, seconds to run before the kill) per kill
    kills: list[tuple[bool, float]]


def make_plan(rng: random.Random, form: Form) -> Plan:
    """Drops over all three priorities: loose files and nested folders, ~5% refused files."""
    drops: list[ExpectedDrop] = []
    n = 0
    while n < form.files:
        i = len(drops)
        priority = rng.choice(INBOX_PRIORITIES)
        if rng.random() < 0.3:
            name = f"loose{i:03}.csv"
            drops.append(ExpectedDrop(name, {name: content(rng, n)}, priority))
            n += 1
            continue
        files: dict[str, bytes] = {}
        failed: set[str] = set()
        for j in range(rng.randint(2, 10)):
            folder = rng.choice(["", "", "sub/", "sub/deep/", f"part{j % 3}/"])
            if rng.random() < 0.05:
                rel = f"{folder}refused{j}.pdf"  # text in a .pdf: refused, goes to failed/
                files[rel] = b"this is not a pdf\n"
                failed.add(rel)
            else:
                files[f"{folder}f{j:02}.csv"] = content(rng, n)
            n += 1
        drops.append(ExpectedDrop(f"drop{i:03}-{priority}", files, priority, frozenset(failed)))
    # Spread the drops over roughly the first three quarters of the kill phase.
    mean_gap = 0.75 * form.kills * 1.5 / len(drops)
    gaps = [rng.uniform(0, 2 * mean_gap) for _ in drops]
    kills = []
    for _ in range(form.kills):
        early = rng.random() < EARLY_KILL_SHARE
        kills.append((early, rng.uniform(*(EARLY_KILL_SECONDS if early else KILL_AFTER_SECONDS))))
    return Plan(drops, gaps, kills)


def content(rng: random.Random, i: int) -> bytes:
    return csv_bytes(i) + f"{i},{rng.randrange(10**9)}\n".encode()


class Feeder(threading.Thread):
    """Drops the plan's drops one by one, whether the daemon is up or not."""

    def __init__(self, d: DaemonProcess, plan: Plan, staging: Path) -> None:
        super().__init__(daemon=True, name="feeder")
        self.d, self.plan, self.staging = d, plan, staging
        self.stopped = threading.Event()
        self.dropped = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for gap, drop in zip(self.plan.drop_gaps, self.plan.drops, strict=True):
                if self.stopped.wait(gap):
                    return
                drop.put(self.d.spool, self.staging)
                self.dropped += 1
        except BaseException as exc:  # reported by the test thread
            self.error = exc


@contextlib.contextmanager
def seeded(seed: int, form: str) -> Iterator[None]:
    """Prefix every assertion failure with the seed that replays it."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(
            f"[seed={seed} form={form}; replay: BATCHD_TORTURE_SEED={seed}] {exc}"
        ) from exc


def kill_moment(d: DaemonProcess) -> list[str]:
    """Where the last run was when it was killed, from its log (and how many files it lost
    mid-processing)."""
    started: set[str] = set()
    ended: set[str] = set()
    seen: set[str] = set()
    for line in d.log().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        seen.add(event.get("event", ""))
        if event.get("event") == "file_started":
            started.add(event["file_id"])
        elif event.get("event") in ("file_completed", "file_failed", "file_retry_scheduled"):
            ended.add(event["file_id"])
    if "recovery_done" not in seen:
        return ["before_recovery_done"]
    if "daemon_started" not in seen:
        return ["during_startup"]
    in_flight = len(started - ended)
    return ["with_files_running"] * bool(in_flight) + ["files_interrupted"] * in_flight or ["idle"]


def unfinished(d: DaemonProcess, plan: Plan) -> list[str]:
    """What is still waiting: inbox entries and drops whose status.json is not final."""
    left = [f"inbox/{p}/{e.name}" for p in INBOX_PRIORITIES for e in d.inbox(p).iterdir()]
    for drop in plan.drops:
        status = d.status(drop.name)
        if status is None or status["batch"]["status"] not in ("completed", "failed"):
            left.append(drop.name)
    return left


def test_sigkill_torture_loses_and_doubles_nothing(
    tmp_path: Path, rng: random.Random, seed: int, long_run: bool
) -> None:
    """SIGKILLed at random moments while drops keep coming, batchd still ends with every input
    archived (or failed) once, one parsing result per input, and no batch registered twice."""
    form = LONG if long_run else SHORT
    name = "long" if long_run else "short"
    plan = make_plan(rng, form)
    total_files = sum(len(drop.files) for drop in plan.drops)
    d = DaemonProcess(
        tmp_path,
        processing={"processor": "batchd.testing.procs:sleepy", "shutdown_grace_seconds": 30},
        watch={"settle_seconds": 0.05, "rescan_seconds": 1.0},
    )
    for priority in INBOX_PRIORITIES:  # the inbox exists before batchd (``batchd init``)
        d.inbox(priority).mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    moments: Counter[str] = Counter()
    feeder = Feeder(d, plan, tmp_path / "staging")
    with seeded(seed, name):
        try:
            feeder.start()
            for n, (while_starting, after) in enumerate(plan.kills, 1):
                d.start(wait=not while_starting, BATCHD_TEST_DELAY=str(form.delay_seconds))
                assert d.proc is not None
                # The random moment of the kill is the point of this test, not a wait for
                # something to happen.
                time.sleep(after)
                assert d.proc.poll() is None, f"daemon died on its own, run {n}:\n{d.log()[-3000:]}"
                d.kill()
                moments.update(kill_moment(d))
                wait_until(
                    lambda: not daemon_processes(d.config),
                    30,
                    what=f"the workers to die with the daemon (kill {n})",
                )
            feeder.join(timeout=120)
            assert not feeder.is_alive(), "the feeder never finished dropping"
            assert feeder.error is None, f"the feeder failed: {feeder.error!r}"
            assert feeder.dropped == len(plan.drops)

            d.start(BATCHD_TEST_DELAY="0.01")
            try:
                wait_until(lambda: not unfinished(d, plan), form.finish_seconds, what="every drop")
            except AssertionError as exc:
                left = unfinished(d, plan)
                raise AssertionError(
                    f"{exc}: {left} never finished after the kills\n{d.log()[-3000:]}"
                ) from exc
            assert d.stop() == 0, d.log()[-3000:]
        finally:
            feeder.stopped.set()
            if d.proc is not None and d.proc.poll() is None:
                d.kill()
        wait_until(lambda: not daemon_processes(d.config), 30, what="no process left behind")
        summary = check_spool(d.spool, plan.drops, context=f"seed={seed}")
        assert summary.files == total_files
        assert (summary.lost, summary.doubled) == (0, 0)
    runs = (d.state / "order.log").read_text().split() if (d.state / "order.log").exists() else []
    wall = time.monotonic() - began
    print(
        f"\nTORTURE form={name} seed={seed} kills={len(plan.kills)} {dict(moments)}"
        f" drops={len(plan.drops)} {summary.line()}"
        f" processor_runs={len(runs)} by_priority={summary.by_priority} wall={wall:.1f}s"
    )
