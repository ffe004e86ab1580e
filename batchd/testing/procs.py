"""The processors tests and benchmarks run inside real worker processes.

Named as ``"batchd.testing.procs:<function>"``: importable wherever batchd
is, so the pool's spawned workers, a ``batchd run`` child and a daemon run
as another user find them without any ``PYTHONPATH`` of their own.
(bench/procs.py re-exports the benchmarks' ones as ``bench.procs:<fn>``.)

State that must outlive a worker (how many attempts a file had, which runs
completed, the order files ran in) lives in files under
``$BATCHD_TEST_STATE``, one file per event, so a worker's death loses none;
:func:`runs` reads it back on the test's side. Keep this module plain and
append-only: any test may use any function here.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from batchd.errors import PermanentError

#: How long :func:`gate` waits for its go file before it gives up.
GATE_TIMEOUT_SECONDS = 120.0
#: How long :func:`gated` waits for its release file.
RELEASE_TIMEOUT_SECONDS = 60.0
#: How long :func:`held` waits for the test to let a held file go.
HOLD_SECONDS = 60.0
#: Memory :func:`hog` tries to take: past the default worker limit (1024 MiB).
HOG_MIB = 1536
#: Allocation step of :func:`chaos`'s memory runaway, and how far it would go unchecked.
HOG_STEP_BYTES = 64 * 1024 * 1024
HOG_MAX_BYTES = 64 * 1024 * 1024 * 1024
_KEPT: list[bytearray] = []


# -- state that outlives a worker ------------------------------------------------


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


def _record(event: str) -> None:
    with (_state() / "order.log").open("a") as fh:
        fh.write(event + "\n")


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


# -- one outcome each ------------------------------------------------------------


def ok(path: Path, ctx: Any) -> dict[str, Any]:
    """Succeed, reporting progress 50 first; the result holds the file's size."""
    ctx.progress(50)
    return {"size": path.stat().st_size}


def boom(path: Path, ctx: Any) -> dict[str, Any]:
    """Fail with an ordinary (retryable) error."""
    raise RuntimeError("boom")


def always_fail(path: Path, ctx: Any) -> dict[str, Any]:
    raise RuntimeError("this processor always fails")


def permanent(path: Path, ctx: Any) -> dict[str, Any]:
    """Fail for good: bad content."""
    raise PermanentError(f"{path.name} is damaged beyond repair")


def bad_content(path: Path, ctx: Any) -> dict[str, Any]:
    """Fail for good, with a message that does not name the file."""
    raise PermanentError("bad content: permanent")


def flaky(path: Path, ctx: Any) -> dict[str, Any]:
    """Fail the first two attempts, then succeed."""
    n = _count("attempts", path.name)
    if n <= 2:
        raise RuntimeError(f"flaky failure {n}")
    return {"attempt": n}


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


def with_output(path: Path, ctx: Any) -> dict[str, Any]:
    """Succeed after leaving one output file in the attempt's output folder."""
    (ctx.output_dir / "summary.txt").write_text(f"{path.name}\n")
    return {"outputs": 1}


def grows_input(path: Path, ctx: Any) -> dict[str, Any]:
    """Append to the input while "processing" it, like a writer that never closed it."""
    with path.open("ab") as fh:
        fh.write(b"late,row\n")
    return {"size": path.stat().st_size}


def big_result(path: Path, ctx: Any) -> dict[str, Any]:
    """A result of about 200 KB of JSON."""
    return {"name": path.name, "rows": [f"row {i} " + "x" * 90 for i in range(2000)]}


# -- held until the test says so -------------------------------------------------


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


def gated(path: Path, ctx: Any) -> dict[str, Any]:
    """Attempt n says it started (``started-n``), then waits for ``release-n``."""
    n = _count("attempts", path.name)
    (_state() / f"started-{n}").write_text(str(os.getpid()))
    deadline = time.monotonic() + RELEASE_TIMEOUT_SECONDS
    while not (_state() / f"release-{n}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return {"attempt": n}


def held(path: Path, ctx: Any) -> dict[str, Any]:
    """Hold while ``$BATCHD_TEST_STATE/hold-<name>`` exists (announcing itself with
    ``started-<name>``), then report the bytes it read: what the processor saw."""
    hold = _state() / f"hold-{path.name}"
    if hold.exists():
        (_state() / f"started-{path.name}").touch()
        deadline = time.monotonic() + HOLD_SECONDS
        while hold.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# -- behaviour by the file's name ------------------------------------------------


def by_name(path: Path, ctx: Any) -> dict[str, Any]:
    """Behave by the file's name: hang*, die*, segv*, victim*, slow*, else succeed."""
    name = path.name
    if name.startswith("hang"):
        time.sleep(3600)  # stuck inside a C call, as far as Python is concerned
    if name.startswith("die") and _count("attempts", name) == 1:
        os._exit(3)
    if name.startswith("segv") and _count("attempts", name) == 1:
        os.kill(os.getpid(), signal.SIGSEGV)
    if name.startswith("victim"):
        n = _count("attempts", name)
        if n == 1:
            (_state() / f"running-{name}").write_text(str(os.getpid()))
            time.sleep(3600)  # the test SIGKILLs this worker
    if name.startswith("slow"):
        for pct in range(0, 100, 25):
            ctx.progress(pct)
            time.sleep(0.1)
    return {"name": name, "size": path.stat().st_size}


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
        hoard: list[bytes] = []
        while len(hoard) * HOG_STEP_BYTES < HOG_MAX_BYTES:
            hoard.append(bytes(HOG_STEP_BYTES))  # calloc: address space, not RAM
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


# -- counting and timing ---------------------------------------------------------


def counted(path: Path, ctx: Any) -> dict[str, Any]:
    """Succeed at once, counting each run (to prove no file is processed twice)."""
    _count("done", path.name)
    return {"name": path.name, "size": path.stat().st_size}


def with_outputs(path: Path, ctx: Any) -> dict[str, Any]:
    """Succeed, leaving an output file in ``ctx.output_dir`` (moved next to the result)."""
    _count("done", path.name)
    (Path(ctx.output_dir) / "copy.txt").write_bytes(path.read_bytes())
    return {"name": path.name}


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


# -- memory ----------------------------------------------------------------------


def hog_at_once(path: Path, ctx: Any) -> dict[str, Any]:
    """Allocate 4 GiB at once (to meet processing.worker_memory_mb)."""
    block = bytearray(4 * 1024**3)
    return {"allocated": len(block)}


def hog(path: Path, ctx: Any) -> dict[str, Any]:
    """Take memory 64 MiB at a time up to HOG_MIB (a hostile document's parse)."""
    chunks = [bytearray(64 * 1024 * 1024) for _ in range(HOG_MIB // 64)]
    return {"allocated_mib": 64 * len(chunks)}


def oom_killed(path: Path, ctx: Any) -> dict[str, Any]:
    """Map address space close to the limit, then die by SIGKILL as the OOM killer kills."""
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


# -- CPU work for the benchmarks -------------------------------------------------
# ``burn`` costs a fixed amount of CPU per file: the file holds the number of
# loop iterations, so batchd, the ``xargs`` peer (bench/burn_one.py) and the
# serial calibration all do exactly the same work.


def burn_work(loops: int) -> int:
    """Pure-Python integer work: ``loops`` iterations, no I/O, no allocation to speak of."""
    x = 0
    for i in range(loops):
        x = (x * 31 + i) & 0xFFFFFFFF
    return x


def loops_for(cpu_seconds: float) -> int:
    """Iterations that cost about ``cpu_seconds`` of CPU on this machine (measured here)."""
    probe = 200_000
    best = float("inf")
    for _ in range(5):
        t0 = time.process_time()
        burn_work(probe)
        best = min(best, time.process_time() - t0)
    return max(1, int(probe * cpu_seconds / best))


def burn(path: Path, ctx: Any) -> dict[str, Any]:
    """Burn the CPU the file asks for (its first word: loop iterations)."""
    loops = int(path.read_text().split()[0])
    return {"loops": loops, "x": burn_work(loops)}


def pause(path: Path, ctx: Any) -> dict[str, Any]:
    """5 ms of waiting per file: keeps the daemon processing without eating the CPU."""
    time.sleep(0.005)
    return {"size": path.stat().st_size}
