"""batchd's HTTP routes: the API, health, metrics and the status page (SPEC section 6).

:class:`Handler` is what each request means: the guard (foreign ``Host``,
cross-site state changes: :mod:`batchd.httpguard`), the token, then one
endpoint's answer from the store, or an upload handed to
:class:`batchd.upload.Upload`. The request loop, deadlines and JSON
answers are :class:`batchd.httprequest.RequestHandler`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from batchd.errors import BatchdError, ClientGone, Refusal, StoreError
from batchd.httpguard import Identity, check_request
from batchd.httprequest import RequestHandler, encode
from batchd.httpserver import Server
from batchd.records import Status
from batchd.upload import Upload, upload_length
from batchd.views import batch_detail, batch_percents

if TYPE_CHECKING:
    from batchd.http import HttpServer

log = structlog.get_logger("batchd.http")

JOBS_LIMIT_DEFAULT = 50
JOBS_LIMIT_MAX = 500
FILES_LIMIT_DEFAULT = 1000
FILES_LIMIT_MAX = 10_000
OFFSET_MAX = 1_000_000_000

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


class Handler(RequestHandler):
    """batchd's routes: the guard, the token, and each endpoint's answer."""

    server: Server[HttpServer]

    def setup(self) -> None:
        self.owner = self.server.hooks
        super().setup()
        self._identity: Identity | None = None

    def handle_one_request(self) -> None:
        self._identity = None
        super().handle_one_request()

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
        # Only a POST upload reads its body: any other request's (a GET on the
        # upload route too, refused 405 or 401 unread) would be read as the
        # next request on a kept-alive connection.
        if not (route == "upload" and self.command == "POST") and (
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

    def _cached(self, key: tuple[str, ...], build: Callable[[], Any]) -> None:
        """Answer 200 with ``build()``'s data, reusing the encoded answer while
        the database has not changed."""
        owner = self.owner
        version = owner.store.change_version()
        body = owner.cache.get(key, version)
        if body is None:
            body = encode({"success": True, "data": build()})
            owner.cache.put(key, version, body)
        self._send(200, body)

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
        # The daemon's families, then this server's: no family is in both.
        body = self.owner.daemon_metrics() + generate_latest(self.owner.metrics.http_registry)
        self._send(200, body, CONTENT_TYPE_LATEST)

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

        def page() -> list[dict[str, object]]:
            rows = store.list_batches(limit, offset, status, user_id)
            # The same progressPercent as the batch's own page (SPEC section 6),
            # so the list and the detail never disagree; one query for the page.
            percents = batch_percents(store, rows)
            return [{**row.public(), "progressPercent": percents[row.id]} for row in rows]

        self._cached(("jobs", str(limit), str(offset), str(status), str(user_id)), page)

    def _job(self, ref: str, query: dict[str, list[str]]) -> None:
        limit = _int_param(query, "limit", FILES_LIMIT_DEFAULT, 1, FILES_LIMIT_MAX)
        offset = _int_param(query, "offset", 0, 0, OFFSET_MAX)
        store = self.owner.store
        cache = self.owner.cache
        # A finished batch's answer is current while its row's version is:
        # one narrow row tells, without the whole row read and converted
        # (~20 % of a detail request, issue 15).
        found = store.find_batch_version(ref)
        if found is not None and found[2].done:
            batch_id, batch_version, _ = found
            key_done = ("job-done", batch_id, str(limit), str(offset))
            body = cache.get(key_done, batch_version)
            if body is not None:
                self._send(200, body)
                return
        batch = store.find_batch(ref)
        if batch is None:
            raise Refusal(404, f"no batch with id or name {ref!r}")
        if batch.status.done:
            # A finished batch changes only by batchd's own re-derivation of it
            # (a retry), which grows its version: its answer outlives the other
            # batches' commits, which, while files flow, come hundreds a second
            # and would rebuild it at every request (issue 15). Its row is the
            # check: the database's change version is not asked (~5 % of a request).
            key: tuple[str, ...] = ("job-done", batch.id, str(limit), str(offset))
            version = batch.version
        else:
            # The version first, then the row the answer is built from: a
            # commit in between makes the answer newer than its key, never older.
            version = store.change_version()
            batch = store.find_batch(ref)
            if batch is None:
                raise Refusal(404, f"no batch with id or name {ref!r}")
            key = ("job", batch.id, str(limit), str(offset))
        body = cache.get(key, version)
        if body is None:
            data = batch_detail(store, batch, files_limit=limit, files_offset=offset)
            body = encode({"success": True, "data": data})
            cache.put(key, version, body)
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
