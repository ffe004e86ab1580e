"""A bounded pool of worker processes, each on its own pipe.

Why not ``multiprocessing.Pool`` or pebble: both share one queue (and its
lock) between all workers, and a worker killed while holding that lock can
wedge the whole pool (noxdafox/pebble#163). Here every worker has a private
``Pipe``; the daemon waits on all pipes and process sentinels at once, so a
worker that dies (segfault, ``os._exit``, OOM kill, SIGKILL) is seen at once,
costs only its own attempt, and is replaced.

The pool knows nothing about the database: it takes :class:`Job` objects and
returns events.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import selectors
import signal
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import structlog

from batchd.clock import Clock
from batchd.config import Settings
from batchd.messages import Done, Event, Failed, Job, Lost, Progress, TimedOut
from batchd.worker import memory_limit_error, worker_main

log = structlog.get_logger("batchd.pool")

# spawn, not fork: the daemon runs threads (watcher, HTTP), and forking a
# threaded process can copy a lock another thread held into the child.
_ctx = multiprocessing.get_context("spawn")


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    job: Job | None = None
    deadline: float | None = None
    retiring: bool = False
    killed_for_timeout: bool = field(default=False)
    #: the largest address-space size (VmSize, what RLIMIT_AS counts) seen
    #: while the current job ran, in bytes; sampled at every pool turn.
    peak_vm_bytes: int = 0
    #: names this worker's own claims in the store (``batch_files.claimant``).
    token: str = ""
    #: the standing permit to claim its next file itself: one byte shared with
    #: the worker process (a ``RawValue``), 1 while it may.
    permit: Any = None


#: A worker that died by one of these while its address space was this close
#: to the limit is taken to have died of the limit (allocation failed in C code,
#: or the kernel's OOM killer): a permanent failure, like a MemoryError.
_MEMORY_DEATH_SIGNALS = (signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS)
_MEMORY_DEATH_FRACTION = 0.9
#: What a registration in the pool's selector stands for.
_CONN = "conn"
_SENTINEL = "sentinel"
#: How often the loop notes busy workers' address-space sizes.
MEMORY_SAMPLE_SECONDS = 0.05


def _readable(conn: Connection) -> bool:
    """Whether a message (or the end) waits on ``conn``, without blocking.

    ``Connection.poll(0)`` builds a selector for each call; one poll() on
    one descriptor does the same at a fraction of the cost, per message.
    """
    if conn.closed:
        return False
    # poll(), not select(): descriptors above 1023 (LimitNOFILE) are fine.
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def memory_of(pid: int) -> tuple[int, int]:
    """``(VmSize, VmRSS)`` of a live process in bytes; zeros when it is gone."""
    vm = rss = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmSize:"):
                    vm = int(line.split()[1]) * 1024
                elif line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0, 0
    return vm, rss


def describe_exit(exitcode: int | None) -> str:
    """A worker's exit status in words: ``killed by signal 9 (SIGKILL)``."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown"
        return f"killed by signal {-exitcode} ({name})"
    return f"exited with status {exitcode}"


def worker_settings(settings: Settings) -> Settings:
    """``settings`` without the secrets a worker never needs (issue 17.6): the HTTP
    tokens and the database URL (its password) stay in the daemon."""
    return settings.model_copy(
        update={
            "http": settings.http.model_copy(update={"token": "", "users": {}, "users_file": None}),
            "database": settings.database.model_copy(update={"url": None}),
        }
    )


def claim_deadline(now: float, timeout: float, claimed_at: float) -> float:
    """The deadline of a file a worker claimed itself at ``claimed_at`` (its
    ``time.monotonic()``; 0.0: unknown), on the pool's clock reading ``now``.

    The claim's message may wait in its pipe for as long as one turn of the
    daemon's loop takes (a long turn: many outcomes, a slow disk), and the
    file runs meanwhile. The wait is measured on the machine's monotonic
    clock, the one the worker stamped with, and taken off the timeout, never
    more than the timeout itself (a stamp from the future counts as no wait).
    """
    if claimed_at <= 0.0:
        return now + timeout
    waited = min(max(0.0, time.monotonic() - claimed_at), timeout)
    return now + timeout - waited


class WorkerPool:
    """Up to ``size`` worker processes; at most one job each."""

    def __init__(self, settings: Settings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self.size = settings.processing.concurrency
        self._workers: list[_Worker] = []
        self.spawned = 0
        self._next_sample = 0.0
        #: every worker's pipe and process sentinel, registered while it lives:
        #: multiprocessing.connection.wait() built and filled a new selector
        #: at every turn of the loop (issue 15).
        self._selector = selectors.PollSelector()
        #: whether workers may claim their next file themselves (allow_claims).
        self._claims_allowed = False
        #: tokens of the workers gone since the last take_dead_tokens().
        self._gone_tokens: list[str] = []
        #: tokens of live workers whose record (and so claim) failed unanswered.
        self._unsure_tokens: list[str] = []

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        while len(self._workers) < self.size:
            self._spawn()

    def _spawn(self) -> None:
        parent, child = _ctx.Pipe(duplex=True)
        token = uuid.uuid4().hex
        permit = _ctx.RawValue("b", 1 if self._claims_allowed else 0)
        process = _ctx.Process(
            target=worker_main,
            # The database URL goes to the worker's recorder, never into the
            # settings its processors see.
            args=(
                *(child, worker_settings(self.settings), os.getpid(), self.settings.database.url),
                *(token, permit),
            ),
            name=f"batchd-worker-{self.spawned + 1}",
            daemon=True,
        )
        process.start()
        child.close()
        self.spawned += 1
        worker = _Worker(process, parent, token=token, permit=permit)
        self._workers.append(worker)
        self._selector.register(parent.fileno(), selectors.EVENT_READ, (worker, _CONN))
        self._selector.register(process.sentinel, selectors.EVENT_READ, (worker, _SENTINEL))
        log.debug("worker_started", pid=process.pid)

    def configure(self, settings: Settings) -> None:
        """Apply new settings: workers get them for their next job; the pool
        grows at once and shrinks as busy workers finish (never killing one)."""
        self.settings = settings
        self.size = settings.processing.concurrency
        for worker in self._workers:
            with contextlib.suppress(OSError):
                worker.conn.send(worker_settings(settings))
        self._trim()
        self.start()

    def _trim(self) -> None:
        excess = len([w for w in self._workers if not w.retiring]) - self.size
        for worker in sorted(self._workers, key=lambda w: w.job is not None):
            if excess <= 0:
                break
            if not worker.retiring:
                worker.retiring = True
                self._set_permit(worker)
                excess -= 1
        for worker in [w for w in self._workers if w.retiring and w.job is None]:
            self._retire(worker)

    def _retire(self, worker: _Worker) -> None:
        with contextlib.suppress(OSError):
            worker.conn.send(None)
        worker.process.join(timeout=1)
        if worker.process.is_alive():
            self._kill(worker)
        self._remove(worker)

    def _remove(self, worker: _Worker) -> None:
        # Whatever it claimed itself and did not report is found by its token.
        self._gone_tokens.append(worker.token)
        for fd in (worker.conn.fileno() if not worker.conn.closed else -1, worker.process.sentinel):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(fd)
        with contextlib.suppress(OSError):
            worker.conn.close()
        if worker in self._workers:
            self._workers.remove(worker)

    def _kill(self, worker: _Worker) -> None:
        pid = worker.process.pid
        if pid is None:
            return
        # The worker leads its own process group: kill the group, so that
        # commands it started (exec processor) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        worker.process.join(timeout=5)

    def stop(self) -> None:
        """Stop every worker (running jobs are abandoned; requeue them first)."""
        for worker in list(self._workers):
            if worker.job is None:
                self._retire(worker)
            else:
                self._kill(worker)
                self._remove(worker)

    # -- claims by the workers themselves (issue 15) ------------------------------

    def allow_claims(self, allowed: bool) -> None:
        """Give (or withdraw) every worker's standing permit to claim its next file.

        A retiring worker never has it. Withdrawn, a worker claims nothing
        after its current file; one that read the permit a moment before has
        made at most one claim, which replaces its own finished file. Writes
        one shared byte per worker, no lock: safe in a signal handler.
        """
        self._claims_allowed = allowed
        for worker in self._workers:
            self._set_permit(worker)

    def _set_permit(self, worker: _Worker) -> None:
        if worker.permit is not None:
            worker.permit.value = 1 if self._claims_allowed and not worker.retiring else 0

    def permits(self) -> dict[int, bool]:
        """Each live worker's standing permit to claim, by pid."""
        return {
            w.process.pid: bool(w.permit is not None and w.permit.value)
            for w in self._workers
            if w.process.pid is not None
        }

    def take_dead_tokens(self) -> list[str]:
        """The tokens of the workers gone (died, killed, retired) since the last call."""
        tokens, self._gone_tokens = self._gone_tokens, []
        return tokens

    def take_unsure_tokens(self) -> list[str]:
        """The tokens of live workers whose claim may have committed unanswered
        (``Done.claim_unknown``) since the last call: idle now, they run none."""
        tokens, self._unsure_tokens = self._unsure_tokens, []
        return tokens

    # -- state -----------------------------------------------------------------

    def idle(self) -> int:
        """How many workers can take a job now."""
        return sum(1 for w in self._workers if w.job is None and not w.retiring)

    def running(self) -> list[Job]:
        return [w.job for w in self._workers if w.job is not None]

    def alive(self) -> int:
        """Live worker processes."""
        return sum(1 for w in self._workers if w.process.is_alive())

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def job_pid(self, file_id: str) -> int | None:
        """The pid of the worker running ``file_id``."""
        for w in self._workers:
            if w.job is not None and w.job.file_id == file_id:
                return w.process.pid
        return None

    # -- work ------------------------------------------------------------------

    def cancel(self, file_id: str, lease: int) -> bool:
        """Kill the worker running that attempt, with no event for it (the
        attempt was superseded: its file was claimed again). True if one ran."""
        for worker in list(self._workers):
            job = worker.job
            if job is not None and job.file_id == file_id and job.lease == lease:
                worker.killed_for_timeout = True  # no Lost event from its burial
                self._kill(worker)
                self._remove(worker)
                return True
        return False

    def submit(self, job: Job) -> None:
        """Hand a job to an idle worker (the caller checked :meth:`idle`)."""
        for worker in self._workers:
            if worker.job is None and not worker.retiring:
                # A dead worker fails the send; its sentinel reports it on the next wait.
                with contextlib.suppress(OSError):
                    worker.conn.send(job)
                worker.job = job
                worker.deadline = self.clock.monotonic() + self.settings.processing.timeout_seconds
                return
        raise RuntimeError("submit() called with no idle worker")

    def next_deadline(self) -> float | None:
        deadlines = [w.deadline for w in self._workers if w.deadline is not None]
        return min(deadlines) if deadlines else None

    def wait(
        self, timeout: float | None, extra: Sequence[Any] = ()
    ) -> tuple[list[Event], list[Any]]:
        """Wait for worker messages, worker deaths, timeouts or ``extra`` objects.

        Returns the pool's events and those of ``extra`` that are ready.
        """
        now = self.clock.monotonic()
        deadline = self.next_deadline()
        if deadline is not None:
            until = max(0.0, deadline - now)
            timeout = until if timeout is None else min(timeout, until)
        # The extra objects change from turn to turn (a database reconnect
        # gives a new LISTEN socket): registered for this wait only.
        added = []
        for obj in extra:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.register(obj, selectors.EVENT_READ, (None, obj))
                added.append(obj)
        try:
            keys = self._selector.select(None if timeout is None else max(0.0, timeout))
        finally:
            for obj in added:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(obj)
        events: list[Event] = []
        dead: list[_Worker] = []
        others: list[Any] = []
        for key, _mask in keys:
            worker, what = key.data
            if worker is None:
                others.append(what)
            elif what == _CONN:
                if not self._drain(worker, events) and worker not in dead:
                    dead.append(worker)
            elif worker not in dead:
                dead.append(worker)
        for worker in dead:
            self._drain(worker, events)  # a last message may still be in the pipe
            self._bury(worker, events)
        self._sample_memory()
        self._check_timeouts(events)
        self._trim()
        self.start()
        return events, others

    def _drain(self, worker: _Worker, events: list[Event]) -> bool:
        """Read every message waiting on a worker's pipe; False once the pipe is closed."""
        try:
            while _readable(worker.conn):
                message = worker.conn.recv()
                if worker.job is None or worker.job.file_id != message.file_id:
                    continue  # a late report of a job this worker no longer runs
                if isinstance(message, Progress):
                    events.append(replace(message, lease=worker.job.lease))
                elif isinstance(message, Done | Failed):
                    events.append(replace(message, lease=worker.job.lease))
                    if isinstance(message, Done) and message.claim_unknown:
                        self._unsure_tokens.append(worker.token)
                    started, claimed_at = None, 0.0
                    if isinstance(message, Done) and message.recorded is not None:
                        started = message.recorded.started
                        claimed_at = message.recorded.claimed_at
                    # A worker that claimed its next file itself runs it now;
                    # its deadline counts from its claim.
                    worker.job = started
                    worker.deadline = (
                        None
                        if started is None
                        else claim_deadline(
                            self.clock.monotonic(),
                            self.settings.processing.timeout_seconds,
                            claimed_at,
                        )
                    )
                    worker.peak_vm_bytes = 0
                    self._recycle_if_large(worker, message.rss_bytes)
        except (EOFError, OSError):
            return False
        return True

    def _sample_memory(self) -> None:
        """Note each busy worker's address-space size (for :meth:`_bury`),
        every :data:`MEMORY_SAMPLE_SECONDS` at most: reading /proc at every
        turn cost the loop ~0.4 ms per file (issue 15)."""
        now = self.clock.monotonic()
        if now < self._next_sample:
            return
        self._next_sample = now + MEMORY_SAMPLE_SECONDS
        for worker in self._workers:
            if worker.job is not None and worker.process.pid is not None:
                vm, _rss = memory_of(worker.process.pid)
                worker.peak_vm_bytes = max(worker.peak_vm_bytes, vm)

    def _recycle_if_large(self, worker: _Worker, rss: int) -> None:
        """Replace a worker that grew past ``processing.worker_recycle_rss_mb``
        (``rss``: its resident size after the job, as it measured it).

        CPython seldom gives freed memory back to the system: a worker that
        once read a big document keeps its size for every file after it.
        """
        limit_mb = self.settings.processing.worker_recycle_rss_mb
        if not limit_mb or worker.process.pid is None or worker.retiring:
            return
        if not rss:  # a worker that could not measure itself
            _vm, rss = memory_of(worker.process.pid)
        if rss > limit_mb * 1024 * 1024:
            worker.retiring = True
            self._set_permit(worker)
            log.info(
                "worker_recycled",
                pid=worker.process.pid,
                rss_mb=rss // (1024 * 1024),
                limit_mb=limit_mb,
            )

    def _died_of_memory(self, worker: _Worker) -> bool:
        """Whether a dead worker most likely died of its memory limit."""
        limit_mb = self.settings.processing.worker_memory_mb
        code = worker.process.exitcode
        if not limit_mb or code is None or code >= 0:
            return False
        if -code not in _MEMORY_DEATH_SIGNALS:
            return False
        return worker.peak_vm_bytes >= _MEMORY_DEATH_FRACTION * limit_mb * 1024 * 1024

    def _bury(self, worker: _Worker, events: list[Event]) -> None:
        worker.process.join(timeout=5)
        reason = describe_exit(worker.process.exitcode)
        lost = worker.job is not None and not worker.killed_for_timeout
        if lost and worker.job is not None and self._died_of_memory(worker):
            limit_mb = self.settings.processing.worker_memory_mb
            events.append(
                Lost(
                    worker.job.file_id,
                    f"{memory_limit_error(limit_mb)}; worker process {reason}",
                    worker.job.lease,
                    out_of_memory=True,
                )
            )
            log.warning(
                "worker_died",
                pid=worker.process.pid,
                file_id=worker.job.file_id,
                reason=reason,
                peak_vm_mb=worker.peak_vm_bytes // (1024 * 1024),
                memory_limit_mb=limit_mb,
            )
        elif lost and worker.job is not None:
            events.append(Lost(worker.job.file_id, f"worker process {reason}", worker.job.lease))
            log.warning(
                "worker_died",
                pid=worker.process.pid,
                file_id=worker.job.file_id,
                reason=reason,
            )
        elif worker.job is None and not worker.retiring:
            log.warning("worker_died", pid=worker.process.pid, reason=reason)
        self._remove(worker)

    def _check_timeouts(self, events: list[Event]) -> None:
        now = self.clock.monotonic()
        for worker in list(self._workers):
            if worker.deadline is not None and worker.job is not None and now >= worker.deadline:
                job = worker.job
                worker.killed_for_timeout = True
                self._kill(worker)
                self._remove(worker)
                events.append(TimedOut(job.file_id, lease=job.lease))
                log.warning("file_timeout", file_id=job.file_id, pid=worker.process.pid)
