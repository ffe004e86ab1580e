"""The default processor: what a file is, and its content as JSON.

The type comes from the file's bytes (:func:`batchd.sniff.sniff`), never from
its name alone. Every result has ``type``, ``mime``, ``size`` and ``sha256``;
PDF, XLSX, XLS and CSV files add their content (see ``docs/processors.md``).

Results are capped, never cut silently: at most ``processing.max_rows`` rows
(CSV records, or spreadsheet rows over all sheets) and
``processing.max_text_chars`` characters of text are kept, and a result that
hit a cap says ``"truncated": true``. Files are streamed, so memory follows
the caps, not the file's size.

Bad content (an encrypted or damaged PDF, a broken workbook, a "CSV" that is
not text) raises :class:`~batchd.errors.PermanentError`: parsing is
deterministic, so a retry could only fail the same way.
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import decimal
import hashlib
import io
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchd.errors import PermanentError, ProcessorError
from batchd.processors import Context
from batchd.sniff import sniff

CHUNK_BYTES = 1024 * 1024
#: how much of a CSV the dialect sniffer sees.
CSV_SAMPLE_CHARS = 64 * 1024
CSV_DELIMITERS = ",;\t|"
#: rows between two progress reports of a CSV or a sheet.
PROGRESS_EVERY_ROWS = 1000
#: pypdf tolerates this much junk after a PDF's last %%EOF; so do we.
PDF_EOF_SEARCH_BYTES = 1024 * 1024
#: the smallest csv.field_size_limit kept, Python's own default (characters).
CSV_FIELD_LIMIT_FLOOR = 128 * 1024

_C1_BYTES = re.compile(rb"[\x80-\x9f]")  # where Latin-1 and Windows-1252 differ
_CP1252_UNDEFINED = re.compile(rb"[\x81\x8d\x8f\x90\x9d]")

Result = dict[str, Any]


def inspect(path: Path, ctx: Context) -> Result:
    """Read PDF, XLSX, XLS and CSV content; type, size and sha256 of anything else."""
    sniffed = sniff(path)
    suffix = path.suffix.lower()
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
    budget = _Budget(ctx.settings.processing.max_rows, ctx.settings.processing.max_text_chars)
    # -- OCR (issue 18): scanned PDF pages and images, see batchd/processors/ocr.py --
    if sniffed.kind == "pdf":
        from batchd.processors import ocr

        result.update(_read_pdf(path, ocr.text_pass(ctx), budget))
        if ctx.settings.inspect.ocr == "always":  # OCR text replaces the text layer's
            processing = ctx.settings.processing
            budget = _Budget(processing.max_rows, processing.max_text_chars)
        ocr.ocr_pdf(path, ctx, result, budget.take_text)
        result["truncated"] = result["truncated"] or budget.truncated
    elif sniffed.kind in {"png", "jpeg", "tiff"}:
        from batchd.processors import ocr

        result.update(ocr.read_image(path, ctx, budget.take_text, lambda: budget.truncated))
    # -- end of OCR --
    elif sniffed.kind == "xlsx":
        result.update(_read_xlsx(path, ctx, budget))
    elif sniffed.kind == "xls":
        result.update(_read_xls(path, ctx, budget))
    elif sniffed.kind == "csv":
        if scan.encoding is None:
            raise PermanentError(
                f"{ctx.relpath}: not a text file (it contains NUL bytes); a CSV must be plain text"
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
    Latin-1. A NUL byte in an 8-bit file means it is not text.
    """
    digest = hashlib.sha256()
    size = 0
    utf8 = codecs.getincrementaldecoder("utf-8")()
    utf16 = codecs.getincrementaldecoder("utf-16")()
    utf8_ok = utf16_ok = True
    has_nul = has_c1 = has_cp1252_hole = False
    bom = b""
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            if size == 0:
                bom = chunk[:3] if chunk.startswith(codecs.BOM_UTF8) else chunk[:2]
            digest.update(chunk)
            size += len(chunk)
            if not text:
                continue
            has_nul = has_nul or b"\x00" in chunk
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
    elif has_nul:
        encoding = None
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


# -- caps and JSON values ------------------------------------------------------


class _Budget:
    """What is left of ``processing.max_rows`` and ``max_text_chars`` for one file.

    Once a cap is hit nothing more is taken, so what was kept is a prefix.
    """

    def __init__(self, rows: int, chars: int) -> None:
        self.rows = rows
        self.chars = chars
        self.truncated = False

    def take_row(self, values: Iterable[Any]) -> bool:
        """True when a row with these values fits, and count it."""
        chars = sum(len(v) for v in values if isinstance(v, str))
        if self.truncated or self.rows <= 0 or chars > self.chars:
            self.truncated = True
            return False
        self.rows -= 1
        self.chars -= chars
        return True

    def take_text(self, text: str) -> str | None:
        """As much of ``text`` as fits, or None when nothing more does."""
        if self.truncated:
            return None
        if len(text) > self.chars:
            self.truncated = True
            text = text[: self.chars]
        self.chars -= len(text)
        return text


def json_value(value: Any) -> Any:
    """A cell value as JSON: dates and times as ISO 8601 strings, durations as
    ISO 8601 durations, NaN and infinities as null, anything unknown as text."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return f"PT{value.total_seconds():g}S"
    if isinstance(value, decimal.Decimal):
        return json_value(float(value))
    return str(value)


def _bad_content(ctx: Context, what: str, exc: BaseException) -> PermanentError:
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return PermanentError(f"{ctx.relpath}: {what} ({detail})")


# -- PDF -----------------------------------------------------------------------


def _read_pdf(path: Path, ctx: Context, budget: _Budget) -> Result:
    """Page count, document information and the text of each page (pypdf).

    ``text`` has one string per page, in order, and stops early when
    ``max_text_chars`` is reached.
    """
    from pypdf import PasswordType, PdfReader
    from pypdf.errors import FileNotDecryptedError

    _require_eof_marker(path, ctx)
    try:
        reader = PdfReader(path, strict=False)
        encrypted = reader.is_encrypted
        # Many PDFs are encrypted only to set permissions, with an empty user
        # password; those open like any other.
        if encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED:
            raise FileNotDecryptedError("password required")
        pages = len(reader.pages)
        metadata = _pdf_metadata(reader)
        texts: list[str] = []
        for number, page in enumerate(reader.pages, start=1):
            text = budget.take_text(page.extract_text() or "")
            if text is None:
                break
            texts.append(text)
            ctx.progress(number * 100 / pages)
    except FileNotDecryptedError as exc:
        raise PermanentError(
            f"{ctx.relpath}: the PDF is encrypted and needs a password, which batchd "
            "does not have; remove the password and submit it again"
        ) from exc
    except (OSError, MemoryError, ProcessorError):
        raise
    except Exception as exc:  # pypdf raises many kinds on damaged input
        raise _bad_content(ctx, "the PDF is damaged and cannot be read", exc) from exc
    return {
        "pages": pages,
        "encrypted": encrypted,
        "metadata": metadata,
        "text": texts,
        "truncated": budget.truncated,
    }


def _require_eof_marker(path: Path, ctx: Context) -> None:
    # Without strict mode pypdf rebuilds a cut file from whatever objects it
    # finds, which would report a partial document as if it were whole.
    with path.open("rb") as fh:
        end = fh.seek(0, io.SEEK_END)
        fh.seek(max(0, end - PDF_EOF_SEARCH_BYTES))
        if b"%%EOF" not in fh.read():
            raise PermanentError(
                f"{ctx.relpath}: the PDF is truncated (no %%EOF marker at its end); "
                "the upload or copy was probably cut short, submit it again"
            )


def _pdf_metadata(reader: Any) -> dict[str, str | None]:
    info = reader.metadata or {}
    fields = {
        "title": "/Title",
        "author": "/Author",
        "subject": "/Subject",
        "creator": "/Creator",
        "producer": "/Producer",
    }
    meta: dict[str, str | None] = {
        key: (str(info[name]) if info.get(name) is not None else None)
        for key, name in fields.items()
    }
    for key, name, attr in (
        ("created", "/CreationDate", "creation_date"),
        ("modified", "/ModDate", "modification_date"),
    ):
        try:
            when = getattr(info, attr, None)
        except ValueError:  # a malformed date: keep it as written
            when = None
        raw = info.get(name)
        meta[key] = when.isoformat() if when is not None else (str(raw) if raw else None)
    return meta


# -- spreadsheets --------------------------------------------------------------


def _read_xlsx(path: Path, ctx: Context, budget: _Budget) -> Result:
    """Every worksheet's size and rows, formulas as their cached values (openpyxl).

    Safe parsing: openpyxl parses every XML part with defusedxml whenever it
    is installed (``openpyxl.DEFUSEDXML``, a dependency of batchd), which
    refuses entity declarations and external references, so a workbook
    cannot make us read a local file (XXE) or blow up memory (billion laughs).
    If that protection was switched off (``OPENPYXL_DEFUSEDXML=False``) we
    refuse XLSX files. External links are not loaded (``keep_links=False``).
    Formulas come back as the value Excel cached when it saved the file, or
    null when the file has none (files written by openpyxl itself).
    """
    import openpyxl
    from defusedxml import DefusedXmlException

    if not openpyxl.DEFUSEDXML:
        raise PermanentError(
            f"{ctx.relpath}: refusing to read XLSX because openpyxl is not using "
            "defusedxml (unset OPENPYXL_DEFUSEDXML in the service environment)"
        )
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True, keep_links=False)
        try:
            sheets = [
                (ws.title, ws.max_row, ws.max_column, ws.iter_rows(values_only=True))
                for ws in book.worksheets
            ]
            return _sheets(sheets, ctx, budget)
        finally:
            book.close()
    except (OSError, MemoryError, ProcessorError):
        raise
    except Exception as exc:  # zipfile, XML and openpyxl errors alike
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, DefusedXmlException):
            cause = cause.__cause__ or cause.__context__  # openpyxl wraps it in ValueError
        if cause is not None:
            raise _bad_content(
                ctx, "the workbook declares XML entities or external references, refused", cause
            ) from exc
        raise _bad_content(ctx, "the XLSX workbook is damaged and cannot be read", exc) from exc


def _read_xls(path: Path, ctx: Context, budget: _Budget) -> Result:
    """Every sheet of an Excel 97-2003 workbook (xlrd), loaded one at a time."""
    import xlrd

    try:
        # xlrd writes warnings to stdout by default; keep the worker's quiet.
        book = xlrd.open_workbook(str(path), on_demand=True, logfile=io.StringIO())
        try:

            def rows(index: int) -> Iterator[list[Any]]:
                sheet = book.sheet_by_index(index)
                for r in range(sheet.nrows):
                    yield [_xls_value(cell, book.datemode) for cell in sheet.row(r)]
                book.unload_sheet(index)

            sheets = []
            for index in range(book.nsheets):
                sheet = book.sheet_by_index(index)
                sheets.append((sheet.name, sheet.nrows, sheet.ncols, rows(index)))
            return _sheets(sheets, ctx, budget)
        finally:
            book.release_resources()
    except (OSError, MemoryError, ProcessorError):
        raise
    except Exception as exc:  # xlrd.XLRDError, CompDocError, struct errors ...
        raise _bad_content(ctx, "the XLS workbook is damaged and cannot be read", exc) from exc


def _xls_value(cell: Any, datemode: int) -> Any:
    import xlrd

    if cell.ctype in (xlrd.XL_CELL_EMPTY, xlrd.XL_CELL_BLANK):
        return None
    if cell.ctype == xlrd.XL_CELL_DATE:
        return xlrd.xldate.xldate_as_datetime(cell.value, datemode).isoformat()
    if cell.ctype == xlrd.XL_CELL_BOOLEAN:
        return bool(cell.value)
    if cell.ctype == xlrd.XL_CELL_ERROR:
        return xlrd.error_text_from_code.get(cell.value, f"#ERR{cell.value}")
    if cell.ctype == xlrd.XL_CELL_NUMBER and float(cell.value).is_integer():
        return int(cell.value)  # XLS stores every number as a float; XLSX does not
    return json_value(cell.value)


Sheet = tuple[str, int | None, int | None, Iterable[Iterable[Any]]]


def _sheets(sheets: Sequence[Sheet], ctx: Context, budget: _Budget) -> Result:
    """The ``sheets`` list from (name, max_row, max_column, rows) per sheet.

    max_row and max_column are the sheet's declared size, else counted.
    Progress moves per sheet and per block of rows.
    """
    out: list[Result] = []
    for index, (name, max_row, max_column, rows) in enumerate(sheets):
        kept: list[list[Any]] = []
        counted = widest = 0
        for row in rows:
            values = [json_value(v) for v in row]
            counted += 1
            widest = max(widest, len(values))
            if budget.take_row(values):
                kept.append(values)
            elif max_row is not None and max_column is not None:
                break  # the size is known: no need to read the rest
            if counted % PROGRESS_EVERY_ROWS == 0 and max_row:
                ctx.progress((index + min(counted / max_row, 1.0)) * 100 / len(sheets))
        out.append(
            {
                "name": name,
                "max_row": max_row if max_row is not None else counted,
                "max_column": max_column if max_column is not None else widest,
                "rows": kept,
            }
        )
        ctx.progress((index + 1) * 100 / len(sheets))
    return {"sheets": out, "truncated": budget.truncated}


# -- CSV -----------------------------------------------------------------------


def _read_csv(path: Path, ctx: Context, budget: _Budget, encoding: str, size: int) -> Result:
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
        records: list[dict[str, Any]] = []
        count = 0
        try:
            for row in reader:
                if not row:
                    continue  # a blank line
                if not keys:
                    header, keys = row, _unique_keys(row)
                    continue
                count += 1
                if budget.take_row(row):
                    records.append(_record(keys, row))
                if count % PROGRESS_EVERY_ROWS == 0 and size:
                    ctx.progress(raw.tell() * 100 / size)  # read-ahead makes it approximate
        except csv.Error as exc:
            raise _bad_content(
                ctx, f"not valid CSV at line {reader.line_num} (limit {limit} chars a field)", exc
            ) from exc
    return {
        "encoding": encoding,
        "delimiter": delimiter,
        "header": header,
        "rows": count,
        "records": records,
        "truncated": budget.truncated,
    }


def _delimiter(sample: str) -> str:
    """The delimiter csv.Sniffer sees in whole lines of ``sample``; when it
    cannot tell, the candidate most frequent in the first line, else a comma."""
    lines = sample[: sample.rfind("\n")] if "\n" in sample else sample
    try:
        return csv.Sniffer().sniff(lines, delimiters=CSV_DELIMITERS).delimiter
    except csv.Error:
        first = lines.split("\n", 1)[0]
        best = max(CSV_DELIMITERS, key=first.count)
        return best if first.count(best) else ","


def _unique_keys(header: list[str]) -> list[str]:
    keys: list[str] = []
    seen: set[str] = set()
    for number, name in enumerate(header, start=1):
        key = name.strip() or f"column_{number}"
        candidate, n = key, 1
        while candidate in seen:
            n += 1
            candidate = f"{key}_{n}"
        seen.add(candidate)
        keys.append(candidate)
    return keys


def _record(keys: list[str], row: list[str]) -> dict[str, Any]:
    record: dict[str, Any] = dict.fromkeys(keys)
    record.update(zip(keys, row, strict=False))
    for number in range(len(keys) + 1, len(row) + 1):
        record[f"column_{number}"] = row[number - 1]
    return record
