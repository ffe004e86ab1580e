"""The HTTP server's plumbing: connection threads, deadlines, room for new clients.

A :class:`ThreadingHTTPServer` with one thread per client connection, capped
at ``http.max_threads``. What the requests mean lives in :mod:`batchd.httproutes`;
this module only keeps connections from holding threads forever:

* :class:`DeadlineReader` gives every socket read a timeout
  (``http.socket_timeout_seconds``) and the request line and headers one
  deadline, so a client dribbling one byte a second cannot hold a thread;
* when all threads are busy, the connection that has waited longest without
  sending a byte (an idle keep-alive, or one opened and never used), or one
  still sending its request line and headers after
  :data:`SLOW_REQUEST_CLOSE_SECONDS`, is closed to make room; failing that a
  new connection waits briefly, then gets 503;
* one client address holds at most ``http.max_connections_per_client``
  connections (at the cap its own oldest idle or unfinished request is
  closed to make room, so it can only ever displace itself);
* uploads hold at most ``http.max_threads - http.reserved_threads`` threads
  (and ``http.max_uploads_per_client`` per address) and announce at most
  ``limits.max_upload_bytes_in_flight`` bytes in all (:meth:`Server.upload_slot`),
  so slow uploads can never take the threads /healthz and GETs need.
"""

from __future__ import annotations

import collections
import contextlib
import io
import select
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Generic, Protocol, TypeVar

import structlog

from batchd.config import Settings
from batchd.errors import Refusal

log = structlog.get_logger("batchd.httpserver")

#: The most read from a socket at once (upload bodies, bodies drained after a refusal).
READ_CHUNK_BYTES = 256 * 1024
#: How long a new connection waits for a free thread before it gets 503.
BUSY_WAIT_SECONDS = 0.5
#: Threads that may answer 503 at once; past that, extra connections are dropped.
BUSY_REFUSER_THREADS = 8
#: With every thread busy, a connection that has sent nothing for this long may
#: be closed to make room (a client sends its request right after connecting).
IDLE_CLOSE_SECONDS = 1.0
#: With every thread busy, a connection still sending its request line and
#: headers after this long may be closed to make room (a real client sends
#: them in one go; a slow-drip client holds its thread with them).
SLOW_REQUEST_CLOSE_SECONDS = 1.0
#: How often a new connection waiting for a thread looks for an idle one to close.
IDLE_POLL_SECONDS = 0.05
#: After refusing an upload mid-body, how long (and how much) to keep reading
#: and discarding so the client sees the answer instead of a connection reset.
LINGER_SECONDS = 1.0
LINGER_MAX_BYTES = 4 * 1024 * 1024


class ServerHooks(Protocol):
    """What the transport needs from the application behind it (batchd.http's
    HttpServer): its settings and a word when a connection comes or goes."""

    @property
    def settings(self) -> Settings: ...

    def http_busy(self) -> None:
        """A connection was refused 503 (every thread busy, or its address at its cap)."""

    def connections_changed(self, open_now: int) -> None:
        """The number of connections being served changed."""

    def thread_done(self) -> None:
        """A connection's thread is about to end (release what it held)."""

    def answered(self, route: str, code: int) -> None:
        """A request on ``route`` was answered with status ``code``."""


class DeadlineReader(io.RawIOBase):
    """Socket reads with a per-read timeout and, while headers arrive, a deadline.

    A per-read timeout alone lets a client that sends one byte just before
    each timeout hold a thread forever; the deadline bounds the whole
    request line and headers.
    """

    def __init__(self, sock: socket.socket, io_timeout: float) -> None:
        self.sock = sock
        self.io_timeout = io_timeout
        self.deadline: float | None = None
        self.received = 0
        #: When the first byte of the current request arrived (monotonic).
        self.first_at = 0.0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        timeout = self.io_timeout
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - time.monotonic())
            if timeout <= 0:
                raise TimeoutError("request headers were not received in time")
        self.sock.settimeout(timeout)
        try:
            n = self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.io_timeout)
        if n and not self.received:
            self.first_at = time.monotonic()
        self.received += n
        return n


BUSY_ANSWER = b'{"success":false,"error":"server busy: every HTTP thread is in use; retry"}'
CLIENT_CAP_ANSWER = (
    b'{"success":false,"error":"too many connections from your address'
    b' (http.max_connections_per_client); close some and retry"}'
)


def _refuse_busy(request: socket.socket, body: bytes = BUSY_ANSWER) -> None:
    """Answer 503 on a connection no thread could take, then close it gently.

    Runs in a short-lived thread of its own (see ``Server.process_request``)
    so the accept loop never waits on a client.
    """
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    try:
        request.settimeout(LINGER_SECONDS)
        request.sendall(head + body)
        request.shutdown(socket.SHUT_WR)
        # Read (and drop) the request until the client closes: closing with
        # unread data would reset the connection before the client reads the 503.
        deadline = time.monotonic() + LINGER_SECONDS
        while time.monotonic() < deadline and request.recv(READ_CHUNK_BYTES):
            pass
    except OSError:
        pass
    finally:
        request.close()


def _refuse_now(request: socket.socket, body: bytes) -> None:
    """Answer 503 without blocking: send, drop what the client sent so far, close.

    Used on the accept thread when every refuser thread is busy. Dropping the
    bytes already received lets the close send FIN rather than a reset, so
    the client reads the 503 (a request still arriving may see a reset).
    """
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    try:
        request.setblocking(False)
        request.send(head + body)
        request.shutdown(socket.SHUT_WR)
        with contextlib.suppress(BlockingIOError):
            while request.recv(READ_CHUNK_BYTES):
                pass
    except OSError:
        pass
    finally:
        request.close()


def _readable(conn: socket.socket) -> bool:
    """True when ``conn`` has bytes (or end-of-file) waiting, without reading them."""
    poller = select.poll()
    try:
        poller.register(conn, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True  # closed meanwhile: nothing to make room from


#: The application behind a :class:`Server` (what its request handlers reach as ``server.hooks``).
HooksT = TypeVar("HooksT", bound=ServerHooks, covariant=True)


class Server(ThreadingHTTPServer, Generic[HooksT]):
    """ThreadingHTTPServer with a cap on concurrent connection threads."""

    daemon_threads = True
    block_on_close = False  # stop() cuts and waits for connections itself
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        hooks: HooksT,
        handler: type[BaseHTTPRequestHandler],
        listening: socket.socket | None = None,
    ) -> None:
        """Bind and listen on ``address``, or serve ``listening``, a socket already
        bound and listening (the daemon binds it and hands it to the HTTP process)."""
        self.hooks = hooks
        self._slots = threading.BoundedSemaphore(hooks.settings.http.max_threads)
        self._refusers = threading.BoundedSemaphore(BUSY_REFUSER_THREADS)
        self.changed = threading.Condition()
        self.connections: set[socket.socket] = set()
        #: connections whose thread waits for a next request: since when, and its reader.
        self.idle: dict[socket.socket, tuple[float, DeadlineReader]] = {}
        self.peak_connections = 0
        #: open connections per client address, and uploads being received.
        self.per_client: collections.Counter[str] = collections.Counter()
        self.uploads: collections.Counter[str] = collections.Counter()
        self.upload_bytes = 0
        self._client_of: dict[socket.socket, str] = {}
        #: connections that were answered and are only drained before closing.
        self.lingering: set[socket.socket] = set()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        if listening is None:
            super().__init__(address, handler)
            return
        super().__init__(address, handler, bind_and_activate=False)
        self.socket.close()
        self.socket = listening
        self.server_address = listening.getsockname()
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), a DNS lookup that can hang.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def waiting(self, conn: socket.socket, reader: DeadlineReader) -> None:
        """``conn``'s thread starts waiting for a request (it may be closed to make room)."""
        with self.changed:
            self.idle[conn] = (time.monotonic(), reader)

    def working(self, conn: socket.socket) -> None:
        with self.changed:
            self.idle.pop(conn, None)

    def _close_idle(self, client: str | None = None) -> bool:
        """Close the connection that has waited longest without sending a byte,
        else the one slowest to send its request line and headers.

        Every thread taken by connections that send nothing (a client opening
        http.max_threads connections and sitting on them, or idle keep-alives)
        or that drip their headers a byte at a time would otherwise shut
        everyone else out, health probes included, until their timeout. An
        idle HTTP/1.1 connection may be closed at any time; clients open a new
        one. With ``client``, only that address's connections are candidates,
        and an unfinished request whatever its age: a client at its own cap
        only ever displaces its own. Returns True when it closed one.
        """
        now = time.monotonic()
        # A connection that has sent nothing yet may be a client between its
        # connect() and its send(): it must have been idle a while, always.
        idle_age = IDLE_CLOSE_SECONDS
        slow_age = 0.0 if client is not None else SLOW_REQUEST_CLOSE_SECONDS
        with self.changed:
            idle = sorted(
                (
                    (since, conn)
                    for conn, (since, r) in self.idle.items()
                    if r.received == 0 and (client is None or self._client_of.get(conn) == client)
                ),
                key=lambda item: item[0],
            )
            slow = sorted(
                (
                    (r.first_at, conn)
                    for conn, (_, r) in self.idle.items()
                    if r.received > 0 and (client is None or self._client_of.get(conn) == client)
                ),
                key=lambda item: item[0],
            )
            chosen: socket.socket | None = None
            since = now
            for conn in self.lingering:  # answered already: the first to go
                if client is None or self._client_of.get(conn) == client:
                    chosen = conn
                    self.lingering.discard(conn)
                    break
            for since, conn in idle if chosen is None else ():
                if now - since < idle_age:
                    break
                if not _readable(conn):  # a request that arrived but is not read yet
                    chosen = conn
                    break
            for first_at, conn in slow if chosen is None else ():
                if now - first_at < slow_age:
                    break
                # Bytes waiting mean the client is sending right now, not dripping.
                if not _readable(conn):
                    since, chosen = first_at, conn
                    break
            if chosen is None:
                return False
            conn = chosen
            self.idle.pop(conn, None)
        with contextlib.suppress(OSError):
            # Wakes its thread with end-of-file: it ends, and frees its slot.
            conn.shutdown(socket.SHUT_RD)
        log.debug("http_idle_closed", idle_seconds=round(time.monotonic() - since, 3))
        return True

    def _over_client_cap(self, client: str) -> bool:
        """True when ``client`` holds its quota of connections and none could be freed."""
        cap = self.hooks.settings.http.max_connections_per_client
        with self.changed:
            if self.per_client[client] < cap:
                return False
        return not self._close_idle(client)

    def _refuse_later(self, request: socket.socket, body: bytes) -> None:
        if self._refusers.acquire(blocking=False):
            threading.Thread(
                target=self._refuse, args=(request, body), name="batchd-http-busy", daemon=True
            ).start()
        else:  # even the refusers are all busy: answer without waiting for the client
            _refuse_now(request, body)

    def process_request(self, request: Any, client_address: Any) -> None:
        client = str(client_address[0])
        if self._over_client_cap(client):
            self.hooks.http_busy()
            log.warning("http_client_capped", client=client)
            self._refuse_later(request, CLIENT_CAP_ANSWER)
            return
        slot = self._slots.acquire(blocking=False)
        closed = False
        deadline = time.monotonic() + BUSY_WAIT_SECONDS
        while not slot:
            # One idle connection closed frees the one slot this connection needs.
            closed = closed or self._close_idle()
            left = deadline - time.monotonic()
            if left <= 0:
                break
            slot = self._slots.acquire(timeout=min(left, IDLE_POLL_SECONDS))
        if not slot:
            self.hooks.http_busy()
            log.warning("http_busy", client=client)
            self._refuse_later(request, BUSY_ANSWER)
            return
        with self.changed:
            self.per_client[client] += 1
            self._client_of[request] = client
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            self._slots.release()
            raise

    def _forget(self, request: socket.socket) -> None:
        with self.changed:
            client = self._client_of.pop(request, None)
            if client is not None:
                self.per_client[client] -= 1
                if self.per_client[client] <= 0:
                    del self.per_client[client]

    def _refuse(self, request: socket.socket, body: bytes) -> None:
        try:
            _refuse_busy(request, body)
        finally:
            self._refusers.release()

    @contextlib.contextmanager
    def upload_slot(self, client: str, length: int) -> Iterator[None]:
        """Hold one of the threads uploads may use and ``length`` bytes of the
        in-flight budget while an upload body is received; 503 when none is left."""
        settings = self.hooks.settings
        http = settings.http
        most = max(1, http.max_threads - http.reserved_threads)
        budget = settings.limits.max_upload_bytes_in_flight
        if length > budget:
            raise Refusal(
                413,
                f"upload of {length} bytes is over limits.max_upload_bytes_in_flight"
                f" ({budget} bytes)",
            )
        with self.changed:
            if sum(self.uploads.values()) >= most:
                why = (
                    f"{most} uploads are being received (http.max_threads - http.reserved_threads)"
                )
            elif self.uploads[client] >= http.max_uploads_per_client:
                why = (
                    f"your address is sending {self.uploads[client]} uploads already"
                    " (http.max_uploads_per_client)"
                )
            elif self.upload_bytes + length > budget:
                why = (
                    f"{self.upload_bytes} bytes of uploads are in flight"
                    f" (limits.max_upload_bytes_in_flight = {budget})"
                )
            else:
                why = ""
                self.uploads[client] += 1
                self.upload_bytes += length
        if why:
            log.warning("upload_busy", client=client, reason=why)
            raise Refusal(503, f"server busy: {why}; retry later", {"Retry-After": "5"})
        try:
            yield
        finally:
            with self.changed:
                self.uploads[client] -= 1
                if self.uploads[client] <= 0:
                    del self.uploads[client]
                self.upload_bytes -= length

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self.changed:
            self.connections.add(request)
            self.peak_connections = max(self.peak_connections, len(self.connections))
            self.hooks.connections_changed(len(self.connections))
        try:
            super().process_request_thread(request, client_address)
        finally:
            try:
                self.hooks.thread_done()
            finally:
                self._forget(request)
                with self.changed:
                    self.connections.discard(request)
                    self.hooks.connections_changed(len(self.connections))
                    self.changed.notify_all()
                self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("http_error", client=str(client_address[0]))
