"""XLS workbooks (Excel 2.x to 2003, BIFF2 to BIFF8), read with calamine or xlrd.

calamine (Rust) reads the common case, an OLE2 workbook (BIFF5 to BIFF8)
without error cells, values and merged ranges, about three times faster
than xlrd. It shows an error cell as an empty one, so a workbook whose
stream holds a record that may be an error cell (a cheap byte search, which
may say yes for none but never says no for one) goes to xlrd, as does
anything calamine cannot open. xlrd reads every BIFF version, including the
Excel 2.x-4.0 worksheets that are no OLE2 file, and knows error cells and
merged ranges (with ``formatting_info``). Sheets come out in the shape
:mod:`.sheets` gives XLSX.
"""

from __future__ import annotations

import datetime as dt
import io
import mmap
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from batchd.errors import ProcessorError
from batchd.processors import Context
from batchd.processors.content import Budget, Result, bad_content, cell_name
from batchd.processors.sheets import sheet_result

#: BIFF records that may be an error cell: a BOOLERR whose error flag is set,
#: a FORMULA whose cached result is an error (type 2, marked by 0xFFFF).
_MAYBE_ERROR_CELL = re.compile(
    rb"\x05\x02\x08\x00[\s\S]{7}\x01|\x06\x00[\s\S]{8}\x02[\s\S]{5}\xff\xff"
)
_OLE2_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"


def read_xls(path: Path, ctx: Context, budget: Budget) -> Result:
    """Every sheet of an Excel 2.x-2003 workbook; see the module docstring."""
    out = _calamine_xls(path, ctx, budget)
    return out if out is not None else _xlrd_xls(path, ctx, budget)


def _calamine_xls(path: Path, ctx: Context, budget: Budget) -> Result | None:
    """The workbook read by calamine, or None when xlrd must read it."""
    if _may_hold_error_cells(path):
        return None
    import python_calamine

    try:
        book = python_calamine.CalamineWorkbook.from_path(str(path))
    except Exception:  # calamine's own errors: xlrd tries
        return None
    caps = ctx.settings.inspect
    try:
        worksheet = python_calamine.SheetTypeEnum.WorkSheet
        names = [m.name for m in book.sheets_metadata if m.typ == worksheet]
        # calamine parses the sheet whole: read nothing before every sheet is known to fit
        sheets = []
        for name in names:
            sheet = book.get_sheet_by_name(name)
            if sheet.end is not None and sheet.end[1] + 1 > caps.max_columns:
                return None
            sheets.append(sheet)
        area = sum((s.end[0] + 1) * (s.end[1] + 1) for s in sheets if s.end is not None)
        if area > caps.max_cells:
            return None  # xlrd stops at the caps and says which one
        # everything calamine may fail on is done before the budget is touched
        grids = [
            (
                name,
                [
                    f"{cell_name(r0, c0)}:{cell_name(r1, c1)}"
                    for (r0, c0), (r1, c1) in sheet.merged_cell_ranges or ()
                ],
                sheet.to_python(skip_empty_area=False),
            )
            for name, sheet in zip(names, sheets, strict=True)
        ]
    except Exception:
        return None
    finally:
        book.close()
    out: list[Result] = []
    for index, (name, merged, grid) in enumerate(grids):
        out.append(sheet_result(name, enumerate(grid, start=1), merged, {}, ctx, budget))
        ctx.progress((index + 1) * 100 / len(grids))
    return {"sheets": out, **budget.fields()}


def _may_hold_error_cells(path: Path) -> bool:
    """False only when the workbook stream holds no record that may be an error
    cell (or the file is no OLE2 workbook, which calamine does not read)."""
    from xlrd import compdoc

    # mapped, not read: the pages are the page cache's, not the worker's heap
    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[: len(_OLE2_MAGIC)] != _OLE2_MAGIC:
                return True
            doc = compdoc.CompDoc(data, logfile=io.StringIO())
            for name in ("Workbook", "Book"):
                mem, base, size = doc.locate_named_stream(name)
                if mem is not None:
                    return _MAYBE_ERROR_CELL.search(mem, base, base + size) is not None
    except OSError:
        raise
    except Exception:  # a damaged container (or an empty file): xlrd says what is wrong
        return True
    return True


def _xlrd_xls(path: Path, ctx: Context, budget: Budget) -> Result:
    """Every sheet of an Excel 2.x-2003 workbook (xlrd), loaded one at a time."""
    import xlrd

    caps = ctx.settings.inspect
    try:
        try:
            # formatting_info gives merged ranges; BIFF versions xlrd cannot
            # format-read still open without it.
            book = xlrd.open_workbook(
                str(path), on_demand=True, logfile=io.StringIO(), formatting_info=True
            )
        except (NotImplementedError, xlrd.XLRDError):
            book = xlrd.open_workbook(str(path), on_demand=True, logfile=io.StringIO())
        try:
            out: list[Result] = []
            cells_left = caps.max_cells
            for index in range(book.nsheets):
                sheet = book.sheet_by_index(index)
                errors: dict[str, str] = {}

                def rows(
                    sheet: Any = sheet, errors: dict[str, str] = errors
                ) -> Iterator[tuple[int, list[Any]]]:
                    nonlocal cells_left
                    for r in range(sheet.nrows):
                        width = min(sheet.row_len(r), caps.max_columns)
                        if sheet.row_len(r) > caps.max_columns:
                            budget.hit("inspect.max_columns")
                        if width > cells_left:
                            budget.hit("inspect.max_cells")
                            return
                        cells_left -= width
                        row = []
                        for c in range(width):
                            cell = sheet.cell(r, c)
                            if cell.ctype == xlrd.XL_CELL_ERROR:
                                errors[cell_name(r, c)] = xlrd.error_text_from_code.get(
                                    cell.value, f"#ERR{cell.value}"
                                )
                            row.append(_xls_value(cell, book.datemode))
                        yield r + 1, row

                merged = [
                    f"{cell_name(r0, c0)}:{cell_name(r1 - 1, c1 - 1)}"
                    for r0, r1, c0, c1 in sheet.merged_cells
                ]
                out.append(sheet_result(sheet.name, rows(), merged, errors, ctx, budget))
                book.unload_sheet(index)
                ctx.progress((index + 1) * 100 / book.nsheets)
            return {"sheets": out, **budget.fields()}
        finally:
            book.release_resources()
    except (OSError, MemoryError, ProcessorError):
        raise
    except Exception as exc:  # xlrd.XLRDError, CompDocError, struct errors ...
        raise bad_content(ctx, "damaged workbook: the XLS file cannot be read", exc) from exc


def _xls_value(cell: Any, datemode: int) -> Any:
    import xlrd

    if cell.ctype in (xlrd.XL_CELL_EMPTY, xlrd.XL_CELL_BLANK):
        return None
    if cell.ctype == xlrd.XL_CELL_DATE:
        # A serial below 1 is a time of day, whatever the date system: xlrd
        # would make it 1899-12-31 or 1904-01-01, a date nobody typed.
        if 0 <= cell.value < 1:
            *_, hh, mm, ss = xlrd.xldate_as_tuple(cell.value, datemode)
            return dt.time(hh, mm, ss)
        when = xlrd.xldate.xldate_as_datetime(cell.value, datemode)
        return when.date() if when.time() == dt.time(0) and float(cell.value).is_integer() else when
    if cell.ctype == xlrd.XL_CELL_BOOLEAN:
        return bool(cell.value)
    if cell.ctype == xlrd.XL_CELL_ERROR:
        return xlrd.error_text_from_code.get(cell.value, f"#ERR{cell.value}")
    return cell.value
