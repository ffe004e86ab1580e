"""The benchmarks' processors, by the names scenarios use (``"bench.procs:burn"``).

They live with every other test processor in :mod:`batchd.testing.procs`;
this module keeps the ``bench.procs:<fn>`` names working.
"""

from __future__ import annotations

from batchd.testing.procs import burn as burn
from batchd.testing.procs import burn_work as burn_work
from batchd.testing.procs import loops_for as loops_for
from batchd.testing.procs import pause as sleepy

__all__ = ["burn", "burn_work", "loops_for", "sleepy"]
