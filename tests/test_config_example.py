"""config.example.toml documents every key with its default."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from batchd.config import Settings, load_settings

EXAMPLE = Path(__file__).resolve().parents[1] / "config.example.toml"


def test_example_equals_defaults() -> None:
    """Loading config.example.toml gives exactly the built-in defaults."""
    assert load_settings(EXAMPLE, env={}) == Settings()


def test_example_lists_every_key() -> None:
    """Every key of every section appears in the example (set or commented out)."""
    text = EXAMPLE.read_text()
    missing = []
    for section, field in Settings.model_fields.items():
        model = field.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            assert f"[[{section}]]" in text
            continue
        if f"[{section}]" not in text:
            missing.append(section)
        for key in model.model_fields:
            if not re.search(rf"^#? ?{key} = ", text, re.MULTILINE):
                missing.append(f"{section}.{key}")
    assert missing == []
