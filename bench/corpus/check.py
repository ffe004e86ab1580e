"""Run ``inspect`` on every corpus document and check it against an
independent reader; print right / refused / wrong.

    python -m bench.corpus.check            # the whole corpus
    python -m bench.corpus.check --show wrong --limit 20

Independent readers: poppler's ``pdfinfo``/``pdftotext`` for PDF (page count,
and the words of the text), pandas with openpyxl (XLSX) or xlrd (XLS) for
workbooks (sheet names, sizes, every cell), the ``csv`` module for CSV
(header and record count). Each file runs in a forked child, so a crash or
a runaway file cannot take the checker down, and its peak RSS is measured.

A file is:

- ``right``: inspect's result agrees with the independent reader;
- ``refused``: inspect failed permanently with a reason (printed); split
  into ``refused, reader fails too`` and ``refused, reader reads it`` (a
  policy refusal such as a PDF without %%EOF: the reason says what to do);
- ``wrong``: inspect's result disagrees, or inspect crashed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import datetime as dt
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.corpus.fetch import SUFFIXES, corpus_dir, documents

#: a file still running after this long is killed and counts as wrong.
FILE_TIMEOUT_SECONDS = 120.0
#: PDF text agrees when this share of pdftotext's words are found (and back).
PDF_WORD_AGREEMENT = 0.9
#: both sides with fewer letters than this count as "no text" (a stray label).
NEAR_EMPTY_CHARS = 40


_NAT: Any = object()  # pandas.NaT once pandas is loaded


@dataclass
class Outcome:
    path: str
    kind: str
    verdict: str
    detail: str = ""
    seconds: float = 0.0
    peak_rss_kib: int = 0
    result_bytes: int = 0
    pages: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _settings() -> Any:
    from batchd.config import load_settings

    return load_settings(None, env={})


def _status_kib(key: str) -> int:
    """A ``/proc/self/status`` figure (``VmRSS``, ``VmHWM`` ...) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def run_inspect(path: Path, settings: Any) -> tuple[str, Any, float, int]:
    """(status, result or message, seconds, peak RSS KiB) of inspect in a child.

    The peak RSS is the child's or one of its children's (Tesseract), the
    largest, as wait4 reports it; :func:`run_inspect_memory` tells them apart.
    """
    status, payload, seconds, peak, _ = run_inspect_memory(path, settings)
    return status, payload, seconds, peak


def run_inspect_memory(
    path: Path, settings: Any, *, warm: bool = False
) -> tuple[str, Any, float, int, dict[str, int]]:
    """:func:`run_inspect`, and the child's own memory, measured inside it:
    ``start_kib`` (its RSS before inspect), ``own_peak_kib`` (its VmHWM right
    after inspect, before the result is encoded for the pipe) and
    ``children_peak_kib`` (the largest RSS of its own children: Tesseract).

    ``warm``: the child then resets its high-water mark
    (``/proc/self/clear_refs``) and inspects the file again:
    ``warm_start_kib`` and ``warm_peak_kib`` are a warm worker's figures, in
    which library code not touched since the fork, modules imported on first
    use and the allocator's first growth no longer count as the file's.
    """
    read_fd, write_fd = os.pipe()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: one file, then out
        os.close(read_fd)
        status, payload = "ok", None
        memory: dict[str, int] = {}
        try:
            from batchd.errors import PermanentError
            from batchd.processors import ProcessorContext
            from batchd.processors.inspect import inspect

            ctx = ProcessorContext(
                batch_id="check",
                file_id="f",
                relpath=path.name,
                output_path=Path("/nonexistent"),
                settings=settings,
            )
            memory["start_kib"] = _status_kib("VmRSS")
            if warm:
                with contextlib.suppress(PermanentError):
                    inspect(path, ctx)
                memory["own_peak_kib"] = _status_kib("VmHWM")
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
                memory["warm_start_kib"] = _status_kib("VmRSS")
            payload = inspect(path, ctx)
        except PermanentError as exc:
            status, payload = "refused", exc.message
        except BaseException as exc:
            status, payload = "crashed", f"{type(exc).__name__}: {exc}"
        memory["warm_peak_kib" if warm else "own_peak_kib"] = _status_kib("VmHWM")
        memory["children_peak_kib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        answer = {"status": status, "payload": payload, "memory": memory}
        data = json.dumps(answer, allow_nan=False).encode()
        with os.fdopen(write_fd, "wb") as out:
            out.write(data)
        os._exit(0)
    os.close(write_fd)
    chunks: list[bytes] = []
    with os.fdopen(read_fd, "rb") as fh:
        signal.signal(signal.SIGALRM, lambda *_: os.kill(pid, signal.SIGKILL))
        signal.setitimer(signal.ITIMER_REAL, FILE_TIMEOUT_SECONDS)
        try:
            while chunk := fh.read(1 << 20):
                chunks.append(chunk)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    _, wait_status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - start
    if not chunks:
        message = f"child ended without a result ({wait_status})"
        return "crashed", message, seconds, usage.ru_maxrss, {}
    answer = json.loads(b"".join(chunks))
    return answer["status"], answer["payload"], seconds, usage.ru_maxrss, answer["memory"]


# -- independent readers -------------------------------------------------------


def _chars(text: str) -> collections.Counter[str]:
    """The letters and digits of ``text``: engines space letters differently
    ("D o u b l e" against "Double"), they do not invent or drop letters."""
    return collections.Counter(ch for ch in text.lower() if ch.isalnum())


def check_pdf(path: Path, result: dict[str, Any]) -> tuple[bool, str]:
    info = subprocess.run(["pdfinfo", str(path)], capture_output=True, text=True, errors="replace")
    pages = re.search(r"^Pages:\s+(\d+)", info.stdout, re.M)
    if pages is None:
        return False, f"pdfinfo cannot read it: {info.stderr.strip()[:100]}"
    if int(pages.group(1)) != result["pages"]:
        return False, f"pages {result['pages']} != pdfinfo {pages.group(1)}"
    if result["truncated"]:
        return True, "truncated: " + ",".join(result["truncated_reasons"])
    text = subprocess.run(
        ["pdftotext", "-q", "-enc", "UTF-8", str(path), "-"],
        capture_output=True,
        text=True,
        errors="replace",
    ).stdout
    # Pages read by OCR (issue 18) have no text layer for pdftotext to see:
    # the text layer of the other pages is what is compared (OCR accuracy is
    # measured by bench/ocr.py against known words).
    ocr = {page["page"] for page in result.get("ocr_pages", [])}
    layer = [t for number, t in enumerate(result["text"], start=1) if number not in ocr]
    theirs, ours = _chars(text), _chars("\n".join(layer))
    if sum(theirs.values()) < NEAR_EMPTY_CHARS and sum(ours.values()) < NEAR_EMPTY_CHARS:
        return True, f"(almost) no text layer; {len(ocr)} pages read by OCR" if ocr else (
            "(almost) no text"
        )
    common = sum((theirs & ours).values())
    recall = common / max(1, sum(theirs.values()))
    precision = common / max(1, sum(ours.values()))
    if min(recall, precision) >= PDF_WORD_AGREEMENT:
        return True, ""
    # pdftotext and PDFium disagree: a second independent reader decides.
    from pypdf import PdfReader

    try:
        other = _chars("\n".join(p.extract_text() or "" for p in PdfReader(path).pages))
    except Exception:
        other = collections.Counter()
    common = sum((other & ours).values())
    if min(common / max(1, sum(other.values())), common / max(1, sum(ours.values()))) >= (
        PDF_WORD_AGREEMENT
    ):
        return True, f"agrees with pypdf, not pdftotext ({recall:.2f}/{precision:.2f})"
    return False, f"letters agree {recall:.2f}/{precision:.2f} with pdftotext"


def _same(ours: Any, theirs: Any) -> bool:
    if theirs is None or theirs is _NAT or (isinstance(theirs, float) and math.isnan(theirs)):
        return ours is None or ours == ""
    if isinstance(theirs, str):
        # openpyxl leaves OOXML's _xHHHH_ escapes of control characters in place.
        decoded = re.sub(r"_x([0-9A-Fa-f]{4})_", lambda m: chr(int(m.group(1), 16)), theirs)
        if ours == decoded:
            return True
        return (isinstance(ours, str) and ours == theirs) or (theirs == "" and ours is None)
    if isinstance(theirs, bool):
        return ours is theirs
    if isinstance(theirs, int | float):
        if not isinstance(ours, int | float) or isinstance(ours, bool):
            return False
        return math.isclose(float(ours), float(theirs), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(theirs, dt.datetime):
        return (
            isinstance(ours, str)
            and ours[:19]
            in (
                theirs.isoformat()[:19],
                theirs.date().isoformat(),
            )
        ) or (
            isinstance(ours, str)
            and theirs.time() == dt.time(0)
            and ours == theirs.date().isoformat()
        )
    if isinstance(theirs, dt.date):
        return isinstance(ours, str) and ours.startswith(theirs.isoformat())
    if isinstance(theirs, dt.time):
        return isinstance(ours, str) and ours[:8] == theirs.isoformat()[:8]
    if isinstance(theirs, dt.timedelta):
        return True  # durations: representation differs by design
    return str(ours) == str(theirs)


def _blank_errors(sheet: dict[str, Any]) -> None:
    """Error cells as pandas shows them (NaN): blank them, and the rows and
    columns left empty, in inspect's sheet."""
    for error in sheet["errors"]:
        match = re.match(r"([A-Z]+)([0-9]+)$", error["cell"])
        if match is None:
            continue
        col = 0
        for ch in match.group(1):
            col = col * 26 + ord(ch) - 64
        row = int(match.group(2))
        if row <= len(sheet["rows"]) and col <= len(sheet["rows"][row - 1]):
            sheet["rows"][row - 1][col - 1] = None
    for row in sheet["rows"]:
        while row and row[-1] is None:
            row.pop()
    if sheet["errors"] and len(sheet["rows"]) == sheet["max_row"]:
        while sheet["rows"] and not sheet["rows"][-1]:
            sheet["rows"].pop()
        sheet["max_row"] = len(sheet["rows"])


def check_book(path: Path, result: dict[str, Any], kind: str) -> tuple[bool, str]:
    import pandas as pd

    global _NAT
    _NAT = pd.NaT
    engine = "openpyxl" if kind == "xlsx" else "xlrd"
    try:
        # keep_default_na=False: the text "NA" is text, as inspect keeps it.
        frames = pd.read_excel(
            path, sheet_name=None, header=None, engine=engine, keep_default_na=False
        )
    except Exception as exc:
        return False, f"pandas/{engine} cannot read it: {type(exc).__name__}: {exc}"[:160]
    ours = {s["name"]: s for s in result["sheets"]}
    if list(ours) != [str(name) for name in frames]:
        missing = set(map(str, frames)) ^ set(ours)
        return False, f"sheets differ: {sorted(missing)[:4]}"
    for name, frame in frames.items():
        sheet = ours[str(name)]
        _blank_errors(sheet)
        rows = frame.values.tolist()
        while rows and all(_same(None, v) for v in rows[-1]):
            rows.pop()
        if sheet["max_row"] != len(rows):
            if result["truncated"] and sheet["max_row"] < len(rows):
                continue
            return False, f"sheet {name!r}: max_row {sheet['max_row']} != pandas {len(rows)}"
        for r, (mine, theirs) in enumerate(zip(sheet["rows"], rows, strict=False)):
            padded = mine + [None] * (len(theirs) - len(mine))
            for c, value in enumerate(theirs):
                if not _same(padded[c] if c < len(padded) else None, value):
                    cell = f"{name!r}!R{r + 1}C{c + 1}"
                    return False, f"cell {cell}: {padded[c]!r} != pandas {value!r}"[:160]
    return True, ""


def check_csv(path: Path, result: dict[str, Any]) -> tuple[bool, str]:
    with path.open(encoding=result["encoding"], newline="") as fh:
        rows = [row for row in csv.reader(fh, delimiter=result["delimiter"]) if row]
    if not rows:
        return result["rows"] == 0, "empty"
    width = len(result["header"])
    if rows[0][:width] != result["header"]:
        return False, f"header {result['header'][:3]} != csv {rows[0][:3]}"
    if len(rows) - 1 != result["rows"]:
        return False, f"rows {result['rows']} != csv {len(rows) - 1}"
    for mine, theirs in zip(result["records"], rows[1:], strict=False):
        if list(mine.values())[: len(theirs)] != theirs[: len(mine)]:
            return False, f"record {theirs[:3]} != {list(mine.values())[:3]}"
    return True, ""


def check(path: Path, settings: Any) -> Outcome:
    kind = SUFFIXES[path.suffix.lower()]
    status, payload, seconds, rss = run_inspect(path, settings)
    out = Outcome(str(path), kind, "wrong", seconds=seconds, peak_rss_kib=rss)
    if status == "crashed":
        out.detail = f"crashed: {payload}"[:200]
        return out
    if status == "refused":
        reader_ok = _reader_reads(path, kind)
        out.verdict = "refused, reader reads it" if reader_ok else "refused, reader fails too"
        out.detail = str(payload)[:200]
        return out
    out.result_bytes = len(json.dumps(payload))
    out.pages = payload.get("pages", 0) if isinstance(payload, dict) else 0
    real = payload.get("type", kind)
    if real != kind:
        out.verdict, out.detail = "right", f"content is {real}, named .{kind}"
        if real in ("pdf", "xlsx", "xls", "csv"):
            kind = real
        else:
            return out
    try:
        if kind == "pdf":
            ok, detail = check_pdf(path, payload)
        elif kind in ("xlsx", "xls"):
            ok, detail = check_book(path, payload, kind)
        else:
            ok, detail = check_csv(path, payload) if "header" in payload else (True, "not csv")
    except Exception as exc:
        ok, detail = False, f"checker failed: {type(exc).__name__}: {exc}"[:200]
    if not ok and not _reader_reads(path, kind):
        ok, detail = True, f"reader fails, inspect reads it ({detail})"
    out.verdict = "right" if ok else "wrong"
    out.detail = detail
    return out


def _reader_reads(path: Path, kind: str) -> bool:
    try:
        if kind == "pdf":
            info = subprocess.run(["pdfinfo", str(path)], capture_output=True, text=True)
            return (
                info.returncode == 0
                and re.search(r"^Pages:\s+[1-9]", info.stdout, re.M) is not None
            )
        if kind in ("xlsx", "xls"):
            import pandas as pd

            pd.read_excel(path, sheet_name=None, engine="openpyxl" if kind == "xlsx" else "xlrd")
            return True
        with path.open(newline="", encoding="utf-8") as fh:
            return sum(1 for _ in csv.reader(fh)) > 0
    except Exception:
        return False


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.simplefilter("ignore")  # pandas' and openpyxl's chatter about the files
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--show", default="wrong", help="list files with this verdict prefix")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--json", type=Path, help="write every outcome here")
    parser.add_argument("--match", default="", help="only paths containing this")
    args = parser.parse_args(argv)
    # Loaded once here so each forked child starts warm, like a pool worker.
    import pypdfium2  # noqa: F401
    import python_calamine  # noqa: F401
    import xlrd  # noqa: F401

    settings = _settings()
    docs = [d for d in documents() if args.match in str(d)]
    if not docs:
        print(f"no documents in {corpus_dir()}: run python -m bench.corpus.fetch", file=sys.stderr)
        return 2
    outcomes = [check(doc, settings) for doc in docs]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tally = collections.Counter((o.kind, o.verdict) for o in outcomes)
    producers = {Path(o.path).parent.name for o in outcomes}
    print(f"{len(outcomes)} documents from {len(producers)} sources in {corpus_dir()}")
    for kind in ("pdf", "xlsx", "xls", "csv"):
        counts = {v: n for (k, v), n in sorted(tally.items()) if k == kind}
        print(f"  {kind:5} {counts}")
    verdicts = collections.Counter(o.verdict for o in outcomes)
    print(f"  total {dict(verdicts)}  (checker baseline RSS {base // 1024} MiB)")
    shown = [o for o in outcomes if o.verdict.startswith(args.show)]
    for o in shown[: args.limit]:
        print(f"{o.verdict:26} {Path(o.path).parent.name}/{Path(o.path).name[-60:]}: {o.detail}")
    if args.json:
        args.json.write_text(json.dumps([o.__dict__ for o in outcomes], indent=1))
    return 1 if verdicts.get("wrong") else 0


if __name__ == "__main__":
    raise SystemExit(main())
