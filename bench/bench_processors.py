"""Benchmark the ``inspect`` processor on a 100-page PDF and a 100,000-row CSV.

Run ``python bench/bench_processors.py``. Each document is inspected in a
fresh spawned process, as a batchd worker would, with the default caps
(``processing.max_rows`` 10,000, ``max_text_chars`` 1,000,000). Printed per
case: wall seconds, the worker's peak RSS (its own ``RUSAGE_SELF``), and the
parent's ``RUSAGE_CHILDREN`` peak (the largest of all workers so far). A
baseline worker that only imports the libraries shows the fixed cost.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree

PDF_PAGES = 100
PDF_LINES_PER_PAGE = 40
CSV_ROWS = 100_000


def make_pdf(path: Path) -> None:
    """PDF_PAGES pages of PDF_LINES_PER_PAGE lines of menu text, written by pypdf."""
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    font = writer._add_object(
        DictionaryObject(
            {
                NameObject("/Type"): NameObject("/Font"),
                NameObject("/Subtype"): NameObject("/Type1"),
                NameObject("/BaseFont"): NameObject("/Helvetica"),
            }
        )
    )
    for number in range(1, PDF_PAGES + 1):
        page = writer.add_blank_page(612, 792)
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})}
        )
        lines = [
            f"(Page {number} item {i}: soup of the day with bread {i * 0.25:.2f}) Tj"
            for i in range(PDF_LINES_PER_PAGE)
        ]
        stream = DecodedStreamObject()
        stream.set_data(("BT /F1 10 Tf 14 TL 50 760 Td " + " T* ".join(lines) + " ET").encode())
        page[NameObject("/Contents")] = writer._add_object(stream)
    writer.add_metadata({"/Title": "Benchmark menu"})
    with path.open("wb") as fh:
        writer.write(fh)


def make_csv(path: Path) -> None:
    """CSV_ROWS rows of six columns, quoted text included, UTF-8."""
    with path.open("w", encoding="utf-8", newline="") as fh:
        fh.write("id;item;category;price;date;note\n")
        buffer = io.StringIO()
        for i in range(CSV_ROWS):
            buffer.write(
                f'{i};item {i};cat {i % 17};{i % 1000 / 10:.2f};2024-03-{i % 28 + 1:02d};"a; b"\n'
            )
        fh.write(buffer.getvalue())


def _worker(path: str | None, out: Any) -> None:
    """Child: inspect ``path`` (or only import, for the baseline); send timings back."""
    import openpyxl  # noqa: F401  # loaded by a real worker too
    import pypdf  # noqa: F401

    from batchd.config import Settings
    from batchd.processors import ProcessorContext
    from batchd.processors.inspect import inspect

    started = time.perf_counter()
    summary: dict[str, Any] = {}
    if path is not None:
        with tempfile.TemporaryDirectory() as tmp:
            ctx = ProcessorContext("bench", "bench", Path(path).name, Path(tmp), Settings())
            result = inspect(Path(path), ctx)
        summary = {
            key: (len(value) if isinstance(value, list) else value)
            for key, value in result.items()
            if key in {"type", "size", "pages", "rows", "records", "text", "truncated"}
        }
    seconds = time.perf_counter() - started
    out.send((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, summary))


def run_case(label: str, path: Path | None) -> None:
    parent, child = mp.get_context("spawn").Pipe(duplex=False)
    proc = mp.get_context("spawn").Process(
        target=_worker, args=(str(path) if path else None, child)
    )
    proc.start()
    seconds, self_kib, summary = parent.recv()
    proc.join()
    children_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(
        f"{label:<28} {seconds:7.2f} s   worker peak RSS {self_kib / 1024:6.1f} MiB   "
        f"RUSAGE_CHILDREN peak {children_kib / 1024:6.1f} MiB   {summary}"
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pdf, csv_path = Path(tmp) / "menu.pdf", Path(tmp) / "prices.csv"
        make_pdf(pdf)
        make_csv(csv_path)
        print(f"PDF {PDF_PAGES} pages, {pdf.stat().st_size / 1024:.0f} KiB; ", end="")
        print(f"CSV {CSV_ROWS} rows, {csv_path.stat().st_size / 1024 / 1024:.1f} MiB")
        run_case("baseline (imports only)", None)
        run_case(f"inspect PDF {PDF_PAGES} pages", pdf)
        run_case(f"inspect CSV {CSV_ROWS} rows", csv_path)


if __name__ == "__main__":
    main()
