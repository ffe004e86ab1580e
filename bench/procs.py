"""The benchmarks' processors, by the names scenarios use (``"bench.procs:burn"``).

They live with every other test processor in :mod:`batchd.testing.procs`;
this module keeps the ``bench.procs:<fn>`` names working.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from batchd.testing.procs import burn as burn
from batchd.testing.procs import burn_work as burn_work
from batchd.testing.procs import loops_for as loops_for
from batchd.testing.procs import pause as sleepy

__all__ = ["burn", "burn_work", "io_bound", "loops_for", "sleepy"]

#: Issue 15's scale-out: the I/O-bound processor sleeps this long per file.
IO_SLEEP_SECONDS = 0.1


def io_bound(path: Path, ctx: Any) -> dict[str, Any]:
    """100 ms of waiting per file (cores are not the limit), each run written to a ledger.

    With ``$BENCH_LEDGER`` set, one ``start`` and one ``end`` line per run
    (node id, file id, relpath) are appended to it, each with a single
    ``O_APPEND`` write, so the kill scenario can count which node ran which
    file how often. (``path`` may be a worker's private copy: the file id
    names the file.)
    """
    ledger = os.environ.get("BENCH_LEDGER")
    node = os.environ.get("BATCHD_CLUSTER__NODE_ID", "")
    line = f"{node}\t{getattr(ctx, 'file_id', '')}\t{getattr(ctx, 'relpath', path.name)}\n"
    if ledger:
        _append(ledger, "start\t" + line)
    time.sleep(IO_SLEEP_SECONDS)
    if ledger:
        _append(ledger, "end\t" + line)
    return {"size": path.stat().st_size}


def _append(ledger: str, line: str) -> None:
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
