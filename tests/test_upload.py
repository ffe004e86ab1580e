"""Uploads: the file names kept for uploaded parts.

The upload endpoint itself (limits, refusals, registration) is exercised over
real HTTP in ``tests/test_http.py``.
"""

from __future__ import annotations

import pytest

from batchd.uploadform import safe_filename


@pytest.mark.parametrize(
    ("raw", "safe"),
    [
        ("report.pdf", "report.pdf"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\menu.csv", "menu.csv"),
        ("/abs/path/x.csv", "x.csv"),
        ("bad\x00name\x01.csv", "badname.csv"),
        ("line\r\nbreak.csv", "linebreak.csv"),
        ("..", ""),
        ("...", ""),
        (".hidden.csv", "hidden.csv"),
        ("  spaced.csv  ", "spaced.csv"),
        ("dir/", ""),
        ("é" * 150 + ".csv", "é" * 98 + ".csv"),
    ],
)
def test_safe_filename(raw: str, safe: str) -> None:
    """safe_filename keeps a plain base name and drops everything dangerous."""
    assert safe_filename(raw) == safe
