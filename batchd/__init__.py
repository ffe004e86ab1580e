"""batchd: a watch-folder batch processing daemon."""

from __future__ import annotations

__version__ = "0.1.0"
