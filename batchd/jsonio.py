"""JSON in and out: orjson, with the standard library where orjson refuses a value.

Every document batchd writes (result files, status.json) and every API
answer goes through here. (The ``result`` column keeps ``json.dumps``'s own
text, which operators' SQL may match: a small result costs microseconds.) Why orjson, by
measurement on this project's own shapes (issue 15): a 50-file batch's
status.json took 860 us with ``json.dumps(indent=1)`` (any indent makes the
standard library fall back to its pure-Python encoder) and takes 22 us; a
result file 19.7 -> 0.9 us; the compact API answer of the same batch 252 ->
22 us. The daemon rewrites status.json a few times a second per running
batch and the HTTP API encodes a detail per request, so this was a tenth of
a worker's CPU per file and most of an uncached detail answer.

What orjson does not encode (integers beyond 64 bits, keys that are not
strings, text with lone surrogates) falls back to ``json``, so the set of
values batchd accepts is the standard library's, as before (written with
``\\u`` escapes, so that lone surrogates never fail the write); where both
encode a value they give the same JSON value (floats are written in the
shortest form that reads back the same, ``1e-05`` as ``1e-5``). NaN and
infinities, which ``json`` writes as the non-JSON ``NaN``/``Infinity``, are
``null`` from orjson.

Reading: ``orjson.loads`` is strict JSON; a document from before this module
holding ``NaN`` is read by ``json`` instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson

__all__ = ["compact", "document", "loads"]

#: Files people and programs read (result files, status.json): indented, one newline at the end.
_DOCUMENT = orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE
#: Dates and dataclasses go to ``default`` (as ``json.dumps(default=str)`` did),
#: not orjson's own forms (RFC 3339 dates, dataclasses as objects).
_PASSTHROUGH = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def document(data: Any) -> bytes:
    """``data`` as an indented UTF-8 JSON document ending in a newline."""
    try:
        return orjson.dumps(data, option=_DOCUMENT)
    except orjson.JSONEncodeError:
        return (json.dumps(data, indent=2) + "\n").encode("ascii")


def compact(data: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    """``data`` as compact UTF-8 JSON; ``default`` turns what JSON has no form for into text."""
    try:
        if default is None:
            return orjson.dumps(data)
        return orjson.dumps(data, default=default, option=_PASSTHROUGH)
    except orjson.JSONEncodeError:
        return json.dumps(data, separators=(",", ":"), default=default).encode("ascii")


def loads(text: str | bytes) -> Any:
    """Parse JSON text (strict; ``NaN`` and the like as ``json`` reads them)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)
