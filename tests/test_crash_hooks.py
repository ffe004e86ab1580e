"""Tests for batchd.testing.faults: crash and hang points armed explicitly, steps checked."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchd import faults as hooks
from batchd.errors import ConfigError
from batchd.testing import faults


@pytest.fixture(autouse=True)
def _disarmed() -> Iterator[None]:
    yield
    faults.disarm()


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BATCHD_")}
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_misspelled_crash_step_is_refused_when_armed() -> None:
    """arm() refuses a crash step that does not exist, naming the real ones."""
    with pytest.raises(ConfigError, match="after_claim"):
        faults.arm(crash_at="after_claimm")


def test_a_misspelled_hang_step_is_refused_when_armed() -> None:
    """arm() refuses a hang step that does not exist."""
    with pytest.raises(ConfigError, match="scheduler_turn"):
        faults.arm(hang_at="scheduler_tun")


def test_a_misspelled_step_in_the_environment_stops_the_import() -> None:
    """BATCHD_CRASH_AT naming no step makes importing the hooks fail, not silently never fire."""
    proc = _python("import batchd.faults", BATCHD_CRASH_AT="after_claimm")
    assert proc.returncode != 0
    assert "is not a crash step" in proc.stderr


def test_hooks_are_no_ops_until_armed() -> None:
    """Unarmed, a hook does nothing, whatever the step."""
    hooks.crash_point("after_claim")
    hooks.hang_point("scheduler_turn")


def test_an_armed_hook_refuses_an_unknown_step() -> None:
    """Once anything is armed, a product hook naming an unknown step raises."""
    faults.arm(crash_at="after_finish")
    with pytest.raises(ConfigError, match="not a crash step"):
        hooks.crash_point("after_finnish")
    hooks.crash_point("after_claim")  # another real step: passes


def test_a_crash_point_exits_after_its_passes() -> None:
    """Armed with crash_after=1, the step passes once, then the process exits 86."""
    code = (
        "from batchd.testing import faults\n"
        "faults.arm(crash_at='after_claim', crash_after=1)\n"
        "from batchd.faults import crash_point\n"
        "crash_point('after_claim'); print('passed', flush=True)\n"
        "crash_point('after_claim'); print('not reached', flush=True)\n"
    )
    proc = _python(code)
    assert proc.returncode == faults.CRASH_EXIT_CODE
    assert proc.stdout.split() == ["passed"]


def test_the_environment_arms_a_daemon_process() -> None:
    """BATCHD_CRASH_AT in the environment arms the point at import (the daemon's way)."""
    code = "from batchd.faults import crash_point\ncrash_point('after_register')\nprint('alive')"
    proc = _python(code, BATCHD_CRASH_AT="after_register")
    assert proc.returncode == faults.CRASH_EXIT_CODE
    assert "alive" not in proc.stdout


def test_a_workers_crash_point_takes_the_daemon_down_and_counts_shared_passes(
    tmp_path: Path,
) -> None:
    """Issue 15 moved steps into workers: their passes count with the daemon's (one
    file shared through the environment), and a worker crashing there makes the
    daemon exit 86 too, as a power cut would."""
    code = (
        "import multiprocessing, os, time\n"
        "from batchd import faults\n"
        "def worker(parent):\n"
        "    faults.arm_worker(parent)\n"
        "    faults.crash_point('after_finish')\n"
        "    print('worker not reached', flush=True)\n"
        "if __name__ == '__main__':\n"
        "    faults.crash_point('after_finish'); print('daemon passed', flush=True)\n"
        "    ctx = multiprocessing.get_context('spawn')\n"
        "    child = ctx.Process(target=worker, args=(os.getpid(),)); child.start()\n"
        "    deadline = time.monotonic() + 30\n"
        "    while time.monotonic() < deadline:\n"
        "        time.sleep(0.01)\n"
        "    print('daemon not stopped', flush=True)\n"
    )
    script = tmp_path / "crash.py"
    script.write_text(code)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BATCHD_")}
    proc = subprocess.run(
        [sys.executable, str(script)],
        env={**clean, "BATCHD_CRASH_AT": "after_finish", "BATCHD_CRASH_AFTER": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == faults.CRASH_EXIT_CODE, proc.stderr
    assert proc.stdout.split("\n")[:1] == ["daemon passed"]
    assert "not" not in proc.stdout
