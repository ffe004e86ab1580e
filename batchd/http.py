"""The HTTP API, health, metrics and the live status page (SPEC section 6).

Python's own ``http.server``: a :class:`ThreadingHTTPServer` in the daemon
process, one thread per client connection, capped at ``http.max_threads``.
It reads the store and hands uploads to :class:`~batchd.intake.Intake`, the
same registration path a folder drop takes; it never processes anything.

Defences a server facing scripts and browsers needs:

* a deadline for the request line and headers (``http.socket_timeout_seconds``),
  so a client dribbling one byte a second cannot hold a thread forever; the
  same timeout bounds every later read and write;
* a cap on threads: when all are busy, the connection that has waited
  longest without sending a byte (an idle keep-alive, or one opened and never
  used) is closed to make room; failing that a new connection waits briefly,
  then gets 503;
* uploads are streamed to disk part by part and cut off as soon as a limit
  is passed; nothing of a refused upload is kept;
* every error, including malformed requests, is a JSON answer; an exception
  in a handler answers 500 and is logged as ``http_error``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import io
import json
import math
import os
import re
import select
import shutil
import socket
import socketserver
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, unquote, urlsplit

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from batchd.clock import Clock, parse_iso
from batchd.config import LimitsSettings, Priority, Settings
from batchd.errors import BatchdError, StoreError
from batchd.intake import Intake
from batchd.metrics import Metrics
from batchd.records import Status
from batchd.spool import Spool, fsync_dir
from batchd.store import Store
from batchd.views import batch_detail

log = structlog.get_logger("batchd.http")

JOBS_LIMIT_DEFAULT = 50
JOBS_LIMIT_MAX = 500
FILES_LIMIT_DEFAULT = 1000
FILES_LIMIT_MAX = 10_000
OFFSET_MAX = 1_000_000_000
MAX_REQUEST_LINE_BYTES = 65_536
READ_CHUNK_BYTES = 256 * 1024
RFILE_BUFFER_BYTES = 64 * 1024
WFILE_BUFFER_BYTES = 64 * 1024
#: Room for one part's boundary and headers when bounding a whole upload body.
PART_OVERHEAD_BYTES = 16 * 1024
#: A plain form field (priority, user_id) longer than this is refused.
MAX_FIELD_BYTES = 1024
MAX_USER_ID_CHARS = 128
#: File names are cut to this many UTF-8 bytes (filesystems allow 255).
MAX_FILENAME_BYTES = 200
RATE_WINDOW = timedelta(hours=1)
#: Read answers kept for reuse until the database changes (bounded memory:
#: at most CACHE_ENTRIES answers of at most CACHE_MAX_BODY_BYTES each).
CACHE_ENTRIES = 64
CACHE_MAX_BODY_BYTES = 512 * 1024
#: How long a new connection waits for a free thread before it gets 503.
BUSY_WAIT_SECONDS = 0.5
#: Threads that may answer 503 at once; past that, extra connections are dropped.
BUSY_REFUSER_THREADS = 8
#: With every thread busy, a connection that has sent nothing for this long may
#: be closed to make room (a client sends its request right after connecting).
IDLE_CLOSE_SECONDS = 1.0
#: How often a new connection waiting for a thread looks for an idle one to close.
IDLE_POLL_SECONDS = 0.05
#: After refusing an upload mid-body, how long (and how much) to keep reading
#: and discarding so the client sees the answer instead of a connection reset.
LINGER_SECONDS = 1.0
LINGER_MAX_BYTES = 4 * 1024 * 1024
#: How often the accept loop checks for stop(): the most stop() waits for it.
SHUTDOWN_POLL_SECONDS = 0.1
#: How long stop() waits for connections to end once their reads are cut.
STOP_GRACE_SECONDS = 2.0

_JSON = "application/json; charset=utf-8"
_GET = ("GET", "HEAD")
#: Answered without the token: health probes, and the page's static shell
#: (it holds no data; its script asks for the token and sends it to the API).
_OPEN_ROUTES = ("healthz", "page")
_ROUTE_METHODS = {
    "page": _GET,
    "healthz": _GET,
    "metrics": _GET,
    "jobs": _GET,
    "job": _GET,
    "upload": ("POST",),
}


class _Refusal(Exception):
    """A request refused with an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class _ClientGone(Exception):
    """The client closed the connection before sending its whole request."""


# -- file names --------------------------------------------------------------


def safe_filename(raw: str) -> str:
    """A plain base name for an uploaded file, or ``""`` when nothing usable is left.

    Directory parts (``/`` and ``\\``) are dropped, control, format and other
    non-printing characters removed, leading dots stripped (hidden names are
    ignored by the spool and ``..`` must never survive), and the name cut to
    :data:`MAX_FILENAME_BYTES` keeping its extension.
    """
    name = unicodedata.normalize("NFC", raw).replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")
    name = name.strip().lstrip(".").strip()
    if len(name.encode("utf-8")) > MAX_FILENAME_BYTES:
        stem, dot, ext = name.rpartition(".")
        if not dot or len(ext) > 16:
            stem, ext = name, ""
        else:
            ext = "." + ext
        budget = MAX_FILENAME_BYTES - len(ext.encode("utf-8"))
        name = stem.encode("utf-8")[:budget].decode("utf-8", "ignore").rstrip() + ext
    return name


def _unique(name: str, taken: set[str]) -> str:
    """``name``, else ``stem-2.ext``, ``stem-3.ext`` ... whichever is not in ``taken``."""
    if name not in taken:
        return name
    stem, dot, ext = name.rpartition(".")
    if not stem:
        stem, dot, ext = name, "", ""
    n = 2
    while f"{stem}-{n}{dot}{ext}" in taken:
        n += 1
    return f"{stem}-{n}{dot}{ext}"


# -- multipart uploads -------------------------------------------------------


@dataclass
class _Part:
    form_name: str
    filename: str | None = None  # None for a plain form field
    path: Path | None = None
    fh: BinaryIO | None = None
    size: int = 0
    value: bytearray = field(default_factory=bytearray)


@dataclass(frozen=True, slots=True)
class Received:
    """One uploaded file on disk: its safe name, where it is, how big."""

    name: str
    path: Path
    size: int


class UploadReceiver:
    """python-multipart callbacks that stream file parts into ``folder``.

    Each file part goes straight to its own file; limits are checked as
    bytes arrive and a :class:`_Refusal` is raised from inside the parser
    the moment one is passed, which stops the reading.
    """

    def __init__(
        self,
        folder: Path,
        limits: LimitsSettings,
        skipped: Callable[[str], bool],
        on_user: Callable[[str], None],
    ) -> None:
        self.folder = folder
        self.limits = limits
        self.skipped = skipped
        self.on_user = on_user
        self.files: list[Received] = []
        self.fields: dict[str, str] = {}
        self.finished = False
        self._taken: set[str] = set()
        self._part: _Part | None = None
        self._headers: dict[str, str] = {}
        self._hfield = bytearray()
        self._hvalue = bytearray()

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._hfield.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._hvalue.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def close(self) -> None:
        """Close a file left open by an upload cut short."""
        if self._part is not None and self._part.fh is not None:
            self._part.fh.close()
            self._part.fh = None

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[self._hfield.decode("latin-1").strip().lower()] = self._hvalue.decode(
            "latin-1"
        ).strip()
        self._hfield.clear()
        self._hvalue.clear()

    def _headers_finished(self) -> None:
        _disposition, opts = parse_options_header(self._headers.get("content-disposition", ""))
        part = _Part(form_name=opts.get(b"name", b"").decode("utf-8", "replace"))
        raw_name = opts.get(b"filename")
        self._part = part
        if raw_name is None:
            return
        part.filename = raw_name.decode("utf-8", "replace")
        name = safe_filename(part.filename)
        if not name:
            return  # refused below if it carries any data (a browser's empty file input has none)
        if len(self.files) >= self.limits.max_files_per_batch:
            raise _Refusal(
                413,
                f"too many files: more than limits.max_files_per_batch"
                f" ({self.limits.max_files_per_batch}) in one upload",
            )
        if self.skipped(name):
            raise _Refusal(
                400,
                f"file name {name!r} is one batchd ignores as work in progress (watch.ignore);"
                " rename the file",
            )
        name = _unique(name, self._taken)
        self._taken.add(name)
        part.filename = name
        part.path = self.folder / name
        # O_EXCL | O_NOFOLLOW: the name is a fresh plain name in a private folder;
        # refuse anything else rather than write through a surprise.
        fd = os.open(part.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
        part.fh = os.fdopen(fd, "wb")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part is None:
            return
        n = end - start
        if part.filename is None:
            if part.form_name in ("priority", "user_id"):
                part.value.extend(data[start:end])
                if len(part.value) > MAX_FIELD_BYTES:
                    raise _Refusal(
                        400, f"form field {part.form_name} is over {MAX_FIELD_BYTES} bytes"
                    )
            return  # other fields are ignored
        if part.fh is None:
            if n:
                raise _Refusal(400, f"a file part has no usable file name ({part.filename!r})")
            return
        part.size += n
        if part.size > self.limits.max_file_bytes:
            raise _Refusal(
                413,
                f"file {part.filename!r} is over limits.max_file_bytes"
                f" ({self.limits.max_file_bytes} bytes)",
            )
        part.fh.write(memoryview(data)[start:end])

    def _part_end(self) -> None:
        part, self._part = self._part, None
        if part is None:
            return
        if part.fh is not None and part.path is not None and part.filename is not None:
            part.fh.flush()
            # fsync before the folder is adopted: a registered batch must never
            # point at a file whose blocks are not on disk yet.
            os.fsync(part.fh.fileno())
            part.fh.close()
            self.files.append(Received(part.filename, part.path, part.size))
        elif part.filename is None and part.form_name in ("priority", "user_id"):
            try:
                value = part.value.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise _Refusal(400, f"form field {part.form_name} is not UTF-8 text") from None
            self.fields[part.form_name] = value
            if part.form_name == "priority":
                parse_priority(value)
            else:
                self.on_user(parse_user_id(value))

    def _end(self) -> None:
        self.finished = True


def parse_priority(value: str) -> Priority:
    """The ``priority`` form field (empty means normal)."""
    try:
        return Priority(value.lower() or Priority.NORMAL)
    except ValueError:
        raise _Refusal(400, f"priority must be high, normal or low, not {value!r}") from None


def parse_user_id(value: str) -> str:
    """The ``user_id`` form field (empty means ``anonymous``)."""
    if not value:
        return "anonymous"
    if len(value) > MAX_USER_ID_CHARS or any(unicodedata.category(c)[0] == "C" for c in value):
        raise _Refusal(400, f"user_id must be at most {MAX_USER_ID_CHARS} printable characters")
    return value


# -- answers reused until the database changes ------------------------------


class AnswerCache:
    """Encoded answers of the read endpoints, valid while the database is unchanged.

    Dashboards poll the same few URLs; building a 50-file batch detail costs
    about a millisecond, looking up a cached one microseconds. Each entry is
    tagged with :meth:`Store.change_version` as read *before* building
    it, so an entry is never served after a commit: at worst a fresh answer
    is rebuilt once more than needed.
    """

    def __init__(self, entries: int = CACHE_ENTRIES) -> None:
        self.entries = entries
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, ...], tuple[int, bytes]] = OrderedDict()

    def get(self, key: tuple[str, ...], version: int) -> bytes | None:
        with self._lock:
            item = self._items.get(key)
            if item is None or item[0] != version:
                return None
            self._items.move_to_end(key)
            return item[1]

    def put(self, key: tuple[str, ...], version: int, body: bytes) -> None:
        if len(body) > CACHE_MAX_BODY_BYTES:
            return
        with self._lock:
            self._items[key] = (version, body)
            self._items.move_to_end(key)
            while len(self._items) > self.entries:
                self._items.popitem(last=False)


def _encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, default=str).encode()


# -- reading requests --------------------------------------------------------


class _DeadlineReader(io.RawIOBase):
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
        self.received += n
        return n


def _int_param(query: dict[str, list[str]], name: str, default: int, low: int, high: int) -> int:
    values = query.get(name)
    if not values or values[-1] == "":
        return default
    try:
        value = int(values[-1])
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise _Refusal(400, f"{name} must be an integer from {low} to {high}, not {values[-1]!r}")
    return value


def _str_param(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values and values[-1] != "" else None


def _route(path: str) -> tuple[str, str | None]:
    """The route name for a URL path and, for a batch, its id or name."""
    if path in ("/", "/index.html"):
        return "page", None
    if path == "/healthz":
        return "healthz", None
    if path == "/metrics":
        return "metrics", None
    if path.rstrip("/") == "/api/batch/jobs":
        return "jobs", None
    if path.startswith("/api/batch/jobs/"):
        rest = path[len("/api/batch/jobs/") :].rstrip("/")
        if rest and "/" not in rest:
            return "job", unquote(rest)
    if path.rstrip("/") == "/api/batch/upload":
        return "upload", None
    return "other", None


class _Handler(BaseHTTPRequestHandler):
    """One client connection: request after request while it keeps alive."""

    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "batchd"
    sys_version = ""
    # Headers and body leave in one write; no Nagle delay on small answers.
    wbufsize = WFILE_BUFFER_BYTES
    disable_nagle_algorithm = True

    def setup(self) -> None:
        self.owner = self.server.owner
        self.io_timeout = self.owner.settings.http.socket_timeout_seconds
        super().setup()
        # Every read and write on this connection gives up after io_timeout.
        self.connection.settimeout(self.io_timeout)
        self._reader = _DeadlineReader(self.connection, self.io_timeout)
        self.rfile = io.BufferedReader(self._reader, RFILE_BUFFER_BYTES)
        self._route_name = "other"
        self._responded = False
        self._started = time.monotonic()

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
            self.server.waiting(self.connection, self._reader)
            try:
                self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE_BYTES + 1)
            finally:
                self.server.working(self.connection)
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
        except (ConnectionError, _ClientGone):
            self.close_connection = True
        finally:
            try:
                self.wfile.flush()
            except OSError:
                self.close_connection = True

    def handle_expect_100(self) -> bool:
        # Refuse before the client sends a body we would not keep (curl asks
        # with Expect: 100-continue for big uploads).
        route, _ = _route(urlsplit(self.path).path)
        self._route_name = route
        if route not in _OPEN_ROUTES and not self._authorized():
            self._unauthorized()
            return False
        if route == "upload":
            try:
                self._upload_length()
            except _Refusal as exc:
                self.close_connection = True
                self._error(exc.status, exc.message, exc.headers)
                return False
        self.send_response_only(100)
        self.end_headers()
        self.wfile.flush()
        return True

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        route, batch_ref = _route(url.path)
        self._route_name = route
        if route != "upload" and (
            self.headers.get("Content-Length", "0").strip() not in ("", "0")
            or "Transfer-Encoding" in self.headers
        ):
            self.close_connection = True  # a body we will not read would poison the next request
        try:
            if route not in _OPEN_ROUTES and not self._authorized():
                self._unauthorized()
                return
            if route == "other":
                raise _Refusal(404, f"no such endpoint: {url.path}")
            allowed = _ROUTE_METHODS[route]
            if self.command not in allowed:
                raise _Refusal(
                    405,
                    f"{self.command} is not allowed on {url.path}; use {', '.join(allowed)}",
                    {"Allow": ", ".join(allowed)},
                )
            query = parse_qs(url.query, keep_blank_values=True)
            if route == "page":
                self._page()
            elif route == "healthz":
                self._healthz()
            elif route == "metrics":
                self._metrics()
            elif route == "jobs":
                self._jobs(query)
            elif route == "job":
                assert batch_ref is not None
                self._job(batch_ref, query)
            else:
                self._upload()
        except _Refusal as exc:
            self._error(exc.status, exc.message, exc.headers)
        except (TimeoutError, ConnectionError, _ClientGone):
            raise
        except Exception as exc:
            log.exception(
                "http_error", method=self.command, path=url.path, error=str(exc) or repr(exc)
            )
            self.close_connection = True
            if not self._responded:
                message = exc.message if isinstance(exc, BatchdError) else "internal error"
                self._error(500, f"{message} (see the daemon's log: http_error)")

    # -- answers -----------------------------------------------------------------

    def _send(
        self,
        code: int,
        body: bytes,
        content_type: str = _JSON,
        headers: dict[str, str] | None = None,
    ) -> None:
        self._responded = True
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.owner.metrics.http_answered(self._route_name, code)
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
        self._send(code, _encode(payload), _JSON, headers)

    def _cached(self, key: tuple[str, ...], build: Callable[[], Any]) -> None:
        """Answer 200 with ``build()``'s data, reusing the encoded answer while
        the database has not changed."""
        owner = self.owner
        version = owner.store.change_version()
        body = owner.cache.get(key, version)
        if body is None:
            body = _encode({"success": True, "data": build()})
            owner.cache.put(key, version, body)
        self._send(200, body)

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

    # -- auth ----------------------------------------------------------------------

    def _authorized(self) -> bool:
        token = self.owner.settings.http.token
        if not token:
            return True
        scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer":
            given = ""
        # Header text is latin-1 decoded by http.client: encoding it back gives
        # the raw bytes, which a UTF-8 token matches.
        return hmac.compare_digest(given.strip().encode("latin-1", "replace"), token.encode())

    def _unauthorized(self) -> None:
        self.close_connection = self.close_connection or self.command == "POST"
        self._error(
            401,
            "authorization required: send the header Authorization: Bearer <http.token>",
            {"WWW-Authenticate": 'Bearer realm="batchd"'},
        )

    # -- endpoints -------------------------------------------------------------------

    def _page(self) -> None:
        self._send(
            200,
            self.owner.page,
            "text/html; charset=utf-8",
            {
                "Content-Security-Policy": self.owner.page_csp,
                # The page may be opened once with ?token=: never pass it on.
                "Referrer-Policy": "no-referrer",
                "X-Frame-Options": "DENY",
            },
        )

    def _healthz(self) -> None:
        try:
            problems = dict(self.owner.health())
        except Exception as exc:
            log.exception("http_error", path="/healthz", error=str(exc))
            problems = {"health": f"health check failed: {exc!r}"}
        nodes: list[dict[str, Any]] = []
        try:
            self.owner.store.ping()
            nodes = [n.public() for n in self.owner.store.nodes()]
        except StoreError as exc:
            problems.setdefault("database", exc.message)
        node_id = self.owner.store.node_id
        if problems:
            self._json(
                503,
                {
                    "success": False,
                    "status": "unhealthy",
                    "node_id": node_id,
                    "problems": problems,
                    "error": "; ".join(f"{k}: {v}" for k, v in sorted(problems.items())),
                },
            )
        else:
            uptime = round(self.owner.clock.monotonic() - self.owner.started_at, 3)
            self._json(
                200,
                {
                    "success": True,
                    "status": "ok",
                    "data": {
                        "status": "ok",
                        "uptime_seconds": uptime,
                        "node_id": node_id,
                        "nodes": nodes,
                    },
                },
            )

    def _metrics(self) -> None:
        self._send(200, generate_latest(self.owner.metrics.registry), CONTENT_TYPE_LATEST)

    def _jobs(self, query: dict[str, list[str]]) -> None:
        limit = _int_param(query, "limit", JOBS_LIMIT_DEFAULT, 1, JOBS_LIMIT_MAX)
        offset = _int_param(query, "offset", 0, 0, OFFSET_MAX)
        status_text = _str_param(query, "status")
        status = None
        if status_text is not None:
            try:
                status = Status(status_text)
            except ValueError:
                allowed = ", ".join(s.value for s in Status)
                raise _Refusal(
                    400, f"status must be one of {allowed}, not {status_text!r}"
                ) from None
        user_id = _str_param(query, "userId")
        store = self.owner.store
        self._cached(
            ("jobs", str(limit), str(offset), str(status), str(user_id)),
            lambda: [row.public() for row in store.list_batches(limit, offset, status, user_id)],
        )

    def _job(self, ref: str, query: dict[str, list[str]]) -> None:
        limit = _int_param(query, "limit", FILES_LIMIT_DEFAULT, 1, FILES_LIMIT_MAX)
        offset = _int_param(query, "offset", 0, 0, OFFSET_MAX)
        store = self.owner.store
        version = store.change_version()
        key = ("job", ref, str(limit), str(offset))
        body = self.owner.cache.get(key, version)
        if body is None:
            batch = store.find_batch(ref)
            if batch is None:
                raise _Refusal(404, f"no batch with id or name {ref!r}")
            data = batch_detail(store, batch, files_limit=limit, files_offset=offset)
            body = _encode({"success": True, "data": data})
            self.owner.cache.put(key, version, body)
        self._send(200, body)

    # -- upload ------------------------------------------------------------------------

    def _upload_length(self) -> int:
        """The upload's Content-Length, checked against what the limits could ever allow."""
        if "Transfer-Encoding" in self.headers:
            raise _Refusal(
                411, "send the upload with a Content-Length (chunked bodies are not accepted)"
            )
        text = self.headers.get("Content-Length")
        if text is None:
            raise _Refusal(411, "send the upload with a Content-Length header")
        try:
            length = int(text)
        except ValueError:
            length = -1
        if length < 0:
            raise _Refusal(400, f"Content-Length must be a byte count, not {text!r}")
        limits = self.owner.settings.limits
        most = limits.max_files_per_batch * (limits.max_file_bytes + PART_OVERHEAD_BYTES)
        most += 4 * PART_OVERHEAD_BYTES  # the priority and user_id fields, the closing boundary
        if length > most:
            raise _Refusal(
                413,
                f"upload of {length} bytes is over what the limits allow"
                f" ({limits.max_files_per_batch} files of limits.max_file_bytes ="
                f" {limits.max_file_bytes} bytes)",
            )
        return length

    def _upload(self) -> None:
        owner = self.owner
        consumed = False
        folder: Path | None = None
        receiver: UploadReceiver | None = None
        try:
            ctype, opts = parse_options_header(self.headers.get("Content-Type", ""))
            boundary = opts.get(b"boundary")
            if ctype != b"multipart/form-data" or not boundary:
                raise _Refusal(
                    415, "upload must be multipart/form-data (fields: file, priority, user_id)"
                )
            remaining = self._upload_length()
            settings = owner.settings
            folder = owner.spool.new_upload_folder()
            receiver = UploadReceiver(
                folder,
                settings.limits,
                lambda name: owner.spool.ignored(name) or name == settings.watch.marker,
                lambda user: self._check_rate(user, record=False),
            )
            try:
                parser = MultipartParser(boundary, receiver.callbacks())  # type: ignore[arg-type]
                while remaining > 0:
                    chunk = self.rfile.read1(min(READ_CHUNK_BYTES, remaining))
                    if not chunk:
                        raise _ClientGone()
                    remaining -= len(chunk)
                    parser.write(chunk)
                consumed = True
                parser.finalize()
            except FormParserError as exc:
                raise _Refusal(400, f"malformed multipart body: {exc}") from None
            finally:
                receiver.close()
            if not receiver.finished:
                raise _Refusal(400, "malformed multipart body: it ends before its closing boundary")
            if not receiver.files:
                raise _Refusal(400, "no files: send each file as a form field named file")
            priority = parse_priority(receiver.fields.get("priority", ""))
            user_id = parse_user_id(receiver.fields.get("user_id", ""))
            for item in receiver.files:
                problem = owner.spool.check_file(item.path, item.path.stat())
                if problem is not None:
                    raise _Refusal(415, f"file {item.name!r} refused: {problem}")
            fsync_dir(folder)
            self._check_rate(user_id, record=True)
            batch = owner.intake.take_upload(folder, priority, user_id, f"upload-{folder.name[:8]}")
            files = owner.store.list_files(batch.id)
            owner.metrics.upload_ended("accepted")
            log.info("upload_accepted", batch_id=batch.id, user_id=user_id, files=len(files))
            self._ok(
                {
                    "batchId": batch.id,
                    "name": batch.name,
                    "totalFiles": batch.total_files,
                    "status": str(batch.status),
                    "files": [
                        {
                            "id": f.id,
                            "filename": f.filename,
                            "fileSize": f.file_size,
                            "status": str(f.status),
                        }
                        for f in files
                    ],
                },
                201,
            )
        except _Refusal as exc:
            # Delete before answering: once the client reads the refusal, nothing is kept.
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            owner.metrics.upload_ended(str(exc.status))
            log.info("upload_refused", status=exc.status, error=exc.message)
            if not consumed:
                self.close_connection = True
            self._error(exc.status, exc.message, exc.headers)
            if not consumed:
                self._linger()
        except BaseException:
            if not consumed:
                self.close_connection = True
            raise
        finally:
            if folder is not None and folder.exists():
                shutil.rmtree(folder, ignore_errors=True)

    def _check_rate(self, user_id: str, record: bool) -> None:
        """429 when ``user_id`` has used up its uploads this hour; with ``record``,
        atomically count this upload when it may go ahead."""
        owner = self.owner
        limit = owner.settings.limits.uploads_per_user_per_hour
        now = owner.clock.now()
        if record:
            if owner.store.record_upload(user_id, now, limit, RATE_WINDOW):
                return
        elif len(owner.store.uploads_since(user_id, now - RATE_WINDOW)) < limit:
            return
        times = owner.store.uploads_since(user_id, now - RATE_WINDOW)
        if times:
            wait = (parse_iso(times[0]) + RATE_WINDOW - now).total_seconds()
        else:
            wait = RATE_WINDOW.total_seconds()
        retry_after = max(1, math.ceil(wait))
        raise _Refusal(
            429,
            f"user {user_id!r} has made {limit} uploads in the last hour"
            f" (limits.uploads_per_user_per_hour); try again in {retry_after} s",
            {"Retry-After": str(retry_after)},
        )

    def _linger(self) -> None:
        """Read and discard a little of an unread body so the client sees our answer.

        Closing a socket with unread data makes the kernel send a reset, and
        most clients then report the reset instead of the 413 we sent.
        """
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


def _refuse_busy(request: socket.socket) -> None:
    """Answer 503 on a connection no thread could take, then close it gently.

    Runs in a short-lived thread of its own (see ``_Server.process_request``)
    so the accept loop never waits on a client.
    """
    body = b'{"success":false,"error":"server busy: every HTTP thread is in use; retry"}'
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


def _readable(conn: socket.socket) -> bool:
    """True when ``conn`` has bytes (or end-of-file) waiting, without reading them."""
    poller = select.poll()
    try:
        poller.register(conn, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True  # closed meanwhile: nothing to make room from


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on concurrent connection threads."""

    daemon_threads = True
    block_on_close = False  # stop() cuts and waits for connections itself
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], owner: HttpServer) -> None:
        self.owner = owner
        self._slots = threading.BoundedSemaphore(owner.settings.http.max_threads)
        self._refusers = threading.BoundedSemaphore(BUSY_REFUSER_THREADS)
        self.changed = threading.Condition()
        self.connections: set[socket.socket] = set()
        #: connections whose thread waits for a next request: since when, and its reader.
        self.idle: dict[socket.socket, tuple[float, _DeadlineReader]] = {}
        self.peak_connections = 0
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), a DNS lookup that can hang.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def waiting(self, conn: socket.socket, reader: _DeadlineReader) -> None:
        """``conn``'s thread starts waiting for a request (it may be closed to make room)."""
        with self.changed:
            self.idle[conn] = (time.monotonic(), reader)

    def working(self, conn: socket.socket) -> None:
        with self.changed:
            self.idle.pop(conn, None)

    def _close_idle(self) -> bool:
        """Close the connection that has waited longest without sending a byte.

        Every thread taken by connections that send nothing (a client opening
        http.max_threads connections and sitting on them, or idle keep-alives)
        would otherwise shut everyone else out, health probes included, until
        their timeout. An idle HTTP/1.1 connection may be closed at any time;
        clients open a new one. Returns True when it closed one.
        """
        now = time.monotonic()
        with self.changed:
            idle = sorted(
                ((since, conn) for conn, (since, r) in self.idle.items() if r.received == 0),
                key=lambda item: item[0],
            )
            for since, conn in idle:
                if now - since < IDLE_CLOSE_SECONDS:
                    return False
                if not _readable(conn):  # a request that arrived but is not read yet
                    del self.idle[conn]
                    break
            else:
                return False
        with contextlib.suppress(OSError):
            # Wakes its thread with end-of-file: it ends, and frees its slot.
            conn.shutdown(socket.SHUT_RD)
        log.debug("http_idle_closed", idle_seconds=round(time.monotonic() - since, 3))
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
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
            self.owner.metrics.http_busy()
            log.warning("http_busy", client=str(client_address[0]))
            if self._refusers.acquire(blocking=False):
                threading.Thread(
                    target=self._refuse, args=(request,), name="batchd-http-busy", daemon=True
                ).start()
            else:  # even the refusers are all busy: just drop the connection
                self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def _refuse(self, request: socket.socket) -> None:
        try:
            _refuse_busy(request)
        finally:
            self._refusers.release()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self.changed:
            self.connections.add(request)
            self.peak_connections = max(self.peak_connections, len(self.connections))
            self.owner.metrics.http_in_flight.set(len(self.connections))
        try:
            super().process_request_thread(request, client_address)
        finally:
            try:
                self.owner.store.release_thread()
            finally:
                with self.changed:
                    self.connections.discard(request)
                    self.owner.metrics.http_in_flight.set(len(self.connections))
                    self.changed.notify_all()
                self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("http_error", client=str(client_address[0]))


class HttpServer:
    """The daemon's HTTP server: start, stop, reconfigure."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        spool: Spool,
        intake: Intake,
        metrics: Metrics,
        health: Callable[[], dict[str, str]],
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.store = store
        self.spool = spool
        self.intake = intake
        self.metrics = metrics
        self.health = health
        self.clock = clock
        self.started_at = clock.monotonic()
        self.page = resources.files("batchd").joinpath("static/status.html").read_bytes()
        self.page_csp = _page_csp(self.page)
        self.cache = AnswerCache()
        metrics.watch_store(store)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind ``http.host``:``http.port`` and serve in a background thread."""
        host, port = self.settings.http.host, self.settings.http.port
        try:
            self._server = _Server((host, port), self)
        except OSError as exc:
            raise BatchdError(
                f"cannot listen on {host}:{port} (http.host, http.port): {exc.strerror or exc}"
            ) from exc
        self.started_at = self.clock.monotonic()
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": SHUTDOWN_POLL_SECONDS},
            name="batchd-http",
            daemon=True,
        )
        self._thread.start()
        log.info("http_listening", host=host, port=self.port, token=bool(self.settings.http.token))

    @property
    def port(self) -> int:
        """The bound port (useful with ``http.port = 0``)."""
        if self._server is None:
            raise BatchdError("the HTTP server is not started")
        return int(self._server.server_address[1])

    @property
    def peak_connections(self) -> int:
        """The most connections served at once since start."""
        return self._server.peak_connections if self._server is not None else 0

    def stop(self) -> None:
        """Stop accepting, cut idle connections, wait briefly for running answers."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with server.changed:
            for conn in list(server.connections):
                # SHUT_RD wakes a thread waiting for the next request on a
                # kept-alive connection; an answer being written still goes out.
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RD)
            server.changed.wait_for(lambda: not server.connections, timeout=STOP_GRACE_SECONDS)
        if self._thread is not None:
            self._thread.join()
        log.info("http_stopped")

    def reconfigure(self, settings: Settings) -> None:
        """Take new limits and token at once; host, port and max_threads need a restart."""
        old = self.settings.http
        new = settings.http
        self.settings = settings
        if (old.host, old.port, old.max_threads) != (new.host, new.port, new.max_threads):
            log.warning(
                "http_restart_needed",
                detail="http.host, http.port and http.max_threads change on restart only",
            )


_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


def _page_csp(page: bytes) -> str:
    """A Content-Security-Policy that allows the page's own inline script and nothing else."""
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(m.group(1)).digest()).decode() + "'"
        for m in _SCRIPT.finditer(page)
    )
    return (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline';"
        " connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none';"
        " frame-ancestors 'none'"
    )
