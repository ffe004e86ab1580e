"""What a sysadmin and a newcomer hit on the first day (issue 14), through the real
``batchd`` command: options before the subcommand, one daemon per spool, exit
73, ``batchd reload``, ``submit``/``watch``, and the CLI's details."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from support import DaemonProcess, csv_bytes, drop_folder, wait_until, write_config

from batchd.cli import build_parser

Completed = subprocess.CompletedProcess[str]


def batchd_command() -> list[str]:
    """The installed ``batchd`` script of this venv (the console entry point)."""
    script = Path(sys.executable).parent / "batchd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "batchd"]


def run(d: DaemonProcess, *args: str, timeout: float = 60, **env: str) -> Completed:
    return subprocess.run(
        [*batchd_command(), *args],
        env=d.env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_config_given_before_the_subcommand_counts(tmp_path: Path) -> None:
    """`batchd --config X jobs` reads X (the subcommand's default no longer overwrites it)."""
    d = DaemonProcess(tmp_path)
    assert run(d, "init").returncode == 0
    env = {k: v for k, v in d.env().items() if k != "BATCHD_CONFIG"}
    done = subprocess.run(
        [*batchd_command(), "--config", str(d.config), "jobs", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_second_daemon_on_the_spool_exits_73_naming_the_pid(tmp_path: Path) -> None:
    """A second `batchd run` on a spool in use exits 73 at once with the holder's PID,
    and the first daemon's running file is not put back to pending."""
    d = DaemonProcess(tmp_path, processing={"processor": "batchd.testing.procs:by_name"}).start()
    try:
        assert d.proc is not None
        drop_folder(d.inbox() / "held", {"victim.csv": csv_bytes(1)}, tmp_path / "stage")
        wait_until(lambda: (d.state / "running-victim.csv").exists(), 30, what="file to run")
        second = run(d, "run")
        assert second.returncode == 73, second.stderr
        # One line for the operator; a structured warning logged before it (no
        # Tesseract on this machine: ocr_unavailable) is the log's, not the error's.
        lines = [ln for ln in second.stderr.strip().splitlines() if not ln.startswith("{")]
        assert len(lines) == 1 and f"pid {d.proc.pid}" in lines[0], second.stderr
        with sqlite3.connect(d.spool / "state" / "batchd.db") as conn:
            statuses = [r[0] for r in conn.execute("SELECT status FROM batch_files")]
        assert statuses == ["processing"]
        assert d.proc.poll() is None
    finally:
        d.stop()


def test_taken_http_port_exits_73_before_recovery(tmp_path: Path) -> None:
    """A taken HTTP port exits 73 (no restart loop) and touches nothing in the spool."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = DaemonProcess(tmp_path, http={"enabled": True, "host": "127.0.0.1", "port": port})
        done = run(d, "run")
    assert done.returncode == 73, done.stderr
    assert f"127.0.0.1:{port}" in done.stderr and "http.port" in done.stderr
    assert "recovery_done" not in done.stdout + done.stderr


def test_unreadable_http_users_file_exits_78_before_recovery(tmp_path: Path) -> None:
    """An http.users_file that cannot be read exits 78 naming it, at start, as before
    the HTTP API moved to its own process (not a daemon serving on while its HTTP
    process dies of it over and over)."""
    missing = tmp_path / "users.txt"
    d = DaemonProcess(tmp_path, http={"enabled": True, "port": 0, "users_file": str(missing)})
    # On the code before, `batchd run` served on (the timeout fails the test).
    done = run(d, "run", timeout=20)
    assert done.returncode == 78, done.stderr
    assert f"http.users_file {missing} cannot be read" in done.stderr
    assert "recovery_done" not in done.stdout + done.stderr
    assert "http_process_died" not in done.stdout + done.stderr


def test_unusable_spool_exits_73(tmp_path: Path) -> None:
    """A spool.root that cannot be a folder (a file is in the way) exits 73."""
    d = DaemonProcess(tmp_path)
    d.spool.write_text("not a folder")
    done = run(d, "run")
    assert done.returncode == 73, done.stderr
    assert str(d.spool) in done.stderr


def test_read_only_spool_is_reported_as_read_only(tmp_path: Path) -> None:
    """A spool on a read-only mount is reported as that, not as "not writable by this user"."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a read-only bind mount")
    d = DaemonProcess(tmp_path)
    assert run(d, "init").returncode == 0
    mount = subprocess.run(
        ["mount", "--bind", "-o", "ro", str(d.spool), str(d.spool)], capture_output=True, text=True
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here: {mount.stderr.strip()}")
    try:
        done = run(d, "run")
    finally:
        subprocess.run(["umount", str(d.spool)], check=True)
    assert done.returncode == 73, done.stderr
    assert "read-only" in done.stderr and "not writable by this user" not in done.stderr


def test_reload_reports_the_daemons_verdict(tmp_path: Path) -> None:
    """`batchd reload` exits 0 when applied, 78 with the reason when refused, 1 with no daemon."""
    d = DaemonProcess(tmp_path)
    assert run(d, "init").returncode == 0
    none = run(d, "reload", "--timeout", "5")
    assert none.returncode == 1 and "no daemon" in none.stderr
    d.start()
    try:
        write_config(d.config, {**d.sections, "processing": {"concurrency": 2}})
        applied = run(d, "reload")
        assert applied.returncode == 0, applied.stderr
        assert "reloaded" in applied.stdout
        wait_until(lambda: d.events("config_reloaded"), 10, what="config_reloaded")
        sections = {**d.sections, "processing": {"concurrency": "lots"}}
        write_config(d.config, sections)
        refused = run(d, "reload")
        assert refused.returncode == 78, refused.stdout + refused.stderr
        assert "processing.concurrency" in refused.stderr and "refused" in refused.stderr
        assert d.proc is not None and d.proc.poll() is None
    finally:
        d.stop()


def test_submit_prints_the_batch_it_created_and_watch_follows_it(tmp_path: Path) -> None:
    """When a name is taken, submit prints the new batch (name.2) and `--wait` follows it."""
    d = DaemonProcess(tmp_path).start()
    try:
        src = tmp_path / "src"
        src.mkdir()
        (src / "a.csv").write_bytes(csv_bytes(1))
        first = run(d, "submit", str(src), "--json")
        assert first.returncode == 0, first.stderr
        assert json.loads(first.stdout)[0]["batch"] == "src"
        d.wait_batch("src")
        second = run(d, "submit", str(src), "--wait", "--timeout", "60")
        assert second.returncode == 0, second.stderr
        match = re.search(r"-> batch (\S+) \(id ([0-9a-f-]{36})\)", second.stdout)
        assert match is not None and match.group(1) == "src.2", second.stdout
        assert "1 completed, 0 failed" in second.stdout
        status = d.status("src.2")
        assert status is not None and status["batch"]["id"] == match.group(2)
    finally:
        d.stop()


def test_submit_gives_the_group_write_on_its_copy(tmp_path: Path) -> None:
    """Copies of a 0750 folder and 0640 files get group write, so batchd can claim them."""
    d = DaemonProcess(tmp_path)
    assert run(d, "init").returncode == 0
    src = tmp_path / "private"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.csv").write_bytes(csv_bytes(1))
    for path, mode in ((src, 0o750), (src / "sub", 0o750), (src / "sub" / "a.csv", 0o640)):
        os.chmod(path, mode)
    done = run(d, "submit", str(src), "--no-wait")
    assert done.returncode == 0, done.stderr
    copy = d.inbox() / "private"
    for path in (copy, copy / "sub", copy / "sub" / "a.csv"):
        mode = path.stat().st_mode
        assert mode & stat.S_IWGRP and mode & stat.S_IRGRP, (path, oct(mode))
    assert (copy / "sub").stat().st_mode & stat.S_IXGRP


def test_watch_of_a_missing_batch_says_so_and_times_out_with_124(tmp_path: Path) -> None:
    """`watch` of a name that does not exist says so and gives up at --timeout with exit 124."""
    d = DaemonProcess(tmp_path)
    assert run(d, "init").returncode == 0
    done = run(d, "watch", "nosuch", "--timeout", "1", "--interval", "0.1")
    assert done.returncode == 124, done.stderr
    assert "no batch" in done.stderr and "nosuch" in done.stderr
    assert "timed out" in done.stderr


def test_show_watch_retry_take_a_name_or_id_prefix_and_count_failed_apart(
    tmp_path: Path,
) -> None:
    """show/watch/retry accept a unique id prefix and a name; DONE and show count
    completed and failed files apart."""
    d = DaemonProcess(
        tmp_path, processing={"processor": "batchd.testing.procs:by_name", "max_retries": 0}
    ).start()
    try:
        drop_folder(
            d.inbox() / "pair",
            {"ok.csv": csv_bytes(1), "die.csv": csv_bytes(2)},
            tmp_path / "stage",
        )
        d.wait_batch("pair")
        batch_id = json.loads(run(d, "jobs", "--json").stdout)[0]["id"]
        prefix = batch_id[:8]
        shown = run(d, "show", prefix)
        assert shown.returncode == 0, shown.stderr
        assert "1 completed, 1 failed" in shown.stdout
        jobs = run(d, "jobs").stdout.splitlines()
        header, row = jobs[0].split(), jobs[1].split()
        assert row[header.index("DONE")] == "1/2" and row[header.index("FAILED")] == "1"
        assert run(d, "watch", prefix, "--timeout", "10").returncode == 1
        retried = run(d, "retry", "pair", "--json")
        assert json.loads(retried.stdout) == {"requeued": 1}, retried.stderr
    finally:
        d.stop()


def test_json_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    """`batchd jobs --json | head` whose reader left prints no BrokenPipeError traceback."""
    d = DaemonProcess(tmp_path)
    assert run(d, "init").returncode == 0
    proc = subprocess.Popen(
        [*batchd_command(), "jobs", "--json"],
        env=d.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before batchd writes
    stderr = proc.stderr.read().decode()
    proc.wait(60)
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_every_option_has_help_text_with_its_default() -> None:
    """Every option of every subcommand has help, and help shows its default."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        text = sub.format_help()
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"batchd {name} {action.option_strings[0]} has no help"
            if action.default not in (None, False, argparse.SUPPRESS) and not action.required:
                shown = f"(default: {action.default})"
                assert shown in " ".join(text.split()), (
                    f"batchd {name} {action.option_strings[0]} does not show its default"
                )


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    """A bad BATCHD_* value is reported with the variable's name."""
    d = DaemonProcess(tmp_path)
    done = run(d, "jobs", BATCHD_PROCESSING__CONCURRENCY="lots")
    assert done.returncode == 78
    assert "BATCHD_PROCESSING__CONCURRENCY" in done.stderr, done.stderr


def test_second_interrupt_ends_the_drain(tmp_path: Path) -> None:
    """The first Ctrl-C says a second one stops at once; the second ends the drain."""
    d = DaemonProcess(
        tmp_path,
        processing={"processor": "batchd.testing.procs:by_name", "shutdown_grace_seconds": 120},
    ).start()
    assert d.proc is not None
    drop_folder(d.inbox() / "long", {"hang.csv": csv_bytes(1)}, tmp_path / "stage")

    def running() -> bool:
        with sqlite3.connect(d.spool / "state" / "batchd.db") as conn:
            rows = conn.execute("SELECT 1 FROM batch_files WHERE status = 'processing'")
            return bool(rows.fetchall())

    wait_until(running, 30, what="the file to run")
    d.signal(signal.SIGINT)
    requested = wait_until(lambda: d.events("shutdown_requested"), 10, what="shutdown_requested")
    assert "again" in requested[0]["detail"]
    wait_until(lambda: d.events("shutdown_draining"), 10, what="the drain to start")
    d.signal(signal.SIGINT)
    assert d.proc.wait(30) == 0  # long before the 120 s grace
    assert d.events("shutdown_forced")
    with sqlite3.connect(d.spool / "state" / "batchd.db") as conn:
        assert [r[0] for r in conn.execute("SELECT status FROM batch_files")] == ["pending"]


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


#: prctl(2) option: orphans of our children become our children (not init's).
PR_SET_CHILD_SUBREAPER = 36


def _subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        pytest.skip(f"prctl(PR_SET_CHILD_SUBREAPER) failed: errno {ctypes.get_errno()}")


def test_resource_tracker_ends_with_the_daemon(tmp_path: Path) -> None:
    """multiprocessing's resource tracker is stopped and reaped by the daemon itself,
    not left behind for systemd to SIGKILL."""
    # As subreaper, a tracker that outlives the daemon becomes our child
    # (running, or a zombie we have not reaped): /proc still shows it. One
    # the daemon stopped and reaped before exiting is gone.
    _subreaper(True)
    try:
        d = DaemonProcess(tmp_path).start()
        assert d.proc is not None

        def tracker() -> int | None:
            for child in _children(d.proc.pid):  # type: ignore[union-attr]
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                if b"resource_tracker" in cmdline:
                    return child
            return None

        pid = wait_until(tracker, 20, what="the resource tracker to start")
        assert d.stop() == 0
        left = Path(f"/proc/{pid}").exists()
    finally:
        _subreaper(False)
    if left:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    assert not left, "the resource tracker outlived the daemon"
