"""Tests for batchd.caps: the bounded copy of a result kept in the database and status.json."""

from __future__ import annotations

import json

from batchd.caps import SUMMARY_MAX_KEYS, inline_result


def test_a_small_result_is_kept_as_it_is() -> None:
    """A result under the cap is returned unchanged (the very same object)."""
    result = {"rows": [1, 2, 3]}
    assert inline_result(result, 1024, "/out/r.json") is result


def test_a_big_result_becomes_a_short_summary_naming_its_file() -> None:
    """Over the cap: truncated, its size, where the whole one is, its first keys; small itself."""
    result = {f"k{i}": "x" * 1000 for i in range(200)}
    summary = inline_result(result, 4096, "/out/results/big.csv.json")
    size = len(json.dumps(result).encode())
    assert summary["truncated"] is True
    assert summary["result_bytes"] == size
    assert summary["result_file"] == "/out/results/big.csv.json"
    assert summary["keys"] == [f"k{i}" for i in range(SUMMARY_MAX_KEYS)]
    assert "4096" in summary["reason"] and str(size) in summary["reason"]
    assert len(json.dumps(summary)) < 4096
