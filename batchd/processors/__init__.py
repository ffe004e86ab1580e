"""Processors: the callables that turn one input file into one JSON result.

A processor is ``fn(path, ctx) -> dict``. It runs inside a worker process,
never in the daemon, so it may hang, crash or leak without harm. It raises
:class:`~batchd.errors.PermanentError` for content that will never process
(no retries) and any other exception for a failure worth retrying.

Processors are named in ``processing.processor`` (and ``[[route]]``) either
as ``"package.module:function"`` or by a registered name: the built-ins and
anything installed under the entry-point group ``batchd.processors``.
"""

from __future__ import annotations

import fnmatch
import importlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

from batchd.config import Settings
from batchd.errors import ConfigError

ENTRY_POINT_GROUP = "batchd.processors"


class Context(Protocol):
    """What a processor may know and do besides reading its input."""

    batch_id: str
    file_id: str
    relpath: str
    settings: Settings

    @property
    def output_dir(self) -> Path:
        """A fresh, empty folder (made on first use); files left in it land in
        the outbox next to the result."""

    def progress(self, percent: float) -> None:
        """Report progress (0-100); shows in status.json and the HTTP API."""


Processor = Callable[[Path, Context], dict[str, Any]]


@dataclass
class ProcessorContext:
    """The concrete :class:`Context` a worker hands to a processor."""

    batch_id: str
    file_id: str
    relpath: str
    #: where the output folder is made when a processor first asks for it.
    output_path: Path
    settings: Settings
    report: Callable[[int], None] = field(repr=False, default=lambda pct: None)
    _last: int = field(default=-1, repr=False)
    _made: bool = field(default=False, repr=False)

    @property
    def output_dir(self) -> Path:
        # Made on demand: most processors write no outputs, and creating and
        # removing a folder per file is a measurable part of a no-op's cost.
        if not self._made:
            # A crashed earlier attempt may have left outputs behind: start empty.
            shutil.rmtree(self.output_path, ignore_errors=True)
            self.output_path.mkdir(parents=True)
            self._made = True
        return self.output_path

    @property
    def output_dir_made(self) -> bool:
        return self._made

    def progress(self, percent: float) -> None:
        pct = max(0, min(100, int(percent)))
        if pct != self._last:  # only changes cross the pipe
            self._last = pct
            self.report(pct)


_cache: dict[str, Processor] = {}


def _builtin_names() -> dict[str, str]:
    # Built-ins are listed here too, so they resolve even when batchd is not
    # installed as a distribution (running from a source tree).
    return {
        "inspect": "batchd.processors.inspect:inspect",
        "noop": "batchd.processors.builtin:noop",
        "exec": "batchd.processors.exec:run_command",
    }


def available() -> dict[str, str]:
    """Registered processor names mapped to their ``module:function`` targets."""
    names = _builtin_names()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        names.setdefault(ep.name, ep.value)
    return names


def resolve(name: str) -> Processor:
    """The callable for a processor name or ``module:function`` spec.

    Raises :class:`ConfigError` naming what was wrong.
    """
    if name in _cache:
        return _cache[name]
    target = available().get(name, name)
    if ":" not in target:
        known = ", ".join(sorted(available()))
        raise ConfigError(
            f"processor {name!r} is neither a registered name ({known}) nor 'module:function'"
        )
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"processor {name!r}: cannot import {module_name}: {exc}") from exc
    fn: Any = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ConfigError(f"processor {name!r}: {module_name} has no attribute {attr!r}")
    if not callable(fn):
        raise ConfigError(f"processor {name!r}: {target} is not callable")
    _cache[name] = fn
    return fn  # type: ignore[no-any-return]


def describe(name: str) -> str:
    """One line on what the processor ``name`` does, for ``batchd processors``:
    the first line of its docstring, or why it cannot be loaded."""
    try:
        fn = resolve(name)
    except ConfigError as exc:
        return f"cannot be loaded: {exc.message}"
    doc = (getattr(fn, "__doc__", None) or "").strip()
    return doc.splitlines()[0].strip() if doc else "(no description)"


def choose(settings: Settings, relpath: str) -> str:
    """The processor name for a file: the first ``[[route]]`` whose pattern
    matches (against the relative path or the bare file name), else
    ``processing.processor``."""
    filename = relpath.rsplit("/", 1)[-1]
    for route in settings.route:
        if fnmatch.fnmatch(relpath, route.match) or fnmatch.fnmatch(filename, route.match):
            return route.processor
    return settings.processing.processor
