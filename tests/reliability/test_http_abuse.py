"""HTTP abuse against the real daemon: each attack gets a clear 4xx (or a 503 when
busy), nothing of it is stored, and the daemon stays healthy and keeps serving.

One daemon (HTTP on port 0, ``http.socket_timeout_seconds`` = 2) takes every
attack over raw sockets; after each, ``/healthz`` must answer 200 and no
upload may be left in ``work/.uploads`` or registered.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from httpabuse_support import (
    UPLOAD,
    Answer,
    exchange,
    get,
    multipart,
    read_answer,
    repeat,
    request_head,
    stream_upload,
    upload,
)
from support import DaemonProcess, wait_until

ROW = b"dish,price\nsoup,4.50\n"
MIB = 1024 * 1024
SOCKET_TIMEOUT_SECONDS = 2.0
CLIENTS = 200
UPLOADERS = 20
#: Connections that never send a byte: three times http.max_threads (32), and
#: within the listen backlog (128), so every one is accepted.
IDLE_CLIENTS = 100
B = "abuseboundary"


@dataclass
class Server:
    daemon: DaemonProcess
    port: int

    @property
    def uploads(self) -> Path:
        return self.daemon.spool / "work" / ".uploads"

    def batches(self) -> int:
        return int(self.daemon.db().execute("SELECT COUNT(*) FROM batch_jobs").fetchone()[0])

    def assert_nothing_stored_and_healthy(self, batches_before: int) -> None:
        """No upload left half-received or registered, and /healthz is 200."""
        wait_until(lambda: not any(self.uploads.iterdir()), 30, what="work/.uploads to empty")
        assert self.batches() == batches_before
        health = get(self.port, "/healthz")
        assert health.status == 200, health


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("httpabuse")
    port_file = tmp / "port"
    d = DaemonProcess(
        tmp, http={"enabled": True, "port": 0, "socket_timeout_seconds": SOCKET_TIMEOUT_SECONDS}
    )
    d.start(BATCHD_PORT_FILE=str(port_file))
    try:
        port = int(
            wait_until(lambda: port_file.exists() and port_file.read_text(), 30, what="HTTP port")
        )
        yield Server(d, port)
    finally:
        assert d.stop() == 0


def assert_refused(answer: Answer, status: int) -> str:
    """``answer`` is the JSON refusal ``status``; returns its error message."""
    assert answer.status == status, answer
    payload = answer.json()
    assert payload["success"] is False and payload["error"], payload
    return str(payload["error"])


def file_part(name: str, data: bytes, boundary: str = B) -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: text/csv\r\n\r\n"
        ).encode()
        + data
        + b"\r\n"
    )


CLOSE = f"--{B}--\r\n".encode()
CTYPE = f"multipart/form-data; boundary={B}"
MALFORMED: dict[str, tuple[bytes, str, int]] = {
    # case: (body, Content-Type, status)
    "not multipart at all": (b"hello, this is not a form", CTYPE, 400),
    "another boundary": (file_part("a.csv", ROW, "other") + b"--other--\r\n", CTYPE, 400),
    "no closing boundary": (file_part("a.csv", ROW), CTYPE, 400),
    "part header without a colon": (
        f"--{B}\r\nContent-Disposition form-data name=file\r\n\r\n".encode() + ROW + CLOSE,
        CTYPE,
        400,
    ),
    "binary garbage": (bytes(range(256)) * 64, CTYPE, 400),
    "only the closing boundary": (CLOSE, CTYPE, 400),
    "file field without a filename": (
        f'--{B}\r\nContent-Disposition: form-data; name="file"\r\n\r\n'.encode() + ROW + CLOSE,
        CTYPE,
        400,
    ),
    "empty body": (b"", CTYPE, 400),
    "no boundary parameter": (file_part("a.csv", ROW) + CLOSE, "multipart/form-data", 415),
    "not a form": (ROW, "text/csv", 415),
    "name that is only dots": (file_part("..", ROW) + CLOSE, CTYPE, 400),
    "name the inbox ignores": (file_part("a.csv.part", ROW) + CLOSE, CTYPE, 400),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_multipart_is_refused_and_stores_nothing(server: Server, case: str) -> None:
    """A malformed or unusable multipart body answers a clear 4xx and stores nothing."""
    body, ctype, status = MALFORMED[case]
    before = server.batches()
    head = request_head("POST", UPLOAD, {"Content-Type": ctype}, len(body))
    assert_refused(exchange(server.port, head, body), status)
    server.assert_nothing_stored_and_healthy(before)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Content-Length": "-5"}, 400),
        ({"Content-Length": "lots"}, 400),
        ({"Transfer-Encoding": "chunked"}, 411),
        ({}, 411),
    ],
    ids=["negative length", "length not a number", "chunked", "no length"],
)
def test_bad_content_length_is_refused(
    server: Server, headers: dict[str, str], status: int
) -> None:
    """An upload without a usable Content-Length is refused before its body is read."""
    before = server.batches()
    body, ctype = multipart([("a.csv", ROW)], {"user_id": "lengths"})
    head = request_head("POST", UPLOAD, {"Content-Type": ctype, **headers})
    assert_refused(exchange(server.port, head, body), status)
    server.assert_nothing_stored_and_healthy(before)


def test_body_shorter_than_its_length_times_out_with_408(server: Server) -> None:
    """A body that stops short of its Content-Length answers 408 once the socket
    timeout passes; the half-received upload is deleted."""
    before = server.batches()
    body, ctype = multipart([("short.csv", ROW * 100)], {"user_id": "short"})
    head = request_head("POST", UPLOAD, {"Content-Type": ctype}, len(body))
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(head + body[: len(body) // 2])
        assert_refused(read_answer(sock), 408)
    server.assert_nothing_stored_and_healthy(before)


def test_body_cut_by_a_closed_connection_leaves_nothing(server: Server) -> None:
    """A client that closes mid-body gets no answer, and nothing of its upload is kept."""
    before = server.batches()
    body, ctype = multipart([("cut.csv", ROW * 100)], {"user_id": "cut"})
    head = request_head("POST", UPLOAD, {"Content-Type": ctype}, len(body))
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(head + body[: len(body) // 2])
        sock.shutdown(socket.SHUT_WR)
        assert read_answer(sock).status == 0
    server.assert_nothing_stored_and_healthy(before)


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def test_100_mb_upload_is_refused_once_it_passes_the_limit(server: Server) -> None:
    """A 100 MB file against the 50 MiB limit answers 413 as soon as the limit is
    passed (the client never gets to send it all), is never held in memory, and
    leaves nothing."""
    before = server.batches()
    assert server.daemon.proc is not None
    pid = server.daemon.proc.pid
    peak_before = peak_rss_bytes(pid)
    total = 100 * 1000 * 1000
    opening = file_part("huge.csv", b"")[:-2]  # the part's headers; its data is streamed
    closing = b"\r\n" + CLOSE
    length = len(opening) + total + len(closing)

    def body() -> Iterator[bytes]:
        yield opening
        yield from repeat(b"1,2\n" * (MIB // 4), total)
        yield closing

    head = request_head("POST", UPLOAD, {"Content-Type": CTYPE}, length)
    streamed = stream_upload(server.port, head, body())
    error = assert_refused(streamed.answer, 413)
    assert "max_file_bytes" in error
    assert streamed.sent_bytes < total, f"sent {streamed.sent_bytes} of {total} bytes"
    growth = peak_rss_bytes(pid) - peak_before
    assert growth < 32 * MIB, f"daemon peak RSS grew by {growth} bytes"
    server.assert_nothing_stored_and_healthy(before)


def test_length_no_upload_could_have_is_refused_before_the_body(server: Server) -> None:
    """A Content-Length past what the limits could ever allow is refused on the headers
    (with Expect: 100-continue, before a byte of body is sent)."""
    before = server.batches()
    head = request_head(
        "POST", UPLOAD, {"Content-Type": CTYPE, "Expect": "100-continue"}, 10 * 1024**4
    )
    assert_refused(exchange(server.port, head), 413)
    server.assert_nothing_stored_and_healthy(before)


TRAVERSAL_NAMES = {
    "../../evil1.csv": "evil1.csv",
    "..\\..\\evil2.csv": "evil2.csv",
    "/etc/cron.d/evil3.csv": "evil3.csv",
    "a/../../../evil4.csv": "evil4.csv",
    "....//evil5.csv": "evil5.csv",
    ".evil6.csv": "evil6.csv",
    "%2e%2e%2fevil7.csv": "%2e%2e%2fevil7.csv",
    "ev\til8.csv": "evil8.csv",
}


def test_path_traversal_names_stay_inside_their_batch(server: Server) -> None:
    """Uploaded names that try to climb out of the spool are cut to plain base names;
    nothing is written outside the batch, and traversal URLs are 404."""
    root = server.daemon.tmp
    files = [(name, ROW) for name in TRAVERSAL_NAMES]
    answer = upload(server.port, files, {"user_id": "traversal"})
    assert answer.status == 201, answer
    data = answer.json()["data"]
    assert sorted(f["filename"] for f in data["files"]) == sorted(TRAVERSAL_NAMES.values())
    assert server.daemon.wait_batch(data["name"])["batch"]["status"] == "completed"
    batch_dirs = {server.daemon.spool / top / data["name"] for top in ("outbox", "archive")}
    for path in root.rglob("*evil*"):
        assert any(folder in path.parents for folder in batch_dirs), path
    for url in (
        "/api/batch/jobs/..%2f..%2f..%2fetc%2fpasswd",
        "/api/batch/jobs/%2e%2e",
        "/../../../etc/passwd",
        "/api/batch/jobs/../../../etc/passwd",
    ):
        head = request_head("GET", url)
        assert_refused(exchange(server.port, head), 404)
    assert get(server.port, "/healthz").status == 200


def dribble(sock: socket.socket, stop: threading.Event) -> None:
    """Send one header line every quarter second (a slowloris client)."""
    with contextlib.suppress(OSError):  # the server closes once it has answered
        sock.sendall(b"GET /api/batch/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        n = 0
        while not stop.wait(0.25):
            n += 1
            sock.sendall(f"X-Slow-{n}: 1\r\n".encode())


TLS_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64
HEADER_FLOODS: dict[str, tuple[Callable[[], bytes], int]] = {
    "2000 headers": (
        lambda: request_head("GET", "/api/batch/jobs", {f"X-Flood-{i}": "1" for i in range(2000)}),
        431,
    ),
    "one 100 KB header": (
        lambda: request_head("GET", "/api/batch/jobs", {"X-Big": "a" * 100_000}),
        431,
    ),
    "a 70 KB request line": (lambda: request_head("GET", "/api/batch/jobs?q=" + "a" * 70_000), 414),
    "a request line that is not HTTP": (lambda: b"HELLO\x00\xff WORLD\r\n\r\n", 400),
    # A TLS hello has no line end: it waits for one until the header deadline.
    "a TLS handshake": (lambda: TLS_HELLO, 408),
}


@pytest.mark.parametrize("case", sorted(HEADER_FLOODS))
def test_header_flood_is_refused(server: Server, case: str) -> None:
    """Too many headers, a huge header, a huge request line or bytes that are not HTTP
    answer a clear 4xx and close that connection only."""
    build, status = HEADER_FLOODS[case]
    assert_refused(exchange(server.port, build()), status)
    assert get(server.port, "/healthz").status == 200


def test_slow_headers_are_cut_at_the_deadline(server: Server) -> None:
    """A client dribbling header lines is answered 408 at the header deadline, not
    held for as long as it keeps dribbling."""
    stop = threading.Event()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sender = threading.Thread(target=dribble, args=(sock, stop), daemon=True)
        sender.start()
        try:
            answer = read_answer(sock)
        finally:
            stop.set()
            sender.join(30)
    assert_refused(answer, 408)
    assert get(server.port, "/healthz").status == 200


def test_200_concurrent_clients_each_get_an_answer(server: Server) -> None:
    """200 clients at once (20 of them uploading) each get 200, 201 or a 503 with
    Retry-After; every 201 is one batch that completes, and nothing else is stored."""
    before = server.batches()
    barrier = threading.Barrier(CLIENTS, timeout=60)
    answers: list[Answer | None] = [None] * CLIENTS
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            barrier.wait()
            # Connect and send at once: a connection idle past the header deadline
            # (2 s here) is closed without an answer, by design.
            with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
                if i < UPLOADERS:
                    body, ctype = multipart([(f"crowd-{i}.csv", ROW)], {"user_id": f"crowd-{i}"})
                    head = request_head("POST", UPLOAD, {"Content-Type": ctype}, len(body))
                    sock.sendall(head + body)
                else:
                    sock.sendall(request_head("GET", "/api/batch/jobs?limit=5"))
                answers[i] = read_answer(sock)
        except BaseException as exc:  # reported below with the others
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    got = [a for a in answers if a is not None]
    assert len(got) == CLIENTS
    codes = Counter(a.status for a in got)
    assert set(codes) <= {200, 201, 503}, codes
    for answer in got:
        if answer.status == 503:
            assert answer.headers.get("retry-after") and answer.json()["success"] is False
    accepted = [a.json()["data"]["name"] for a in got if a.status == 201]
    for name in accepted:
        assert server.daemon.wait_batch(name, 60)["batch"]["status"] == "completed"
    server.assert_nothing_stored_and_healthy(before + len(accepted))


def test_a_normal_upload_still_works_after_the_abuse(server: Server) -> None:
    """After every attack, a plain upload is accepted and processed, and /healthz is 200."""
    answer = upload(server.port, [("menu.csv", ROW)], {"user_id": "after", "priority": "high"})
    assert answer.status == 201, answer
    name = answer.json()["data"]["name"]
    assert server.daemon.wait_batch(name)["batch"]["status"] == "completed"
    assert server.daemon.results(name)["menu.csv"]["status"] == "completed"
    assert get(server.port, "/healthz").status == 200
    assert not any(server.uploads.iterdir())
    assert os.path.isdir(server.daemon.spool / "archive" / name)


def probe(port: int) -> bool:
    try:
        return get(port, "/healthz", timeout=5).status == 200
    except OSError:
        return False


def test_idle_connections_cannot_shut_out_a_health_probe(tmp_path: Path) -> None:
    """100 connections that never send a byte do not keep /healthz from answering 200
    long before their 60 s socket timeout: the longest-idle ones are closed to make room."""
    port_file = tmp_path / "port"
    d = DaemonProcess(tmp_path, http={"enabled": True, "port": 0, "socket_timeout_seconds": 60})
    d.start(BATCHD_PORT_FILE=str(port_file))
    idle: list[socket.socket] = []
    try:
        port = int(
            wait_until(lambda: port_file.exists() and port_file.read_text(), 30, what="HTTP port")
        )
        idle = [
            socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(IDLE_CLIENTS)
        ]
        # A probe (retried like a load balancer's) is answered 200 well inside the 60 s.
        wait_until(lambda: probe(port), 20, what="/healthz to answer 200 during the idle flood")
        answer = upload(port, [("after-idle.csv", ROW)], {"user_id": "after-idle"})
        assert answer.status == 201, answer
    finally:
        for sock in idle:
            sock.close()
        assert d.stop() == 0
