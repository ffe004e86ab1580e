"""Old code against new: write ``inspect``'s result of every corpus document
of some types to a folder, then compare two such folders.

    python -m bench.corpus.compare dump /tmp/new                 # spreadsheets and CSV
    (cd ../main && python -m bench.corpus.compare dump /tmp/old)
    python -m bench.corpus.compare diff /tmp/old /tmp/new

A change meant to make inspect faster must leave every result as it was:
``diff`` prints the documents whose result differs (or that only one side
has) and exits 1 when there is one. Timing fields (an OCR page's ``seconds``)
are left out of the dump; a refusal is dumped as its message.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from bench.corpus.fetch import SUFFIXES, documents

#: result fields that measure time, not content.
TIMING_FIELDS = frozenset({"seconds"})


def _without_timing(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in TIMING_FIELDS}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def dump(into: Path, kinds: set[str]) -> int:
    """Write one JSON file per document of ``kinds``; the number written."""
    from batchd.config import load_settings
    from batchd.errors import PermanentError
    from batchd.processors import ProcessorContext
    from batchd.processors.inspect import inspect

    warnings.simplefilter("ignore")
    settings = load_settings(None, env={})
    into.mkdir(parents=True, exist_ok=True)
    count = 0
    for path in documents():
        if SUFFIXES[path.suffix.lower()] not in kinds:
            continue
        ctx = ProcessorContext(
            batch_id="compare",
            file_id="f",
            relpath=path.name,
            output_path=Path("/nonexistent"),
            settings=settings,
        )
        try:
            result: Any = _without_timing(inspect(path, ctx))
        except PermanentError as exc:
            result = {"refused": str(exc)}
        text = json.dumps(result, sort_keys=True, default=str)
        (into / f"{path.parent.name}__{path.name}.json").write_text(text + "\n")
        count += 1
    return count


def diff(old: Path, new: Path) -> list[str]:
    """Names of the documents whose dumped result differs between ``old`` and ``new``."""
    names = {p.name for p in old.glob("*.json")} | {p.name for p in new.glob("*.json")}
    changed = []
    for name in sorted(names):
        a, b = old / name, new / name
        if not (a.exists() and b.exists()) or a.read_bytes() != b.read_bytes():
            changed.append(name)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    dumping = sub.add_parser("dump", help="write every result into a folder")
    dumping.add_argument("folder", type=Path)
    dumping.add_argument("--kinds", default="xlsx,xls,csv", help="types, comma-separated")
    comparing = sub.add_parser("diff", help="compare two folders written by dump")
    comparing.add_argument("old", type=Path)
    comparing.add_argument("new", type=Path)
    args = parser.parse_args(argv)
    if args.command == "dump":
        count = dump(args.folder, set(args.kinds.split(",")))
        print(f"{count} results written to {args.folder}")
        return 0
    changed = diff(args.old, args.new)
    for name in changed:
        print(f"differs: {name}")
    total = len(list(args.new.glob("*.json")))
    print(f"{len(changed)} of {total} results differ")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
