"""Tests for batchd.log: what the daemon and its workers write to their shared stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

WRITER = """
import sys
from batchd import log
from batchd.config import LogSettings
log.configure(LogSettings(format="json"), sys.stderr)
import structlog
logger = structlog.get_logger("batchd.test")
for i in range(3000):
    logger.info("line_written", writer=sys.argv[1], n=i, pad="x" * 150)
"""


def test_processes_sharing_stderr_never_interleave_their_lines(tmp_path: Path) -> None:
    """Three processes logging at once into one file (as a daemon and its workers do)
    leave only whole JSON lines: each line is one write()."""
    out = tmp_path / "shared.log"
    with out.open("wb") as fh:
        procs = [
            subprocess.Popen([sys.executable, "-c", WRITER, str(k)], stderr=fh) for k in range(3)
        ]
        for proc in procs:
            assert proc.wait(timeout=120) == 0
    lines = out.read_text().splitlines()
    events = [json.loads(line) for line in lines]  # a torn line would not parse
    assert len(events) == 9000
    assert {e["writer"] for e in events} == {"0", "1", "2"}
