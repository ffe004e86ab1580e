"""The real daemon under systemd's protocols: sd_notify, watchdog, reload, journald, retention."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from support import (
    REPO,
    DaemonProcess,
    csv_bytes,
    drop_folder,
    iter_lines,
    wait_until,
    write_config,
)

#: WATCHDOG_USEC for the tests: systemd's timeout; batchd pings at half of it.
WATCHDOG_USEC = 400_000
PING_SECONDS = WATCHDOG_USEC / 2 / 1_000_000


class NotifyListener:
    """The service manager's side of sd_notify: a datagram socket that records
    each assignment (``READY=1``, ``WATCHDOG=1`` …) with the time it arrived."""

    def __init__(self, path: Path, on_ready: Callable[[], None] = lambda: None) -> None:
        self.path = path
        self.on_ready = on_ready
        self._lock = threading.Lock()
        self._messages: list[tuple[float, str]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        ready_seen = False
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            at = time.monotonic()
            lines = data.decode().split("\n")
            if "READY=1" in lines and not ready_seen:
                ready_seen = True
                self.on_ready()  # sees the daemon as it is when READY arrives
            with self._lock:
                self._messages += [(at, line) for line in lines if line]

    def lines(self) -> list[str]:
        with self._lock:
            return [line for _, line in self._messages]

    def times(self, line: str) -> list[float]:
        with self._lock:
            return [at for at, got in self._messages if got == line]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


@pytest.fixture
def notify_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder for the notify socket whose path fits in sun_path (108 bytes)."""
    if len(str(tmp_path / "notify.sock")) < 100:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="batchd-notify-"))
    yield short
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_inherited_systemd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon sees only the systemd variables a test gives it."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"):
        monkeypatch.delenv(name, raising=False)


def _spool_complete(spool: Path) -> bool:
    folders = ["inbox/high", "inbox/normal", "inbox/low", "work/normal", "outbox", "archive"]
    return all((spool / f).is_dir() for f in folders) and (spool / "state/batchd.db").is_file()


def _processing(d: DaemonProcess) -> int:
    conn = d.db()
    try:
        row = conn.execute("SELECT COUNT(*) FROM batch_files WHERE status = 'processing'")
        return int(row.fetchone()[0])
    finally:
        conn.close()


# -- sd_notify -----------------------------------------------------------------


def test_notify_sequence_ready_watchdog_status_stopping(tmp_path: Path, notify_dir: Path) -> None:
    """READY=1 after the spool exists, WATCHDOG=1 at half WATCHDOG_USEC, STATUS=, STOPPING=1."""
    # poll_seconds is the default 1 s: the pings must not wait for an idle loop turn.
    d = DaemonProcess(tmp_path, processing={"poll_seconds": 1.0})
    at_ready: dict[str, bool] = {}
    listener = NotifyListener(
        notify_dir / "notify.sock", lambda: at_ready.update(spool=_spool_complete(d.spool))
    )
    try:
        d.start(wait=False, NOTIFY_SOCKET=str(listener.path), WATCHDOG_USEC=str(WATCHDOG_USEC))
        wait_until(lambda: "READY=1" in listener.lines(), 30, what=f"READY=1\n{d.log()}")
        assert at_ready == {"spool": True}
        assert d.events("recovery_done"), "READY=1 came before recovery"

        first = wait_until(lambda: listener.times("WATCHDOG=1"), what="a first WATCHDOG=1")[0]
        window = 2.0
        wait_until(
            lambda: time.monotonic() > first + window, window + 5, what="the counting window"
        )
        pings = [t for t in listener.times("WATCHDOG=1") if first <= t < first + window]
        expected = window / PING_SECONDS  # 10
        assert expected * 0.4 <= len(pings) <= expected * 1.3, pings

        status = wait_until(
            lambda: [line for line in listener.lines() if line.startswith("STATUS=")],
            what="STATUS=",
        )
        assert "pending" in status[0], status

        (d.inbox() / "f.csv").write_bytes(csv_bytes(1))
        assert d.wait_batch("f.csv")["batch"]["status"] == "completed"
        assert d.stop() == 0
        lines = listener.lines()
        assert "STOPPING=1" in lines
        assert lines.index("READY=1") < lines.index("STOPPING=1")
    finally:
        d.stop()
        listener.close()


def test_ready_only_once_http_answers(tmp_path: Path, notify_dir: Path) -> None:
    """With HTTP on, /healthz already answers 200 when READY=1 arrives."""
    if not (REPO / "batchd" / "http.py").exists():
        pytest.skip("batchd/http.py does not exist yet (being written separately)")
    port_file = tmp_path / "port"
    d = DaemonProcess(tmp_path, http={"enabled": True, "port": 0})
    at_ready: dict[str, Any] = {}

    def probe() -> None:
        at_ready["spool"] = _spool_complete(d.spool)
        # Logged (and flushed) by the daemon when the HTTP process's Serving
        # message came, before READY=1: its accept loop runs, nothing waits
        # in the backlog for the child's start-up.
        at_ready["serving"] = bool(d.events("http_process_serving"))
        try:
            port = int(port_file.read_text())
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                at_ready["healthz"] = (r.status, json.loads(r.read())["status"])
        except (OSError, ValueError) as exc:
            at_ready["healthz"] = repr(exc)

    listener = NotifyListener(notify_dir / "notify.sock", probe)
    try:
        d.start(NOTIFY_SOCKET=str(listener.path), BATCHD_PORT_FILE=str(port_file))
        wait_until(lambda: "READY=1" in listener.lines(), 30, what=f"READY=1\n{d.log()}")
        assert at_ready == {"spool": True, "serving": True, "healthz": (200, "ok")}
        assert not d.events("http_not_serving_at_ready")
        assert d.stop() == 0
    finally:
        d.stop()
        listener.close()


def test_ready_sent_at_deadline_when_http_never_serves(tmp_path: Path, notify_dir: Path) -> None:
    """HTTP never serving: READY=1 at http.ready_timeout_seconds, logged; files still flow."""
    d = DaemonProcess(tmp_path, http={"enabled": True, "port": 0, "ready_timeout_seconds": 1.0})
    listener = NotifyListener(notify_dir / "notify.sock")
    try:
        # Armed in the daemon's environment, so in its HTTP child too: the
        # child hangs before it serves (a real child, stuck in its start-up).
        d.start(wait=False, NOTIFY_SOCKET=str(listener.path), BATCHD_HANG_AT="http_before_serving")
        wait_until(lambda: "READY=1" in listener.lines(), 30, what=f"READY=1\n{d.log()}")
        (late,) = d.events("http_not_serving_at_ready")
        assert late["timeout_seconds"] == 1.0
        assert not d.events("http_process_serving")
        (d.inbox() / "f.csv").write_bytes(csv_bytes(1))
        assert d.wait_batch("f.csv")["batch"]["status"] == "completed"
        assert d.stop() == 0
    finally:
        d.stop()
        listener.close()


def test_sigterm_during_the_ready_wait_stops_the_daemon(tmp_path: Path, notify_dir: Path) -> None:
    """A SIGTERM while start-up waits for an HTTP process that never serves ends the wait:
    the daemon stops cleanly, not after http.ready_timeout_seconds."""
    # Far past the stop deadline below: only an ended wait lets it exit in time.
    d = DaemonProcess(tmp_path, http={"enabled": True, "port": 0, "ready_timeout_seconds": 600.0})
    listener = NotifyListener(notify_dir / "notify.sock")
    try:
        d.start(wait=False, NOTIFY_SOCKET=str(listener.path), BATCHD_HANG_AT="http_before_serving")
        wait_until(lambda: d.events("http_process_started"), 30, what=f"HTTP child\n{d.log()}")
        assert d.stop(timeout=60) == 0
        assert d.events("http_ready_wait_stopped")
        assert not d.events("http_not_serving_at_ready")
    finally:
        d.stop()
        listener.close()


def test_watchdog_pings_stop_when_scheduler_is_wedged(tmp_path: Path, notify_dir: Path) -> None:
    """A scheduler loop stuck in a turn stops the WATCHDOG=1 pings while the process lives."""
    d = DaemonProcess(tmp_path)
    listener = NotifyListener(notify_dir / "notify.sock")
    try:
        d.start(
            NOTIFY_SOCKET=str(listener.path),
            WATCHDOG_USEC=str(WATCHDOG_USEC),
            BATCHD_HANG_AT="scheduler_turn",
            BATCHD_HANG_AFTER_SECONDS="1.5",
        )
        silence = 8 * PING_SECONDS

        def quiet_after_pings() -> bool:
            pings = listener.times("WATCHDOG=1")
            return len(pings) >= 2 and time.monotonic() - pings[-1] > silence

        wait_until(quiet_after_pings, 20, what="the pings to stop")
        assert d.proc is not None and d.proc.poll() is None, "the wedged daemon should still run"
        assert "READY=1" in listener.lines()
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.kill()  # wedged: SIGTERM would wait on the stuck loop
        listener.close()


# -- SIGHUP reload ---------------------------------------------------------------


class Sampler:
    """Counts processing files in the database every few milliseconds, in a thread."""

    def __init__(self, d: DaemonProcess) -> None:
        self.d = d
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.03):
            self.samples.append((time.monotonic(), _processing(self.d)))

    def peak(self, since: float = 0.0, until: float = float("inf")) -> int:
        return max((n for t, n in list(self.samples) if since <= t < until), default=0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


def test_sighup_changes_concurrency_live(tmp_path: Path, notify_dir: Path) -> None:
    """SIGHUP raising concurrency 1 to 3 runs three files at once; lowering it kills no file."""
    d = DaemonProcess(
        tmp_path, processing={"processor": "batchd.testing.procs:sleepy", "concurrency": 1}
    )
    listener = NotifyListener(notify_dir / "notify.sock")
    sampler: Sampler | None = None

    def reload(concurrency: int) -> float:
        d.sections["processing"]["concurrency"] = concurrency
        write_config(d.config, d.sections)
        at = time.monotonic()
        d.signal(signal.SIGHUP)
        return at

    try:
        d.start(NOTIFY_SOCKET=str(listener.path), BATCHD_TEST_DELAY="0.5")
        files = {f"f{i:02d}.csv": csv_bytes(i) for i in range(12)}
        drop_folder(d.inbox() / "b", files, tmp_path / "staging")
        sampler = Sampler(d)
        order = d.state / "order.log"
        wait_until(lambda: len(list(iter_lines(order))) >= 2, 20, what="two files done")
        assert sampler.peak() == 1

        raised_at = reload(3)
        wait_until(lambda: sampler.peak(since=raised_at) == 3, 15, what="3 files at once")
        assert sampler.peak(until=raised_at) == 1
        assert [e["concurrency"] for e in d.events("config_reloaded")] == [3]
        lines = listener.lines()
        reloading = next(i for i, line in enumerate(lines) if line.startswith("RELOADING=1"))
        assert "READY=1" in lines[reloading:]

        reload(1)
        wait_until(lambda: len(d.events("config_reloaded")) == 2, what="the second reload")
        # From when the reload is known applied: until then the loop may still
        # refill at 3 (the reload itself takes a while: settings, tokens, the
        # HTTP process told), and a sample of 1 taken then is no sign of it.
        lowered_at = time.monotonic()
        status = d.wait_batch("b", 30)
        assert status["batch"]["status"] == "completed"
        assert {(f["status"], f["attempts"]) for f in status["files"]} == {("completed", 1)}
        assert sorted(iter_lines(order)) == sorted(files)
        # Running files finish; then no more than one runs at a time.
        settled = next(t for t, n in list(sampler.samples) if t >= lowered_at and n <= 1)
        assert sampler.peak(since=settled) == 1
        assert sampler.peak() == 3
    finally:
        if sampler is not None:
            sampler.close()
        d.stop()
        listener.close()


def test_sighup_with_bad_config_keeps_running(tmp_path: Path) -> None:
    """A bad config on reload is refused with one event; a changed spool.root needs a restart."""
    d = DaemonProcess(
        tmp_path, processing={"processor": "batchd.testing.procs:by_name", "concurrency": 2}
    )
    try:
        d.start()
        good = json.loads(json.dumps(d.sections))
        bad = json.loads(json.dumps(good))
        bad["processing"]["concurrency"] = "x"
        write_config(d.config, bad)
        d.signal(signal.SIGHUP)
        refused = wait_until(lambda: d.events("reload_refused"), what="reload_refused")
        assert len(refused) == 1
        assert "processing.concurrency" in refused[0]["error"]
        assert refused[0]["level"] == "error"
        assert d.proc is not None and d.proc.poll() is None
        assert not d.events("config_reloaded")
        (d.inbox() / "after-bad.csv").write_bytes(csv_bytes(1))
        assert d.wait_batch("after-bad.csv")["batch"]["status"] == "completed"

        moved = json.loads(json.dumps(good))
        moved["spool"]["root"] = str(tmp_path / "elsewhere")
        write_config(d.config, moved)
        d.signal(signal.SIGHUP)
        needs = wait_until(lambda: d.events("reload_needs_restart"), what="reload_needs_restart")
        assert [(e["key"], e["new"]) for e in needs] == [
            ("spool.root", str(tmp_path / "elsewhere"))
        ]
        wait_until(lambda: d.events("config_reloaded"), what="config_reloaded")
        (d.inbox() / "after-move.csv").write_bytes(csv_bytes(2))
        assert d.wait_batch("after-move.csv")["batch"]["status"] == "completed"
        assert not (tmp_path / "elsewhere").exists()
        assert d.stop() == 0
    finally:
        d.stop()


# -- journald --------------------------------------------------------------------

_HAS_SYSTEMD_PYTHON = importlib.util.find_spec("systemd") is not None
_JOURNALD_RUNNING = (
    Path("/run/systemd/journal/socket").exists() and shutil.which("journalctl") is not None
)

FAKE_JOURNAL = '''
"""Stand-in for systemd.journal: records each send() as a JSON line."""
import json, os

def send(**fields):
    with open(os.environ["BATCHD_TEST_JOURNAL"], "a") as fh:
        fh.write(json.dumps(fields) + "\\n")
'''


def _start_on_journal_stream(d: DaemonProcess, **env: str) -> None:
    """Start the daemon with JOURNAL_STREAM naming the file its stderr goes to."""
    log_path = d.tmp / f"daemon-{d.runs + 1}.log"
    log_path.touch()  # start() reopens it with "wb": same inode
    st = log_path.stat()
    d.start(wait=False, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}", **env)
    assert d.log_path == log_path
    proc = d.proc
    assert proc is not None
    wait_until(lambda: d.inbox().is_dir() or proc.poll() is not None, 30, what="the spool")


def _json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


@pytest.mark.skipif(not _HAS_SYSTEMD_PYTHON, reason="systemd-python (batchd[systemd]) missing")
def test_journal_stream_sends_events_to_journal_not_stderr(tmp_path: Path) -> None:
    """Under a matching JOURNAL_STREAM with systemd-python, no JSON event lines go to stderr."""
    d = DaemonProcess(tmp_path, log={"format": "auto", "level": "debug"})
    try:
        _start_on_journal_stream(d)
        (d.inbox() / "j.csv").write_bytes(csv_bytes(1))
        assert d.wait_batch("j.csv")["batch"]["status"] == "completed"
        assert d.stop() == 0
        assert _json_lines(d.log()) == []
        assert "batch_finished" not in d.log()
    finally:
        d.stop()


def test_journal_fields_per_event(tmp_path: Path) -> None:
    """Each event reaches systemd.journal.send with BATCH_ID, FILE_ID, EVENT and its PRIORITY."""
    fake = tmp_path / "fakesys"
    (fake / "systemd").mkdir(parents=True)
    (fake / "systemd" / "__init__.py").write_text("")
    (fake / "systemd" / "journal.py").write_text(FAKE_JOURNAL)
    journal = tmp_path / "journal.jsonl"
    d = DaemonProcess(
        tmp_path,
        processing={"processor": "batchd.testing.procs:bad_content"},
        log={"format": "auto", "level": "info"},
    )
    try:
        _start_on_journal_stream(
            d,
            BATCHD_TEST_JOURNAL=str(journal),
            PYTHONPATH=os.pathsep.join([str(fake), d.env()["PYTHONPATH"]]),
        )
        (d.inbox() / "bad.csv").write_bytes(csv_bytes(1))
        status = d.wait_batch("bad.csv")
        assert d.stop() == 0
        batch_id = status["batch"]["id"]
        file_id = status["files"][0]["id"]
        entries = [json.loads(line) for line in iter_lines(journal)]
        assert _json_lines(d.log()) == []
        assert {e["EVENT"] for e in entries} >= {"daemon_started", "file_failed", "batch_finished"}
        assert all(e["SYSLOG_IDENTIFIER"] == "batchd" for e in entries)
        failed = next(e for e in entries if e["EVENT"] == "file_failed")
        assert (failed["BATCH_ID"], failed["FILE_ID"], failed["PRIORITY"]) == (
            batch_id,
            file_id,
            "4",
        )
        assert failed["MESSAGE"].startswith("file_failed ")
        finished = next(e for e in entries if e["EVENT"] == "batch_finished")
        assert (finished["BATCH_ID"], finished["PRIORITY"]) == (batch_id, "6")
        assert {e["PRIORITY"] for e in entries} <= {"3", "4", "6"}
    finally:
        d.stop()


@pytest.mark.skipif(not _HAS_SYSTEMD_PYTHON, reason="systemd-python (batchd[systemd]) missing")
@pytest.mark.skipif(not _JOURNALD_RUNNING, reason="no journald running on this machine")
def test_journalctl_finds_one_batch(tmp_path: Path) -> None:
    """`journalctl BATCH_ID=<id>` lists that batch's events when a journald runs."""
    d = DaemonProcess(tmp_path, log={"format": "auto", "level": "info"})
    try:
        _start_on_journal_stream(d)
        (d.inbox() / "q.csv").write_bytes(csv_bytes(1))
        batch_id = d.wait_batch("q.csv")["batch"]["id"]

        def found() -> set[str]:
            out = subprocess.run(
                ["journalctl", "-o", "json", f"BATCH_ID={batch_id}"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            return {e.get("EVENT", "") for e in _json_lines(out)}

        wait_until(lambda: "batch_finished" in found(), 10, what="the journal entries")
        assert {"file_completed", "batch_finished"} <= found()
    finally:
        d.stop()


# -- retention -------------------------------------------------------------------


def test_daemon_purges_old_finished_batches_at_start(tmp_path: Path) -> None:
    """retention.days=1 purges a batch finished 2 days ago at start; recent or unfinished stay."""
    d = DaemonProcess(
        tmp_path,
        processing={
            "processor": "batchd.testing.procs:by_name",
            "concurrency": 2,
            "shutdown_grace_seconds": 0,
        },
        retention={"days": 1},
    )
    try:
        d.start()
        for name in ("old.csv", "recent.csv"):
            (d.inbox() / name).write_bytes(csv_bytes(1))
            d.wait_batch(name)
        (d.inbox() / "hang.csv").write_bytes(csv_bytes(2))
        wait_until(lambda: _processing(d) == 1, what="hang.csv to run")
        assert d.stop() == 0

        ids = {}
        long_ago = datetime.now(UTC) - timedelta(days=3)
        two_days = (datetime.now(UTC) - timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        with d.db() as conn:
            for row in conn.execute("SELECT id, name, status FROM batch_jobs"):
                ids[row["name"]] = (row["id"], row["status"])
            conn.execute(
                "UPDATE batch_jobs SET completed_at = ?, created_at = ? WHERE name = 'old.csv'",
                (two_days, two_days),
            )
            conn.execute(
                "UPDATE batch_files SET completed_at = ? WHERE batch_id = ?",
                (two_days, ids["old.csv"][0]),
            )
            # Unfinished, and old by every timestamp: must survive all the same.
            stamp = long_ago.strftime("%Y-%m-%dT%H:%M:%S.000Z")
            conn.execute(
                "UPDATE batch_jobs SET created_at = ?, completed_at = ? WHERE name = 'hang.csv'",
                (stamp, stamp),
            )
        assert ids["hang.csv"][1] not in ("completed", "failed")
        for name in ("old.csv", "recent.csv"):
            assert (d.spool / "outbox" / name).is_dir()
            assert (d.spool / "archive" / name).is_dir()

        d.start()
        purged = wait_until(lambda: d.events("batch_purged"), what="batch_purged")
        assert [e["batch"] for e in purged] == ["old.csv"]
        with d.db() as conn:
            names = {r["name"]: r["status"] for r in conn.execute("SELECT * FROM batch_jobs")}
            orphans = conn.execute(
                "SELECT COUNT(*) FROM batch_files WHERE batch_id = ?", (ids["old.csv"][0],)
            ).fetchone()[0]
        assert set(names) == {"recent.csv", "hang.csv"}
        assert names["recent.csv"] == "completed"
        assert names["hang.csv"] not in ("completed", "failed")
        assert orphans == 0
        assert not (d.spool / "outbox" / "old.csv").exists()
        assert not (d.spool / "archive" / "old.csv").exists()
        assert (d.spool / "outbox" / "recent.csv").is_dir()
        assert (d.spool / "archive" / "recent.csv").is_dir()
        assert (d.spool / "outbox" / "hang.csv").is_dir()
        assert d.stop() == 0
    finally:
        d.stop()
