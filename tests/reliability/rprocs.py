"""Processors the reliability tests run inside real worker processes.

Referenced as ``"rprocs:<fn>"``; the daemon needs this folder on its
``PYTHONPATH`` (:func:`pythonpath`). State that must outlive a worker (how
many attempts a file had, which runs completed) lives in files under
``$BATCHD_TEST_STATE``, one file per event, so a worker's death loses none.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
INTEGRATION = HERE.parent / "integration"
#: Allocation step of the memory runaway, and how far it would go unchecked.
HOG_STEP_BYTES = 64 * 1024 * 1024
HOG_MAX_BYTES = 64 * 1024 * 1024 * 1024


def pythonpath() -> str:
    """``PYTHONPATH`` for a daemon that must import both ``rprocs`` and ``iprocs``."""
    return os.pathsep.join([str(REPO), str(HERE), str(INTEGRATION)])


def _state() -> Path:
    return Path(os.environ["BATCHD_TEST_STATE"])


def _count(kind: str, name: str) -> int:
    """Record one ``kind`` event for file ``name``; returns how many there are now."""
    folder = _state() / kind / name
    folder.mkdir(parents=True, exist_ok=True)
    n = len(list(folder.iterdir())) + 1
    (folder / f"{n}-{os.getpid()}").touch()
    return n


def runs(state: Path, kind: str, name: str) -> int:
    """How many ``kind`` events (``attempts``, ``done``) file ``name`` had (test side)."""
    folder = state / kind / name
    return len(list(folder.iterdir())) if folder.exists() else 0


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def chaos(path: Path, ctx: Any) -> dict[str, Any]:
    """Misbehave by the file's name prefix (``<kind>-...``); other names succeed.

    raise: always raises.  exit: always ``os._exit(7)``.  segv: always a real
    segfault (reads address 0).  mem: always allocates without bound (stopped
    by ``processing.worker_memory_mb``).  csleep: sleeps inside a C call
    (libc ``sleep``).  fifo: blocks opening a FIFO nobody writes.  exitonce,
    segvonce: fail the first attempt that way, then succeed.  victim: first
    attempt publishes its pid and sleeps (the test SIGKILLs it), then succeeds.
    """
    name = path.name
    kind = name.split("-", 1)[0]
    n = _count("attempts", name)
    if kind == "raise":
        raise RuntimeError(f"chaos processor raised for {name} (attempt {n})")
    if kind == "exit" or (kind == "exitonce" and n == 1):
        os._exit(7)
    if kind == "segv" or (kind == "segvonce" and n == 1):
        ctypes.string_at(0)
    if kind == "mem":
        hog: list[bytes] = []
        while len(hog) * HOG_STEP_BYTES < HOG_MAX_BYTES:
            hog.append(bytes(HOG_STEP_BYTES))  # calloc: address space, not RAM
        raise AssertionError("memory limit never hit")
    if kind == "csleep":
        _libc().sleep(3600)
    if kind == "fifo":
        with open(_state() / "fifo", "rb") as fh:  # blocks in open(2): no writer, ever
            fh.read()
    if kind == "victim" and n == 1:
        (_state() / f"pid-{name}").write_text(str(os.getpid()))
        _libc().sleep(3600)
    _count("done", name)
    return {"name": name, "attempt": n, "size": path.stat().st_size}


def counted(path: Path, ctx: Any) -> dict[str, Any]:
    """Succeed at once, counting each run (to prove no file is processed twice)."""
    _count("done", path.name)
    return {"name": path.name, "size": path.stat().st_size}


def with_outputs(path: Path, ctx: Any) -> dict[str, Any]:
    """Succeed, leaving an output file in ``ctx.output_dir`` (moved next to the result)."""
    _count("done", path.name)
    (Path(ctx.output_dir) / "copy.txt").write_bytes(path.read_bytes())
    return {"name": path.name}
