"""A crash right after any step of the pipeline loses nothing and doubles nothing.

For every crash point of :mod:`batchd.testing.faults` the daemon runs with
``BATCHD_CRASH_AT=<step>`` (and ``BATCHD_CRASH_AFTER=N`` to crash mid-batch,
not only on the first pass), exits 86 there like a power cut, is restarted
without the fault, and must finish every drop exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
from invariants import ExpectedDrop, check_spool, daemon_processes
from support import DaemonProcess, csv_bytes, wait_until

from batchd.testing.faults import CRASH_EXIT_CODE, STEPS

#: How many passes of each step to let through before the mid-batch crash:
#: steps run once per batch (3 batches here) or once per processed file (8: fake.pdf is refused).
MID_BATCH_AFTER = {
    "after_claim": 2,
    "after_register": 2,
    # The daemon dispatches a file only when no worker claimed it itself
    # (issue 15): at least the first file of each idle worker, not every file.
    "after_dispatch": 1,
    "after_result_write": 4,
    "after_file_commit": 4,
    "after_worker_claim": 1,
    "after_finish": 4,
    "after_archive": 4,
    "during_status_write": 5,
}
CASES = [(step, 0) for step in STEPS] + [(step, MID_BATCH_AFTER[step]) for step in STEPS]
#: ``make test`` runs these mid-batch crashes only (one restart each, ~4 s): a drop's
#: registration (grouped), a worker's result, its lock-free commit, a status
#: write and a worker's own claim of its next file; ``make test-slow``
#: (BATCHD_TEST_SLOW=1) runs every CASES, ``make torture`` every pass of every step.
QUICK_CASES = [
    (step, MID_BATCH_AFTER[step])
    for step in ("after_register", "after_result_write", "after_file_commit", "during_status_write")
] + [("after_worker_claim", 0)]  # a worker killed between its own claim and its report
#: How often each step passes in one run of the three drops (fake.pdf is refused at
#: registration, so 8 files are dispatched); status.json at least at each registration and end.
PASSES = {
    "after_claim": 3,
    "after_register": 3,
    "after_dispatch": 2,
    "after_result_write": 8,
    "after_file_commit": 8,
    # A worker claims its next file only when the head of the queue is fresh
    # after its success: at least twice in these drops, how often is timing.
    "after_worker_claim": 2,
    "after_finish": 8,
    "after_archive": 8,
    "during_status_write": 6,
}


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").strip() not in ("", "0", "false", "no")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if {"step", "after"} <= set(metafunc.fixturenames):
        long_run = metafunc.config.getoption("--long", default=False) or _env_on(
            "BATCHD_TORTURE_LONG"
        )  # as conftest's long_run fixture
        cases = list(CASES if long_run or _env_on("BATCHD_TEST_SLOW") else QUICK_CASES)
        if long_run:  # crash on every pass of every step, not only two of them
            cases += [
                (step, n)
                for step in STEPS
                for n in range(1, PASSES[step])
                if (step, n) not in CASES
            ]
        metafunc.parametrize(("step", "after"), cases, ids=[f"{s}-{n}" for s, n in cases])


def drops() -> list[ExpectedDrop]:
    """Three drops over all priorities: nested folders, a loose file, one refused file."""
    return [
        ExpectedDrop(
            "alpha",
            {
                "a1.csv": csv_bytes(1),
                "sub/a2.csv": csv_bytes(2),
                "sub/deep/a3.csv": csv_bytes(3),
                "a4.csv": csv_bytes(4),
                "fake.pdf": b"not a pdf at all\n",
            },
            "high",
            failed=frozenset({"fake.pdf"}),
        ),
        ExpectedDrop(
            "beta",
            {"b1.csv": csv_bytes(11), "b2.csv": csv_bytes(12), "x/b3.csv": csv_bytes(13)},
            "normal",
        ),
        ExpectedDrop("gamma.csv", {"gamma.csv": csv_bytes(21)}, "low"),
    ]


def registrations(d: DaemonProcess) -> dict[str, int]:
    """How often each batch name was logged ``batch_registered``, over every run."""
    counts: dict[str, int] = {}
    for log in sorted(d.tmp.glob("daemon-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "batch_registered":
                counts[event["batch"]] = counts.get(event["batch"], 0) + 1
    return counts


def test_crash_at_step_then_restart_finishes_each_file_once(
    tmp_path: Path, step: str, after: int
) -> None:
    """Exit 86 right after ``step`` (on pass ``after``+1), restart: every input once, nothing
    doubled, database and spool agree, no worker left behind."""
    d = DaemonProcess(
        tmp_path,
        processing={"processor": "batchd.testing.procs:sleepy"},
        watch={"settle_seconds": 0.05, "rescan_seconds": 1.0},
    )
    expected = drops()
    d.start(BATCHD_CRASH_AT=step, BATCHD_CRASH_AFTER=str(after), BATCHD_TEST_DELAY="0.05")
    try:
        for drop in expected:
            drop.put(d.spool, tmp_path / "staging")
        assert d.proc is not None
        proc = d.proc
        wait_until(lambda: proc.poll() is not None, 60, what=f"crash at {step} (after {after})")
        assert proc.returncode == CRASH_EXIT_CODE, f"exit {proc.returncode}:\n{d.log()[-3000:]}"
        wait_until(
            lambda: not daemon_processes(d.config), 30, what="workers to die with the daemon"
        )

        d.start(BATCHD_TEST_DELAY="0.01")
        for drop in expected:
            d.wait_batch(drop.name, 60)
        assert d.stop() == 0
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.kill()
    wait_until(lambda: not daemon_processes(d.config), 30, what="no process left behind")
    summary = check_spool(d.spool, expected, context=f"crash at {step} after {after}")
    assert (summary.files, summary.completed, summary.failed) == (9, 8, 1)
    # A crash right after the commit may leave a registration unlogged, never logged twice.
    twice = {name: n for name, n in registrations(d).items() if n > 1}
    assert twice == {}, f"registered more than once: {twice}"


def test_invariant_check_reports_lost_doubled_and_leftover_inputs(tmp_path: Path) -> None:
    """The spool check is not vacuous: a lost input, an input in both archive/ and failed/,
    a file left in the inbox and a half-written temporary are each reported."""
    d = DaemonProcess(tmp_path, processing={"processor": "noop"})
    expected = drops()
    d.start()
    try:
        for drop in expected:
            drop.put(d.spool, tmp_path / "staging")
        for drop in expected:
            d.wait_batch(drop.name, 60)
        assert d.stop() == 0
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.kill()
    check_spool(d.spool, expected)

    archive = d.spool / "archive"
    (archive / "beta" / "b1.csv").unlink()
    (d.spool / "failed" / "alpha" / "a1.csv").write_bytes(csv_bytes(1))
    (d.inbox("low") / "late.csv").write_bytes(csv_bytes(9))
    (d.spool / "outbox" / "beta" / "results" / ".b2.csv.json.x.tmp").write_text("{")
    with pytest.raises(AssertionError) as caught:
        check_spool(d.spool, expected, context="broken on purpose")
    lines = str(caught.value).splitlines()
    assert lines[0] == "broken on purpose: 7 spool invariant(s) broken:"
    assert sorted(line.strip() for line in lines[1:]) == sorted(
        [
            "inbox/low not empty: ['late.csv']",
            "batch 'alpha': a1.csv is in archive/ and in failed/",
            "batch 'alpha': completed a1.csv is in failed/",
            "batch 'alpha': input a1.csv found 2 times in archive/+failed/",
            "batch 'beta': temporary files left in the outbox: ['results/.b2.csv.json.x.tmp']",
            "batch 'beta': completed b1.csv is not in archive/",
            "batch 'beta': input b1.csv found 0 times in archive/+failed/",
        ]
    )


def batch_done_in_db(d: DaemonProcess, name: str) -> bool:
    with contextlib.closing(d.db()) as conn:
        row = conn.execute("SELECT status FROM batch_jobs WHERE name = ?", (name,)).fetchone()
    return row is not None and row["status"] in ("completed", "failed")


def crash_at_status_write(case: Path, drop: ExpectedDrop, n: int) -> bool:
    """Run one drop with a crash at status write ``n + 1``, then restart until the database
    says the batch is done. False when the batch ended without reaching that write."""
    case.mkdir()
    d = DaemonProcess(case, processing={"processor": "noop"}, watch={"settle_seconds": 0.05})
    d.start(BATCHD_CRASH_AT="during_status_write", BATCHD_CRASH_AFTER=str(n))
    proc = d.proc
    assert proc is not None
    final = ("completed", "failed")
    try:
        drop.put(d.spool, case / "staging")
        wait_until(
            lambda: (
                proc.poll() is not None
                or (d.status(drop.name) or {}).get("batch", {}).get("status") in final
            ),
            60,
            what=f"a crash at status write {n + 1}, or the batch's end",
        )
        if proc.poll() is None:
            assert d.stop() == 0
            return False
        assert proc.returncode == CRASH_EXIT_CODE, d.log()[-3000:]
        d.start()
        # The database, not status.json, says when the restart is done: a stale
        # status.json is what the spool check must catch.
        wait_until(lambda: batch_done_in_db(d, drop.name), 60, what=f"{drop.name} to finish")
        assert d.stop() == 0
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.kill()
    return True


def test_crash_at_each_status_write_of_a_batch_is_repaired(tmp_path: Path) -> None:
    """A crash at each status.json write of a one-file batch in turn, the final one included,
    is repaired by the restart: status.json ends final and agrees with the database."""
    drop = ExpectedDrop("one.csv", {"one.csv": csv_bytes(1)})
    crashed = 0
    while crash_at_status_write(tmp_path / f"after-{crashed}", drop, crashed):
        spool = tmp_path / f"after-{crashed}" / "spool"
        check_spool(spool, [drop], context=f"crash at status write {crashed + 1}")
        crashed += 1
    assert crashed >= 2, "expected at least the first and the final status write to crash"
