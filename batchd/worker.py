"""The code that runs inside a worker process.

A worker is a long-lived child process with one duplex pipe to the daemon.
It receives :class:`Job` messages, runs the processor, and answers with
:class:`Progress` and then exactly one :class:`Done` or :class:`Failed`.

A successful attempt is delivered here, in the worker: its outputs are moved
next to the result and the result file is written and fsynced before
:class:`Done` is sent. The daemon records the file as completed only after
that, so "completed in the database" always means "result on disk", and the
costly part of the write (the fsync) runs in parallel across workers instead
of in the daemon's single loop. With ``Delivery.record`` the worker then
records the success itself (:mod:`batchd.recorder`: commit, input move,
batch end), so the daemon only hears that it happened; failures are still
recorded by the daemon. A worker that crashes can only ever lose its own
attempt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from batchd import faults
from batchd import log as logsetup
from batchd.children import die_with_parent
from batchd.clock import iso
from batchd.config import Settings
from batchd.errors import BatchdError, PermanentError
from batchd.faults import crash_point
from batchd.fsutil import move_outputs, write_json_atomic, write_json_in
from batchd.members import batch_limit_error, check
from batchd.messages import Delivery, Done, Failed, Job, Progress
from batchd.processors import choose
from batchd.recorder import Recorder, scheduler_log
from batchd.records import FileTask, Status
from batchd.safefs import UnsafePath, named_view, open_member
from batchd.spool import Spool
from batchd.views import result_document

HASH_CHUNK = 1024 * 1024


def _limit_memory(megabytes: int) -> None:
    if megabytes > 0:
        limit = megabytes * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def own_rss() -> int:
    """This process's resident size in bytes (0 if /proc cannot say)."""
    try:
        # os.open, not open(): a buffered file object makes ten system calls
        # of this (an ioctl, two seeks, two stats ...), once per file processed.
        fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return int(os.read(fd, 256).split()[1]) * _PAGE_SIZE
        finally:
            os.close(fd)
    except (OSError, ValueError, IndexError):
        return 0


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def memory_limit_error(megabytes: int) -> str:
    """The error of a file whose worker ran out of its memory limit."""
    return (
        f"exceeded the worker memory limit of {megabytes} MiB"
        " (processing.worker_memory_mb): the document needs more memory than a worker may use"
    )


def hash_file(path: Path) -> tuple[str, int]:
    """``("sha256:<hex>", size)`` of a file, read once in chunks."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return hash_fd(fd)
    finally:
        os.close(fd)


def hash_fd(fd: int) -> tuple[str, int]:
    """``("sha256:<hex>", size)`` of open file ``fd``, read from its start in chunks."""
    digest = hashlib.sha256()
    size = 0
    offset = 0
    while chunk := os.pread(fd, HASH_CHUNK, offset):
        digest.update(chunk)
        size += len(chunk)
        offset += len(chunk)
    return f"sha256:{digest.hexdigest()}", size


def open_input(job: Job, settings: Settings) -> tuple[int, os.stat_result]:
    """Open the job's input once, following no link at any component below the
    spool root (or below its own folder, for a path outside the spool), and
    check it again exactly as the scan checked it when it was registered.

    Raises :class:`PermanentError` with the scan's own words when it is now a
    link, not a regular file, over the size limit or of a refused type: a
    file re-queued by ``batchd retry`` or by hand keeps its refusal.
    """
    path = job.path
    root = settings.spool.root
    if not root.is_absolute():
        root = root.absolute()
    # Strings, not path objects, once per file (issue 15): ``job.path`` is a
    # normalised absolute path (the daemon's str() of one), so a prefix test
    # is what relative_to would decide.
    inside = _under(path, root)
    if inside is not None:
        rel = inside
    else:
        outside = Path(path)
        root, rel = outside.parent, outside.name
    try:
        fd, st = open_member(root, rel)
    except UnsafePath as exc:
        raise PermanentError(f"{job.relpath}: {exc.message}") from exc
    except OSError as exc:
        # Name the input the user knows, not the last component opened.
        raise type(exc)(exc.errno, exc.strerror, path) from exc
    # The same device and another inode: the member was replaced after the
    # scan (by its dropper, still inside it). Another device: batchd itself
    # copied it back from an archive on another filesystem.
    if job.file_ino is not None and st.st_dev == job.file_dev and st.st_ino != job.file_ino:
        os.close(fd)
        raise PermanentError(
            f"{job.relpath}: replaced by another file after it was registered"
            f" (inode {job.file_ino}, now {st.st_ino}): not read; drop it again"
        )
    problem = check(fd, st, rel.rpartition("/")[2], settings.limits)
    if problem is not None:
        os.close(fd)
        raise PermanentError(f"{job.relpath}: {problem}")
    return fd, st


def _under(path: str, root: Path) -> str | None:
    """``path`` relative to ``root`` (both absolute and normalised), or None when
    it is not below it."""
    prefix = str(root).rstrip("/") + "/"
    if path.startswith(prefix) and len(path) > len(prefix):
        return path[len(prefix) :]
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BatchdError):
        return exc.message
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{type(exc).__name__}: {exc.strerror}{where}"
    text = str(exc) or traceback.format_exception_only(type(exc), exc)[-1].strip()
    return f"{type(exc).__name__}: {text}"


def deliver(
    job: Job, delivery: Delivery, result: dict[str, Any], file_hash: str, size: int, ended: str
) -> None:
    """Move the attempt's outputs next to its result, then write the result file."""
    root = Path(delivery.spool_root) if delivery.spool_root else None
    rel = _under(delivery.result_path, root) if root is not None else None
    # Outputs through verified folders only when the result goes there too.
    move_outputs(job.output_dir, delivery.outputs_path, root=root if rel is not None else None)
    final = replace(
        delivery.file,
        status=Status.COMPLETED,
        result=None,
        error=None,
        file_hash=file_hash,
        file_size=size,
        processor=job.processor,
        started_at=delivery.started_at,
        completed_at=ended,
        progress=100,
    )
    document = result_document(final)
    document["result"] = result
    if root is not None and rel is not None:
        # Under the spool root: through folders reached without following a link.
        write_json_in(root, rel, document, durable=delivery.fsync)
    else:
        write_json_atomic(Path(delivery.result_path), document, durable=delivery.fsync)


def run_job(
    job: Job,
    settings: Settings,
    conn: Connection,
    recorder: Recorder | None = None,
    claimant: Callable[[], str | None] | None = None,
) -> Done | Failed:
    """Hash the input, run the processor, deliver its result, and describe how it ended.

    ``claimant`` says, asked right before the commit, under which token this
    worker may claim its next file in it (None: it may not).
    """
    from batchd.processors import ProcessorContext, resolve

    started = time.monotonic()
    output_dir = Path(job.output_dir)
    try:
        fd, before = open_input(job, settings)
        try:
            file_hash, size = hash_fd(fd)
            fn = resolve(job.processor)
            ctx = ProcessorContext(
                batch_id=job.batch_id,
                file_id=job.file_id,
                relpath=job.relpath,
                output_path=output_dir,
                settings=settings,
                report=lambda pct: conn.send(Progress(job.file_id, pct)),
            )
            try:
                # The processor (and exec's {input}) gets a path to the file
                # opened and checked above, never the name in the spool.
                with named_view(fd, job.relpath) as view:
                    result = fn(view, ctx)
            finally:
                # Remove the output folder when the processor left nothing in it.
                if ctx.output_dir_made:
                    with contextlib.suppress(OSError):
                        output_dir.rmdir()
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if not isinstance(result, dict):
            raise PermanentError(
                f"processor {job.processor} returned {type(result).__name__}, not a dict"
            )
        try:
            # Refuse what the outbox could not store, here, where the message is clear.
            json.dumps(result)
        except (TypeError, ValueError) as exc:
            raise PermanentError(
                f"processor {job.processor} returned a result that is not JSON: {exc}"
            ) from exc
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            # A writer still had the file open and wrote to it after the claim:
            # the result would describe bytes the file no longer has. Retry, so
            # the next attempt sees (and hashes) the file as it now is.
            raise RuntimeError(
                f"input changed while it was being processed ({before.st_size} bytes,"
                f" now {after.st_size}); a writer still has it open? retrying"
            )
        ended = iso(datetime.now(UTC))
        if job.delivery is not None:
            try:
                deliver(job, job.delivery, result, file_hash, size, ended)
            except OSError as exc:
                # Not completed without its result on disk: a retryable failure
                # (the disk may have room again on the next attempt).
                error = f"cannot write the result file: {exc.strerror or exc}"
                return Failed(job.file_id, error, False, time.monotonic() - started)
        recorded = None
        token = None
        if job.delivery is not None and job.delivery.record and recorder is not None:
            crash_point("after_result_write")
            token = claimant() if claimant is not None and job.delivery.may_claim else None
            recorded = recorder.record(job, job.delivery, result, file_hash, size, ended, token)
        return Done(
            job.file_id,
            # The daemon needs the result only when it records it itself.
            {} if recorded is not None else result,
            file_hash,
            size,
            time.monotonic() - started,
            ended,
            recorded=recorded,
            claim_unknown=recorded is None and token is not None,
        )
    except PermanentError as exc:
        return Failed(job.file_id, _describe(exc), True, time.monotonic() - started)
    except MemoryError:
        mb = settings.processing.worker_memory_mb
        if mb:
            # The document needs more than a worker may have: another attempt
            # would need just as much, so this is permanent, not retried.
            return Failed(job.file_id, memory_limit_error(mb), True, time.monotonic() - started)
        return Failed(job.file_id, "out of memory", False, time.monotonic() - started)
    except Exception as exc:
        return Failed(job.file_id, _describe(exc), False, time.monotonic() - started)


def claimed_job(task: FileTask, settings: Settings, spool: Spool) -> Job | None:
    """The job of a file this worker claimed itself, as the daemon's dispatch builds it.

    None leaves the file to the daemon, which does what its own claim would:
    its input is not where a fresh file's input is (moved or deleted: the
    daemon fails it), or its batch is over a limit lowered since it was
    registered (the daemon keeps the refusal).
    """
    file = task.file
    if batch_limit_error(task.batch_files, settings.limits) is not None:
        return None
    path = spool.input_file(task.work_path, file.relpath)
    if not os.path.lexists(path):
        return None
    processor = choose(settings, file.relpath)
    started_at = file.started_at or iso(datetime.now(UTC))
    return job_for(task, path, processor, started_at, spool, settings, may_claim=True)


def job_for(
    task: FileTask,
    path: str,
    processor: str,
    started_at: str,
    spool: Spool,
    settings: Settings,
    may_claim: bool,
) -> Job:
    """The job of one attempt at ``task``'s file, read from ``path``: the daemon's
    dispatch and a worker's own claim build it alike.

    The worker makes the result durable, commits the success and moves the
    input itself (:mod:`batchd.recorder`); failures go to the daemon. With
    ``may_claim`` it may then claim its next file in the same commit (issue 15).
    """
    file = task.file
    delivery = Delivery(
        file=file,
        started_at=started_at,
        result_path=spool.result_file(task.batch_name, file.relpath),
        outputs_path=spool.outputs_file(task.batch_name, file.relpath),
        fsync=True,
        spool_root=str(spool.root),
        record=True,
        work_path=task.work_path,
        batch_name=task.batch_name,
        max_inline_result_bytes=settings.limits.max_inline_result_bytes,
        may_claim=may_claim,
    )
    return Job(
        file.id,
        file.batch_id,
        file.relpath,
        path,
        processor,
        spool.scratch_file(file.id),
        delivery,
        lease=file.lease_gen,
        file_dev=file.file_dev,
        file_ino=file.file_ino,
    )


class _Permit:
    """Whether this worker may claim its next file now, and under which token.

    The daemon's standing permit is one shared byte (``flag``) it clears when
    claims must stop (draining, retiring this worker, a lowered concurrency,
    the database away); what the daemon sent meanwhile (a reload, the order
    to retire) is read first, since a worker that claims runs its next file
    without reading its pipe in between. A worker grown past
    ``processing.worker_recycle_rss_mb`` claims nothing either: the daemon
    replaces it after this file (``recycle_mb`` reads the current setting).
    """

    def __init__(
        self,
        conn: Connection,
        token: str,
        flag: Any,
        on_settings: Callable[[Settings], None],
        recycle_mb: Callable[[], int] = lambda: 0,
    ) -> None:
        self.conn = conn
        self.token = token
        self.flag = flag
        self.on_settings = on_settings
        self.recycle_mb = recycle_mb
        #: the daemon asked this worker to end (None on the pipe).
        self.stop = False
        #: a job the daemon sent meanwhile (it never does while this worker runs one).
        self.queued: Job | None = None
        #: the resident size read for the recycle check of the current file, if
        #: it was: the worker reports that one (read at the commit, after the
        #: processor ran) instead of reading /proc again (see :meth:`take_rss`).
        self.rss_bytes: int | None = None

    def __call__(self) -> str | None:
        with contextlib.suppress(EOFError, OSError):
            while self.conn.poll(0):
                message = self.conn.recv()
                if message is None:
                    self.stop = True
                elif isinstance(message, Settings):
                    self.on_settings(message)
                elif isinstance(message, Job):
                    self.queued = message
        if not self.token or self.flag is None or self.stop or self.queued is not None:
            return None
        if not self.flag.value:
            return None
        limit_mb = self.recycle_mb()
        if limit_mb:
            self.rss_bytes = own_rss()
            if self.rss_bytes > limit_mb * 1024 * 1024:
                return None
        return self.token

    def take_rss(self) -> int:
        """The resident size to report with the current file's outcome (read now
        unless the recycle check just read it); the next file reads its own."""
        rss, self.rss_bytes = self.rss_bytes, None
        return own_rss() if rss is None else rss


#: Environment variables a worker removes at start (see worker_main).
SECRET_ENV_PREFIXES = ("BATCHD_HTTP__", "BATCHD_DATABASE__", "PGPASSWORD")


def worker_main(
    conn: Connection,
    settings: Settings,
    parent_pid: int,
    database_url: str | None = None,
    token: str = "",
    permit: Any = None,
) -> None:
    """Entry point of a worker process: serve jobs until the pipe closes.

    ``database_url`` is the store's (PostgreSQL) address for the
    :class:`~batchd.recorder.Recorder`; ``settings`` never carry it, so a
    processor is not handed the password with its settings. ``token`` names
    this worker's own claims in the store, ``permit`` is the daemon's shared
    byte saying whether it may make them (see :class:`_Permit`).
    """
    # Our own process group: the daemon kills the whole group on a timeout, so
    # commands a processor started die with it.
    os.setpgid(0, 0)
    # A Ctrl-C in the daemon's terminal must not kill files mid-way: the
    # daemon decides when work stops (shutdown grace). SIGTERM keeps its
    # default so a worker can still be stopped from outside.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    die_with_parent(parent_pid)
    # Spawned workers inherit the daemon's environment: drop the settings that
    # hold secrets (BATCHD_HTTP__TOKEN, a database URL with its password), so
    # neither a processor nor anything it runs can read them.
    # The recorder still needs PGPASSWORD (libpq's way to a password the URL
    # leaves out): it keeps it for its own connection string.
    database_password = os.environ.get("PGPASSWORD") if database_url else None
    for name in [n for n in os.environ if n.startswith(SECRET_ENV_PREFIXES)]:
        del os.environ[name]
    _limit_memory(settings.processing.worker_memory_mb)
    logsetup.configure(settings.log)
    faults.arm_worker(parent_pid)
    recorder = Recorder(settings, database_url, database_password)

    def configure(new: Settings) -> None:
        nonlocal settings
        settings = new
        logsetup.configure(settings.log)  # a reload's log level and format
        recorder.configure(settings)

    claims = _Permit(
        conn, token, permit, configure, lambda: settings.processing.worker_recycle_rss_mb
    )
    job: Job | None = None
    while True:
        if job is None and claims.queued is not None:
            job, claims.queued = claims.queued, None
        if job is None:
            if claims.stop:
                recorder.close()
                return
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return
            if message is None:
                recorder.close()
                return
            if isinstance(message, Settings):
                configure(message)
                continue
            job = message
        outcome = replace(
            run_job(job, settings, conn, recorder, claims), rss_bytes=claims.take_rss()
        )
        job = _next_of(outcome, settings, recorder)
        if job is not None and isinstance(outcome, Done) and outcome.recorded is not None:
            outcome = replace(outcome, recorded=replace(outcome.recorded, started=job))
        try:
            conn.send(outcome)
        except (BrokenPipeError, OSError):
            return


def _next_of(outcome: Done | Failed, settings: Settings, recorder: Recorder) -> Job | None:
    """The job of the file ``outcome``'s commit claimed, if this worker can start it."""
    if not isinstance(outcome, Done) or outcome.recorded is None:
        return None
    task = outcome.recorded.claimed
    if task is None:
        return None
    job = claimed_job(task, settings, recorder.spool)
    if job is not None:
        # Under the daemon's logger name, as the daemon's own dispatch logs it.
        scheduler_log.debug(
            "file_started",
            batch_id=job.batch_id,
            file_id=job.file_id,
            relpath=job.relpath,
            processor=job.processor,
            attempt=task.file.attempts,
        )
    return job
