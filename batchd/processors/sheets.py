"""XLSX workbooks: every sheet's true size, rows, merged ranges and error
cells, bounded by ``inspect.max_cells`` and ``inspect.max_columns``; and
:func:`sheet_result`, the sheet shape XLS (:mod:`.xls`) shares.

Engines, chosen by measurement (BENCHMARKS.md, "Real-world documents"):

- XLSX: a first pass over each sheet's XML (zlib and regular expressions,
  no per-cell Python objects) measures what the sheet really holds: its
  cells, its bounding box (never the declared ``<dimension>``, which lies in
  both directions), merged ranges and error cells. When the sheet fits the
  caps, calamine (Rust) reads the values, many times faster than openpyxl.
  When it does not, or calamine cannot open the file, a streaming expat
  reader takes over: it keeps at most ``max_columns`` cells of a row and
  stops at ``max_cells``, so memory stays near the data kept whatever the
  XML holds. A single sheet calamine fails on goes to that reader alone.
- XLS (Excel 2.x to 2003, BIFF2 to BIFF8), in :mod:`.xls`: calamine when no
  record of the workbook may be an error cell, else xlrd, which reads every
  BIFF version and knows error cells and merged ranges.

Values have one representation in every format (see
:func:`batchd.processors.content.json_value`); trailing empty cells of a
row and trailing empty rows of a sheet are dropped, so ``rows`` holds no
padding and ``max_row``/``max_column`` are the last row and column holding
a value.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import posixpath
import re
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from xml.parsers import expat

from batchd.errors import PermanentError, ProcessorError
from batchd.processors import Context
from batchd.processors.content import Budget, Result, bad_content, json_value

#: rows between two progress reports.
PROGRESS_EVERY_ROWS = 1000
#: the head of an XML part searched for a DOCTYPE or entity declaration.
ENTITY_CHECK_BYTES = 4096
#: bytes of sheet XML handled at a time by the first pass and the streaming reader.
XML_CHUNK_BYTES = 1024 * 1024
#: how far back from a block's end the first pass looks for a cell's end to
#: cut the block at: a short look first, a long one for a cell of long text.
CUT_WINDOW_BYTES = (4096, 65536)

_NS_MAIN = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
_NS_REL = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
#: element and attribute names as a namespace-aware expat parser gives them.
_MAIN_SHEET = f"{_NS_MAIN}}}sheet"
_MAIN_WORKBOOK_PR = f"{_NS_MAIN}}}workbookPr"
_REL_ID = f"{_NS_REL}}}id"
_PREFIX = re.compile(rb"<(\w+:)?sheetData[\s>/]")
_REF = re.compile(rb"\br=\"([A-Z]{1,3}[0-9]+)\"")


@functools.lru_cache(maxsize=8)
def _patterns(prefix: bytes) -> dict[str, re.Pattern[bytes]]:
    """The first pass's expressions for a sheet whose elements carry the
    namespace ``prefix`` (``b""`` or e.g. ``b"x:"``). Each starts with a
    literal, so the regex engine skips through the XML at memchr speed."""
    p = re.escape(prefix)
    return {
        "cell_ref": re.compile(rb"<" + p + rb"c\s[^>]*?\br=\"([A-Z]{1,3})([0-9]+)"),
        "row_number": re.compile(rb"<" + p + rb"row\s[^>]*?\br=\"([0-9]+)\""),
        "value": re.compile(rb"<" + p + rb"v>([^<]*)</" + p + rb"v>"),
        "merge": re.compile(
            rb"<" + p + rb"mergeCell\s[^>]*?\bref=\"([A-Z]{1,3}[0-9]+(?::[A-Z]{1,3}[0-9]+)?)\""
        ),
        "cell_end": re.compile(rb"</" + p + rb"c>|<" + p + rb"c\s[^>]*/>"),
        # a cell's column and row, when its tag is not also its end (<c r="B7"/>)
        "valued_cell": re.compile(
            rb"<" + p + rb"c\s[^>]*?\br=\"([A-Z]{1,3})([0-9]+)\"[^>]*(?<!/)>"
        ),
        "empty_cell": re.compile(rb"<" + p + rb"c\s[^>]*?\br=\"[A-Z]{1,3}[0-9]+\"[^>]*/>"),
        "cell_ws": re.compile(rb"<" + p + rb"c[\t\r\n]"),
        # any tag _count_cells counts (a cell or a row, whatever follows the name)
        "cell_or_row": re.compile(rb"<" + p + rb"(?:c|row)[\s>/]"),
        "row_ws": re.compile(rb"<" + p + rb"row[\t\r\n]"),
        # the quick count (see _count_cells_quickly): r the first attribute
        "row_first": re.compile(rb"<" + p + rb"row r=\"([0-9]+)\""),
        "odd_cell": re.compile(rb"<" + p + rb"c(?! r=\"[A-Z]{1,3}[0-9])"),
        "three_letters": re.compile(rb"<" + p + rb"c r=\"([A-Z]{3})[0-9]"),
        # (a cell not opening as <c r="B7"> or <c r="AB7">: _not_placed_within)
        # a cell whose r comes later in the tag (<c t="s" s="1" r="B7">)
        "unplaced_cell": re.compile(rb"<" + p + rb"c(?![^>]*?\sr=\"[A-Z]{1,3}[0-9])"),
        # no \b before r: an expression that does not start with a literal is
        # searched position by position (8x slower); an attribute ending in r
        # (xr="AB1") can only raise the bound, which the exact count then checks
        "three_letters_anywhere": re.compile(rb"r=\"([A-Z]{3})[0-9]"),
        "two_letters_anywhere": re.compile(rb"r=\"[A-Z]{2}"),
    }


_A1 = re.compile(r"^([A-Z]{1,3})([0-9]+)$")
#: floats below this in magnitude are exact integers when whole (2**53).
_EXACT = float(2**53)
#: number formats 14-22 and 45-47 are dates and times whatever the file says;
#: their codes, when the file does not give them (ECMA-376 18.8.30). The
#: other built-in formats are numbers and text.
_BUILTIN_DATE_CODES = {
    14: "mm-dd-yy",
    15: "d-mmm-yy",
    16: "d-mmm",
    17: "mmm-yy",
    18: "h:mm AM/PM",
    19: "h:mm:ss AM/PM",
    20: "h:mm",
    21: "h:mm:ss",
    22: "m/d/yy h:mm",
    45: "mm:ss",
    46: "[h]:mm:ss",
    47: "mmss.0",
}
_BUILTIN_DATE_FORMATS = frozenset(_BUILTIN_DATE_CODES)
#: what a number format's date test ignores: quoted text, and bracketed
#: parts other than elapsed hours, minutes and seconds (colours, locales).
_FORMAT_NOISE = re.compile(r'".*?"|\[(?!hh?\]|mm?\]|ss?\])[^\]]*\]')
_DATE_LETTER = re.compile(r"(?<![_\\])[dmhysDMHYS]")


def _is_date_format(code: str) -> bool:
    """Whether a number format shows a date or time: a d, m, h, y or s outside
    quotes and brackets in its first section (openpyxl's test, kept here so
    that a worker does not import openpyxl, ~10 MiB, for it)."""
    return _DATE_LETTER.search(_FORMAT_NOISE.sub("", code.split(";")[0])) is not None


def column_number(letters: str) -> int:
    """1-based column number of ``"A"``, ``"AB"`` ..."""
    number = 0
    for ch in letters:
        number = number * 26 + ord(ch) - 64
    return number


# -- XLSX ----------------------------------------------------------------------


@dataclass
class _SheetScan:
    """What the first pass found in one sheet's XML."""

    name: str
    part: str
    cells: int = 0
    #: cells without an ``r`` attribute: their position is only known by counting.
    unplaced: int = 0
    max_row: int = 0
    max_column: int = 0
    merged: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    #: the sheet's head declares a DOCTYPE or entities (refused).
    declares_entities: bool = False
    #: the namespace prefix of the sheet's elements (``b"x:"``), or b"".
    prefix: bytes = b""
    #: max_column is an upper bound (26 or 702, from the letters of the
    #: references), not the exact last column, or max_row one (272 -> 299,
    #: past which no reference goes): see _count_cells_quickly.
    bounded: bool = False

    @property
    def area(self) -> int:
        return self.max_row * self.max_column


def read_xlsx(
    path: Path, ctx: Context, budget: Budget, archive: zipfile.ZipFile | None = None
) -> Result:
    """Every worksheet of an XLSX workbook; see the module docstring.

    ``archive``: the workbook already open (the caller closes it).
    """
    caps = ctx.settings.inspect
    try:
        with (
            contextlib.nullcontext(archive) if archive is not None else zipfile.ZipFile(path) as zf
        ):
            sheets, date1904 = _workbook_sheets(zf, ctx)
            scans = [_scan_sheet(zf, name, part, caps.max_cells) for name, part in sheets]
            # the first pass looked at each sheet's head: only those declaring
            # entities, and the two shared parts, are opened again
            _refuse_entities(zf, ctx, [s.part for s in scans if s.declares_entities])
            unpacked = sum(zf.getinfo(s.part).file_size for s in scans)
            if unpacked > caps.max_xlsx_unpacked_mb * 1024 * 1024:
                raise PermanentError(
                    f"{ctx.relpath}: the workbook's sheets expand to {unpacked >> 20} MiB, "
                    f"more than inspect.max_xlsx_unpacked_mb ({caps.max_xlsx_unpacked_mb}); "
                    "split the workbook or raise that limit"
                )
            fits = _fits(scans, caps.max_cells, caps.max_columns)
            if not fits and any(s.bounded for s in scans):
                # a bound said no: the exact sizes decide, as they would have
                scans = [
                    _scan_sheet(zf, s.name, s.part, caps.max_cells, quick=False) if s.bounded else s
                    for s in scans
                ]
                fits = _fits(scans, caps.max_cells, caps.max_columns)
            if not fits:
                # Cells written empty (<c r="AMJ1048576" s="3"/>, LibreOffice
                # styling whole rows and columns) are in no area calamine
                # allocates: the area of the cells holding something decides.
                valued = [_valued_area(zf, s, caps.max_cells, caps.max_columns) for s in scans]
                if _fits(valued, caps.max_cells, caps.max_columns):
                    scans, fits = valued, True
            out: list[Result] | None = None
            if fits:
                out = _calamine_sheets(zf, path, ctx, budget, scans, date1904)
            if out is None:
                out = _streamed_sheets(zf, ctx, budget, scans, date1904)
    except (OSError, MemoryError, ProcessorError):
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise bad_content(
            ctx, "damaged workbook: the ZIP archive cannot be read (export it again)", exc
        ) from exc
    return {"sheets": out, **budget.fields()}


def _fits(scans: list[_SheetScan], max_cells: int, max_columns: int) -> bool:
    """Whether calamine may read these sheets: every cell placed, and the
    sheets' areas (which calamine allocates) within the caps."""
    return (
        all(s.unplaced == 0 and s.area <= max_cells and s.max_column <= max_columns for s in scans)
        and sum(s.area for s in scans) <= max_cells
    )


def _workbook_sheets(zf: zipfile.ZipFile, ctx: Context) -> tuple[list[tuple[str, str]], bool]:
    """(name, part) of every worksheet in workbook order, and the 1904 flag.

    Read with expat handlers (entities refused, as everywhere here) rather
    than a tree: most workbooks are small, and this is paid for each one.
    """

    def part(name: str) -> bytes:
        try:
            return zf.read(name)
        except KeyError:
            raise PermanentError(
                f"{ctx.relpath}: damaged workbook: {name} is missing; export it again"
            ) from None

    sheets: list[dict[str, str]] = []
    targets: dict[str | None, str] = {}
    flags: list[str] = []
    depth = [0]

    def book_start(tag: str, attrs: dict[str, str]) -> None:
        depth[0] += 1
        if tag == _MAIN_SHEET:
            sheets.append(attrs)
        elif tag == _MAIN_WORKBOOK_PR and depth[0] == 2:
            flags.append(attrs.get("date1904", ""))

    def rels_start(tag: str, attrs: dict[str, str]) -> None:
        depth[0] += 1
        if depth[0] == 2:
            targets[attrs.get("Id")] = attrs.get("Target", "")

    def end(tag: str) -> None:
        depth[0] -= 1

    try:
        for name, start in (
            ("xl/workbook.xml", book_start),
            ("xl/_rels/workbook.xml.rels", rels_start),
        ):
            data = part(name)
            depth[0] = 0
            parser = _parser(start, end, None, namespaces=True)
            parser.Parse(data, True)
    except (expat.ExpatError, ValueError) as exc:
        raise bad_content(
            ctx, "damaged workbook: xl/workbook.xml or its relationships are not valid XML", exc
        ) from exc
    date1904 = bool(flags) and flags[0].lower() in {"1", "true"}
    names = set(zf.namelist())
    out: list[tuple[str, str]] = []
    for sheet in sheets:
        target = targets.get(sheet.get(_REL_ID), "")
        if "worksheet" not in target and not target.endswith(".xml"):
            continue
        target = target.lstrip("/") if target.startswith("/") else posixpath.join("xl", target)
        target = posixpath.normpath(target)
        if "chartsheet" in target:
            continue  # a chart, no cells
        if target not in names:
            raise PermanentError(
                f"{ctx.relpath}: damaged workbook: {target} (sheet {sheet.get('name')!r}) "
                "is missing; export it again"
            )
        out.append((sheet.get("name") or target, target))
    return out, date1904


def _refuse_entities(zf: zipfile.ZipFile, ctx: Context, parts: list[str]) -> None:
    """Refuse a workbook whose XML declares entities (XXE, billion laughs).

    A DOCTYPE comes before the root element, so the head of each part tells;
    calamine is not asked to handle one, the streaming reader refuses them too.
    """
    names = set(zf.namelist())
    for part in [*parts, "xl/sharedStrings.xml", "xl/styles.xml"]:
        if part not in names:
            continue
        with zf.open(part) as fh:
            head = fh.read(ENTITY_CHECK_BYTES)
        if _declares_entities(head):
            raise PermanentError(
                f"{ctx.relpath}: the workbook declares XML entities or external references "
                f"in {part}, refused (they can read local files or exhaust memory)"
            )


def _declares_entities(head: bytes) -> bool:
    return b"<!DOCTYPE" in head or b"<!ENTITY" in head


def _xml_chunks(zf: zipfile.ZipFile, part: str) -> Iterator[bytes]:
    if zf.getinfo(part).file_size <= XML_CHUNK_BYTES:
        # most parts are one block: one read, not a second one finding the
        # end (the archive stops a member at its recorded size either way)
        if chunk := zf.read(part):
            yield chunk
        return
    with zf.open(part) as fh:
        while chunk := fh.read(XML_CHUNK_BYTES):
            yield chunk


def _scan_sheet(
    zf: zipfile.ZipFile, name: str, part: str, max_cells: int, *, quick: bool = True
) -> _SheetScan:
    """The first pass over one sheet; stops counting past ``max_cells`` cells.

    ``quick``: the columns may be bounded rather than exact where that is
    cheaper (:func:`_count_cells_quickly`).
    """
    scan = _SheetScan(name, part)
    columns: set[bytes] = set()
    carry = b""
    prefix: bytes | None = None
    #: inside <sheetData> at the start of the next block.
    inside = [False]
    for chunk in _xml_chunks(zf, part):
        if not carry and prefix is None:  # the part's first chunk
            scan.declares_entities = _declares_entities(chunk[:ENTITY_CHECK_BYTES])
        buf = carry + chunk
        if prefix is None:
            found = _PREFIX.search(buf)
            if found is None and len(buf) < 4 * XML_CHUNK_BYTES:
                carry = buf
                continue
            prefix = (found.group(1) or b"") if found else b""
            scan.prefix = prefix
        patterns = _patterns(prefix)
        if len(chunk) < XML_CHUNK_BYTES:
            head, carry = buf, b""  # the end of the part: nothing to cut
        else:
            # Cut after a complete cell near the end, so no cell is split
            # between passes. Any cell's end will do: the last few KiB hold
            # one but for a cell of long text (a match object per cell of
            # the last 64 KiB was ~5 % of the first pass).
            ends: list[int] = []
            for window in CUT_WINDOW_BYTES:
                if not ends:
                    tail = patterns["cell_end"].finditer(buf, max(0, len(buf) - window))
                    ends = [m.end() for m in tail]
            big = len(buf) > 4 * XML_CHUNK_BYTES
            cut = ends[-1] if ends else (buf.rfind(b">") + 1 if big else 0)
            head, carry = buf[:cut], buf[cut:]
        _scan_block(scan, head, columns, prefix, inside if quick else None)
        if scan.cells > max_cells:
            break  # too big for calamine anyway: the streaming reader takes over
    else:
        _scan_block(scan, carry, columns, prefix or b"", inside if quick else None)
    if columns:
        scan.max_column = max(column_number(c.decode()) for c in columns)
    return scan


def _valued_area(
    zf: zipfile.ZipFile, scan: _SheetScan, max_cells: int, max_columns: int
) -> _SheetScan:
    """``scan`` with the last row and column of the cells that are not written
    empty (``<c .../>``), for a sheet that does not fit the caps as counted.

    calamine leaves empty cells out of the range it allocates, so their
    positions cannot make it allocate more. A sheet that fits anyway, has a
    cell without a reference, or more cells than ``max_cells`` (the
    streaming reader stops there) is left as it is; so is one where a cell
    tag is not found as either kind (a ">" inside an attribute value).
    """
    if scan.unplaced or scan.cells > max_cells:
        return scan
    if scan.area <= max_cells and scan.max_column <= max_columns:
        return scan
    patterns = _patterns(scan.prefix)
    tag = b"<" + scan.prefix + b"c"
    columns: set[bytes] = set()
    max_row = 0
    carry = b""
    for chunk in _xml_chunks(zf, scan.part):
        block = carry + chunk
        # up to the last tag's end: a tag is never split between blocks
        cut = block.rfind(b">") + 1 if len(chunk) == XML_CHUNK_BYTES else len(block)
        block, carry = block[:cut], block[cut:]
        valued = patterns["valued_cell"].findall(block)
        empty = len(patterns["empty_cell"].findall(block))
        if len(valued) + empty != _count_tags(block, tag, patterns["cell_ws"]):
            return scan
        if valued:
            columns.update(letters for letters, _ in valued)
            max_row = max(max_row, max(int(number) for _, number in valued))
    max_column = max((column_number(c.decode()) for c in columns), default=0)
    return replace(scan, max_row=max_row, max_column=max_column, bounded=False)


def _scan_block(
    scan: _SheetScan, block: bytes, columns: set[bytes], prefix: bytes, inside: list[bool] | None
) -> None:
    """Count one block's cells, rows, error cells and merged ranges.

    ``inside``: whether the block starts inside ``<sheetData>`` (updated for
    the next block), or None to count exactly everywhere.
    """
    if not block:
        return
    patterns = _patterns(prefix)
    start, end = 0, len(block)
    if inside is not None:
        if not inside[0]:
            start = block.find(b"<" + prefix + b"sheetData")
        close = block.find(b"</" + prefix + b"sheetData>", max(start, 0))
        if close >= 0:
            end = close
        inside[0] = start >= 0 and close < 0
    quick = inside is not None and start >= 0
    if quick and _count_cells_quickly(scan, block, start, end, columns, prefix):
        # what lies outside <sheetData> (column widths, merged ranges ...)
        # is small: counted the exact way, in case a cell is hidden there;
        # one search tells when there is no cell or row tag to count
        outside = patterns["cell_or_row"]
        if outside.search(block, 0, start):
            _count_cells(scan, block[:start], columns, prefix)
        if outside.search(block, end):
            _count_cells(scan, block[end:], columns, prefix)
    else:
        _count_cells(scan, block, columns, prefix)
    _error_cells(scan, block, prefix)
    # merged ranges are rare: a literal search skips the regex
    if b"mergeCell" in block:
        scan.merged.extend(m.decode() for m in patterns["merge"].findall(block))


def _error_cells(scan: _SheetScan, block: bytes, prefix: bytes) -> None:
    """The error cells of ``block``: reference and error text ("" when the
    cell holds none, as some exporters write ``<c r="C2" t="e"/>``).

    Found from the literal ``t="e"`` (one C-speed search per error cell),
    not by matching every cell's tag.
    """
    value = _patterns(prefix)["value"]
    name, close_tag = b"<" + prefix + b"c", b"</" + prefix + b"c>"
    pos = block.find(b't="e"')
    while pos >= 0:
        start, end = block.rfind(b"<", 0, pos), block.find(b">", pos)
        if end < 0:
            return
        after = block[start + len(name) : start + len(name) + 1]
        if block.startswith(name, start) and after.isspace() and block[pos - 1 : pos].isspace():
            ref = _REF.search(block, start, end)
            if ref is not None:
                text = b""
                if block[end - 1 : end] != b"/":  # not self-closing: a value may follow
                    close = block.find(close_tag, end)
                    found = value.search(block, end, close if close >= 0 else len(block))
                    text = found.group(1) if found else b""
                scan.errors[ref.group(1).decode()] = text.decode("utf-8", "replace")
        pos = block.find(b't="e"', end)


def _count_cells(scan: _SheetScan, block: bytes, columns: set[bytes], prefix: bytes) -> None:
    """The exact count: every cell's column, every row's number."""
    if not block:
        return
    patterns = _patterns(prefix)
    cell, row = b"<" + prefix + b"c", b"<" + prefix + b"row"
    cells = _count_tags(block, cell, patterns["cell_ws"])
    placed = patterns["cell_ref"].findall(block)
    scan.cells += cells
    scan.unplaced += cells - len(placed)
    columns.update(letters for letters, _ in placed)
    # calamine places a cell by its own reference, whatever row it is written
    # in: the last row is the larger of the two
    rows = patterns["row_number"].findall(block)
    if rows or placed:
        last = max(map(int, rows), default=0)
        scan.max_row = max(scan.max_row, last, max((int(n) for _, n in placed), default=0))
    tags = _count_tags(block, row, patterns["row_ws"])
    if tags > len(rows):
        scan.unplaced += 1  # a row without its number: only counting can place it


def _count_cells_quickly(
    scan: _SheetScan, block: bytes, start: int, end: int, columns: set[bytes], prefix: bytes
) -> bool:
    """Count the cells and rows of ``block[start:end]``, inside <sheetData>,
    in a few C-speed searches, and bound the last column; False (nothing
    counted) when the block is not in the shape this needs.

    Most writers put ``r`` first (``<c r="B7" ...``, ``<row r="7" ...``).
    When every element there whose name starts with ``c`` is a cell with a
    valid reference (checked at C speed when it comes first, tag by tag
    otherwise), and every row opens with its number, the cells and rows are
    counted exactly, the last row is exact, and the last column is exact for
    three-letter columns and otherwise bounded by the longest letters seen
    (Z = 26 or ZZ = 702): one search instead of a match object per cell (the
    exact count was a third of inspect's XLSX time). A bound only decides "fits
    the caps"; when it does not, the exact count decides (read_xlsx).
    """
    patterns = _patterns(prefix)
    rows = patterns["row_first"].findall(block, start, end)
    if block.count(b"<" + prefix + b"row", start, end) != len(rows):
        return False
    # A cell is placed by its own reference, not by the row it is written in
    # (<row r="1"><c r="XFD1048576">): no reference may go past the last row
    # seen, rounded up (272 -> 299, a bound like the columns'). The searches
    # for a wider column check that too, so the common case pays nothing more.
    top = max(scan.max_row, max(map(int, rows))) if rows else scan.max_row
    rows_bound = _row_bound(top)
    # One search in the common case (every cell <c r="B7">), each further one
    # starting where the previous stopped.
    bound = b"Z"
    three: list[bytes] = []
    wider = _not_placed_within(prefix, 1, rows_bound).search(block, start, end)
    if wider is not None:
        bound = b"ZZ"
        wider = _not_placed_within(prefix, 2, rows_bound).search(block, wider.start(), end)
    if wider is not None:
        # a wider column, r later in a tag, or a row past the bound: one search
        # for the last sends the block to the exact count
        if _reference_past(rows_bound).search(block, start, end):
            return False
        odd = patterns["odd_cell"].search(block, wider.start(), end)
        if odd is None:
            three = patterns["three_letters"].findall(block, wider.start(), end)
        else:
            # an element named c... not opening as <c r="B7">: a writer putting
            # r later (one scan of each tag), or a cell without a reference
            if patterns["unplaced_cell"].search(block, odd.start(), end):
                return False
            two = patterns["two_letters_anywhere"].search(block, start, end)
            bound = b"ZZ" if two else b"Z"
            three = patterns["three_letters_anywhere"].findall(block, start, end) if two else []
    cells = block.count(b"<" + prefix + b"c", start, end)
    if three:
        columns.update(three)  # exact: above any bound below
    elif cells:
        columns.add(bound)
        scan.bounded = True
    scan.cells += cells
    if rows_bound > top:
        scan.bounded = True
    scan.max_row = max(scan.max_row, rows_bound)
    return True


def _row_bound(row: int) -> int:
    """``row`` rounded up to its first digit followed by nines (272 -> 299):
    what the quick count checks no cell reference goes past."""
    digits = str(row)
    return int((int(digits[0]) + 1) * 10 ** (len(digits) - 1) - 1)


@functools.lru_cache(maxsize=64)
def _reference_past(bound: int) -> re.Pattern[bytes]:
    """An expression finding a cell reference (``r="B7"``) to a row after
    ``bound`` (a :func:`_row_bound`: one of 63 below 10**7, so each is compiled
    once). It starts with a literal, so the search skips through a block at C
    speed; it may also find what is not a cell's reference (``xr="B9"``, a
    leading zero), which only sends the block to the exact count."""
    digits = str(bound + 1)  # the first row past it: d000... or 1000...
    longer = b"[0-9]{%d}" % (len(digits) + 1)
    same = b"[%s-9]" % digits[0].encode() + b"[0-9]" * (len(digits) - 1) + b'"'
    # letters taken possessively: no backtracking into them (a third faster)
    return re.compile(rb'r="[A-Z]{1,3}+(?:' + longer + b"|" + same + rb")")


@functools.lru_cache(maxsize=256)
def _not_placed_within(prefix: bytes, letters: int, bound: int) -> re.Pattern[bytes]:
    """An expression finding an element named ``c``... that does not open as
    ``<c r="B7">`` with at most ``letters`` letters and a row up to ``bound``
    (a :func:`_row_bound`, d99...9)."""
    digits = str(bound)
    same = b"[0-%s]" % digits[0].encode() + b"[0-9]" * (len(digits) - 1)
    rows = b"[0-9]{1,%d}|" % (len(digits) - 1) + same if len(digits) > 1 else same
    p = re.escape(prefix)
    return re.compile(rb"<" + p + rb'c(?! r="[A-Z]{1,%d}+(?:%s)")' % (letters, rows))


def _count_tags(block: bytes, tag: bytes, whitespace: re.Pattern[bytes]) -> int:
    """How many elements open with ``tag`` (``b"<c"``) in ``block``. Writers put
    a space, ">" or "/" after the name; a tab or newline there is rare, so one
    search tells whether those need counting too."""
    ends = (
        (b" ", b">", b"/", b"\t", b"\r", b"\n") if whitespace.search(block) else (b" ", b">", b"/")
    )
    return sum(block.count(tag + end) for end in ends)


def _calamine_sheets(
    zf: zipfile.ZipFile,
    path: Path,
    ctx: Context,
    budget: Budget,
    scans: list[_SheetScan],
    date1904: bool,
) -> list[Result] | None:
    """The sheets read by calamine, or None when calamine cannot open the file.

    A sheet calamine fails on (a number it cannot parse, "2,5") is read by the
    streaming reader alone: the other sheets stay on calamine. It fails before
    the sheet's rows are taken, so nothing is counted twice.
    """
    import python_calamine

    try:
        book = python_calamine.CalamineWorkbook.from_path(str(path))
    except Exception:  # calamine's own errors: the streaming reader tries
        return None
    out: list[Result] = []
    styles: tuple[list[str], list[str]] | None = None
    try:
        for index, scan in enumerate(scans):
            try:
                grid = book.get_sheet_by_name(scan.name).to_python(skip_empty_area=False)
            except Exception:
                if styles is None:
                    styles = (_shared_strings(zf, ctx), _date_styles(zf))
                # the sheets fit max_cells together (checked before), so this one does
                result, _ = _streamed_sheet(
                    zf, ctx, budget, scan, *styles, date1904, ctx.settings.inspect.max_cells
                )
                out.append(result)
            else:
                rows = enumerate(grid, start=1)
                out.append(sheet_result(scan.name, rows, scan.merged, scan.errors, ctx, budget))
            ctx.progress((index + 1) * 100 / len(scans))
    finally:
        book.close()
    return out


def sheet_result(
    name: str,
    rows: Iterator[tuple[int, list[Any]]],
    merged: list[str],
    errors: dict[str, str],
    ctx: Context,
    budget: Budget,
    *,
    patch: bool = True,
) -> Result:
    """One sheet's result from its rows (cells as Python values, None = empty)."""
    max_columns = ctx.settings.inspect.max_columns
    kept: list[list[Any]] = []
    last = 0  # the number of the last row with a value
    max_row = max_column = 0
    number = 0
    # error texts to put back into calamine's rows, which show errors as "".
    by_row: dict[int, list[tuple[int, str]]] = {}
    for ref, text in errors.items() if patch else ():
        match = _A1.match(ref)
        if match:
            by_row.setdefault(int(match.group(2)), []).append((column_number(match.group(1)), text))
    for number, row in rows:
        if len(row) > max_columns:
            budget.hit("inspect.max_columns")
            row = row[:max_columns]
        values, chars = _json_row(row)
        if by_row:
            for col, text in by_row.get(number, ()):
                if col <= len(values):
                    values[col - 1] = text or None  # an error cell without a text is empty
        while values and values[-1] is None:
            values.pop()
        if not values:
            continue
        if number > last + 1:
            # empty rows between two rows with values are kept as [] (as far
            # as the row cap allows: a gap of a million rows costs nothing more)
            for _ in range(number - last - 1):
                if not budget.take_row([]):
                    break
                kept.append([])
        last = number
        if budget.take_row(values, chars):
            kept.append(values)
        max_row = number
        if len(values) > max_column:
            max_column = len(values)
    error_cells = [{"cell": ref, "error": text} for ref, text in errors.items()]
    return {
        "name": name,
        "max_row": max_row,
        "max_column": max_column,
        "rows": kept,
        "merged": merged,
        "errors": error_cells,
    }


def _json_row(row: list[Any]) -> tuple[list[Any], int | None]:
    """A row's cells as JSON values (what :func:`json_value` gives each), and
    the characters of its text when that came for free (else None).

    Most rows hold only numbers or only text: those are converted with a few
    C-speed passes over the row (``set(map(type, row))``, ``map(int, row)``)
    instead of Python work per cell, which was most of the time spent on a
    sheet after calamine read it.
    """
    kinds = set(map(type, row))
    if kinds == _FLOAT:
        # whole and exact (NaN and infinities are not whole): ints, as json_value gives
        if all(map(float.is_integer, row)) and min(row) > -_EXACT and max(row) < _EXACT:
            return list(map(int, row)), 0
    elif kinds == _STR:
        # "" is calamine's empty cell
        return ([v or None for v in row] if "" in row else list(row)), sum(map(len, row))
    # str, float and None (most cells) are converted inline, as json_value
    # would (a whole float becomes an int, NaN and infinities null: v - v
    # is 0 only for a finite v).
    values = [
        (v or None)
        if (t := type(v)) is str
        else (int(v) if v.is_integer() and -_EXACT < v < _EXACT else v if v - v == 0 else None)
        if t is float
        else None
        if v is None
        else json_value(v)
        for v in row
    ]
    return values, None


_FLOAT = {float}
_STR = {str}


def _streamed_sheets(
    zf: zipfile.ZipFile, ctx: Context, budget: Budget, scans: list[_SheetScan], date1904: bool
) -> list[Result]:
    strings = _shared_strings(zf, ctx)
    date_styles = _date_styles(zf)
    out: list[Result] = []
    cells_left = ctx.settings.inspect.max_cells
    for index, scan in enumerate(scans):
        result, cells = _streamed_sheet(
            zf, ctx, budget, scan, strings, date_styles, date1904, cells_left
        )
        out.append(result)
        cells_left = max(0, cells_left - cells)
        ctx.progress((index + 1) * 100 / len(scans))
    return out


def _streamed_sheet(
    zf: zipfile.ZipFile,
    ctx: Context,
    budget: Budget,
    scan: _SheetScan,
    strings: list[str],
    date_styles: list[str],
    date1904: bool,
    cells_left: int,
) -> tuple[Result, int]:
    """One sheet read by the streaming reader, and the cells it read."""
    reader = _StreamedSheet(
        zf,
        scan.part,
        strings,
        date_styles,
        date1904,
        ctx.settings.inspect.max_columns,
        cells_left,
    )
    try:
        result = sheet_result(
            scan.name, reader.rows(), scan.merged, reader.errors, ctx, budget, patch=False
        )
    except (expat.ExpatError, ValueError) as exc:
        raise bad_content(
            ctx, f"damaged workbook: {scan.part} (sheet {scan.name!r}) is not valid XML", exc
        ) from exc
    if reader.wide:
        budget.hit("inspect.max_columns")
    if reader.capped:
        budget.hit("inspect.max_cells")
    return result, reader.cells


def _shared_strings(zf: zipfile.ZipFile, ctx: Context) -> list[str]:
    names = {n.lower(): n for n in zf.namelist()}
    part = names.get("xl/sharedstrings.xml")
    if part is None:
        return []
    strings: list[str] = []
    text: list[str] = []
    depth = {"si": False, "t": False, "rPh": False}

    def start(tag: str, attrs: dict[str, str]) -> None:
        local = tag.rsplit(":", 1)[-1]
        if local in depth:
            depth[local] = True
        if local == "si":
            text.clear()

    def end(tag: str) -> None:
        local = tag.rsplit(":", 1)[-1]
        if local in depth:
            depth[local] = False
        if local == "si":
            strings.append("".join(text))

    def chars(data: str) -> None:
        if depth["t"] and not depth["rPh"]:  # phonetic runs are not the text
            text.append(data)

    _parse(zf, part, ctx, start, end, chars)
    return strings


def _date_styles(zf: zipfile.ZipFile) -> list[str]:
    """Per cell style index: "date", "time", "datetime" or "" (not a date)."""
    from defusedxml import ElementTree as SafeET

    try:
        root = SafeET.fromstring(zf.read("xl/styles.xml"))
    except Exception:  # no styles or unreadable ones: no cell is a date
        return []
    custom = {
        int(fmt.get("numFmtId", "-1")): fmt.get("formatCode", "")
        for fmt in root.iter(f"{{{_NS_MAIN}}}numFmt")
    }
    kinds: list[str] = []
    xfs = root.find(f"{{{_NS_MAIN}}}cellXfs")
    for xf in xfs if xfs is not None else []:
        fmt_id = int(xf.get("numFmtId", "0"))
        code = custom.get(fmt_id, _BUILTIN_DATE_CODES.get(fmt_id, ""))
        if fmt_id in _BUILTIN_DATE_FORMATS or (code and _is_date_format(code)):
            lower = re.sub(r"\[[^\]]*\]|\"[^\"]*\"", "", code.lower())
            has_date = any(ch in lower for ch in "dy") or "m" in lower.replace("mm:", "")
            has_time = any(ch in lower for ch in "hs")
            kinds.append("datetime" if has_date and has_time else "time" if has_time else "date")
        else:
            kinds.append("")
    return kinds


def _parse(zf: zipfile.ZipFile, part: str, ctx: Context, start: Any, end: Any, chars: Any) -> None:
    """Parse a whole XML part with these expat handlers (entities refused)."""
    parser = _parser(start, end, chars)
    try:
        for chunk in _xml_chunks(zf, part):
            parser.Parse(chunk, False)
        parser.Parse(b"", True)
    except (expat.ExpatError, ValueError) as exc:
        raise bad_content(ctx, f"damaged workbook: {part} is not valid XML", exc) from exc


def _parser(start: Any, end: Any, chars: Any, *, namespaces: bool = False) -> Any:
    """An expat parser with these handlers that refuses entity declarations;
    with ``namespaces``, names are ``"<namespace URI>}<local name>"``."""
    parser = expat.ParserCreate(namespace_separator="}") if namespaces else expat.ParserCreate()

    def refuse(*_: Any) -> int:
        raise ValueError("the XML declares entities (refused: entity expansion, XXE)")

    parser.EntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    if chars is not None:
        parser.CharacterDataHandler = chars
    parser.buffer_text = True
    return parser


_DIGITS = "0123456789"
#: local names of the tag names seen (``"x:c"`` -> ``"c"``), a few at most
#: in a real sheet; bounded against a file of made-up names.
_LOCAL_NAMES: dict[str, str] = {}
_LOCAL_NAMES_KEPT = 256
#: the most distinct ``s`` attributes whose date kind one sheet remembers.
_STYLE_KINDS_KEPT = 4096


def _local_name(tag: str) -> str:
    local = tag.rsplit(":", 1)[-1]
    if len(_LOCAL_NAMES) < _LOCAL_NAMES_KEPT:
        _LOCAL_NAMES[tag] = local
    return local


class _StreamedSheet:
    """One sheet's rows from its XML, streamed, with the row and cell caps."""

    def __init__(
        self,
        zf: zipfile.ZipFile,
        part: str,
        strings: list[str],
        date_styles: list[str],
        date1904: bool,
        max_columns: int,
        max_cells: int,
    ) -> None:
        self.zf, self.part = zf, part
        self.strings, self.date_styles = strings, date_styles
        self.epoch = dt.datetime(1904, 1, 1) if date1904 else dt.datetime(1899, 12, 30)
        self.max_columns, self.max_cells = max_columns, max_cells
        self.cells = 0
        self.capped = self.wide = False
        #: a cap was reached: nothing more of the sheet is read.
        self.stopped = False
        self.errors: dict[str, str] = {}
        self._done: list[tuple[int, list[Any]]] = []
        self._row: list[Any] = []
        self._row_number = 0
        self._cell: dict[str, str] | None = None
        self._text: list[str] = []
        self._in_value = False
        #: column numbers by the letters of the references read.
        self._columns: dict[str, int] = {}
        #: date kind ("date", "time", "datetime" or "") by a cell's raw ``s``.
        self._style_kinds: dict[str | None, str] = {}

    def rows(self) -> Iterator[tuple[int, list[Any]]]:
        """(1-based number, cells) of each row in the XML until the sheet or a cap ends."""
        parser = _parser(self._start, self._end, self._chars)
        for chunk in _xml_chunks(self.zf, self.part):
            parser.Parse(chunk, False)
            yield from self._done
            self._done.clear()
            if self.stopped:
                return  # reading stops at the cap: nothing after it is parsed
        parser.Parse(b"", True)
        yield from self._done

    def _start(self, tag: str, attrs: dict[str, str]) -> None:
        local = _LOCAL_NAMES.get(tag) or _local_name(tag)
        if local == "c":
            self._cell = attrs
            self._text.clear()
        elif local in ("v", "t") and self._cell is not None:
            self._in_value = True
        elif local == "row":
            self._row = []
            r = attrs.get("r")
            self._row_number = int(r) if r and r.isdigit() else self._row_number + 1

    def _chars(self, data: str) -> None:
        if self._in_value:
            self._text.append(data)

    def _end(self, tag: str) -> None:
        local = _LOCAL_NAMES.get(tag) or _local_name(tag)
        if local in ("v", "t"):
            self._in_value = False
        elif local == "c" and self._cell is not None:
            self._add_cell(self._cell, "".join(self._text))
            self._cell = None
        elif local == "row":
            if not self.stopped:
                self._done.append((self._row_number, self._row))
            self._row = []

    def _add_cell(self, attrs: dict[str, str], text: str) -> None:
        if self.stopped:
            return
        self.cells += 1
        if self.cells > self.max_cells:
            self.capped = self.stopped = True
            if self._row:  # the row read so far is kept: it is a prefix of the sheet
                self._done.append((self._row_number, self._row))
                self._row = []
            return
        ref = attrs.get("r", "")
        # the column of a reference whose letters were seen before, without a
        # regular expression per cell: letters then digits, as _A1 checks
        letters = ref.rstrip(_DIGITS)
        column = self._columns.get(letters) if len(letters) < len(ref) else None
        if column is None:
            match = _A1.match(ref)
            column = column_number(match.group(1)) if match else len(self._row) + 1
            if match and match.group(1) == letters:
                self._columns[letters] = column
        if column > self.max_columns:
            # Wider than any spreadsheet program writes: a hostile row. The
            # sheet stops being read here, like at max_cells.
            self.wide = self.stopped = True
            if self._row:
                self._done.append((self._row_number, self._row))
                self._row = []
            return
        value = self._value(attrs, text, ref)
        if column > len(self._row):
            self._row.extend([None] * (column - len(self._row)))
        self._row[column - 1] = value

    def _value(self, attrs: dict[str, str], text: str, ref: str) -> Any:
        kind = attrs.get("t")
        if kind is None or kind == "n":  # a number, most cells: tested first
            return self._number(attrs, text)
        if kind == "s":
            index = int(text) if text.strip().isdigit() else -1
            return self.strings[index] if 0 <= index < len(self.strings) else None
        if kind in ("str", "inlineStr"):
            return text
        if kind == "b":
            return text.strip() in ("1", "true")
        if kind == "e":
            self.errors[ref or f"#{self.cells}"] = text
            return text
        return self._number(attrs, text)

    def _number(self, attrs: dict[str, str], text: str) -> Any:
        try:
            number = float(text)  # surrounding whitespace is allowed, as it is in Excel
        except ValueError:
            # blank: an empty cell; anything else: not a number after all,
            # kept as the cell says
            return text if text.strip() else None
        style = attrs.get("s")
        # a style's date kind, looked up once per style of the sheet
        kind = self._style_kinds.get(style)
        if kind is None:
            index = int(style or 0)  # a bad index is a damaged sheet (ValueError)
            kind = self.date_styles[index] if 0 <= index < len(self.date_styles) else ""
            if len(self._style_kinds) < _STYLE_KINDS_KEPT:
                self._style_kinds[style] = kind
        if kind:
            return _excel_date(number, self.epoch, kind)
        return int(number) if number.is_integer() and abs(number) < 2**53 else number


def _excel_date(serial: float, epoch: dt.datetime, kind: str) -> Any:
    """An Excel serial number as the date, time or datetime its format shows."""
    if epoch.year == 1899 and serial < 60:
        serial += 1  # Excel's 1900 system counts a 29 February 1900 that never was
    try:
        when = epoch + dt.timedelta(days=serial)
    except OverflowError:
        return serial
    when = when.replace(microsecond=round(when.microsecond / 1000) * 1000 % 1_000_000)
    if kind == "time" or (0 <= serial < 1 and kind != "date"):
        return when.time()
    if kind == "date" and when.time() == dt.time(0):
        return when.date()
    return when
