"""The code that runs inside a worker process.

A worker is a long-lived child process with one duplex pipe to the daemon.
It receives :class:`Job` messages, runs the processor, and answers with
:class:`Progress` and then exactly one :class:`Done` or :class:`Failed`.
Nothing here touches the database or the outbox: a worker that crashes can
only ever lose its own attempt.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import resource
import signal
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from batchd.config import Settings
from batchd.errors import BatchdError, PermanentError

_PR_SET_PDEATHSIG = 1
HASH_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Job:
    """One attempt at one file."""

    file_id: str
    batch_id: str
    relpath: str
    path: str
    processor: str
    output_dir: str


@dataclass(frozen=True, slots=True)
class Progress:
    file_id: str
    percent: int


@dataclass(frozen=True, slots=True)
class Done:
    file_id: str
    result: dict[str, Any]
    file_hash: str
    file_size: int
    seconds: float


@dataclass(frozen=True, slots=True)
class Failed:
    file_id: str
    error: str
    permanent: bool
    seconds: float


def _die_with_parent(parent_pid: int) -> None:
    # If the daemon is SIGKILLed, its workers must not live on as orphans
    # still holding files: ask the kernel to kill us when our parent dies.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _limit_memory(megabytes: int) -> None:
    if megabytes > 0:
        limit = megabytes * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def hash_file(path: Path) -> tuple[str, int]:
    """``("sha256:<hex>", size)`` of a file, read once in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return f"sha256:{digest.hexdigest()}", size


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BatchdError):
        return exc.message
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{type(exc).__name__}: {exc.strerror}{where}"
    text = str(exc) or traceback.format_exception_only(type(exc), exc)[-1].strip()
    return f"{type(exc).__name__}: {text}"


def run_job(job: Job, settings: Settings, conn: Connection) -> Done | Failed:
    """Hash the input, run the processor, and describe how it ended."""
    from batchd.processors import ProcessorContext, resolve

    started = time.monotonic()
    output_dir = Path(job.output_dir)
    try:
        file_hash, size = hash_file(Path(job.path))
        fn = resolve(job.processor)
        output_dir.mkdir(parents=True, exist_ok=True)
        ctx = ProcessorContext(
            batch_id=job.batch_id,
            file_id=job.file_id,
            relpath=job.relpath,
            output_dir=output_dir,
            settings=settings,
            report=lambda pct: conn.send(Progress(job.file_id, pct)),
        )
        try:
            result = fn(Path(job.path), ctx)
        finally:
            # Remove the output folder when the processor left nothing in it,
            # here in the worker: the daemon's loop then only touches folders
            # that hold outputs.
            with contextlib.suppress(OSError):
                output_dir.rmdir()
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
        return Done(job.file_id, result, file_hash, size, time.monotonic() - started)
    except PermanentError as exc:
        return Failed(job.file_id, _describe(exc), True, time.monotonic() - started)
    except MemoryError:
        mb = settings.processing.worker_memory_mb
        limit = f" (processing.worker_memory_mb = {mb})" if mb else ""
        return Failed(job.file_id, f"out of memory{limit}", False, time.monotonic() - started)
    except Exception as exc:
        return Failed(job.file_id, _describe(exc), False, time.monotonic() - started)


def worker_main(conn: Connection, settings: Settings, parent_pid: int) -> None:
    """Entry point of a worker process: serve jobs until the pipe closes."""
    # Our own process group: the daemon kills the whole group on a timeout, so
    # commands a processor started die with it.
    os.setpgid(0, 0)
    # A Ctrl-C in the daemon's terminal must not kill files mid-way: the
    # daemon decides when work stops (shutdown grace). SIGTERM keeps its
    # default so a worker can still be stopped from outside.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    _limit_memory(settings.processing.worker_memory_mb)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        if isinstance(message, Settings):
            settings = message
            continue
        outcome = run_job(message, settings, conn)
        try:
            conn.send(outcome)
        except (BrokenPipeError, OSError):
            return
