"""Outbox atomicity: a reader parsing every status.json and result file in a tight loop
while a large run goes on never sees a half-written document."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from support import DaemonProcess, csv_bytes, drop_folder

FILES_PER_BATCH = 40


def batch_count(long_run: bool) -> int:
    return 100 if long_run else 15


@dataclass
class Reader:
    """Parses everything in the outbox until stopped; counts parses and bad documents."""

    outbox: Path
    parses: int = 0
    status_parses: int = 0
    bad: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                batches = os.listdir(self.outbox)
            except FileNotFoundError:
                continue
            for batch in batches:
                folder = self.outbox / batch
                self._parse(folder / "status.json", status=True)
                for dirpath, _dirs, files in os.walk(folder / "results"):
                    for name in files:
                        if not name.startswith("."):  # a temporary file being written
                            self._parse(Path(dirpath) / name, status=False)

    def _parse(self, path: Path, status: bool) -> None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return  # not written yet (a result file, once there, never goes away)
        try:
            doc = json.loads(data)
            ok = (
                {"batch", "files", "summary"} <= doc.keys()
                if status
                else doc["status"] in ("completed", "failed")
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            ok, doc = False, exc
        if not ok:
            self.bad.append(f"{path}: {doc!r} from {data[:200]!r}")
        self.parses += 1
        self.status_parses += status


def test_reader_never_sees_half_written_outbox_documents(tmp_path: Path, long_run: bool) -> None:
    """Every status.json and result parsed while hundreds of files run is whole, valid JSON."""
    batches = batch_count(long_run)
    d = DaemonProcess(
        tmp_path,
        processing={"processor": "batchd.testing.procs:counted", "status_interval_seconds": 0.0},
    )
    d.start()
    reader = Reader(d.spool / "outbox")
    thread = threading.Thread(target=reader.run, name="outbox-reader", daemon=True)
    thread.start()
    try:
        names = [f"run{b:03}" for b in range(batches)]
        for b, name in enumerate(names):
            files = {
                f"d{i % 4}/f{i:02}.csv": csv_bytes(b * 100 + i) for i in range(FILES_PER_BATCH)
            }
            drop_folder(d.inbox() / name, files, tmp_path / "staging")
        for name in names:
            status = d.wait_batch(name, 60 + batches * 2)
            assert status["batch"]["status"] == "completed", name
            assert len(d.results(name)) == FILES_PER_BATCH
    finally:
        reader.stop.set()
        thread.join(30)
        assert d.stop(60) == 0
    print(
        f"outbox atomicity: {batches * FILES_PER_BATCH} files, {reader.parses} parses"
        f" ({reader.status_parses} of status.json), {len(reader.bad)} invalid"
    )
    assert reader.bad == []
    assert reader.status_parses > batches
    assert reader.parses - reader.status_parses >= batches * FILES_PER_BATCH
