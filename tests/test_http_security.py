"""HTTP security (issue 12.5, 12.7, 12.8, 12.10): real requests against a real server.

Foreign Host headers (DNS rebinding), cross-site state changes (CSRF), per-user
tokens, identity before the body, the in-flight and free-space limits, and
slow-drip clients over raw sockets.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from formdata import multipart
from test_http import CSV, Answer, Harness, make_server, srv, wait_until

from batchd.errors import BatchdError

__all__ = ["make_server", "srv"]  # the fixtures, shared with test_http

UPLOAD = "/api/batch/upload"
ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"


def head(method: str, path: str, headers: dict[str, str], length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def post_upload(
    srv: Harness,
    headers: dict[str, str],
    fields: dict[str, str] | None = None,
    files: list[tuple[str, bytes]] | None = None,
) -> Answer:
    body, ctype = multipart(files or [("a.csv", CSV)], fields or {})
    return srv.request("POST", UPLOAD, body, {"Content-Type": ctype, **headers})


# -- Host (DNS rebinding) -------------------------------------------------------------


def test_foreign_host_is_421_on_every_route(srv: Harness) -> None:
    """A Host that is not this server (a rebound DNS name) gets a JSON 421, reads included."""
    srv.drop("secret", {"a.csv": CSV})
    for path in ("/api/batch/jobs", "/api/batch/jobs/secret", "/healthz", "/"):
        answer = srv.request("GET", path, headers={"Host": f"rebind.example:{srv.port}"})
        assert answer.status == 421, (path, answer)
        assert answer.json()["success"] is False
        assert "http.allowed_hosts" in answer.json()["error"]
        assert b"secret" not in answer.body
    refused = post_upload(srv, {"Host": "rebind.example"})
    assert refused.status == 421
    assert srv.store.list_batches() and len(srv.store.list_batches()) == 1


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.0.0.1:{port}", "localhost", "LOCALHOST:{port}", "[::1]:{port}"]
)
def test_loopback_hosts_are_answered(srv: Harness, host: str) -> None:
    """localhost, 127.0.0.1 and [::1], with or without a port, are this server; a
    look-alike name on the same port is not."""
    answer = srv.request("GET", "/api/batch/jobs", headers={"Host": host.format(port=srv.port)})
    assert answer.status == 200, answer
    fake = host.format(port=srv.port).lower().replace("localhost", "localhost.evil.example")
    fake = fake.replace("127.0.0.1", "127.0.0.1.nip.example").replace("[::1]", "[::2]")
    assert srv.request("GET", "/api/batch/jobs", headers={"Host": fake}).status == 421


def test_allowed_hosts_entry_is_answered(make_server: Callable[..., Harness]) -> None:
    """A name in http.allowed_hosts (with or without its port) is answered; others stay 421."""
    srv = make_server(http={"allowed_hosts": ["batchd.internal", "other.internal:9999"]})
    ok = srv.request("GET", "/api/batch/jobs", headers={"Host": f"batchd.internal:{srv.port}"})
    assert ok.status == 200
    assert srv.request("GET", "/healthz", headers={"Host": "other.internal:9999"}).status == 200
    wrong_port = srv.request("GET", "/healthz", headers={"Host": "other.internal:1234"})
    assert wrong_port.status == 421


# -- Origin (CSRF) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://localhost:3000"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:{port}"},
    ],
)
def test_cross_site_upload_is_403_and_creates_no_batch(
    srv: Harness, headers: dict[str, str]
) -> None:
    """An upload a foreign page's script or form sends is refused; nothing is stored."""
    sent = {k: v.format(port=srv.port) for k, v in headers.items()}
    answer = post_upload(srv, sent, {"user_id": "victim", "priority": "high"})
    assert answer.status == 403, answer
    assert "cross-" in answer.json()["error"]
    assert srv.store.list_batches() == []
    assert list(srv.spool.uploads.iterdir()) == []


def test_same_origin_upload_is_accepted(srv: Harness) -> None:
    """The server's own page (Origin = its Host, Sec-Fetch-Site same-origin) may upload;
    the same request from another port of the same host may not."""
    origin = f"http://127.0.0.1:{srv.port}"
    answer = post_upload(srv, {"Origin": origin, "Sec-Fetch-Site": "same-origin"})
    assert answer.status == 201, answer
    other = post_upload(srv, {"Origin": f"http://127.0.0.1:{srv.port + 1}"})
    assert other.status == 403
    assert len(srv.store.list_batches()) == 1


def test_no_cors_headers_are_ever_sent(srv: Harness) -> None:
    """A CORS preflight and a cross-origin read get no Access-Control-* header, and
    the cross-origin POST is refused."""
    evil = {"Origin": "http://evil.example"}
    preflight = srv.request(
        "OPTIONS",
        UPLOAD,
        headers={**evil, "Access-Control-Request-Method": "POST"},
    )
    read = srv.request("GET", "/api/batch/jobs", headers=evil)
    assert read.status == 200
    post = post_upload(srv, evil)
    assert post.status == 403
    for answer in (preflight, read, post):
        assert not [k for k in answer.headers if k.startswith("access-control-")], answer


# -- tokens and identity ----------------------------------------------------------------


@pytest.fixture
def users_srv(make_server: Callable[..., Harness], tmp_path: Path) -> Harness:
    users = tmp_path / "users"
    users.write_text(f"# user token\nbob {BOB}\n\n")
    return make_server(http={"token": ADMIN, "users": {"Alice": ALICE}, "users_file": str(users)})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_user_token_makes_its_user_the_user_id(users_srv: Harness) -> None:
    """A per-user token's user is the batch's user_id (from http.users and http.users_file)."""
    for token, user in ((ALICE, "alice"), (BOB, "bob")):
        answer = post_upload(users_srv, bearer(token))
        assert answer.status == 201, answer
        batch = users_srv.store.get_batch(answer.json()["data"]["batchId"])
        assert batch is not None and batch.user_id == user
    blank = post_upload(users_srv, bearer(ALICE), {"user_id": ""})  # a form left blank
    assert blank.status == 201
    batch = users_srv.store.get_batch(blank.json()["data"]["batchId"])
    assert batch is not None and batch.user_id == "alice"


def test_user_token_cannot_upload_as_someone_else(users_srv: Harness) -> None:
    """With alice's token, user_id bob (field or header) is 403 and nothing is stored."""
    field = post_upload(users_srv, bearer(ALICE), {"user_id": "bob"})
    header = post_upload(users_srv, {**bearer(ALICE), "X-Batchd-User": "bob"})
    assert (field.status, header.status) == (403, 403)
    assert users_srv.store.list_batches() == []


def test_operator_token_may_name_any_user(users_srv: Harness) -> None:
    """The shared http.token is the operator's: it uploads as the user it names."""
    answer = post_upload(users_srv, bearer(ADMIN), {"user_id": "carol"})
    assert answer.status == 201
    batch = users_srv.store.get_batch(answer.json()["data"]["batchId"])
    assert batch is not None and batch.user_id == "carol"


def test_no_or_wrong_token_is_401(users_srv: Harness) -> None:
    """Without a token, or with one nobody has, uploads and reads are 401."""
    assert post_upload(users_srv, {}).status == 401
    assert post_upload(users_srv, bearer("x" * 30)).status == 401
    assert users_srv.get("/api/batch/jobs", token=BOB).status == 200
    assert users_srv.get("/api/batch/jobs").status == 401


def test_rate_limit_counts_per_authenticated_user(users_srv: Harness) -> None:
    """alice's 4th upload in an hour is 429 whatever user_id it claims; bob goes on."""
    for _ in range(3):
        assert post_upload(users_srv, bearer(ALICE)).status == 201
    assert post_upload(users_srv, bearer(ALICE)).status == 429
    assert post_upload(users_srv, bearer(ALICE), {"user_id": "ALICE"}).status == 429
    assert post_upload(users_srv, bearer(BOB)).status == 201


def test_unreadable_users_file_stops_the_start(
    make_server: Callable[..., Harness], tmp_path: Path
) -> None:
    """A users_file that is missing or malformed is a clear error naming the file."""
    with pytest.raises(BatchdError, match=r"http\.users_file .*missing"):
        make_server(http={"users_file": str(tmp_path / "missing")})
    bad = tmp_path / "bad"
    bad.write_text("alice short\n")
    with pytest.raises(BatchdError, match="line 1"):
        make_server(http={"users_file": str(bad)})


def test_user_ids_are_case_folded_and_nfkc_normalised(srv: Harness) -> None:
    """Alice, ALICE and full-width Alice are one user for the rate limit."""
    for name in ("Alice", "ALICE", "\uff21\uff4c\uff49\uff43\uff45"):
        assert srv.upload([("a.csv", CSV)], {"user_id": name}).status == 201
    assert srv.upload([("a.csv", CSV)], {"user_id": "alice"}).status == 429
    assert {b.user_id for b in srv.store.list_batches()} == {"alice"}


# -- the rate limit before the body ---------------------------------------------------


def answer_without_body(port: int, request: bytes) -> bytes:
    """Send only the request head and read what the server answers before any body byte."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        sock.settimeout(5)
        got = b""
        with contextlib.suppress(TimeoutError):
            while b"\r\n\r\n" not in got and (chunk := sock.recv(65536)):
                got += chunk
        return got


def test_user_over_the_limit_is_refused_before_any_body_byte(srv: Harness) -> None:
    """X-Batchd-User over its limit gets 429 on the headers alone: no body byte is read."""
    for _ in range(3):
        assert srv.upload([("a.csv", CSV)], headers={"X-Batchd-User": "dave"}).status == 201
    _, ctype = multipart([("a.csv", CSV)])
    request = head(
        "POST",
        UPLOAD,
        {"Host": "127.0.0.1", "Content-Type": ctype, "X-Batchd-User": "Dave"},
        length=40 * 1024 * 1024,
    )
    answer = answer_without_body(srv.port, request)
    assert answer.startswith(b"HTTP/1.1 429"), answer
    assert list(srv.spool.uploads.iterdir()) == []


def test_token_user_over_the_limit_is_refused_before_any_body_byte(users_srv: Harness) -> None:
    """A per-user token over its limit gets 429 on the headers alone."""
    for _ in range(3):
        assert post_upload(users_srv, bearer(ALICE)).status == 201
    _, ctype = multipart([("a.csv", CSV)])
    request = head(
        "POST",
        UPLOAD,
        {"Host": "127.0.0.1", "Content-Type": ctype, **bearer(ALICE)},
        length=40 * 1024 * 1024,
    )
    assert answer_without_body(users_srv.port, request).startswith(b"HTTP/1.1 429")


def test_user_id_after_the_first_file_is_refused(srv: Harness) -> None:
    """A user_id field sent after a file part (too late for the rate limit) is 400."""
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.csv"\r\n'
        f"\r\n{CSV.decode()}\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="user_id"\r\n\r\nerin\r\n'
        f"--{boundary}--\r\n"
    ).encode()
    answer = srv.request(
        "POST", UPLOAD, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert answer.status == 400
    assert "before the first file" in answer.json()["error"]
    assert srv.store.list_batches() == []
    assert list(srv.spool.uploads.iterdir()) == []


# -- bytes in flight and free space ------------------------------------------------


def test_uploads_in_flight_are_capped(make_server: Callable[..., Harness]) -> None:
    """While one upload holds most of limits.max_upload_bytes_in_flight, another is 503;
    one bigger than the whole budget is 413; after the first ends, uploads go on."""
    srv = make_server(limits={"max_upload_bytes_in_flight": 100_000})
    body, ctype = multipart([("big.csv", b"a,b\n" * 15_000)])
    holder = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    try:
        holder.sendall(
            head("POST", UPLOAD, {"Host": "127.0.0.1", "Content-Type": ctype}, len(body))
            + body[:1000]
        )
        wait_until(lambda: srv.server._server is not None and srv.server._server.upload_bytes > 0)
        busy = srv.upload([("a.csv", CSV * 2000)])
        assert busy.status == 503, busy
        assert busy.headers["retry-after"] and "max_upload_bytes_in_flight" in busy.json()["error"]
        huge = srv.upload([("h.csv", b"a,b\n" * 30_000)])
        assert huge.status == 413
        holder.sendall(body[1000:])
        resp = holder.recv(65536)
        assert resp.startswith(b"HTTP/1.1 201"), resp[:200]
    finally:
        holder.close()
    assert srv.upload([("a.csv", CSV * 2000)]).status == 201


def test_upload_under_the_free_space_floor_is_507(make_server: Callable[..., Harness]) -> None:
    """With less free space than limits.min_free_bytes, an upload is 507 and nothing is written."""
    srv = make_server(limits={"min_free_bytes": 1 << 60})
    answer = srv.upload([("a.csv", CSV)])
    assert answer.status == 507
    assert "limits.min_free_bytes" in answer.json()["error"]
    assert srv.store.list_batches() == []
    assert list(srv.spool.uploads.iterdir()) == []


# -- slow-drip clients -----------------------------------------------------------------


class Drip:
    """Connections that send their request a byte at a time (slowloris)."""

    def __init__(self, port: int, spread: bool) -> None:
        self.port = port
        #: each connection from its own loopback address (127.0.0.10, .11 ...), so
        #: the per-address cap does not apply and only the thread reserve protects.
        self.spread = spread
        self.stop = threading.Event()
        self.socks: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.answers: list[bytes] = []
        self._lock = threading.Lock()

    def start(self, prefix: bytes, rest: bytes, count: int, every: float) -> None:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if self.spread:
                sock.bind((f"127.0.0.{10 + len(self.socks)}", 0))
            sock.settimeout(60)
            sock.connect(("127.0.0.1", self.port))
            self.socks.append(sock)
            thread = threading.Thread(
                target=self._drip, args=(sock, prefix, rest, every), daemon=True
            )
            thread.start()
            self.threads.append(thread)

    def _drip(self, sock: socket.socket, prefix: bytes, rest: bytes, every: float) -> None:
        answer = b""
        with contextlib.suppress(OSError):
            sock.sendall(prefix)
            for byte in rest:
                if self.stop.wait(every):
                    break
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
                sock.setblocking(True)
                sock.sendall(bytes([byte]))
        with self._lock:
            self.answers.append(answer)

    def close(self) -> None:
        self.stop.set()
        for sock in self.socks:
            sock.close()
        for thread in self.threads:
            thread.join(10)


@pytest.mark.parametrize("spread", [True, False], ids=["40 addresses", "one address"])
def test_40_drip_connections_cannot_make_healthz_fail(
    make_server: Callable[..., Harness], spread: bool
) -> None:
    """20 clients dripping headers and 20 dripping upload bodies (1 byte per 0.5 s, more
    than http.max_threads = 32 together) never keep /healthz or a GET from answering 200."""
    srv = make_server(http={"socket_timeout_seconds": 30, "min_upload_bytes_per_second": 0})
    drip = Drip(srv.port, spread)
    try:
        drip.start(b"GET /api/batch/jobs HTTP/1.1\r\n", b"X-Slow: " + b"a" * 200, 20, 0.5)
        body, ctype = multipart([("a.csv", b"a,b\n" * 1000)])
        upload_head = head("POST", UPLOAD, {"Host": "127.0.0.1", "Content-Type": ctype}, len(body))
        drip.start(upload_head, body[:200], 20, 0.5)
        # Spread, every thread gets taken; from one address, its 16 (the per-client cap).
        wait_until(lambda: srv.server.peak_connections >= (32 if spread else 16), 20)
        deadline = time.monotonic() + 4
        probes = []
        while time.monotonic() < deadline:
            probes.append(srv.get("/healthz").status)
            probes.append(srv.get("/api/batch/jobs").status)
        assert set(probes) == {200}, probes
    finally:
        drip.close()


def test_connections_per_client_address_are_capped(make_server: Callable[..., Harness]) -> None:
    """An address whose http.max_connections_per_client connections are all busy in
    upload bodies gets 503 for the next; another address is still served."""
    srv = make_server(
        http={
            "max_connections_per_client": 4,
            "max_uploads_per_client": 4,
            "socket_timeout_seconds": 30,
            "min_upload_bytes_per_second": 0,
        }
    )
    _, ctype = multipart([("a.csv", CSV)])
    held = []
    try:
        for _ in range(4):
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
            sock.sendall(head("POST", UPLOAD, {"Host": "127.0.0.1", "Content-Type": ctype}, 10_000))
            held.append(sock)
        wait_until(lambda: srv.server._server is not None and len(srv.server._server.uploads) > 0)
        wait_until(lambda: sum(srv.server._server.uploads.values()) == 4)  # type: ignore[union-attr]
        refused = srv.get("/healthz")
        assert refused.status == 503
        assert "max_connections_per_client" in refused.json()["error"]
        other = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        other.bind(("127.0.0.2", 0))
        other.settimeout(30)
        other.connect(("127.0.0.1", srv.port))
        with other:
            other.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert other.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        for sock in held:
            sock.close()


def test_slow_upload_body_is_cut_with_408(make_server: Callable[..., Harness]) -> None:
    """An upload body under http.min_upload_bytes_per_second is cut off with 408 once
    its grace (socket_timeout_seconds) is over, and nothing of it is kept."""
    srv = make_server(http={"socket_timeout_seconds": 1.0, "min_upload_bytes_per_second": 1000})
    body, ctype = multipart([("a.csv", b"a,b\n" * 25_000)])
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(head("POST", UPLOAD, {"Host": "127.0.0.1", "Content-Type": ctype}, len(body)))
        answer = b""
        sent = 0
        while not answer and time.monotonic() - start < 20:
            with contextlib.suppress(OSError):
                sock.sendall(body[sent : sent + 1])  # one byte every 0.2 s: 5 B/s
                sent += 1
            sock.settimeout(0.2)
            with contextlib.suppress(TimeoutError):
                answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"min_upload_bytes_per_second" in answer
    assert sent < 50  # cut within a few seconds, not after the 100 kB
    wait_until(lambda: list(srv.spool.uploads.iterdir()) == [])
