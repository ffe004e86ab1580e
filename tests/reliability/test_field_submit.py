"""`batchd submit` by a member of the drop group who cannot read the 0640 config
(issue 14 point 1): a real unprivileged user, a real daemon, the real command."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from badinput_support import nobody_pythonpath, unprivileged_python
from support import DaemonProcess, csv_bytes

GROUP = "batchd-test-drop"
USER = "batchd-test-dropper"


def as_user(uid: int, gid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]


@pytest.fixture(scope="session")
def dropper() -> Iterator[tuple[int, int]]:
    """A real user whose only group is the drop group; removed afterwards."""
    if os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("setpriv") is None:
        pytest.skip("needs root, useradd and setpriv to create and become a drop-group user")
    made_group = made_user = False
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        subprocess.run(["groupadd", "--system", GROUP], check=True)
        made_group = True
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "-g", GROUP, "-s", "/bin/sh", USER],
            check=True,
        )
        made_user = True
    try:
        yield pwd.getpwnam(USER).pw_uid, grp.getgrnam(GROUP).gr_gid
    finally:
        if made_user:
            subprocess.run(["userdel", USER], check=False)
        if made_group:
            subprocess.run(["groupdel", GROUP], check=False)


def test_drop_group_member_submits_without_reading_the_config(
    dropper: tuple[int, int],
) -> None:
    """A drop-group member who cannot read the config submits a folder and is told
    the batch it became (read from the group-readable outbox)."""
    python = unprivileged_python()
    if python is None:
        pytest.skip("needs a Python interpreter an unprivileged user can run")
    uid, gid = dropper
    # Not tmp_path: pytest's base folder is private to root.
    tmp = Path(tempfile.mkdtemp(prefix="batchd-submit-"))
    try:
        os.chmod(tmp, 0o755)
        d = DaemonProcess(tmp)
        d.config.chmod(0o640)  # root:root, like /etc/batchd/config.toml is root:batchd
        d.start()
        try:
            inbox = d.inbox()
            os.chown(inbox, 0, gid)
            os.chmod(inbox, 0o2770)
            for shared in ("inbox", "outbox", "archive", "failed"):
                os.chown(d.spool / shared, 0, gid)
                os.chmod(d.spool / shared, 0o2750)
            # As deploy/ lays it out: work/ is batchd's own, the group cannot look in.
            os.chmod(d.spool / "work", 0o750)
            src = tmp / "week1"
            src.mkdir(mode=0o750)
            (src / "prices.csv").write_bytes(csv_bytes(1))
            for path in (src, src / "prices.csv"):
                os.chown(path, uid, gid)
            os.chmod(src / "prices.csv", 0o640)
            env = {k: v for k, v in d.env().items() if not k.startswith("BATCHD_")}
            env.update(
                PYTHONPATH=nobody_pythonpath(python),
                BATCHD_CONFIG=str(d.config),
                BATCHD_SPOOL__ROOT=str(d.spool),
            )
            done = subprocess.run(
                [*as_user(uid, gid), python, "-m", "batchd", "submit", str(src), "--timeout", "30"],
                env=env,
                capture_output=True,
                text=True,
                timeout=90,
                cwd=tmp,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            assert "cannot read" in done.stderr and str(d.config) in done.stderr
            match = re.search(r"-> batch (\S+) \(id ([0-9a-f-]{36})\)", done.stdout)
            assert match is not None and match.group(1) == "week1", done.stdout
            status = d.wait_batch("week1")
            assert status["batch"]["id"] == match.group(2)
            assert status["batch"]["status"] == "completed"
            assert "http" not in done.stdout + done.stderr  # nothing of the config leaked
        finally:
            d.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_submitted_copy_is_group_writable_for_the_daemon(dropper: tuple[int, int]) -> None:
    """The copy submit leaves in the inbox is group-writable even from a 0750 source
    and a 0022 umask (so batchd, another user, can claim it)."""
    python = unprivileged_python()
    if python is None:
        pytest.skip("needs a Python interpreter an unprivileged user can run")
    uid, gid = dropper
    tmp = Path(tempfile.mkdtemp(prefix="batchd-submit-"))
    try:
        os.chmod(tmp, 0o755)
        inbox = tmp / "spool" / "inbox" / "normal"
        inbox.mkdir(parents=True)
        os.chown(inbox, 0, gid)
        os.chmod(inbox, 0o2770)
        src = tmp / "private"
        (src / "sub").mkdir(parents=True)
        (src / "sub" / "a.csv").write_bytes(csv_bytes(1))
        for path in (src, src / "sub", src / "sub" / "a.csv"):
            os.chown(path, uid, gid)
            os.chmod(path, 0o640 if path.is_file() else 0o750)
        done = subprocess.run(
            [
                *as_user(uid, gid),
                *("sh", "-c", 'umask 022 && exec "$@"', "sh"),
                *(python, "-m", "batchd", "submit", str(src)),
                *("--no-wait", "--spool", str(tmp / "spool")),
            ],
            env={"PATH": os.environ["PATH"], "PYTHONPATH": nobody_pythonpath(python)},
            capture_output=True,
            text=True,
            timeout=90,
            cwd=tmp,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        copy = inbox / "private"
        for path in (copy, copy / "sub", copy / "sub" / "a.csv"):
            mode = path.stat().st_mode
            assert mode & stat.S_IWGRP and mode & stat.S_IRGRP, (path, oct(mode))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
