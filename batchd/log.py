"""structlog, configured in one place.

Human-readable lines on a terminal, JSON lines otherwise (``log.format``);
structured journald fields when stderr is the systemd journal. Event names
are stable snake_case (``batch_claimed``, ``file_failed``) so that alerts and
queries can rely on them.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from batchd import jsonio
from batchd.config import LogSettings

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


#: The level configure() set last (structlog's own default, before it: everything).
_level = logging.DEBUG


def debug_enabled() -> bool:
    """Whether debug events are logged: hot paths skip building one that is not.

    A module-level logger is a lazy proxy that binds a new logger on every
    call, so even a filtered-out ``log.debug`` costs a few microseconds: on
    the HTTP process's per-request path, ~5 % of a request (issue 15).
    """
    return _level <= logging.DEBUG


def configure(settings: LogSettings, stream: Any = None) -> None:
    """Set up structlog for this process (idempotent; call again on reload)."""
    stream = stream or sys.stderr
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    fmt = settings.format
    journal = None
    if fmt == "auto":
        journal = _journal_renderer()
    if journal is not None:
        processors = [*shared, structlog.processors.format_exc_info, journal]
    elif fmt == "console" or (fmt == "auto" and hasattr(stream, "isatty") and stream.isatty()):
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        processors = [*shared, renderer]
    else:
        processors = [
            *shared,
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(serializer=_json_line),
        ]
    global _level
    _level = _LEVELS[str(settings.level)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[str(settings.level)]),
        # One write() per line (print() makes two: the text, then the
        # newline): the daemon and its workers share stderr, and two
        # processes' lines must never interleave (issue 15).
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def _json_line(event: dict[str, Any], **_ignored: Any) -> str:
    """An event as one compact JSON line, by orjson (``str()`` of what JSON has no
    form for, as ``json.dumps(default=str)`` did): 0.4 us, not 4.4 us, on every
    line the daemon and its workers log (issue 15). A plain (non-str) Enum is
    written as its value, not its ``str()``; batchd's own are StrEnums, alike
    either way."""
    return jsonio.compact(event, default=str).decode()


def _journal_renderer() -> Any:
    """The journald renderer when stderr is the journal and systemd-python is there."""
    try:
        from batchd import service
    except ImportError:
        return None
    if not service.journal_wanted():
        return None
    return service.journal_processor()
