"""Processors for tests, named as ``procs:<function>`` (tests/ is on sys.path).

They run inside real worker processes. Keep this module plain and
append-only: other test files may use any function here.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from batchd.errors import PermanentError

GATE_TIMEOUT_SECONDS = 120.0


def ok(path: Path, ctx: Any) -> dict[str, Any]:
    """Succeed, reporting progress 50 first; the result holds the file's size."""
    ctx.progress(50)
    return {"size": path.stat().st_size}


def boom(path: Path, ctx: Any) -> dict[str, Any]:
    """Fail with an ordinary (retryable) error."""
    raise RuntimeError("boom")


def permanent(path: Path, ctx: Any) -> dict[str, Any]:
    """Fail for good: bad content."""
    raise PermanentError(f"{path.name} is damaged beyond repair")


def die(path: Path, ctx: Any) -> dict[str, Any]:
    """End the worker process at once, without cleanup."""
    os._exit(3)


def hang(path: Path, ctx: Any) -> dict[str, Any]:
    """Report progress 1, then never finish."""
    ctx.progress(1)
    time.sleep(3600)
    return {}


def segfault(path: Path, ctx: Any) -> dict[str, Any]:
    """Crash the worker with SIGSEGV."""
    ctypes.string_at(0)
    return {}


def not_json(path: Path, ctx: Any) -> dict[str, Any]:
    """Return a dict that JSON cannot hold."""
    return {"x": object()}


def not_a_dict(path: Path, ctx: Any) -> Any:
    """Return something that is not a dict."""
    return ["a", "list"]


def hang_with_child(path: Path, ctx: Any) -> dict[str, Any]:
    """Start a long-running child process, write its pid to output_dir/child.pid,
    report progress 1, then never finish."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    (Path(ctx.output_dir) / "child.pid").write_text(str(child.pid))
    ctx.progress(1)
    time.sleep(3600)
    return {}


def gate(path: Path, ctx: Any) -> dict[str, Any]:
    """Report progress 10, then wait until ``<input>.go`` exists beside the input and succeed."""
    ctx.progress(10)
    # The worker hands a private link to the file it opened; its real name
    # is where the test puts the go file.
    go = Path(f"{os.path.realpath(path)}.go")
    deadline = time.monotonic() + GATE_TIMEOUT_SECONDS
    while not go.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{go} never appeared")
        time.sleep(0.02)
    return {"pid": os.getpid()}


def whoami(path: Path, ctx: Any) -> dict[str, Any]:
    """Describe the worker: pid, process group, and the settings it holds."""
    return {
        "pid": os.getpid(),
        "pgid": os.getpgid(0),
        "max_rows": ctx.settings.processing.max_rows,
        "http_token": ctx.settings.http.token,
        "user_tokens": dict(ctx.settings.http.users),
        "database_url": ctx.settings.database.url,
        "secret_env": sorted(
            n for n in os.environ if n.startswith(("BATCHD_HTTP__", "BATCHD_DATABASE__"))
        ),
    }


def hog(path: Path, ctx: Any) -> dict[str, Any]:
    """Allocate 4 GiB at once (to meet processing.worker_memory_mb)."""
    block = bytearray(4 * 1024**3)
    return {"allocated": len(block)}


def with_output(path: Path, ctx: Any) -> dict[str, Any]:
    """Succeed after leaving one output file in the attempt's output folder."""
    (ctx.output_dir / "summary.txt").write_text(f"{path.name}\n")
    return {"outputs": 1}


def grows_input(path: Path, ctx: Any) -> dict[str, Any]:
    """Append to the input while "processing" it, like a writer that never closed it."""
    with path.open("ab") as fh:
        fh.write(b"late,row\n")
    return {"size": path.stat().st_size}
