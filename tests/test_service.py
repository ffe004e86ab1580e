"""Tests for batchd.service: sd_notify on a real socket, journald fields."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from batchd.service import (
    JournalRenderer,
    Notifier,
    _fields,
    _journal_module,
    journal_processor,
    journal_wanted,
)

RECEIVE_TIMEOUT_SECONDS = 5.0

needs_systemd_python = pytest.mark.skipif(
    _journal_module() is None,
    reason="systemd-python is not installed (pip install 'batchd[systemd]', needs libsystemd-dev)",
)


def _bind(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(RECEIVE_TIMEOUT_SECONDS)
    return sock


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's, and its NOTIFY_SOCKET value."""
    path = tmp_path / "notify.sock"
    if len(str(path)) > 100:  # sun_path holds 108 bytes
        pytest.skip(f"tmp_path too long for an AF_UNIX address: {path}")
    sock = _bind(str(path))
    yield sock, str(path)
    sock.close()


def _receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_ready_sends_ready(notify_socket: tuple[socket.socket, str]) -> None:
    """ready() sends the datagram READY=1."""
    sock, address = notify_socket
    Notifier.from_env({"NOTIFY_SOCKET": address}).ready()
    assert _receive(sock) == "READY=1"


def test_status_sends_status_line(notify_socket: tuple[socket.socket, str]) -> None:
    """status() sends STATUS= with the text."""
    sock, address = notify_socket
    Notifier.from_env({"NOTIFY_SOCKET": address}).status("4 pending, 12 files/min")
    assert _receive(sock) == "STATUS=4 pending, 12 files/min"


def test_status_keeps_to_one_line(notify_socket: tuple[socket.socket, str]) -> None:
    """A newline in the status text cannot smuggle in another assignment."""
    sock, address = notify_socket
    Notifier.from_env({"NOTIFY_SOCKET": address}).status("busy\nREADY=1")
    assert _receive(sock) == "STATUS=busy READY=1"


def test_watchdog_sends_watchdog(notify_socket: tuple[socket.socket, str]) -> None:
    """watchdog() sends WATCHDOG=1."""
    sock, address = notify_socket
    Notifier.from_env({"NOTIFY_SOCKET": address}).watchdog()
    assert _receive(sock) == "WATCHDOG=1"


def test_stopping_sends_stopping(notify_socket: tuple[socket.socket, str]) -> None:
    """stopping() sends STOPPING=1."""
    sock, address = notify_socket
    Notifier.from_env({"NOTIFY_SOCKET": address}).stopping()
    assert _receive(sock) == "STOPPING=1"


def test_reloading_sends_monotonic_time(notify_socket: tuple[socket.socket, str]) -> None:
    """reloading() sends RELOADING=1 with MONOTONIC_USEC on CLOCK_MONOTONIC."""
    sock, address = notify_socket
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier.from_env({"NOTIFY_SOCKET": address}).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = _receive(sock).split("\n")
    key, _, value = second.partition("=")
    assert (first, key) == ("RELOADING=1", "MONOTONIC_USEC")
    assert before <= int(value) <= after


def test_sequence_arrives_in_order(notify_socket: tuple[socket.socket, str]) -> None:
    """A daemon's life cycle arrives as the datagrams it sent, in order."""
    sock, address = notify_socket
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})
    notifier.ready()
    notifier.status("0 pending")
    notifier.watchdog()
    notifier.stopping()
    received = [_receive(sock) for _ in range(4)]
    assert received == ["READY=1", "STATUS=0 pending", "WATCHDOG=1", "STOPPING=1"]


def test_abstract_socket() -> None:
    """An '@name' NOTIFY_SOCKET reaches the Linux abstract socket of that name."""
    name = f"batchd-test-{uuid.uuid4().hex}"
    with _bind("\0" + name) as sock:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        notifier.ready()
        assert (notifier.enabled, _receive(sock)) == (True, "READY=1")


def test_from_env_reads_process_environment(notify_socket: tuple[socket.socket, str]) -> None:
    """By default from_env() reads os.environ, as in a process systemd started."""
    sock, address = notify_socket
    code = "from batchd.service import Notifier; Notifier.from_env().ready()"
    env = {**os.environ, "NOTIFY_SOCKET": address}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    assert _receive(sock) == "READY=1"


def test_disabled_without_notify_socket() -> None:
    """Outside systemd the notifier is disabled and every call is a no-op."""
    notifier = Notifier.from_env({"WATCHDOG_USEC": "30000000"})
    notifier.ready()
    notifier.status("x")
    notifier.reloading()
    notifier.watchdog()
    notifier.stopping()
    assert (notifier.enabled, notifier.watchdog_interval()) == (False, None)


def test_unsupported_socket_scheme_disables() -> None:
    """A NOTIFY_SOCKET that is not an AF_UNIX path (vsock:) disables notifying."""
    assert Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled is False


def test_unreachable_socket_does_not_raise(tmp_path: Path) -> None:
    """A NOTIFY_SOCKET nobody listens on loses the message without raising."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    notifier.ready()
    notifier.watchdog()
    assert notifier.enabled is True


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "nope"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
    ids=["usec", "this-pid", "other-pid", "bad-pid", "zero", "garbage", "unset"],
)
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    """The ping interval is half of WATCHDOG_USEC, only if meant for this process."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "/run/systemd/notify", **env})
    assert notifier.watchdog_interval() == interval


# journald ------------------------------------------------------------------


def _stderr_stream() -> str:
    stat = os.fstat(2)
    return f"{stat.st_dev}:{stat.st_ino}"


@needs_systemd_python
def test_journal_wanted_when_stderr_is_the_journal_stream() -> None:
    """journal_wanted() is true when JOURNAL_STREAM names the file on stderr."""
    assert journal_wanted({"JOURNAL_STREAM": _stderr_stream()}) is True


@pytest.mark.parametrize(
    "value", ["", "1:2", "garbage", "12"], ids=["empty", "other-file", "garbage", "no-inode"]
)
def test_journal_not_wanted_when_stderr_is_elsewhere(value: str) -> None:
    """journal_wanted() is false when JOURNAL_STREAM is unset, stale or malformed."""
    assert journal_wanted({"JOURNAL_STREAM": value} if value else {}) is False


@needs_systemd_python
def test_journal_wanted_reads_process_environment(tmp_path: Path) -> None:
    """By default journal_wanted() compares os.environ with the process's own stderr."""
    stderr_file = tmp_path / "stderr"
    stderr_file.touch()
    stat = stderr_file.stat()
    code = "import sys; from batchd.service import journal_wanted; print(journal_wanted())"
    env = {**os.environ, "JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}
    with stderr_file.open("w") as stderr:
        done = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            check=True,
            timeout=60,
        )
    assert done.stdout.strip() == "True"


def test_fields_for_an_event() -> None:
    """An event becomes MESSAGE with its context, PRIORITY and upper-cased fields."""
    event = {
        "event": "file_failed",
        "level": "error",
        "timestamp": "2026-11-28T10:00:00.000Z",
        "batch_id": "b-1",
        "file_id": "f-1",
        "path": "inbox/normal/my report.pdf",
        "attempts": 2,
        "missing": None,
    }
    assert _fields(event, "error") == {
        "MESSAGE": 'file_failed batch_id=b-1 file_id=f-1 path="inbox/normal/my report.pdf" '
        "attempts=2",
        "PRIORITY": "3",
        "SYSLOG_IDENTIFIER": "batchd",
        "EVENT": "file_failed",
        "BATCH_ID": "b-1",
        "FILE_ID": "f-1",
        "PATH": "inbox/normal/my report.pdf",
        "ATTEMPTS": "2",
    }


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        ("critical", "2"),
        ("exception", "3"),
        ("error", "3"),
        ("warning", "4"),
        ("info", "6"),
        ("debug", "7"),
        ("unheard-of", "6"),
    ],
)
def test_fields_priority_from_level(level: str, priority: str) -> None:
    """PRIORITY is the syslog priority of the structlog level."""
    assert _fields({"event": "x", "level": level})["PRIORITY"] == priority


def test_fields_priority_from_method_name_without_level() -> None:
    """Without a level key the logger method name sets PRIORITY."""
    assert _fields({"event": "x"}, "warning")["PRIORITY"] == "4"


def test_fields_rename_reserved_and_invalid_keys() -> None:
    """Keys that would clash with journald's own fields or break its syntax are renamed."""
    event = {"event": "x", "priority": "high", "message": "m", "_secret": 1, "2x-y": 2, "__": 3}
    assert _fields(event) == {
        "MESSAGE": "x priority=high message=m _secret=1 2x-y=2",
        "PRIORITY": "6",
        "SYSLOG_IDENTIFIER": "batchd",
        "EVENT": "x",
        "BATCHD_PRIORITY": "high",
        "BATCHD_MESSAGE": "m",
        "SECRET": "1",
        "X_Y": "2",
    }


def test_fields_structured_values_as_json() -> None:
    """Dict and list values are sent as JSON text."""
    assert _fields({"event": "x", "limits": {"files": 50}})["LIMITS"] == '{"files": 50}'


def test_fields_exception_appended_to_message() -> None:
    """A formatted exception follows the message, where journalctl shows it."""
    event = {"event": "worker_died", "exception": "Traceback …\nRuntimeError: boom\n"}
    assert _fields(event)["MESSAGE"] == "worker_died\nTraceback …\nRuntimeError: boom"


def test_fields_callsite_fills_code_fields() -> None:
    """structlog callsite parameters become CODE_FILE, CODE_LINE and CODE_FUNC."""
    event = {"event": "x", "pathname": "/opt/batchd/pool.py", "lineno": 42, "func_name": "run"}
    fields = _fields(event)
    assert (fields["CODE_FILE"], fields["CODE_LINE"], fields["CODE_FUNC"]) == (
        "/opt/batchd/pool.py",
        "42",
        "run",
    )


class _Recorder:
    """A stand-in for systemd.journal.send that keeps what it was given."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def __call__(self, **fields: Any) -> None:
        self.sent.append(fields)


def test_renderer_sends_and_drops_event() -> None:
    """Through a structlog logger, the event reaches the journal and nothing is printed."""
    recorder = _Recorder()
    out = io.StringIO()
    log = structlog.wrap_logger(
        structlog.PrintLogger(out),
        processors=[structlog.processors.add_log_level, JournalRenderer(recorder)],
    )
    log.info("batch_claimed", batch_id="b-1", files=3)
    assert (recorder.sent, out.getvalue()) == (
        [
            {
                "MESSAGE": "batch_claimed batch_id=b-1 files=3",
                "PRIORITY": "6",
                "SYSLOG_IDENTIFIER": "batchd",
                "EVENT": "batch_claimed",
                "BATCH_ID": "b-1",
                "FILES": "3",
            }
        ],
        "",
    )


def test_renderer_can_return_empty_line() -> None:
    """With drop_event=False the renderer returns '' instead of raising DropEvent."""
    recorder = _Recorder()
    assert JournalRenderer(recorder, drop_event=False)(None, "info", {"event": "x"}) == ""
    assert [fields["MESSAGE"] for fields in recorder.sent] == ["x"]


def test_renderer_falls_back_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    """When journald refuses the entry, the line goes to stderr instead of being lost."""

    def refuse(**fields: Any) -> None:
        raise OSError("journal socket gone")

    with pytest.raises(structlog.DropEvent):
        JournalRenderer(refuse)(None, "info", {"event": "x", "batch_id": "b-1"})
    assert capsys.readouterr().err == "x batch_id=b-1\n"


@needs_systemd_python
def test_journal_processor_uses_systemd_journal() -> None:
    """journal_processor() builds a renderer on systemd.journal.send."""
    assert isinstance(journal_processor(), JournalRenderer)


@needs_systemd_python
def test_entry_found_by_batch_id_in_running_journal() -> None:
    """With journald running, `journalctl BATCH_ID=…` finds the entry the renderer sent."""
    if not Path("/run/systemd/journal/socket").exists() or shutil.which("journalctl") is None:
        pytest.skip("no journald running here (/run/systemd/journal/socket is missing)")
    batch_id = uuid.uuid4().hex
    with pytest.raises(structlog.DropEvent):
        journal_processor()(None, "info", {"event": "batch_claimed", "batch_id": batch_id})
    deadline = time.monotonic() + RECEIVE_TIMEOUT_SECONDS
    while True:
        done = subprocess.run(
            ["journalctl", "--no-pager", "-o", "json", f"BATCH_ID={batch_id}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        lines = done.stdout.splitlines()
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert lines, f"journalctl found no entry (rc={done.returncode}, {done.stderr.strip()})"
    entry = json.loads(lines[0])
    assert (entry["MESSAGE"], entry["PRIORITY"], entry["SYSLOG_IDENTIFIER"]) == (
        f"batch_claimed batch_id={batch_id}",
        "6",
        "batchd",
    )
