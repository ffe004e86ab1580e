"""One HTTP connection's request loop: deadlines, JSON answers, lingering.

The request-level half of the transport (:mod:`batchd.httpserver` is the
connection-level half): it reads request after request on a kept-alive
connection within ``http.socket_timeout_seconds``, answers malformed ones
as JSON, and leaves what a request means to a subclass
(:class:`batchd.httproutes.Handler`). It knows nothing of batchd's store,
spool or tokens; it reaches the application only through
:class:`batchd.httpserver.ServerHooks`.
"""

from __future__ import annotations

import contextlib
import email.utils
import io
import socket
import time
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

import structlog

from batchd import jsonio
from batchd import log as logsetup
from batchd.errors import ClientGone, Refusal
from batchd.httpheaders import read_headers
from batchd.httpserver import (
    LINGER_MAX_BYTES,
    LINGER_SECONDS,
    READ_CHUNK_BYTES,
    DeadlineReader,
    Server,
    ServerHooks,
)

log = structlog.get_logger("batchd.http")

MAX_REQUEST_LINE_BYTES = 65_536
RFILE_BUFFER_BYTES = 64 * 1024
WFILE_BUFFER_BYTES = 64 * 1024
JSON_TYPE = "application/json; charset=utf-8"


def encode(payload: dict[str, Any]) -> bytes:
    """``payload`` as compact UTF-8 JSON (dates and the like as text)."""
    return jsonio.compact(payload, default=str)


#: The Date header's text and the second it is for: formatted once a second,
#: not per answer (email.utils.formatdate was ~7 % of a request, issue 15).
_date: tuple[int, str] = (0, "")


def http_date() -> str:
    """Now, as an HTTP Date header value (RFC 9110 section 5.6.7)."""
    global _date
    now = int(time.time())
    second, text = _date
    if second != now:
        text = email.utils.formatdate(now, usegmt=True)
        _date = (now, text)  # one tuple: another thread sees the old or the new, whole
    return text


class RequestHandler(BaseHTTPRequestHandler):
    """One client connection: request after request while it keeps alive.

    The loop, deadlines and answers; what a request means is the subclass's
    :meth:`_dispatch` (and :meth:`handle_expect_100`).
    """

    server: Server[ServerHooks]
    protocol_version = "HTTP/1.1"
    server_version = "batchd"
    sys_version = ""
    # Headers and body leave in one write; no Nagle delay on small answers.
    wbufsize = WFILE_BUFFER_BYTES
    disable_nagle_algorithm = True

    def setup(self) -> None:
        self.io_timeout = self.server.hooks.settings.http.socket_timeout_seconds
        super().setup()
        # Every read and write on this connection gives up after io_timeout.
        self.connection.settimeout(self.io_timeout)
        self._reader = DeadlineReader(self.connection, self.io_timeout)
        self.rfile = io.BufferedReader(self._reader, RFILE_BUFFER_BYTES)
        self._route_name = "other"
        self._responded = False
        self._started = time.monotonic()
        self._local_address = str(self.connection.getsockname()[0])

    # -- the request loop ------------------------------------------------------

    def handle_one_request(self) -> None:
        self._reader.deadline = time.monotonic() + self.io_timeout
        self._reader.received = 0
        self._responded = False
        self._route_name = "other"
        # parse_request sets these; an answer before it (408, 414) needs them too.
        self.command, self.path, self.requestline = "", "", ""
        self.request_version = "HTTP/1.1"
        try:
            # Until its headers are in, the connection may be closed to make
            # room (idle, or dripping its request: see Server._close_idle).
            self.server.waiting(self.connection, self._reader)
            try:
                self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE_BYTES + 1)
                self._started = time.monotonic()
                if len(self.raw_requestline) > MAX_REQUEST_LINE_BYTES:
                    self.requestline = self.request_version = ""
                    self.send_error(414, "request line too long")
                    return
                if not self.raw_requestline:
                    self.close_connection = True
                    return
                if not self.parse_request():
                    return  # parse_request answered already (through send_error)
            finally:
                self.server.working(self.connection)
            if self.request_version == "HTTP/0.9":
                self.send_error(400, "HTTP/0.9 requests are not supported")
                return
            self._reader.deadline = None
            self._dispatch()
        except TimeoutError:
            self.close_connection = True
            if self._reader.received and not self._responded:
                self._reader.deadline = None
                with contextlib.suppress(OSError):
                    self._error(408, "request not received in time; connection closed")
        except (ConnectionError, ClientGone):
            self.close_connection = True
        finally:
            try:
                self.wfile.flush()
            except OSError:
                self.close_connection = True

    def parse_request(self) -> bool:
        """The request line (as http.server reads it) and the headers (batchd.httpheaders).

        http.server's own would hand the header block to the email package;
        this is its request-line half unchanged in behaviour, then
        :func:`read_headers`. False when it answered a refusal already.
        """
        self.command = ""
        self.request_version = version = self.default_request_version
        self.close_connection = True
        requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        self.requestline = requestline
        words = requestline.split()
        if not words:
            return False
        if len(words) >= 3:  # enough to tell the protocol version
            version = words[-1]
            number = version[5:].split(".") if version.startswith("HTTP/") else []
            # ASCII digits only: str.isdigit() takes Latin-1's superscripts too.
            digits = all(p.isascii() and p.isdigit() and len(p) <= 10 for p in number)
            if len(number) != 2 or not digits:
                self.send_error(400, f"bad request version {version!r}")
                return False
            major, minor = int(number[0]), int(number[1])
            if major >= 2:
                self.send_error(505, f"HTTP version {version[5:]} is not supported; use HTTP/1.1")
                return False
            if (major, minor) >= (1, 1):
                self.close_connection = False
            self.request_version = version
        if not 2 <= len(words) <= 3:
            self.send_error(400, f"bad request syntax {requestline[:200]!r}")
            return False
        command, path = words[:2]
        if len(words) == 2:
            self.close_connection = True
            if command != "GET":
                self.send_error(400, f"bad HTTP/0.9 request type {command!r}")
                return False
        self.command, self.path = command, path
        # As http.server (gh-87389): "//host/..." would read as another host's URL.
        if self.path.startswith("//"):
            self.path = "/" + self.path.lstrip("/")
        try:
            self.headers = read_headers(self.rfile)
        except Refusal as exc:
            self.send_error(exc.status, exc.message)
            return False
        # A list of options (RFC 9110 section 7.6.1), in any of the fields:
        # "close" among them ends the connection after the answer (RFC 9112
        # section 9.6), whatever else they say; http.server took only a
        # field that was exactly "close".
        options = {
            option.strip().lower()
            for field in self.headers.get_all("Connection", [])
            for option in field.split(",")
        }
        if "close" in options:
            self.close_connection = True
        elif "keep-alive" in options:
            self.close_connection = False
        expect = self.headers.get("Expect", "")
        if expect.lower() == "100-continue" and self.request_version >= "HTTP/1.1":
            return self.handle_expect_100()
        return True

    # -- answers -----------------------------------------------------------------

    def _dispatch(self) -> None:
        """Answer the request whose line and headers were just read."""
        raise NotImplementedError

    def _send(
        self,
        code: int,
        body: bytes,
        content_type: str = JSON_TYPE,
        headers: dict[str, str] | None = None,
    ) -> None:
        # The whole header block as one string, written once with the body
        # (send_response/send_header per header cost ~10 % of a request).
        self._responded = True
        phrase = self.responses[code][0] if code in self.responses else ""
        head = (
            f"{self.protocol_version} {code} {phrase}\r\n"
            f"Server: {self.server_version}\r\nDate: {http_date()}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
        )
        for key, value in (headers or {}).items():
            head += f"{key}: {value}\r\n"
        if self.close_connection:
            head += "Connection: close\r\n"
        data = (head + "\r\n").encode("latin-1", "strict")
        self.wfile.write(data if self.command == "HEAD" else data + body)
        self.server.hooks.answered(self._route_name, code)
        if logsetup.debug_enabled():
            log.debug(
                "http_request",
                method=self.command,
                path=urlsplit(self.path).path,
                status=code,
                duration_ms=round((time.monotonic() - self._started) * 1000, 2),
            )

    def _json(
        self, code: int, payload: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        self._send(code, encode(payload), JSON_TYPE, headers)

    def _ok(self, data: Any, code: int = 200) -> None:
        self._json(code, {"success": True, "data": data})

    def _error(self, code: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._json(code, {"success": False, "error": message}, headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, huge headers ...) as JSON."""
        self.close_connection = True  # after a malformed request the stream cannot be trusted
        if self.request_version == "HTTP/0.9":
            # Set before a bad request line was understood: answer with a status line.
            self.request_version = "HTTP/1.0"
        if code == 501:  # a method http.server has never heard of
            code, message = 405, f"method {self.command!r} is not supported"
        reason = message or self.responses.get(code, ("error",))[0]
        self._error(code, reason)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # _send logs each answer as http_request

    def log_message(self, format: str, *args: Any) -> None:
        log.info("http_client_error", client=self.client_address[0], detail=format % args)

    def _linger(self) -> None:
        """Read and discard a little of an unread body so the client sees our answer.

        Closing a socket with unread data makes the kernel send a reset, and
        most clients then report the reset instead of the 413 we sent.
        """
        with self.server.changed:
            # Answered already: the first connection closed to make room.
            self.server.lingering.add(self.connection)
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_SECONDS
            drained = 0
            while drained < LINGER_MAX_BYTES:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.connection.settimeout(left)
                chunk = self.connection.recv(READ_CHUNK_BYTES)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass
        finally:
            with self.server.changed:
                self.server.lingering.discard(self.connection)
