"""A scheduler on a fake clock and a fake pool, over a real spool and SQLite store.

Shared by tests/test_scheduler.py (the loop) and tests/test_outcomes.py (the
recording of outcomes). The fake pool runs nothing: a test says what each
attempt did (:meth:`FakePool.done`, :meth:`FakePool.failed` ...), and the
next :meth:`batchd.scheduler.Scheduler.turn` handles it. Waiting in the fake
pool moves the fake clock by the timeout the loop asked for, so timers
(back-off, the shutdown grace) pass without sleeping.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from fakes import FakeClock

from batchd.clock import iso
from batchd.config import Priority, Settings, load_settings
from batchd.messages import Done, Event, Failed, Job, Lost, Recorded, TimedOut
from batchd.metrics import Metrics
from batchd.outbox import Outbox
from batchd.pool import WorkerPool
from batchd.recorder import Recorder
from batchd.records import BatchRow, FileRow, NewBatch, NewFile
from batchd.scheduler import Scheduler
from batchd.spool import Spool
from batchd.store import SQLiteStore
from batchd.worker import claimed_job

#: Bound for the archiver thread to finish what a commit handed it.
WAIT_SECONDS = 30.0


class FakePool:
    """The part of :class:`batchd.pool.WorkerPool` the scheduler uses, running nothing."""

    def __init__(self, clock: FakeClock, size: int) -> None:
        self.clock = clock
        self.size = size
        self.jobs: dict[str, Job] = {}
        self.submitted: list[Job] = []
        self.cancelled: list[tuple[str, int]] = []
        self.events: list[Event] = []
        self.stopped = False
        #: the standing permit the scheduler last gave (WorkerPool.allow_claims).
        self.claims_allowed = False
        #: tokens of workers a test says are gone (WorkerPool.take_dead_tokens).
        self.gone_tokens: list[str] = []
        #: tokens whose claim a test says may have committed unanswered.
        self.unsure_tokens: list[str] = []
        #: tokens of the workers a test says run until the pool stops.
        self.tokens_at_stop: list[str] = []

    # -- what the scheduler calls ------------------------------------------------

    def idle(self) -> int:
        return self.size - len(self.jobs)

    def alive(self) -> int:
        return 0 if self.stopped else self.size

    def submit(self, job: Job) -> None:
        assert job.file_id not in self.jobs, "a file was dispatched twice"
        self.jobs[job.file_id] = job
        self.submitted.append(job)

    def cancel(self, file_id: str, lease: int) -> bool:
        job = self.jobs.get(file_id)
        if job is None or job.lease != lease:
            return False
        del self.jobs[file_id]
        self.cancelled.append((file_id, lease))
        return True

    def configure(self, settings: Settings) -> None:
        self.size = settings.processing.concurrency

    def allow_claims(self, allowed: bool) -> None:
        self.claims_allowed = allowed

    def take_dead_tokens(self) -> list[str]:
        tokens, self.gone_tokens = self.gone_tokens, []
        return tokens

    def take_unsure_tokens(self) -> list[str]:
        tokens, self.unsure_tokens = self.unsure_tokens, []
        return tokens

    def stop(self) -> None:
        self.stopped = True
        self.jobs.clear()
        # The workers stopped now are gone: their tokens go to the sweep.
        self.gone_tokens += self.tokens_at_stop

    def wait(
        self, timeout: float | None, extra: Sequence[Any] = ()
    ) -> tuple[list[Event], list[Any]]:
        """The reported events; with none, the clock moves by ``timeout`` (a timed-out wait)."""
        events, self.events = self.events, []
        if not events:
            self.clock.advance(timeout or 0.0)
        return events, []

    # -- what a test says the attempts did ----------------------------------------

    def job(self, relpath: str) -> Job:
        return next(j for j in self.jobs.values() if j.relpath == relpath)

    def done(self, relpath: str) -> Job:
        """The attempt succeeded: its result file is written, as a worker does."""
        job = self.jobs.pop(self.job(relpath).file_id)
        assert job.delivery is not None
        result = Path(job.delivery.result_path)
        result.parent.mkdir(parents=True, exist_ok=True)
        result.write_text(json.dumps({"relpath": relpath, "status": "completed"}))
        digest = hashlib.sha256(Path(job.path).read_bytes()).hexdigest()
        self.events.append(
            Done(
                job.file_id,
                {"rows": 1},
                digest,
                Path(job.path).stat().st_size,
                0.1,
                completed_at=iso(self.clock.now()),
                lease=job.lease,
            )
        )
        return job

    def done_recorded(
        self, relpath: str, recorder: Recorder, claimant: str | None = None, report: bool = True
    ) -> tuple[Job, Recorded | None]:
        """The attempt succeeded and its worker recorded it (batchd.recorder), as
        a real worker does: result file, commit, input move, batch end; with
        ``claimant`` the commit claims the worker's next file, which it then
        runs (as batchd.worker does). ``report=False``: it died before saying so."""
        job = self.jobs.pop(self.job(relpath).file_id)
        assert job.delivery is not None
        result = Path(job.delivery.result_path)
        result.parent.mkdir(parents=True, exist_ok=True)
        result.write_text(json.dumps({"relpath": relpath, "status": "completed"}))
        data = Path(job.path).read_bytes()
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        ended = iso(self.clock.now())
        recorded = recorder.record(
            job, job.delivery, {"rows": 1}, digest, len(data), ended, claimant
        )
        if recorded is not None and recorded.claimed is not None:
            started = claimed_job(recorded.claimed, recorder.settings, recorder.spool)
            recorded = replace(recorded, started=started)
            if started is not None and report:
                self.submit(started)
        if not report:
            return job, recorded
        self.events.append(
            Done(
                job.file_id,
                {} if recorded is not None else {"rows": 1},
                digest,
                len(data),
                0.1,
                completed_at=ended,
                lease=job.lease,
                recorded=recorded,
            )
        )
        return job, recorded

    def failed(self, relpath: str, permanent: bool = False, error: str = "boom") -> Job:
        job = self.jobs.pop(self.job(relpath).file_id)
        self.events.append(Failed(job.file_id, error, permanent, 0.1, lease=job.lease))
        return job

    def timed_out(self, relpath: str) -> Job:
        job = self.jobs.pop(self.job(relpath).file_id)
        self.events.append(TimedOut(job.file_id, lease=job.lease))
        return job

    def lost(self, relpath: str) -> Job:
        job = self.jobs.pop(self.job(relpath).file_id)
        self.events.append(Lost(job.file_id, "worker died (SIGKILL)", lease=job.lease))
        return job


@dataclass
class World:
    settings: Settings
    clock: FakeClock
    spool: Spool
    store: SQLiteStore
    pool: FakePool
    scheduler: Scheduler
    stopped: list[bool] = field(default_factory=list)

    def batch(
        self, name: str, relpaths: Sequence[str] = ("a.csv",), priority: Priority = Priority.NORMAL
    ) -> BatchRow:
        """A registered batch whose inputs lie in work/<priority>/<name>/."""
        folder = self.spool.work / str(priority) / name
        for rel in relpaths:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(f"id,name\n1,{rel}\n")
        batch = self.store.register_batch(
            NewBatch(
                name=name,
                priority=priority,
                user_id="alice",
                work_path=f"work/{priority}/{name}",
                source=f"inbox/{priority}/{name}",
                files=tuple(NewFile(rel, 20, None) for rel in relpaths),
            ),
            self.clock.now(),
        )
        self.clock.advance(1.0)  # registration order is FIFO order
        return batch

    def file(self, batch: BatchRow, relpath: str) -> FileRow:
        return next(f for f in self.store.list_files(batch.id) if f.relpath == relpath)

    def turn(self, times: int = 1) -> None:
        for _ in range(times):
            self.scheduler.turn()


#: The processing settings most tests use.
DEFAULTS: dict[str, Any] = {"concurrency": 2, "max_retries": 2, "retry_backoff_seconds": 2.0}


def make_world(tmp_path: Path, start_archiver: bool = True, **processing: Any) -> Iterator[World]:
    """A world whose ``processing`` settings are the defaults updated by ``processing``."""
    config = tmp_path / "config.toml"
    config.write_text("")
    settings = load_settings(config, {"BATCHD_SPOOL__ROOT": str(tmp_path / "spool")})
    settings = settings.model_copy(
        update={"processing": settings.processing.model_copy(update=processing)}
    )
    spool = Spool(settings)
    spool.init()
    store = SQLiteStore(spool.state / "batchd.db")
    clock = FakeClock()
    pool = FakePool(clock, settings.processing.concurrency)
    scheduler = Scheduler(
        settings, store, spool, Outbox(spool, store), cast(WorkerPool, pool), clock, Metrics()
    )
    world = World(settings, clock, spool, store, pool, scheduler)
    scheduler.on_stop = world.stopped.append
    if start_archiver:  # Scheduler.run() starts it itself
        scheduler.archiver.start()
    try:
        yield world
    finally:
        scheduler.archiver.stop()
        store.close()
