"""The HTTP API served from its own process (batchd/httpproc.py): a child of the
daemon, replaced when it dies, reconfigured on reload, stopped with the daemon,
asking the daemon over its pipe for health, the inbox and the daemon's metrics."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from formdata import multipart
from prometheus_client.parser import text_string_to_metric_families
from support import DaemonProcess, csv_bytes, drop_folder, wait_until, write_config

from batchd.testing.faults import CRASH_EXIT_CODE
from batchd.testing.launcher import children

TOKEN_A = "token-a-0123456789abcdef"
TOKEN_B = "token-b-0123456789abcdef"


def get(port: int, path: str, token: str | None = None) -> tuple[int, Any]:
    """GET ``path``: the status and, for JSON, the decoded body (else the text)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            status, body, ctype = resp.status, resp.read(), resp.headers["content-type"]
    except urllib.error.HTTPError as exc:
        status, body, ctype = exc.code, exc.read(), exc.headers["content-type"]
    if ctype.startswith("application/json"):
        return status, json.loads(body)
    return status, body.decode()


def start(
    tmp_path: Path, env: dict[str, str] | None = None, **sections: dict[str, Any]
) -> tuple[DaemonProcess, int]:
    """A daemon with HTTP on an ephemeral port (``env`` added to its environment):
    the daemon and the port."""
    port_file = tmp_path / "port"
    http = {"enabled": True, "port": 0, "token": TOKEN_A} | sections.pop("http", {})
    d = DaemonProcess(tmp_path, http=http, **sections)
    d.start(BATCHD_PORT_FILE=str(port_file), **(env or {}))
    port = int(wait_until(port_file.read_text, 10, what="HTTP port"))
    return d, port


def http_pids(d: DaemonProcess) -> list[int]:
    """The pids of every HTTP process the daemon started, in order."""
    return [e["pid"] for e in d.events("http_process_started")]


def parent_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid in /proc/{pid}/status")


def test_http_is_served_by_a_child_process_of_the_daemon(tmp_path: Path) -> None:
    """The HTTP API answers from a process of its own, a child of the daemon."""
    d, port = start(tmp_path)
    try:
        assert get(port, "/healthz")[0] == 200
        [pid] = wait_until(lambda: http_pids(d), 10, what="http_process_started")
        assert pid != d.pid
        assert pid in children(d.pid)
        assert parent_of(pid) == d.pid
        # The listening socket is the child's too (the daemon binds it, the child accepts).
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert any(i.startswith("socket:") for i in inodes)
    finally:
        assert d.stop() == 0


def test_sigkilled_http_process_is_replaced_and_serves_again(tmp_path: Path) -> None:
    """A SIGKILLed HTTP process is logged (http_process_died) and replaced on the same port."""
    d, port = start(tmp_path)
    try:
        assert get(port, "/healthz")[0] == 200
        [first] = http_pids(d)
        os.kill(first, signal.SIGKILL)
        died = wait_until(lambda: d.events("http_process_died"), 10, what="http_process_died")
        assert died[0]["pid"] == first and died[0]["signal"] == "SIGKILL"
        pids = wait_until(lambda: http_pids(d)[1:], 10, what="a new HTTP process")
        assert pids[0] != first and pids[0] in children(d.pid)
        status, health = get(port, "/healthz")
        assert status == 200
        # The daemon's uptime, not the new process's.
        assert health["data"]["uptime_seconds"] >= died[0]["lived_seconds"]
        assert get(port, "/api/batch/jobs", TOKEN_A)[0] == 200
    finally:
        assert d.stop() == 0


def test_reload_reaches_the_http_process(tmp_path: Path) -> None:
    """A changed http.token applies in the HTTP process after SIGHUP: the new one is
    accepted, the old one refused."""
    d, port = start(tmp_path)
    try:
        assert get(port, "/api/batch/jobs", TOKEN_A)[0] == 200
        assert get(port, "/api/batch/jobs", TOKEN_B)[0] == 401
        d.sections["http"]["token"] = TOKEN_B
        write_config(d.config, d.sections)
        d.signal(signal.SIGHUP)
        wait_until(lambda: d.events("config_reloaded"), 10, what="config_reloaded")
        wait_until(
            lambda: get(port, "/api/batch/jobs", TOKEN_B)[0] == 200, 10, what="the new token"
        )
        assert get(port, "/api/batch/jobs", TOKEN_A)[0] == 401
    finally:
        assert d.stop() == 0


def test_stopping_the_daemon_ends_the_http_process(tmp_path: Path) -> None:
    """SIGTERM to the daemon stops its HTTP process gracefully (http_stopped) and reaps it."""
    d, port = start(tmp_path)
    assert get(port, "/healthz")[0] == 200
    [pid] = http_pids(d)
    assert d.stop() == 0
    assert not Path(f"/proc/{pid}").exists()
    assert d.events("http_stopped")
    assert not d.events("http_process_killed")


def test_metrics_has_the_daemon_and_http_families_once_each(tmp_path: Path) -> None:
    """/metrics is valid Prometheus text: the daemon's families (asked over the pipe)
    and the HTTP process's, each family exactly once."""
    d, port = start(tmp_path)
    try:
        drop_folder(d.inbox() / "drop", {"a.csv": csv_bytes(1)}, tmp_path / "staging")
        d.wait_batch("drop")
        assert get(port, "/api/batch/jobs", TOKEN_A)[0] == 200
        status, text = get(port, "/metrics", TOKEN_A)
        assert status == 200
        families = list(text_string_to_metric_families(text))
        counts = Counter(f.name for f in families)
        assert counts and set(counts.values()) == {1}, counts
        by_name = {f.name: f for f in families}
        # the daemon's: counted by its scheduler and pool
        finished = by_name["batchd_files_finished"].samples
        assert any(s.labels.get("status") == "completed" and s.value == 1 for s in finished)
        assert by_name["batchd_workers"].samples[0].value >= 1
        # the HTTP process's: its own answers and the database it reads
        answered = by_name["batchd_http_requests"].samples
        assert any(
            s.labels.get("route") == "jobs" and s.labels.get("code") == "200" for s in answered
        )
        assert "batchd_http_connections" in by_name
        files = by_name["batchd_files"].samples
        assert any(
            s.labels == {"status": "completed", "priority": "normal"} and s.value == 1
            for s in files
        )
    finally:
        assert d.stop() == 0


def test_healthz_in_the_http_process_reports_the_daemons_stopped_watcher(tmp_path: Path) -> None:
    """While a stop waits for a running file, the daemon's watcher is stopped: /healthz,
    answered by the HTTP process, says so (503) from the daemon's problems()."""
    d, port = start(tmp_path, processing={"processor": "batchd.testing.procs:hang"})
    try:
        drop_folder(d.inbox() / "drop", {"a.csv": csv_bytes(1)}, tmp_path / "staging")
        wait_until(
            lambda: (
                d.db().execute("SELECT 1 FROM batch_files WHERE status='processing'").fetchone()
            ),
            20,
            what="a file processing",
        )
        assert get(port, "/healthz")[0] == 200
        d.signal(signal.SIGTERM)

        def unhealthy() -> dict[str, Any] | None:
            status, body = get(port, "/healthz")
            return body if status == 503 else None

        body = wait_until(unhealthy, 10, what="/healthz 503")
        assert body["problems"]["watcher"] == "watcher thread is not running"
    finally:
        d.kill(workers=True)


def test_healthz_is_503_when_the_daemon_does_not_answer_in_time(tmp_path: Path) -> None:
    """A daemon that does not answer within http.daemon_answer_timeout_seconds (here
    SIGSTOPped) makes /healthz 503 naming the setting; it recovers once the daemon runs."""
    d, port = start(tmp_path, http={"daemon_answer_timeout_seconds": 0.5})
    try:
        assert get(port, "/healthz")[0] == 200
        d.signal(signal.SIGSTOP)
        try:
            # The answer before the stop may be reused for ANSWER_MAX_AGE_SECONDS.
            body = wait_until(
                lambda: (answer := get(port, "/healthz"))[0] == 503 and answer[1],
                10,
                what="/healthz 503",
            )
        finally:
            d.signal(signal.SIGCONT)
        assert "http.daemon_answer_timeout_seconds" in body["problems"]["daemon"]
        wait_until(lambda: get(port, "/healthz")[0] == 200, 10, what="/healthz 200 again")
    finally:
        assert d.stop() == 0


def test_http_process_ignores_sigint_and_dies_with_a_sigkilled_daemon(tmp_path: Path) -> None:
    """A Ctrl-C (SIGINT) reaching the HTTP process leaves it serving (the daemon decides);
    a SIGKILLed daemon takes it down (PR_SET_PDEATHSIG), so the port is not held by an orphan."""
    d, port = start(tmp_path)
    try:
        assert get(port, "/healthz")[0] == 200
        [pid] = http_pids(d)
        os.kill(pid, signal.SIGINT)
        assert get(port, "/healthz")[0] == 200
        assert http_pids(d) == [pid] and not d.events("http_process_died")
    finally:
        d.kill()

    def gone() -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        return state == "Z"  # killed, waiting for init to reap it

    wait_until(gone, 10, what="the HTTP process to die with the daemon")


def post_upload(port: int, files: list[tuple[str, bytes]]) -> int | None:
    """POST an upload; its status, or None when the connection ended without an answer."""
    body, ctype = multipart(files, {"user_id": "alice"})
    headers = {"Content-Type": ctype, "Authorization": f"Bearer {TOKEN_A}"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/api/batch/upload", body, headers)
        return conn.getresponse().status
    except (http.client.HTTPException, ConnectionError):
        return None
    finally:
        conn.close()


def test_an_upload_cut_off_by_a_dead_http_process_is_registered_without_a_restart(
    tmp_path: Path,
) -> None:
    """The HTTP process dies between moving an upload into work/ and registering it: the
    daemon registers the folder before the next HTTP process starts (as start-up recovery
    would), so it is processed and gets its status.json while the daemon runs on."""
    # The step is in Intake.take_upload, which only the HTTP process runs.
    d, port = start(tmp_path, env={"BATCHD_CRASH_AT": "after_adopt"})
    try:
        assert post_upload(port, [("a.csv", csv_bytes(1))]) is None
        died = wait_until(lambda: d.events("http_process_died"), 10, what="http_process_died")
        assert died[0]["exit_code"] == CRASH_EXIT_CODE
        row = wait_until(
            lambda: d.db().execute("SELECT name FROM batch_jobs").fetchone(),
            20,
            what="the upload registered by the daemon",
        )
        # Logged just after the registration commits: the row can be seen first.
        wait_until(lambda: d.events("orphan_upload_registered"), 10, what="the orphan event")
        assert d.wait_batch(row[0])["batch"]["status"] == "completed"
        assert len(d.events("daemon_started")) == 1
    finally:
        assert d.stop() == 0


def test_a_half_received_upload_of_a_dead_http_process_is_removed(tmp_path: Path) -> None:
    """The HTTP process is SIGKILLed while an upload's body arrives: its half-received
    folder is removed before the next HTTP process starts, not left taking disk space
    until the daemon restarts."""
    d, port = start(tmp_path)
    uploads = d.spool / "work" / ".uploads"
    body, ctype = multipart([("a.csv", b"id,value\n" + b"1,2\n" * 200_000)], {"user_id": "alice"})
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        head = (
            f"POST /api/batch/upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {TOKEN_A}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body[: len(body) // 2])
        wait_until(lambda: uploads.exists() and any(uploads.iterdir()), 20, what="an upload folder")
        [pid] = http_pids(d)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: len(http_pids(d)) == 2, 20, what="a new HTTP process")
        assert list(uploads.iterdir()) == []
    finally:
        sock.close()
        assert d.stop() == 0


def test_a_replaced_http_process_keeps_the_tokens_a_bad_reload_kept(tmp_path: Path) -> None:
    """A reload whose http.users_file cannot be read keeps the tokens read before (as it
    always did); an HTTP process started after that (the last one died) serves with those
    tokens too, instead of dying at its start over and over on the unreadable file."""
    users = tmp_path / "users.txt"
    users.write_text(f"alice {TOKEN_B}\n")
    d, port = start(tmp_path, http={"users_file": str(users)})
    try:
        assert get(port, "/api/batch/jobs", TOKEN_B)[0] == 200
        users.unlink()
        d.signal(signal.SIGHUP)
        wait_until(lambda: d.events("config_reloaded"), 10, what="config_reloaded")
        wait_until(lambda: d.events("http_users_file_unreadable"), 10, what="the reload's error")
        assert get(port, "/api/batch/jobs", TOKEN_B)[0] == 200
        [first] = http_pids(d)
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: len(http_pids(d)) >= 2, 20, what="a new HTTP process")
        assert get(port, "/api/batch/jobs", TOKEN_B)[0] == 200
        assert get(port, "/api/batch/jobs", "not-a-token-0123456789")[0] == 401
        assert len(d.events("http_process_died")) == 1
    finally:
        assert d.stop() == 0
