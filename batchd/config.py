"""Configuration: a TOML file plus ``BATCHD_<SECTION>__<KEY>`` environment overrides.

The file is found as ``--config PATH``, else ``$BATCHD_CONFIG``, else
``/etc/batchd/config.toml`` when it exists, else built-in defaults. Every key
is validated by pydantic; a bad value raises :class:`~batchd.errors.ConfigError`
with one line naming the key, the value and what is allowed (the CLI turns it
into exit code 78).
"""

from __future__ import annotations

import json
import os
import socket
import tomllib
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from batchd.errors import ConfigError
from batchd.processor_settings import ExecSettings as ExecSettings
from batchd.processor_settings import InspectSettings as InspectSettings
from batchd.processor_settings import RouteSettings as RouteSettings
from batchd.processor_settings import Section as _Section

DEFAULT_CONFIG_PATH = Path("/etc/batchd/config.toml")
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h; systemd's RestartPreventExitStatus uses it.


class Priority(StrEnum):
    """The three inbox folders, highest first."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        """0 for high, 1 for normal, 2 for low: the sort key of the queue."""
        return PRIORITY_ORDER.index(self)


PRIORITY_ORDER: tuple[Priority, ...] = (Priority.HIGH, Priority.NORMAL, Priority.LOW)


class SpoolSettings(_Section):
    root: Path = Path("/var/lib/batchd")
    keep_inputs: bool = True
    #: who may read a batch's outbox/archive/failed folders: the whole drop
    #: group, or only the user who dropped it (an ACL; batchd and root always).
    result_access: Literal["group", "owner"] = "group"


class WatchSettings(_Section):
    settle_seconds: float = Field(1.0, ge=0)
    rescan_seconds: float = Field(30.0, gt=0)
    ignore: tuple[str, ...] = (
        ".*",
        "~$*",
        "*.tmp",
        "*.part",
        "*.partial",
        "*.crdownload",
        "*.swp",
    )
    marker: str = ".ready"
    folder_ready: Literal["settle", "marker"] = "settle"
    observer: Literal["auto", "native", "polling"] = "auto"
    polling_interval_seconds: float = Field(1.0, gt=0)

    @field_validator("marker")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not value or "/" in value or value in {".", ".."}:
            raise ValueError("must be a plain file name")
        return value


#: other spellings of a content type's name, as users name their files.
_TYPE_ALIASES = {"jpg": "jpeg", "tif": "tiff"}


class LimitsSettings(_Section):
    max_files_per_batch: int = Field(50, ge=1)
    max_file_bytes: int = Field(50 * 1024 * 1024, ge=1)
    allowed_types: tuple[str, ...] = ("pdf", "xlsx", "xls", "csv")
    uploads_per_user_per_hour: int = Field(3, ge=0)
    #: Content-Length of all uploads being received at once, summed (issue 12.8).
    max_upload_bytes_in_flight: int = Field(4 * 1024**3, ge=1)
    #: Below this much free space on the spool's file system uploads get 507
    #: and the watcher postpones claims (0 turns the floor off).
    min_free_bytes: int = Field(256 * 1024**2, ge=0)
    #: a result bigger than this (as JSON) stays whole in its result file only;
    #: the database, status.json and the API carry a short summary instead.
    max_inline_result_bytes: int = Field(64 * 1024, ge=1024)
    #: folders nested deeper than this refuse the whole drop (walks stay bounded).
    max_depth: int = Field(32, ge=1)
    #: files and folders examined per drop before the whole drop is refused.
    max_entries_per_drop: int = Field(10000, ge=1)

    @field_validator("allowed_types")
    @classmethod
    def _lower(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError('must list at least one type (or "*" for all)')
        names = (v.lower().lstrip(".") for v in value)
        return tuple(_TYPE_ALIASES.get(name, name) for name in names)

    def allows(self, kind: str) -> bool:
        """True when a file whose content is of type ``kind`` may be processed."""
        return "*" in self.allowed_types or kind in self.allowed_types


class ProcessingSettings(_Section):
    concurrency: int = Field(3, ge=1, le=256)
    max_retries: int = Field(3, ge=0)
    retry_backoff_seconds: float = Field(2.0, ge=0)
    retry_backoff_max_seconds: float = Field(300.0, ge=0)
    timeout_seconds: float = Field(1800.0, gt=0)
    processor: str = "inspect"
    shutdown_grace_seconds: float = Field(30.0, ge=0)
    #: 1024 MiB: inspect peaks under 100 MiB on 14 MB xlsx / 54 MB CSV inputs
    #: (measured); a hostile document hits this instead of the machine.
    worker_memory_mb: int = Field(1024, ge=0)
    #: a worker whose resident memory passed this after a file is replaced by a
    #: fresh one (Python rarely gives freed memory back); 0 = never.
    worker_recycle_rss_mb: int = Field(512, ge=0)
    poll_seconds: float = Field(1.0, gt=0)
    status_interval_seconds: float = Field(0.25, ge=0)
    #: a new batch's first status.json waits this long (never longer than
    #: status_interval_seconds): one that ends sooner gets only its final one.
    first_status_hold_seconds: float = Field(0.1, ge=0)
    #: a worker that recorded a success claims its next file itself, in the
    #: same commit, when the head of the queue was never tried (issue 15).
    worker_claims: bool = True
    max_rows: int = Field(10_000, ge=1)
    max_text_chars: int = Field(1_000_000, ge=1)

    def backoff_seconds(self, retry_number: int) -> float:
        """Delay before retry ``retry_number`` (1-based): doubles each time, capped."""
        delay = self.retry_backoff_seconds * (2 ** max(retry_number - 1, 0))
        return float(min(delay, self.retry_backoff_max_seconds))


class DatabaseSettings(_Section):
    path: Path | None = None
    #: ``postgresql://user:password@host:port/dbname``: the cluster store (issue 8);
    #: unset means SQLite at ``path``.
    url: str | None = None

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must start with postgresql:// (unset it to use SQLite)")
        return value

    @model_validator(mode="after")
    def _one_database(self) -> DatabaseSettings:
        if self.path is not None and self.url is not None:
            raise ValueError("set database.path (SQLite) or database.url (PostgreSQL), not both")
        return self


class ClusterSettings(_Section):
    """Several nodes on one shared spool, coordinated through PostgreSQL."""

    #: This node's name in the ``nodes`` table; empty means ``<host name>:<spool.root>``.
    node_id: str = ""
    lease_seconds: float = Field(30.0, gt=0)
    heartbeat_seconds: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _beats_within_lease(self) -> ClusterSettings:
        if self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds}) must be shorter than "
                f"lease_seconds ({self.lease_seconds}), or leases expire while a node lives"
            )
        return self


class HttpSettings(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    token: str = ""
    max_threads: int = Field(32, ge=1)
    socket_timeout_seconds: float = Field(10.0, gt=0)
    #: Host header values accepted besides the bound address, localhost,
    #: 127.0.0.1 and [::1] ("name" or "name:port"); anything else gets 421.
    allowed_hosts: tuple[str, ...] = ()
    #: Per-user tokens: user -> token. The token's user becomes the upload's user_id.
    users: dict[str, str] = Field(default_factory=dict)
    #: A file of "user token" lines, read at start and reload (secrets out of this file).
    users_file: Path | None = None
    #: Threads uploads may never take, kept for /healthz and GETs.
    reserved_threads: int = Field(4, ge=0)
    max_connections_per_client: int = Field(16, ge=1)
    max_uploads_per_client: int = Field(4, ge=1)
    #: An upload body slower than this (on average, after socket_timeout_seconds) is cut off (408).
    min_upload_bytes_per_second: int = Field(1024, ge=0)
    #: How long the HTTP process waits for the daemon's answer (health, inbox, metrics).
    daemon_answer_timeout_seconds: float = Field(5.0, gt=0)
    #: How long start-up waits for the HTTP process to serve before READY=1 (then sent anyway).
    ready_timeout_seconds: float = Field(10.0, gt=0)

    @field_validator("users")
    @classmethod
    def _user_tokens(cls, value: dict[str, str]) -> dict[str, str]:
        for user, token in value.items():
            if not user.strip() or len(token) < 16 or token != token.strip():
                raise ValueError(
                    f"user {user!r}: each user needs a token of at least 16 characters"
                    " without surrounding spaces"
                )
        return value


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class LogSettings(_Section):
    level: LogLevel = LogLevel.INFO
    format: Literal["auto", "console", "json"] = "auto"


class RetentionSettings(_Section):
    days: int = Field(30, ge=0)


class Settings(BaseSettings):
    """All of batchd's configuration, one frozen object."""

    model_config = SettingsConfigDict(
        env_prefix="BATCHD_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    spool: SpoolSettings = SpoolSettings()
    watch: WatchSettings = WatchSettings()
    limits: LimitsSettings = LimitsSettings()
    processing: ProcessingSettings = ProcessingSettings()
    inspect: InspectSettings = InspectSettings()
    exec: ExecSettings = ExecSettings()
    route: tuple[RouteSettings, ...] = ()
    database: DatabaseSettings = DatabaseSettings()
    cluster: ClusterSettings = ClusterSettings()
    http: HttpSettings = HttpSettings()
    log: LogSettings = LogSettings()
    retention: RetentionSettings = RetentionSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs (see load_settings); environment
        # variables come first so that they override the file, as documented.
        return (env_settings, init_settings)

    @property
    def db_path(self) -> Path:
        """The SQLite file: ``database.path``, else ``<spool.root>/state/batchd.db``."""
        return self.database.path or self.spool.root / "state" / "batchd.db"

    @property
    def node_id(self) -> str:
        """``cluster.node_id``, else ``<host name>:<spool.root>`` (unique per node and spool)."""
        return self.cluster.node_id or f"{socket.gethostname()}:{self.spool.root}"


def config_path(explicit: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Path | None:
    """Which file to read: ``--config``, else ``$BATCHD_CONFIG``, else the system file."""
    if explicit:
        return Path(explicit)
    if env.get("BATCHD_CONFIG"):
        return Path(env["BATCHD_CONFIG"])
    if DEFAULT_CONFIG_PATH.exists():
        return DEFAULT_CONFIG_PATH
    return None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _describe(error: Mapping[str, Any]) -> str:
    """One line for one pydantic error: key, value, what is allowed."""
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    msg = str(error["msg"])
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (check its spelling and section in config.example.toml)"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    value = error.get("input")
    return f"{key} = {value!r}: {msg}"


def _env_json_error(environ: Mapping[str, str]) -> str | None:
    """Name the environment variable whose list or table value is not JSON."""
    for name, value in environ.items():
        if not name.startswith("BATCHD_") or "__" not in name:
            continue
        section, _, key = name[len("BATCHD_") :].lower().partition("__")
        field = Settings.model_fields.get(section)
        model = field.annotation if field else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        sub = model.model_fields.get(key)
        if sub is None or sub.annotation in (str, int, float, bool, Path):
            continue
        try:
            json.loads(value)
        except ValueError:
            return (
                f"bad configuration: {section}.{key} = {value!r} (from {name}): a list or "
                f'table must be written as JSON, e.g. ["a", "b"]'
            )
    return None


def _env_variable(loc: tuple[int | str, ...], environ: Mapping[str, str]) -> str | None:
    """The ``BATCHD_SECTION__KEY`` variable that set the value at ``loc``, if one did."""
    if len(loc) < 2:
        return None
    wanted = f"BATCHD_{loc[0]}__{loc[1]}".upper()
    return next((name for name in environ if name.upper() == wanted), None)


def load_settings(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Read and validate the configuration.

    ``env`` defaults to ``os.environ``; tests pass their own mapping. Raises
    :class:`ConfigError` whose message is a single line.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    file = config_path(path, environ)
    data = _read_toml(file) if file is not None else {}

    class _Env(EnvSettingsSource):
        def __init__(self, settings_cls: type[BaseSettings]) -> None:
            super().__init__(settings_cls)
            # Read the mapping we were given, not the process environment.
            self.env_vars = {k.lower(): v for k, v in environ.items()}

    class _Bound(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (_Env(settings_cls), init_settings)

    try:
        bound = _Bound(**data)
    except ValidationError as exc:
        first = exc.errors()[0]
        variable = _env_variable(first["loc"], environ)
        where = f" (from {variable})" if variable else f" (in {file})" if file else ""
        raise ConfigError(f"bad configuration{where}: {_describe(first)}") from None
    except ValueError as exc:  # e.g. an environment value that is not valid JSON
        raise ConfigError(
            _env_json_error(environ) or f"bad configuration: {exc}".splitlines()[0]
        ) from None
    # A plain Settings (not the local subclass) so it pickles into worker processes.
    return Settings.model_construct(
        _fields_set=bound.model_fields_set,
        **{name: getattr(bound, name) for name in Settings.model_fields},
    )
