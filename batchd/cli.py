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
import os
import signal
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from batchd import __version__, control
from batchd import log as logsetup
from batchd.cli_batches import cmd_jobs, cmd_purge, cmd_retry, cmd_show, parse_age
from batchd.cli_common import (
    EXIT_CANNOT_START,
    EXIT_FAILED,
    EXIT_OK,
    out,
    out_table,
    store_for,
    where,
)
from batchd.cli_submit import cmd_submit, cmd_watch
from batchd.config import EXIT_CONFIG, PRIORITY_ORDER, Settings, config_path, load_settings
from batchd.errors import BatchdError, ConfigError, StartupError
from batchd.records import Status
from batchd.spool import Spool
from batchd.store import open_store


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
        "database": where(settings),
        "schema_version": version,
        "warnings": warnings,
    }
    out(
        data,
        args.json,
        lambda: "\n".join(
            [f"spool ready at {spool.root}", f"database {data['database']} (schema v{version})"]
            + [f"warning: {w}" for w in warnings]
        ),
    )
    return EXIT_OK


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
                out(verdict, True, str)
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
    store = store_for(settings)
    rows = [n.public() for n in store.nodes()]
    head = f"{'NODE':40} {'PID':>7} {'RUNNING':>7}  {'LAST HEARTBEAT':24}  ADDRESS"
    return out_table(rows, args.json, [head], rows, _node_line)


def _node_line(n: dict[str, Any]) -> str:
    return (
        f"{n['node_id'][:40]:40} {n['pid']:>7} {n['processing']:>7}  "
        f"{n['last_heartbeat']:24}  {n['address'] or '-'}"
    )


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

    out(rows, args.json, text)
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
