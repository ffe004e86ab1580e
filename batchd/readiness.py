"""Deciding when a drop in the inbox is ready to claim.

Readiness is always judged by looking, never by events alone: a drop is
ready once its signature (size and mtime of a file, or of every entry in a
folder's tree) has held still for ``watch.settle_seconds``, or at once when
a folder shows its marker file. The clock is passed in, so the settle rules
are tested without sleeping. :class:`batchd.watcher.Watcher` feeds
:class:`Readiness` the paths that events and rescans name.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import structlog

from batchd.clock import Clock
from batchd.config import Priority, WatchSettings
from batchd.members import is_member
from batchd.spool import Spool

# The watcher's logger: operators know these events by it.
log = structlog.get_logger("batchd.watcher")

Signature = tuple[object, ...]
#: How often a folder that waits (for its marker, or for content) is looked at
#: without an event; events bring the look forward.
WAITING_RELOOK_SECONDS = 1.0


@dataclass
class _Candidate:
    priority: Priority
    signature: Signature | None
    since: float
    #: when :meth:`Readiness.poll` looks at it next (clock time; 0.0: at the
    #: next poll, as after an event).
    next_look: float = 0.0
    #: settled but not ready (empty folder, or waiting for its marker).
    waiting: bool = False
    #: a drop_unreadable warning was logged for it (once per drop).
    reported: bool = False
    #: why it cannot be read, with the command that fixes it (GET /api/inbox).
    problem: str | None = None


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
                problem = f"cannot read folder: {exc.strerror}: " + spool.access_fix(
                    path, st, "it is not readable by the group", "rwX"
                )
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
    # The mode, and the ctime: a chmod, a chgrp or an ACL given (the fixes
    # for a refused folder: one moved in keeps its dropper's group) changes
    # no mtime, and a chgrp or an ACL no mode either.
    signature = (st.st_mtime_ns, st.st_ctime_ns, st.st_mode, tuple(entries))
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
        #: the ``watch.ignore`` the candidates were admitted under (see :meth:`poll`).
        self._ignore = spool.settings.watch.ignore
        #: the ``settle_seconds`` their next looks were scheduled with.
        self._settle = settings.settle_seconds
        #: what the last poll saw of each drop it found ready: the baseline a
        #: refusal of that drop waits to see changed (see :meth:`refuse`).
        self._handed: dict[Path, Signature] = {}

    def touch(self, path: Path, priority: Priority) -> None:
        """Something happened at or under drop ``path``: look at it at the next poll.

        An event alone never resets the settle timer (a reader opening a file
        makes events too); only a changed signature does. A drop whose own
        name is ignored (work in progress) is not a candidate at all: it
        comes back under its final name.
        """
        cand = self._candidates.get(path)
        if cand is not None:
            cand.next_look = 0.0
        elif not self.spool.ignored(path.name):
            self._candidates[path] = _Candidate(priority, None, self.clock.monotonic())

    def pending(self) -> int:
        return len(self._candidates)

    def next_check(self) -> float | None:
        """Seconds until :meth:`poll` may find something ready (None: nothing to wait for)."""
        if not self._candidates:
            return None
        soonest = min(c.next_look for c in self._candidates.values())
        return max(0.0, soonest - self.clock.monotonic())

    def _schedule(self, cand: _Candidate, now: float) -> None:
        """When to look at ``cand`` again, without an event.

        A settling drop at its settle deadline, and at least every
        ``settle_seconds / 2`` before it: a slow writer's change shows in the
        signature even when no event reached us (network shares, or a marker
        written inside a dropped folder: the inbox watch is not recursive).
        One that waits (for its marker, for content, to be readable, to change
        after a refusal) as often, and at most every
        ``WAITING_RELOOK_SECONDS``; events bring any look forward.
        """
        settle = self.settings.settle_seconds
        relook = max(settle / 2, 0.05)
        if cand.waiting:
            cand.next_look = now + min(WAITING_RELOOK_SECONDS, relook)
        else:
            cand.next_look = min(cand.since + settle, now + relook)

    def poll(self) -> list[tuple[Path, Priority]]:
        """Drops that are ready now (they are forgotten: the caller claims them).

        Only the candidates due a look are looked at (an event named them, or
        their time in :meth:`_schedule` came): with a steady stream of drops
        each settling for a second, looking at every candidate on every
        event made the watcher's work grow with the square of the stream
        (a third of the daemon's CPU at 300 loose files/s, issue 15).
        """
        ready = []
        now = self.clock.monotonic()
        settle = self.settings.settle_seconds
        self._handed.clear()
        if self.spool.settings.watch.ignore != self._ignore:
            # A reload changed watch.ignore ("at once"): a candidate whose
            # name is now work in progress is no longer one (touch() would
            # not have admitted it).
            self._ignore = self.spool.settings.watch.ignore
            for path in [p for p in self._candidates if self.spool.ignored(p.name)]:
                del self._candidates[path]
                self.refused.pop(path, None)
        if settle != self._settle:
            # A reload changed settle_seconds ("at once"): the looks scheduled
            # with the old one may be far later than the new one allows.
            self._settle = settle
            for cand in self._candidates.values():
                cand.next_look = 0.0
        for path, cand in list(self._candidates.items()):
            if cand.next_look > now:
                continue
            try:
                seen = look(path, self.spool, self.settings.marker)
            except Exception as exc:
                # One drop that cannot be looked at must not stop the others.
                if not cand.reported:
                    log.error("drop_look_failed", path=str(path), error=repr(exc))
                cand.reported = cand.waiting = True
                self._schedule(cand, now)
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
                cand.problem = seen.problem
                cand.waiting = True
                self._schedule(cand, now)
                continue
            cand.reported = False
            cand.problem = None
            if path in self.refused:
                if seen.signature == cand.signature:
                    cand.waiting = True  # refused as it is: tried again when it changes
                    self._schedule(cand, now)
                    continue
                del self.refused[path]  # changed (a chmod, say): settles and is tried again
            if seen.has_marker:
                del self._candidates[path]
                self._handed[path] = seen.signature
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
                self._schedule(cand, now)
                continue
            if now - cand.since >= settle:
                del self._candidates[path]
                self._handed[path] = seen.signature
                ready.append((path, cand.priority))
                continue
            self._schedule(cand, now)
        return ready

    def refuse(self, path: Path, priority: Priority, reason: str) -> bool:
        """Remember that ready drop ``path`` cannot be claimed, and why; it is
        looked at again when it changes. True the first time (log it once)."""
        first = self.refused.get(path) != reason
        self.refused[path] = reason
        # The drop as it was found ready, before the claim was tried: a fix
        # (a chmod, a chgrp) made while the claim failed is then a change that
        # gets it tried again. A fresh look would take the fix as the baseline.
        signature = self._handed.pop(path, None)
        if signature is None:
            seen = look(path, self.spool, self.settings.marker)
            signature = seen.signature if seen else None
        now = self.clock.monotonic()
        cand = _Candidate(priority, signature, now, waiting=True)
        self._schedule(cand, now)
        self._candidates[path] = cand
        return first

    def states(self) -> list[dict[str, str | None]]:
        """Every drop waiting in the inbox: priority, name, state and reason."""
        out: list[dict[str, str | None]] = []
        for path, cand in sorted(self._candidates.items()):
            reason = self.refused.get(path)
            if reason is not None:
                state = "refused"
            elif cand.reported:
                state = "refused"
                reason = cand.problem or "batchd cannot read this folder: give the group read"
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
