"""Running the real daemon in tests: a subprocess on a spool under tmp_path."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

from batchd.testing import wait_until
from batchd.testing.launcher import DaemonLauncher

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def toml_value(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> None:
    lines = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n")


class DaemonProcess(DaemonLauncher):
    """``batchd run`` as a real child process, with a config file it reads."""

    def __init__(self, tmp: Path, **sections: dict[str, Any]) -> None:
        super().__init__(tmp)
        self.config = tmp / "batchd.toml"
        self.state = tmp / "teststate"
        self.state.mkdir(exist_ok=True)
        self.sections: dict[str, dict[str, Any]] = {
            "spool": {"root": str(self.spool)},
            "watch": {"settle_seconds": 0.2, "rescan_seconds": 2.0},
            "processing": {
                "retry_backoff_seconds": 0.05,
                "poll_seconds": 0.2,
                "shutdown_grace_seconds": 10,
                "status_interval_seconds": 0.05,
            },
            "http": {"enabled": False},
            "log": {"format": "json", "level": "debug"},
        }
        for name, keys in sections.items():
            self.sections.setdefault(name, {}).update(keys)
        write_config(self.config, self.sections)

    def env(self, **extra: str) -> dict[str, str]:
        """The daemon's environment (also what tests give ``batchd`` CLI runs)."""
        env = super().environment()
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE)])
        env["BATCHD_CONFIG"] = str(self.config)
        env["BATCHD_TEST_STATE"] = str(self.state)
        env.update(extra)
        return env

    def environment(self, **extra: str) -> dict[str, str]:
        return self.env(**extra)

    def start(self, wait: bool = True, **extra_env: str) -> Self:  # type: ignore[override]
        """Start; with ``wait``, wait for ``daemon_started`` (it must not exit first)."""
        if wait:
            return super().start(**extra_env)
        self.spawn(**extra_env)
        return self

    # -- reading what it wrote --------------------------------------------------

    def db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.spool / "state" / "batchd.db", timeout=10)
        conn.row_factory = sqlite3.Row
        return conn

    def status(self, name: str) -> dict[str, Any] | None:
        path = self.spool / "outbox" / name / "status.json"
        try:
            return json.loads(path.read_text())  # type: ignore[no-any-return]
        except (FileNotFoundError, ValueError):
            return None

    def wait_batch(self, name: str, timeout: float = 30) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            st = self.status(name)
            if st and st["batch"]["status"] in ("completed", "failed"):
                return st
            return None

        return wait_until(done, timeout, what=f"batch {name} to finish\n{self.log()[-3000:]}")

    def results(self, name: str) -> dict[str, dict[str, Any]]:
        base = self.spool / "outbox" / name / "results"
        return {
            p.relative_to(base).as_posix()[: -len(".json")]: json.loads(p.read_text())
            for p in base.rglob("*.json")
        }

    def inbox(self, priority: str = "normal") -> Path:
        return self.spool / "inbox" / priority


def files_under(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if not p.is_dir())


def drop_folder(target: Path, files: dict[str, bytes], staging: Path) -> Path:
    """Build a folder outside the inbox, then move it in with one rename (like ``mv``)."""
    staging.mkdir(parents=True, exist_ok=True)
    folder = staging / target.name
    for rel, data in files.items():
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    os.rename(folder, target)
    return target


def csv_bytes(i: int) -> bytes:
    return f"id,value\n{i},{i * 2}\n".encode()


def iter_lines(path: Path) -> Iterator[str]:
    if path.exists():
        yield from path.read_text().splitlines()
