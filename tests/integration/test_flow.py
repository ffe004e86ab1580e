"""End to end: drops in the inbox become results in the outbox."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from support import DaemonProcess, csv_bytes, drop_folder, files_under, wait_until

RESULT_KEYS = {
    "batch_id",
    "file_id",
    "filename",
    "relpath",
    "status",
    "attempts",
    "file_size",
    "file_hash",
    "processor",
    "started_at",
    "completed_at",
    "duration_ms",
    "result",
    "error",
}


def test_folder_of_three_completes(tmp_path: Path) -> None:
    """A folder of 3 files in inbox/high ends completed with 3 results and archived inputs."""
    d = DaemonProcess(tmp_path).start()
    try:
        files = {"a.csv": csv_bytes(1), "sub/b.csv": csv_bytes(2), "sub/deep/c.csv": csv_bytes(3)}
        drop_folder(d.inbox("high") / "menus", files, tmp_path / "staging")
        status = d.wait_batch("menus")
        assert status["batch"]["status"] == "completed"
        assert status["batch"]["priority"] == "high"
        assert status["batch"]["progressPercent"] == 100
        assert status["summary"] == {
            "total": 3,
            "pending": 0,
            "processing": 0,
            "completed": 3,
            "failed": 0,
        }
        assert status["outbox"] == str(d.spool / "outbox" / "menus")
        results = d.results("menus")
        assert sorted(results) == ["a.csv", "sub/b.csv", "sub/deep/c.csv"]
        for relpath, doc in results.items():
            assert set(doc) == RESULT_KEYS
            assert doc["status"] == "completed"
            assert doc["relpath"] == relpath
            assert doc["batch_id"] == status["batch"]["id"]
            assert doc["file_size"] == len(files[relpath])
            assert doc["file_hash"].startswith("sha256:")
            assert doc["processor"] == "inspect"
            assert doc["attempts"] == 1
            assert doc["result"]["type"] == "csv"
        assert files_under(d.spool / "archive" / "menus") == sorted(files)
        assert os.listdir(d.inbox("high")) == []
        assert files_under(d.spool / "work") == []
    finally:
        assert d.stop() == 0


def test_loose_file_is_batch_of_one(tmp_path: Path) -> None:
    """A loose file is a batch of one with the priority of its inbox folder."""
    d = DaemonProcess(tmp_path).start()
    try:
        (d.inbox("low") / "prices.csv").write_bytes(csv_bytes(7))
        status = d.wait_batch("prices.csv")
        assert status["batch"]["priority"] == "low"
        assert status["batch"]["total_files"] == 1
        assert d.results("prices.csv")["prices.csv"]["status"] == "completed"
        assert (d.spool / "archive" / "prices.csv" / "prices.csv").read_bytes() == csv_bytes(7)
    finally:
        d.stop()


def test_same_name_twice_gets_suffix(tmp_path: Path) -> None:
    """A second drop with a taken name becomes <name>.2, and status.json names its own id."""
    d = DaemonProcess(tmp_path).start()
    try:
        (d.inbox() / "x.csv").write_bytes(csv_bytes(1))
        first = d.wait_batch("x.csv")
        (d.inbox() / "x.csv").write_bytes(csv_bytes(2))
        second = d.wait_batch("x.csv.2")
        assert first["batch"]["id"] != second["batch"]["id"]
    finally:
        d.stop()


def test_slow_writer_is_not_claimed_early(tmp_path: Path) -> None:
    """A file written in chunks over seconds is claimed only once complete."""
    d = DaemonProcess(tmp_path, watch={"settle_seconds": 1.0}).start()
    try:
        target = d.inbox() / "big.csv"
        chunks = [b"id,value\n"] + [f"{i},{i}\n".encode() * 200 for i in range(8)]
        with target.open("wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                fh.flush()
                time.sleep(0.35)
                assert target.exists(), "claimed while still being written"
        status = d.wait_batch("big.csv")
        assert status["files"][0]["file_size"] == sum(len(c) for c in chunks)
    finally:
        d.stop()


def test_folder_copied_file_by_file_is_one_batch(tmp_path: Path) -> None:
    """A folder filled file by file (pauses shorter than settle) is claimed once, whole."""
    d = DaemonProcess(tmp_path, watch={"settle_seconds": 1.0}).start()
    try:
        folder = d.inbox() / "incoming"
        folder.mkdir()
        for i in range(6):
            sub = folder / f"part{i % 2}"
            sub.mkdir(exist_ok=True)
            (sub / f"f{i}.csv").write_bytes(csv_bytes(i))
            time.sleep(0.3)
        status = d.wait_batch("incoming")
        assert status["batch"]["total_files"] == 6
        assert len(list((d.spool / "outbox").iterdir())) == 1
    finally:
        d.stop()


def test_marker_makes_folder_ready(tmp_path: Path) -> None:
    """With folder_ready=marker a folder waits for .ready, which is not a member."""
    d = DaemonProcess(tmp_path, watch={"folder_ready": "marker", "settle_seconds": 0.2}).start()
    try:
        folder = d.inbox() / "marked"
        folder.mkdir()
        (folder / "a.csv").write_bytes(csv_bytes(1))
        time.sleep(1.0)  # well past settle: without the marker nothing may happen
        assert folder.exists()
        (folder / ".ready").touch()
        status = d.wait_batch("marked")
        assert status["batch"]["total_files"] == 1
    finally:
        d.stop()


def test_temp_names_are_ignored_until_renamed(tmp_path: Path) -> None:
    """A .part file waits in the inbox; renamed, it is processed."""
    d = DaemonProcess(tmp_path).start()
    try:
        part = d.inbox() / "data.csv.part"
        part.write_bytes(csv_bytes(1))
        time.sleep(1.0)
        assert part.exists()
        part.rename(d.inbox() / "data.csv")
        assert d.wait_batch("data.csv")["batch"]["status"] == "completed"
    finally:
        d.stop()


def test_high_runs_before_waiting_low(tmp_path: Path) -> None:
    """With concurrency 1, high files dropped after low ones run before the waiting lows."""
    d = DaemonProcess(
        tmp_path, processing={"concurrency": 1, "processor": "batchd.testing.procs:ordered"}
    )
    d.start(BATCHD_TEST_DELAY="0.3")
    try:
        drop_folder(
            d.inbox("low") / "lows",
            {f"low{i}.csv": csv_bytes(i) for i in range(5)},
            tmp_path / "st1",
        )
        wait_until(lambda: (d.state / "order.log").exists(), what="first low file to start")
        drop_folder(
            d.inbox("high") / "highs",
            {f"high{i}.csv": csv_bytes(i) for i in range(3)},
            tmp_path / "st2",
        )
        d.wait_batch("lows", 60)
        d.wait_batch("highs", 60)
        order = (d.state / "order.log").read_text().split()
        last_high = max(order.index(f"high{i}.csv") for i in range(3))
        lows_after = [n for n in order[last_high:] if n.startswith("low")]
        assert len(lows_after) >= 2, order  # highs overtook the lows still waiting
        assert [n for n in order if n.startswith("high")] == ["high0.csv", "high1.csv", "high2.csv"]
    finally:
        d.stop()


def test_never_more_than_concurrency_in_flight(tmp_path: Path) -> None:
    """No more than processing.concurrency files are processing at once."""
    d = DaemonProcess(
        tmp_path, processing={"concurrency": 2, "processor": "batchd.testing.procs:sleepy"}
    )
    d.start(BATCHD_TEST_DELAY="0.3")
    try:
        peak = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                try:
                    with d.db() as conn:
                        n = conn.execute(
                            "SELECT COUNT(*) FROM batch_files WHERE status='processing'"
                        ).fetchone()[0]
                    peak = max(peak, n)
                except Exception:
                    pass
                time.sleep(0.02)

        t = threading.Thread(target=sample)
        t.start()
        drop_folder(
            d.inbox() / "many", {f"f{i}.csv": csv_bytes(i) for i in range(8)}, tmp_path / "st"
        )
        d.wait_batch("many", 60)
        stop.set()
        t.join()
        assert peak == 2
    finally:
        d.stop()


def test_routes_send_pdf_and_csv_to_different_processors(tmp_path: Path) -> None:
    """[[route]] sends the folder's PDF to one processor and its CSV to another."""
    import io

    from pypdf import PdfWriter

    writer = PdfWriter()
    writer.add_blank_page(width=200, height=200)
    pdf = io.BytesIO()
    writer.write(pdf)
    config_extra = '\n[[route]]\nmatch = "*.pdf"\nprocessor = "noop"\n'
    d = DaemonProcess(tmp_path)
    d.config.write_text(d.config.read_text() + config_extra)
    d.start()
    try:
        drop_folder(
            d.inbox() / "mixed", {"doc.pdf": pdf.getvalue(), "t.csv": csv_bytes(1)}, tmp_path / "st"
        )
        d.wait_batch("mixed")
        results = d.results("mixed")
        assert (results["doc.pdf"]["processor"], results["doc.pdf"]["result"]) == ("noop", {})
        assert results["t.csv"]["processor"] == "inspect"
        assert results["t.csv"]["result"]["type"] == "csv"
    finally:
        d.stop()
