"""OCR through the running daemon: scans dropped in the inbox, read in a worker under its limits."""

from __future__ import annotations

import io
import os
import shutil
import stat
from pathlib import Path

import pytest
from scans import menu_lines, save_pdf, save_tiff, scanned_page, word_accuracy
from support import DaemonProcess, drop_folder

TESSERACT = shutil.which("tesseract")
MEMORY_MB = 1500

pytestmark = pytest.mark.skipif(
    TESSERACT is None, reason="needs Tesseract: apt-get install tesseract-ocr tesseract-ocr-eng"
)


def test_scans_dropped_in_the_inbox_are_ocred_in_the_worker_under_its_limit(
    tmp_path: Path,
) -> None:
    """A scanned PDF, a PNG and a 2-page TIFF (types allowed) come back with their text; the
    engine ran under processing.worker_memory_mb; a JPEG, not allowed, is refused."""
    assert TESSERACT is not None
    # A tesseract on PATH that notes its address-space limit when it OCRs a page
    # (not when asked its version), then is the real one.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    limits = tmp_path / "limits.txt"
    wrapper = bin_dir / "tesseract"
    wrapper.write_text(
        f'#!/bin/sh\ncase "$1" in --*) ;; *) ulimit -v >> {limits} ;; esac\nexec {TESSERACT} "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)

    lines = [menu_lines(seed, 4) for seed in range(4)]
    pages = [scanned_page(t, width_in=5.5, height_in=2.2, seed=i) for i, t in enumerate(lines)]
    staging = tmp_path / "made"
    staging.mkdir()
    png, jpeg = io.BytesIO(), io.BytesIO()
    pages[1].save(png, "PNG")
    pages[1].convert("RGB").save(jpeg, "JPEG")
    files = {
        "menu.pdf": save_pdf(staging / "menu.pdf", [pages[0]]).read_bytes(),
        "photo.png": png.getvalue(),
        "fax.tif": save_tiff(staging / "fax.tif", pages[2:]).read_bytes(),
        "snap.jpg": jpeg.getvalue(),
    }
    d = DaemonProcess(
        tmp_path,
        limits={"allowed_types": ["pdf", "png", "tiff"]},
        processing={"worker_memory_mb": MEMORY_MB, "max_retries": 0},
    )
    d.start(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    try:
        drop_folder(d.inbox() / "scans", files, tmp_path / "staging")
        status = d.wait_batch("scans", timeout=120)
        results = d.results("scans")
    finally:
        d.stop()
    assert status["summary"]["completed"] == 3, results
    expected = {
        "menu.pdf": [lines[0]],
        "photo.png": [lines[1]],
        "fax.tif": [lines[2], lines[3]],
    }
    for name, texts in expected.items():
        result = results[name]["result"]
        assert result["ocr"] == "done", name
        assert len(result["ocr_pages"]) == len(texts)
        for want, got in zip(texts, result["text"], strict=True):
            assert word_accuracy("\n".join(want), got) >= 0.9, (name, got)
    assert results["snap.jpg"]["status"] == "failed"
    assert "jpeg" in results["snap.jpg"]["error"]
    # One Tesseract run per page, each limited like the worker that started it.
    assert limits.read_text().split() == [str(MEMORY_MB * 1024)] * 4
