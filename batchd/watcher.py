"""Watching the inbox folders: events and rescans, fed to the readiness rules.

Filesystem events (watchdog) only say *where* to look; whether a drop is
ready is judged by looking (:mod:`batchd.readiness`). A full rescan at start
and every ``watch.rescan_seconds`` catches whatever events missed (queue
overflow, network shares, a folder moved in whole).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

try:  # Linux: inotify; elsewhere Observer() picks the platform's own backend
    from watchdog.observers.inotify import InotifyEmitter
    from watchdog.observers.inotify_c import InotifyConstants, InotifyFD, Mask
except ImportError:  # pragma: no cover - not Linux
    InotifyEmitter = None  # type: ignore[assignment,misc]

from batchd.clock import Clock
from batchd.config import PRIORITY_ORDER, Priority, WatchSettings
from batchd.readiness import Readiness
from batchd.spool import ClaimRefused, Spool

log = structlog.get_logger("batchd.watcher")

#: Unexpected watcher errors within ERROR_WINDOW_SECONDS that make /healthz 503.
ERRORS_UNHEALTHY = 3
ERROR_WINDOW_SECONDS = 60.0


def _no_move_pairing_delay() -> None:
    """Stop watchdog holding every move-out event for half a second.

    watchdog's inotify backend keeps each IN_MOVED_FROM for
    ``InotifyMoveEventGrouper.delay`` (0.5 s) hoping to pair it with an
    IN_MOVED_TO, and every event queued behind it waits too. Each claim moves
    a drop out of the inbox, so with the default the *next* drop's event
    waits up to 0.5 s. batchd never needs the pairing (an event only means
    "look at this path again"), so the hold is turned off.
    """
    try:
        from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper
    except ImportError:  # not Linux, or a watchdog without the grouper
        return
    InotifyMoveEventGrouper.delay = 0.0


_no_move_pairing_delay()


if InotifyEmitter is not None:

    class _DropEmitter(InotifyEmitter):
        """watchdog's inotify emitter, asking the kernel only for what can make a drop ready.

        watchdog's default mask is every inotify event. In an inbox most of
        them say nothing batchd needs, and each costs a hop through
        watchdog's three threads before the handler drops it: a claim moving
        a drop out (IN_MOVED_FROM, seen as a deletion), deletions, and every
        open, read and close-without-write, of which readiness's own looks
        into dropped folders make several per look. What a drop does when it
        arrives or changes is all kept: created, moved in, written, closed
        after writing, chmod/touch (a folder made group-writable is claimed
        once it changes); and the inbox folder itself deleted or moved away.
        """

        def get_event_mask_from_filter(self) -> Mask:
            c = InotifyConstants
            return Mask(
                c.IN_CREATE
                | c.IN_MOVED_TO
                | c.IN_MODIFY
                | c.IN_CLOSE_WRITE
                | c.IN_ATTRIB
                | c.IN_DELETE_SELF
                | c.IN_MOVE_SELF
            )

    class _DropObserver(BaseObserver):
        """watchdog's InotifyObserver with :class:`_DropEmitter` (one inotify
        descriptor for the three inbox folders, as there)."""

        def __init__(self) -> None:
            self._inotify_fd = InotifyFD()
            self._inotify_fd.start()
            super().__init__(_DropEmitter, inotify_fd=self._inotify_fd)

        def on_thread_stop(self) -> None:
            super().on_thread_stop()
            self._inotify_fd.stop()
            self._inotify_fd.join()


def _native_observer() -> BaseObserver:
    """The platform's event observer: on Linux, inotify with batchd's narrow mask."""
    if InotifyEmitter is None:  # pragma: no cover - not Linux
        return Observer()
    return _DropObserver()


#: Takes several ready drops; one answer per drop, an exception where it failed.
TakeMany = Callable[[list[tuple[Path, Priority]]], Sequence[object]]

# Events that say a file was read, not changed: no reason to look again.
_READ_ONLY_EVENTS = frozenset({"opened", "closed_no_write"})


class _Handler(FileSystemEventHandler):
    def __init__(self, spool: Spool, events: queue.SimpleQueue[tuple[Priority, Path]]) -> None:
        self.spool = spool
        self.events = events

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Never let an exception escape into watchdog's thread: it would stop
        # the observer. Log it; the periodic rescan covers what we missed.
        if event.event_type in _READ_ONLY_EVENTS:
            return
        try:
            for raw in (event.src_path, getattr(event, "dest_path", "")):
                if not raw:
                    continue
                path = Path(os.fsdecode(raw))
                found = self.spool.priority_of(path)
                if found is not None:
                    self.events.put((found[0], found[1]))
        except Exception:
            log.exception("watch_event_failed", event=repr(event))


class Watcher:
    """The watcher thread: observer, readiness, rescans, and handing ready
    drops to ``take`` (the intake)."""

    def __init__(
        self,
        spool: Spool,
        settings: WatchSettings,
        clock: Clock,
        take: Callable[[Path, Priority], object],
        on_rescan: Callable[[], None] = lambda: None,
        on_restart: Callable[[], None] = lambda: None,
        take_many: TakeMany | None = None,
    ) -> None:
        self.spool = spool
        self.settings = settings
        self.clock = clock
        self.take = take
        #: several ready drops at once (one registration transaction); its
        #: answer has an entry per drop: the exception that drop raised, or not.
        self.take_many = take_many
        self.on_rescan = on_rescan
        self.on_restart = on_restart
        self.readiness = Readiness(spool, settings, clock)
        self._events: queue.SimpleQueue[tuple[Priority, Path]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._observer: BaseObserver | None = None
        self._inbox_ids: dict[Priority, tuple[int, int]] = {}
        self._thread = threading.Thread(target=self._run, name="batchd-watcher", daemon=True)
        self.restarts = 0
        self.last_rescan: float | None = None
        self._errors: list[float] = []
        self.last_error: str | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self._start_observer()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._events.put((Priority.NORMAL, Path("/")))  # wake the thread
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
        self._stop_observer()

    def is_alive(self) -> bool:
        """True while the watcher thread runs (health checks)."""
        return self._thread.is_alive()

    def _start_observer(self) -> None:
        observer: BaseObserver
        if self.settings.observer == "polling":
            observer = PollingObserver(timeout=self.settings.polling_interval_seconds)
        else:
            observer = _native_observer()
        handler = _Handler(self.spool, self._events)
        for priority in PRIORITY_ORDER:
            folder = self.spool.inbox_for(priority)
            folder.mkdir(parents=True, exist_ok=True)
            st = folder.stat()
            self._inbox_ids[priority] = (st.st_dev, st.st_ino)
            # Not recursive: a drop is a top-level entry, and readiness judges
            # a folder by looking at its whole tree (re-looked at least every
            # settle_seconds / 2), never by events from inside it. A recursive
            # watch made watchdog walk every folder moved in and raise an event
            # per file inside: ~0.6 ms of the daemon's CPU per file (issue 15).
            observer.schedule(handler, str(folder), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def _stop_observer(self) -> None:
        if self._observer is not None:
            with contextlib.suppress(Exception):
                self._observer.stop()
                self._observer.join(timeout=5)
            self._observer = None

    def _restart_observer(self, why: str) -> None:
        log.warning("watcher_restarted", reason=why)
        self.restarts += 1
        self.on_restart()
        self._stop_observer()
        self._start_observer()

    def _observer_healthy(self) -> str | None:
        """Why the observer must be restarted, or None."""
        if self._observer is None or not self._observer.is_alive():
            return "observer thread died"
        for priority in PRIORITY_ORDER:
            try:
                st = self.spool.inbox_for(priority).stat()
            except FileNotFoundError:
                return f"inbox/{priority.value} disappeared"
            if (st.st_dev, st.st_ino) != self._inbox_ids.get(priority):
                return f"inbox/{priority.value} was replaced"
        return None

    # -- the loop --------------------------------------------------------------

    def rescan(self) -> None:
        """Look at every entry in the inbox folders (start-up and periodically)."""
        for priority, path in self.spool.drops():
            self.readiness.touch(path, priority)
        self.last_rescan = self.clock.monotonic()
        self.on_rescan()

    def _run(self) -> None:
        next_rescan = self.clock.monotonic()
        while not self._stop.is_set():
            try:
                now = self.clock.monotonic()
                if now >= next_rescan:
                    problem = self._observer_healthy()
                    if problem:
                        self._restart_observer(problem)
                    self.rescan()
                    next_rescan = now + self.settings.rescan_seconds
                wait = self.readiness.next_check()
                until_rescan = max(0.0, next_rescan - self.clock.monotonic())
                timeout = until_rescan if wait is None else min(wait, until_rescan)
                # Observer health is checked at least every second, not only
                # at rescans, so a dead observer costs at most a second.
                timeout = min(timeout, 1.0)
                try:
                    priority, path = self._events.get(timeout=timeout)
                    self._note(priority, path)
                    while True:  # drain a burst in one go
                        priority, path = self._events.get_nowait()
                        self._note(priority, path)
                except queue.Empty:
                    pass
                if self._stop.is_set():
                    break
                problem = self._observer_healthy()
                if problem:
                    self._restart_observer(problem)
                    next_rescan = self.clock.monotonic()
                ready = self.readiness.poll()
                if self.take_many is not None and len(ready) > 1:
                    self._take_many(ready)
                else:
                    for path, priority in ready:
                        if self._stop.is_set():
                            break
                        self._take(path, priority)
            except Exception as exc:
                # One bad drop or a transient error must not stop watching.
                self._error(exc)
                log.exception("watcher_error")
                self._stop.wait(0.5)

    def _note(self, priority: Priority, path: Path) -> None:
        if path == Path("/"):
            return
        self.readiness.touch(path, priority)

    def _take_many(self, ready: list[tuple[Path, Priority]]) -> None:
        assert self.take_many is not None
        try:
            answers = self.take_many(ready)
        except Exception as exc:
            self._error(exc)
            log.exception("claim_failed", path=str(ready[0][0]), drops=len(ready))
            return
        for (path, priority), answer in zip(ready, answers, strict=True):
            self._taken(path, priority, answer if isinstance(answer, Exception) else None)

    def _take(self, path: Path, priority: Priority) -> None:
        try:
            self.take(path, priority)
        except Exception as exc:
            self._taken(path, priority, exc)
            return
        self._taken(path, priority, None)

    def _taken(self, path: Path, priority: Priority, error: Exception | None) -> None:
        """What a claim's outcome means for the drop: refused (logged once), failed, or gone."""
        if error is None:
            self.readiness.refused.pop(path, None)
            return
        if isinstance(error, ClaimRefused):
            # Not an error of batchd's: the dropper must act. Logged once per
            # reason, without a traceback; shown in GET /api/inbox meanwhile.
            if self.readiness.refuse(path, priority, error.message):
                log.warning("drop_refused", path=str(path), error=error.message)
            return
        self._error(error)
        log.error("claim_failed", path=str(path), exc_info=error)

    def _error(self, exc: BaseException) -> None:
        """Count an unexpected error; several in a short time make /healthz say so."""
        now = self.clock.monotonic()
        self._errors = [t for t in self._errors if now - t < ERROR_WINDOW_SECONDS] + [now]
        self.last_error = f"{type(exc).__name__}: {exc}"

    def problem(self) -> str | None:
        """Why the watcher is unhealthy now (repeated errors), or None."""
        now = self.clock.monotonic()
        recent = [t for t in self._errors if now - t < ERROR_WINDOW_SECONDS]
        if len(recent) >= ERRORS_UNHEALTHY:
            return (
                f"{len(recent)} watcher errors in the last {ERROR_WINDOW_SECONDS:.0f} s,"
                f" the last: {self.last_error} (see the log: watcher_error, claim_failed)"
            )
        return None

    def inbox(self) -> list[dict[str, str | None]]:
        """Drops waiting in the inbox (``GET /api/inbox``)."""
        return self.readiness.states()
