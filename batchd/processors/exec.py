"""The ``exec`` processor: run any command on each file, without writing Python.

``[exec] command`` is an argv list, never given to a shell. Each element may
hold the placeholders ``{input}`` (absolute path of the file), ``{output_dir}``
(absolute path of a fresh folder whose files land in the outbox),
``{batch_id}``, ``{file_id}``, ``{relpath}`` and ``{safe_relpath}``; other
braces are left as they are. ``{relpath}`` is the dropper's name and may
begin with ``-`` (a program would read it as an option: put ``--`` before
it); ``{input}`` (absolute) and ``{safe_relpath}`` (``./`` + relpath) never
look like an option. The same values are in the command's environment as
``BATCHD_INPUT``, ``BATCHD_OUTPUT_DIR``, ``BATCHD_BATCH_ID``,
``BATCHD_FILE_ID``, ``BATCHD_RELPATH`` and ``BATCHD_SAFE_RELPATH``.

The command's environment is clean (issue 12.11): only :data:`BASIC_ENV`
names taken from the daemon's (PATH, HOME, LANG, LC_*, TZ, TMPDIR ...), the
values above and ``[exec] env``; never the daemon's ``BATCHD_*`` settings
(the HTTP token) or anything else it inherited.

The contract with the command:

- exit 0: success. Stdout that is a JSON object is the result; any other
  stdout is kept as ``{"stdout": ...}``, at most ``exec.max_stdout_bytes``
  (``"truncated": true`` when cut). Files written into ``{output_dir}`` are
  listed in ``"outputs"`` and moved into the outbox by the daemon.
- exit code in ``exec.permanent_exit_codes`` (default 65, EX_DATAERR): the
  file fails for good, with the last lines of stderr as the error.
- any other exit code, or death by a signal: a retryable failure, likewise.
- a stderr line ``PROGRESS 40`` reports 40 % done.

Process control: the command runs in the worker's process group (no new
session), so the daemon's kill of a timed-out worker's group kills the
command and its children too. As a second guard the command gets
``processing.timeout_seconds`` of its own, after which it and every process
it started are killed; and when it exits, whatever it left running is killed,
so nothing outlives the file it was started for.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import select
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from batchd.errors import PermanentError, ProcessorError
from batchd.processors import Context

#: stderr lines quoted in an error message.
STDERR_TAIL_LINES = 20
#: longest stderr line kept; longer ones are split (a binary blob has no newlines).
STDERR_LINE_BYTES = 8192
#: how long a killed command's pipes may take to close before we give up on them.
PIPE_DRAIN_SECONDS = 5.0
#: how often the exit is checked where pidfds are missing (not Linux).
POLL_SECONDS = 0.05
#: how many times stragglers are looked for and killed, in case they fork meanwhile.
KILL_ROUNDS = 5

_PLACEHOLDER = re.compile(r"\{(input|output_dir|batch_id|file_id|relpath|safe_relpath)\}")
#: Names passed on from the daemon's environment (besides every LC_* name).
BASIC_ENV = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "USER", "LOGNAME", "SHELL")
#: PATH when the daemon has none.
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
_PROGRESS = re.compile(rb"^\s*PROGRESS[:\s]\s*(\d+(?:\.\d+)?)\s*%?\s*$")


def run_command(path: Path, ctx: Context) -> dict[str, Any]:
    """Run the [exec] command on the file: its JSON stdout is the result, its files the outputs."""
    settings = ctx.settings.exec
    if not settings.command:
        raise PermanentError(
            "processor 'exec' is selected but exec.command is not set; set "
            '[exec] command = ["program", "{input}", "{output_dir}"] in the configuration'
        )
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    values = {
        "input": os.path.abspath(path),  # cwd may differ from ours
        "output_dir": os.path.abspath(ctx.output_dir),
        "batch_id": ctx.batch_id,
        "file_id": ctx.file_id,
        "relpath": ctx.relpath,
        "safe_relpath": "./" + ctx.relpath,
    }
    argv = [_PLACEHOLDER.sub(lambda m: values[m.group(1)], arg) for arg in settings.command]
    env = {
        **command_env(os.environ),
        **{f"BATCHD_{k.upper()}": v for k, v in values.items()},
        **settings.env,
    }
    timeout = ctx.settings.processing.timeout_seconds
    name = Path(argv[0]).name
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=settings.cwd,
            close_fds=True,
        )
    except OSError as exc:  # not found, not executable, bad cwd
        raise PermanentError(
            f"{ctx.relpath}: exec.command cannot be started ({argv[0]}: {exc.strerror}); "
            "check exec.command and exec.cwd"
        ) from exc

    with _Collector(proc, ctx, settings.max_stdout_bytes) as out:
        exited = False
        try:
            exited = _wait_unreaped(proc, timeout)
        finally:
            # Kill what the command left running (or, on timeout, all of it)
            # before reaping it: until then its pid cannot be reused.
            _kill_tree(proc.pid)
            proc.wait()
    if not exited:
        raise PermanentError(
            f"Processing timeout exceeded: {ctx.relpath}: {name} ran longer than "
            f"{timeout:g} s (processing.timeout_seconds); it and its children were killed"
        )

    code = proc.returncode
    if code != 0:
        how = (
            f"was killed by {signal.Signals(-code).name}"
            if code < 0 and -code in signal.valid_signals()
            else f"exited with code {code}"
        )
        tail = "\n".join(out.stderr_tail) or "(no stderr output)"
        cls = PermanentError if code in ctx.settings.exec.permanent_exit_codes else ProcessorError
        raise cls(f"{ctx.relpath}: {name} {how}; last lines of stderr:\n{tail}")
    result = _result(out.stdout, out.stdout_truncated)
    outputs = _outputs(ctx.output_dir)
    if outputs:
        result["outputs"] = outputs
    ctx.progress(100)
    return result


def command_env(inherited: Mapping[str, str]) -> dict[str, str]:
    """The basics a command needs from ``inherited``, and nothing else of it."""
    env = {k: v for k, v in inherited.items() if k in BASIC_ENV or k.startswith("LC_")}
    env.setdefault("PATH", DEFAULT_PATH)
    return env


def _result(stdout: bytes, truncated: bool) -> dict[str, Any]:
    """A JSON object on stdout as is; any other stdout as text."""
    if not truncated and stdout.strip():
        try:
            parsed = json.loads(stdout, parse_constant=_no_nan)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            return parsed
    if not stdout:
        return {}
    result: dict[str, Any] = {"stdout": stdout.decode("utf-8", errors="replace")}
    if truncated:
        result["truncated"] = True
    return result


def _no_nan(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")  # Python accepts NaN; JSON readers do not


def _outputs(folder: Path) -> list[str]:
    """The regular files the command left in ``folder``, as sorted relative paths.

    Anything else (a symbolic link to ``/etc/shadow``, a FIFO) is removed, so
    that only files the command wrote reach the outbox.
    """
    found: list[str] = []
    for root, dirs, files in os.walk(folder):
        for entry in [*dirs, *files]:
            full = Path(root, entry)
            if full.is_symlink() or not (full.is_dir() or full.is_file()):
                full.unlink()
                with contextlib.suppress(ValueError):
                    dirs.remove(entry)
            elif entry in files:
                found.append(full.relative_to(folder).as_posix())
    return sorted(found)


class _Collector:
    """Reads the command's stdout (capped) and stderr (progress, last lines)
    in two threads, so neither pipe can fill up and stall the command."""

    def __init__(self, proc: subprocess.Popen[bytes], ctx: Context, max_stdout: int) -> None:
        self.ctx = ctx
        self.max_stdout = max_stdout
        self.stdout = b""
        self.stdout_truncated = False
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        assert proc.stdout is not None and proc.stderr is not None
        self._pipes = (proc.stdout, proc.stderr)
        self._threads = [
            threading.Thread(target=self._read_stdout, args=(proc.stdout,), daemon=True),
            threading.Thread(target=self._read_stderr, args=(proc.stderr,), daemon=True),
        ]

    def __enter__(self) -> _Collector:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        deadline = time.monotonic() + PIPE_DRAIN_SECONDS
        for thread, pipe in zip(self._threads, self._pipes, strict=True):
            thread.join(max(0.0, deadline - time.monotonic()))
            # A process that escaped into its own session may still hold the
            # pipe; closing it under a blocked reader would deadlock, so leave it.
            if not thread.is_alive():
                pipe.close()

    def _read_stdout(self, pipe: IO[bytes]) -> None:
        kept = bytearray()
        while chunk := os.read(pipe.fileno(), 65536):
            room = self.max_stdout - len(kept)
            if len(chunk) > room:
                self.stdout_truncated = True
            kept += chunk[: max(room, 0)]  # keep draining past the cap
        self.stdout = bytes(kept)

    def _read_stderr(self, pipe: IO[bytes]) -> None:
        for line in _lines(pipe):
            match = _PROGRESS.match(line)
            if match:
                self.ctx.progress(float(match.group(1)))
            elif line.strip():
                self.stderr_tail.append(line.decode("utf-8", errors="replace").rstrip())


def _lines(pipe: IO[bytes]) -> Iterator[bytes]:
    while line := pipe.readline(STDERR_LINE_BYTES):
        yield line


# -- waiting for and killing what the command started ---------------------------


def _wait_unreaped(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for the command to exit, without reaping
    it (its pid stays reserved); True when it exited."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux >= 5.3: poll for the exit instead
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            flags = os.WEXITED | os.WNOWAIT | os.WNOHANG
            if os.waitid(os.P_PID, proc.pid, flags) is not None:
                return True
            time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        return False
    try:
        # A pidfd becomes readable when the process exits.
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) for every process, from /proc (Linux)."""
    table: dict[int, tuple[int, int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as fh:
                    stat = fh.read()
            except OSError:
                continue  # exited meanwhile
            # The name in parentheses may hold spaces; the fields after it do not.
            fields = stat[stat.rfind(b")") + 2 :].split()
            table[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return table


def _stragglers(pid: int, table: Mapping[int, tuple[int, int]]) -> set[int]:
    """The command ``pid`` and every process it started, alive or orphaned.

    Descendants are found by parent links. Orphans (reparented to init when
    their parent exited) are found by process group: when this worker leads
    its own group, any process in it that is not one of our other children
    came from a command. Our own other children (a multiprocessing helper)
    are spared, and when we do not lead our group (run outside the daemon)
    only descendants are taken, so nothing else is ever touched.
    """
    me = os.getpid()
    leading = os.getpgrp() == me
    found: set[int] = set()
    for candidate, (_, pgid) in table.items():
        node, reached = candidate, None
        for _ in range(len(table)):  # guard against a cycle from a racy read
            if node in (pid, me) or node not in table or node <= 1:
                reached = node
                break
            node = table[node][0]
        if candidate == me:
            continue
        if reached == pid or (leading and pgid == me and reached != me):
            found.add(candidate)
    return found


def _kill_tree(pid: int) -> None:
    """SIGKILL the command and everything it started (see :func:`_stragglers`)."""
    for _ in range(KILL_ROUNDS):
        targets = _stragglers(pid, _processes())
        if not targets:
            return
        for target in targets:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(target, signal.SIGKILL)
