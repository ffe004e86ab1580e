"""Running the inspect processor in-process, as the processor tests do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from batchd.config import Settings
from batchd.processors import ProcessorContext
from batchd.processors.inspect import inspect


def inspect_file(path: Path, config: Settings) -> tuple[dict[str, Any], list[int]]:
    """Inspect ``path``; the result (checked to be JSON) and the progress reported."""
    progress: list[int] = []
    ctx = ProcessorContext(
        batch_id="b1",
        file_id="f1",
        relpath=path.name,
        output_path=path.parent / "out",  # made by the context when a processor asks
        settings=config,
        report=progress.append,
    )
    result = inspect(path, ctx)
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    return result, progress
