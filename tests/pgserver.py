"""A real PostgreSQL server for tests: Debian's binaries, a throw-away cluster.

:class:`PgServer` runs ``initdb`` in a temporary folder and ``pg_ctl start``
on a free local port, with its unix socket in that folder too, so it never
touches a system cluster (Debian's own service on 5432 may stay stopped).
``initdb`` refuses to run as root, so under root every server command runs as
the ``postgres`` user (``runuser``). Authentication is ``trust``: the server
listens on 127.0.0.1 only and lives as long as the test session.

Fixtures (import them into a test module, or into a conftest):

* ``pg_server`` — session-scoped: one server for the whole run; skips with
  the reason when PostgreSQL or psycopg is missing.
* ``pg_url`` — a fresh, empty schema per test (in one shared database, the
  URL sets ``search_path`` to it), dropped afterwards. A schema costs a few
  milliseconds where CREATE DATABASE costs a quarter of a second.
  ``pg_server.create_database()`` gives a whole database where one is needed.

``pg_server.restart()`` (or ``stop()`` then ``start()``) restarts the server
under the tests' feet, for "database restarted mid-run" tests; the port and
the data stay.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVER_USER = "postgres"
START_TIMEOUT_SECONDS = 60
BIN_GLOB = "/usr/lib/postgresql/*/bin"
#: the database that holds the per-test schemas.
SHARED_DB = "batchd_tests"


def find_bindir() -> Path | None:
    """The newest Debian PostgreSQL bin folder holding initdb and pg_ctl, if any."""
    found = [
        Path(p)
        for p in sorted(Path("/").glob(BIN_GLOB.lstrip("/")), key=_version_key)
        if (Path(p) / "initdb").exists() and (Path(p) / "pg_ctl").exists()
    ]
    return found[-1] if found else None


def _version_key(path: Path) -> tuple[int, ...]:
    version = path.parent.name
    return tuple(int(p) for p in version.split(".") if p.isdigit())


def free_port() -> int:
    """A TCP port nothing listens on right now (the server binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgServer:
    """One PostgreSQL cluster in a temporary folder, on its own port."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="batchd-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            user = pwd.getpwnam(SERVER_USER)
            os.chown(self.root, user.pw_uid, user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "-E", "UTF8", "--no-sync", "--no-instructions")  # fmt: skip

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / tool), *args]
        if self.as_root:
            cmd = ["runuser", "-u", SERVER_USER, "--", *cmd]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=START_TIMEOUT_SECONDS, check=False
        )
        if proc.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(
                f"{tool} failed ({proc.returncode}): {proc.stderr.strip()}\n{log[-2000:]}"
            )
        return proc

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        # fsync off: a test server need not survive a power cut, and it keeps
        # CREATE DATABASE and commits cheap on a shared CI machine.
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            " -c max_connections=200"
        )
        self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w",
                  "-t", str(START_TIMEOUT_SECONDS), "-o", options)  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect clients; ``immediate``: like a crash)."""
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w")

    def restart(self, mode: str = "fast") -> None:
        """Stop and start again on the same port; clients see their connections drop."""
        self.stop(mode)
        self.start()

    def url(self, dbname: str = "postgres", schema: str | None = None) -> str:
        """A libpq URL; with ``schema``, every session starts with that search_path."""
        url = f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"
        return url if schema is None else f"{url}?options=-csearch_path%3D{schema}"

    def create_schema(self, dbname: str = SHARED_DB) -> str:
        """A fresh empty schema in ``dbname``; its name."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.admin(f'CREATE SCHEMA "{name}"', dbname)
        return name

    def drop_schema(self, name: str, dbname: str = SHARED_DB) -> None:
        self.admin(f'DROP SCHEMA IF EXISTS "{name}" CASCADE', dbname)

    def create_database(self) -> str:
        """A fresh empty database; its name."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def admin(self, sql: str, dbname: str = "postgres") -> None:
        """Run one statement outside a transaction (by default on the maintenance database)."""
        import psycopg

        with psycopg.connect(self.url(dbname), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.encode())

    def psql(self, url: str, sql: str) -> str:
        """Run ``sql`` through the real ``psql`` client on ``url``; its unaligned output."""
        proc = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                url,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"psql failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One real PostgreSQL server for the whole test session."""
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install -e '.[dev]'")
    bindir = find_bindir()
    if bindir is None:
        pytest.skip(f"PostgreSQL is not installed (no initdb/pg_ctl in {BIN_GLOB})")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: initdb cannot run")
    server = PgServer(bindir)
    try:
        server.start()
        server.admin(f"CREATE DATABASE {SHARED_DB}")
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """The URL of a fresh, empty schema on the session's server."""
    name = pg_server.create_schema()
    yield pg_server.url(SHARED_DB, name)
    pg_server.drop_schema(name)
