"""Small built-in processors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batchd.processors import Context


def noop(path: Path, ctx: Context) -> dict[str, Any]:
    """Do nothing and succeed: for measuring batchd's own overhead."""
    return {}
