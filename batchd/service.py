"""systemd integration: readiness and watchdog notifications, journald logging.

Both halves degrade to nothing outside systemd, so ``batchd run`` behaves the
same in a terminal, in a container and under systemd, minus these messages.

- :class:`Notifier` speaks the sd_notify protocol (``READY=1``, ``STATUS=``,
  ``WATCHDOG=1`` …) by sending datagrams to ``$NOTIFY_SOCKET`` itself. It needs
  no library, so readiness and the watchdog work even where systemd-python
  (the ``batchd[systemd]`` extra) could not be built.
- :func:`journal_processor` is a structlog final processor that sends each
  event to journald with structured fields (``BATCH_ID=``, ``FILE_ID=``,
  ``PRIORITY=`` …) through ``systemd.journal``, so that
  ``journalctl -u batchd BATCH_ID=…`` finds one batch's story. It needs the
  extra; :func:`journal_wanted` says whether to use it.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import structlog
from structlog.typing import EventDict, WrappedLogger

from batchd.errors import BatchdError

__all__ = ["JournalRenderer", "Notifier", "journal_processor", "journal_wanted"]

#: How long one notification may block when systemd's receive queue is full.
#: A notification is advisory; the daemon must never wedge on one.
_SEND_TIMEOUT_SECONDS = 1.0

#: The name journald files batchd's entries under (``journalctl -t batchd``).
SYSLOG_IDENTIFIER = "batchd"

_log = structlog.get_logger(__name__)


def _socket_address(value: str) -> str | None:
    """The AF_UNIX address ``$NOTIFY_SOCKET`` names, or None if unsupported.

    ``@name`` is a Linux abstract socket (leading NUL byte). Other schemes
    (``vsock:`` from systemd 254 for VMs) are not used for services on a host.
    """
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """Sends sd_notify messages to the service manager, or nothing at all.

    Each message goes out as one datagram on a fresh socket, as libsystemd's
    ``sd_notify()`` does: there is no connection to go stale when systemd
    re-executes, and nothing is shared with forked worker processes. Failures
    are logged, never raised: a lost notification must not stop the daemon.
    """

    def __init__(self, address: str | None = None, watchdog_usec: int | None = None) -> None:
        #: AF_UNIX address to send to; None disables every message.
        self._address = address
        #: systemd's watchdog timeout in microseconds; None when it is off.
        self._watchdog_usec = watchdog_usec
        self._warned = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Notifier:
        """The notifier systemd configured through ``env``.

        Reads ``NOTIFY_SOCKET`` (absent outside ``Type=notify`` units),
        ``WATCHDOG_USEC`` and ``WATCHDOG_PID``. The watchdog counts as off when
        ``WATCHDOG_PID`` names another process: the variables were inherited,
        and the pings are that process's job.
        """
        raw_address = env.get("NOTIFY_SOCKET", "")
        address = _socket_address(raw_address) if raw_address else None
        if raw_address and address is None:
            _log.warning("notify_socket_unsupported", notify_socket=raw_address)
        return cls(address, _watchdog_usec(env))

    @property
    def enabled(self) -> bool:
        """Whether messages go anywhere (batchd runs under ``Type=notify``)."""
        return self._address is not None

    def ready(self) -> None:
        """Tell systemd that start-up (or a reload) is complete: ``READY=1``."""
        self._send("READY=1")

    def status(self, text: str) -> None:
        """Set the one-line status ``systemctl status batchd`` shows."""
        # A newline would start a new assignment in the datagram.
        self._send("STATUS=" + " ".join(text.splitlines()))

    def reloading(self) -> None:
        """Tell systemd a reload has begun; follow it with :meth:`ready`.

        systemd 253+ wants ``MONOTONIC_USEC`` (CLOCK_MONOTONIC) with it to
        match the reload to its request; older versions ignore it.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={now_usec}")

    def stopping(self) -> None:
        """Tell systemd the daemon is shutting down: ``STOPPING=1``."""
        self._send("STOPPING=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between :meth:`watchdog` pings (half the timeout), or None.

        None when systemd set no watchdog (no ``WatchdogSec=``), when it is meant
        for another process, or when there is no socket to ping.
        """
        if self._watchdog_usec is None or not self.enabled:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def watchdog(self) -> None:
        """Prove liveness to systemd: ``WATCHDOG=1``.

        Call it only when the daemon is really working (scheduler loop, watcher
        and pool alive): a missed ping is what lets systemd restart a wedged
        daemon.
        """
        self._send("WATCHDOG=1")

    def _send(self, message: str) -> None:
        if self._address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(_SEND_TIMEOUT_SECONDS)
                sock.sendto(message.encode(), self._address)
        except OSError as exc:
            # The first failure is worth a warning (a wrong NOTIFY_SOCKET, a
            # sandbox without AF_UNIX); repeating it every watchdog ping is not.
            log = _log.debug if self._warned else _log.warning
            self._warned = True
            log("sd_notify_failed", message=message.split("\n", 1)[0], error=str(exc))


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """``WATCHDOG_USEC`` as a positive int, if it is meant for this process."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec


@functools.cache
def _journal_module() -> ModuleType | None:
    """``systemd.journal`` from the ``batchd[systemd]`` extra, or None."""
    try:
        return importlib.import_module("systemd.journal")
    except ImportError:
        return None


def journal_wanted(env: Mapping[str, str] = os.environ) -> bool:
    """Whether to log through :func:`journal_processor`.

    True when ``JOURNAL_STREAM`` (``<st_dev>:<st_ino>``, set by systemd) names
    the file on this process's stderr, so stderr really goes to the journal and
    was not redirected by a shell, and ``systemd.journal`` can be imported.
    """
    device, _, inode = env.get("JOURNAL_STREAM", "").partition(":")
    try:
        expected = (int(device), int(inode))
        stat = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (stat.st_dev, stat.st_ino) == expected and _journal_module() is not None


#: structlog level (or method) name to syslog priority, which journald keeps.
_PRIORITIES: Mapping[str, int] = {
    "critical": 2,
    "fatal": 2,
    "exception": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "notice": 5,
    "info": 6,
    "debug": 7,
}
_DEFAULT_PRIORITY = 6

#: Keys that are the entry itself rather than context fields: the event is
#: the message; journald stamps its own time; the level is PRIORITY.
_MESSAGE_KEYS = frozenset({"event", "level", "timestamp", "exc_info"})
#: Multi-line text appended to MESSAGE, so `journalctl` shows it in place.
_TRAILER_KEYS = ("exception", "stack")
#: structlog CallsiteParameterAdder keys and the journal fields they fill.
_CALLSITE_FIELDS: Mapping[str, str] = {
    "pathname": "CODE_FILE",
    "lineno": "CODE_LINE",
    "func_name": "CODE_FUNC",
}
#: Field names batchd sets itself or journald gives a meaning; a context key
#: with one of these names is sent with a ``BATCHD_`` prefix instead.
_RESERVED_FIELDS = frozenset(
    {
        "MESSAGE",
        "MESSAGE_ID",
        "PRIORITY",
        "SYSLOG_IDENTIFIER",
        "SYSLOG_FACILITY",
        "SYSLOG_PID",
        "CODE_FILE",
        "CODE_LINE",
        "CODE_FUNC",
        "ERRNO",
        "EVENT",
    }
)
_FIELD_NAME_MAX_CHARS = 64
_NOT_FIELD_CHARS = re.compile(r"[^A-Z0-9_]")
_BARE_VALUE = re.compile(r"[^\s\"'=]+")


def _field_name(key: str) -> str | None:
    """A journal field name for a context key (``batch_id`` → ``BATCH_ID``).

    Journal fields are upper-case letters, digits and ``_``, start with a
    letter (a leading ``_`` marks fields only journald may set) and are at
    most 64 characters long.
    """
    name = _NOT_FIELD_CHARS.sub("_", key.upper()).lstrip("_0123456789")
    if not name:
        return None
    if name in _RESERVED_FIELDS:
        name = "BATCHD_" + name
    return name[:_FIELD_NAME_MAX_CHARS]


def _field_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=str, ensure_ascii=False)
    return str(value)


def _fields(event_dict: Mapping[str, Any], method_name: str = "info") -> dict[str, str]:
    """The journal fields for one structlog event.

    ``MESSAGE`` is the event name followed by its context as ``key=value``
    (what a console shows, for plain ``journalctl -u batchd``), then any
    exception or stack text. Every context key is also a field of its own,
    upper-cased (``BATCH_ID``, ``FILE_ID``, ``PATH``) for ``journalctl`` matches,
    and ``EVENT`` is the bare event name (``journalctl EVENT=file_failed``).
    ``None`` values are left out.
    """
    level = str(event_dict.get("level") or method_name).lower()
    fields: dict[str, str] = {
        "PRIORITY": str(_PRIORITIES.get(level, _DEFAULT_PRIORITY)),
        "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
    }
    context: list[str] = []
    for key, value in event_dict.items():
        if key in _MESSAGE_KEYS or key in _TRAILER_KEYS or value is None:
            continue
        text = _field_value(value)
        if key in _CALLSITE_FIELDS:
            fields[_CALLSITE_FIELDS[key]] = text
            continue
        name = _field_name(key)
        if name is None:
            continue
        fields[name] = text
        shown = text if _BARE_VALUE.fullmatch(text) else json.dumps(text, ensure_ascii=False)
        context.append(f"{key}={shown}")
    message = " ".join([str(event_dict.get("event", "")), *context]).strip()
    for key in _TRAILER_KEYS:
        if event_dict.get(key):
            message += "\n" + str(event_dict[key]).rstrip()
    fields["MESSAGE"] = message
    fields["EVENT"] = str(event_dict.get("event", ""))
    return fields


class JournalRenderer:
    """structlog final processor that sends each event to journald.

    Put it last in ``structlog.configure(processors=[…])`` in place of the
    console or JSON renderer. It sends the event through ``systemd.journal.send``
    and then raises :class:`structlog.DropEvent`, so the wrapped logger writes
    nothing (stderr is the journal too: the entry would arrive twice). With
    ``drop_event=False`` it returns ``""`` instead, for pipelines that cannot
    take DropEvent (``structlog.stdlib.ProcessorFormatter``); the caller must
    then discard empty lines.

    If journald cannot be reached the line goes to stderr instead: an
    operator should lose no log line to a logging transport.
    """

    def __init__(self, send: Callable[..., object], *, drop_event: bool = True) -> None:
        self._send = send
        self._drop_event = drop_event

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> str:
        fields = _fields(event_dict, method_name)
        try:
            self._send(**fields)
        except (OSError, ValueError):
            sys.stderr.write(fields["MESSAGE"] + "\n")
        if self._drop_event:
            raise structlog.DropEvent
        return ""


def journal_processor(*, drop_event: bool = True) -> JournalRenderer:
    """The structlog renderer that logs to journald; see :class:`JournalRenderer`.

    Call it only when :func:`journal_wanted` is true.

    Raises:
        BatchdError: systemd-python (the ``batchd[systemd]`` extra) is missing.
    """
    journal = _journal_module()
    if journal is None:
        raise BatchdError(
            "systemd-python is not installed, so batchd cannot log to journald; "
            "install the batchd[systemd] extra (needs libsystemd-dev) or log to stderr"
        )
    return JournalRenderer(journal.send, drop_event=drop_event)
