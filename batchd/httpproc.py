"""The HTTP server in a process of its own, and its link to the daemon (issue 15).

While files flow, HTTP threads in the daemon competed with the scheduler
loop for one interpreter lock (``py-spy --gil``: 55 % HTTP, 41 % loop), so
the API slowed the files and the files slowed the API. The daemon therefore
binds the listening socket itself (before recovery: a taken port still ends
start-up) and hands it to a child, spawned with the pool's "spawn" context,
which runs :class:`~batchd.http.HttpServer` unchanged with its own store
connection, spool, intake and tokens.

ARCHITECTURE says HTTP reads the store and talks to the daemon only through
it. This module's pipe is the exception, for what only the daemon's memory
holds and the database does not: ``health`` (the watcher thread, the live
workers, the loop's heartbeat: :meth:`batchd.daemon.Daemon.problems`),
``inbox`` (the watcher's drops not yet claimed) and the daemon's metrics
text (counters it keeps in memory). Each is asked with a deadline
(``http.daemon_answer_timeout_seconds``): a daemon too busy to answer makes
/healthz say so (503), never hangs an HTTP thread. Uploads register through
the child's own :class:`~batchd.intake.Intake` exactly as before (claims of
two processes are kept apart by the spool's reservations and the database's
unique keys, as between cluster nodes); the child then tells the daemon, in
a notice that needs no answer, to wake its loop and write the batch's
status.json (the daemon's archiver stays the one writer of live status.json
documents).

The daemon supervises the child: a child that dies is logged
(``http_process_died``) and started again on the same socket after a
back-off, so a crash loop does not spin; a stop is graceful
(:meth:`HttpServer.stop`), then a kill past a deadline.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import structlog

from batchd import log as logsetup
from batchd.children import die_with_parent
from batchd.clock import SystemClock
from batchd.config import Settings
from batchd.errors import Refusal
from batchd.faults import hang_point
from batchd.httpguard import Tokens
from batchd.records import BatchRow

log = structlog.get_logger("batchd.httpproc")

# spawn, as the pool: the daemon runs threads, and forking a process with
# threads can copy a lock held by another thread.
_ctx = multiprocessing.get_context("spawn")

#: The first wait before starting a dead HTTP process again; doubled per
#: quick death up to the maximum, back to the first after a long life.
RESTART_BACKOFF_FIRST_SECONDS = 0.5
RESTART_BACKOFF_MAX_SECONDS = 30.0
#: A child that served this long before dying starts the back-off afresh.
RESTART_BACKOFF_RESET_SECONDS = 60.0
#: How often the supervisor thread looks at its stop flag between messages.
SUPERVISE_POLL_SECONDS = 0.2
#: How long an answer of the daemon is reused for the same question: /healthz
#: needs no token, and a client asking it in a loop must not keep the daemon's
#: answering thread (and so its interpreter lock) busy; monitors poll far slower.
ANSWER_MAX_AGE_SECONDS = 1.0
#: How long stop() waits for the child beyond HttpServer.stop()'s own grace.
STOP_JOIN_SECONDS = 10.0


# -- messages on the link (child -> daemon: Ask, Notice; daemon -> child: Answer) --


@dataclass(frozen=True)
class Ask:
    """A question only the daemon can answer: ``health``, ``inbox`` or ``metrics``."""

    seq: int
    what: str


@dataclass(frozen=True)
class Answer:
    """The answer to the :class:`Ask` numbered ``seq``, or why there is none."""

    seq: int
    value: Any
    error: str | None = None


@dataclass(frozen=True)
class Notice:
    """An upload registered ``batch_id``: write its status.json, or wake the loop."""

    batch_id: str
    write_status: bool
    wake: bool


@dataclass(frozen=True)
class Serving:
    """The HTTP process answers requests from now on (the daemon may send READY=1)."""

    pid: int


# -- the daemon's side ---------------------------------------------------------------


@dataclass
class DaemonAnswers:
    """What the daemon answers the HTTP process with, and does on its notices."""

    health: Callable[[], dict[str, str]]
    inbox: Callable[[], list[dict[str, str | None]]]
    metrics: Callable[[], bytes]
    write_status: Callable[[str], None]
    wake: Callable[[], None]
    #: settles what a dead HTTP process left (its upload half-registered),
    #: before the next one starts: :func:`batchd.recovery.settle_dead_uploads`.
    settle: Callable[[], object] = lambda: None

    def answer(self, what: str) -> Any:
        if what == "health":
            return self.health()
        if what == "inbox":
            return self.inbox()
        if what == "metrics":
            return self.metrics()
        raise ValueError(f"unknown question from the HTTP process: {what!r}")


class HttpProcess:
    """The daemon's handle on its HTTP process: start, reconfigure, stop, replace."""

    def __init__(
        self,
        settings: Settings,
        listening: socket.socket,
        answers: DaemonAnswers,
        tokens: Tokens | None = None,
    ) -> None:
        self.settings = settings
        #: the tokens the HTTP process serves with, read here (ConfigError: an
        #: unreadable http.users_file) and kept when a reload cannot read it
        #: again, so an HTTP process started after such a reload does not die
        #: of it: the child never reads http.users_file itself.
        self.tokens = tokens if tokens is not None else Tokens(settings.http)
        self.listening = listening
        self.answers = answers
        self.port = int(listening.getsockname()[1])
        #: /healthz's uptime counts from here, not from the current child's start
        #: (CLOCK_MONOTONIC is one clock for every process on the machine).
        self.started_monotonic = time.monotonic()
        #: processes started (the first, then each replacement).
        self.started = 0
        self._process: BaseProcess | None = None
        self._link: Connection | None = None
        self._control: Connection | None = None
        self._started_at = 0.0
        self._backoff = RESTART_BACKOFF_FIRST_SECONDS
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # the process and its pipes, between supervisor and stop()
        self._thread: threading.Thread | None = None
        #: set when a child (the first, or a replacement) said it serves.
        self._serving = threading.Event()

    def wait_serving(self, timeout_seconds: float) -> bool:
        """Wait until an HTTP process serves (its :class:`Serving` came); False at the deadline."""
        return self._serving.wait(timeout_seconds)

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None else None

    def start(self) -> None:
        """Start the HTTP process and the thread that answers and supervises it."""
        self._spawn()
        self._thread = threading.Thread(target=self._supervise, name="batchd-httpproc", daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        link, child_link = _ctx.Pipe(duplex=True)
        control, child_control = _ctx.Pipe(duplex=False)
        kept = False
        try:
            # Under the lock, as reconfigure(): settings a reload sets while
            # the child starts are either in its arguments or sent after.
            with self._lock:
                if self._stopping.is_set():  # stop() came during the back-off
                    return
                process = _ctx.Process(
                    target=http_main,
                    # The socket is pickled for the spawned child: its descriptor
                    # is passed on, the daemon keeps its own for the next child.
                    args=(
                        self.settings,
                        self.tokens,
                        self.listening,
                        child_link,
                        control,
                        os.getpid(),
                        self.started_monotonic,
                    ),
                    name="batchd-http",
                    daemon=True,
                )
                process.start()
                self._process, self._link, self._control = process, link, child_control
                kept = True
                self._started_at = time.monotonic()
                self.started += 1
        finally:
            # The child's ends are its own now (or nobody's); ours, unless kept.
            for conn in (child_link, control) + (() if kept else (link, child_control)):
                conn.close()
        log.info("http_process_started", pid=process.pid, port=self.port)

    def _supervise(self) -> None:
        # Questions are answered until the child is gone, a stopping one too.
        # Only this thread reaps the child: two threads waiting for one pid
        # race, and the loser takes a dead child for a live one.
        link_open = True
        while True:
            process, link = self._process, self._link
            assert process is not None and link is not None
            waited: list[Any] = [link, process.sentinel] if link_open else [process.sentinel]
            ready = wait(waited, timeout=SUPERVISE_POLL_SECONDS)
            if link in ready:
                try:
                    self._handle(link, link.recv())
                    continue
                except (EOFError, OSError):
                    link_open = False  # the child is ending: wait for its exit alone
            if process.sentinel in ready:
                process.join()
                if self._stopping.is_set():
                    return
                self._replace(process)
                if self._stopping.is_set():
                    return
                link_open = True

    def _handle(self, link: Connection, message: object) -> None:
        if isinstance(message, Serving):
            log.info("http_process_serving", pid=message.pid, port=self.port)
            self._serving.set()
            return
        if isinstance(message, Notice):
            try:
                if message.write_status:
                    self.answers.write_status(message.batch_id)
                if message.wake:
                    self.answers.wake()
            except Exception as exc:  # the batch is registered: recovery writes it
                log.error("status_write_failed", batch_id=message.batch_id, error=str(exc))
            return
        if isinstance(message, Ask):
            try:
                answer = Answer(message.seq, self.answers.answer(message.what))
            except Exception as exc:
                log.exception("http_daemon_answer_failed", what=message.what, error=str(exc))
                answer = Answer(message.seq, None, f"{message.what} failed in the daemon: {exc!r}")
            with contextlib.suppress(OSError):
                link.send(answer)

    def _replace(self, dead: BaseProcess) -> None:
        code = dead.exitcode
        lived = time.monotonic() - self._started_at
        if lived >= RESTART_BACKOFF_RESET_SECONDS:
            self._backoff = RESTART_BACKOFF_FIRST_SECONDS
        delay = self._backoff
        self._backoff = min(self._backoff * 2, RESTART_BACKOFF_MAX_SECONDS)
        signame = None
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                signame = signal.Signals(-code).name
        log.error(
            "http_process_died",
            pid=dead.pid,
            exit_code=code if code is None or code >= 0 else None,
            signal=signame,
            lived_seconds=round(lived, 3),
            restart_in_seconds=delay,
            detail="the HTTP API is down until its process is started again",
        )
        self._close_pipes()
        try:
            self.answers.settle()
        except Exception as exc:  # start-up recovery finds it all the same
            log.exception("http_process_settle_failed", pid=dead.pid, error=repr(exc))
        while not self._stopping.wait(delay):
            try:
                self._spawn()
                return
            except Exception as exc:
                # No process or pipe could be made (EAGAIN, EMFILE, ENOMEM):
                # this thread is the only one that starts the HTTP process
                # again, so it must not die of it; try again after a back-off.
                delay = self._backoff
                self._backoff = min(self._backoff * 2, RESTART_BACKOFF_MAX_SECONDS)
                log.error(
                    "http_process_start_failed",
                    error=repr(exc),
                    restart_in_seconds=delay,
                    detail="the HTTP API is down until its process can be started",
                )

    def _close_pipes(self) -> None:
        with self._lock:
            for conn in (self._link, self._control):
                if conn is not None:
                    with contextlib.suppress(OSError):
                        conn.close()

    def reconfigure(self, settings: Settings) -> None:
        """Hand new settings and tokens to the child (it applies :meth:`HttpServer.reconfigure`)."""
        from batchd.http import reread_tokens

        with self._lock:
            self.tokens = reread_tokens(self.tokens, settings.http)
            self.settings = settings
            if self._control is not None:
                with contextlib.suppress(OSError):
                    self._control.send((settings, self.tokens))

    def stop(self) -> None:
        """Ask the child to stop gracefully; kill it past :data:`STOP_JOIN_SECONDS`."""
        with self._lock:
            self._stopping.set()
            process, control = self._process, self._control
        if control is not None:
            with contextlib.suppress(OSError):
                control.send(None)
        if self._thread is not None:
            # The supervisor answers the stopping child's questions and reaps it.
            self._thread.join(STOP_JOIN_SECONDS)
            if self._thread.is_alive() and process is not None:
                log.warning("http_process_killed", pid=process.pid, after_seconds=STOP_JOIN_SECONDS)
                process.kill()
                self._thread.join()
        self._close_pipes()
        self.listening.close()


# -- the child's side ----------------------------------------------------------------


class DaemonLink:
    """The HTTP process's questions to the daemon, each with a deadline.

    HTTP threads share one pipe: one question at a time (a lock), each
    tagged with a number; an answer is reused for the same question for
    :data:`ANSWER_MAX_AGE_SECONDS`, so askers waiting on the lock while it
    came take it too. A question the daemon has not answered in time
    stays the one outstanding: the next asker waits for that answer (within
    its own deadline) instead of sending another, so a stalled daemon finds
    one question on its pipe when it runs again, not one per /healthz asked
    meanwhile, and the pipe cannot fill with questions. Every write waits
    for room on the pipe only until the deadline: a daemon that stopped
    reading makes /healthz 503 and drops a notice, never blocks a thread.
    """

    def __init__(self, conn: Connection, timeout_seconds: float) -> None:
        self.conn = conn
        self.timeout_seconds = timeout_seconds
        self._ask_lock = threading.Lock()  # one question (and its reads) at a time
        self._send_lock = threading.Lock()  # whole messages: notices come from other threads
        self._seq = itertools.count(1)
        #: the number of the question sent and not answered yet (None: none is).
        self._outstanding: int | None = None
        #: the last answer to each question, and when it came (monotonic).
        self._answers: dict[str, tuple[float, Any]] = {}

    def ask(self, what: str) -> Any:
        """The daemon's answer to ``what``; :class:`Refusal` 503 when it does not come in time."""
        deadline = time.monotonic() + self.timeout_seconds
        if not self._ask_lock.acquire(timeout=self.timeout_seconds):
            raise self._late(what)
        seq: int | None = None
        try:
            kept = self._answers.get(what)
            if kept is not None and time.monotonic() - kept[0] < ANSWER_MAX_AGE_SECONDS:
                return kept[1]
            while True:
                if self._outstanding is None:
                    seq = next(self._seq)
                    if not self._send(Ask(seq, what), deadline):
                        raise self._late(what, "the daemon is not reading its pipe")
                    self._outstanding = seq
                left = deadline - time.monotonic()
                if left <= 0 or not self.conn.poll(left):
                    raise self._late(what)
                answer = self.conn.recv()
                if not isinstance(answer, Answer) or answer.seq != self._outstanding:
                    continue
                self._outstanding = None
                if answer.seq != seq:  # an earlier asker's, come late: now ask ours
                    continue
                if answer.error is not None:
                    raise Refusal(503, f"{answer.error}; see the daemon's log")
                self._answers[what] = (time.monotonic(), answer.value)
                return answer.value
        except (EOFError, OSError) as exc:
            raise Refusal(503, f"the daemon is gone ({exc!r}); see its log") from exc
        finally:
            self._ask_lock.release()

    def _late(self, what: str, why: str = "it may be overloaded") -> Refusal:
        return Refusal(
            503,
            f"the daemon did not answer {what!r} within {self.timeout_seconds:g} s"
            f" (http.daemon_answer_timeout_seconds); {why}: see its log",
        )

    def _send(self, message: Ask | Notice | Serving, deadline: float) -> bool:
        """Write ``message`` once the pipe has room, waiting until ``deadline``; False if never."""
        if not self._send_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return False
        try:
            poller = select.poll()
            poller.register(self.conn.fileno(), select.POLLOUT)
            left_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not poller.poll(left_ms):
                return False
            # A Unix socket is writable when most of its send buffer is free:
            # room for a message this small (an Ask, a Notice: ~100 bytes).
            self.conn.send(message)
            return True
        finally:
            self._send_lock.release()

    def serving(self) -> bool:
        """Tell the daemon this process serves; False when the pipe had no room in time."""
        try:
            return self._send(Serving(os.getpid()), time.monotonic() + self.timeout_seconds)
        except OSError:
            return False

    def notify(self, batch: BatchRow, *, write_status: bool = False, wake: bool = False) -> None:
        """Tell the daemon of a registered upload; no answer awaited, no wait past the deadline."""
        try:
            sent = self._send(
                Notice(batch.id, write_status, wake), time.monotonic() + self.timeout_seconds
            )
        except OSError:
            sent = False
        if not sent:
            # Registered already: the scheduler's poll sweep finds the batch,
            # and its status.json is written when its first file settles.
            log.warning(
                "http_notice_dropped",
                batch_id=batch.id,
                write_status=write_status,
                wake=wake,
                detail="the daemon did not read its pipe within"
                " http.daemon_answer_timeout_seconds; the scheduler's sweep finds the batch",
            )

    # -- what HttpServer calls --------------------------------------------------------

    def health(self) -> dict[str, str]:
        try:
            return dict(self.ask("health"))
        except Refusal as exc:
            return {"daemon": exc.message}

    def inbox(self) -> list[dict[str, str | None]]:
        return list(self.ask("inbox"))

    def metrics(self) -> bytes:
        return bytes(self.ask("metrics"))


def http_main(
    settings: Settings,
    tokens: Tokens,
    listening: socket.socket,
    link: Connection,
    control: Connection,
    parent_pid: int,
    started_monotonic: float,
) -> None:
    """Entry point of the HTTP process: serve until the daemon says stop (or goes)."""
    # A Ctrl-C in the daemon's terminal reaches the whole process group: the
    # daemon decides when HTTP stops. A SIGHUP is the daemon's to read the
    # configuration again; it forwards what changed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    die_with_parent(parent_pid)
    logsetup.configure(settings.log)

    from batchd.http import HttpServer
    from batchd.intake import Intake
    from batchd.metrics import Metrics
    from batchd.outbox import Outbox
    from batchd.spool import Spool
    from batchd.store import open_store

    clock = SystemClock()
    daemon = DaemonLink(link, settings.http.daemon_answer_timeout_seconds)
    # Not migrating, so not connecting yet: a child started (or restarted)
    # while PostgreSQL is down must serve, and /healthz say 503, not die.
    store = open_store(settings, migrate=False)
    spool = Spool(settings)
    intake = Intake(
        settings,
        spool,
        store,
        Outbox(spool, store),
        clock,
        on_registered=lambda batch: daemon.notify(batch, wake=True),
        write_status=lambda batch: daemon.notify(batch, write_status=True),
    )
    server = HttpServer(settings, store, spool, intake, Metrics(), daemon.health, clock, tokens)
    server.inbox = daemon.inbox
    server.daemon_metrics = daemon.metrics
    server.adopt(listening)
    # Given to serve(), not set after it: a request answered in between
    # reported this process's age as the daemon's uptime.
    hang_point("http_before_serving")
    server.serve(started_at=started_monotonic)
    # After serve(): its thread accepts from here on, so a client the daemon's
    # READY=1 lets in is answered at once, not queued in the backlog.
    if not daemon.serving():
        log.warning(
            "http_serving_notice_dropped",
            detail="the daemon did not read its pipe within http.daemon_answer_timeout_seconds;"
            " it sends READY=1 at http.ready_timeout_seconds",
        )
    try:
        while True:
            try:
                message = control.recv()
            except (EOFError, OSError):
                break  # the daemon is gone
            if not isinstance(message, tuple):
                break  # None: stop
            new, new_tokens = message
            logsetup.configure(new.log)
            intake.settings = spool.settings = new
            daemon.timeout_seconds = new.http.daemon_answer_timeout_seconds
            server.reconfigure(new, new_tokens)
    finally:
        server.stop()
        store.close()
