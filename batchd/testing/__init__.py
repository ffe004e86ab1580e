"""Helpers for testing batchd, shipped with it (like ``structlog.testing``).

Nothing here runs in production unless a test arms it: the product modules
call the cheap hooks of :mod:`batchd.faults`, which stay no-ops until
:func:`batchd.testing.faults.arm` (or its environment variables) names a step.

``wait`` (:func:`wait_until`), ``settings`` (``make_settings``), ``faults``
(crash/hang points), ``launcher`` (``batchd run`` as a child process, for
tests and bench/), ``procs`` (the processors tests and benchmarks run).
"""

from batchd.testing.wait import wait_until

__all__ = ["wait_until"]
