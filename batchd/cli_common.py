"""What the ``batchd`` commands share: exit codes, output, the store, finding a batch."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from batchd.config import Settings
from batchd.errors import BatchdError
from batchd.store import Store, open_store

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: EX_CANTCREAT: cannot start with this configuration on this machine; the
#: unit lists it in RestartPreventExitStatus= (restarting cannot help).
EXIT_CANNOT_START = 73
#: what timeout(1) exits with: ``watch``/``submit``/``reload`` gave up waiting.
EXIT_TIMEOUT = 124

#: A short id must be at least this long, so a typo does not pick a batch.
MIN_PREFIX_CHARS = 4


def out(data: Any, as_json: bool, text: Callable[[], str]) -> None:
    if as_json:
        json.dump(data, sys.stdout, indent=1, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text() + "\n")


def out_table(
    data: Any,
    as_json: bool,
    head: Sequence[str],
    rows: Iterable[dict[str, Any]],
    line: Callable[[dict[str, Any]], str],
) -> int:
    """Print ``data`` as JSON, or as text: the ``head`` lines, then ``line(row)`` for
    each of ``rows``. Returns the exit status (0)."""
    out(data, as_json, lambda: "\n".join([*head, *(line(row) for row in rows)]))
    return EXIT_OK


def store_for(settings: Settings) -> Store:
    if not settings.database.url and not settings.db_path.exists():
        raise BatchdError(
            f"no database at {settings.db_path}: run 'batchd init' or start the daemon first"
        )
    return open_store(settings)


def where(settings: Settings) -> str:
    """The database, for messages: the SQLite file, or the PostgreSQL server (no password)."""
    if settings.database.url:
        from batchd.store.postgres import describe_url

        return describe_url(settings.database.url)
    return str(settings.db_path)


# -- commands -----------------------------------------------------------------


def lookup(store: Store, ident: str) -> Any:
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


def find(store: Store, ident: str) -> Any:
    batch = lookup(store, ident)
    if batch is None:
        raise BatchdError(f"no batch with id, id prefix or name {ident!r} (see 'batchd jobs')")
    return batch


def counts(summary: dict[str, int]) -> str:
    """``3 completed, 1 failed, 0 processing, 2 pending of 6``: finished kinds apart."""
    return (
        f"{summary.get('completed', 0)} completed, {summary.get('failed', 0)} failed, "
        f"{summary.get('processing', 0)} processing, {summary.get('pending', 0)} pending"
        f" of {summary.get('total', 0)}"
    )
