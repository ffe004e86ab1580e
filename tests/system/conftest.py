"""Fixtures for tests/system: batchd installed as a service in a booted container.

Run by ``make test-system`` (which sets ``BATCHD_TEST_SYSTEM=1``). Under plain
``make test`` every test here is skipped, saying so: booting a machine is not
part of the quick suite. Where the container cannot run (not root, no
debootstrap or systemd-nspawn, no route to the Debian mirror) every test skips
with that reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nspawn
import pytest
from nspawn import Container, Unavailable
from unitctl import (
    CHECKOUT,
    CONFIG,
    INSTALL_TIMEOUT_SECONDS,
    START_TIMEOUT_SECONDS,
    TEST_PROCESSOR,
    UNIT,
    Service,
    set_key,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("BATCHD_TEST_SYSTEM") == "1":
        return
    # Only what boots the container waits for make test-system; the helpers'
    # own tests are quick and run everywhere.
    skip = pytest.mark.skip(reason="tests/system boots a container: run it with make test-system")
    for item in items:
        if "machine" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


def _install_argv(wheelhouse: str) -> tuple[list[str], dict[str, str]]:
    """install.sh's command line for an offline install from ``wheelhouse``."""
    script = (CHECKOUT / "deploy/install.sh").read_text()
    if "--wheelhouse" in script:
        return ["/src/deploy/install.sh", "--wheelhouse", wheelhouse], {}
    # An install.sh from before --wheelhouse: pip reads the same choice from
    # its environment, which install.sh passes on.
    return ["/src/deploy/install.sh"], {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": wheelhouse}


@pytest.fixture(scope="session")
def machine() -> Iterator[Container]:
    """A booted container with batchd installed by deploy/install.sh, not yet started."""
    try:
        nspawn.check_host()
        rootfs = nspawn.build_rootfs()
    except Unavailable as exc:
        pytest.skip(f"no container for tests/system: {exc}")
    session = Path(tempfile.mkdtemp(prefix="batchd-system-", dir="/var/tmp"))
    box: Container | None = None
    try:
        wheelhouse = nspawn.build_wheelhouse(
            CHECKOUT, [sys.executable, "-m", "pip"], session / "wheelhouse"
        )
        root = session / "root"
        # A copy per session, so the cached rootfs stays as debootstrap left it.
        subprocess.run(
            ["cp", "-a", "--reflink=auto", str(rootfs), str(root)], check=True, timeout=600
        )
        box = Container(
            root=root,
            console_log=session / "console.log",
            binds={CHECKOUT: "/src", wheelhouse: "/wheelhouse"},
        )
        box.boot()
        argv, env = _install_argv("/wheelhouse")
        box.run(argv, env=env, timeout=INSTALL_TIMEOUT_SECONDS, check=True)
        box.write("/usr/local/bin/batchd-test-proc", TEST_PROCESSOR, 0o755)
        yield box
    finally:
        if box is not None:
            box.poweroff()
        shutil.rmtree(session, ignore_errors=True)


@pytest.fixture(scope="session")
def installed(machine: Container) -> Service:
    """The service, configured for the tests and started once."""
    text = machine.read(CONFIG)
    text = set_key(text, "processing", "processor", '"exec"')
    text = set_key(text, "processing", "concurrency", "3")
    text = set_key(text, "limits", "allowed_types", '["*"]')
    text = set_key(text, "exec", "command", '["/usr/local/bin/batchd-test-proc", "{input}"]')
    service = Service(machine, text)
    service.write_config(text)
    machine.run(["systemctl", "enable", "--now", UNIT], timeout=START_TIMEOUT_SECONDS + 30)
    return service


@pytest.fixture
def service(installed: Service) -> Service:
    """The service running on the base config at the start of a test."""
    installed.reset()
    return installed
