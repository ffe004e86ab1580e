"""What must hold for a spool and its database once batchd has finished everything.

:func:`check_spool` is the one check the reliability tests share: run it after
the daemon has stopped (or is idle) and it raises ``AssertionError`` listing
every broken invariant, or returns a :class:`SpoolSummary` with the counts
RELIABILITY.md quotes. :func:`daemon_processes` finds processes a daemon left
behind (workers orphaned by a SIGKILL).

Invariants:

* ``inbox/`` is empty; ``work/`` holds nothing but the empty ``.uploads`` and
  ``.scratch`` folders (and nothing that is not a folder);
* every batch in the database is finished, names and work paths are unique,
  and ``total_files``/``processed_files``/``failed_files`` and the batch
  status agree with its ``batch_files`` rows;
* every file row has exactly one result document that parses and agrees with
  the row; there is no other result document and no temporary file left;
* every file's input is in ``archive/<batch>/`` (completed) or
  ``failed/<batch>/`` (failed), exactly once, never in both;
* ``status.json`` parses and agrees with the database;
* with ``expected`` drops: each drop became exactly one batch of its name
  (nothing registered twice, nothing lost), with exactly the dropped files,
  byte for byte, and the expected ones failed.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INBOX_PRIORITIES = ("high", "normal", "low")
#: Folders of work/ that batchd keeps (they must be empty when idle).
WORK_KEEP = (".uploads", ".scratch")
DONE = ("completed", "failed")


@dataclass(frozen=True)
class ExpectedDrop:
    """One drop a test made: its name in the inbox and the files it held.

    ``files`` maps relpath to content (a loose file is a drop whose only
    relpath is its own name). ``failed`` lists the relpaths that must end
    ``failed``; every other one must end ``completed``.
    """

    name: str
    files: Mapping[str, bytes]
    priority: str = "normal"
    failed: frozenset[str] = frozenset()

    def put(self, spool: Path, staging: Path) -> Path:
        """Drop it into ``spool``'s inbox with one rename, the way ``mv`` would: a loose
        file (when its only relpath is its own name) or a folder built in ``staging``."""
        target = spool / "inbox" / self.priority / self.name
        source = staging / self.name
        if list(self.files) == [self.name]:
            staging.mkdir(parents=True, exist_ok=True)
            source.write_bytes(self.files[self.name])
        else:
            for rel, data in self.files.items():
                (source / rel).parent.mkdir(parents=True, exist_ok=True)
                (source / rel).write_bytes(data)
        os.rename(source, target)
        return target


@dataclass(frozen=True)
class SpoolSummary:
    """Counts from one check (the figures RELIABILITY.md reports)."""

    batches: int
    files: int
    completed: int
    failed: int
    results: int
    archived: int
    failed_inputs: int
    attempts: int
    lost: int = 0
    doubled: int = 0
    by_priority: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        return (
            f"batches={self.batches} files={self.files} completed={self.completed}"
            f" failed={self.failed} attempts={self.attempts} lost={self.lost}"
            f" doubled={self.doubled}"
        )


def _files_under(path: Path) -> list[str]:
    """Every non-directory entry under ``path`` (symlinks included, never followed)."""
    out: list[str] = []
    if not path.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(path):
        here = Path(dirpath)
        for name in filenames + [d for d in dirnames if (here / d).is_symlink()]:
            out.append((here / name).relative_to(path).as_posix())
    return sorted(out)


def _load_json(path: Path, problems: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: does not parse ({exc})")
        return None


def check_spool(
    spool: Path,
    expected: Iterable[ExpectedDrop] | None = None,
    *,
    keep_inputs: bool = True,
    context: str = "",
    db: Path | None = None,
) -> SpoolSummary:
    """Check every invariant of an idle spool; raise ``AssertionError`` listing all
    that are broken (prefixed by ``context``, e.g. the seed), else return counts.

    ``expected=None`` checks the spool against its own database only.
    ``keep_inputs=False`` means completed inputs are deleted, not archived.
    ``db`` is the database file when it is not ``<spool>/state/batchd.db``.
    """
    problems: list[str] = []
    _check_inbox_and_work(spool, problems)
    db_path = (db or spool / "state" / "batchd.db").absolute()
    conn = sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        batches = [dict(r) for r in conn.execute("SELECT * FROM batch_jobs ORDER BY name")]
        files = [dict(r) for r in conn.execute("SELECT * FROM batch_files ORDER BY batch_id, seq")]
    finally:
        conn.close()

    names = Counter(b["name"] for b in batches)
    work_paths = Counter(b["work_path"] for b in batches)
    for name, n in names.items():
        if n > 1:
            problems.append(f"batch name {name!r} registered {n} times")
    for wp, n in work_paths.items():
        if n > 1:
            problems.append(f"work path {wp!r} registered {n} times")

    files_by_batch: dict[str, list[dict[str, Any]]] = {b["id"]: [] for b in batches}
    for f in files:
        if f["batch_id"] not in files_by_batch:
            problems.append(f"file {f['id']} belongs to no batch ({f['batch_id']})")
            continue
        files_by_batch[f["batch_id"]].append(f)

    results = archived = failed_inputs = attempts = 0
    by_priority: Counter[str] = Counter()
    for batch in batches:
        rows = files_by_batch[batch["id"]]
        by_priority[batch["priority"]] += len(rows)
        attempts += sum(int(f["attempts"]) for f in rows)
        r, a, fi = _check_batch(spool, batch, rows, keep_inputs, problems)
        results += r
        archived += a
        failed_inputs += fi

    for top in ("outbox", "archive", "failed"):
        base = spool / top
        stray = (
            sorted(p.name for p in base.iterdir() if p.name not in names) if base.exists() else []
        )
        if stray:
            problems.append(f"{top}/ folders with no batch: {stray}")

    lost = doubled = 0
    if expected is not None:
        lost, doubled = _check_expected(spool, list(expected), batches, files_by_batch, problems)

    completed = sum(1 for f in files if f["status"] == "completed")
    failed = sum(1 for f in files if f["status"] == "failed")
    if problems:
        head = f"{context}: " if context else ""
        shown = "\n  ".join(problems[:60])
        more = f"\n  ... and {len(problems) - 60} more" if len(problems) > 60 else ""
        raise AssertionError(f"{head}{len(problems)} spool invariant(s) broken:\n  {shown}{more}")
    return SpoolSummary(
        batches=len(batches),
        files=len(files),
        completed=completed,
        failed=failed,
        results=results,
        archived=archived,
        failed_inputs=failed_inputs,
        attempts=attempts,
        lost=lost,
        doubled=doubled,
        by_priority=dict(by_priority),
    )


def _check_inbox_and_work(spool: Path, problems: list[str]) -> None:
    for prio in INBOX_PRIORITIES:
        left = sorted(p.name for p in (spool / "inbox" / prio).iterdir())
        if left:
            problems.append(f"inbox/{prio} not empty: {left}")
    work = spool / "work"
    if not work.exists():
        return
    for prio in INBOX_PRIORITIES:
        folder = work / prio
        if folder.exists() and any(folder.iterdir()):
            problems.append(f"work/{prio} not empty: {sorted(p.name for p in folder.iterdir())}")
    for entry in work.iterdir():
        if entry.name in INBOX_PRIORITIES:
            continue
        if entry.name in WORK_KEEP and entry.is_dir() and not entry.is_symlink():
            if any(entry.iterdir()):
                problems.append(f"work/{entry.name} not empty: {_files_under(entry)[:10]}")
            continue
        problems.append(f"unexpected entry in work/: {entry.name}")


def _check_batch(
    spool: Path,
    batch: dict[str, Any],
    rows: list[dict[str, Any]],
    keep_inputs: bool,
    problems: list[str],
) -> tuple[int, int, int]:
    """Check one finished batch; returns (result documents, archived, failed inputs)."""
    name = batch["name"]
    where = f"batch {name!r}"
    statuses = Counter(f["status"] for f in rows)
    if batch["status"] not in DONE:
        problems.append(f"{where}: status {batch['status']!r}, not finished")
    unfinished = {s: n for s, n in statuses.items() if s not in DONE}
    if unfinished:
        problems.append(f"{where}: files not finished: {unfinished}")
    counts = (batch["total_files"], batch["processed_files"], batch["failed_files"])
    actual = (len(rows), statuses["completed"], statuses["failed"])
    if counts != actual:
        problems.append(
            f"{where}: (total, processed, failed) {counts} in batch_jobs, {actual} in rows"
        )
    if rows and not unfinished:
        want = "failed" if statuses["failed"] or batch["error"] else "completed"
        if batch["status"] != want:
            problems.append(f"{where}: status {batch['status']!r} but its files say {want!r}")
    if not rows and batch["status"] != "failed":
        problems.append(f"{where}: no files but status {batch['status']!r}")
    if (spool / batch["work_path"]).exists():
        problems.append(f"{where}: {batch['work_path']} still exists")

    outbox = spool / "outbox" / name
    results_dir = outbox / "results"
    on_disk = [p for p in _files_under(results_dir) if not _under_outputs(p)]
    temporaries = [
        p for p in _files_under(outbox) if Path(p).name.startswith(".") and p.endswith(".tmp")
    ]
    if temporaries:
        problems.append(f"{where}: temporary files left in the outbox: {temporaries}")
    docs = Counter(p for p in on_disk if p.endswith(".json") and not Path(p).name.startswith("."))
    expected_docs = {f"{f['relpath']}.json" for f in rows}
    extra = sorted(set(docs) - expected_docs)
    if extra:
        problems.append(f"{where}: result documents for no file: {extra[:10]}")

    archived_files = set(_files_under(spool / "archive" / name))
    failed_files = set(_files_under(spool / "failed" / name))
    n_results = n_archived = n_failed = 0
    for f in rows:
        rel = f["relpath"]
        doc_path = results_dir / f"{rel}.json"
        if not doc_path.is_file():
            problems.append(f"{where}: no result for {rel}")
        else:
            doc = _load_json(doc_path, problems)
            if doc is not None:
                n_results += 1
                got = (
                    doc.get("file_id"),
                    doc.get("batch_id"),
                    doc.get("relpath"),
                    doc.get("status"),
                )
                want = (f["id"], batch["id"], rel, f["status"])
                if got != want:
                    problems.append(f"{where}: result for {rel} says {got}, database {want}")
        in_archive, in_failed = rel in archived_files, rel in failed_files
        if in_archive and in_failed:
            problems.append(f"{where}: {rel} is in archive/ and in failed/")
        if f["status"] == "completed":
            n_archived += in_archive
            if keep_inputs and not in_archive:
                problems.append(f"{where}: completed {rel} is not in archive/")
            if in_failed:
                problems.append(f"{where}: completed {rel} is in failed/")
        elif f["status"] == "failed":
            n_failed += in_failed
            if f["file_size"] is not None and not in_failed:
                problems.append(f"{where}: failed {rel} is not in failed/")
            if not f["error"]:
                problems.append(f"{where}: failed {rel} has no error")

    status_path = outbox / "status.json"
    if not status_path.is_file():
        problems.append(f"{where}: no status.json")
    else:
        status = _load_json(status_path, problems)
        if status is not None:
            _check_status(where, status, batch, rows, problems)
    return n_results, n_archived, n_failed


def _under_outputs(relpath: str) -> bool:
    """True for a processor's output file, kept in ``results/<relpath>.files/``."""
    return any(part.endswith(".files") for part in relpath.split("/")[:-1])


def _check_status(
    where: str,
    status: dict[str, Any],
    batch: dict[str, Any],
    rows: list[dict[str, Any]],
    problems: list[str],
) -> None:
    head = status.get("batch", {})
    keys = ("id", "status", "total_files", "processed_files", "failed_files")
    got = tuple(head.get(k) for k in keys)
    want = tuple(batch[k] for k in keys)
    if got != want:
        problems.append(f"{where}: status.json batch {got}, database {want}")
    statuses = Counter(f["status"] for f in rows)
    summary = status.get("summary", {})
    want_summary = {
        "total": len(rows),
        "completed": statuses["completed"],
        "failed": statuses["failed"],
        "pending": statuses["pending"],
        "processing": statuses["processing"],
    }
    got_summary = {k: summary.get(k) for k in want_summary}
    if got_summary != want_summary:
        problems.append(f"{where}: status.json summary {got_summary}, database {want_summary}")
    listed = {f.get("id"): f.get("status") for f in status.get("files", [])}
    if listed != {f["id"]: f["status"] for f in rows}:
        problems.append(f"{where}: status.json files differ from the database")


def _check_expected(
    spool: Path,
    expected: list[ExpectedDrop],
    batches: list[dict[str, Any]],
    files_by_batch: dict[str, list[dict[str, Any]]],
    problems: list[str],
) -> tuple[int, int]:
    """Each drop is exactly one batch with exactly its files; returns (lost, doubled) files."""
    by_name = {b["name"]: b for b in batches}
    want_names = {e.name for e in expected}
    lost = doubled = 0
    for name in sorted(set(by_name) - want_names):
        rows = files_by_batch[by_name[name]["id"]]
        doubled += len(rows)
        problems.append(f"batch {name!r} was never dropped (registered twice?), {len(rows)} files")
    for drop in expected:
        batch = by_name.get(drop.name)
        if batch is None:
            lost += len(drop.files)
            problems.append(f"drop {drop.name!r} ({len(drop.files)} files) has no batch: lost")
            continue
        where = f"batch {drop.name!r}"
        if batch["priority"] != drop.priority:
            problems.append(
                f"{where}: priority {batch['priority']!r}, dropped in {drop.priority!r}"
            )
        rows = {f["relpath"]: f for f in files_by_batch[batch["id"]]}
        missing = sorted(set(drop.files) - set(rows))
        unknown = sorted(set(rows) - set(drop.files))
        lost += len(missing)
        doubled += len(unknown)
        if missing:
            problems.append(f"{where}: dropped files not registered: {missing}")
        if unknown:
            problems.append(f"{where}: registered files never dropped: {unknown}")
        for rel, data in drop.files.items():
            row = rows.get(rel)
            if row is None:
                continue
            want = "failed" if rel in drop.failed else "completed"
            if row["status"] != want:
                problems.append(f"{where}: {rel} ended {row['status']!r}, expected {want!r}")
            places = [
                p
                for p in (spool / "archive" / drop.name / rel, spool / "failed" / drop.name / rel)
                if os.path.lexists(p)
            ]
            if len(places) != 1:
                lost += not places
                doubled += len(places) > 1
                problems.append(
                    f"{where}: input {rel} found {len(places)} times in archive/+failed/"
                )
            elif places[0].read_bytes() != data:
                problems.append(f"{where}: input {rel} changed on its way to {places[0]}")
    return lost, doubled


def daemon_processes(config: Path) -> list[int]:
    """Pids of live processes started for the daemon that reads ``config``
    (the daemon, its workers, multiprocessing helpers): found by their
    ``BATCHD_CONFIG`` environment variable. Zombies do not count."""
    needle = f"BATCHD_CONFIG={config}".encode()
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if needle not in environ.split(b"\0"):
            continue
        state = stat.rsplit(")", 1)[-1].split()[0]
        if state != "Z":
            pids.append(int(entry.name))
    return sorted(pids)
