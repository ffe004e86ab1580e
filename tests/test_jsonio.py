"""batchd.jsonio: orjson where it can, the standard library where it cannot, same values."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from batchd import jsonio
from batchd.fsutil import write_json_atomic

VALUES: list[object] = [
    {"a": 1, "b": [1.5, -0.0, 1e-05, 1e16, 3.141592653589793], "c": None, "d": True},
    {"menü": "Käse \u2013 12,50 €", "emoji": "\U0001f35d", "ctl": "tab\there\nnl\x00nul"},
    {"nested": {"deep": [[{"x": "y"}]] * 3}, "empty": {}, "list": []},
    ["top", "level", 1, 2],
    {"ordered": 1, "keys": 2, "stay": 3, "in": 4, "order": 5},
]


@pytest.mark.parametrize("value", VALUES)
def test_a_document_reads_back_as_the_same_value_in_the_same_key_order(value: object) -> None:
    """document(): indented UTF-8 JSON ending in one newline, read back equal, keys in order."""
    body = jsonio.document(value)
    assert body.endswith(b"}\n") or body.endswith(b"]\n")
    assert not body.endswith(b"\n\n")
    back = json.loads(body.decode("utf-8"))
    assert back == value
    assert json.dumps(back) == json.dumps(value)  # key order kept
    assert b"\n  " in body  # indented for people who cat it


@pytest.mark.parametrize(
    "value",
    [
        {"big": 2**70},  # beyond 64 bits: orjson refuses it
        {1: "int key"},  # a key that is not text
        {"lone": "\ud800 surrogate"},  # not valid UTF-8 text
    ],
)
def test_what_orjson_refuses_is_written_by_the_standard_library(value: object) -> None:
    """Big integers, non-text keys and lone surrogates are still written, as valid JSON."""
    body = jsonio.document(value)
    assert json.loads(body) == json.loads(json.dumps(value))
    assert json.loads(jsonio.compact(value)) == json.loads(json.dumps(value))


def test_a_lone_surrogate_in_a_result_no_longer_fails_the_write(tmp_path: Path) -> None:
    """write_json_atomic with text json cannot encode as UTF-8: escaped, not an exception."""
    target = tmp_path / "r.json"
    write_json_atomic(target, {"text": "broken \udcff byte"}, root=tmp_path)
    assert json.loads(target.read_text())["text"] == "broken \udcff byte"


def test_unencodable_values_still_raise_type_error() -> None:
    """A set is no JSON: TypeError, as json.dumps raises (callers turn it into a clear error)."""
    with pytest.raises(TypeError):
        jsonio.document({"s": {1, 2}})
    with pytest.raises(TypeError):
        jsonio.compact({"s": {1, 2}})


@dataclass
class Point:
    x: int


def test_compact_with_default_keeps_the_standard_librarys_text_for_dates_and_dataclasses() -> None:
    """compact(default=str): a date or dataclass becomes str(value), as json.dumps(default=str)."""
    when = dt.datetime(2026, 11, 28, 10, 0, tzinfo=dt.UTC)
    value = {"at": when, "day": dt.date(2026, 11, 28), "p": Point(3), "n": [1, "x"]}
    expected = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    assert jsonio.compact(value, default=str) == expected.encode("utf-8")


def test_loads_reads_strict_json_and_the_old_non_json_constants() -> None:
    """loads(): JSON text or bytes; NaN written by an older json.dumps still reads."""
    assert jsonio.loads('{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}
    assert jsonio.loads(b'{"a": null}') == {"a": None}
    nan = jsonio.loads('{"v": NaN}')["v"]
    assert nan != nan
    with pytest.raises(ValueError):
        jsonio.loads("{broken")
