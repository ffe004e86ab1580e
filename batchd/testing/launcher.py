"""The one daemon launcher: ``batchd run`` as a real child process, for tests and bench/.

Tests (``tests/integration/support.py``'s ``DaemonProcess`` and its
subclasses) and the benchmarks (``bench/common.py``'s ``Daemon``) both start
the daemon as a user would, on a spool in a folder of their own, and watch
it from outside through its JSON log. They differ only in how they
configure it (a config file, or ``BATCHD_*`` variables) and in what they
measure, which they add on top of :class:`DaemonLauncher`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from batchd.testing.wait import WAIT_INTERVAL_SECONDS, wait_until

#: How long :meth:`DaemonLauncher.start` waits for ``daemon_started`` by default.
START_TIMEOUT_SECONDS = 30.0
#: How long :meth:`DaemonLauncher.stop` waits after SIGTERM by default.
STOP_TIMEOUT_SECONDS = 30.0


class DaemonFailed(AssertionError):
    """The daemon did not start or stop as it should; the message ends with its log.

    An :class:`AssertionError`, so that a test reports it as a failure (and a
    wrapper that adds context to assertion failures adds it here too)."""


class DaemonLauncher:
    """``batchd run`` as a child process in ``tmp``, on ``tmp/spool`` by default.

    The child gets this process's environment without any ``BATCHD_``
    variable, then ``env``, then what :meth:`start` adds. Its output (the
    JSON log lines) goes to ``tmp/daemon-<run>.log``, one file per start.
    Subclasses change :meth:`command` (another user, another interpreter)
    and :meth:`environment`.
    """

    def __init__(self, tmp: Path, env: Mapping[str, str] | None = None) -> None:
        self.tmp = tmp
        self.spool = tmp / "spool"
        #: the variables every start sets (over the inherited environment).
        self.base_env: dict[str, str] = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        #: how many times the daemon was started (the number of its log file).
        self.runs = 0
        #: seconds from the last spawn to its ``daemon_started`` line.
        self.started_in = 0.0

    # -- starting and stopping ---------------------------------------------------

    def command(self) -> list[str]:
        """The command line that starts the daemon."""
        return [sys.executable, "-m", "batchd", "run"]

    def environment(self, **extra: str) -> dict[str, str]:
        """The child's environment: ours without ``BATCHD_*``, :attr:`base_env`, ``extra``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHD_")}
        env.update(self.base_env)
        env.update(extra)
        return env

    def spawn(self, **extra_env: str) -> subprocess.Popen[bytes]:
        """Start the daemon (a new run, a new log file) and return at once."""
        self.runs += 1
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command(),
                env=self.environment(**extra_env),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmp,
            )
        return self.proc

    def start(
        self,
        timeout: float = START_TIMEOUT_SECONDS,
        interval: float = WAIT_INTERVAL_SECONDS,
        **extra_env: str,
    ) -> Self:
        """Start the daemon and wait (polling every ``interval`` s) for ``daemon_started``.

        Raises :class:`DaemonFailed` with its log when it exits first.
        """
        t0 = time.perf_counter()
        proc = self.spawn(**extra_env)
        wait_until(
            lambda: "daemon_started" in self.log() or proc.poll() is not None,
            timeout,
            what="daemon start",
            interval=interval,
        )
        self.started_in = time.perf_counter() - t0
        if proc.poll() is not None:
            raise DaemonFailed(f"daemon exited at start:\n{self.log()[-3000:]}")
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None, "the daemon was never started"
        self.proc.send_signal(sig)

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int:
        """SIGTERM and wait; the exit status (0 when it never ran).

        A daemon still running after ``timeout`` is killed, then
        :class:`DaemonFailed` is raised with its log.
        """
        if self.proc is None:
            return 0
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise DaemonFailed(
                f"daemon did not stop within {timeout} s:\n{self.log()[-3000:]}"
            ) from None

    def kill(self, workers: bool = False) -> None:
        """SIGKILL the daemon; with ``workers``, then its orphaned worker processes
        too (left alone, they exit on their own once they see their pipe closed)."""
        assert self.proc is not None, "the daemon was never started"
        orphans = children(self.proc.pid) if workers and self.proc.poll() is None else []
        self.proc.kill()
        self.proc.wait()
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    # -- reading what it wrote ---------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.tmp / f"daemon-{self.runs}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the daemon was never started"
        return self.proc.pid

    @property
    def db_path(self) -> Path:
        """The SQLite database (on the default ``database.path``)."""
        return self.spool / "state" / "batchd.db"

    def inbox(self, priority: str = "normal") -> Path:
        return self.spool / "inbox" / priority

    def log(self) -> str:
        """The current run's whole log ("" before the first start)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, name: str) -> list[dict[str, Any]]:
        """Every JSON log line of the current run whose ``event`` is ``name``, in order."""
        out: list[dict[str, Any]] = []
        if not self.log_path.exists():
            return out
        with self.log_path.open("rb") as fh:
            for line in fh:
                if name.encode() not in line:  # cheap: most lines are other events
                    continue
                try:
                    event = json.loads(line.decode(errors="replace"))
                except ValueError:
                    continue
                if isinstance(event, dict) and event.get("event") == name:
                    out.append(event)
        return out


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (a daemon's workers); [] once it is gone."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


__all__ = ["DaemonFailed", "DaemonLauncher", "children"]
