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


def test_a_json_line_holds_every_value_a_log_event_carries() -> None:
    """The JSON renderer (orjson) writes one compact line per event; what JSON has no
    form for (a datetime, a path, an exception) is its str(), as json.dumps(default=str)
    wrote it, and what orjson refuses (a huge integer, a key that is not text) is still
    written."""
    import io
    from datetime import UTC, datetime

    import structlog

    from batchd import log as batchd_log
    from batchd.config import LogSettings

    stream = io.StringIO()
    batchd_log.configure(LogSettings(format="json"), stream=stream)
    try:
        when = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)
        logger = structlog.get_logger("batchd.test")
        logger.info("one", when=when, path=Path("/srv/a b"), error=OSError(2, "gone"), n=1.5)
        logger.info("two", big=2**70, odd={1: "x"}, text="naïve \u2028")
    finally:
        batchd_log.configure(LogSettings())
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    one, two = (json.loads(line) for line in lines)
    assert (one["event"], one["level"]) == ("one", "info")
    assert (one["when"], one["path"], one["n"]) == (str(when), "/srv/a b", 1.5)
    assert one["error"] == str(OSError(2, "gone"))
    assert (two["big"], two["odd"], two["text"]) == (2**70, {"1": "x"}, "naïve \u2028")
