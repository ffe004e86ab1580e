"""A throwaway Debian machine with a real systemd as PID 1, for tests/system.

The rootfs is built once with debootstrap from the Debian mirror the host's
own apt sources name, and cached outside the checkout (``CACHE_ROOT``), keyed
by a hash of everything that goes into it. Every test session boots a copy of
it with ``systemd-nspawn -b --register=no --keep-unit``, so the cache stays
clean. There is no machined (``--register=no``), so commands run inside via
``nsenter`` into the namespaces of the container's PID 1. Every wait has a
deadline.

The container has a private network (only ``lo``): the daemon inside can bind
its default port without meeting whatever runs on the host, and pip inside
cannot reach any index, so batchd and its dependencies come from a wheelhouse
built on the host and bind-mounted in.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUITE = "bookworm"
#: What the container needs beyond minbase: the service manager and its bus,
#: Python for the venv, and the tools README's examples and the tests use.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-venv",
    "acl",
    "sqlite3",
    "curl",
    "jq",
    "ca-certificates",
    "procps",
    "util-linux",
)
#: Units that only make noise in a container with no terminal and no network.
MASKED_UNITS = (
    "console-getty.service",
    "getty@.service",
    "systemd-networkd-wait-online.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
)
#: Bump when the recipe below changes in a way the key does not see.
RECIPE_VERSION = 1

CACHE_ROOT = Path(os.environ.get("BATCHD_SYSTEM_CACHE", "/var/cache/batchd-test"))
#: A clean machine builds the rootfs once per CI run; debootstrap takes 3-6 min.
BUILD_TIMEOUT_SECONDS = 1200.0
#: pip wheel of batchd's dependencies on the host (systemd-python compiles).
WHEELHOUSE_TIMEOUT_SECONDS = 900.0
MIRROR_PROBE_TIMEOUT_SECONDS = 15.0
BOOT_TIMEOUT_SECONDS = 180.0
POWEROFF_TIMEOUT_SECONDS = 60.0
COMMAND_TIMEOUT_SECONDS = 120.0

#: The PATH commands inside the container get (nsenter keeps the host's env).
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Unavailable(Exception):
    """nspawn cannot run here; the message is the reason the suite skips."""


# ---------------------------------------------------------------------------
# Where the Debian packages come from


def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    stanza: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if not line.strip():
            if stanza:
                yield stanza
            stanza, key = {}, ""
        elif line.startswith("#"):
            continue
        elif line[0].isspace() and key:
            stanza[key] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            stanza[key] = value.strip()
    if stanza:
        yield stanza


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str | None:
    """The URI of the first ``deb`` source carrying ``SUITE`` in the host's apt sources."""
    candidates: list[str] = []
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        for stanza in _deb822_stanzas(path.read_text(errors="replace")):
            if stanza.get("enabled", "yes").lower() == "no":
                continue
            if "deb" not in stanza.get("types", "").split():
                continue
            if SUITE in stanza.get("suites", "").split():
                candidates.extend(stanza.get("uris", "").split())
    lists = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in lists:
        if not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            # deb [options] URI SUITE COMPONENT...
            words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                candidates.append(words[1])
    for uri in candidates:
        if uri.startswith(("http://", "https://")):
            return uri.rstrip("/")
    return None


def _probe_mirror(mirror: str) -> None:
    url = f"{mirror}/dists/{SUITE}/Release"
    try:
        with urllib.request.urlopen(url, timeout=MIRROR_PROBE_TIMEOUT_SECONDS) as answer:
            answer.read(64)
    except OSError as exc:
        raise Unavailable(f"no route to the Debian mirror {mirror} ({exc})") from exc


def check_host() -> None:
    """Raise Unavailable naming what this host lacks to boot a container."""
    if os.geteuid() != 0:
        raise Unavailable("systemd-nspawn needs root")
    for tool in ("debootstrap", "systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            raise Unavailable(
                f"{tool} is not installed (apt-get install debootstrap systemd-container)"
            )


# ---------------------------------------------------------------------------
# The cached rootfs


def rootfs_key() -> str:
    """A hash of everything that goes into the rootfs (not the mirror's host name)."""
    recipe = {
        "suite": SUITE,
        "packages": PACKAGES,
        "masked": MASKED_UNITS,
        "version": RECIPE_VERSION,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _cache_lock(name: str) -> Iterator[None]:
    """One builder at a time per cache entry (two sessions may start together)."""
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(CACHE_ROOT / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _run_logged(argv: Sequence[str], log: Path, timeout: float) -> None:
    with log.open("ab") as out:
        try:
            subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=True)
        except subprocess.CalledProcessError as exc:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(
                f"{argv[0]} failed with exit {exc.returncode}; log {log}:\n{tail}"
            ) from None


def build_rootfs() -> Path:
    """The cached rootfs, built first when missing (needs the mirror)."""
    key = rootfs_key()
    final = CACHE_ROOT / f"rootfs-{key}"
    done = final / ".batchd-test-complete"
    if done.exists():
        return final
    mirror = debian_mirror()
    if mirror is None:
        raise Unavailable(f"no http(s) 'deb' source for {SUITE} in /etc/apt/sources*")
    _probe_mirror(mirror)
    with _cache_lock(f"rootfs-{key}"):
        if done.exists():
            return final
        build = CACHE_ROOT / f".build-rootfs-{key}"
        shutil.rmtree(build, ignore_errors=True)
        log = CACHE_ROOT / f"rootfs-{key}.log"
        log.write_text(f"debootstrap {SUITE} from {mirror}\n")
        _run_logged(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(build),
                mirror,
            ],
            log,
            BUILD_TIMEOUT_SECONDS,
        )
        for unit in MASKED_UNITS:
            (build / "etc/systemd/system" / unit).unlink(missing_ok=True)
            (build / "etc/systemd/system" / unit).symlink_to("/dev/null")
        (build / "etc/hostname").write_text("batchd-test\n")
        # Empty: systemd makes a fresh machine id at each boot of a copy.
        (build / "etc/machine-id").write_text("")
        # Keep the journal in memory: a copy per session is thrown away anyway.
        conf = build / "etc/systemd/journald.conf.d"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "batchd-test.conf").write_text("[Journal]\nStorage=volatile\n")
        shutil.rmtree(build / "var/cache/apt/archives", ignore_errors=True)
        (build / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
        shutil.rmtree(final, ignore_errors=True)
        build.rename(final)
        done.write_text(f"{SUITE} {','.join(PACKAGES)}\n")
    return final


# ---------------------------------------------------------------------------
# The wheelhouse: batchd and every dependency, as files pip can install offline


def build_wheelhouse(checkout: Path, pip: Sequence[str], into: Path) -> Path:
    """Fill ``into`` with batchd's wheel and its dependencies' (cached by pyproject)."""
    pyproject = (checkout / "pyproject.toml").read_bytes()
    key = hashlib.sha256(pyproject).hexdigest()[:16]
    deps = CACHE_ROOT / f"wheelhouse-{key}"
    done = deps / ".batchd-test-complete"
    log = CACHE_ROOT / f"wheelhouse-{key}.log"
    if not done.exists():
        with _cache_lock(f"wheelhouse-{key}"):
            if not done.exists():
                build = CACHE_ROOT / f".build-wheelhouse-{key}"
                shutil.rmtree(build, ignore_errors=True)
                build.mkdir(parents=True)
                log.write_text("")
                # pip, setuptools and wheel too: install.sh upgrades pip and
                # builds batchd from source inside, both without an index.
                _run_logged(
                    [
                        *pip,
                        "wheel",
                        "--quiet",
                        "--wheel-dir",
                        str(build),
                        "pip",
                        "setuptools>=68",
                        "wheel",
                        f"{checkout}[systemd]",
                    ],
                    log,
                    WHEELHOUSE_TIMEOUT_SECONDS,
                )
                for own in build.glob("batchd-*"):
                    own.unlink()
                shutil.rmtree(deps, ignore_errors=True)
                build.rename(deps)
                done.write_text("")
    into.mkdir(parents=True, exist_ok=True)
    for wheel in deps.iterdir():
        if wheel.name != done.name:
            shutil.copy2(wheel, into / wheel.name)
    # The checkout's own wheel, fresh each session.
    with tempfile.TemporaryDirectory() as stage:
        for item in ("pyproject.toml", "README.md", "batchd"):
            src = checkout / item
            if src.is_dir():
                shutil.copytree(
                    src, Path(stage) / item, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy2(src, Path(stage) / item)
        _run_logged(
            [
                *pip,
                "wheel",
                "--quiet",
                "--no-deps",
                "--no-index",
                "--find-links",
                str(into),
                "--wheel-dir",
                str(into),
                stage,
            ],
            into.parent / "batchd-wheel.log",
            WHEELHOUSE_TIMEOUT_SECONDS,
        )
    return into


# ---------------------------------------------------------------------------
# The running machine


@dataclass
class Result:
    """What a command inside the container did."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (
            f"{' '.join(self.argv)} -> exit {self.returncode}\n"
            f"--- stdout\n{self.stdout[-4000:]}\n--- stderr\n{self.stderr[-4000:]}"
        )


def wait_until(cond: Callable[[], bool], timeout: float, what: str, step: float = 0.25) -> None:
    """Poll ``cond`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(step)


def _text(value: object) -> str:
    """Captured output as text, whatever subprocess left in it."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value or "")


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found.extend(int(c) for c in (task / "children").read_text().split())
    return found


def _container_init(nspawn_pid: int) -> int | None:
    """The descendant of nspawn that is PID 1 in its own PID namespace."""
    todo = [nspawn_pid]
    while todo:
        pid = todo.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^NSpid:\s+(.*)$", status, re.MULTILINE)
        if match and len(match.group(1).split()) > 1 and match.group(1).split()[-1] == "1":
            return pid
        todo.extend(_children(pid))
    return None


@dataclass
class Container:
    """A booted copy of the rootfs; ``run`` executes a command inside."""

    root: Path
    console_log: Path
    binds: dict[Path, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    init_pid: int = 0

    def boot(self) -> None:
        """Start systemd in the copy and wait until it has finished booting."""
        argv = [
            "systemd-nspawn",
            "--boot",
            "--register=no",
            "--keep-unit",
            "--private-network",
            "--console=pipe",
            f"--machine=batchd-test-{os.getpid()}",
            "--directory",
            str(self.root),
        ]
        argv += [f"--bind-ro={host}:{inside}" for host, inside in self.binds.items()]
        out = self.console_log.open("wb")
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        deadline = time.monotonic() + BOOT_TIMEOUT_SECONDS

        def init_found() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited at boot:\n{self.console()}")
            assert self.process is not None
            self.init_pid = _container_init(self.process.pid) or 0
            return self.init_pid != 0

        wait_until(init_found, BOOT_TIMEOUT_SECONDS, "the container's PID 1 appears")

        def booted() -> bool:
            state = self.run(["systemctl", "is-system-running"], timeout=30).stdout.strip()
            return state in ("running", "degraded")

        try:
            wait_until(booted, max(deadline - time.monotonic(), 1.0), "the container boots", 0.5)
        except AssertionError as exc:
            failed = self.run(["systemctl", "--failed", "--no-pager"], timeout=30)
            raise AssertionError(f"{exc}\n{failed.stdout}\n{self.console()}") from None

    def console(self) -> str:
        """The tail of the container's console (boot messages)."""
        with contextlib.suppress(OSError):
            return self.console_log.read_text(errors="replace")[-6000:]
        return ""

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = COMMAND_TIMEOUT_SECONDS,
        check: bool = False,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Result:
        """Run ``argv`` inside the container as root, with a clean environment."""
        assert self.init_pid, "the container is not booted"
        environment = {"PATH": CONTAINER_PATH, "LANG": "C.UTF-8", "HOME": "/root"}
        environment.update(env or {})
        full = [
            "nsenter", "--target", str(self.init_pid),
            "--mount", "--uts", "--ipc", "--net", "--pid", "--root", "--wd",
            "env", "-i", *(f"{k}={v}" for k, v in environment.items()), *argv,
        ]  # fmt: skip
        try:
            done = subprocess.run(
                full,
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"{' '.join(argv)}: still running after {timeout:.0f} s\n"
                f"--- stdout\n{_text(exc.stdout)}\n--- stderr\n{_text(exc.stderr)}"
            ) from None
        result = Result(list(argv), done.returncode, done.stdout, done.stderr)
        if check and result.returncode != 0:
            raise AssertionError(str(result))
        return result

    def sh(self, script: str, **kwargs: object) -> Result:
        """Run a shell script inside the container (``set -eu``)."""
        return self.run(["/bin/bash", "-c", f"set -eu\n{script}"], **kwargs)  # type: ignore[arg-type]

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a file inside the container (atomically, as root)."""
        self.run(
            [
                "sh",
                "-c",
                'tmp="$1.new" && cat >"$tmp" && chmod "$2" "$tmp" && mv -f "$tmp" "$1"',
                "write",
                path,
                f"{mode:o}",
            ],
            input=text,
            check=True,
        )

    def read(self, path: str) -> str:
        """A file's text inside the container (fails the test when unreadable)."""
        return self.run(["cat", path], check=True).stdout

    def poweroff(self) -> None:
        """Shut the container down cleanly; kill it if it does not stop in time."""
        if self.process is None or self.process.poll() is not None:
            return
        # nspawn turns SIGTERM into an orderly shutdown of the container.
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(POWEROFF_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(POWEROFF_TIMEOUT_SECONDS)
