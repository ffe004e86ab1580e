"""HTTP load: client processes, each with threads on kept-alive raw-socket HTTP/1.1 connections.

Every loop is bounded by a request count; loopback only.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import multiprocessing as mp
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from bench.common import median, percentile


class _Conn:
    """A kept-alive HTTP/1.1 GET client on a raw socket.

    ``http.client`` parses every answer's headers with the email package and
    costs several times the CPU of a small GET on the server side; on two
    shared cores that made the load generator the limit. This reads only the
    status and ``Content-Length`` (every batchd answer has one).
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(256 * 1024)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def get(self, path: str) -> tuple[int, bytes]:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._fill()
        head, self.buf = self.buf[:end], self.buf[end + 4 :]
        status = int(head[9:12])
        m = _LENGTH.search(head)
        if m is None:
            raise ConnectionError(f"GET {path}: an answer without Content-Length")
        length = int(m.group(1))
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, body

    def close(self) -> None:
        self.sock.close()


_LENGTH = re.compile(rb"(?im)^content-length:\s*(\d+)")


def _client(port: int, paths: list[str], count: int, out: list[Any], until: Any = None) -> None:
    conn = _Conn(port)
    latencies: dict[str, list[float]] = {p: [] for p in set(paths)}
    errors = 0
    checked: set[str] = set()
    for i in range(count):
        if until is not None and i % 16 == 0 and until.is_set():
            break
        path = paths[i % len(paths)]
        start = time.perf_counter()
        try:
            status, body = conn.get(path)
            if status != 200:
                errors += 1
            elif path not in checked:  # the full check once per path and connection
                checked.add(path)
                if not json.loads(body)["success"]:
                    errors += 1
        except (OSError, ValueError):
            errors += 1
            conn.close()
            conn = _Conn(port)
            continue
        latencies[path].append(time.perf_counter() - start)
    conn.close()
    out.append((latencies, errors))


def _client_process(
    port: int,
    paths: list[str],
    count: int,
    threads: int,
    queue: Any,
    go: Any = None,
    until: Any = None,
) -> None:
    results: list[Any] = []
    workers = [
        threading.Thread(target=_client, args=(port, paths, count // threads, results, until))
        for _ in range(threads)
    ]
    if go is not None:  # imported and ready: wait for the parent's start signal
        queue.put("ready")
        go.wait()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    queue.put(results)


def load(
    port: int,
    paths: dict[str, str],
    requests: int,
    processes: int = 2,
    threads: int = 4,
    start: Callable[[], None] | None = None,
    until: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """``requests`` GETs spread over ``paths`` (label -> path): req/s overall, p50/p99 per label.

    The clients start up (spawn, imports, threads) before the clock starts;
    ``start()``, if given, runs just before they send their first request
    (the drop of the files to process meanwhile);
    with ``until``, they also stop as soon as ``until()`` is true (polled by a
    thread here every 10 ms), at the latest after ``requests``.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    order = list(paths.values())
    go = ctx.Event()  # always: time from the first request, not from the spawn and imports
    stop = ctx.Event() if until is not None else None
    procs = [
        ctx.Process(
            target=_client_process,
            args=(port, order, requests // processes, threads, queue, go, stop),
        )
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        if queue.get(timeout=120) != "ready":
            raise RuntimeError("HTTP load client did not start")
    if start is not None:
        start()
    go.set()
    watcher = None
    if stop is not None and until is not None:
        watch_stop, watch_until = stop, until

        def watch() -> None:
            while not watch_until() and not watch_stop.is_set():
                time.sleep(0.01)
            watch_stop.set()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
    started = time.perf_counter()
    results = [item for _ in procs for item in queue.get(timeout=900)]
    elapsed = time.perf_counter() - started
    if stop is not None:
        stop.set()  # every client has answered: end the watcher too
    if watcher is not None:
        watcher.join()
    for p in procs:
        p.join()
    by_path: dict[str, list[float]] = {p: [] for p in order}
    errors = 0
    for latencies, errs in results:
        errors += errs
        for path, values in latencies.items():
            by_path[path].extend(values)
    total = sum(len(v) for v in by_path.values())
    out: dict[str, Any] = {
        "requests": total,
        "errors": errors,
        "seconds": round(elapsed, 3),
        "requests_per_second": round(total / elapsed, 1),
        "connections": processes * threads,
    }
    for label, path in paths.items():
        values = by_path[path]
        out[label] = {
            "p50_ms": round(median(values) * 1000, 2),
            "p99_ms": round(percentile(values, 99) * 1000, 2),
        }
    return out


def timed_get(port: int, path: str, count: int) -> dict[str, Any]:
    """``count`` sequential GETs on one connection: p50/p99/max ms and the body size."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    times = []
    size = 0
    for _ in range(count):
        t0 = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        times.append((time.perf_counter() - t0) * 1000)
        if resp.status != 200:
            raise RuntimeError(f"GET {path}: {resp.status} {body[:200]!r}")
        size = len(body)
    conn.close()
    return {
        "p50_ms": round(median(times), 2),
        "p99_ms": round(percentile(times, 99), 2),
        "first_ms": round(times[0], 2),
        "bytes": size,
    }


def get_body(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("GET", path)
    body = conn.getresponse().read()
    conn.close()
    return body


class CannedServer:
    """The load generator's own ceiling: an asyncio server answering canned bytes.

    It parses nothing but the end of each request's headers and answers the
    pre-rendered body for that path, so nearly all the CPU per request is
    the client's: req/s against it is what the generator can send at most.
    """

    def __init__(self, bodies: dict[str, bytes]) -> None:
        answers = {
            path.encode(): b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
            for path, body in bodies.items()
        }
        missing = b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}"

        class Answer(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                assert isinstance(transport, asyncio.Transport)
                self.transport = transport
                self.buf = b""

            def data_received(self, data: bytes) -> None:
                self.buf += data
                while (end := self.buf.find(b"\r\n\r\n")) >= 0:
                    head, self.buf = self.buf[:end], self.buf[end + 4 :]
                    path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
                    self.transport.write(answers.get(path, missing))

        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(self.loop.create_server(Answer, "127.0.0.1", 0))
        self.port = int(self.server.sockets[0].getsockname()[1])
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.server.close()
        self.loop.close()
