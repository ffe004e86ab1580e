"""``batchd submit`` and ``watch``: drop a file or folder into the inbox and follow its batch."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import stat
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from batchd import control
from batchd.cli_common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    MIN_PREFIX_CHARS,
    counts,
    lookup,
    out,
)
from batchd.config import Priority, Settings
from batchd.errors import BatchdError
from batchd.fsutil import fsync_dir
from batchd.records import Status
from batchd.spool import Spool
from batchd.store import Store, open_store
from batchd.views import batch_detail


def _group_writable(path: Path) -> None:
    """Give the group what batchd needs on a copy: read, write on folders, enter.

    batchd runs as another user in the drop group: it reads files through
    the group bits, and claiming a folder renames it, which needs write
    permission on the folder itself.
    """
    mode = path.lstat().st_mode
    if stat.S_ISLNK(mode):
        return
    extra = stat.S_IRGRP | stat.S_IWGRP
    if stat.S_ISDIR(mode):
        extra |= stat.S_IXGRP
    os.chmod(path, stat.S_IMODE(mode) | extra)


def _copy_for_drop(source: Path, temp: Path, marker: str) -> None:
    if source.is_dir():
        shutil.copytree(source, temp, symlinks=True)
        for dirpath, dirnames, filenames in os.walk(temp):
            for name in dirnames + filenames:
                _group_writable(Path(dirpath) / name)
        # Complete as soon as it is renamed in: no need to wait for the settle time.
        (temp / marker).touch()
        _group_writable(temp / marker)
    else:
        shutil.copy2(source, temp)
    _group_writable(temp)


def _free_drop_name(spool: Spool, inbox: Path, base: str) -> Path:
    """``inbox/base``, else ``base.2`` ...: free in the inbox and as a batch name,
    so the batch gets exactly this name and ``submit`` can find it."""
    final, n = inbox / base, 1
    while final.exists() or spool.name_in_use(final.name):
        n += 1
        final = inbox / f"{base}.{n}"
    return final


class _Batches:
    """Batches by id, name or id prefix: from the database when this user can
    read it, else from the group-readable ``outbox/*/status.json``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.spool = Spool(settings)
        self.store: Store | None = None

    def _db_readable(self) -> bool:
        if self.settings.database.url:
            return True
        db = self.settings.db_path
        return db.exists() and os.access(db, os.R_OK) and os.access(db.parent, os.X_OK)

    def get(self, ident: str) -> dict[str, Any] | None:
        """``{"batch": {...}, "summary": {...}}`` or None when no such batch (yet)."""
        if self.store is None and self._db_readable():
            self.store = open_store(self.settings)
        if self.store is not None:
            batch = lookup(self.store, ident)
            if batch is None:
                return None
            detail = batch_detail(self.store, batch, files_limit=0)
            return {"batch": detail["batch"], "summary": detail["summary"]}
        return self._from_outbox(ident)

    def _from_outbox(self, ident: str) -> dict[str, Any] | None:
        docs = []
        named = self.spool.status_path(ident) if "/" not in ident else None
        candidates = [named] if named is not None and named.exists() else []
        if not candidates:
            with contextlib.suppress(OSError):
                candidates = sorted(self.spool.outbox.glob("*/status.json"))
        for path in candidates:
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            head = doc.get("batch") or {}
            if head.get("name") == ident or head.get("id") == ident:
                return {"batch": head, "summary": doc.get("summary") or {}}
            if len(ident) >= MIN_PREFIX_CHARS and str(head.get("id", "")).startswith(ident):
                docs.append(doc)
        if len(docs) > 1:
            raise BatchdError(f"{ident!r} is the start of several batch ids: give more characters")
        if docs:
            return {"batch": docs[0]["batch"], "summary": docs[0].get("summary") or {}}
        return None

    def claimed_as(self, drop: Path) -> dict[str, Any] | None:
        """The batch registered from ``drop`` (an inbox path), once there is one."""
        doc = self._from_outbox_path(self.spool.status_path(drop.name))
        tail = f"{drop.parent.name}/{drop.name}"
        if doc is not None and str(doc.get("source", "")).endswith(tail):
            return {"batch": doc["batch"], "summary": doc.get("summary") or {}}
        return None

    @staticmethod
    def _from_outbox_path(path: Path) -> dict[str, Any] | None:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) and "batch" in doc else None


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    spool = Spool(settings)
    inbox = spool.inbox_for(Priority(args.priority))
    if not inbox.is_dir():
        raise BatchdError(
            f"{inbox} does not exist: check spool.root (or --spool), or run 'batchd init'"
        )
    placed: list[dict[str, Any]] = []
    for raw in args.paths:
        source = Path(raw)
        if not source.exists():
            raise BatchdError(f"{source} does not exist")
        # Copy under a hidden name the watcher ignores, then rename into place:
        # the daemon can never see a half-copied drop.
        temp = inbox / f".batchd-submit-{uuid.uuid4().hex}"
        try:
            _copy_for_drop(source, temp, settings.watch.marker)
            final = _free_drop_name(spool, inbox, source.name)
            temp.rename(final)
        except OSError as exc:
            shutil.rmtree(temp, ignore_errors=True)
            with contextlib.suppress(OSError):
                temp.unlink()
            raise BatchdError(
                f"cannot copy {source} into {inbox}: {control.describe_os_error(exc)}"
            ) from None
        placed.append({"source": str(source), "inbox": str(final)})
    fsync_dir(inbox)
    if args.no_wait:
        out(placed, args.json, lambda: "\n".join(f"{p['source']} -> {p['inbox']}" for p in placed))
        return EXIT_OK
    batches = _Batches(settings)
    deadline = time.monotonic() + args.timeout if args.timeout else None
    for p in placed:
        # The daemon claims a drop within watch.settle_seconds (at once with
        # the marker); its status.json under the free name we chose is ours.
        while (found := batches.claimed_as(Path(p["inbox"]))) is None:
            if deadline is not None and time.monotonic() > deadline:
                print(
                    f"batchd: {p['inbox']} was not claimed within {args.timeout:g} s:"
                    " is the daemon running? (systemctl status batchd)",
                    file=sys.stderr,
                )
                return EXIT_TIMEOUT
            time.sleep(0.2)
        p["batch_id"], p["batch"] = found["batch"]["id"], found["batch"]["name"]
    out(
        placed,
        args.json,
        lambda: "\n".join(
            f"{p['source']} -> batch {p['batch']} (id {p['batch_id']})" for p in placed
        ),
    )
    if args.wait:
        worst = EXIT_OK
        for p in placed:
            code = _follow(batches, p["batch_id"], args, deadline)
            worst = code if worst == EXIT_OK else worst
        return worst
    return EXIT_OK


def _follow(batches: _Batches, ident: str, args: argparse.Namespace, deadline: float | None) -> int:
    """Print a batch's progress until it ends: exit 0 completed, 1 failed, 124 timed out."""
    tty = sys.stdout.isatty() and not args.json
    said_missing = False
    while True:
        found = batches.get(ident)
        if found is None and not said_missing:
            wait = f"up to {args.timeout:g} s" if deadline is not None else "until it appears"
            print(
                f"batchd: no batch with id, id prefix or name {ident!r} yet; waiting {wait}",
                file=sys.stderr,
            )
            said_missing = True
        if found is not None:
            head, summary = found["batch"], found["summary"]
            if args.json:
                print(json.dumps({"batch": head, "summary": summary}), flush=True)
            else:
                pct = int(head.get("progressPercent", 0))
                bar = "#" * (pct // 5) + "-" * (20 - pct // 5)
                line = f"{head['name']} [{bar}] {pct:3}%  {counts(summary)}"
                print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
            status = Status(head["status"])
            if status.done:
                if tty:
                    print()
                return EXIT_OK if status == Status.COMPLETED else EXIT_FAILED
        if deadline is not None and time.monotonic() > deadline:
            what = "to end" if found is not None else "to appear"
            print(
                f"\nbatchd: timed out after {args.timeout:g} s waiting for batch {ident!r} {what}",
                file=sys.stderr,
            )
            return EXIT_TIMEOUT
        time.sleep(args.interval)


def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    deadline = time.monotonic() + args.timeout if args.timeout else None
    return _follow(_Batches(settings), args.id, args, deadline)
