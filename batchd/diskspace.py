"""The free-space floor (``limits.min_free_bytes``, issue 12.8).

Under the floor uploads are refused with 507 before a byte is written, the
watcher postpones claims (``claim_postponed``; the drop waits in the inbox
and is looked at again at the next rescan), and ``/healthz`` names the
problem, so a full disk shows before the database or a result write fails.
"""

from __future__ import annotations

import os
from pathlib import Path


def free_space_problem(root: Path, floor: int, need: int = 0) -> str | None:
    """Why ``root``'s file system is too full (``need`` more bytes would leave less
    than ``floor`` free), or None; ``floor`` 0 turns the check off."""
    if floor <= 0:
        return None
    try:
        st = os.statvfs(root)
    except OSError as exc:
        return f"cannot read the free space of {root}: {exc.strerror}"
    free = st.f_bavail * st.f_frsize
    if free - need >= floor:
        return None
    return (
        f"{free} bytes free on the file system of {root}, under limits.min_free_bytes"
        f" ({floor}) once {need} more are written; free space there"
    )
