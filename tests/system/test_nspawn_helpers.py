"""The container helpers' own logic: where the mirror comes from, and why a host cannot boot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from nspawn import Unavailable, _probe_mirror, debian_mirror, rootfs_key
from unitctl import set_key


def _apt(tmp_path: Path, files: dict[str, str]) -> Path:
    (tmp_path / "sources.list.d").mkdir()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_mirror_from_deb822_sources(tmp_path: Path) -> None:
    """The first enabled deb822 'deb' stanza naming bookworm gives the mirror."""
    apt = _apt(
        tmp_path,
        {
            "sources.list.d/a.sources": (
                "Types: deb-src\nURIs: http://src.invalid/debian\nSuites: bookworm\n\n"
                "Types: deb\nEnabled: no\nURIs: http://off.invalid/debian\nSuites: bookworm\n\n"
                "Types: deb\n# a comment\nURIs: http://mirror.invalid/debian/\n"
                "Suites: bookworm bookworm-updates\nComponents: main\n\n"
                "Types: deb\nURIs: http://security.invalid/debian-security\n"
                "Suites: bookworm-security\n"
            )
        },
    )
    assert debian_mirror(apt) == "http://mirror.invalid/debian"


def test_mirror_from_one_line_sources_list(tmp_path: Path) -> None:
    """A classic sources.list line, options and all, gives the mirror."""
    apt = _apt(
        tmp_path,
        {
            "sources.list": (
                "# deb http://commented.invalid/debian bookworm main\n"
                "deb http://security.invalid/debian-security bookworm-security main\n"
                "deb [arch=amd64 signed-by=/k.gpg] https://mirror.invalid/debian bookworm main\n"
            )
        },
    )
    assert debian_mirror(apt) == "https://mirror.invalid/debian"


def test_no_mirror_for_another_suite(tmp_path: Path) -> None:
    """Sources for another suite only: no mirror (the suite then skips, saying so)."""
    apt = _apt(tmp_path, {"sources.list": "deb http://mirror.invalid/debian trixie main\n"})
    assert debian_mirror(apt) is None


def test_unreachable_mirror_is_a_skip_reason() -> None:
    """A mirror that cannot be reached raises Unavailable naming it, not an error."""
    with pytest.raises(Unavailable, match=r"no route to the Debian mirror http://127\.0\.0\.1:9"):
        _probe_mirror("http://127.0.0.1:9/debian")


def test_rootfs_key_is_stable() -> None:
    """The cache key depends on the recipe only, so a second session reuses the rootfs."""
    assert rootfs_key() == rootfs_key()
    assert len(rootfs_key()) == 16


def test_set_key_replaces_adds_and_creates_sections() -> None:
    """set_key edits one key of one section and leaves the rest of the config alone."""
    text = "[processing]\n# Files at once.\nconcurrency = 3\n\n[exec]\ncommand = []\n"
    out = set_key(text, "processing", "concurrency", "5")
    assert out == "[processing]\n# Files at once.\nconcurrency = 5\n\n[exec]\ncommand = []\n"
    assert 'command = ["x"]' in set_key(text, "exec", "command", '["x"]')
    assert set_key(text, "log", "level", '"debug"').endswith('[log]\nlevel = "debug"\n')
    added = set_key(text, "exec", "cwd", '"/tmp"')
    assert added.index('cwd = "/tmp"') > added.index("[exec]")


def test_suite_skips_with_the_reason_without_the_tools(tmp_path: Path) -> None:
    """make test-system on a host without debootstrap skips the container tests, naming it."""
    here = Path(__file__).resolve().parent
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider",
         str(here / "test_systemd_unit.py"), "-k", "test_active_via_notify"],
        env={"BATCHD_TEST_SYSTEM": "1", "PATH": str(tmp_path), "HOME": str(tmp_path)},
        cwd=here.parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 skipped" in done.stdout, done.stdout
    assert "debootstrap is not installed" in done.stdout, done.stdout
