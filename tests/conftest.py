"""Make the shared test helpers importable from every test folder.

tests/ holds helpers used across folders (``fakes``, ``formdata``, ``procs``,
``pgserver``); tests/integration holds ``support``. Test folders have no
``__init__.py``, so they are put on ``sys.path`` here, once, before any test
module is collected.
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
for _path in (TESTS / "integration", TESTS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
