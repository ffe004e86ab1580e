"""The one settings factory for tests: a spool under a temporary folder, overrides by name."""

from __future__ import annotations

from pathlib import Path

from batchd.config import Settings, load_settings


def make_settings(tmp_path: Path, **env: str) -> Settings:
    """Settings with the spool at ``tmp_path/spool`` and ``BATCHD_<KEY>`` overrides.

    Keys are the environment variables' names without ``BATCHD_``, in any
    case, a double underscore between section and key
    (``limits__max_depth="3"`` is ``BATCHD_LIMITS__MAX_DEPTH=3``). The
    configuration file is an empty ``tmp_path/config.toml``, so nothing of
    the machine's own configuration leaks in.
    """
    config = tmp_path / "config.toml"
    config.write_text("")
    environ = {"BATCHD_SPOOL__ROOT": str(tmp_path / "spool")}
    environ.update({f"BATCHD_{k.upper()}": v for k, v in env.items()})
    return load_settings(config, environ)
