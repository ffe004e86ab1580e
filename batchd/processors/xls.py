"""XLS workbooks (Excel 2.x to 2003, BIFF2 to BIFF8), read with xlrd.

xlrd reads every BIFF version, including the Excel 2.x-4.0 worksheets that
are no OLE2 file, and knows error cells and merged ranges (with
``formatting_info``); sheets come out in the shape :mod:`.sheets` gives XLSX.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from batchd.errors import ProcessorError
from batchd.processors import Context
from batchd.processors.content import Budget, Result, bad_content, cell_name
from batchd.processors.sheets import sheet_result


def read_xls(path: Path, ctx: Context, budget: Budget) -> Result:
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
