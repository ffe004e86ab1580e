"""The batchd unit inside the test container: config edits, state, drops, results."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from nspawn import Container, wait_until

CHECKOUT = Path(__file__).resolve().parents[2]
CONFIG = "/etc/batchd/config.toml"
SPOOL = "/var/lib/batchd"
UNIT = "batchd"
#: A service start (recovery, workers, READY=1) or a restart after a crash.
START_TIMEOUT_SECONDS = 90.0
#: A small batch, from the drop to status.json saying it ended.
BATCH_TIMEOUT_SECONDS = 90.0
#: install.sh: a venv and an offline pip install of batchd and its dependencies.
INSTALL_TIMEOUT_SECONDS = 600.0

#: The test processor: files named *slow* take long enough for a kill to catch
#: them running; every other file is done at once.
TEST_PROCESSOR = """#!/bin/sh
case "$BATCHD_RELPATH" in *slow*) sleep 8 ;; esac
printf '{"bytes": %s}\\n' "$(wc -c <"$1")"
"""


def set_key(text: str, section: str, key: str, value: str) -> str:
    """``text`` (TOML) with ``key = value`` in ``[section]``, replaced or added."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == f"[{section}]"), None)
    if start is None:
        return f"{text.rstrip()}\n\n[{section}]\n{key} = {value}\n"
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")),
        len(lines),
    )
    pattern = re.compile(rf"^\s*#?\s*{re.escape(key)}\s*=")
    for i in range(start + 1, end):
        if pattern.match(lines[i]):
            lines[i] = f"{key} = {value}"
            return "\n".join(lines) + "\n"
    lines.insert(start + 1, f"{key} = {value}")
    return "\n".join(lines) + "\n"


class Service:
    """The batchd unit inside the container, and what the tests do to it."""

    def __init__(self, machine: Container, base_config: str) -> None:
        self.machine = machine
        self.base_config = base_config

    def show(self, *props: str) -> dict[str, str]:
        argv = ["systemctl", "show", UNIT, *(f"--property={p}" for p in props)]
        out = self.machine.run(argv, check=True).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])

    def restarts(self) -> int:
        return int(self.show("NRestarts")["NRestarts"])

    def is_running(self) -> bool:
        state = self.show("ActiveState", "SubState")
        return state == {"ActiveState": "active", "SubState": "running"}

    def wait_running(self, what: str = "batchd is active (running)") -> None:
        wait_until(self.is_running, START_TIMEOUT_SECONDS, what)

    def write_config(self, text: str) -> None:
        self.machine.write(CONFIG, text, 0o640)
        self.machine.run(["chgrp", "batchd", CONFIG], check=True)

    def reset(self) -> None:
        """The base config in force and the service running, whatever the last test did."""
        changed = self.machine.read(CONFIG) != self.base_config
        if changed:
            self.write_config(self.base_config)
        if changed or not self.is_running():
            self.machine.run(["systemctl", "reset-failed", UNIT])
            self.machine.run(["systemctl", "restart", UNIT], timeout=START_TIMEOUT_SECONDS + 30)
        self.wait_running()

    def journal(self, *args: str) -> list[dict[str, Any]]:
        """Journal entries of the unit matching ``args`` (journalctl -o json)."""
        out = self.machine.run(
            ["journalctl", "--no-pager", "-o", "json", "-u", UNIT, *args], check=True
        ).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def drop(self, name: str, files: dict[str, str], priority: str = "normal") -> None:
        """A folder dropped the way a careful producer does: built hidden, renamed in."""
        inbox = f"{SPOOL}/inbox/{priority}"
        script = [f"umask 0007; mkdir {inbox}/.{name}"]
        for relpath, text in files.items():
            script.append(f"printf %s {json.dumps(text)} >{inbox}/.{name}/{relpath}")
        script.append(f"mv {inbox}/.{name} {inbox}/{name}")
        self.machine.run(
            ["runuser", "-u", "batchd", "--", "sh", "-ec", "; ".join(script)], check=True
        )

    def status(self, name: str) -> dict[str, Any] | None:
        """outbox/<name>/status.json, or None while there is none."""
        done = self.machine.run(["cat", f"{SPOOL}/outbox/{name}/status.json"])
        if done.returncode != 0 or not done.stdout.strip():
            return None
        try:
            parsed: dict[str, Any] = json.loads(done.stdout)
        except json.JSONDecodeError:
            return None
        return parsed

    def wait_batch_end(self, name: str, timeout: float = BATCH_TIMEOUT_SECONDS) -> dict[str, Any]:
        """status.json once the batch has ended (completed or failed)."""
        seen: dict[str, Any] = {}

        def ended() -> bool:
            seen["status"] = self.status(name)
            status = seen["status"]
            return bool(status) and status["batch"]["status"] in ("completed", "failed")

        try:
            wait_until(ended, timeout, f"batch {name} ends", 0.5)
        except AssertionError as exc:
            inbox = self.machine.run(["ls", "-laR", f"{SPOOL}/inbox", f"{SPOOL}/work"]).stdout
            log = self.machine.run(["journalctl", "-u", UNIT, "-n", "60", "--no-pager"]).stdout
            raise AssertionError(
                f"{exc}\nstatus.json: {seen.get('status')}\n{inbox}\n{log}"
            ) from None
        result: dict[str, Any] = seen["status"]
        return result
