"""Crash and hang points: prove that a crash between any two steps loses nothing.

A test arms a point explicitly, in the daemon's environment (the daemon runs
in a process of its own)::

    BATCHD_CRASH_AT=<step>             exit CRASH_EXIT_CODE right after that step,
                                       the way a power cut or SIGKILL would stop it:
                                       no cleanup, no flushing
    BATCHD_CRASH_AFTER=N               let the step pass N times first
    BATCHD_CRASH_WORKER_ALONE=1        a crash in a worker ends that worker only (a
                                       worker SIGKILLed or OOM-killed), not the node
    BATCHD_HANG_AT=<step>              block forever at that step (a wedged daemon,
                                       for proving the systemd watchdog stops being fed)
    BATCHD_HANG_AFTER_SECONDS=S        only once S seconds have passed since its first call

or in-process with :func:`arm`. A step that is not one of :data:`STEPS` /
:data:`HANG_STEPS` is refused with :class:`~batchd.errors.ConfigError` when
armed, so a misspelled step cannot silently never fire; a product module
calling a hook with an unknown step raises too, once anything is armed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass

from batchd.errors import ConfigError

CRASH_EXIT_CODE = 86
#: What a worker's crash point sends the daemon (see :meth:`Armed.crash_point`).
CRASH_SIGNAL = signal.SIGUSR2
#: The environment variable naming the shared pass counter.
COUNTER_ENV = "BATCHD_CRASH_COUNTER"
#: Where the daemon may be made to crash (:func:`batchd.faults.crash_point`).
STEPS = (
    "after_claim",
    "after_register",
    "after_dispatch",
    "after_result_write",
    "after_file_commit",
    "after_worker_claim",
    "after_finish",
    "after_archive",
    "during_status_write",
)
#: Where the HTTP process may be made to crash (it runs uploads' registration: an
#: upload moved into work/, not registered yet); not the daemon's steps above,
#: which the crash torture (tests/reliability) runs one by one on folder drops.
HTTP_STEPS = ("after_adopt",)
#: Where the daemon may be made to hang (:func:`batchd.faults.hang_point`).
#: ``http_before_serving`` is in the HTTP process, before it serves: a child
#: that never serves (the daemon's READY=1 deadline, http.ready_timeout_seconds).
HANG_STEPS = ("scheduler_turn", "http_before_serving")


@dataclass
class Armed:
    """The points a test armed; what the hooks of :mod:`batchd.faults` consult."""

    crash_at: str = ""
    crash_after: int = 0
    hang_at: str = ""
    hang_after_seconds: float = 0.0
    hang_armed_at: float | None = None
    #: a file counting the passes of ``crash_at`` across the daemon and its
    #: workers (some steps run in a worker: batchd.recorder); None: in memory.
    counter_path: str | None = None
    #: in a worker, the daemon's pid: the crash takes the daemon down too.
    daemon_pid: int | None = None
    #: a worker's crash ends that worker alone (``BATCHD_CRASH_WORKER_ALONE``).
    worker_alone: bool = False

    def crash_point(self, step: str) -> None:
        """Exit at once if armed to crash at ``step`` (after its passes are used up)."""
        _known(step, STEPS + HTTP_STEPS, "crash")
        if step != self.crash_at:
            return
        if self.counter_path is not None:
            if _count_pass(self.counter_path) <= self.crash_after:
                return
        elif self.crash_after > 0:
            self.crash_after -= 1
            return
        if self.daemon_pid is not None:
            # A power cut stops the whole node, not one worker: the daemon
            # exits at once too (its handler, installed by arm_from_env).
            with contextlib.suppress(OSError):
                os.kill(self.daemon_pid, CRASH_SIGNAL)
        os._exit(CRASH_EXIT_CODE)

    def hang_point(self, step: str) -> None:
        """Block forever at ``step`` once ``hang_after_seconds`` have passed since
        its first call, if armed to hang there."""
        _known(step, HANG_STEPS, "hang")
        if step != self.hang_at:
            return
        now = time.monotonic()
        if self.hang_armed_at is None:
            self.hang_armed_at = now
        if now - self.hang_armed_at >= self.hang_after_seconds:
            while True:
                time.sleep(3600)


def _count_pass(path: str) -> int:
    """Add one to the pass count in ``path`` (under a lock); the new count."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        count = int(os.pread(fd, 32, 0) or b"0") + 1
        os.pwrite(fd, str(count).encode().ljust(32), 0)
        return count
    finally:
        os.close(fd)


def arm_worker(daemon_pid: int) -> None:
    """In a worker process: an armed crash point takes the daemon down with it."""
    from batchd import faults

    armed = faults.armed()
    if armed is not None and not armed.worker_alone:
        armed.daemon_pid = daemon_pid


def _known(step: str, steps: tuple[str, ...], kind: str) -> None:
    if step not in steps:
        raise ConfigError(
            f"{step!r} is not a {kind} step of batchd.testing.faults; use one of {', '.join(steps)}"
        )


def arm(
    crash_at: str = "", crash_after: int = 0, hang_at: str = "", hang_after_seconds: float = 0.0
) -> Armed:
    """Arm the points named (an empty name arms nothing); returns what is armed.

    Raises :class:`ConfigError` for a step that does not exist.
    """
    if crash_at:
        _known(crash_at, STEPS + HTTP_STEPS, "crash")
    if hang_at:
        _known(hang_at, HANG_STEPS, "hang")
    from batchd import faults

    armed = Armed(crash_at, crash_after, hang_at, hang_after_seconds)
    faults.install(armed)
    return armed


def arm_from_env(env: Mapping[str, str]) -> Armed | None:
    """Arm what ``BATCHD_CRASH_AT`` / ``BATCHD_HANG_AT`` name in ``env``; None if neither."""
    crash_at = env.get("BATCHD_CRASH_AT", "")
    hang_at = env.get("BATCHD_HANG_AT", "")
    if not crash_at and not hang_at:
        return None
    try:
        crash_after = int(env.get("BATCHD_CRASH_AFTER", "0") or 0)
        hang_after = float(env.get("BATCHD_HANG_AFTER_SECONDS", "0") or 0)
    except ValueError as exc:
        raise ConfigError(
            f"BATCHD_CRASH_AFTER / BATCHD_HANG_AFTER_SECONDS must be numbers: {exc}"
        ) from None
    armed = arm(crash_at, crash_after, hang_at, hang_after)
    if crash_at:
        # Passes are counted in a file the workers share: they inherit this
        # environment when they are spawned, after this import.
        counter = env.get(COUNTER_ENV)
        if not counter:
            fd, counter = tempfile.mkstemp(prefix="batchd-crash-passes-")
            os.close(fd)
            os.environ[COUNTER_ENV] = counter
            # A worker's crash point signals the daemon, which exits as if
            # it had crashed itself (the main thread runs this handler).
            with contextlib.suppress(ValueError):
                signal.signal(CRASH_SIGNAL, lambda signum, frame: os._exit(CRASH_EXIT_CODE))
        armed.counter_path = counter
        armed.worker_alone = env.get("BATCHD_CRASH_WORKER_ALONE", "") not in ("", "0")
    return armed


def disarm() -> None:
    """Make every hook a no-op again."""
    from batchd import faults

    faults.install(None)
