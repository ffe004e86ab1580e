"""Bounded copies of results for the database, status.json and the API (issue 12 point 4).

A processor may return a result of many megabytes. The result file keeps it
whole; every copy that is read often (the database row, each status.json
rewrite, every API answer) carries at most ``limits.max_inline_result_bytes``
of it, so a batch of big results cannot turn status.json into a 15 MB file
rewritten several times a second.
"""

from __future__ import annotations

import json
from typing import Any

#: Top-level keys of a truncated result listed in its summary, at most.
SUMMARY_MAX_KEYS = 50
#: A listed key longer than this is cut (the summary must stay small).
SUMMARY_MAX_KEY_CHARS = 100


def inline_result(result: dict[str, Any], max_bytes: int, result_file: str) -> dict[str, Any]:
    """``result`` itself when its JSON fits in ``max_bytes``, else a short summary
    saying that it was truncated, how big it is and where the whole one is."""
    size = len(json.dumps(result, ensure_ascii=False).encode())
    if size <= max_bytes:
        return result
    keys = [str(k)[:SUMMARY_MAX_KEY_CHARS] for k in list(result)[:SUMMARY_MAX_KEYS]]
    return {
        "truncated": True,
        "reason": (
            f"the result is {size} bytes, over limits.max_inline_result_bytes ({max_bytes});"
            " the whole result is in result_file"
        ),
        "result_bytes": size,
        "result_file": result_file,
        "keys": keys,
    }
