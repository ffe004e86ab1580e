"""The HTTP server: every endpoint's shape and error codes, uploads, and robustness.

Each test runs a real :class:`HttpServer` on port 0 over a real spool and
SQLite store in ``tmp_path``; no daemon and no mocks.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from formdata import multipart
from structlog.testing import capture_logs

from batchd.clock import SystemClock
from batchd.config import Priority, Settings
from batchd.http import HttpServer
from batchd.intake import Intake
from batchd.metrics import Metrics
from batchd.outbox import Outbox
from batchd.records import BatchRow, Outcome, Status
from batchd.spool import Spool
from batchd.store import SQLiteStore
from batchd.testing import wait_until
from batchd.views import batch_detail

CSV = b"name,qty\nmenu,1\nsoup,2\n"
PDF = b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n"
BATCH_COLUMNS = {
    "id",
    "name",
    "status",
    "total_files",
    "processed_files",
    "failed_files",
    "priority",
    "user_id",
    "created_at",
    "started_at",
    "completed_at",
    "error",
}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Harness:
    """A started server and the real objects behind it."""

    settings: Settings
    server: HttpServer
    store: SQLiteStore
    spool: Spool
    intake: Intake
    problems: dict[str, str] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.server.port

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def get(self, path: str, token: str | None = None) -> Answer:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.request("GET", path, headers=headers)

    def upload(
        self,
        files: list[tuple[str, bytes]],
        fields: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        body, ctype = multipart(files, fields or {})
        return self.request(
            "POST", "/api/batch/upload", body, {"Content-Type": ctype, **(headers or {})}
        )

    def drop(
        self, name: str, files: dict[str, bytes], priority: Priority = Priority.NORMAL
    ) -> BatchRow:
        """Register a folder batch through the same path as an inbox drop."""
        folder = self.spool.inbox_for(priority) / name
        folder.mkdir()
        for rel, data in files.items():
            (folder / rel).write_bytes(data)
        batch = self.intake.take_drop(folder, priority)
        assert batch is not None
        return batch

    def spool_files(self) -> list[str]:
        """Every regular file under the spool except the database."""
        out = []
        for dirpath, _dirs, names in os.walk(self.spool.root):
            for name in names:
                rel = (Path(dirpath) / name).relative_to(self.spool.root).as_posix()
                if not rel.startswith("state/"):
                    out.append(rel)
        return sorted(out)


def raw_exchange(port: int, head: bytes, body: bytes = b"") -> Answer:
    """Send a request byte for byte (the server may cut the body off) and read the answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        sock.sendall(head)
        # The server may stop reading mid-body: its answer is what matters.
        with contextlib.suppress(OSError):
            sock.sendall(body)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        sock.close()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    started: list[Harness] = []

    def make(**sections: dict[str, Any]) -> Harness:
        http_cfg = {"host": "127.0.0.1", "port": 0, **sections.pop("http", {})}
        settings = Settings.model_validate(
            {"spool": {"root": tmp_path / "spool"}, "http": http_cfg, **sections}
        )
        spool = Spool(settings)
        spool.init()
        store = SQLiteStore(settings.db_path)
        clock = SystemClock()
        intake = Intake(settings, spool, store, Outbox(spool, store), clock)
        problems: dict[str, str] = {}
        server = HttpServer(
            settings, store, spool, intake, Metrics(), lambda: dict(problems), clock
        )
        server.start()
        harness = Harness(settings, server, store, spool, intake, problems)
        started.append(harness)
        return harness

    yield make
    for harness in started:
        harness.server.stop()
        harness.store.close()


@pytest.fixture
def srv(make_server: Callable[..., Harness]) -> Harness:
    return make_server()


# -- GET /api/batch/jobs -------------------------------------------------------


def test_jobs_lists_batch_rows_newest_first(srv: Harness) -> None:
    """The list holds the batch_jobs columns plus progressPercent, newest batch first."""
    first = srv.drop("first", {"a.csv": CSV})
    second = srv.drop("second", {"b.csv": CSV, "c.csv": CSV}, Priority.HIGH)
    answer = srv.get("/api/batch/jobs")
    assert answer.status == 200
    body = answer.json()
    assert body["success"] is True
    assert [row["id"] for row in body["data"]] == [second.id, first.id]
    assert body["data"][0] == {**second.public(), "progressPercent": 0}
    assert set(body["data"][0]) == BATCH_COLUMNS | {"progressPercent"}
    assert body["data"][0]["priority"] == "high"
    assert body["data"][0]["total_files"] == 2


def test_jobs_filters_by_status_and_user(srv: Harness) -> None:
    """status and userId narrow the list."""
    batch = srv.drop("one", {"a.csv": CSV})
    assert srv.get("/api/batch/jobs?status=completed").json()["data"] == []
    pending = srv.get("/api/batch/jobs?status=pending").json()["data"]
    assert [row["id"] for row in pending] == [batch.id]
    mine = srv.get(f"/api/batch/jobs?userId={batch.user_id}").json()["data"]
    assert [row["id"] for row in mine] == [batch.id]
    assert srv.get("/api/batch/jobs?userId=nobody-at-all").json()["data"] == []


def test_jobs_pages_with_limit_and_offset(srv: Harness) -> None:
    """limit and offset page through the newest-first list."""
    ids = [srv.drop(f"b{i}", {"a.csv": CSV}).id for i in range(3)]
    page = srv.get("/api/batch/jobs?limit=1&offset=1").json()["data"]
    assert [row["id"] for row in page] == [ids[1]]


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("limit=banana", "limit"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("offset=-1", "offset"),
        ("status=lost", "status"),
    ],
)
def test_jobs_bad_parameter_is_400_naming_it(srv: Harness, query: str, named: str) -> None:
    """A bad query parameter answers 400 with an error that names it."""
    answer = srv.get(f"/api/batch/jobs?{query}")
    assert answer.status == 400
    body = answer.json()
    assert body["success"] is False
    assert body["error"].startswith(named)


# -- GET /api/batch/jobs/<id> ------------------------------------------------------


def test_job_detail_is_the_status_document(srv: Harness) -> None:
    """The detail is batch_detail(), the object status.json holds, by id or by name."""
    batch = srv.drop("detail", {"a.csv": CSV, "b.csv": CSV})
    by_id = srv.get(f"/api/batch/jobs/{batch.id}")
    assert by_id.status == 200
    data = by_id.json()["data"]
    assert data == batch_detail(srv.store, srv.store.get_batch(batch.id) or batch)
    assert data["batch"]["progressPercent"] == 0
    assert data["summary"] == {
        "total": 2,
        "pending": 2,
        "processing": 0,
        "completed": 0,
        "failed": 0,
    }
    assert srv.get("/api/batch/jobs/detail").json()["data"] == data


def test_job_detail_pages_files(srv: Harness) -> None:
    """files take limit and offset; the summary still counts every file."""
    batch = srv.drop("paged", {f"f{i}.csv": CSV for i in range(4)})
    data = srv.get(f"/api/batch/jobs/{batch.id}?limit=2&offset=1").json()["data"]
    assert [f["filename"] for f in data["files"]] == ["f1.csv", "f2.csv"]
    assert data["summary"]["total"] == 4


def test_job_unknown_is_404(srv: Harness) -> None:
    """An unknown batch id answers 404 JSON."""
    answer = srv.get(f"/api/batch/jobs/{uuid.uuid4()}")
    assert answer.status == 404
    assert answer.json()["success"] is False


# -- POST /api/batch/upload ------------------------------------------------------------


def test_upload_registers_one_batch(srv: Harness) -> None:
    """Two files become one pending batch with the uploaded priority and user."""
    answer = srv.upload(
        [("menu.csv", CSV), ("card.pdf", PDF)], {"priority": "high", "user_id": "alice"}
    )
    assert answer.status == 201, answer.body
    data = answer.json()["data"]
    batch = srv.store.get_batch(data["batchId"])
    assert batch is not None
    assert (batch.priority, batch.user_id, batch.source) == (Priority.HIGH, "alice", "upload")
    assert data["totalFiles"] == 2
    assert data["status"] == "pending"
    stored = {f.id: f for f in srv.store.list_files(batch.id)}
    assert sorted(data["files"], key=lambda f: f["filename"]) == sorted(
        (
            {"id": f.id, "filename": f.filename, "fileSize": f.file_size, "status": "pending"}
            for f in stored.values()
        ),
        key=lambda f: str(f["filename"]),
    )
    assert {f["filename"]: f["fileSize"] for f in data["files"]} == {
        "menu.csv": len(CSV),
        "card.pdf": len(PDF),
    }
    work = srv.spool.root / batch.work_path
    assert (work / "menu.csv").read_bytes() == CSV
    assert list(srv.spool.uploads.iterdir()) == []
    task = srv.store.claim_next(SystemClock().now())
    assert task is not None and task.priority == Priority.HIGH


def test_upload_defaults_to_normal_and_anonymous(srv: Harness) -> None:
    """Without priority and user_id an upload is normal priority, user anonymous."""
    answer = srv.upload([("a.csv", CSV)])
    assert answer.status == 201
    batch = srv.store.get_batch(answer.json()["data"]["batchId"])
    assert batch is not None
    assert (batch.priority, batch.user_id) == (Priority.NORMAL, "anonymous")


def test_fourth_upload_in_an_hour_is_429_for_that_user_only(srv: Harness) -> None:
    """The 4th upload of one user in an hour is 429 with Retry-After; another user goes on."""
    for _ in range(3):
        assert srv.upload([("a.csv", CSV)], {"user_id": "bob"}).status == 201
    refused = srv.upload([("a.csv", CSV)], {"user_id": "bob"})
    assert refused.status == 429
    assert refused.json()["success"] is False
    assert 3500 <= int(refused.headers["retry-after"]) <= 3600
    assert len(srv.store.list_batches(user_id="bob")) == 3
    assert list(srv.spool.uploads.iterdir()) == []
    assert srv.upload([("a.csv", CSV)], {"user_id": "carol"}).status == 201


def test_rate_limit_is_checked_as_soon_as_user_id_arrives(srv: Harness) -> None:
    """A user over the limit whose user_id comes first is refused before the files are read."""
    for _ in range(3):
        assert srv.upload([("a.csv", CSV)], {"user_id": "dave"}).status == 201
    body, ctype = multipart([("big.csv", CSV * 10_000)], {"user_id": "dave"})
    head = (
        f"POST /api/batch/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with capture_logs() as logs:
        answer = raw_exchange(srv.port, head, body)
    assert answer.status == 429
    assert answer.headers["connection"] == "close"
    assert [e["status"] for e in logs if e["event"] == "upload_refused"] == [429]


def test_oversize_upload_is_413_and_leaves_nothing(make_server: Callable[..., Harness]) -> None:
    """A file over max_file_bytes is cut off with 413 and nothing is kept in the spool."""
    srv = make_server(limits={"max_file_bytes": 1000})
    body, ctype = multipart([("ok.csv", CSV), ("big.csv", b"x,y\n" * 100_000)], {})
    head = (
        f"POST /api/batch/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    answer = raw_exchange(srv.port, head, body)
    assert answer.status == 413
    assert "max_file_bytes" in answer.json()["error"]
    assert srv.spool_files() == []
    assert list(srv.spool.uploads.iterdir()) == []
    assert srv.store.list_batches() == []


def test_content_length_over_limits_is_refused_before_the_body(
    make_server: Callable[..., Harness],
) -> None:
    """With Expect: 100-continue a body the limits can never allow is refused unsent."""
    srv = make_server(limits={"max_file_bytes": 1000, "max_files_per_batch": 2})
    head = (
        b"POST /api/batch/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: multipart/form-data; boundary=zzz\r\n"
        b"Content-Length: 900000000\r\nExpect: 100-continue\r\n\r\n"
    )
    answer = raw_exchange(srv.port, head)
    assert answer.status == 413
    assert list(srv.spool.uploads.iterdir()) == []


def test_too_many_files_is_413(make_server: Callable[..., Harness]) -> None:
    """More files than max_files_per_batch answers 413 and keeps nothing."""
    srv = make_server(limits={"max_files_per_batch": 2})
    answer = srv.upload([("a.csv", CSV), ("b.csv", CSV), ("c.csv", CSV)])
    assert answer.status == 413
    assert "max_files_per_batch" in answer.json()["error"]
    assert srv.spool_files() == []


def test_refused_type_is_415(srv: Harness) -> None:
    """A file whose content is not an allowed type (a .pdf of text) answers 415."""
    answer = srv.upload([("good.csv", CSV), ("fake.pdf", b"just some words\n")])
    assert answer.status == 415
    assert "fake.pdf" in answer.json()["error"]
    assert srv.spool_files() == []
    assert srv.store.list_batches() == []


def test_upload_without_files_is_400(srv: Harness) -> None:
    """A form with no file part answers 400."""
    answer = srv.upload([], {"priority": "high"})
    assert answer.status == 400
    assert "no files" in answer.json()["error"]


def test_upload_bad_priority_is_400(srv: Harness) -> None:
    """A priority other than high, normal or low answers 400."""
    answer = srv.upload([("a.csv", CSV)], {"priority": "urgent"})
    assert answer.status == 400
    assert "priority" in answer.json()["error"]
    assert srv.spool_files() == []


def test_upload_not_multipart_is_415(srv: Harness) -> None:
    """A body that is not multipart/form-data answers 415."""
    answer = srv.request(
        "POST", "/api/batch/upload", b'{"file": "x"}', {"Content-Type": "application/json"}
    )
    assert answer.status == 415


def test_upload_truncated_body_is_400(srv: Harness) -> None:
    """A multipart body without its closing boundary answers 400 and keeps nothing."""
    body, ctype = multipart([("a.csv", CSV)], {})
    answer = srv.request("POST", "/api/batch/upload", body[:-20], {"Content-Type": ctype})
    assert answer.status == 400
    assert srv.spool_files() == []


def test_traversal_names_cannot_write_outside_the_spool(srv: Harness, tmp_path: Path) -> None:
    """Path parts in file names are stripped: everything lands inside the batch folder."""
    names = ["../../../../escaped.csv", "/tmp/abs.csv", "..\\..\\win.csv", "sub/dir/nested.csv"]
    answer = srv.upload([(n, CSV) for n in names])
    assert answer.status == 201, answer.body
    got = sorted(f["filename"] for f in answer.json()["data"]["files"])
    assert got == ["abs.csv", "escaped.csv", "nested.csv", "win.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spool"]
    assert not Path("/tmp/abs.csv").exists() or Path("/tmp/abs.csv").read_bytes() != CSV
    batch = srv.store.get_batch(answer.json()["data"]["batchId"])
    assert batch is not None
    folder = srv.spool.root / batch.work_path
    assert sorted(p.name for p in folder.iterdir()) == got


def test_name_that_sanitises_to_nothing_is_400(srv: Harness) -> None:
    """A file name with nothing usable left (``..``) is refused."""
    answer = srv.upload([("..", CSV)])
    assert answer.status == 400
    assert srv.spool_files() == []


def test_duplicate_names_get_a_suffix(srv: Harness) -> None:
    """Two files with the same name are both kept, the second renamed."""
    answer = srv.upload([("a.csv", CSV), ("dir/a.csv", CSV)])
    assert answer.status == 201
    assert sorted(f["filename"] for f in answer.json()["data"]["files"]) == ["a-2.csv", "a.csv"]


# -- token -------------------------------------------------------------------------------


def test_token_required_when_set(make_server: Callable[..., Harness]) -> None:
    """With http.token every endpoint but /healthz (and the page shell) needs the bearer token."""
    srv = make_server(http={"token": "s3cret"})
    for path in ("/api/batch/jobs", f"/api/batch/jobs/{uuid.uuid4()}", "/metrics", "/nope"):
        answer = srv.get(path)
        assert answer.status == 401, path
        assert answer.headers["www-authenticate"].startswith("Bearer")
        assert answer.json()["success"] is False
    assert srv.get("/api/batch/jobs", token="wrong").status == 401
    assert (
        srv.request("GET", "/api/batch/jobs", headers={"Authorization": "Basic s3cret"}).status
        == 401
    )
    assert srv.get("/api/batch/jobs", token="s3cret").status == 200
    assert srv.upload([("a.csv", CSV)]).status == 401
    assert srv.spool_files() == []
    assert srv.get("/healthz").status == 200


def test_reconfigure_applies_a_new_token(srv: Harness) -> None:
    """reconfigure() takes a new token without a restart."""
    assert srv.get("/api/batch/jobs").status == 200
    srv.server.reconfigure(
        srv.settings.model_copy(
            update={"http": srv.settings.http.model_copy(update={"token": "t"})}
        )
    )
    assert srv.get("/api/batch/jobs").status == 401
    assert srv.get("/api/batch/jobs", token="t").status == 200


# -- health, metrics, page ---------------------------------------------------------------------


def test_healthz_ok(srv: Harness) -> None:
    """/healthz answers 200 and status ok when every component is well."""
    answer = srv.get("/healthz")
    assert answer.status == 200
    body = answer.json()
    assert (body["success"], body["status"]) == (True, "ok")


def test_healthz_503_names_the_problem(srv: Harness) -> None:
    """/healthz answers 503 naming each problem health() reports."""
    srv.problems["watcher"] = "thread not running"
    answer = srv.get("/healthz")
    assert answer.status == 503
    body = answer.json()
    assert body["status"] == "unhealthy"
    assert body["problems"] == {"watcher": "thread not running"}
    assert body["error"] == "watcher: thread not running"
    srv.problems.clear()
    assert srv.get("/healthz").status == 200


def test_metrics_is_prometheus_text(srv: Harness) -> None:
    """/metrics serves the registry in Prometheus text format, store gauges included."""
    srv.drop("m", {"a.csv": CSV, "b.csv": CSV}, Priority.LOW)
    answer = srv.get("/metrics")
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("text/plain")
    text = answer.body.decode()
    assert 'batchd_files{priority="low",status="pending"} 2.0' in text
    assert 'batchd_batches{priority="low",status="pending"} 1.0' in text
    assert "batchd_processing_seconds_bucket" in text


def test_page_is_self_contained_html_with_csp(srv: Harness) -> None:
    """GET / serves the status page with a CSP that allows only its own script."""
    answer = srv.get("/")
    assert answer.status == 200
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    assert b"/api/batch/jobs" in answer.body
    assert b"http://" not in answer.body and b"https://" not in answer.body
    assert "script-src 'sha256-" in answer.headers["content-security-policy"]
    assert answer.headers["referrer-policy"] == "no-referrer"


# -- robustness --------------------------------------------------------------------------------


def test_unknown_path_is_404_json(srv: Harness) -> None:
    """An unknown path answers 404 JSON."""
    answer = srv.get("/api/nothing")
    assert answer.status == 404
    assert answer.json() == {"success": False, "error": "no such endpoint: /api/nothing"}


def test_wrong_method_is_405_with_allow(srv: Harness) -> None:
    """A known path with the wrong method answers 405 and lists the allowed ones."""
    answer = srv.request("DELETE", "/api/batch/jobs")
    assert answer.status == 405
    assert answer.headers["allow"] == "GET, HEAD"
    assert srv.request("GET", "/api/batch/upload").status == 405
    assert srv.request("BREW", "/api/batch/jobs").status == 405


def test_head_answers_headers_only(srv: Harness) -> None:
    """HEAD on a GET endpoint answers the headers without a body."""
    answer = srv.request("HEAD", "/healthz")
    assert answer.status == 200
    assert answer.body == b""
    assert int(answer.headers["content-length"]) > 0


def test_malformed_request_line_is_400_and_server_goes_on(srv: Harness) -> None:
    """A garbage request line answers 400 JSON and the server keeps serving."""
    answer = raw_exchange(srv.port, b"THIS IS NOT HTTP AT ALL\r\n\r\n")
    assert answer.status == 400
    assert answer.json()["success"] is False
    assert srv.get("/healthz").status == 200


def test_huge_header_is_431(srv: Harness) -> None:
    """A header line over 64 KiB answers 431 JSON and the server keeps serving."""
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    answer = raw_exchange(srv.port, head)
    assert answer.status == 431
    assert answer.json()["success"] is False
    assert srv.get("/healthz").status == 200


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"GET /healthz HTTP/1.\xb2", 400),  # a Latin-1 digit that int() refuses
        (b"GET /healthz HTTP/1.1.1", 400),
        (b"GET /healthz HTTPS/1.1", 400),
        (b"GET /healthz HTTP/2.0", 505),
        (b"GET /healthz extra HTTP/1.1", 400),
        (b"POST /healthz", 400),  # HTTP/0.9 knows only GET
    ],
)
def test_bad_request_line_is_refused(srv: Harness, line: bytes, status: int) -> None:
    """The request line is checked as http.server did (batchd now parses it itself):
    a bad version or shape is refused as JSON, HTTP/2 is 505, and the server goes on."""
    answer = raw_exchange(srv.port, line + b"\r\nHost: 127.0.0.1\r\n\r\n")
    assert answer.status == status
    assert answer.json()["success"] is False
    assert srv.get("/healthz").status == 200


@pytest.mark.parametrize(
    ("lines", "status", "says"),
    [
        (b"NoColonHere\r\n", 400, "malformed header line"),
        (b"Bad Name: x\r\n", 400, "malformed header line"),
        (b"Spaced : x\r\n", 400, "malformed header line"),
        (b": empty name\r\n", 400, "malformed header line"),
        (b"X-A: one\r\n folded on\r\n", 400, "malformed header line"),
        (b"Content-Length: 0\r\nContent-Length: 5\r\n", 400, "Content-Length"),
        (b"Host: 127.0.0.1\r\n", 400, "more than one Host"),
        (b"X-A: a\rb\r\n", 400, "CR or NUL"),
        (b"X-A: a\x00b\r\n", 400, "CR or NUL"),
        (b"Content-Length: +0\r\n", 400, "Content-Length must be a byte count"),
        (b"Content-Length: 1_0\r\n", 400, "Content-Length must be a byte count"),
        (b"Content-Length: 0x0\r\n", 400, "Content-Length must be a byte count"),
        (b"Authorization: Bearer a\r\nauthorization: Bearer b\r\n", 400, "Authorization"),
        (b"".join(b"X-%d: v\r\n" % i for i in range(100)), 431, "more than 100 header"),
    ],
)
def test_malformed_header_block_is_refused(
    srv: Harness, lines: bytes, status: int, says: str
) -> None:
    """A header line that is not 'Name: value', disagreeing Content-Lengths, two Hosts,
    CR/NUL in a value or over 100 fields: refused as JSON (the email parser took them)."""
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + lines + b"\r\n"
    answer = raw_exchange(srv.port, head)
    assert answer.status == status
    assert says in answer.json()["error"]
    assert answer.headers["connection"] == "close"
    assert srv.get("/healthz").status == 200


@pytest.mark.parametrize(
    "cut",
    [b"Host: 127.0.0.1\r\n", b"Host: 127.0.0.1\r\nX-Half: no line end"],
    ids=["after a full line", "inside a line"],
)
def test_a_header_block_cut_off_by_the_connection_is_not_acted_on(srv: Harness, cut: bytes) -> None:
    """A request whose connection ends before the blank line that closes its header
    block is incomplete: refused 400, not answered as if it were whole."""
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    try:
        sock.sendall(b"GET /api/batch/jobs HTTP/1.1\r\n" + cut)
        sock.shutdown(socket.SHUT_WR)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        assert resp.status == 400
        assert "before the header block" in json.loads(resp.read())["error"]
    finally:
        sock.close()
    assert srv.get("/healthz").status == 200


def test_header_block_within_the_rules_is_read(srv: Harness) -> None:
    """99 more fields (100 in all), a repeated equal Content-Length, values with
    surrounding blanks and a bare-LF line are read; the connection stays open for the next."""
    extra = b"".join(b"X-%d: v\r\n" % i for i in range(97))
    head = (
        b"GET /healthz HTTP/1.1\r\nHost:   127.0.0.1  \r\n"
        b"Content-Length: 0\r\nContent-Length: 0\n" + extra + b"\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    try:
        for _ in range(2):
            sock.sendall(head)
            resp = http.client.HTTPResponse(sock)
            resp.begin()
            assert resp.status == 200, resp.read()
            assert json.loads(resp.read())["success"] is True
    finally:
        sock.close()


def _exchange_until_close(port: int, data: bytes) -> bytes:
    """Send ``data`` and read until the server closes (an AssertionError if it keeps it open)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.settimeout(10)
    out = b""
    try:
        sock.sendall(data)
        while chunk := sock.recv(65536):
            out += chunk
    except TimeoutError:
        raise AssertionError(f"connection kept open after {out!r}") from None
    finally:
        sock.close()
    return out


SMUGGLED = b"GET /smuggled-next HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /api/batch/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"405"),
        (b"HEAD /api/batch/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"405"),
        (b"GET /api/batch/upload HTTP/1.1\r\nHost: evil.example\r\n", b"421"),
    ],
)
def test_an_unread_body_on_the_upload_route_ends_the_connection(
    srv: Harness, head: bytes, status: bytes
) -> None:
    """A non-POST on the upload route with a body it does not read answers and closes:
    the body (here a whole request) is never served as the next request."""
    length = b"Content-Length: %d\r\n\r\n" % len(SMUGGLED)
    out = _exchange_until_close(srv.port, head + length + SMUGGLED)
    assert out.startswith(b"HTTP/1.1 " + status), out
    assert out.count(b"HTTP/1.1 ") == 1 and b"smuggled-next" not in out, out
    assert b"\r\nConnection: close\r\n" in out


def test_an_unread_body_refused_401_on_the_upload_route_ends_the_connection(
    make_server: Callable[..., Harness],
) -> None:
    """A GET on the upload route without its token, with a body: 401 and closed, the body unread."""
    srv = make_server(http={"token": "s3cret"})
    head = b"GET /api/batch/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    out = _exchange_until_close(
        srv.port, head + b"Content-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED
    )
    assert out.startswith(b"HTTP/1.1 401"), out
    assert out.count(b"HTTP/1.1 ") == 1, out


@pytest.mark.parametrize(
    "fields",
    [
        b"Connection: keep-alive, close\r\n",
        b"Connection: close, upgrade\r\n",
        b"Connection: keep-alive\r\nConnection: Close\r\n",
    ],
)
def test_close_among_the_connection_options_ends_the_connection(
    srv: Harness, fields: bytes
) -> None:
    """ "close" anywhere in the Connection options (RFC 9112 9.6) closes after the answer:
    a request sent behind it on the same connection is not served."""
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + fields + b"\r\n"
    out = _exchange_until_close(srv.port, head + SMUGGLED)
    assert out.startswith(b"HTTP/1.1 200"), out
    assert out.count(b"HTTP/1.1 ") == 1, out
    assert b"\r\nConnection: close\r\n" in out


def test_huge_request_line_is_414(srv: Harness) -> None:
    """A request line over 64 KiB answers 414."""
    answer = raw_exchange(srv.port, b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n")
    assert answer.status == 414


def test_handler_error_is_500_json_and_logged(srv: Harness) -> None:
    """A failure inside a handler (the batches table gone) answers 500 JSON and logs http_error."""
    with sqlite3.connect(srv.settings.db_path) as db:
        db.execute("ALTER TABLE batch_jobs RENAME TO batch_jobs_gone")
    with capture_logs() as logs:
        answer = srv.get("/api/batch/jobs")
    assert answer.status == 500
    assert answer.json()["success"] is False
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["http_error"]
    assert srv.get("/healthz").status == 200


def test_slow_client_does_not_block_others(make_server: Callable[..., Harness]) -> None:
    """A client sending its headers a byte at a time is cut off; others are served meanwhile."""
    srv = make_server(http={"max_threads": 2, "socket_timeout_seconds": 1.5})
    slow = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    stop = threading.Event()
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"p" * 100 + b"\r\n\r\n"

    def dribble() -> None:
        for byte in request:
            if stop.wait(0.3):
                return
            try:
                slow.send(bytes([byte]))
            except OSError:
                return

    sender = threading.Thread(target=dribble, daemon=True)
    sender.start()
    try:
        wait_until(lambda: srv.server.peak_connections >= 1)
        assert srv.get("/api/batch/jobs").status == 200
        # The server gives up on the slow request long before its last byte.
        answer = b""
        while chunk := slow.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408")
        assert sender.is_alive()
    finally:
        stop.set()
        slow.close()
        sender.join()


def test_concurrent_clients_are_bounded(make_server: Callable[..., Harness]) -> None:
    """200 clients at once never get more than max_threads threads, and each gets an answer."""
    srv = make_server(http={"max_threads": 4})
    srv.drop("load", {"a.csv": CSV})
    statuses: list[int | str] = []
    lock = threading.Lock()
    gate = threading.Barrier(200)

    def client() -> None:
        gate.wait()
        try:
            status: int | str = srv.get("/api/batch/jobs").status
        except OSError as exc:
            status = type(exc).__name__
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=client) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(statuses) == 200
    assert set(statuses) <= {200, 503}
    assert statuses.count(200) > 0
    assert srv.server.peak_connections <= 4


def test_keep_alive_serves_several_requests_on_one_connection(srv: Harness) -> None:
    """HTTP/1.1 keep-alive: several requests on one connection."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        for _ in range(3):
            conn.request("GET", "/api/batch/jobs")
            resp = conn.getresponse()
            assert resp.status == 200
            resp.read()
    finally:
        conn.close()


def test_database_connections_do_not_pile_up(srv: Harness) -> None:
    """Each connection thread closes its database connection when it ends."""
    for _ in range(30):
        assert srv.get("/api/batch/jobs").status == 200
    wait_until(lambda: len(srv.store._all) <= 2)


def test_stop_ends_kept_alive_connections(make_server: Callable[..., Harness]) -> None:
    """stop() returns promptly even with an idle keep-alive connection open, and the port closes."""
    srv = make_server(http={"socket_timeout_seconds": 60})
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request("GET", "/healthz")
    conn.getresponse().read()
    port = srv.port
    srv.server.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    conn.close()


def test_finished_batch_shows_completed_in_detail(srv: Harness) -> None:
    """A batch whose files completed shows progressPercent 100 and status completed."""
    batch = srv.drop("done", {"a.csv": CSV})
    now = SystemClock().now()
    task = srv.store.claim_next(now)
    assert task is not None
    srv.store.finish(task.file.id, Outcome(Status.COMPLETED, result={"rows": 2}), now)
    data = srv.get(f"/api/batch/jobs/{batch.id}").json()["data"]
    assert (data["batch"]["status"], data["batch"]["progressPercent"]) == ("completed", 100)


def test_cached_answers_follow_every_commit(srv: Harness) -> None:
    """A repeated GET reflects a commit made between the two requests (no stale cache)."""
    batch = srv.drop("fresh", {"a.csv": CSV})
    before = srv.get(f"/api/batch/jobs/{batch.id}").json()["data"]
    listed = srv.get("/api/batch/jobs").json()["data"]
    assert before["batch"]["status"] == listed[0]["status"] == "pending"
    now = SystemClock().now()
    task = srv.store.claim_next(now)
    assert task is not None
    srv.store.set_progress({task.file.id: 40})
    during = srv.get(f"/api/batch/jobs/{batch.id}").json()["data"]
    assert during["files"][0]["progress"] == 40
    assert srv.get("/api/batch/jobs").json()["data"][0]["status"] == "processing"


def test_a_finished_batch_answer_outlives_other_commits_until_its_own_change(
    srv: Harness,
) -> None:
    """A finished batch's detail is reused while other batches commit (files flowing),
    and rebuilt once the batch itself changes (a retry re-derives it)."""
    done = srv.drop("done", {"a.csv": CSV})
    now = SystemClock().now()
    task = srv.store.claim_next(now)
    assert task is not None
    srv.store.finish(task.file.id, Outcome(Status.FAILED, error="boom"), now)
    first = srv.get(f"/api/batch/jobs/{done.id}").body
    builds = []
    real = srv.store.list_files

    def counted(*args: Any, **kwargs: Any) -> Any:
        builds.append(args)
        return real(*args, **kwargs)

    srv.store.list_files = counted  # type: ignore[method-assign]
    rows_read = []
    real_find = srv.store.find_batch

    def find_counted(ref: str) -> Any:
        rows_read.append(ref)
        return real_find(ref)

    srv.store.find_batch = find_counted  # type: ignore[method-assign]
    other = srv.drop("other", {"b.csv": CSV})  # another batch's commits
    claimed = srv.store.claim_next(SystemClock().now())
    assert claimed is not None and claimed.file.batch_id == other.id
    assert srv.get(f"/api/batch/jobs/{done.id}").body == first
    assert builds == []  # served from the cache
    assert rows_read == []  # checked by its version alone, the whole row not read
    assert srv.store.retry_failed(done.id) == 1
    again = srv.get(f"/api/batch/jobs/{done.id}").json()["data"]
    assert again["batch"]["status"] == "pending" and again["files"][0]["status"] == "pending"
    assert len(builds) == 1


def test_all_threads_busy_answers_503(make_server: Callable[..., Harness]) -> None:
    """When every thread is taken (here by a client that began a request and stalls),
    a new client gets 503."""
    srv = make_server(http={"max_threads": 1, "socket_timeout_seconds": 30})
    holder = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    try:
        holder.sendall(b"GET /healthz HTTP/1.1\r\n")  # headers never finished: its thread waits
        answer = srv.get("/api/batch/jobs")
        assert answer.status == 503
        assert answer.headers["retry-after"] == "1"
        assert answer.json()["success"] is False
    finally:
        holder.close()
    wait_until(lambda: srv.get("/healthz").status == 200)


# -- GET /api/inbox ------------------------------------------------------------------


def test_inbox_lists_the_drops_the_daemon_reports(make_server: Callable[..., Harness]) -> None:
    """GET /api/inbox answers the waiting drops with their state and reason, behind the token."""
    srv = make_server(http={"token": "t0k"})
    drop = {"priority": "normal", "name": "reports", "state": "refused", "reason": "chmod -R g+w"}
    srv.server.inbox = lambda: [drop]
    assert srv.get("/api/inbox").status == 401
    answer = srv.get("/api/inbox", token="t0k")
    assert answer.status == 200
    assert answer.json() == {"success": True, "data": [drop], "count": 1}
