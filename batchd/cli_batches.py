"""``batchd jobs``, ``show``, ``retry`` and ``purge``: the batches in the database."""

from __future__ import annotations

import argparse
import re
from datetime import timedelta
from typing import Any

from batchd.cli_common import (
    EXIT_FAILED,
    EXIT_OK,
    counts,
    find,
    lookup,
    out,
    out_table,
    store_for,
)
from batchd.clock import SystemClock
from batchd.config import Settings
from batchd.records import Status
from batchd.spool import Spool
from batchd.views import batch_detail


def cmd_jobs(args: argparse.Namespace, settings: Settings) -> int:
    store = store_for(settings)
    status = Status(args.status) if args.status else None
    rows = [b.public() for b in store.list_batches(args.limit, 0, status, args.user)]
    # DONE counts completed files only; failed ones have their own column.
    head = f"{'ID':36}  {'NAME':24} {'PRIO':6} {'STATUS':10} {'DONE':>9} {'FAILED':>6}  CREATED"
    return out_table(rows, args.json, [head], rows, _batch_line)


def _batch_line(b: dict[str, Any]) -> str:
    done = f"{b['processed_files']}/{b['total_files']}"
    return (
        f"{b['id']:36}  {b['name'][:24]:24} {b['priority']:6} "
        f"{b['status']:10} {done:>9} {b['failed_files']:>6}  {b['created_at']}"
    )


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    store = store_for(settings)
    batch = find(store, args.id)
    detail = batch_detail(store, batch)
    b = detail["batch"]
    head = [
        f"batch {b['id']} ({b['name']})",
        f"  status {b['status']}, priority {b['priority']}, user {b['user_id']}",
        f"  files: {counts(detail['summary'])} ({b['progressPercent']}% through)",
        f"  created {b['created_at']}, completed {b['completed_at'] or '-'}",
    ]
    if b["error"]:
        head.append(f"  error: {b['error']}")
    return out_table(detail, args.json, head, detail["files"], _file_line)


def _file_line(f: dict[str, Any]) -> str:
    err = f"  {f['error']}" if f["error"] else ""
    return (
        f"  {f['id']}  {f['status']:10} {f['progress']:3}%  "
        f"retries {f['retry_count']}  {f['relpath']}{err}"
    )


def cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    store = store_for(settings)
    # A file id stays exact; a batch can be named like for show/watch.
    target = args.id if store.get_file(args.id) is not None else None
    if target is None:
        batch = lookup(store, args.id)
        target = batch.id if batch is not None else args.id
    count = store.retry_failed(target)
    out(
        {"requeued": count},
        args.json,
        lambda: (
            f"{count} failed file(s) back in the queue"
            if count
            else f"nothing to retry: no failed file in the file or batch {args.id!r}"
        ),
    )
    return EXIT_OK if count else EXIT_FAILED


_AGE = re.compile(r"^(\d+)\s*([smhdw]?)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "": 86400}


def parse_age(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``2w`` (a bare number means days)."""
    match = _AGE.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age like 30d, 12h or 90m")
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


def cmd_purge(args: argparse.Namespace, settings: Settings) -> int:
    from batchd.retention import purge

    store = store_for(settings)
    removed = purge(
        Spool(settings), store, SystemClock().now() - args.older_than, dry_run=args.dry_run
    )
    verb = "would remove" if args.dry_run else "removed"
    out(
        {"dry_run": args.dry_run, "batches": removed},
        args.json,
        lambda: "\n".join(
            [f"{verb} {len(removed)} finished batch(es)"]
            + [f"  {b['id']}  {b['name']}  {b['completed_at']}" for b in removed]
        ),
    )
    return EXIT_OK
