"""The ``batchd`` command line.

Exit codes: 0 ok, 1 failed, 2 usage, 73 cannot start on this machine (HTTP
port taken, spool not writable or locked by another daemon), 78 bad
configuration (EX_CONFIG), 124 timed out (``watch``/``submit`` with
``--timeout``, as timeout(1) does).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import shutil
import signal
import stat
import sys
import time
import tomllib
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from batchd import __version__, control
from batchd import log as logsetup
from batchd.clock import SystemClock
from batchd.config import (
    EXIT_CONFIG,
    PRIORITY_ORDER,
    Priority,
    Settings,
    config_path,
    load_settings,
)
from batchd.errors import BatchdError, ConfigError, StartupError
from batchd.records import Status
from batchd.spool import Spool, fsync_dir
from batchd.store import Store, open_store
from batchd.views import batch_detail

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: EX_CANTCREAT: cannot start with this configuration on this machine; the
#: unit lists it in RestartPreventExitStatus= (restarting cannot help).
EXIT_CANNOT_START = 73
#: what timeout(1) exits with: ``watch``/``submit``/``reload`` gave up waiting.
EXIT_TIMEOUT = 124

#: A short id must be at least this long, so a typo does not pick a batch.
MIN_PREFIX_CHARS = 4


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
        from batchd.store.postgres import describe_url

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
        # DONE counts completed files only; failed ones have their own column.
        lines = [
            f"{'ID':36}  {'NAME':24} {'PRIO':6} {'STATUS':10} {'DONE':>9} {'FAILED':>6}  CREATED"
        ]
        for b in rows:
            done = f"{b['processed_files']}/{b['total_files']}"
            lines.append(
                f"{b['id']:36}  {b['name'][:24]:24} {b['priority']:6} "
                f"{b['status']:10} {done:>9} {b['failed_files']:>6}  {b['created_at']}"
            )
        return "\n".join(lines)

    _out(rows, args.json, text)
    return EXIT_OK


def _lookup(store: Store, ident: str) -> Any:
    """The batch with this id, name or unique id prefix; None when there is none."""
    batch = store.find_batch(ident)
    if batch is not None or len(ident) < MIN_PREFIX_CHARS:
        return batch
    ids = store.batch_ids_with_prefix(ident, limit=2)
    if len(ids) > 1:
        raise BatchdError(
            f"{ident!r} is the start of several batch ids ({ids[0]}, {ids[1]}, ...):"
            " give more characters"
        )
    return store.get_batch(ids[0]) if ids else None


def _find(store: Store, ident: str) -> Any:
    batch = _lookup(store, ident)
    if batch is None:
        raise BatchdError(f"no batch with id, id prefix or name {ident!r} (see 'batchd jobs')")
    return batch


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    store = _store(settings)
    batch = _find(store, args.id)
    detail = batch_detail(store, batch)

    def text() -> str:
        b = detail["batch"]
        lines = [
            f"batch {b['id']} ({b['name']})",
            f"  status {b['status']}, priority {b['priority']}, user {b['user_id']}",
            f"  files: {_counts(detail['summary'])} ({b['progressPercent']}% through)",
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


def _counts(summary: dict[str, int]) -> str:
    """``3 completed, 1 failed, 0 processing, 2 pending of 6``: finished kinds apart."""
    return (
        f"{summary.get('completed', 0)} completed, {summary.get('failed', 0)} failed, "
        f"{summary.get('processing', 0)} processing, {summary.get('pending', 0)} pending"
        f" of {summary.get('total', 0)}"
    )


def cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    store = _store(settings)
    # A file id stays exact; a batch can be named like for show/watch.
    target = args.id if store.get_file(args.id) is not None else None
    if target is None:
        batch = _lookup(store, args.id)
        target = batch.id if batch is not None else args.id
    count = store.retry_failed(target)
    _out(
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
            batch = _lookup(self.store, ident)
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
        _out(placed, args.json, lambda: "\n".join(f"{p['source']} -> {p['inbox']}" for p in placed))
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
    _out(
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
                line = f"{head['name']} [{bar}] {pct:3}%  {_counts(summary)}"
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


def cmd_reload(args: argparse.Namespace, settings: Settings) -> int:
    lock = control.lock_path(settings)
    verdicts = control.reload_path(settings)
    try:
        pid = control.holder_pid(lock)
    except OSError as exc:
        raise BatchdError(f"cannot read {lock}: {control.describe_os_error(exc)}") from None
    if pid is None:
        print(
            f"batchd: no daemon runs on {settings.spool.root} (nothing holds {lock})",
            file=sys.stderr,
        )
        return EXIT_FAILED
    before = control.read_reload(verdicts)
    seen = (before.get("pid"), before.get("generation"))
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        raise BatchdError(f"cannot signal batchd (pid {pid}): {exc.strerror}") from None
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        verdict = control.read_reload(verdicts)
        if verdict.get("pid") == pid and (verdict.get("pid"), verdict.get("generation")) != seen:
            if args.json:
                _out(verdict, True, str)
            elif verdict.get("ok"):
                print(_reload_text(verdict))
            else:
                print(f"batchd: {_reload_text(verdict)}", file=sys.stderr)
            return EXIT_OK if verdict.get("ok") else EXIT_CONFIG
        time.sleep(0.1)
    print(
        f"batchd: the daemon (pid {pid}) did not answer the reload within {args.timeout:g} s;"
        " see its log (journalctl -u batchd -n 20)",
        file=sys.stderr,
    )
    return EXIT_FAILED


def _reload_text(verdict: dict[str, Any]) -> str:
    if not verdict.get("ok"):
        return f"reload refused, the old configuration stays in force: {verdict.get('error')}"
    lines = ["configuration reloaded"]
    lines += [f"  {key}: changed, needs a restart to apply" for key in verdict["needs_restart"]]
    return "\n".join(lines)


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


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default (when it has one)."""


def build_parser() -> argparse.ArgumentParser:
    config_help = "TOML config file (default: $BATCHD_CONFIG, else /etc/batchd/config.toml)"
    # Subcommands repeat --config, but with SUPPRESS as default: a default
    # there would overwrite the value given before the subcommand
    # (`batchd --config X jobs`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=config_help)
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON instead of text"
    )

    parser = argparse.ArgumentParser(
        prog="batchd", description="Watch-folder batch processing daemon.", formatter_class=_Help
    )
    parser.add_argument("--config", metavar="PATH", default=None, help=config_help)
    parser.add_argument(
        "--json", action="store_true", default=False, help="print JSON instead of text"
    )
    parser.add_argument("--version", action="version", version=f"batchd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[..., int], help_text: str, *parents: Any) -> Any:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            parents=[common, *parents],
            formatter_class=_Help,
        )
        p.set_defaults(fn=fn)
        return p

    add("run", cmd_run, "run the daemon")
    add("init", cmd_init, "create and check the spool and the database", data)
    p = add("jobs", cmd_jobs, "list batches, newest first", data)
    p.add_argument("--status", choices=[str(s) for s in Status], help="only batches in this status")
    p.add_argument("--user", help="only this user's batches")
    p.add_argument("--limit", type=int, default=20, help="at most this many batches")
    p = add("show", cmd_show, "show one batch and its files", data)
    p.add_argument("id", help="batch id, unique id prefix, or batch name")
    p = add("retry", cmd_retry, "re-queue a failed file, or a batch's failed files", data)
    p.add_argument("id", help="file id, or batch id, unique id prefix or batch name")
    p = add("purge", cmd_purge, "delete finished batches older than an age", data)
    p.add_argument(
        "--older-than", type=parse_age, required=True, metavar="AGE", help="e.g. 30d, 12h, 90m"
    )
    p.add_argument("--dry-run", action="store_true", help="list what would be removed")
    p = add(
        "submit",
        cmd_submit,
        "copy files or folders into the inbox safely and print the batch each became",
        data,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or folders to submit")
    p.add_argument(
        "--priority",
        choices=[p.value for p in PRIORITY_ORDER],
        default="normal",
        help="the inbox folder to drop into",
    )
    p.add_argument(
        "--spool",
        metavar="DIR",
        help="the spool root (default: spool.root from the config; when this user cannot"
        " read the config, $BATCHD_SPOOL__ROOT or /var/lib/batchd)",
    )
    p.add_argument(
        "--wait", action="store_true", help="follow the batches to the end with a progress bar"
    )
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="return once copied, without waiting for the daemon to claim the drop",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the claim (and, with --wait, the end); 0 waits forever;"
        " exit 124 when they run out",
    )
    p.add_argument("--interval", type=float, default=0.5, help="seconds between updates (--wait)")
    p = add("watch", cmd_watch, "show a batch's progress until it ends", data)
    p.add_argument("id", help="batch id, unique id prefix, or batch name")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between updates")
    p.add_argument(
        "--timeout",
        type=float,
        default=0,
        help="give up after this many seconds (exit 124); 0 waits forever",
    )
    p = add(
        "reload",
        cmd_reload,
        "make the running daemon re-read its config and wait for its verdict"
        " (exit 0 applied, 78 refused, 1 no answer)",
        data,
    )
    p.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for the daemon's answer"
    )
    add("nodes", cmd_nodes, "list the nodes sharing the database, with their last heartbeat", data)
    add("processors", cmd_processors, "list the available processors", data)
    return parser


def _settings_for(args: argparse.Namespace) -> Settings:
    """The configuration; ``submit`` also works for a drop-group member who
    may not read the 0640 config (it needs only the spool root)."""
    spool = getattr(args, "spool", None)
    if args.fn is cmd_reload:
        return _reload_settings(args.config)
    if args.fn is not cmd_submit:
        return load_settings(args.config)
    file = config_path(args.config, os.environ)
    readable = file is None or os.access(file, os.R_OK) or not file.exists()
    # An empty file: the defaults plus BATCHD_* variables, never the secrets.
    settings = load_settings(args.config if readable else os.devnull)
    if spool is not None:
        spool_settings = settings.spool.model_copy(update={"root": Path(spool)})
        settings = settings.model_copy(update={"spool": spool_settings})
    elif not readable:
        print(
            f"batchd: cannot read {file} (it is private to batchd); submitting into"
            f" {settings.spool.root} (choose another with --spool)",
            file=sys.stderr,
        )
    return settings


def _reload_settings(path: str | None) -> Settings:
    """The settings ``reload`` needs to find the daemon, even from a config the
    daemon will refuse: the daemon itself must judge it (and say why)."""
    try:
        return load_settings(path)
    except ConfigError:
        file = config_path(path, os.environ)
        try:
            raw = tomllib.loads(file.read_text()) if file is not None else {}
            root = raw.get("spool", {}).get("root")
        except (OSError, ValueError, AttributeError):
            root = None
        if not isinstance(root, str):
            raise
        base = load_settings(os.devnull)
        return base.model_copy(update={"spool": base.spool.model_copy(update={"root": Path(root)})})


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    try:
        settings = _settings_for(args)
        logsetup.configure(settings.log)
        return int(args.fn(args, settings))
    except ConfigError as exc:
        print(f"batchd: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    except StartupError as exc:
        print(f"batchd: cannot start: {exc.message}", file=sys.stderr)
        return EXIT_CANNOT_START
    except BatchdError as exc:
        print(f"batchd: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # `batchd jobs --json | head`: the reader left; say nothing more.
        _silence_stdout()
        return EXIT_FAILED
    except OSError as exc:
        if exc.errno != errno.EROFS:
            raise
        print(f"batchd: {exc.filename}: {control.describe_os_error(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush cannot fail again."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
