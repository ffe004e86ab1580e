"""batchd as a service under a real systemd (PID 1 of an nspawn container).

Each test starts from the base config with the service running (the
``service`` fixture) and leaves whatever it broke for the next reset to
repair. Files named ``*slow*`` take the test processor several seconds.
"""

from __future__ import annotations

import re
import textwrap
import time

import pytest
from nspawn import wait_until
from unitctl import CHECKOUT, CONFIG, UNIT, Service, set_key

#: systemd-analyze security's score for the unit; 2.0 and below reads "OK".
MAX_EXPOSURE = 2.0
#: WatchdogSec in deploy/batchd.service, plus RestartSec and a start.
WATCHDOG_RESTART_TIMEOUT_SECONDS = 30 + 5 + 90
#: How long a failed unit is watched for a restart that must not come
#: (RestartSec=5 twice over).
NO_RESTART_SECONDS = 12.0

pytestmark = pytest.mark.timeout(900)


def test_active_via_notify(service: Service) -> None:
    """The unit is Type=notify and active: the daemon sent READY=1 and STATUS= lines."""
    props = service.show("Type", "NotifyAccess", "WatchdogUSec", "StatusText", "Result")
    assert props["Type"] == "notify"
    assert props["NotifyAccess"] == "main"
    assert props["WatchdogUSec"] not in ("", "0", "infinity")
    assert props["Result"] == "success"
    # STATUS= comes only from sd_notify: proof the notify socket works.
    wait_until(lambda: service.show("StatusText")["StatusText"] != "", 30, "a STATUS= line")


def _readme_drop_command() -> str:
    """README's command, in "Dropping files", that copies a folder into the inbox."""
    readme = (CHECKOUT / "README.md").read_text()
    section = readme.split("### Dropping files", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"^([ \t]*)```(?:sh|bash|console)?\n(.*?)^\1```", section, re.M | re.S)
    for _indent, body in blocks:
        # One command per line, "\" continuations joined; comments are not commands.
        for command in textwrap.dedent(body).replace("\\\n", " ").splitlines():
            if "cp " in command and "/var/lib/batchd/inbox/normal" in command:
                return command.split(" #", 1)[0].strip()
    raise AssertionError("README's 'Dropping files' has no cp command into inbox/normal")


def _alice(service: Service, folder: str) -> None:
    """User alice in batchd-drop, with ~/<folder> of two CSVs made under her umask (0022)."""
    box = service.machine
    if box.run(["id", "alice"]).returncode != 0:
        box.run(["useradd", "--create-home", "--shell", "/bin/bash", "alice"], check=True)
        box.run(["usermod", "-aG", "batchd-drop", "alice"], check=True)
    box.run(
        ["runuser", "-l", "alice", "-c",
         f"rm -rf ~/{folder} && mkdir ~/{folder} && printf 'a,b\\n1,2\\n' >~/{folder}/one.csv"
         f" && printf 'a,b\\n3,4\\n' >~/{folder}/two.csv"],
        check=True,
    )  # fmt: skip


def test_readme_drop_by_group_member_completes(service: Service) -> None:
    """A batchd-drop member (umask 0022) drops a folder with README's command; it completes."""
    command = _readme_drop_command()
    match = re.search(r"~/([\w.-]+)", command)
    assert match, f"README's drop command copies no ~/folder: {command}"
    name = match.group(1)
    _alice(service, name)
    # As alice, in a login shell: her groups and the umask her login gives.
    service.machine.run(["runuser", "-l", "alice", "-c", command], check=True)
    status = service.wait_batch_end(name)
    assert status["batch"]["status"] == "completed", status
    assert status["summary"]["completed"] == 2, status


def test_group_member_submits_a_folder(service: Service) -> None:
    """A batchd-drop member who cannot read the config runs batchd submit; the batch completes."""
    _alice(service, "submitted-1")
    done = service.machine.run(["runuser", "-l", "alice", "-c", "batchd submit ~/submitted-1"])
    assert done.returncode == 0, str(done)
    assert "submitted-1" in done.stdout, str(done)
    status = service.wait_batch_end("submitted-1")
    assert status["batch"]["status"] == "completed", status
    assert status["summary"]["completed"] == 2, status


def test_reload_applies_a_change(service: Service) -> None:
    """systemctl reload re-reads the config, applies a live key and keeps the main process."""
    pid = service.main_pid()
    service.write_config(set_key(service.base_config, "processing", "concurrency", "5"))
    since = _journal_now(service)
    done = service.machine.run(["systemctl", "reload", UNIT], timeout=60)
    assert done.returncode == 0, str(done)
    wait_until(
        lambda: any(
            e.get("CONCURRENCY") == "5"
            for e in service.journal("--since", since, "EVENT=config_reloaded")
        ),
        30,
        "a config_reloaded event with concurrency 5 in the journal",
    )
    assert service.main_pid() == pid
    assert service.is_running()


def test_reload_fails_on_a_bad_config(service: Service) -> None:
    """systemctl reload with a broken config fails, and the daemon keeps running on the old one."""
    pid = service.main_pid()
    service.write_config(service.base_config + "\nthis is not TOML [\n")
    done = service.machine.run(["systemctl", "reload", UNIT], timeout=60)
    assert done.returncode != 0, f"reload of a broken config succeeded:\n{done}"
    assert service.is_running()
    assert service.main_pid() == pid
    # Fixed again, a reload succeeds.
    service.write_config(service.base_config)
    done = service.machine.run(["systemctl", "reload", UNIT], timeout=60)
    assert done.returncode == 0, str(done)


def _journal_now(service: Service) -> str:
    """The container's clock now, as journalctl --since wants it (microseconds)."""
    return "@" + service.machine.run(["date", "+%s.%N"], check=True).stdout.strip()[:17]


def test_journal_finds_a_batch_by_id(service: Service) -> None:
    """journalctl -u batchd BATCH_ID=<id> returns that batch's story, with EVENT fields."""
    service.drop("journal-1", {"a.csv": "a\n1\n"})
    status = service.wait_batch_end("journal-1")
    batch_id = status["batch"]["id"]
    entries: list[dict[str, object]] = []

    def found() -> bool:
        entries[:] = service.journal(f"BATCH_ID={batch_id}")
        return any(e.get("EVENT") == "batch_finished" for e in entries) or len(entries) >= 2

    wait_until(found, 30, f"journal entries with BATCH_ID={batch_id}")
    assert all(e["BATCH_ID"] == batch_id for e in entries)
    assert all(e.get("EVENT") for e in entries), entries


def test_kill_9_restarts_and_recovers(service: Service) -> None:
    """kill -9 of the main process: systemd restarts it and the file in flight completes."""
    before = service.restarts()
    service.drop("kill9-1", {"slow.csv": "a\n1\n", "quick.csv": "a\n2\n"})

    def running() -> bool:
        status = service.status("kill9-1")
        return status is not None and any(
            f["status"] == "processing" and "slow" in f["relpath"] for f in status["files"]
        )

    wait_until(running, 60, "slow.csv is being processed")
    pid = service.main_pid()
    service.machine.run(["kill", "-9", str(pid)], check=True)
    wait_until(
        lambda: service.restarts() == before + 1 and service.is_running(),
        60,
        "systemd restarts batchd after kill -9",
    )
    assert service.main_pid() != pid
    status = service.wait_batch_end("kill9-1")
    assert status["batch"]["status"] == "completed", status
    assert status["summary"]["completed"] == 2, status
    assert service.journal("EVENT=recovery_done", f"_PID={service.main_pid()}"), (
        "no recovery_done from the restarted daemon"
    )


def test_bad_config_fails_with_78_and_no_restart(service: Service) -> None:
    """A bad config makes the start fail with exit 78, and systemd does not restart it."""
    service.write_config(set_key(service.base_config, "processing", "concurrency", '"lots"'))
    done = service.machine.run(["systemctl", "restart", UNIT], timeout=120)
    assert done.returncode != 0, str(done)
    _assert_failed_for_good(service, "78")


@pytest.mark.timeout(WATCHDOG_RESTART_TIMEOUT_SECONDS + 120)
def test_watchdog_restarts_a_stopped_main_process(service: Service) -> None:
    """A main process frozen with SIGSTOP stops feeding the watchdog; systemd restarts it."""
    before = service.restarts()
    pid = service.main_pid()
    since = _journal_now(service)
    service.machine.run(["kill", "-STOP", str(pid)], check=True)
    wait_until(
        lambda: service.restarts() == before + 1 and service.is_running(),
        WATCHDOG_RESTART_TIMEOUT_SECONDS,
        "systemd restarts the frozen batchd",
        1.0,
    )
    assert service.main_pid() != pid
    messages = [
        str(e.get("MESSAGE", "")) for e in service.journal("--since", since)
    ]  # systemd's own lines about the unit are in it too
    assert any("Watchdog timeout" in m for m in messages), messages[-20:]


def test_second_run_is_refused(service: Service) -> None:
    """A second batchd run on the service's spool exits 73 at once, naming the service's PID."""
    pid = service.main_pid()
    restarts = service.restarts()
    done = service.machine.run(
        ["timeout", "--signal=KILL", "60", "batchd", "run", "--config", CONFIG], timeout=90
    )
    assert done.returncode == 73, str(done)
    assert str(pid) in done.stdout + done.stderr, str(done)
    assert service.main_pid() == pid
    assert service.restarts() == restarts
    assert service.is_running()


def test_install_writes_a_private_token(service: Service) -> None:
    """install.sh writes /etc/batchd/http-token.env (0640 root:batchd); the API wants that token."""
    box = service.machine
    path = "/etc/batchd/http-token.env"
    stat = box.run(["stat", "-c", "%a %U %G", path])
    assert stat.returncode == 0, f"install.sh wrote no {path}:\n{stat}"
    assert stat.stdout.split() == ["640", "root", "batchd"], stat.stdout
    token = re.search(r"^BATCHD_HTTP__TOKEN=(\S+)$", box.read(path), re.M)
    assert token, f"{path} holds no BATCHD_HTTP__TOKEN="
    url = "http://127.0.0.1:8080/api/batch/jobs"
    open_ = box.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url])
    assert open_.stdout == "401", str(open_)
    with_token = box.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
         "-H", f"Authorization: Bearer {token.group(1)}", url]
    )  # fmt: skip
    assert with_token.stdout == "200", str(with_token)


def test_security_exposure_is_low(service: Service) -> None:
    """systemd-analyze security rates the unit's exposure at most 2.0."""
    done = service.machine.run(["systemd-analyze", "security", "--no-pager", UNIT])
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match, str(done)
    assert float(match.group(1)) <= MAX_EXPOSURE, done.stdout


def test_port_taken_fails_with_73_and_no_restart(service: Service) -> None:
    """The HTTP port held by another program: the start fails with 73 and is not retried."""
    box = service.machine
    box.run(["systemctl", "stop", UNIT], timeout=120, check=True)
    box.run(
        ["systemd-run", "--unit=porthog", "--", "python3", "-m", "http.server",
         "--bind", "127.0.0.1", "8080"],
        check=True,
    )  # fmt: skip
    try:
        wait_until(
            lambda: (
                box.run(["curl", "-s", "-o", "/dev/null", "http://127.0.0.1:8080/"]).returncode == 0
            ),
            30,
            "the port hog listens on 8080",
        )
        done = box.run(["systemctl", "start", UNIT], timeout=120)
        assert done.returncode != 0, str(done)
        _assert_failed_for_good(service, "73")
    finally:
        box.run(["systemctl", "stop", "porthog"])


def _assert_failed_for_good(service: Service, status: str) -> None:
    """The unit failed with exit ``status``, and stays failed past RestartSec twice over."""
    props = service.show("ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert props["ActiveState"] == "failed", props
    assert props["ExecMainStatus"] == status, props
    assert props["Result"] == "exit-code", props
    deadline = time.monotonic() + NO_RESTART_SECONDS
    while time.monotonic() < deadline:
        now = service.show("ActiveState", "NRestarts")
        assert now == {"ActiveState": "failed", "NRestarts": props["NRestarts"]}, now
        time.sleep(0.5)


def test_stop_is_clean(service: Service) -> None:
    """systemctl stop ends every process of the unit on SIGTERM: systemd SIGKILLs nothing."""
    since = _journal_now(service)
    service.machine.run(["systemctl", "stop", UNIT], timeout=120, check=True)
    props = service.show("ActiveState", "Result")
    assert props == {"ActiveState": "inactive", "Result": "success"}, props
    messages = [str(e.get("MESSAGE", "")) for e in service.journal("--since", since)]
    assert not [m for m in messages if "SIGKILL" in m], messages
