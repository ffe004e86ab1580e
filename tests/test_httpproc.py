"""The HTTP process's link to the daemon (batchd/httpproc.py), on a real pipe: the
deadline of each question, what piles up on the pipe while the daemon is silent, and
the daemon's supervisor thread outliving a failed start of its child."""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import threading
import urllib.error
import urllib.request
from multiprocessing.connection import Connection
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from batchd import httpproc
from batchd.config import Settings
from batchd.http import listen
from batchd.httpproc import Answer, Ask, DaemonAnswers, DaemonLink, HttpProcess, Notice
from batchd.records import BatchRow
from batchd.spool import Spool
from batchd.store import SQLiteStore
from batchd.testing import wait_until


def pipe() -> tuple[Connection, Connection]:
    """The HTTP process's end and the daemon's end of one duplex pipe."""
    child_end, daemon_end = multiprocessing.Pipe(duplex=True)
    return child_end, daemon_end


def waiting(conn: Connection) -> list[object]:
    """Every message waiting to be read on ``conn`` now."""
    messages = []
    while conn.poll(0):
        messages.append(conn.recv())
    return messages


def fill(conn: Connection) -> None:
    """Write notices to ``conn`` until its pipe is full (a daemon that stopped reading)."""
    os.set_blocking(conn.fileno(), False)
    try:
        while True:
            conn.send(Notice("x" * 64, write_status=True, wake=True))
    except BlockingIOError:
        pass
    finally:
        os.set_blocking(conn.fileno(), True)


def test_a_full_pipe_does_not_hang_questions_or_notices() -> None:
    """A daemon that stopped reading its pipe (full): /healthz still answers 503 by its
    deadline and an upload's notice is dropped by then, instead of both blocking in a
    write for as long as the daemon does not read."""
    child_end, daemon_end = pipe()
    timeout = 0.5
    link = DaemonLink(child_end, timeout)
    fill(child_end)
    answers: list[dict[str, str]] = []
    batch = cast(BatchRow, SimpleNamespace(id="batch-1"))
    asker = threading.Thread(target=lambda: answers.append(link.health()), daemon=True)
    notifier = threading.Thread(target=lambda: link.notify(batch, wake=True), daemon=True)
    asker.start()
    notifier.start()
    # 10 x the deadline: room for a loaded machine; the old code never returned.
    asker.join(10 * timeout)
    notifier.join(10 * timeout)
    assert not asker.is_alive(), "/healthz blocked writing to a full pipe"
    assert not notifier.is_alive(), "an upload's notice blocked writing to a full pipe"
    assert "the daemon is not reading" in answers[0]["daemon"]
    daemon_end.close()


def test_a_silent_daemon_is_asked_one_question_at_a_time() -> None:
    """Questions to a daemon that has not answered the last one are not piled on the pipe
    (it would answer each, late, one after another); its late answer is taken and the
    next question gets its own answer."""
    child_end, daemon_end = pipe()
    link = DaemonLink(child_end, 0.2)
    for _ in range(5):
        assert "did not answer" in link.health()["daemon"]
    [first] = waiting(daemon_end)
    assert isinstance(first, Ask) and first.what == "health"
    # The daemon comes back: answers the question it had, then the next one.
    daemon_end.send(Answer(first.seq, {"watcher": "late"}))

    def answer_next() -> None:
        if daemon_end.poll(5):
            ask = daemon_end.recv()
            daemon_end.send(Answer(ask.seq, {}))

    answerer = threading.Thread(target=answer_next)
    answerer.start()
    link.timeout_seconds = 5.0
    assert link.health() == {}
    answerer.join(5)
    assert waiting(daemon_end) == []


def healthz(port: int) -> int | None:
    """The status of GET /healthz on ``port``, or None when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def test_a_failed_restart_of_the_http_process_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starting a replacement for a dead HTTP process fails once (no process could be
    made): the supervisor logs it and tries again after its back-off, instead of its
    thread dying and the API staying down with a daemon that looks alive."""
    settings = Settings.model_validate(
        {"spool": {"root": tmp_path / "spool"}, "http": {"host": "127.0.0.1", "port": 0}}
    )
    Spool(settings).init()
    SQLiteStore(settings.db_path).close()
    answers = DaemonAnswers(
        health=dict, inbox=list, metrics=bytes, write_status=lambda _: None, wake=lambda: None
    )
    proc = HttpProcess(settings, listen(settings), answers)
    proc.start()
    try:
        wait_until(lambda: healthz(proc.port) == 200, 30, what="the first HTTP process")
        real = httpproc._ctx.Process
        failures: list[int] = []

        def process_once_failing(*args: Any, **kwargs: Any) -> Any:
            if not failures:
                failures.append(1)
                raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
            return real(*args, **kwargs)

        monkeypatch.setattr(httpproc._ctx, "Process", process_once_failing)
        first = proc.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: proc.pid not in (None, first), 30, what="a replacement")
        assert failures == [1]
        wait_until(lambda: healthz(proc.port) == 200, 30, what="the replacement serving")
    finally:
        proc.stop()


def test_a_flood_of_health_questions_reaches_the_daemon_a_few_times() -> None:
    """/healthz needs no token: a client asking it as fast as it can must not keep the
    daemon answering (its answering thread takes the interpreter lock from the
    scheduler); answers younger than ANSWER_MAX_AGE_SECONDS are reused."""
    child_end, daemon_end = pipe()
    link = DaemonLink(child_end, 5.0)
    asked: list[str] = []
    stop = threading.Event()

    def daemon() -> None:
        while not stop.is_set():
            if daemon_end.poll(0.05):
                ask = daemon_end.recv()
                asked.append(ask.what)
                daemon_end.send(Answer(ask.seq, {}))

    answerer = threading.Thread(target=daemon)
    answerer.start()
    try:
        for _ in range(50):
            assert link.health() == {}
    finally:
        stop.set()
        answerer.join(5)
    # One per ANSWER_MAX_AGE_SECONDS: 50 would take a stall of 50 of them to reach.
    assert 1 <= len(asked) < 10, asked
