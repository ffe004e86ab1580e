"""The ``batchd`` command line.

Exit codes: 0 ok, 1 failed, 2 usage, 78 bad configuration (EX_CONFIG).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from batchd import __version__
from batchd import log as logsetup
from batchd.clock import SystemClock
from batchd.config import EXIT_CONFIG, PRIORITY_ORDER, Priority, Settings, load_settings
from batchd.errors import BatchdError, ConfigError
from batchd.records import Status
from batchd.spool import Spool, fsync_dir
from batchd.store import Store, open_store
from batchd.views import batch_detail

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _out(data: Any, as_json: bool, text: Callable[[], str]) -> None:
    if as_json:
        json.dump(data, sys.stdout, indent=1, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text() + "\n")


def _store(settings: Settings) -> Store:
    if not settings.database.url and not settings.db_path.exists():
        raise BatchdError(
            f"no database at {settings.db_path}: run 'batchd init' or start the daemon first"
        )
    return open_store(settings)


def _where(settings: Settings) -> str:
    """The database, for messages: the SQLite file, or the PostgreSQL server (no password)."""
    if settings.database.url:
        from batchd.store_pg import describe_url

        return describe_url(settings.database.url)
    return str(settings.db_path)


# -- commands -----------------------------------------------------------------


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from batchd.daemon import Daemon

    return Daemon(settings, config_path=args.config).run()


def cmd_init(args: argparse.Namespace, settings: Settings) -> int:
    spool = Spool(settings)
    warnings = spool.init()
    store = open_store(settings)
    version = store.schema_version()
    store.close()
    data = {
        "spool": str(spool.root),
        "database": _where(settings),
        "schema_version": version,
        "warnings": warnings,
    }
    _out(
        data,
        args.json,
        lambda: "\n".join(
            [f"spool ready at {spool.root}", f"database {data['database']} (schema v{version})"]
            + [f"warning: {w}" for w in warnings]
        ),
    )
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace, settings: Settings) -> int:
    store = _store(settings)
    status = Status(args.status) if args.status else None
    rows = [b.public() for b in store.list_batches(args.limit, 0, status, args.user)]

    def text() -> str:
        lines = [f"{'ID':36}  {'NAME':24} {'PRIO':6} {'STATUS':10} {'DONE':>9}  CREATED"]
        for b in rows:
            done = f"{b['processed_files'] + b['failed_files']}/{b['total_files']}"
            lines.append(
                f"{b['id']:36}  {b['name'][:24]:24} {b['priority']:6} "
                f"{b['status']:10} {done:>9}  {b['created_at']}"
            )
        return "\n".join(lines)

    _out(rows, args.json, text)
    return EXIT_OK


def _find(store: Store, ident: str) -> Any:
    batch = store.find_batch(ident)
    if batch is None:
        raise BatchdError(f"no batch with id or name {ident!r}")
    return batch


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    store = _store(settings)
    batch = _find(store, args.id)
    detail = batch_detail(store, batch)

    def text() -> str:
        b = detail["batch"]
        lines = [
            f"batch {b['id']} ({b['name']})",
            f"  status {b['status']}, priority {b['priority']}, user {b['user_id']},"
            f" {b['progressPercent']}% done",
            f"  created {b['created_at']}, completed {b['completed_at'] or '-'}",
        ]
        if b["error"]:
            lines.append(f"  error: {b['error']}")
        for f in detail["files"]:
            err = f"  {f['error']}" if f["error"] else ""
            lines.append(
                f"  {f['id']}  {f['status']:10} {f['progress']:3}%  "
                f"retries {f['retry_count']}  {f['relpath']}{err}"
            )
        return "\n".join(lines)

    _out(detail, args.json, text)
    return EXIT_OK


def cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    store = _store(settings)
    count = store.retry_failed(args.id)
    _out(
        {"requeued": count},
        args.json,
        lambda: (
            f"{count} failed file(s) back in the queue"
            if count
            else f"nothing to retry: no failed file or batch with id {args.id}"
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

    store = _store(settings)
    removed = purge(
        Spool(settings), store, SystemClock().now() - args.older_than, dry_run=args.dry_run
    )
    verb = "would remove" if args.dry_run else "removed"
    _out(
        {"dry_run": args.dry_run, "batches": removed},
        args.json,
        lambda: "\n".join(
            [f"{verb} {len(removed)} finished batch(es)"]
            + [f"  {b['id']}  {b['name']}  {b['completed_at']}" for b in removed]
        ),
    )
    return EXIT_OK


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    spool = Spool(settings)
    inbox = spool.inbox_for(Priority(args.priority))
    if not inbox.is_dir():
        raise BatchdError(f"{inbox} does not exist: run 'batchd init' first")
    placed = []
    for raw in args.paths:
        source = Path(raw)
        if not source.exists():
            raise BatchdError(f"{source} does not exist")
        # Copy under a hidden name the watcher ignores, then rename into place:
        # the daemon can never see a half-copied drop.
        temp = inbox / f".batchd-submit-{uuid.uuid4().hex}"
        if source.is_dir():
            shutil.copytree(source, temp, symlinks=True)
        else:
            shutil.copy2(source, temp)
        final = inbox / source.name
        n = 1
        while final.exists():
            n += 1
            final = inbox / f"{source.name}.{n}"
        temp.rename(final)
        placed.append({"source": str(source), "inbox": str(final)})
    fsync_dir(inbox)
    _out(placed, args.json, lambda: "\n".join(f"{p['source']} -> {p['inbox']}" for p in placed))
    return EXIT_OK


def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    deadline = time.monotonic() + args.timeout if args.timeout else None
    store: Store | None = None
    tty = sys.stdout.isatty() and not args.json
    while True:
        if store is None and (settings.database.url or settings.db_path.exists()):
            store = open_store(settings)
        batch = store.find_batch(args.id) if store else None
        if batch is not None:
            detail = batch_detail(store, batch, files_limit=0) if store else {}
            head, summary = detail["batch"], detail["summary"]
            if args.json:
                print(json.dumps({"batch": head, "summary": summary}), flush=True)
            else:
                pct = head["progressPercent"]
                bar = "#" * (pct // 5) + "-" * (20 - pct // 5)
                line = (
                    f"{head['name']} [{bar}] {pct:3}%  {summary['completed']} completed, "
                    f"{summary['processing']} processing, {summary['pending']} pending, "
                    f"{summary['failed']} failed"
                )
                print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
            if batch.status.done:
                if tty:
                    print()
                return EXIT_OK if batch.status == Status.COMPLETED else EXIT_FAILED
        if deadline is not None and time.monotonic() > deadline:
            print(f"\ntimed out waiting for batch {args.id}", file=sys.stderr)
            return EXIT_FAILED
        time.sleep(args.interval)


def cmd_nodes(args: argparse.Namespace, settings: Settings) -> int:
    store = _store(settings)
    rows = [n.public() for n in store.nodes()]

    def text() -> str:
        lines = [f"{'NODE':40} {'PID':>7} {'RUNNING':>7}  {'LAST HEARTBEAT':24}  ADDRESS"]
        for n in rows:
            lines.append(
                f"{n['node_id'][:40]:40} {n['pid']:>7} {n['processing']:>7}  "
                f"{n['last_heartbeat']:24}  {n['address'] or '-'}"
            )
        return "\n".join(lines)

    _out(rows, args.json, text)
    return EXIT_OK


def cmd_processors(args: argparse.Namespace, settings: Settings) -> int:
    from batchd import processors
    from batchd.processors import ocr

    names = processors.available()
    describe: Callable[[str], str] = getattr(processors, "describe", lambda name: names[name])
    rows: list[dict[str, Any]] = [
        {"name": n, "target": names[n], "description": describe(n)} for n in sorted(names)
    ]
    # inspect's OCR depends on what is installed on this machine (issue 18).
    engine = ocr.describe(settings)
    for row in rows:
        if row["name"] == "inspect":
            row["ocr"] = engine

    def text() -> str:
        lines = []
        for r in rows:
            lines.append(f"{r['name']:12} {r['description']}")
            if "ocr" in r:
                lines.append(f"{'':12} OCR (inspect.ocr = {engine['mode']!r}): {ocr_state()}")
        return "\n".join(lines)

    def ocr_state() -> str:
        if engine["available"]:
            wanted = ", ".join(engine["wanted_languages"])
            installed = ", ".join(engine["languages"])
            return f"{engine['engine']}, languages {wanted} (installed: {installed})"
        return f"unavailable: {engine['problem']}"

    _out(rows, args.json, text)
    return EXIT_OK


# -- parsing ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        help="TOML config file (default: $BATCHD_CONFIG, /etc/batchd/config.toml)",
    )
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--json", action="store_true", help="print JSON instead of text")

    parser = argparse.ArgumentParser(
        prog="batchd", description="Watch-folder batch processing daemon.", parents=[common]
    )
    parser.add_argument("--version", action="version", version=f"batchd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[..., int], help_text: str, *parents: Any) -> Any:
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common, *parents])
        p.set_defaults(fn=fn)
        return p

    add("run", cmd_run, "run the daemon")
    add("init", cmd_init, "create and check the spool and the database", data)
    p = add("jobs", cmd_jobs, "list batches, newest first", data)
    p.add_argument("--status", choices=[str(s) for s in Status])
    p.add_argument("--user", help="only this user's batches")
    p.add_argument("--limit", type=int, default=20)
    p = add("show", cmd_show, "show one batch and its files", data)
    p.add_argument("id", help="batch id or batch name")
    p = add("retry", cmd_retry, "re-queue a failed file, or a batch's failed files", data)
    p.add_argument("id", help="file id or batch id")
    p = add("purge", cmd_purge, "delete finished batches older than an age", data)
    p.add_argument(
        "--older-than", type=parse_age, required=True, metavar="AGE", help="e.g. 30d, 12h"
    )
    p.add_argument("--dry-run", action="store_true", help="list what would be removed")
    p = add("submit", cmd_submit, "copy files or folders into the inbox safely", data)
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--priority", choices=[p.value for p in PRIORITY_ORDER], default="normal")
    p = add("watch", cmd_watch, "show a batch's progress until it ends", data)
    p.add_argument("id", help="batch id or batch name")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between updates")
    p.add_argument("--timeout", type=float, default=0, help="give up after this many seconds")
    add("nodes", cmd_nodes, "list the nodes sharing the database, with their last heartbeat", data)
    add("processors", cmd_processors, "list the available processors", data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    try:
        settings = load_settings(args.config)
        logsetup.configure(settings.log)
        return int(args.fn(args, settings))
    except ConfigError as exc:
        print(f"batchd: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    except BatchdError as exc:
        print(f"batchd: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
