"""The default processor: what a file is, and its content as JSON.

The type comes from the file's bytes (:func:`batchd.sniff.sniff`), never from
its name alone; the name a user gave the file is ``ctx.relpath`` (the path
handed in may be ``/proc/self/fd/N`` or a private copy). Every result has
``type``, ``mime``, ``size`` and ``sha256``; PDF (:mod:`.pdf`), XLSX and XLS
(:mod:`.sheets`) and CSV files add their content (README, "Processors").

Results are capped, never cut silently: ``processing.max_rows`` rows (CSV
records, or spreadsheet rows over all sheets), ``processing.max_text_chars``
characters of text and the ``[inspect]`` caps; a result that hit a cap says
``"truncated": true`` and names the caps in ``truncated_reasons``. Files are
streamed, so memory follows the caps, not the file's size.

Bad content (an encrypted or damaged PDF, a broken workbook, a "CSV" that is
not text) raises :class:`~batchd.errors.PermanentError`: parsing is
deterministic, so a retry could only fail the same way.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from batchd.errors import PermanentError
from batchd.processors import Context
from batchd.processors.content import Budget, Result, bad_content
from batchd.processors.pdf import read_pdf
from batchd.processors.sheets import read_xlsx
from batchd.processors.xls import read_xls
from batchd.sniff import Sniffed, guess_delimiter, sniff

CHUNK_BYTES = 1024 * 1024
#: how much of a CSV the dialect sniffer sees.
CSV_SAMPLE_CHARS = 64 * 1024
CSV_DELIMITERS = ",;\t|"
#: rows between two progress reports of a CSV or a sheet.
PROGRESS_EVERY_ROWS = 1000
#: the smallest csv.field_size_limit kept, Python's own default (characters).
CSV_FIELD_LIMIT_FLOOR = 128 * 1024
#: an 8-bit file with more NUL bytes than one in this many is not text.
NUL_BYTES_PER = 100
#: this many NUL bytes are always taken for export glitches in text.
STRAY_NUL_BYTES = 4

_C1_BYTES = re.compile(rb"[\x80-\x9f]")  # where Latin-1 and Windows-1252 differ
_CP1252_UNDEFINED = re.compile(rb"[\x81\x8d\x8f\x90\x9d]")
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def inspect(path: Path, ctx: Context) -> Result:
    """Read PDF, XLSX, XLS and CSV content; type, size and sha256 of anything else."""
    # The path may be /proc/self/fd/N or a private copy: the name users gave
    # the file is its relative path. A workbook's archive, opened to tell its
    # type, is read from as it is.
    sniffed = sniff(path, name=ctx.relpath, keep_zip=True)
    try:
        return _inspect(path, ctx, sniffed)
    finally:
        if sniffed.archive is not None:
            sniffed.archive.close()


def _inspect(path: Path, ctx: Context, sniffed: Sniffed) -> Result:
    suffix = PurePosixPath(ctx.relpath).suffix.lower()
    if sniffed.kind in {"bin", "empty"} and suffix in {".csv", ".tsv", ".tab"}:
        raise PermanentError(
            f"{ctx.relpath}: named like a CSV file but its content is not text "
            f"({sniffed.kind}); export it again as CSV"
        )
    scan = _scan(path, text=sniffed.kind in {"csv", "txt"})
    result: Result = {
        "type": sniffed.kind,
        "mime": sniffed.mime,
        "size": scan.size,
        "sha256": scan.sha256,
    }
    budget = Budget(ctx.settings.processing.max_rows, ctx.settings.processing.max_text_chars)
    # -- OCR (issue 18): scanned PDF pages and images, see batchd/processors/ocr.py --
    if sniffed.kind == "pdf":
        from batchd.processors import ocr

        result.update(read_pdf(path, ocr.text_pass(ctx), budget))
        ocr.ocr_pdf(path, ctx, result, budget)
    elif sniffed.kind in {"png", "jpeg", "tiff"}:
        from batchd.processors import ocr

        result.update(ocr.read_image(path, ctx, budget))
    # -- end of OCR --
    elif sniffed.kind == "xlsx":
        result.update(read_xlsx(path, ctx, budget, sniffed.archive))
    elif sniffed.kind == "xls":
        result.update(read_xls(path, ctx, budget))
    elif sniffed.kind == "csv":
        if scan.encoding is None:
            raise PermanentError(
                f"{ctx.relpath}: not a text file (more than 1 byte in {NUL_BYTES_PER} is NUL: "
                "binary data or UTF-16 without a byte order mark); export it again as CSV "
                "in UTF-8"
            )
        result.update(_read_csv(path, ctx, budget, scan.encoding, scan.size))
    elif sniffed.kind == "txt" and scan.encoding is not None:
        result["encoding"] = scan.encoding
        result["lines"] = _count_lines(path, scan.encoding)
    ctx.progress(100)
    return result


# -- the whole-file pass: size, digest, encoding ------------------------------


@dataclass(frozen=True, slots=True)
class _Scan:
    size: int
    sha256: str
    #: the text encoding, or None when not asked or the bytes are not text.
    encoding: str | None


def _scan(path: Path, *, text: bool) -> _Scan:
    """Size and sha256 of the file; for text, its encoding, in the same pass.

    UTF-8 (with or without BOM) and UTF-16 (with BOM) are taken when every byte
    decodes; otherwise Windows-1252 when it has the bytes 0x80-0x9F that make
    it differ from Latin-1 (the euro sign, curly quotes) and decodes, else
    Latin-1. An 8-bit file with more than one NUL byte in NUL_BYTES_PER is not
    text; a stray NUL (an export glitch) is kept as a character.
    """
    digest = hashlib.sha256()
    size = 0
    utf8 = codecs.getincrementaldecoder("utf-8")()
    utf16 = codecs.getincrementaldecoder("utf-16")()
    utf8_ok = utf16_ok = True
    has_c1 = has_cp1252_hole = False
    nuls = 0
    bom = b""
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            if size == 0:
                bom = chunk[:3] if chunk.startswith(codecs.BOM_UTF8) else chunk[:2]
            digest.update(chunk)
            size += len(chunk)
            if not text:
                continue
            nuls += chunk.count(b"\x00")
            if chunk.isascii() and not utf8.getstate()[0] and bom not in _UTF16_BOMS:
                # most CSV is ASCII: no byte above 0x7f to look for, and ASCII
                # after a whole character is UTF-8 (one C-speed check)
                continue
            has_c1 = has_c1 or _C1_BYTES.search(chunk) is not None
            has_cp1252_hole = has_cp1252_hole or _CP1252_UNDEFINED.search(chunk) is not None
            utf8_ok = utf8_ok and _decodes(utf8, chunk)
            if bom in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
                utf16_ok = utf16_ok and _decodes(utf16, chunk)
    encoding: str | None = None
    if not text or size == 0:
        encoding = "utf-8" if text else None
    elif bom in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        encoding = "utf-16" if utf16_ok and _decodes(utf16, b"", final=True) else None
    elif nuls > STRAY_NUL_BYTES and nuls * NUL_BYTES_PER > size:
        encoding = None  # UTF-16 without a BOM, or binary: not text we can read
    elif utf8_ok and _decodes(utf8, b"", final=True):
        encoding = "utf-8-sig" if bom == codecs.BOM_UTF8 else "utf-8"
    elif has_c1 and not has_cp1252_hole:
        encoding = "cp1252"
    else:
        encoding = "latin-1"
    return _Scan(size=size, sha256=digest.hexdigest(), encoding=encoding)


def _decodes(decoder: codecs.IncrementalDecoder, chunk: bytes, *, final: bool = False) -> bool:
    try:
        decoder.decode(chunk, final)
    except UnicodeDecodeError:
        return False
    return True


def _count_lines(path: Path, encoding: str) -> int:
    lines = 0
    with path.open(encoding=encoding, newline="") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            lines += chunk.count("\n")
    return lines


# -- spreadsheets --------------------------------------------------------------


# -- CSV -----------------------------------------------------------------------


def _read_csv(path: Path, ctx: Context, budget: Budget, encoding: str, size: int) -> Result:
    """Header and records of a delimited text file, streamed.

    The first non-blank row is the header; each later non-blank row is a
    record keyed by it (a missing field is null, an extra one is keyed
    ``column_N``). ``rows`` counts every record in the file; at most
    ``max_rows`` are kept in ``records``.
    """
    limit = max(CSV_FIELD_LIMIT_FLOOR, ctx.settings.processing.max_text_chars)
    csv.field_size_limit(limit)
    with path.open("rb") as raw, io.TextIOWrapper(raw, encoding=encoding, newline="") as fh:
        delimiter = _delimiter(fh.read(CSV_SAMPLE_CHARS))
        fh.seek(0)
        reader = csv.reader(fh, delimiter=delimiter, quotechar='"', doublequote=True)
        header: list[str] = []
        keys: list[str] = []
        max_fields = ctx.settings.inspect.max_header_columns
        records: list[dict[str, Any]] = []
        count = 0
        try:
            for row in reader:
                if not row:
                    continue  # a blank line
                if len(row) > max_fields:
                    budget.hit("inspect.max_header_columns")
                    row = row[:max_fields]
                if not keys:
                    header, keys = row, _unique_keys(row)
                    continue
                count += 1
                # a CSV row is all text: its length is counted at C speed
                if not budget.full and budget.take_row(row, sum(map(len, row))):
                    records.append(_record(keys, row))
                if count % PROGRESS_EVERY_ROWS == 0 and size:
                    ctx.progress(raw.tell() * 100 / size)  # read-ahead makes it approximate
        except csv.Error as exc:
            raise bad_content(
                ctx, f"not valid CSV at line {reader.line_num} (limit {limit} chars a field)", exc
            ) from exc
    return {
        "encoding": encoding,
        "delimiter": delimiter,
        "header": header,
        "rows": count,
        "records": records,
        **budget.fields(),
    }


def _delimiter(sample: str) -> str:
    """The delimiter csv.Sniffer would see in whole lines of ``sample``
    (:func:`batchd.sniff.guess_delimiter`); when it cannot tell, the
    candidate most frequent in the first line, else a comma."""
    lines = sample[: sample.rfind("\n")] if "\n" in sample else sample
    found = guess_delimiter(lines, CSV_DELIMITERS)
    if found is not None:
        return found
    first = lines.split("\n", 1)[0]
    best = max(CSV_DELIMITERS, key=first.count)
    return best if first.count(best) else ","


def _unique_keys(header: list[str]) -> list[str]:
    """One key per header field: blank names become ``column_N``, repeats
    ``name_2``, ``name_3`` ...

    Linear: each name remembers the last suffix it was given, so 100,000
    identical names cost 100,000 steps, not 5 billion.
    """
    keys: list[str] = []
    seen: set[str] = set()
    last_suffix: dict[str, int] = {}
    for number, name in enumerate(header, start=1):
        key = name.strip() or f"column_{number}"
        candidate = key
        if candidate in seen:
            n = last_suffix.get(key, 1)
            while candidate in seen:
                n += 1
                candidate = f"{key}_{n}"
            last_suffix[key] = n
        seen.add(candidate)
        keys.append(candidate)
    return keys


def _record(keys: list[str], row: list[str]) -> dict[str, Any]:
    if len(row) == len(keys):  # the common case, in one C call
        return dict(zip(keys, row, strict=True))
    record: dict[str, Any] = dict.fromkeys(keys)
    record.update(zip(keys, row, strict=False))
    for number in range(len(keys) + 1, len(row) + 1):
        record[f"column_{number}"] = row[number - 1]
    return record
