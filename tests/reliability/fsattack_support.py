"""A spool laid out as deploy/ lays it out, a daemon user, and an attacker in the drop group.

The daemon runs as ``bdsecfs`` (a member of ``bdsecfs-drop``) with umask 0000,
so every mode batchd gives must be explicit; the attacker ``bdmallory`` is a
plain member of the drop group and acts through a long-lived process
(:class:`Attacker`) that can keep its working directory inside a folder it
dropped, as a shell would.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import subprocess
from pathlib import Path
from typing import Any

from badinput_support import nobody_pythonpath
from support import DaemonProcess

DAEMON_USER = "bdsecfs"
ATTACKER = "bdmallory"
#: Another member of the drop group, who must not read the attacker's results
#: with ``spool.result_access = "owner"``.
NEIGHBOUR = "bdeve"
DROP_GROUP = "bdsecfs-drop"

# Each line read is a JSON list [op, *args]; each answer one line: "ok" or the error.
_ATTACKER_LOOP = r"""
import json, os, sys
for line in sys.stdin:
    op, *args = json.loads(line)
    try:
        if op == "chdir": os.chdir(args[0])
        elif op == "rename": os.rename(args[0], args[1])
        elif op == "unlink": os.unlink(args[0])
        elif op == "rmtree":
            import shutil; shutil.rmtree(args[0])
        elif op == "symlink": os.symlink(args[0], args[1])
        elif op == "mkdir": os.mkdir(args[0], int(args[1], 8))
        elif op == "chmod": os.chmod(args[0], int(args[1], 8))
        elif op == "chgrp":
            import grp; os.chown(args[0], -1, grp.getgrnam(args[1]).gr_gid)
        elif op == "write":
            with open(args[0], "w") as fh: fh.write(args[1])
        elif op == "read":
            with open(args[0], "rb") as fh: fh.read()
        print("ok", flush=True)
    except OSError as exc:
        print(f"{type(exc).__name__}: {exc.strerror}", flush=True)
"""


def ensure_users() -> None:
    """Create the daemon user, the attacker and the drop group (once per machine)."""
    try:
        grp.getgrnam(DROP_GROUP)
    except KeyError:
        subprocess.run(["groupadd", "--system", DROP_GROUP], check=True)
    for user in (DAEMON_USER, ATTACKER, NEIGHBOUR):
        try:
            pwd.getpwnam(user)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                 "--user-group", "--groups", DROP_GROUP, user],
                check=True,
            )  # fmt: skip


def can_read(user: str, path: Path) -> bool:
    """Whether ``user`` can read file ``path``."""
    done = subprocess.run([*as_user(user), "cat", str(path)], capture_output=True, timeout=30)
    return done.returncode == 0


def uid(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


def gid(group: str) -> int:
    return grp.getgrnam(group).gr_gid


def as_user(user: str) -> list[str]:
    """setpriv arguments that run a command as ``user`` with its groups."""
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]


def runs_as(user: str, python: str) -> bool:
    done = subprocess.run(
        [*as_user(user), python, "-c", "import batchd, watchdog"],
        # The checkout's own path, or a world-readable copy when the checkout is
        # private (a clone in a 0700 home or `mktemp -d`, as CI may make).
        env={"PYTHONPATH": nobody_pythonpath(python), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=30,
    )
    return done.returncode == 0


def lay_out(spool: Path) -> None:
    """The spool exactly as deploy/batchd.tmpfiles makes it."""
    daemon, drop = uid(DAEMON_USER), gid(DROP_GROUP)
    own = gid(DAEMON_USER)
    layout = [
        ("", 0o755, own),
        ("inbox", 0o2750, drop),
        ("inbox/high", 0o2770, drop),
        ("inbox/normal", 0o2770, drop),
        ("inbox/low", 0o2770, drop),
        ("work", 0o750, own),
        ("outbox", 0o2750, drop),
        ("archive", 0o2750, drop),
        ("failed", 0o2750, drop),
        ("state", 0o700, own),
    ]
    for rel, mode, group in layout:
        path = spool / rel
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, daemon, group)
        os.chmod(path, mode)


class SpoolDaemon(DaemonProcess):
    """``batchd run`` as the daemon user, umask 0000, on a deploy-like spool."""

    def __init__(self, tmp: Path, python: str, **sections: dict[str, Any]) -> None:
        super().__init__(tmp, **sections)
        self.python = python
        lay_out(self.spool)
        os.chown(self.state, uid(DAEMON_USER), gid(DAEMON_USER))
        # The configuration holds the token: batchd's alone, as install.sh leaves it.
        os.chown(self.config, uid(DAEMON_USER), gid(DAEMON_USER))
        os.chmod(self.config, 0o600)

    def command(self) -> list[str]:
        return [*as_user(DAEMON_USER), "/bin/sh", "-c", 'umask 0000; exec "$@"', "sh",
                self.python, "-m", "batchd", "run"]  # fmt: skip

    def env(self, **extra: str) -> dict[str, str]:
        env = super().env(**extra)
        env["PYTHONPATH"] = nobody_pythonpath(self.python)
        return env

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``batchd <args>`` as root (the operator), on this daemon's configuration."""
        return subprocess.run(
            [self.python, "-m", "batchd", "--config", str(self.config), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )


class Attacker:
    """A process of the attacker's, taking one filesystem operation at a time."""

    def __init__(self, python: str, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [*as_user(ATTACKER), "/bin/sh", "-c", 'umask 0007; exec "$@"', "sh",
             python, "-c", _ATTACKER_LOOP],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=cwd,
            text=True,
            env={"PATH": "/usr/bin:/bin"},
        )  # fmt: skip

    def do(self, op: str, *args: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps([op, *args]) + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)


def make_deep(top: Path, levels: int, leaf: bytes) -> None:
    """``top/d/d/.../d/deep.csv``, ``levels`` folders below ``top`` (made through fds:
    the full path would pass PATH_MAX)."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir("d", dir_fd=fd)
            new = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = new
        out = os.open("deep.csv", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, leaf)
        os.close(out)
    finally:
        os.close(fd)


def chown_deep(top: Path, user: str) -> None:
    """chown every entry under ``top`` to ``user`` and the drop group, folders 2770 as
    README's drop command makes them (iteratively, through fds)."""
    owner, group = uid(user), gid(DROP_GROUP)
    stack = [os.open(top, os.O_RDONLY | os.O_DIRECTORY)]
    os.chown(top, owner, group)
    os.chmod(top, 0o2770)
    while stack:
        fd = stack.pop()
        for name in os.listdir(fd):
            os.chown(name, owner, group, dir_fd=fd, follow_symlinks=False)
            if os.path.isdir(f"/proc/self/fd/{fd}/{name}"):
                os.chmod(name, 0o2770, dir_fd=fd)
                stack.append(os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd))
        os.close(fd)


def remove_deep(path: Path) -> None:
    """Remove a tree of any depth (shutil.rmtree recurses), iteratively."""
    if not path.exists():
        return
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)
