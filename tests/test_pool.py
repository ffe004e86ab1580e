"""Tests for batchd.pool and batchd.worker: real spawned workers running batchd.testing.procs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fakes import FakeClock

from batchd.clock import Clock, SystemClock
from batchd.config import Settings
from batchd.messages import Delivery, Done, Event, Failed, Job, Lost, Progress, TimedOut
from batchd.pool import WorkerPool, describe_exit
from batchd.records import FileRow, Status
from batchd.testing.settings import make_settings as settings_factory
from batchd.worker import memory_limit_error

WAIT_SECONDS = 60.0
CONTENT = b"name,qty\napple,3\npear,5\n"


def make_settings(tmp_path: Path, **env: str) -> Settings:
    # Any content: these jobs' inputs are named freely (the worker checks
    # content against the name again before each attempt).
    return settings_factory(tmp_path, **{"limits__allowed_types": '["*"]', **env})


def process_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (gone, or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return state in ("Z", "X")


def wait_for(cond: Callable[[], bool], timeout: float = WAIT_SECONDS) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return cond()
        time.sleep(0.02)
    return True


class Runner:
    """A pool plus helpers to submit jobs and collect its events."""

    def __init__(self, tmp_path: Path, clock: Clock, **env: str) -> None:
        self.tmp_path = tmp_path
        self.settings = make_settings(tmp_path, **env)
        self.clock = clock
        self.pool = WorkerPool(self.settings, clock)
        self.events: list[Event] = []
        self.pool.start()

    def job(self, processor: str, data: bytes = CONTENT, name: str = "in.csv") -> Job:
        file_id = str(uuid.uuid4())
        folder = self.tmp_path / "inputs" / file_id
        folder.mkdir(parents=True)
        path = folder / name
        path.write_bytes(data)
        return Job(
            file_id=file_id,
            batch_id="batch-1",
            relpath=name,
            path=str(path),
            # batchd.testing.procs: importable in every spawned worker.
            processor=f"batchd.testing.procs:{processor}",
            output_dir=str(self.tmp_path / "scratch" / file_id),
        )

    def submit(self, processor: str, **kwargs: str | bytes) -> Job:
        job = self.job(processor, **kwargs)  # type: ignore[arg-type]
        self.pool.submit(job)
        return job

    def submit_delivered(self, processor: str, outbox: Path) -> tuple[Job, Delivery]:
        """Submit a job whose worker writes the result under ``outbox`` itself."""
        job = self.job(processor)
        row = FileRow(
            id=job.file_id,
            batch_id=job.batch_id,
            filename=job.relpath,
            relpath=job.relpath,
            file_size=None,
            file_hash=None,
            status=Status.PROCESSING,
            progress=0,
            result=None,
            error=None,
            retry_count=0,
            attempts=1,
            created_at="2026-11-28T10:00:00.000Z",
            started_at="2026-11-28T10:00:01.000Z",
            completed_at=None,
            processor=job.processor,
        )
        delivery = Delivery(
            file=row,
            started_at="2026-11-28T10:00:01.000Z",
            result_path=str(outbox / "results" / f"{job.relpath}.json"),
            outputs_path=str(outbox / "results" / f"{job.relpath}.files"),
        )
        job = dataclasses.replace(job, delivery=delivery)
        self.pool.submit(job)
        return job, delivery

    def wait_until(
        self, cond: Callable[[list[Event]], bool], timeout: float = WAIT_SECONDS
    ) -> list[Event]:
        """Collect events over pool.wait(0.2) until ``cond(events)`` holds."""
        deadline = time.monotonic() + timeout
        while not cond(self.events):
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met in {timeout}s; events: {self.events}")
            events, _ = self.pool.wait(0.2)
            self.events.extend(events)
        return self.events

    def final(self, job: Job) -> Event:
        """Wait for the one final event (Done, Failed, Lost, TimedOut) of ``job``."""
        kinds = (Done, Failed, Lost, TimedOut)

        def finals() -> list[Event]:
            return [e for e in self.events if isinstance(e, kinds) and e.file_id == job.file_id]

        self.wait_until(lambda events: bool(finals()))
        (event,) = finals()
        return event

    def progress(self, job: Job) -> list[int]:
        return [
            e.percent for e in self.events if isinstance(e, Progress) and e.file_id == job.file_id
        ]


@pytest.fixture
def make_runner(tmp_path: Path) -> Iterator[Callable[..., Runner]]:
    runners: list[Runner] = []

    def make(clock: Clock | None = None, **env: str) -> Runner:
        env.setdefault("processing__concurrency", "1")
        runner = Runner(tmp_path, clock or SystemClock(), **env)
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        runner.pool.stop()


# -- outcomes ------------------------------------------------------------------------------


def test_done_carries_hash_size_and_result(make_runner: Callable[..., Runner]) -> None:
    """A successful job ends in Done with the input's sha256, size and the result dict."""
    runner = make_runner()
    job = runner.submit("ok")
    event = runner.final(job)
    assert isinstance(event, Done)
    assert event.file_hash == "sha256:" + hashlib.sha256(CONTENT).hexdigest()
    assert event.file_size == len(CONTENT)
    assert event.result == {"size": len(CONTENT)}
    assert event.seconds >= 0
    assert runner.pool.idle() == 1
    assert runner.pool.running() == []


def test_progress_is_reported_before_done(make_runner: Callable[..., Runner]) -> None:
    """ctx.progress(50) arrives as a Progress event ahead of Done."""
    runner = make_runner()
    job = runner.submit("ok")
    runner.final(job)
    mine = [e for e in runner.events if e.file_id == job.file_id]
    assert mine[0] == Progress(job.file_id, 50)
    assert isinstance(mine[-1], Done)
    assert runner.progress(job) == [50]


def test_ordinary_error_is_a_retryable_failure(make_runner: Callable[..., Runner]) -> None:
    """An exception from the processor ends in Failed, not permanent, naming the error."""
    runner = make_runner()
    event = runner.final(runner.submit("boom"))
    assert isinstance(event, Failed)
    assert (event.error, event.permanent) == ("RuntimeError: boom", False)


def test_permanent_error_is_not_retryable(make_runner: Callable[..., Runner]) -> None:
    """PermanentError ends in Failed with permanent=True and its message."""
    runner = make_runner()
    event = runner.final(runner.submit("permanent", name="x.pdf"))
    assert isinstance(event, Failed)
    assert event.permanent
    assert event.error == "x.pdf is damaged beyond repair"


def test_non_json_result_is_a_permanent_failure(make_runner: Callable[..., Runner]) -> None:
    """A result JSON cannot hold fails permanently, saying so."""
    runner = make_runner()
    event = runner.final(runner.submit("not_json"))
    assert isinstance(event, Failed)
    assert event.permanent
    assert "not JSON" in event.error


def test_non_dict_result_is_a_permanent_failure(make_runner: Callable[..., Runner]) -> None:
    """A processor returning a list fails permanently, naming the type."""
    runner = make_runner()
    event = runner.final(runner.submit("not_a_dict"))
    assert isinstance(event, Failed)
    assert event.permanent
    assert "list" in event.error


def test_missing_input_fails_with_the_os_error(make_runner: Callable[..., Runner]) -> None:
    """An input that disappeared fails with the OS error and its path."""
    runner = make_runner()
    job = runner.job("ok")
    Path(job.path).unlink()
    runner.pool.submit(job)
    event = runner.final(job)
    assert isinstance(event, Failed)
    assert "No such file or directory" in event.error
    assert job.path in event.error


def test_unknown_processor_fails_the_attempt(make_runner: Callable[..., Runner]) -> None:
    """A processor name that does not resolve fails the file, naming the processor."""
    runner = make_runner()
    event = runner.final(runner.submit("no_such_function"))
    assert isinstance(event, Failed)
    assert "procs:no_such_function" in event.error


def test_a_worker_serves_many_jobs(make_runner: Callable[..., Runner]) -> None:
    """Workers are long-lived: one worker runs several jobs in turn."""
    runner = make_runner()
    pids = []
    for _ in range(3):
        event = runner.final(runner.submit("whoami"))
        assert isinstance(event, Done)
        pids.append(event.result["pid"])
    assert len(set(pids)) == 1
    assert runner.pool.spawned == 1


def test_worker_leads_its_own_process_group(make_runner: Callable[..., Runner]) -> None:
    """Each worker is its own process group leader (so a timeout kills its children too)."""
    runner = make_runner()
    event = runner.final(runner.submit("whoami"))
    assert isinstance(event, Done)
    assert event.result["pgid"] == event.result["pid"]
    assert event.result["pgid"] != os.getpgid(0)


def test_jobs_run_in_parallel(make_runner: Callable[..., Runner]) -> None:
    """With concurrency 3, three gated jobs are all running at once."""
    runner = make_runner(processing__concurrency="3")
    jobs = [runner.submit("gate") for _ in range(3)]
    assert runner.pool.idle() == 0
    runner.wait_until(lambda events: all(runner.progress(j) == [10] for j in jobs))
    for job in jobs:
        Path(f"{job.path}.go").touch()
    results = [runner.final(job) for job in jobs]
    assert all(isinstance(e, Done) for e in results)
    assert len({e.result["pid"] for e in results if isinstance(e, Done)}) == 3


def test_submit_without_idle_worker_raises(make_runner: Callable[..., Runner]) -> None:
    """submit() with every worker busy is a programming error."""
    runner = make_runner()
    runner.submit("hang")
    with pytest.raises(RuntimeError, match="no idle worker"):
        runner.pool.submit(runner.job("ok"))


# -- dying workers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("processor", "reason"),
    [
        ("die", "worker process exited with status 3"),
        ("segfault", "worker process killed by signal 11 (SIGSEGV)"),
    ],
)
def test_dying_worker_is_lost_and_replaced(
    make_runner: Callable[..., Runner], processor: str, reason: str
) -> None:
    """A worker that dies mid-job yields Lost with how it died, and the pool respawns it."""
    runner = make_runner(processing__concurrency="2")
    job = runner.submit(processor)
    event = runner.final(job)
    assert event == Lost(job.file_id, reason)
    assert runner.pool.alive() == 2
    assert runner.pool.idle() == 2
    assert runner.pool.spawned == 3
    assert isinstance(runner.final(runner.submit("ok")), Done)


def test_sigkilled_worker_is_lost_and_replaced(make_runner: Callable[..., Runner]) -> None:
    """An external SIGKILL of the worker running a file yields Lost, then a new worker."""
    runner = make_runner()
    job = runner.submit("hang")
    runner.wait_until(lambda events: runner.progress(job) == [1])
    pid = runner.pool.job_pid(job.file_id)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    event = runner.final(job)
    assert event == Lost(job.file_id, "worker process killed by signal 9 (SIGKILL)")
    assert runner.pool.job_pid(job.file_id) is None
    assert runner.pool.alive() == 1
    assert pid not in runner.pool.pids()
    assert isinstance(runner.final(runner.submit("ok")), Done)


def test_idle_worker_death_is_replaced_without_event(make_runner: Callable[..., Runner]) -> None:
    """An idle worker that dies produces no event and is replaced."""
    runner = make_runner()
    (pid,) = runner.pool.pids()
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: process_gone(pid))
    runner.wait_until(lambda events: pid not in runner.pool.pids())
    assert runner.events == []
    assert runner.pool.alive() == 1
    assert isinstance(runner.final(runner.submit("ok")), Done)


# -- timeouts ------------------------------------------------------------------------------------


def test_timeout_kills_worker_and_its_child(make_runner: Callable[..., Runner]) -> None:
    """Past timeout_seconds the file is TimedOut and its worker and the worker's child die."""
    clock = FakeClock(500.0)
    runner = make_runner(clock, processing__timeout_seconds="30")
    job = runner.submit("hang_with_child")
    runner.wait_until(lambda events: runner.progress(job) == [1])
    worker_pid = runner.pool.job_pid(job.file_id)
    child_pid = int((Path(job.output_dir) / "child.pid").read_text())
    assert worker_pid is not None and not process_gone(child_pid)
    clock.advance(29.9)
    events, _ = runner.pool.wait(0)
    assert not any(isinstance(e, TimedOut) for e in events)
    clock.advance(0.1)
    event = runner.final(job)
    assert event == TimedOut(job.file_id, "Processing timeout exceeded")
    assert wait_for(lambda: process_gone(worker_pid))
    assert wait_for(lambda: process_gone(child_pid))
    assert runner.pool.alive() == 1
    assert not any(isinstance(e, Lost) for e in runner.events)


def test_next_deadline_follows_submissions(make_runner: Callable[..., Runner]) -> None:
    """next_deadline is the submit time plus timeout_seconds, and clears when done."""
    clock = FakeClock(500.0)
    runner = make_runner(clock, processing__timeout_seconds="100")
    assert runner.pool.next_deadline() is None
    job = runner.submit("ok")
    assert runner.pool.next_deadline() == clock.t + 100
    runner.final(job)
    assert runner.pool.next_deadline() is None


# -- resizing and stopping ------------------------------------------------------------


def test_configure_larger_grows_at_once(make_runner: Callable[..., Runner], tmp_path: Path) -> None:
    """configure() with a larger concurrency spawns the extra workers at once."""
    runner = make_runner()
    runner.pool.configure(make_settings(tmp_path, processing__concurrency="3"))
    assert runner.pool.alive() == 3
    assert runner.pool.idle() == 3


def test_configure_reaches_idle_workers(make_runner: Callable[..., Runner], tmp_path: Path) -> None:
    """Workers that already exist run their next job with the new settings."""
    runner = make_runner(processing__concurrency="2")
    assert isinstance(runner.final(runner.submit("whoami")), Done)
    runner.pool.configure(
        make_settings(tmp_path, processing__concurrency="2", processing__max_rows="7")
    )
    jobs = [runner.submit("whoami") for _ in range(2)]
    events = [runner.final(job) for job in jobs]
    assert all(isinstance(e, Done) for e in events)
    assert [e.result["max_rows"] for e in events if isinstance(e, Done)] == [7, 7]
    assert len({e.result["pid"] for e in events if isinstance(e, Done)}) == 2
    assert runner.pool.spawned == 2


def test_configure_smaller_spares_the_busy_worker(
    make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    """Shrinking retires idle workers at once and a busy one only after its job."""
    runner = make_runner(processing__concurrency="3")
    busy = runner.submit("gate")
    runner.wait_until(lambda events: runner.progress(busy) == [10])
    busy_pid = runner.pool.job_pid(busy.file_id)
    idle_pids = [pid for pid in runner.pool.pids() if pid != busy_pid]
    runner.pool.configure(make_settings(tmp_path, processing__concurrency="1"))
    assert runner.pool.pids() == [busy_pid]
    assert all(wait_for(lambda pid=pid: process_gone(pid)) for pid in idle_pids)
    assert runner.pool.idle() == 0
    Path(f"{busy.path}.go").touch()
    event = runner.final(busy)
    assert isinstance(event, Done)
    assert event.result["pid"] == busy_pid
    assert runner.pool.alive() == 1
    assert runner.pool.idle() == 1


def test_shrink_below_busy_count_retires_after_jobs(
    make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    """With every worker busy, shrinking kills none and ends with the new size."""
    runner = make_runner(processing__concurrency="2")
    jobs = [runner.submit("gate") for _ in range(2)]
    runner.wait_until(lambda events: all(runner.progress(j) == [10] for j in jobs))
    pids = set(runner.pool.pids())
    runner.pool.configure(make_settings(tmp_path, processing__concurrency="1"))
    assert set(runner.pool.pids()) == pids
    assert runner.pool.idle() == 0
    for job in jobs:
        Path(f"{job.path}.go").touch()
    assert all(isinstance(runner.final(job), Done) for job in jobs)
    runner.wait_until(lambda events: len(runner.pool.pids()) == 1)
    assert runner.pool.alive() == 1
    assert runner.pool.idle() == 1


def test_a_shrink_withdraws_the_claim_permit_of_the_retiring_busy_worker(
    make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    """allow_claims gives every worker its permit; a concurrency lowered below the busy
    workers withdraws it from the busy one left to retire (it claims no next file), and
    a retired worker's token is handed over for the sweep of its own claims."""
    runner = make_runner(processing__concurrency="2")
    runner.pool.allow_claims(True)
    assert list(runner.pool.permits().values()) == [True, True]
    jobs = [runner.submit("gate") for _ in range(2)]
    runner.wait_until(lambda events: all(runner.progress(j) == [10] for j in jobs))
    runner.pool.configure(make_settings(tmp_path, processing__concurrency="1"))
    assert sorted(runner.pool.permits().values()) == [False, True]
    runner.pool.allow_claims(True)  # the loop's next turn: the retiring one stays without
    assert sorted(runner.pool.permits().values()) == [False, True]
    assert runner.pool.take_dead_tokens() == []
    for job in jobs:
        Path(f"{job.path}.go").touch()
    assert all(isinstance(runner.final(job), Done) for job in jobs)
    runner.wait_until(lambda events: len(runner.pool.pids()) == 1)
    assert list(runner.pool.permits().values()) == [True]
    assert len(runner.pool.take_dead_tokens()) == 1
    runner.pool.allow_claims(False)
    assert list(runner.pool.permits().values()) == [False]


def test_stop_ends_every_worker(make_runner: Callable[..., Runner]) -> None:
    """stop() ends idle and busy workers alike."""
    runner = make_runner(processing__concurrency="3")
    job = runner.submit("hang")
    runner.wait_until(lambda events: runner.progress(job) == [1])
    pids = runner.pool.pids()
    assert len(pids) == 3
    runner.pool.stop()
    assert runner.pool.pids() == []
    assert runner.pool.alive() == 0
    assert all(wait_for(lambda pid=pid: process_gone(pid)) for pid in pids)


def test_memory_limit_fails_the_attempt(make_runner: Callable[..., Runner]) -> None:
    """With worker_memory_mb set, a processor that allocates too much fails for good, saying so."""
    runner = make_runner(processing__worker_memory_mb="1024")
    event = runner.final(runner.submit("hog_at_once"))
    assert isinstance(event, Failed)
    assert event.error == memory_limit_error(1024)
    assert "exceeded the worker memory limit of 1024 MiB" in event.error
    assert event.permanent
    assert isinstance(runner.final(runner.submit("ok")), Done)


def test_describe_exit_words() -> None:
    """describe_exit names the signal or the status."""
    assert describe_exit(None) == "still running"
    assert describe_exit(0) == "exited with status 0"
    assert describe_exit(-9) == "killed by signal 9 (SIGKILL)"
    assert describe_exit(-200) == "killed by signal 200 (unknown)"


# -- delivery: the worker writes a successful attempt's result ------------------------------


def test_worker_writes_result_before_done(
    make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    """With a Delivery, Done arrives only after the result file is on disk, describing it."""
    runner = make_runner()
    job, delivery = runner.submit_delivered("ok", tmp_path / "outbox")
    event = runner.final(job)
    assert isinstance(event, Done)
    doc = json.loads(Path(delivery.result_path).read_text())
    assert doc == {
        "batch_id": job.batch_id,
        "file_id": job.file_id,
        "filename": job.relpath,
        "relpath": job.relpath,
        "status": "completed",
        "attempts": 1,
        "file_size": len(CONTENT),
        "file_hash": "sha256:" + hashlib.sha256(CONTENT).hexdigest(),
        "processor": "batchd.testing.procs:ok",
        "started_at": "2026-11-28T10:00:01.000Z",
        "completed_at": event.completed_at,
        "duration_ms": doc["duration_ms"],
        "result": {"size": len(CONTENT)},
        "error": None,
    }
    assert doc["duration_ms"] >= 0
    assert not Path(delivery.outputs_path).exists()
    assert not Path(job.output_dir).exists()


def test_worker_moves_outputs_next_to_result(
    make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    """Files a processor leaves in its output folder end in results/<relpath>.files/."""
    runner = make_runner()
    job, delivery = runner.submit_delivered("with_output", tmp_path / "outbox")
    assert isinstance(runner.final(job), Done)
    outputs = Path(delivery.outputs_path)
    assert sorted(p.name for p in outputs.iterdir()) == ["summary.txt"]
    assert (outputs / "summary.txt").read_text() == f"{job.relpath}\n"
    assert not Path(job.output_dir).exists()


def test_result_write_failure_is_retryable(
    make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    """A result that cannot be written is a retryable failure, never a Done."""
    runner = make_runner()
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    (outbox / "results").write_text("a file where the results folder should be")
    job, delivery = runner.submit_delivered("ok", outbox)
    event = runner.final(job)
    assert isinstance(event, Failed)
    assert not event.permanent
    assert event.error.startswith("cannot write the result file: ")
    assert not Path(delivery.result_path).exists()


def test_input_changed_while_processing_is_retryable(
    make_runner: Callable[..., Runner], tmp_path: Path
) -> None:
    """An input that grows during the attempt fails it (retryable) instead of a stale hash."""
    runner = make_runner()
    job, delivery = runner.submit_delivered("grows_input", tmp_path / "outbox")
    event = runner.final(job)
    assert isinstance(event, Failed)
    assert not event.permanent
    assert "input changed while it was being processed" in event.error
    assert f"({len(CONTENT)} bytes, now {len(CONTENT) + 9})" in event.error
    assert not Path(delivery.result_path).exists()


def test_workers_hold_no_http_token_or_database_url(
    make_runner: Callable[..., Runner], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's settings and environment lack the HTTP tokens and the database URL."""
    secret = "daemon-http-token-0123456789"
    monkeypatch.setenv("BATCHD_HTTP__TOKEN", secret)
    monkeypatch.setenv("BATCHD_DATABASE__URL", "postgresql://batchd:pw@db.invalid/batchd")
    runner = make_runner(
        http__token=secret,
        http__users='{"alice": "alice-token-0123456789"}',
        database__url="postgresql://batchd:pw@db.invalid/batchd",
    )
    assert runner.settings.http.token == secret  # the daemon keeps them
    event = runner.final(runner.submit("whoami"))
    assert isinstance(event, Done)
    assert event.result["http_token"] == ""
    assert event.result["user_tokens"] == {}
    assert event.result["database_url"] is None
    assert event.result["secret_env"] == []
    runner.pool.configure(runner.settings)  # a reload sends settings: still without them
    event = runner.final(runner.submit("whoami"))
    assert isinstance(event, Done)
    assert (event.result["http_token"], event.result["database_url"]) == ("", None)


def test_exec_input_is_the_file_the_worker_opened(make_runner: Callable[..., Runner]) -> None:
    """exec's {input} reads the file the worker opened and checked, even when its name in
    the spool became a link to a secret while the command ran."""
    gate = Path(tempfile.mkdtemp(prefix="batchd-exec-gate-"))
    script = 'touch "$1/started"; while [ ! -e "$1/go" ]; do sleep 0.02; done; cat "$0"'
    runner = make_runner(exec__command=json.dumps(["sh", "-c", script, "{input}", str(gate)]))
    secret = runner.tmp_path / "secret.csv"
    secret.write_bytes(b"TOP-SECRET\n")
    job = runner.job("x", name="in.csv")
    job = dataclasses.replace(job, processor="exec")
    runner.pool.submit(job)
    assert wait_for(lambda: (gate / "started").exists())
    Path(job.path).unlink()
    Path(job.path).symlink_to(secret)
    (gate / "go").touch()
    event = runner.final(job)
    assert isinstance(event, Done)
    assert event.result == {"stdout": CONTENT.decode()}
    shutil.rmtree(gate)


def test_a_pipe_above_descriptor_1023_is_read(tmp_path: Path) -> None:
    """The loop's readiness check on a worker pipe works past select()'s 1024 limit
    (the unit allows 65536 open files)."""
    import os
    from multiprocessing import Pipe
    from multiprocessing.connection import Connection

    from batchd.pool import _readable

    a, b = Pipe(duplex=True)
    high = Connection(os.dup2(b.fileno(), 1500))
    try:
        assert not _readable(high)
        a.send("hello")
        assert _readable(high)
        assert high.recv() == "hello"
    finally:
        high.close()
        a.close()
        b.close()


def test_a_worker_claimed_files_deadline_counts_from_its_claim() -> None:
    """A file a worker claimed itself runs from its claim's commit; the daemon hears of it
    a turn later. The deadline counts from the claim's stamp (the machine's monotonic
    clock), never past the timeout either way, and from now when there is no stamp."""
    from batchd.pool import claim_deadline

    now, timeout = 1_000.0, 60.0
    assert claim_deadline(now, timeout, 0.0) == now + timeout
    waited = claim_deadline(now, timeout, time.monotonic() - 5.0)
    assert now + timeout - 5.0 - 1.0 <= waited <= now + timeout - 5.0
    assert claim_deadline(now, timeout, time.monotonic() + 30.0) == now + timeout
    assert claim_deadline(now, timeout, time.monotonic() - 3 * timeout) == now
