"""Processors the integration tests run inside real worker processes.

State that must survive a worker's death (attempt counters, the order files
ran in) lives in files under ``$BATCHD_TEST_STATE``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from batchd.errors import PermanentError


def _state() -> Path:
    return Path(os.environ["BATCHD_TEST_STATE"])


def _bump(name: str) -> int:
    """Count this call for ``name`` (crash-safe: one file per call)."""
    folder = _state() / "attempts" / name
    folder.mkdir(parents=True, exist_ok=True)
    n = len(list(folder.iterdir())) + 1
    (folder / f"{n}-{os.getpid()}").touch()
    return n


def _record(event: str) -> None:
    with (_state() / "order.log").open("a") as fh:
        fh.write(event + "\n")


def flaky(path: Path, ctx: Any) -> dict[str, Any]:
    """Fail the first two attempts, then succeed."""
    n = _bump(path.name)
    if n <= 2:
        raise RuntimeError(f"flaky failure {n}")
    return {"attempt": n}


def always_fail(path: Path, ctx: Any) -> dict[str, Any]:
    raise RuntimeError("this processor always fails")


def permanent(path: Path, ctx: Any) -> dict[str, Any]:
    raise PermanentError("bad content: permanent")


def by_name(path: Path, ctx: Any) -> dict[str, Any]:
    """Behave by the file's name: hang*, die*, slow*, else succeed."""
    name = path.name
    if name.startswith("hang"):
        time.sleep(3600)  # stuck inside a C call, as far as Python is concerned
    if name.startswith("die") and _bump(name) == 1:
        os._exit(3)
    if name.startswith("segv") and _bump(name) == 1:
        os.kill(os.getpid(), signal.SIGSEGV)
    if name.startswith("victim"):
        n = _bump(name)
        if n == 1:
            (_state() / f"running-{name}").write_text(str(os.getpid()))
            time.sleep(3600)  # the test SIGKILLs this worker
    if name.startswith("slow"):
        for pct in range(0, 100, 25):
            ctx.progress(pct)
            time.sleep(0.1)
    return {"name": name, "size": path.stat().st_size}


def ordered(path: Path, ctx: Any) -> dict[str, Any]:
    """Record the order files run in; take a moment each."""
    _record(path.name)
    time.sleep(float(os.environ.get("BATCHD_TEST_DELAY", "0.3")))
    return {"name": path.name}


def sleepy(path: Path, ctx: Any) -> dict[str, Any]:
    """Take a while, reporting progress, so tests can interrupt mid-batch."""
    delay = float(os.environ.get("BATCHD_TEST_DELAY", "0.2"))
    for pct in range(0, 100, 20):
        ctx.progress(pct)
        time.sleep(delay / 5)
    _record(path.name)
    return {"name": path.name}


def gated(path: Path, ctx: Any) -> dict[str, Any]:
    """Attempt n says it started (``started-n``), then waits for ``release-n``."""
    n = _bump(path.name)
    (_state() / f"started-{n}").write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while not (_state() / f"release-{n}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return {"attempt": n}


#: Memory a hog tries to take: past the default worker limit (1024 MiB).
HOG_MIB = 1536
_KEPT: list[bytearray] = []


def hog(path: Path, ctx: Any) -> dict[str, Any]:
    """Take memory 64 MiB at a time up to HOG_MIB (a hostile document's parse)."""
    chunks = [bytearray(64 * 1024 * 1024) for _ in range(HOG_MIB // 64)]
    return {"allocated_mib": 64 * len(chunks)}


def oom_killed(path: Path, ctx: Any) -> dict[str, Any]:
    """Map address space close to the limit, then die by SIGKILL as the OOM killer kills."""
    import mmap
    import resource

    # Fill the address space to 95 % of the limit, whatever the worker already
    # maps (its imports grow with the code): the pool counts >= 90 % as "near".
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    with open("/proc/self/status", encoding="ascii") as fh:
        vm_kib = next(int(line.split()[1]) for line in fh if line.startswith("VmSize:"))
    size = int(limit * 0.95) - vm_kib * 1024
    mapping = mmap.mmap(-1, size)  # counts against RLIMIT_AS, costs no real memory
    time.sleep(1.0)  # long enough for the pool to see the size
    os.kill(os.getpid(), signal.SIGKILL)
    return {"mapped": len(mapping)}


def grow(path: Path, ctx: Any) -> dict[str, Any]:
    """Keep 150 MiB touched for good (what a big parse leaves behind); say which worker ran."""
    if not _KEPT:
        _KEPT.append(bytearray(b"\x01" * (150 * 1024 * 1024)))
    return {"pid": os.getpid()}


def big_result(path: Path, ctx: Any) -> dict[str, Any]:
    """A result of about 200 KB of JSON."""
    return {"name": path.name, "rows": [f"row {i} " + "x" * 90 for i in range(2000)]}
