"""The HTTP API, health, metrics and the live status page (SPEC section 6).

This module is the server's life (bind, serve, stop, reconfigure) and what
every request shares (settings, tokens, the answer cache, the page); the
routes are :mod:`batchd.httproutes`, the transport :mod:`batchd.httpserver`
and :mod:`batchd.httprequest`.

Python's own ``http.server``: a :class:`ThreadingHTTPServer`, one thread per
client connection, capped at ``http.max_threads``. The daemon runs it in a
process of its own (:mod:`batchd.httpproc`), so answering requests does not
compete with the scheduler for one interpreter lock; tests run it in
theirs (``build()``'s ``parts.http``).
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
import os
import re
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import structlog
from prometheus_client import generate_latest

from batchd.clock import Clock
from batchd.config import HttpSettings, Settings
from batchd.errors import BatchdError, StartupError
from batchd.httpguard import Tokens
from batchd.httproutes import Handler
from batchd.httpserver import Server
from batchd.intake import Intake
from batchd.metrics import Metrics
from batchd.spool import Spool
from batchd.store import Store

__all__ = ["AnswerCache", "HttpServer", "listen", "reread_tokens"]

log = structlog.get_logger("batchd.http")

#: Read answers kept for reuse until the database changes (bounded memory:
#: at most CACHE_ENTRIES answers of at most CACHE_MAX_BODY_BYTES each).
CACHE_ENTRIES = 64
CACHE_MAX_BODY_BYTES = 512 * 1024
#: How often the accept loop checks for stop(): the most stop() waits for it.
SHUTDOWN_POLL_SECONDS = 0.1
#: How long stop() waits for connections to end once their reads are cut.
STOP_GRACE_SECONDS = 2.0


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
        tokens: Tokens | None = None,
    ) -> None:
        """``tokens``: those read by the daemon (the HTTP process does not read
        http.users_file itself); None: read them from ``settings`` here."""
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
        self.tokens = tokens if tokens is not None else Tokens(settings.http)
        metrics.watch_store(store)
        self._server: Server[HttpServer] | None = None
        self._thread: threading.Thread | None = None
        #: the drops waiting in the inbox (the daemon sets it to its watcher's).
        self.inbox: Callable[[], list[dict[str, str | None]]] = lambda: []
        #: the daemon's part of /metrics (in the HTTP process: asked over its pipe).
        self.daemon_metrics: Callable[[], bytes] = lambda: generate_latest(metrics.registry)

    # -- what the transport asks of the application (httpserver.ServerHooks) --

    def http_busy(self) -> None:
        self.metrics.http_busy()

    def connections_changed(self, open_now: int) -> None:
        self.metrics.http_in_flight.set(open_now)

    def thread_done(self) -> None:
        self.store.release_thread()

    def answered(self, route: str, code: int) -> None:
        self.metrics.http_answered(route, code)

    # -- life ------------------------------------------------------------------

    def start(self) -> None:
        """Bind ``http.host``:``http.port`` and serve in a background thread."""
        self.bind()
        self.serve()

    def bind(self) -> None:
        """Take ``http.host``:``http.port`` (``StartupError`` when it is taken); no serving yet."""
        self.adopt(listen(self.settings))

    def adopt(self, listening: socket.socket) -> None:
        """Serve ``listening``, a socket :func:`listen` made (here or in the daemon)."""
        self._server = Server(
            (self.settings.http.host, listening.getsockname()[1]), self, Handler, listening
        )

    def serve(self, started_at: float | None = None) -> None:
        """Answer requests on the bound socket in a background thread.

        ``started_at`` (monotonic): when /healthz's uptime starts, if not now
        (the HTTP process gives its daemon's start, set before the first answer).
        """
        assert self._server is not None, "bind() first"
        host = self.settings.http.host
        self.started_at = self.clock.monotonic() if started_at is None else started_at
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

    def reconfigure(self, settings: Settings, tokens: Tokens | None = None) -> None:
        """Take new limits and token at once; host, port and max_threads need a restart.

        ``tokens``: those the daemon read (see :func:`reread_tokens`); None:
        read them here."""
        old = self.settings.http
        new = settings.http
        self.tokens = tokens if tokens is not None else reread_tokens(self.tokens, new)
        self.settings = settings
        if (old.host, old.port, old.max_threads) != (new.host, new.port, new.max_threads):
            log.warning(
                "http_restart_needed",
                detail="http.host, http.port and http.max_threads change on restart only",
            )


def reread_tokens(running: Tokens, settings: HttpSettings) -> Tokens:
    """The tokens ``settings`` name, or ``running`` when http.users_file cannot be read."""
    try:
        return Tokens(settings)
    except BatchdError as exc:
        # Keep serving with the tokens read before: a reload must not open the server.
        log.error("http_users_file_unreadable", error=exc.message)
        return running


def listen(settings: Settings) -> socket.socket:
    """A socket bound to ``http.host``:``http.port`` and listening (``StartupError`` if taken).

    Made like :class:`~batchd.httpserver.Server` makes its own (address
    reuse, its backlog), so the daemon can bind it before recovery and hand
    it to the HTTP process.
    """
    host, port = settings.http.host, settings.http.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(Server.request_queue_size)
    except OSError as exc:
        sock.close()
        raise StartupError(
            f"cannot listen on {host}:{port} (http.host, http.port): {exc.strerror or exc};"
            " stop what uses the port (ss -ltnp) or choose another http.port"
        ) from exc
    return sock


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
