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
  then gets 503 (both in :mod:`batchd.httpserver`);
* uploads are streamed to disk part by part and cut off as soon as a limit
  is passed; nothing of a refused upload is kept (:mod:`batchd.upload`);
* a foreign ``Host`` (DNS rebinding) gets 421 and a cross-site state change
  (CSRF) 403; tokens name the operator or one user (:mod:`batchd.httpguard`);
* every error, including malformed requests, is a JSON answer; an exception
  in a handler answers 500 and is logged as ``http_error``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import re
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from batchd.clock import Clock
from batchd.config import Settings
from batchd.errors import BatchdError, StartupError, StoreError
from batchd.httpguard import Identity, Tokens, check_request
from batchd.httpserver import (
    LINGER_MAX_BYTES,
    LINGER_SECONDS,
    READ_CHUNK_BYTES,
    ClientGone,
    DeadlineReader,
    Refusal,
    Server,
)
from batchd.intake import Intake
from batchd.metrics import Metrics
from batchd.records import Status
from batchd.spool import Spool
from batchd.store import Store
from batchd.upload import Upload, safe_filename, upload_length
from batchd.views import batch_detail, batch_percent

__all__ = ["AnswerCache", "HttpServer", "safe_filename"]

log = structlog.get_logger("batchd.http")

JOBS_LIMIT_DEFAULT = 50
JOBS_LIMIT_MAX = 500
FILES_LIMIT_DEFAULT = 1000
FILES_LIMIT_MAX = 10_000
OFFSET_MAX = 1_000_000_000
MAX_REQUEST_LINE_BYTES = 65_536
RFILE_BUFFER_BYTES = 64 * 1024
WFILE_BUFFER_BYTES = 64 * 1024
#: Read answers kept for reuse until the database changes (bounded memory:
#: at most CACHE_ENTRIES answers of at most CACHE_MAX_BODY_BYTES each).
CACHE_ENTRIES = 64
CACHE_MAX_BODY_BYTES = 512 * 1024
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
    "inbox": _GET,
}


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


def _int_param(query: dict[str, list[str]], name: str, default: int, low: int, high: int) -> int:
    values = query.get(name)
    if not values or values[-1] == "":
        return default
    try:
        value = int(values[-1])
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise Refusal(400, f"{name} must be an integer from {low} to {high}, not {values[-1]!r}")
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
    if path.rstrip("/") == "/api/inbox":
        return "inbox", None
    return "other", None


class _Handler(BaseHTTPRequestHandler):
    """One client connection: request after request while it keeps alive."""

    server: Server
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
        self._reader = DeadlineReader(self.connection, self.io_timeout)
        self.rfile = io.BufferedReader(self._reader, RFILE_BUFFER_BYTES)
        self._route_name = "other"
        self._responded = False
        self._started = time.monotonic()
        self._identity: Identity | None = None
        self._local_address = str(self.connection.getsockname()[0])

    # -- the request loop ------------------------------------------------------

    def handle_one_request(self) -> None:
        self._reader.deadline = time.monotonic() + self.io_timeout
        self._reader.received = 0
        self._responded = False
        self._route_name = "other"
        self._identity = None
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

    def handle_expect_100(self) -> bool:
        # Refuse before the client sends a body we would not keep (curl asks
        # with Expect: 100-continue for big uploads).
        route, _ = _route(urlsplit(self.path).path)
        self._route_name = route
        try:
            self._guard()
        except Refusal as exc:
            self.close_connection = True
            self._error(exc.status, exc.message, exc.headers)
            return False
        if route not in _OPEN_ROUTES and not self._authorized():
            self._unauthorized()
            return False
        if route == "upload":
            try:
                upload_length(self.headers, self.owner.settings.limits)
            except Refusal as exc:
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
            self._guard()
            if route not in _OPEN_ROUTES and not self._authorized():
                self._unauthorized()
                return
            if route == "other":
                raise Refusal(404, f"no such endpoint: {url.path}")
            allowed = _ROUTE_METHODS[route]
            if self.command not in allowed:
                raise Refusal(
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
            elif route == "inbox":
                self._inbox()
            else:
                self._upload()
        except Refusal as exc:
            self._error(exc.status, exc.message, exc.headers)
        except (TimeoutError, ConnectionError, ClientGone):
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

    def _guard(self) -> None:
        """Refuse a foreign Host (DNS rebinding) or a cross-site state change (CSRF)."""
        try:
            check_request(self.command, self.headers, self.owner.settings.http, self._local_address)
        except Refusal as exc:
            if self.command not in _GET:
                self.close_connection = True  # its body is not read
            log.warning(
                "http_request_refused",
                status=exc.status,
                host=self.headers.get("Host"),
                origin=self.headers.get("Origin"),
                client=self.client_address[0],
            )
            raise

    def _authorized(self) -> bool:
        self._identity = self.owner.tokens.identify(self.headers)
        return self._identity is not None

    def _unauthorized(self) -> None:
        self.close_connection = self.close_connection or self.command == "POST"
        self._error(
            401,
            "authorization required: send the header Authorization: Bearer <token>"
            " (http.token, or your own token from http.users / http.users_file)",
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

    def _inbox(self) -> None:
        """Drops waiting in the inbox, not yet batches: settling, waiting for a
        marker, or refused (with what to do)."""
        drops = self.owner.inbox()
        self._json(200, {"success": True, "data": drops, "count": len(drops)})

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
                raise Refusal(
                    400, f"status must be one of {allowed}, not {status_text!r}"
                ) from None
        user_id = _str_param(query, "userId")
        store = self.owner.store
        self._cached(
            ("jobs", str(limit), str(offset), str(status), str(user_id)),
            lambda: [
                # The same progressPercent as the batch's own page (SPEC section 6),
                # so the list and the detail never disagree.
                {**row.public(), "progressPercent": batch_percent(store, row)}
                for row in store.list_batches(limit, offset, status, user_id)
            ],
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
                raise Refusal(404, f"no batch with id or name {ref!r}")
            data = batch_detail(store, batch, files_limit=limit, files_offset=offset)
            body = _encode({"success": True, "data": data})
            self.owner.cache.put(key, version, body)
        self._send(200, body)

    # -- upload ------------------------------------------------------------------------

    def _upload(self) -> None:
        identity = self._identity or self.owner.tokens.identify(self.headers)
        assert identity is not None  # the route needs a token: _dispatch checked it
        upload = Upload(
            self.owner,
            self.headers,
            self.rfile,
            identity,
            client=str(self.client_address[0]),
            reader=self._reader,
            slots=self.server,
        )
        try:
            data = upload.receive()
        except Refusal as exc:
            if not upload.consumed:
                self.close_connection = True
            self._error(exc.status, exc.message, exc.headers)
            if not upload.consumed:
                self._linger()
            return
        except BaseException:
            if not upload.consumed:
                self.close_connection = True
            raise
        self._ok(data, 201)

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
        self.tokens = Tokens(settings.http)
        metrics.watch_store(store)
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        #: the drops waiting in the inbox (the daemon sets it to its watcher's).
        self.inbox: Callable[[], list[dict[str, str | None]]] = lambda: []

    def start(self) -> None:
        """Bind ``http.host``:``http.port`` and serve in a background thread."""
        self.bind()
        self.serve()

    def bind(self) -> None:
        """Take ``http.host``:``http.port`` (``StartupError`` when it is taken); no serving yet."""
        host, port = self.settings.http.host, self.settings.http.port
        try:
            self._server = Server((host, port), self, _Handler)
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {host}:{port} (http.host, http.port): {exc.strerror or exc};"
                " stop what uses the port (ss -ltnp) or choose another http.port"
            ) from exc

    def serve(self) -> None:
        """Answer requests on the bound socket in a background thread."""
        assert self._server is not None, "bind() first"
        host = self.settings.http.host
        self.started_at = self.clock.monotonic()
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": SHUTDOWN_POLL_SECONDS},
            name="batchd-http",
            daemon=True,
        )
        self._thread.start()
        log.info(
            "http_listening",
            host=host,
            port=self.port,
            token=bool(self.settings.http.token),
            user_tokens=len(self.tokens.users),
        )
        port_file = os.environ.get("BATCHD_PORT_FILE")
        if port_file:  # tests and scripts learn the ephemeral port here, once it answers
            Path(port_file).write_text(str(self.port))

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
        try:
            self.tokens = Tokens(new)
        except BatchdError as exc:
            # Keep serving with the tokens read before: a reload must not open the server.
            log.error("http_users_file_unreadable", error=exc.message)
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
