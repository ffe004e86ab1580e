"""OCR (issue 18): seconds per scanned page and word accuracy, batchd against Tesseract by hand.

The scans are made like the tests' (tests/scans.py): A4 menu pages of known
words drawn at 300 dpi in 12, 10, 8 and 6 pt, some blurred, saved as one
image-only PDF. For each resolution:

* ``direct``: the pages rendered once to PNG files beforehand (not timed),
  then ``tesseract page.png stdout -l eng --dpi N`` run on each, one at a time,
  with one OpenMP thread as batchd runs it (``OMP_THREAD_LIMIT=1``);
* ``batchd``: ``inspect`` on the PDF in a spawned process (a worker), timed
  inside it: the text pass, PDFium rendering, the BMP hand-over, Tesseract
  and parsing, all included.

Rounds alternate the two. Reported: the median wall and CPU seconds per page
of each (CPU: the process and its Tesseracts, which a busy shared machine
disturbs less than wall time), their ratios (target: batchd within 1.2x), and
the share of drawn words found.
The direct run with Tesseract's default threads is shown once, for reference.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO

sys.path.insert(0, str(REPO / "tests"))  # tests/scans.py makes the scans

#: (font size in points, blur in pixels) of the pages, in order.
PAGES = ((12, 0.0), (10, 1.0), (8, 1.5), (6, 1.0), (12, 2.5), (8, 0.5))
LINES_PER_PAGE = 35
DPIS = (150, 200, 300)
CHOSEN_DPI = 300
TARGET_RATIO = 1.2


def make_scans(folder: Path, pages: int) -> tuple[Path, list[str]]:
    from scans import menu_lines, save_pdf, scanned_page

    images, texts = [], []
    for seed, (points, blur) in enumerate(PAGES[:pages]):
        lines = menu_lines(seed, LINES_PER_PAGE)
        texts.append("\n".join(lines))
        images.append(scanned_page(lines, font_pt=points, blur_px=blur, seed=seed))
    return save_pdf(folder / "scans.pdf", images), texts


def render_pngs(pdf: Path, folder: Path, dpi: int) -> list[Path]:
    import pypdfium2 as pdfium

    out = []
    document = pdfium.PdfDocument(pdf)
    for index in range(len(document)):
        path = folder / f"page-{dpi}-{index}.png"
        document[index].render(scale=dpi / 72, grayscale=True).to_pil().save(path)
        out.append(path)
    document.close()
    return out


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def direct(pngs: list[Path], dpi: int, threads: str | None = "1") -> tuple[float, float, list[str]]:
    """Wall and CPU seconds for ``tesseract`` on every page image, and the texts."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_THREAD_LIMIT"] = threads
    texts = []
    cpu = _children_cpu()
    started = time.perf_counter()
    for png in pngs:
        done = subprocess.run(
            ["tesseract", str(png), "stdout", "-l", "eng", "--dpi", str(dpi)],
            capture_output=True,
            check=True,
            env=env,
        )
        texts.append(done.stdout.decode())
    return time.perf_counter() - started, _children_cpu() - cpu, texts


def _inspect_in_worker(pdf: str, dpi: int) -> tuple[float, float, list[str], list[dict[str, Any]]]:
    """Wall and CPU seconds (the worker's and its Tesseracts') of inspect on ``pdf``."""
    from batchd.config import load_settings
    from batchd.processors import ProcessorContext
    from batchd.processors.inspect import inspect

    settings = load_settings(None, env={"BATCHD_INSPECT__OCR_DPI": str(dpi)})
    ctx = ProcessorContext(
        batch_id="b",
        file_id="f",
        relpath="scans.pdf",
        output_path=Path(pdf).parent / "out",
        settings=settings,
    )
    cpu = _self_cpu() + _children_cpu()
    started = time.perf_counter()
    result = inspect(Path(pdf), ctx)
    wall = time.perf_counter() - started
    cpu = _self_cpu() + _children_cpu() - cpu
    return wall, cpu, result["text"], result.get("ocr_pages", [])


def run(rounds: int, quick: bool) -> dict[str, Any]:
    from scans import word_accuracy

    pages = 2 if quick else len(PAGES)
    out: dict[str, Any] = {"pages": pages, "dpis": {}, "chosen_dpi": CHOSEN_DPI}
    with tempfile.TemporaryDirectory(prefix="bench-ocr-") as tmp:
        folder = Path(tmp)
        pdf, expected = make_scans(folder, pages)
        pool = mp.get_context("spawn").Pool(1)
        try:
            pool.apply(_inspect_in_worker, (str(pdf), 72))  # imports and engine probe, untimed
            for dpi in DPIS:
                pngs = render_pngs(pdf, folder, dpi)
                batchd_s, direct_s, batchd_cpu, direct_cpu = [], [], [], []
                for _ in range(rounds if dpi == CHOSEN_DPI else 1):
                    wall, cpu, texts, ocr_pages = pool.apply(_inspect_in_worker, (str(pdf), dpi))
                    batchd_s.append(wall / pages)
                    batchd_cpu.append(cpu / pages)
                    wall, cpu, direct_texts = direct(pngs, dpi)
                    direct_s.append(wall / pages)
                    direct_cpu.append(cpu / pages)
                row = {
                    "batchd_s_per_page": round(statistics.median(batchd_s), 3),
                    "direct_s_per_page": round(statistics.median(direct_s), 3),
                    "batchd_cpu_s_per_page": round(statistics.median(batchd_cpu), 3),
                    "direct_cpu_s_per_page": round(statistics.median(direct_cpu), 3),
                    "batchd_accuracy": round(
                        statistics.mean(map(word_accuracy, expected, texts)), 4
                    ),
                    "direct_accuracy": round(
                        statistics.mean(map(word_accuracy, expected, direct_texts)), 4
                    ),
                    "accuracy_per_page": [
                        round(word_accuracy(e, t), 3) for e, t in zip(expected, texts, strict=True)
                    ],
                    "mean_confidence": round(
                        statistics.mean(p["confidence"] for p in ocr_pages if p["confidence"]), 1
                    ),
                }
                row["ratio"] = round(row["batchd_s_per_page"] / row["direct_s_per_page"], 3)
                row["cpu_ratio"] = round(
                    row["batchd_cpu_s_per_page"] / row["direct_cpu_s_per_page"], 3
                )
                if dpi == CHOSEN_DPI:
                    seconds, _, _ = direct(pngs, dpi, threads=None)
                    row["direct_default_threads_s_per_page"] = round(seconds / pages, 3)
                out["dpis"][str(dpi)] = row
        finally:
            pool.close()
            pool.join()
    chosen = out["dpis"][str(CHOSEN_DPI)]
    out["ratio"] = chosen["ratio"]
    out["met"] = chosen["ratio"] <= TARGET_RATIO
    return out


def rows(o: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Lines for bench's table: one per resolution."""
    out = []
    for dpi, row in o["dpis"].items():
        chosen = int(dpi) == o["chosen_dpi"]
        out.append(
            (
                f"ocr {o['pages']} scanned pages @ {dpi} dpi{' (chosen)' if chosen else ''}",
                f"{row['batchd_s_per_page']:.2f} s/page ({row['batchd_cpu_s_per_page']:.2f} CPU), "
                f"{row['batchd_accuracy']:.1%} words",
                f"{row['direct_s_per_page']:.2f} s/page ({row['direct_cpu_s_per_page']:.2f} CPU) "
                "tesseract by hand",
                f"{row['ratio']:.2f}x ({row['cpu_ratio']:.2f}x CPU)",
                f"<= {TARGET_RATIO}x" + (" yes" if row["ratio"] <= TARGET_RATIO else " NO")
                if chosen
                else "",
            )
        )
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else 1, quick=False), indent=1))
