"""What a reload (SIGHUP, ``batchd reload``) may change, and what needs a restart."""

from __future__ import annotations

import structlog

from batchd.config import Settings
from batchd.processors import ocr, resolve

log = structlog.get_logger("batchd.daemon")

#: Keys whose change needs a restart; a reload logs them and keeps the old value.
RESTART_KEYS = (
    "spool.root",
    "database.path",
    "database.url",
    "http.enabled",
    "http.host",
    "http.port",
    "watch.observer",
    "cluster.node_id",
    "cluster.lease_seconds",
    "cluster.heartbeat_seconds",
)


def check_processors(settings: Settings) -> None:
    """Refuse (``ConfigError``) what would fail every file: a bad processor name,
    or ``inspect.ocr = "always"`` without Tesseract installed."""
    resolve(settings.processing.processor)
    for route in settings.route:
        resolve(route.processor)
    ocr.check_settings(settings)


def keep_restart_keys(old: Settings, new: Settings) -> tuple[Settings, list[str]]:
    """``new`` with the running value of every :data:`RESTART_KEYS` key, and the
    keys whose change was held back (each logged as ``reload_needs_restart``)."""
    needs_restart = []
    for key in RESTART_KEYS:
        section, name = key.split(".")
        before = getattr(getattr(old, section), name)
        after = getattr(getattr(new, section), name)
        if before != after:
            needs_restart.append(key)
            log.warning("reload_needs_restart", key=key, running=str(before), new=str(after))
    # Keep what needs a restart as it runs now.
    new = new.model_copy(
        update={
            "spool": old.spool,
            "database": old.database,
            "cluster": old.cluster,
            "watch": new.watch.model_copy(update={"observer": old.watch.observer}),
            "http": new.http.model_copy(
                update={
                    "enabled": old.http.enabled,
                    "host": old.http.host,
                    "port": old.http.port,
                }
            ),
        }
    )
    return new, needs_restart
