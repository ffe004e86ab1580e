"""What the ``inspect`` readers (PDF, spreadsheets, CSV) share: the caps of
one file's result and how values become JSON."""

from __future__ import annotations

import datetime as dt
import decimal
import math
from collections.abc import Iterable
from typing import Any

from batchd.errors import PermanentError
from batchd.processors import Context

Result = dict[str, Any]

#: isinstance(v, str) as a C-level callable, for filter().
_is_str = str.__instancecheck__


class Budget:
    """What is left of ``processing.max_rows`` and ``max_text_chars`` for one file.

    Once a cap is hit nothing more is taken, so what was kept is a prefix.
    Every cap that dropped something is named in :attr:`reasons` (a setting
    name such as ``"processing.max_rows"``), so a result never loses content
    without saying which limit did it.
    """

    def __init__(self, rows: int, chars: int) -> None:
        self.rows = rows
        self.chars = chars
        self.reasons: list[str] = []
        #: the row or text cap was reached: nothing more is kept.
        self.full = False

    @property
    def truncated(self) -> bool:
        return bool(self.reasons)

    def hit(self, reason: str) -> None:
        """Record that the cap ``reason`` dropped content."""
        if reason not in self.reasons:
            self.reasons.append(reason)

    def take_row(self, values: Iterable[Any], chars: int | None = None) -> bool:
        """True when a row with these values fits, and count it.

        ``chars``, the characters of the row's text values, may be given by
        a caller that knows it more cheaply (a CSV row is all text).
        """
        if self.full:
            return False
        if self.rows <= 0:
            self.full = True
            self.hit("processing.max_rows")
            return False
        if chars is None:
            chars = sum(map(len, filter(_is_str, values)))
        if chars > self.chars:
            self.full = True
            self.hit("processing.max_text_chars")
            return False
        self.rows -= 1
        self.chars -= chars
        return True

    def take_text(self, text: str) -> str | None:
        """As much of ``text`` as fits, or None when nothing more does."""
        if self.full:
            return None
        if len(text) > self.chars:
            self.full = True
            self.hit("processing.max_text_chars")
            text = text[: self.chars]
        self.chars -= len(text)
        return text

    def fields(self) -> Result:
        """``truncated`` and ``truncated_reasons`` for the result."""
        return {"truncated": self.truncated, "truncated_reasons": list(self.reasons)}


def json_value(value: Any) -> Any:
    """A cell value as JSON.

    One representation for every format (XLSX, XLS, CSV keeps its text): a
    date is ``"YYYY-MM-DD"``, a date with a time ``"YYYY-MM-DDTHH:MM:SS"``, a
    time of day ``"HH:MM:SS"`` (fractions of a second when present), all
    without a time zone, as spreadsheets have none; durations are ISO 8601
    durations (``"PT90S"``), NaN and infinities null, anything unknown text.
    A datetime at midnight stays a datetime: the cell said it was one.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return f"PT{value.total_seconds():g}S"
    if isinstance(value, decimal.Decimal):
        return json_value(float(value))
    return str(value)


def bad_content(ctx: Context, what: str, exc: BaseException) -> PermanentError:
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return PermanentError(f"{ctx.relpath}: {what} ({detail})")


def cell_name(row: int, column: int) -> str:
    """A1-style name of the 0-based (row, column)."""
    letters = ""
    column += 1
    while column:
        column, rest = divmod(column - 1, 26)
        letters = chr(65 + rest) + letters
    return f"{letters}{row + 1}"
