"""Tests for deploy/: the systemd unit, sysusers/tmpfiles entries, install.sh, uninstall.sh.

CI has no running systemd, so everything here works on files: the unit is
checked with `systemd-analyze verify`, users and the spool are created in a
fake root with `systemd-sysusers --root` / `systemd-tmpfiles --root`, and the
scripts install into a DESTDIR.
"""

from __future__ import annotations

import configparser
import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from batchd.config import ProcessingSettings

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "batchd.service"
INSTALL = DEPLOY / "install.sh"
UNINSTALL = DEPLOY / "uninstall.sh"

#: Every file and link a venv-less install puts into an empty root.
INSTALLED_FILES = {
    "etc/batchd/config.toml",
    "usr/bin/batchd",
    "usr/lib/systemd/system/batchd.service",
    "usr/lib/sysusers.d/batchd.conf",
    "usr/lib/tmpfiles.d/batchd.conf",
}

#: pip's words for "could not reach the package index".
OFFLINE_SIGNS = (
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "No matching distribution found",
    "Could not find a version that satisfies",
)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package: systemd)")
    return path


def _unit_for_verify(tmp_path: Path) -> Path:
    """The unit with ExecStart/ExecReload pointing at an executable that exists here."""
    program = tmp_path / "bin" / "batchd"
    program.parent.mkdir()
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    unit = tmp_path / "batchd.service"
    text = UNIT.read_text()
    assert "ExecStart=/usr/bin/batchd " in text
    text = text.replace("ExecStart=/usr/bin/batchd ", f"ExecStart={program} ")
    unit.write_text(text.replace("ExecReload=/usr/bin/batchd ", f"ExecReload={program} "))
    return unit


def _verify(unit: Path) -> tuple[int, list[str]]:
    """Run `systemd-analyze verify`; its exit code and the lines about the unit."""
    done = subprocess.run(
        [_tool("systemd-analyze"), "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = (done.stdout + done.stderr).splitlines()
    return done.returncode, [line for line in output if unit.name in line]


def _unit_settings() -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return dict(parser["Service"])


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit without a warning about it."""
    assert _verify(_unit_for_verify(tmp_path)) == (0, [])


def test_verify_reports_a_broken_unit(tmp_path: Path) -> None:
    """The verify check is not vacuous: a bad setting in the unit is reported."""
    unit = _unit_for_verify(tmp_path)
    unit.write_text(unit.read_text().replace("Type=notify", "Type=notifyy"))
    _, lines = _verify(unit)
    assert any("Type" in line or "service type" in line for line in lines), lines


def test_unit_sandbox_exposure_is_low(tmp_path: Path) -> None:
    """`systemd-analyze security` rates the sandbox at exposure 3.0 or better."""
    unit = _unit_for_verify(tmp_path)
    done = subprocess.run(
        [_tool("systemd-analyze"), "security", "--offline=yes", "--threshold=30", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr


def test_unit_settings() -> None:
    """The unit keeps the service contract: notify, watchdog, no restart on exit 78 or 73."""
    settings = _unit_settings()
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": "/usr/bin/batchd run --config /etc/batchd/config.toml",
        "ExecReload": "/usr/bin/batchd reload --config /etc/batchd/config.toml",
        "EnvironmentFile": "-/etc/batchd/http-token.env",
        "MemoryMax": "4G",
        "TasksMax": "512",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "78 73",
        "KillMode": "mixed",
        "User": "batchd",
        "Group": "batchd",
        "UMask": "0007",
        "StateDirectory": "batchd",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter": "@system-service",
    }
    assert {key: settings.get(key) for key in expected} == expected


def test_unit_stop_timeout_outlasts_shutdown_grace() -> None:
    """systemd waits longer than batchd's default shutdown grace before SIGKILL."""
    grace = ProcessingSettings.model_fields["shutdown_grace_seconds"].default
    assert float(_unit_settings()["TimeoutStopSec"]) > grace


def _passwd(root: Path, name: str) -> dict[str, list[str]]:
    lines = (root / "etc" / name).read_text().splitlines()
    return {line.split(":")[0]: line.split(":") for line in lines}


def _install_system_files(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    for source, target in [
        ("batchd.sysusers", "usr/lib/sysusers.d/batchd.conf"),
        ("batchd.tmpfiles", "usr/lib/tmpfiles.d/batchd.conf"),
    ]:
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DEPLOY / source, root / target)


def test_sysusers_creates_user_and_drop_group(tmp_path: Path) -> None:
    """sysusers creates the batchd user and the batchd-drop group with batchd in it."""
    _install_system_files(tmp_path)
    subprocess.run([_tool("systemd-sysusers"), f"--root={tmp_path}"], check=True, timeout=60)
    users, groups = _passwd(tmp_path, "passwd"), _passwd(tmp_path, "group")
    batchd = users["batchd"]
    assert (batchd[5], batchd[6], batchd[3] == groups["batchd"][2]) == (
        "/var/lib/batchd",
        "/usr/sbin/nologin",
        True,
    )
    assert groups["batchd-drop"][3].split(",") == ["batchd"]


@pytest.mark.skipif(os.geteuid() != 0, reason="creating the spool with its owners needs root")
def test_tmpfiles_creates_spool_with_group_permissions(tmp_path: Path) -> None:
    """tmpfiles lays out the spool of SPEC §1 with setgid group permissions."""
    _install_system_files(tmp_path)
    subprocess.run([_tool("systemd-sysusers"), f"--root={tmp_path}"], check=True, timeout=60)
    subprocess.run(
        [_tool("systemd-tmpfiles"), f"--root={tmp_path}", "--create"], check=True, timeout=60
    )
    users, groups = _passwd(tmp_path, "passwd"), _passwd(tmp_path, "group")
    names = {int(users["batchd"][2]): "batchd"}
    group_names = {int(groups["batchd"][2]): "batchd", int(groups["batchd-drop"][2]): "batchd-drop"}
    spool = tmp_path / "var" / "lib" / "batchd"
    layout = {}
    for path in [spool, *sorted(spool.rglob("*"))]:
        info = path.stat()
        layout[str(path.relative_to(spool))] = (
            oct(stat.S_IMODE(info.st_mode)),
            names.get(info.st_uid),
            group_names.get(info.st_gid),
        )
    drop, shared = ("0o2770", "batchd", "batchd-drop"), ("0o2750", "batchd", "batchd-drop")
    assert layout == {
        ".": ("0o755", "batchd", "batchd"),
        "inbox": shared,
        "inbox/high": drop,
        "inbox/normal": drop,
        "inbox/low": drop,
        "work": ("0o750", "batchd", "batchd"),
        "outbox": shared,
        "archive": shared,
        "failed": shared,
        "state": ("0o700", "batchd", "batchd"),
    }


def _run(
    script: Path, root: Path, *args: str, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(script), *args],
        env={**os.environ, "DESTDIR": str(root), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = _run(INSTALL, root, "--skip-venv", *args)
    assert done.returncode == 0, done.stderr
    return done


def _tree(root: Path) -> dict[str, tuple[str, str]]:
    """Every path below root: its mode, and its content hash or link target."""
    tree = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            content = "-> " + os.readlink(path)
        elif stat.S_ISREG(info.st_mode):
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            content = ""
        tree[str(path.relative_to(root))] = (stat.filemode(info.st_mode), content)
    return tree


def _files(root: Path) -> set[str]:
    return {name for name, (mode, _) in _tree(root).items() if mode[0] != "d"}


def test_install_twice_gives_the_same_tree(tmp_path: Path) -> None:
    """Running install.sh again changes nothing in the installed tree."""
    _install(tmp_path)
    first = _tree(tmp_path)
    _install(tmp_path)
    assert _tree(tmp_path) == first


def test_install_layout(tmp_path: Path) -> None:
    """install.sh puts the unit, link, config and system entries where systemd looks."""
    _install(tmp_path)
    tree = _tree(tmp_path)
    assert (_files(tmp_path), tree["usr/bin/batchd"], tree["etc/batchd/config.toml"][0]) == (
        INSTALLED_FILES,
        ("lrwxrwxrwx", "-> /opt/batchd/bin/batchd"),
        "-rw-r-----",
    )
    assert (tmp_path / "usr/lib/systemd/system/batchd.service").read_bytes() == UNIT.read_bytes()


def test_install_is_announced_without_systemctl(tmp_path: Path) -> None:
    """Into a DESTDIR nothing touches the running system, and the next steps are printed."""
    done = _install(tmp_path)
    assert "not running 'systemctl daemon-reload'" in done.stdout
    assert "systemctl enable --now batchd" in done.stdout


def _source_copy(tmp_path: Path, example: str) -> Path:
    source = tmp_path / "src"
    shutil.copytree(DEPLOY, source / "deploy")
    shutil.copy(REPO / "pyproject.toml", source)
    (source / "config.example.toml").write_text(example)
    return source


def test_install_points_config_at_system_spool(tmp_path: Path) -> None:
    """The installed config uses /var/lib/batchd whatever spool the example names."""
    example = '[spool]\n# where the spool lives\nroot = "./spool"\n\n[http]\nroot = "x"\n'
    source = _source_copy(tmp_path, example)
    _install(tmp_path / "root", "--source", str(source))
    config = (tmp_path / "root" / "etc" / "batchd" / "config.toml").read_text()
    assert config == (
        '[spool]\n# where the spool lives\nroot = "/var/lib/batchd"\n\n[http]\nroot = "x"\n'
    )


def test_install_keeps_an_existing_config(tmp_path: Path) -> None:
    """An operator's edited config survives a reinstall."""
    _install(tmp_path)
    config = tmp_path / "etc" / "batchd" / "config.toml"
    config.write_text("[processing]\nconcurrency = 8\n")
    _install(tmp_path)
    assert config.read_text() == "[processing]\nconcurrency = 8\n"


def test_install_refuses_a_folder_that_is_not_batchd(tmp_path: Path) -> None:
    """--source pointing at the wrong folder fails with a message and installs nothing."""
    (tmp_path / "src").mkdir()
    done = _run(INSTALL, tmp_path / "root", "--skip-venv", "--source", str(tmp_path / "src"))
    assert (done.returncode, "not a batchd source tree" in done.stderr) == (1, True)
    assert not (tmp_path / "root").exists()


def _populate(root: Path) -> set[str]:
    """A working install with a spool holding results; the data paths."""
    _install(root)
    (root / "opt" / "batchd" / "bin").mkdir(parents=True)
    (root / "opt" / "batchd" / "bin" / "batchd").write_text("#!/bin/sh\n")
    data = {
        "var/lib/batchd/outbox/report/status.json": "{}",
        "var/lib/batchd/inbox/normal/waiting.csv": "a,b\n",
        "var/lib/batchd/state/batchd.db": "SQLite format 3",
    }
    for name, text in data.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return {*data, "etc/batchd/config.toml"}


def test_uninstall_keeps_config_and_spool(tmp_path: Path) -> None:
    """uninstall.sh removes the program and units but leaves config, spool and data."""
    kept = _populate(tmp_path)
    done = _run(UNINSTALL, tmp_path)
    assert (done.returncode, _files(tmp_path)) == (0, kept), done.stderr
    assert not (tmp_path / "opt" / "batchd").exists()


def test_uninstall_purge_removes_config_and_spool(tmp_path: Path) -> None:
    """uninstall.sh --purge removes the config and the spool too."""
    _populate(tmp_path)
    done = _run(UNINSTALL, tmp_path, "--purge")
    assert (done.returncode, _files(tmp_path)) == (0, set()), done.stderr
    assert not (tmp_path / "var" / "lib" / "batchd").exists()
    assert not (tmp_path / "etc" / "batchd").exists()


def test_uninstall_leaves_a_foreign_batchd_command(tmp_path: Path) -> None:
    """A /usr/bin/batchd that install.sh did not create is not removed."""
    _install(tmp_path)
    link = tmp_path / "usr" / "bin" / "batchd"
    link.unlink()
    link.write_text("#!/bin/sh\n")
    _run(UNINSTALL, tmp_path)
    assert link.read_text() == "#!/bin/sh\n"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_pass_shellcheck() -> None:
    """install.sh and uninstall.sh are clean under shellcheck."""
    done = subprocess.run(
        ["shellcheck", str(INSTALL), str(UNINSTALL)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout


@pytest.mark.timeout(900)
def test_install_builds_a_working_venv(tmp_path: Path) -> None:
    """A real install creates /opt/batchd with batchd (and the systemd extra when it builds)."""
    if os.environ.get("BATCHD_TEST_OFFLINE") == "1":
        pytest.skip("BATCHD_TEST_OFFLINE=1: no package index to install from")
    done = _run(INSTALL, tmp_path, timeout=840, PYTHON=sys.executable)
    if done.returncode != 0 and any(sign in done.stderr for sign in OFFLINE_SIGNS):
        pytest.skip(f"no package index reachable: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-3000:]
    venv = tmp_path / "opt" / "batchd"
    assert os.access(venv / "bin" / "batchd", os.X_OK)
    code = "import batchd.service as s; print(s._journal_module() is not None)"
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    # Without libsystemd-dev and a compiler the extra cannot build: then the
    # install must still succeed, and say so.
    has_journal = probe.stdout.strip() == "True"
    assert has_journal or "the systemd extra did not build" in done.stderr, done.stderr[-3000:]


def test_install_from_a_wheelhouse_uses_only_local_files(tmp_path: Path) -> None:
    """--wheelhouse installs with pip --no-index: an empty folder fails, naming it,
    instead of reaching for a package index."""
    wheelhouse = tmp_path / "wheels"
    wheelhouse.mkdir()
    root = tmp_path / "root"
    done = _run(INSTALL, root, "--wheelhouse", str(wheelhouse), timeout=300, PYTHON=sys.executable)
    assert done.returncode != 0
    assert f"from {wheelhouse}" in done.stderr, done.stderr[-3000:]
    assert not any(sign in done.stderr for sign in OFFLINE_SIGNS[:3]), done.stderr[-3000:]


def test_install_with_ocr_into_destdir_only_warns(tmp_path: Path) -> None:
    """--with-ocr installs no packages below a DESTDIR and says what the host needs."""
    done = _install(tmp_path, "--with-ocr")
    assert "tesseract-ocr tesseract-ocr-eng" in done.stderr
    assert not (tmp_path / "etc" / "batchd" / "http-token.env").exists()
