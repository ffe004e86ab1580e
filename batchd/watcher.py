"""Watching the inbox folders and deciding when a drop is ready.

Filesystem events (watchdog) only say *where* to look; readiness is always
judged by looking: a drop is ready once its signature (size and mtime of a
file, or of every entry in a folder's tree) has held still for
``watch.settle_seconds``, or at once when a folder shows its marker file.
A full rescan at start and every ``watch.rescan_seconds`` catches whatever
events missed (queue overflow, network shares, a folder moved in whole).
"""

from __future__ import annotations

import contextlib
import os
import queue
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from batchd.clock import Clock
from batchd.config import PRIORITY_ORDER, Priority, WatchSettings
from batchd.members import is_member
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

Signature = tuple[object, ...]
#: How often a folder that waits (for its marker, or for content) is looked at
#: without an event; events bring the look forward.
WAITING_RELOOK_SECONDS = 1.0
# Events that say a file was read, not changed: no reason to look again.
_READ_ONLY_EVENTS = frozenset({"opened", "closed_no_write"})


@dataclass
class _Candidate:
    priority: Priority
    signature: Signature | None
    since: float
    look_now: bool = True
    #: settled but not ready (empty folder, or waiting for its marker).
    waiting: bool = False
    #: a drop_unreadable warning was logged for it (once per drop).
    reported: bool = False


@dataclass(frozen=True, slots=True)
class Seen:
    """One look at a drop."""

    signature: Signature
    is_folder: bool
    has_marker: bool
    members: int
    #: why the folder itself cannot be read (None: it can).
    problem: str | None = None


def look(path: Path, spool: Spool, marker: str) -> Seen | None:
    """Look at drop ``path`` (``None`` when it is gone).

    A folder's signature covers every entry of its tree, so a file added,
    grown or touched anywhere inside resets the settle timer. ``members``
    counts the files that would be processed (not the marker, not names
    matched by ``watch.ignore``); a subfolder that cannot be read counts as
    one (it will be a failed member). ``problem`` says why the folder itself
    cannot be read: batchd can then neither see nor move what is inside.

    Iterative, never following links, and bounded by the scan's caps
    (``limits.max_depth``, ``limits.max_entries_per_drop``): a drop over a
    cap stops being looked into and counts as one member, so it settles,
    is claimed and is refused by the scan with the reason.
    """
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return Seen((st.st_size, st.st_mtime_ns, st.st_ino), False, False, 1)
    limits = spool.settings.limits
    entries: list[tuple[str, int, int]] = []
    members = 0
    problem = None
    over_cap = False
    stack: list[tuple[str, int]] = [(str(path), 0)]
    while stack:
        dirpath, depth = stack.pop()
        try:
            names = os.listdir(dirpath)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if dirpath == str(path):
                problem = f"cannot read folder: {exc.strerror}"
            else:
                members += 1  # it will be a failed member
            continue
        for name in names:
            full = os.path.join(dirpath, name)
            try:
                est = os.lstat(full)
            except FileNotFoundError:
                continue
            entries.append((full, est.st_size, est.st_mtime_ns))
            if stat.S_ISDIR(est.st_mode):
                if depth + 1 > limits.max_depth:
                    over_cap = True
                else:
                    stack.append((full, depth + 1))
                continue
            if not is_member(name, depth == 0, spool.settings):
                continue
            members += 1
        if over_cap or len(entries) > limits.max_entries_per_drop:
            over_cap = True
            break
    entries.sort()
    has_marker = os.path.lexists(path / marker)
    # The mode too: a chmod (the fix for a refused folder) changes no mtime.
    signature = (st.st_mtime_ns, st.st_mode, tuple(entries))
    return Seen(signature, True, has_marker, max(members, int(over_cap)), problem)


class Readiness:
    """Tracks candidate drops and says which are ready. Pure logic; the clock
    is passed in so settle rules are tested without sleeping."""

    def __init__(self, spool: Spool, settings: WatchSettings, clock: Clock) -> None:
        self.spool = spool
        self.settings = settings
        self.clock = clock
        self._candidates: dict[Path, _Candidate] = {}
        #: drops batchd cannot claim, with the reason (see :meth:`refuse`).
        self.refused: dict[Path, str] = {}

    def touch(self, path: Path, priority: Priority) -> None:
        """Something happened at or under drop ``path``: look at it at the next poll.

        An event alone never resets the settle timer (a reader opening a file
        makes events too); only a changed signature does.
        """
        cand = self._candidates.get(path)
        if cand is None:
            self._candidates[path] = _Candidate(priority, None, self.clock.monotonic())
        else:
            cand.look_now = True

    def pending(self) -> int:
        return len(self._candidates)

    def next_check(self) -> float | None:
        """Seconds until :meth:`poll` may find something ready (None: nothing to wait for)."""
        if not self._candidates:
            return None
        now = self.clock.monotonic()
        settle = self.settings.settle_seconds
        soonest = min(
            0.0 if c.look_now else WAITING_RELOOK_SECONDS if c.waiting else c.since + settle - now
            for c in self._candidates.values()
        )
        # Re-look at least this often: a slow writer's change shows in the
        # signature even when no event reached us (network shares).
        return max(0.0, min(soonest, max(settle / 2, 0.05)))

    def poll(self) -> list[tuple[Path, Priority]]:
        """Drops that are ready now (they are forgotten: the caller claims them)."""
        ready = []
        now = self.clock.monotonic()
        settle = self.settings.settle_seconds
        for path, cand in list(self._candidates.items()):
            cand.look_now = False
            try:
                seen = (
                    None
                    if self.spool.ignored(path.name)
                    else look(path, self.spool, self.settings.marker)
                )
            except Exception as exc:
                # One drop that cannot be looked at must not stop the others.
                seen = None
                if not cand.reported:
                    log.error("drop_look_failed", path=str(path), error=repr(exc))
                cand.reported = cand.waiting = True
                continue
            if seen is None:
                del self._candidates[path]
                self.refused.pop(path, None)
                continue
            if seen.problem is not None:
                # Claiming needs to rename it, which needs write permission on
                # it; and what is inside cannot be seen. Say so once; it waits.
                if not cand.reported:
                    log.warning(
                        "drop_unreadable",
                        path=str(path),
                        error=seen.problem,
                        detail="it stays in the inbox until batchd may read and move it",
                    )
                    cand.reported = True
                cand.waiting = True
                continue
            cand.reported = False
            if path in self.refused:
                if seen.signature == cand.signature:
                    cand.waiting = True  # refused as it is: tried again when it changes
                    continue
                del self.refused[path]  # changed (a chmod, say): settles and is tried again
            if seen.has_marker:
                del self._candidates[path]
                ready.append((path, cand.priority))
                continue
            if seen.signature != cand.signature:
                cand.signature = seen.signature
                cand.since = now
            cand.waiting = False
            if seen.is_folder and (self.settings.folder_ready == "marker" or seen.members == 0):
                # Wait for the marker, or for something to process; events
                # bring the next look forward, a slow re-look catches the rest.
                cand.waiting = now - cand.since >= settle
                continue
            if now - cand.since >= settle:
                del self._candidates[path]
                ready.append((path, cand.priority))
        return ready

    def refuse(self, path: Path, priority: Priority, reason: str) -> bool:
        """Remember that ready drop ``path`` cannot be claimed, and why; it is
        looked at again when it changes. True the first time (log it once)."""
        first = self.refused.get(path) != reason
        self.refused[path] = reason
        seen = look(path, self.spool, self.settings.marker)
        self._candidates[path] = _Candidate(
            priority, seen.signature if seen else None, self.clock.monotonic(), False, True
        )
        return first

    def states(self) -> list[dict[str, str | None]]:
        """Every drop waiting in the inbox: priority, name, state and reason."""
        out: list[dict[str, str | None]] = []
        for path, cand in sorted(self._candidates.items()):
            reason = self.refused.get(path)
            if reason is not None:
                state = "refused"
            elif cand.reported:
                state, reason = "refused", "batchd cannot read this folder: give the group read"
            elif cand.waiting and cand.signature is not None:
                state = "waiting_marker"
                reason = (
                    f"waiting for its marker file {self.settings.marker!r}"
                    if self.settings.folder_ready == "marker"
                    else "settled, but holds no file to process yet"
                )
            else:
                state = "settling"
                reason = f"waiting until nothing changed for {self.settings.settle_seconds} s"
            out.append(
                {
                    "priority": str(cand.priority),
                    "name": path.name,
                    "state": state,
                    "reason": reason,
                }
            )
        return out


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
    ) -> None:
        self.spool = spool
        self.settings = settings
        self.clock = clock
        self.take = take
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
            observer = Observer()
        handler = _Handler(self.spool, self._events)
        for priority in PRIORITY_ORDER:
            folder = self.spool.inbox_for(priority)
            folder.mkdir(parents=True, exist_ok=True)
            st = folder.stat()
            self._inbox_ids[priority] = (st.st_dev, st.st_ino)
            observer.schedule(handler, str(folder), recursive=True)
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
                for path, priority in self.readiness.poll():
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

    def _take(self, path: Path, priority: Priority) -> None:
        try:
            self.take(path, priority)
        except ClaimRefused as exc:
            # Not an error of batchd's: the dropper must act. Logged once per
            # reason, without a traceback; shown in GET /api/inbox meanwhile.
            if self.readiness.refuse(path, priority, exc.message):
                log.warning("drop_refused", path=str(path), error=exc.message)
            return
        except Exception as exc:
            self._error(exc)
            log.exception("claim_failed", path=str(path))
            return
        self.readiness.refused.pop(path, None)

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
