"""Helpers for the bad-input tests: a gated processor and a daemon run as ``nobody``.

The processor is referenced as ``"batchd.testing.procs:held"``; the daemon needs
this folder on its ``PYTHONPATH`` (:func:`pythonpath`).
"""

from __future__ import annotations

import atexit
import functools
import grp
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from support import DaemonProcess

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
INTEGRATION = HERE.parent / "integration"
UNPRIVILEGED = ("--reuid=nobody", "--regid=nogroup", "--clear-groups")
#: What the unprivileged daemon never imports: left out of its readable copy.
DEV_ONLY = {
    "mypy",
    "mypyc",
    "ruff",
    "pip",
    "setuptools",
    "pygments",
    "_pytest",
    "pytest",
    "__pycache__",
}


def pythonpath(*extra: str) -> str:
    return os.pathsep.join([str(REPO), str(HERE), str(INTEGRATION), *extra])


# -- a daemon without root's privileges ----------------------------------------


def _runs_as_nobody(python: str) -> bool:
    """True when ``nobody`` can start ``python`` (a venv under /root is out of reach)."""
    try:
        done = subprocess.run(
            ["setpriv", *UNPRIVILEGED, "/bin/sh", "-c", '"$0" -c "import sys"', python],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def unprivileged_python() -> str | None:
    """An interpreter ``nobody`` can run, of this test's Python version (None: none,
    or not root, or no setpriv, or no user nobody / group nogroup)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return None
    try:
        nobody_ids()
    except KeyError:
        return None
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [sys.executable, os.path.realpath(sys.executable), f"/usr/bin/python{version}"]
    for python in candidates:
        if os.path.exists(python) and _runs_as_nobody(python):
            return python
    return None


class UnprivilegedDaemon(DaemonProcess):
    """``batchd run`` as user ``nobody`` (via setpriv), so file modes are enforced.

    Root ignores file modes; an unreadable file is only unreadable to someone
    else. The interpreter may be the system's of the same version, with this
    virtualenv's packages on ``PYTHONPATH`` (its workers inherit both).
    """

    def __init__(self, tmp: Path, python: str, **sections: dict[str, Any]) -> None:
        super().__init__(tmp, **sections)
        self.python = python
        os.chown(self.state, *nobody_ids())

    def command(self) -> list[str]:
        return ["setpriv", *UNPRIVILEGED, self.python, "-m", "batchd", "run"]

    def env(self, **extra: str) -> dict[str, str]:
        env = super().env(**extra)
        env["PYTHONPATH"] = nobody_pythonpath(self.python)
        return env


def _imports_as_nobody(python: str, path: str) -> bool:
    done = subprocess.run(
        ["setpriv", *UNPRIVILEGED, python, "-c", "import batchd.cli, pydantic, badinput_support"],
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        timeout=60,
    )
    return done.returncode == 0


@functools.cache
def nobody_pythonpath(python: str) -> str:
    """A ``PYTHONPATH`` under which ``nobody`` imports batchd, its dependencies and
    these helpers: the checkout's own when ``nobody`` can read it, else a copy in
    a world-readable temporary folder (a clone in a 0700 home or ``mktemp -d``)."""
    purelib = sysconfig.get_paths()["purelib"]
    here = pythonpath(purelib)
    if _imports_as_nobody(python, here):
        return here
    copy = Path(tempfile.mkdtemp(prefix="batchd-nobody-lib-"))
    atexit.register(shutil.rmtree, copy, True)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "batchd", copy / "src" / "batchd", ignore=skip)
    for name in (HERE, INTEGRATION):
        shutil.copytree(name, copy / name.name, ignore=skip)
    site = copy / "site"
    site.mkdir()
    for entry in Path(purelib).iterdir():
        if entry.name in DEV_ONLY or entry.name.startswith("__editable__"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, site / entry.name, ignore=skip)
        else:
            shutil.copy2(entry, site / entry.name)
    for path in (copy, *copy.rglob("*")):
        mode = path.lstat().st_mode
        if not path.is_symlink():
            path.chmod(mode | 0o444 | (0o111 if path.is_dir() else 0))
    path = os.pathsep.join(
        str(p) for p in (copy / "src", copy / HERE.name, copy / INTEGRATION.name, site)
    )
    if not _imports_as_nobody(python, path):
        raise AssertionError(f"user nobody still cannot import batchd from the copy in {copy}")
    return path


def nobody_ids() -> tuple[int, int]:
    return pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
