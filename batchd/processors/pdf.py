"""PDF pages, document information and text, read with PDFium (pypdfium2).

PDFium was chosen by measurement (BENCHMARKS.md, "Real-world documents"):
it extracts text several times faster than pypdf and faster than poppler's
``pdftotext``, and reads pages whose content stream is broken where pypdf
gave up on the whole document.

What holds for every PDF:

- a page PDFium cannot load gives ``""`` in ``text`` and an entry in
  ``page_errors``; the document still completes;
- ``pages_without_text`` lists the (1-based) pages that have no text layer
  at all (blank or scanned pages: tell them apart with an OCR step);
- dates are ISO 8601 in UTC; a date that does not parse is kept as written;
- a file with no pages, an encrypted file that needs a password, a file cut
  short and a compressed stream expanding past ``inspect.max_pdf_stream_mb``
  fail permanently, each saying why.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from batchd.errors import PermanentError, ProcessorError
from batchd.processors import Context
from batchd.processors.content import Budget, Result, bad_content

#: PDFium, like pypdf, tolerates this much junk after a PDF's last %%EOF.
PDF_EOF_SEARCH_BYTES = 1024 * 1024
#: bytes inflated at a time when measuring a compressed stream.
INFLATE_CHUNK_BYTES = 1024 * 1024
#: the first piece of a compressed stream read to measure it; each next
#: piece is twice as large, up to INFLATE_CHUNK_BYTES.
FIRST_INFLATE_BYTES = 16 * 1024
#: bytes of a PDF searched for stream keywords at a time.
STREAM_SCAN_BYTES = 1024 * 1024

#: the keyword a stream's data follows; "endstream" is told apart by the
#: bytes before it (a lookbehind first would make the search try every byte).
_STREAM_KEYWORD = re.compile(rb"stream\r?\n")
_PDF_DATE = re.compile(
    r"""^(?:D:)?(?P<Y>\d{4})(?P<m>\d{2})?(?P<d>\d{2})?(?P<H>\d{2})?(?P<M>\d{2})?(?P<S>\d{2})?
    (?:(?P<z>[Zz])|(?P<sign>[+-])(?P<oh>\d{2})'?(?P<om>\d{2})?'?)?
    (?:[Zz]?\d{2}'?\d{2}'?)?$""",
    re.VERBOSE,
)
_INFO_KEYS = {
    "title": "Title",
    "author": "Author",
    "subject": "Subject",
    "keywords": "Keywords",
    "creator": "Creator",
    "producer": "Producer",
}


def read_pdf(path: Path, ctx: Context, budget: Budget) -> Result:
    """Page count, document information and the text of each page.

    ``text`` has one string per page, in order; it stops early when
    ``processing.max_text_chars`` or ``inspect.max_pages`` is reached.
    """
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    _require_eof_marker(path, ctx)
    _check_streams(path, ctx, ctx.settings.inspect.max_pdf_stream_mb)
    try:
        doc = pdfium.PdfDocument(path)
    except pdfium.PdfiumError as exc:
        if "password" in str(exc).lower():
            raise PermanentError(
                f"{ctx.relpath}: the PDF is encrypted and needs a password, which batchd "
                "does not have; remove the password and submit it again"
            ) from exc
        if _page_count(path) == 0:
            raise _no_pages(ctx) from exc
        raise bad_content(ctx, "the PDF is damaged and cannot be read", exc) from exc
    try:
        pages = len(doc)
        if pages == 0:
            raise _no_pages(ctx)
        encrypted = pdfium_c.FPDF_GetSecurityHandlerRevision(doc) != -1
        forms = pdfium_c.FPDF_GetFormType(doc) != pdfium_c.FORMTYPE_NONE
        if forms:
            doc.init_forms()  # before any page is loaded, or fields read empty
        metadata = pdf_metadata(doc.get_metadata_dict(skip_empty=True))
        texts: list[str] = []
        page_errors: list[dict[str, Any]] = []
        without_text: list[int] = []
        max_pages = ctx.settings.inspect.max_pages
        for index in range(pages):
            if index >= max_pages:
                budget.hit("inspect.max_pages")
                break
            text, chars, error = _page_text(doc, index, forms)
            if error is not None:
                page_errors.append({"page": index + 1, "error": error})
            elif chars == 0:
                without_text.append(index + 1)
            kept = budget.take_text(text)
            if kept is None:
                break
            texts.append(kept)
            ctx.progress((index + 1) * 100 / pages)
    except (OSError, MemoryError, ProcessorError):
        raise
    except Exception as exc:  # PDFium reports damage as PdfiumError, ctypes as others
        raise bad_content(ctx, "the PDF is damaged and cannot be read", exc) from exc
    finally:
        doc.close()
    return {
        "pages": pages,
        "encrypted": encrypted,
        "metadata": metadata,
        "text": texts,
        "page_errors": page_errors,
        "pages_without_text": without_text,
        **budget.fields(),
    }


def _no_pages(ctx: Context) -> PermanentError:
    return PermanentError(f"{ctx.relpath}: the PDF has no pages; export or scan the document again")


def _page_count(path: Path) -> int | None:
    """The page count pypdf reads, or None: PDFium refuses to open a document
    with no pages as if it were damaged, and that deserves its own message."""
    from pypdf import PdfReader

    try:
        return len(PdfReader(path, strict=False).pages)
    except Exception:  # any pypdf failure: the file really is damaged
        return None


def _page_text(doc: Any, index: int, forms: bool) -> tuple[str, int, str | None]:
    """(text, characters on the page, error) of page ``index``.

    Filled-in form fields show on the page but are not in its text layer:
    their values follow the page's text, one per line.
    """
    import pypdfium2 as pdfium

    try:
        page = doc[index]
    except pdfium.PdfiumError as exc:
        return "", 0, f"the page cannot be loaded: {exc}"
    try:
        textpage = page.get_textpage()
        try:
            chars = textpage.count_chars()
            text = textpage.get_text_range() if chars > 0 else ""
        finally:
            textpage.close()
        fields = _field_values(doc, page) if forms else []
    except pdfium.PdfiumError as exc:
        return "", 0, f"the page's text cannot be read: {exc}"
    finally:
        page.close()
    if fields:
        text = "\n".join([text, *fields]) if text else "\n".join(fields)
        chars += sum(len(f) for f in fields)
    # PDFium ends lines with CRLF and marks hyphenation points with U+FFFE.
    text = text.replace("\r\n", "\n").replace("\ufffe", "").replace("\x00", "")
    return text, chars, None


def _field_values(doc: Any, page: Any) -> list[str]:
    """The non-empty values of the form fields (widgets) on ``page``."""
    import pypdfium2.raw as pdfium_c

    values: list[str] = []
    handle = doc.formenv.raw
    for index in range(pdfium_c.FPDFPage_GetAnnotCount(page)):
        annot = pdfium_c.FPDFPage_GetAnnot(page, index)
        try:
            if pdfium_c.FPDFAnnot_GetSubtype(annot) != pdfium_c.FPDF_ANNOT_WIDGET:
                continue
            if (
                pdfium_c.FPDFAnnot_GetFormFieldType(handle, annot)
                == pdfium_c.FPDF_FORMFIELD_LISTBOX
            ):
                # a list box shows all its options, not only the chosen one
                for option in range(max(0, pdfium_c.FPDFAnnot_GetOptionCount(handle, annot))):
                    values.append(_utf16(pdfium_c.FPDFAnnot_GetOptionLabel, handle, annot, option))
                continue
            value = _utf16(pdfium_c.FPDFAnnot_GetFormFieldValue, handle, annot)
            if value and value not in ("Off", "Yes"):  # check boxes' states are no text
                values.append(value)
        finally:
            pdfium_c.FPDFPage_CloseAnnot(annot)
    return values


def _utf16(getter: Any, *args: Any) -> str:
    """A PDFium string getter's answer (UTF-16LE with a NUL; asked twice:
    the size first, then the text)."""
    import ctypes

    import pypdfium2.raw as pdfium_c

    size = getter(*args, None, 0)
    if size <= 2:  # nothing but the terminating NUL
        return ""
    buf = ctypes.create_string_buffer(size)
    getter(*args, ctypes.cast(buf, ctypes.POINTER(pdfium_c.FPDF_WCHAR)), size)
    return buf.raw[: size - 2].decode("utf-16-le", "replace").strip()


def _require_eof_marker(path: Path, ctx: Context) -> None:
    # PDFium rebuilds a cut file from whatever objects it finds, which would
    # report a partial document as if it were whole.
    with path.open("rb") as fh:
        end = fh.seek(0, 2)
        fh.seek(max(0, end - PDF_EOF_SEARCH_BYTES))
        if b"%%EOF" not in fh.read():
            raise PermanentError(
                f"{ctx.relpath}: the PDF is truncated (no %%EOF marker at its end); "
                "the upload or copy was probably cut short, submit it again"
            )


def _check_streams(path: Path, ctx: Context, max_mb: int) -> None:
    """Refuse a PDF with a Flate stream that expands past ``max_mb`` MiB.

    PDFium inflates a content stream whole, without a limit, and aborts the
    process when memory runs out: a 1 MB "flate bomb" would kill the worker
    (and be retried) instead of failing once with a reason. Inflating each
    stream here with a cap costs one zlib pass, far less than text extraction.
    Streams that are not zlib data (JPEG images, other filters) stop at their
    first bytes.

    A stream is read a small piece first, each further piece twice as large:
    most are a few KiB, and reading (and zlib keeping the unused rest of) a
    whole MiB for each was most of this check's time. The file is read, not
    mapped: a mapping counts every page touched as the worker's memory.
    """
    limit = max_mb * 1024 * 1024
    with path.open("rb") as fh:
        fd = fh.fileno()
        size = os.fstat(fd).st_size
        for start in _stream_starts(fd, size):
            head = os.pread(fd, 2, start)
            if len(head) < 2 or head[0] & 0x0F != 8 or (head[0] << 8 | head[1]) % 31:
                continue  # not a zlib header: another filter, or none
            inflater = zlib.decompressobj()
            total = 0
            pos = start
            piece = FIRST_INFLATE_BYTES
            try:
                while pos < size and not inflater.eof:
                    buf = os.pread(fd, piece, pos)
                    if not buf:
                        break
                    pos += len(buf)
                    piece = min(piece * 2, INFLATE_CHUNK_BYTES)
                    while buf and not inflater.eof:
                        total += len(inflater.decompress(buf, INFLATE_CHUNK_BYTES))
                        if total > limit:
                            raise PermanentError(
                                f"{ctx.relpath}: a compressed stream of the PDF (at byte "
                                f"{start}) expands to more than {max_mb} MiB "
                                "(inspect.max_pdf_stream_mb); it looks like a "
                                "decompression bomb; if the document is genuine, raise "
                                "that limit"
                            )
                        buf = inflater.unconsumed_tail
            except zlib.error:
                continue  # damaged or not zlib: PDFium decides what it can read


def _stream_starts(fd: int, size: int) -> Iterator[int]:
    """The file offset just after each ``stream`` keyword (with its end of
    line) that is not the end of ``endstream``, the file read a block at a time."""
    offset = 0
    while offset < size:
        # 3 bytes before the block to tell "endstream", 8 after for a keyword
        # that crosses into the next block
        before = min(offset, 3)
        block = os.pread(fd, before + STREAM_SCAN_BYTES + 8, offset - before)
        end = before + STREAM_SCAN_BYTES
        for match in _STREAM_KEYWORD.finditer(block, before):
            begin = match.start()
            if begin >= end:
                break  # the next block's
            if block[max(0, begin - 3) : begin] != b"end":
                yield offset - before + match.end()
        offset += STREAM_SCAN_BYTES


def pdf_metadata(info: dict[str, str]) -> dict[str, str | None]:
    """The document information, dates as ISO 8601 UTC (raw when unparseable)."""
    meta: dict[str, str | None] = {key: info.get(name) or None for key, name in _INFO_KEYS.items()}
    for key, name in (("created", "CreationDate"), ("modified", "ModDate")):
        raw = info.get(name) or None
        meta[key] = pdf_date(raw) if raw else None
    return meta


def pdf_date(raw: str) -> str:
    """A PDF date (``D:YYYYMMDDHHmmSSOHH'mm'``, every part after the year
    optional) as ISO 8601 UTC, e.g. ``2015-07-22T10:04:04Z``; ``raw`` itself
    when it is not a date."""
    match = _PDF_DATE.match(raw.strip())
    if match is None:
        return raw
    part = match.groupdict()
    try:
        when = dt.datetime(
            int(part["Y"]),
            int(part["m"] or 1),
            int(part["d"] or 1),
            int(part["H"] or 0),
            int(part["M"] or 0),
            int(part["S"] or 0),
            tzinfo=dt.UTC,
        )
        if part["sign"]:
            offset = dt.timedelta(hours=int(part["oh"]), minutes=int(part["om"] or 0))
            when -= offset if part["sign"] == "+" else -offset
    except (ValueError, OverflowError):
        return raw
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")
