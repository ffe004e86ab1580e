"""The running daemon's handle on its spool: the lock and the reload verdict.

* ``state/batchd.lock``: ``batchd run`` holds an exclusive ``flock`` on it
  for its whole life and writes its PID into it, so a second daemon on the
  same spool (a second terminal, root next to the service) refuses to start
  instead of running recovery under the first one's feet. The kernel drops
  the lock when the process dies, however it dies: no stale lock files.
* ``state/reload.json``: after each SIGHUP the daemon writes its verdict
  (applied, or refused and why) with a generation counter, so ``batchd
  reload`` (the unit's ``ExecReload=``) can wait for it and fail when the new
  configuration was refused.

In a cluster (``database.url``) several nodes share one spool; each node
locks its own file, named after its node id.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from batchd.config import Settings
from batchd.errors import ConfigError, StartupError


def _suffix(settings: Settings) -> str:
    if not settings.database.url:
        return ""
    digest = hashlib.sha256(settings.node_id.encode()).hexdigest()[:12]
    return f".{digest}"


def spool_lock(settings: Settings) -> SpoolLock:
    """The lock ``batchd run`` takes for these settings."""
    return SpoolLock(lock_path(settings), settings.node_id if settings.database.url else None)


def lock_path(settings: Settings) -> Path:
    """``state/batchd.lock`` (in a cluster: one per node id)."""
    return settings.spool.root / "state" / f"batchd{_suffix(settings)}.lock"


def reload_path(settings: Settings) -> Path:
    """``state/reload.json`` (in a cluster: one per node id)."""
    return settings.spool.root / "state" / f"reload{_suffix(settings)}.json"


def _read_pid(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


class SpoolLock:
    """The exclusive lock one daemon holds on its spool.

    ``node_id`` is set in a cluster: there a lock held under the same node id
    is a configuration error (two processes under one ``cluster.node_id``,
    exit 78, as the node-id check says), not a machine problem (73).
    """

    def __init__(self, path: Path, node_id: str | None = None) -> None:
        self.path = path
        self.node_id = node_id
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`StartupError` naming the PID that holds it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StartupError(
                f"cannot open the spool lock {self.path}: {describe_os_error(exc)};"
                " check spool.root and that this user may write there"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise StartupError(f"cannot lock {self.path}: {exc.strerror}") from None
            pid = _read_pid(fd)
            os.close(fd)
            if self.node_id is not None:
                raise ConfigError(
                    f"cluster.node_id {self.node_id!r} is in use by another batchd on this spool"
                    f" (pid {pid if pid is not None else 'unknown'} holds {self.path});"
                    " give each node its own cluster.node_id"
                ) from None
            raise StartupError(
                f"spool {self.path.parent.parent} is in use by another batchd"
                f" (pid {pid if pid is not None else 'unknown'} holds {self.path});"
                " stop that one first or give this one another spool.root"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def holder_pid(path: Path) -> int | None:
    """The PID of the live daemon holding ``path``, or None when no daemon holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return _read_pid(fd)  # held: a daemon runs
            raise
        return None  # nobody holds it: the PID inside is a stopped daemon's
    finally:
        os.close(fd)


def read_reload(path: Path) -> dict[str, Any]:
    """The last reload verdict, or ``{}`` when there is none (or it is unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_reload(path: Path, verdict: dict[str, Any]) -> None:
    """Replace the verdict atomically (a reader never sees half a file)."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(verdict))
    os.replace(temp, path)


def describe_os_error(exc: OSError) -> str:
    """``exc.strerror``, with a read-only filesystem called by its name."""
    if exc.errno == errno.EROFS:
        return "the filesystem is mounted read-only"
    return exc.strerror or str(exc)
