"""``python -m batchd``: the same as the ``batchd`` command."""

from __future__ import annotations

import sys

from batchd.cli import main

sys.exit(main())
