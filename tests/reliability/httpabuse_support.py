"""Talking to a real batchd over raw sockets: multipart bodies, whole exchanges, streaming.

Bodies come from ``formdata.multipart`` (tests/formdata.py), the one builder every
HTTP test shares.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from formdata import multipart

UPLOAD = "/api/batch/upload"


@dataclass
class Answer:
    """One HTTP answer (``status`` 0: the connection closed without one)."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request_head(
    method: str, path: str, headers: dict[str, str] | None = None, length: int | None = None
) -> bytes:
    """A request line and headers, byte for byte as given."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_answer(sock: socket.socket) -> Answer:
    """Read one answer from ``sock``; status 0 when the server closed without one."""
    resp = http.client.HTTPResponse(sock)
    try:
        resp.begin()
    except (http.client.RemoteDisconnected, ConnectionError):
        return Answer(0, {}, b"")
    return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())


def exchange(port: int, head: bytes, body: bytes = b"", timeout: float = 60) -> Answer:
    """Send a request byte for byte (the server may stop reading) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        with contextlib.suppress(OSError):  # the server may refuse mid-body
            sock.sendall(body)
        return read_answer(sock)


def get(port: int, path: str, timeout: float = 60) -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def upload(port: int, files: list[tuple[str, bytes]], fields: dict[str, str]) -> Answer:
    body, ctype = multipart(files, fields)
    return exchange(port, request_head("POST", UPLOAD, {"Content-Type": ctype}, len(body)), body)


@dataclass
class Streamed:
    """How a streamed upload ended: the answer, and how much the client got to send."""

    answer: Answer
    sent_bytes: int


def stream_upload(port: int, head: bytes, chunks: Iterable[bytes], timeout: float = 60) -> Streamed:
    """Send ``head``, then ``chunks`` from a second thread while this one waits for
    the answer, so a server that answers early is heard while the client still sends."""
    sent = 0
    stop = threading.Event()
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def pump() -> None:
        nonlocal sent
        try:
            for chunk in chunks:
                if stop.is_set():
                    return
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            return  # the server stopped reading and closed: expected when it refuses

    try:
        sock.sendall(head)
        sender = threading.Thread(target=pump, name="stream-upload", daemon=True)
        sender.start()
        answer = read_answer(sock)
        stop.set()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sender.join(timeout)
        return Streamed(answer, sent)
    finally:
        stop.set()
        sock.close()


def repeat(block: bytes, total: int) -> Iterator[bytes]:
    """``total`` bytes as ``block``-sized chunks, generated, never held whole."""
    left = total
    while left > 0:
        chunk = block[:left]
        left -= len(chunk)
        yield chunk
