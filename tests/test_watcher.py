"""Tests for batchd.watcher: readiness rules on a fake clock, and the real watcher thread."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from batchd import safefs
from batchd.clock import SystemClock
from batchd.config import Priority
from batchd.readiness import Readiness
from batchd.spool import ClaimRefused, Spool
from batchd.testing import wait_until
from batchd.testing.settings import make_settings
from batchd.watcher import Watcher

CSV = b"name,qty\napple,3\n"
from fakes import FakeClock  # noqa: E402

WAIT_SECONDS = 15.0


def write(path: Path, data: bytes = CSV) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# -- Readiness on a fake clock ----------------------------------------------------------


class Harness:
    """A Readiness over a real spool, driven by a fake clock."""

    def __init__(self, tmp_path: Path, **env: str) -> None:
        env.setdefault("watch__settle_seconds", "1.0")
        self.settings = make_settings(tmp_path, **env)
        self.spool = Spool(self.settings)
        self.spool.init()
        self.clock = FakeClock(1000.0)
        self.readiness = Readiness(self.spool, self.settings.watch, self.clock)
        self.inbox = self.spool.inbox_for(Priority.NORMAL)

    def touch(self, path: Path, priority: Priority = Priority.NORMAL) -> None:
        self.readiness.touch(path, priority)

    def poll(self) -> list[Path]:
        return [path for path, _priority in self.readiness.poll()]

    def poll_after(self, seconds: float) -> list[Path]:
        self.clock.advance(seconds)
        return self.poll()


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def test_loose_file_ready_after_settle(h: Harness) -> None:
    """A loose file is ready only once it has been unchanged for settle_seconds."""
    path = write(h.inbox / "a.csv")
    h.touch(path)
    assert h.poll() == []
    assert h.poll_after(0.5) == []
    assert h.poll_after(0.499) == []
    assert h.poll_after(0.001) == [path]
    assert h.readiness.pending() == 0


def test_ready_drop_reports_its_priority(h: Harness) -> None:
    """poll hands back the priority the drop was touched with."""
    path = write(h.spool.inbox_for(Priority.HIGH) / "a.csv")
    h.touch(path, Priority.HIGH)
    h.poll()
    h.clock.advance(1.0)
    assert h.readiness.poll() == [(path, Priority.HIGH)]


def test_size_change_resets_the_timer(h: Harness) -> None:
    """A file that grows restarts its settle period."""
    path = write(h.inbox / "a.csv")
    h.touch(path)
    h.poll()
    h.clock.advance(0.8)
    path.write_bytes(CSV * 2)
    assert h.poll() == []
    assert h.poll_after(0.9) == []
    assert h.poll_after(0.1) == [path]


def test_mtime_change_resets_the_timer(h: Harness) -> None:
    """A file rewritten with the same size but a new mtime restarts its settle period."""
    path = write(h.inbox / "a.csv")
    h.touch(path)
    h.poll()
    h.clock.advance(0.8)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert h.poll() == []
    assert h.poll_after(0.9) == []
    assert h.poll_after(0.1) == [path]


def test_an_event_alone_does_not_reset_the_timer(h: Harness) -> None:
    """touch() on an unchanged file (a reader opened it) does not restart settling."""
    path = write(h.inbox / "a.csv")
    h.touch(path)
    h.poll()
    h.clock.advance(0.9)
    h.touch(path)
    assert h.poll() == []
    assert h.poll_after(0.1) == [path]


def test_settle_zero_is_ready_at_first_poll(tmp_path: Path) -> None:
    """With settle_seconds = 0 a file is ready at the first poll."""
    h = Harness(tmp_path, watch__settle_seconds="0")
    path = write(h.inbox / "a.csv")
    h.touch(path)
    assert h.poll() == [path]


def test_folder_waits_for_its_tree_to_settle(h: Harness) -> None:
    """A change deep inside a folder restarts the folder's settle period."""
    drop = h.inbox / "drop"
    write(drop / "a" / "b" / "c.csv")
    h.touch(drop)
    h.poll()
    h.clock.advance(0.9)
    write(drop / "a" / "b" / "c.csv", CSV * 3)
    assert h.poll() == []
    h.clock.advance(0.9)
    write(drop / "a" / "new.csv")
    assert h.poll() == []
    assert h.poll_after(0.9) == []
    assert h.poll_after(0.1) == [drop]


def test_marker_makes_a_folder_ready_at_once(h: Harness) -> None:
    """A folder with the marker at its top is ready at the first poll."""
    drop = h.inbox / "drop"
    write(drop / "a.csv")
    write(drop / ".ready", b"")
    h.touch(drop)
    assert h.poll() == [drop]


def test_marker_mode_ignores_settling(tmp_path: Path) -> None:
    """With folder_ready = "marker" a settled folder waits for its marker."""
    h = Harness(tmp_path, watch__folder_ready="marker")
    drop = h.inbox / "drop"
    write(drop / "a.csv")
    h.touch(drop)
    assert h.poll() == []
    assert h.poll_after(3600) == []
    write(drop / ".ready", b"")
    # No event names it (the inbox watch is not recursive): the re-look,
    # at most settle_seconds / 2 later, finds the marker.
    assert h.poll_after(0.5) == [drop]


def test_marker_mode_still_settles_loose_files(tmp_path: Path) -> None:
    """folder_ready = "marker" applies to folders; a loose file still settles."""
    h = Harness(tmp_path, watch__folder_ready="marker")
    path = write(h.inbox / "a.csv")
    h.touch(path)
    h.poll()
    assert h.poll_after(1.0) == [path]


def test_empty_folder_is_never_ready(h: Harness) -> None:
    """An empty folder waits, however long, and is still a candidate."""
    drop = h.inbox / "drop"
    (drop / "sub").mkdir(parents=True)
    h.touch(drop)
    assert h.poll() == []
    assert h.poll_after(3600) == []
    assert h.readiness.pending() == 1


@pytest.mark.parametrize("mode", ["settle", "marker"])
def test_waiting_folder_does_not_ask_for_a_busy_loop(tmp_path: Path, mode: str) -> None:
    """A folder that is waiting (empty, or for its marker) is re-looked at a relaxed pace."""
    h = Harness(tmp_path, watch__folder_ready=mode)
    drop = h.inbox / "drop"
    if mode == "marker":
        write(drop / "a.csv")
    else:
        drop.mkdir()
    h.touch(drop)
    h.poll()
    assert h.poll_after(60) == []
    wait = h.readiness.next_check()
    assert wait is not None and wait > 0


def test_folder_of_ignored_names_is_never_ready(h: Harness) -> None:
    """A folder holding only ignored names (partial uploads) is not ready."""
    drop = h.inbox / "drop"
    write(drop / "big.pdf.part", b"%PDF-")
    write(drop / ".~lock", b"")
    h.touch(drop)
    h.poll()
    assert h.poll_after(3600) == []
    (drop / "big.pdf.part").rename(drop / "big.pdf")
    assert h.poll() == []
    assert h.poll_after(0.5) == []  # the re-look sees the change: settling starts
    assert h.poll_after(0.999) == []
    assert h.poll_after(0.001) == [drop]


def test_vanished_candidate_is_dropped(h: Harness) -> None:
    """A candidate that disappears is forgotten, never reported ready."""
    path = write(h.inbox / "a.csv")
    h.touch(path)
    h.poll()
    path.unlink()
    assert h.poll_after(5) == []
    assert h.readiness.pending() == 0
    assert h.readiness.next_check() is None


@pytest.mark.parametrize("name", ["a.tmp", "b.part", ".hidden", "~$book.xlsx", "x.crdownload"])
def test_ignored_top_level_name_never_ready(h: Harness, name: str) -> None:
    """A drop whose own name is ignored (work in progress) never becomes ready."""
    path = write(h.inbox / name)
    h.touch(path)
    assert h.poll() == []
    assert h.poll_after(3600) == []
    assert h.readiness.pending() == 0


def test_a_candidate_whose_name_a_reload_ignores_is_never_ready(tmp_path: Path) -> None:
    """watch.ignore applies at once on a reload (README): a drop already being
    looked at whose name the new list ignores (a writer's in-progress suffix)
    is not claimed once it settles, as touch() would not admit it now."""
    h = Harness(tmp_path)
    path = write(h.inbox / "big.pdf.upload")
    h.touch(path)
    assert h.poll() == []
    # What Daemon.reload does with the new settings.
    new = make_settings(tmp_path, watch__settle_seconds="1.0", watch__ignore='["*.upload"]')
    h.spool.settings = new
    h.readiness.settings = new.watch
    assert h.poll_after(3600) == []
    assert h.readiness.pending() == 0
    path.rename(h.inbox / "big.pdf")
    h.touch(h.inbox / "big.pdf")
    assert h.poll() == []
    assert h.poll_after(1.0) == [h.inbox / "big.pdf"]


def test_a_shorter_settle_from_a_reload_applies_to_the_drops_already_settling(
    tmp_path: Path,
) -> None:
    """settle_seconds applies at once on a reload (README): a file that has
    held still longer than the new settle time is ready at the next poll, not
    when the look scheduled with the old settle time (60 s: every 30 s) comes."""
    h = Harness(tmp_path, watch__settle_seconds="60")
    path = write(h.inbox / "a.csv")
    h.touch(path)
    assert h.poll() == []
    assert h.poll_after(2) == []
    new = make_settings(tmp_path, watch__settle_seconds="1.0")
    h.spool.settings = new
    h.readiness.settings = new.watch
    # The watcher thread polls at least every second whatever next_check says.
    assert h.poll_after(0.1) == [path]


def test_a_poll_looks_only_at_the_drops_that_are_due(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event makes the next poll look at the drop it names, not at every
    candidate: with a steady stream of drops settling, looking at all of them
    on every event made the watcher's work grow with the square of the stream."""
    import batchd.readiness as readiness

    looked: list[str] = []
    real_look = readiness.look

    def counting_look(path: Path, spool: Spool, marker: str) -> object:
        looked.append(path.name)
        return real_look(path, spool, marker)

    monkeypatch.setattr(readiness, "look", counting_look)
    paths = [write(h.inbox / f"f{i:03d}.csv") for i in range(100)]
    for path in paths:
        h.touch(path)
    assert h.poll() == []
    assert len(looked) == 100
    looked.clear()
    new = write(h.inbox / "new.csv")
    h.touch(new)
    h.clock.advance(0.1)
    assert h.poll() == []
    assert looked == ["new.csv"]
    # Each is still looked at every settle_seconds / 2, and ready on time.
    looked.clear()
    assert h.poll_after(0.4) == []
    assert sorted(looked) == sorted(p.name for p in paths)
    assert sorted(h.poll_after(0.5)) == paths
    assert h.poll_after(0.1) == [new]


def test_next_check_waits_for_settling(h: Harness) -> None:
    """next_check is 0 for a fresh touch and at most half the settle time afterwards."""
    assert h.readiness.next_check() is None
    path = write(h.inbox / "a.csv")
    h.touch(path)
    assert h.readiness.next_check() == 0.0
    h.poll()
    assert h.readiness.next_check() == pytest.approx(0.5)


# -- the watcher thread ---------------------------------------------------------------------


class Taker:
    """A take() callback that claims drops by moving them out of the inbox, like intake."""

    def __init__(self, dest: Path, fail: Callable[[Path], bool] = lambda path: False) -> None:
        self.dest = dest
        self.dest.mkdir()
        self.fail = fail
        self.taken: list[tuple[str, Priority]] = []
        self.calls = 0

    def __call__(self, path: Path, priority: Priority) -> None:
        self.calls += 1
        if self.fail(path):
            raise RuntimeError(f"cannot take {path.name}")
        os.rename(path, self.dest / path.name)
        self.taken.append((path.name, priority))

    def names(self) -> list[str]:
        return [name for name, _priority in self.taken]


@pytest.fixture
def start_watcher(tmp_path: Path) -> Iterator[Callable[..., tuple[Watcher, Spool, Taker]]]:
    started: list[Watcher] = []

    def start(
        fail: Callable[[Path], bool] = lambda path: False, **env: str
    ) -> tuple[Watcher, Spool, Taker]:
        env.setdefault("watch__settle_seconds", "0.2")
        # A long rescan period: what is handed over below came through events.
        env.setdefault("watch__rescan_seconds", "600")
        settings = make_settings(tmp_path, **env)
        spool = Spool(settings)
        spool.init()
        taker = Taker(tmp_path / "taken", fail)
        watcher = Watcher(spool, settings.watch, SystemClock(), taker)
        watcher.start()
        started.append(watcher)
        return watcher, spool, taker

    yield start
    for watcher in started:
        watcher.stop()


def test_watcher_hands_over_a_new_file(
    start_watcher: Callable[..., tuple[Watcher, Spool, Taker]],
) -> None:
    """A file written into an inbox is handed to take() with its inbox's priority."""
    watcher, spool, taker = start_watcher()
    write(spool.inbox_for(Priority.HIGH) / "a.csv")
    assert wait_until(lambda: taker.taken == [("a.csv", Priority.HIGH)])
    assert watcher.is_alive()


def test_watcher_picks_up_drops_present_at_start(tmp_path: Path) -> None:
    """Drops already waiting when the watcher starts are found by the first rescan."""
    settings = make_settings(tmp_path, watch__settle_seconds="0.1", watch__rescan_seconds="600")
    spool = Spool(settings)
    spool.init()
    write(spool.inbox_for(Priority.LOW) / "early.csv")
    taker = Taker(tmp_path / "taken")
    watcher = Watcher(spool, settings.watch, SystemClock(), taker)
    watcher.start()
    try:
        assert wait_until(lambda: taker.taken == [("early.csv", Priority.LOW)])
    finally:
        watcher.stop()


def test_folder_moved_in_is_handed_over_once(
    tmp_path: Path, start_watcher: Callable[..., tuple[Watcher, Spool, Taker]]
) -> None:
    """A folder renamed into the inbox from outside is handed over once, whole."""
    _watcher, spool, taker = start_watcher()
    outside = tmp_path / "outside" / "drop"
    write(outside / "a.csv")
    write(outside / "sub" / "b.csv")
    os.rename(outside, spool.inbox_for(Priority.NORMAL) / "drop")
    assert wait_until(lambda: "drop" in taker.names())
    # A second drop flushes anything still queued for the first one.
    write(spool.inbox_for(Priority.NORMAL) / "after.csv")
    assert wait_until(lambda: "after.csv" in taker.names())
    assert taker.names() == ["drop", "after.csv"]
    assert (taker.dest / "drop" / "sub" / "b.csv").read_bytes() == CSV


def test_files_in_a_new_subfolder_are_included(
    start_watcher: Callable[..., tuple[Watcher, Spool, Taker]],
) -> None:
    """Files appearing in a brand-new subfolder of a waiting drop are handed over with it."""
    watcher, spool, taker = start_watcher()
    drop = spool.inbox_for(Priority.NORMAL) / "drop"
    drop.mkdir()
    assert wait_until(lambda: watcher.readiness.pending() == 1)
    (drop / "new").mkdir()
    (drop / "new" / "deeper").mkdir()
    write(drop / "new" / "deeper" / "c.csv")
    assert wait_until(lambda: "drop" in taker.names())
    write(spool.inbox_for(Priority.NORMAL) / "after.csv")
    assert wait_until(lambda: "after.csv" in taker.names())
    assert taker.names() == ["drop", "after.csv"]
    assert (taker.dest / "drop" / "new" / "deeper" / "c.csv").read_bytes() == CSV


def test_failing_take_does_not_stop_the_watcher(
    start_watcher: Callable[..., tuple[Watcher, Spool, Taker]],
) -> None:
    """An exception from take() for one drop leaves the watcher handing over the next."""
    watcher, spool, taker = start_watcher(fail=lambda path: path.name == "bad.csv")
    write(spool.inbox_for(Priority.NORMAL) / "bad.csv")
    assert wait_until(lambda: taker.calls >= 1)
    write(spool.inbox_for(Priority.NORMAL) / "good.csv")
    assert wait_until(lambda: "good.csv" in taker.names())
    assert watcher.is_alive()


def test_dead_observer_is_restarted(
    start_watcher: Callable[..., tuple[Watcher, Spool, Taker]],
) -> None:
    """A stopped observer is replaced (restarts counts it) and new files still arrive."""
    restarts_at_rescan: list[int] = []
    watcher, spool, taker = start_watcher()
    watcher.on_rescan = lambda: restarts_at_rescan.append(watcher.restarts)
    old = watcher._observer
    assert old is not None
    old.stop()
    assert wait_until(lambda: watcher.restarts >= 1)
    # The restart triggers a rescan; after it, only the new observer's events remain.
    assert wait_until(lambda: any(n >= 1 for n in restarts_at_rescan))
    assert watcher._observer is not old
    write(spool.inbox_for(Priority.NORMAL) / "late.csv")
    assert wait_until(lambda: "late.csv" in taker.names())
    assert watcher.restarts == 1


def test_polling_observer_works(start_watcher: Callable[..., tuple[Watcher, Spool, Taker]]) -> None:
    """With observer = "polling" new files and folders are handed over too."""
    _watcher, spool, taker = start_watcher(
        watch__observer="polling", watch__polling_interval_seconds="0.1"
    )
    write(spool.inbox_for(Priority.LOW) / "a.csv")
    write(spool.inbox_for(Priority.HIGH) / "drop" / "b.csv")
    assert wait_until(lambda: len(taker.taken) == 2)
    assert sorted(taker.taken) == [("a.csv", Priority.LOW), ("drop", Priority.HIGH)]


def test_stop_ends_the_thread(start_watcher: Callable[..., tuple[Watcher, Spool, Taker]]) -> None:
    """stop() ends the watcher thread and its observer."""
    watcher, _spool, _taker = start_watcher()
    watcher.stop()
    assert not watcher.is_alive()
    assert watcher._observer is None


# -- deep drops, refusals, errors ------------------------------------------------------


def test_look_at_a_very_deep_drop_does_not_recurse(h: Harness) -> None:
    """A drop 1,500 levels deep is looked at without RecursionError and becomes ready
    (the scan then refuses it)."""
    top = h.inbox / "deep"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1500):
        os.mkdir("d", dir_fd=fd)
        new = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = new
    os.close(fd)
    h.touch(top)
    assert h.poll() == []
    assert h.poll_after(1.5) == [top]
    safefs.remove_tree(top)  # pytest's own clean-up of tmp_path recurses per level


def _found_ready(h: Harness, name: str, mode: int | None = None) -> Path:
    """Drop folder ``name`` (one CSV, ``mode`` when given) and let it settle
    until the poll hands it out, as it is before a claim is tried."""
    drop = h.inbox / name
    write(drop / "a.csv")
    if mode is not None:
        drop.chmod(mode)
    h.touch(drop)
    h.poll()
    assert h.poll_after(1.5) == [drop]
    return drop


def test_a_fix_made_while_the_claim_failed_gets_the_drop_tried_again(h: Harness) -> None:
    """The refusal's baseline is the drop as it was found ready, not a look after
    the failed claim: a chmod landing between the two is a change, and the drop
    settles and is tried again (it used to wait for another change)."""
    drop = _found_ready(h, "private", 0o2750)
    drop.chmod(0o2770)  # the user's fix, while batchd's claim fails
    assert h.readiness.refuse(drop, Priority.NORMAL, "run chmod -R g+w")
    assert h.poll_after(0.5) == []  # the re-look sees the change: it settles again
    assert h.readiness.states()[0]["state"] == "settling"
    assert h.poll_after(1.0) == [drop]


def test_refused_drop_waits_until_it_changes(h: Harness) -> None:
    """A drop refused at its claim is listed as refused with the reason and not tried
    again until it changes (a chmod counts)."""
    drop = _found_ready(h, "private")
    assert h.readiness.refuse(drop, Priority.NORMAL, "run chmod -R g+w")
    assert not h.readiness.refuse(drop, Priority.NORMAL, "run chmod -R g+w")  # logged once
    assert h.readiness.states() == [
        {"priority": "normal", "name": "private", "state": "refused", "reason": "run chmod -R g+w"}
    ]
    assert h.poll_after(5) == []
    drop.chmod(0o2770)
    h.touch(drop)
    assert h.poll() == []
    assert h.readiness.states()[0]["state"] == "settling"
    assert h.poll_after(1.5) == [drop]


def test_refused_folder_is_tried_again_after_a_chgrp(h: Harness) -> None:
    """A folder moved in from a home folder keeps its owner's group, so batchd
    (not in it) cannot rename it even with mode 775: refused. The fix is a
    chgrp (or chown), which changes neither mode nor mtime; the drop is still
    tried again once it changes."""
    drop = _found_ready(h, "moved-in", 0o775)
    assert h.readiness.refuse(drop, Priority.NORMAL, "not writable by batchd")
    assert h.poll_after(5) == []
    gid = drop.stat().st_gid
    other = next((g for g in {*os.getgroups(), os.getgid(), 0, 1} if g != gid), None)
    try:
        os.chown(drop, -1, other if other is not None else -1)
    except PermissionError:
        pytest.skip("no other group to give the folder")
    assert drop.stat().st_gid != gid
    h.touch(drop)  # the IN_ATTRIB event
    assert h.poll() == []
    assert h.poll_after(1.5) == [drop]


def test_repeated_take_errors_make_the_watcher_unhealthy(
    start_watcher: Callable[..., tuple[Watcher, Spool, Taker]],
) -> None:
    """Three unexpected errors within a minute give a problem naming the last error."""
    watcher, spool, taker = start_watcher(fail=lambda path: path.name.startswith("bad"))
    assert watcher.problem() is None
    for i in range(3):
        write(spool.inbox_for(Priority.NORMAL) / f"bad{i}.csv")
    assert wait_until(lambda: taker.calls >= 3)
    problem = watcher.problem()
    assert problem is not None and "3 watcher errors" in problem and "cannot take" in problem


def test_drops_ready_together_go_to_take_many_in_one_call(tmp_path: Path) -> None:
    """Drops present at a rescan are handed to take_many() at once; a refusal marks its drop."""
    settings = make_settings(tmp_path, watch__settle_seconds="0.1", watch__rescan_seconds="600")
    spool = Spool(settings)
    spool.init()
    for name in ("a.csv", "b.csv", "no.csv"):
        write(spool.inbox_for(Priority.NORMAL) / name)
    taker = Taker(tmp_path / "taken")
    calls: list[list[str]] = []

    def take_many(drops: list[tuple[Path, Priority]]) -> list[object]:
        calls.append([path.name for path, _p in drops])
        answers: list[object] = []
        for path, priority in drops:
            if path.name == "no.csv":
                answers.append(ClaimRefused("no.csv: refused (test)"))
            else:
                taker(path, priority)
                answers.append(None)
        return answers

    watcher = Watcher(spool, settings.watch, SystemClock(), taker, take_many=take_many)
    watcher.start()
    try:
        assert wait_until(lambda: len(taker.taken) == 2)
        assert calls[0] == ["a.csv", "b.csv", "no.csv"]
        assert wait_until(lambda: watcher.inbox() and watcher.inbox()[0]["state"] == "refused")
        assert watcher.inbox()[0]["reason"] == "no.csv: refused (test)"
        assert watcher.is_alive()
    finally:
        watcher.stop()


@pytest.mark.skipif(sys.platform != "linux", reason="inotify is Linux's")
def test_native_observer_reports_what_makes_a_drop_ready_and_nothing_else(tmp_path: Path) -> None:
    """On Linux the observer asks inotify only for what can make a drop ready:
    created, moved in (also a rename inside the inbox), written, closed after
    writing, chmod. Not a claim moving a drop out, a deletion, or a reader
    opening and closing a file: each of those cost a hop through watchdog's
    threads for an event the handler then dropped."""
    from watchdog.events import FileSystemEvent, FileSystemEventHandler

    from batchd.watcher import _native_observer

    inbox, elsewhere = tmp_path / "inbox", tmp_path / "elsewhere"
    inbox.mkdir()
    elsewhere.mkdir()
    seen: list[tuple[str, str]] = []

    class Recorder(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            seen.append((event.event_type, os.path.basename(os.fsdecode(event.src_path))))

    observer = _native_observer()
    observer.schedule(Recorder(), str(inbox), recursive=False)
    observer.start()
    try:
        write(inbox / "a.csv")  # created, written, closed
        write(elsewhere / "b.csv")
        os.rename(elsewhere / "b.csv", inbox / "b.csv")  # moved in
        os.rename(inbox / "a.csv", inbox / "c.csv")  # renamed inside the inbox
        (inbox / "c.csv").read_bytes()  # a reader
        os.chmod(inbox / "c.csv", 0o640)
        os.rename(inbox / "c.csv", elsewhere / "c.csv")  # a claim
        (inbox / "b.csv").unlink()
        write(inbox / "last.csv")  # events arrive in order: this one is the end
        assert wait_until(lambda: ("closed", "last.csv") in seen, WAIT_SECONDS)
    finally:
        observer.stop()
        observer.join(5)
    files = [(kind, name) for kind, name in seen if name != "inbox"]
    assert files == [
        ("created", "a.csv"),
        ("modified", "a.csv"),
        ("closed", "a.csv"),
        ("created", "b.csv"),
        ("created", "c.csv"),
        ("attrib", "c.csv"),
        ("created", "last.csv"),
        ("modified", "last.csv"),
        ("closed", "last.csv"),
    ]
