"""Tests for batchd.config: defaults, the TOML file, environment overrides, errors."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from batchd.config import (
    EXIT_CONFIG,
    Priority,
    Settings,
    config_path,
    load_settings,
)
from batchd.errors import ConfigError

CLI_TIMEOUT_SECONDS = 60
MIB = 1024 * 1024


def write_toml(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(path: Path | None, env: dict[str, str]) -> str:
    """The message of the ConfigError that loading raises."""
    with pytest.raises(ConfigError) as info:
        load_settings(path, env)
    return info.value.message


def cli_env(**extra: str) -> dict[str, str]:
    """The process environment without any BATCHD_ variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHD_")}
    env.update(extra)
    return env


# -- defaults -----------------------------------------------------------------


def test_defaults_match_the_spec_values(tmp_path: Path) -> None:
    """With an empty file and no environment every SPEC default applies."""
    settings = load_settings(write_toml(tmp_path, ""), {})
    assert settings.processing.concurrency == 3
    assert settings.processing.max_retries == 3
    assert settings.processing.timeout_seconds == 1800
    assert settings.limits.max_files_per_batch == 50
    assert settings.limits.max_file_bytes == 50 * MIB
    assert settings.limits.allowed_types == ("pdf", "xlsx", "xls", "csv")
    assert settings.limits.uploads_per_user_per_hour == 3
    assert settings.watch.settle_seconds == 1.0
    assert settings.watch.marker == ".ready"
    assert (settings.http.host, settings.http.port) == ("127.0.0.1", 8080)


def test_default_ignore_patterns_match_the_spec(tmp_path: Path) -> None:
    """The default watch.ignore lists every work-in-progress pattern of SPEC §1."""
    settings = load_settings(write_toml(tmp_path, ""), {})
    assert set(settings.watch.ignore) == {
        ".*",
        "~$*",
        "*.tmp",
        "*.part",
        "*.partial",
        "*.crdownload",
        "*.swp",
    }


def test_db_path_defaults_to_the_spool_state_folder(tmp_path: Path) -> None:
    """Without database.path the database is <spool.root>/state/batchd.db."""
    settings = load_settings(write_toml(tmp_path, f'[spool]\nroot = "{tmp_path}"\n'), {})
    assert settings.db_path == tmp_path / "state" / "batchd.db"


# -- the file -----------------------------------------------------------------


def test_toml_file_values_are_used(tmp_path: Path) -> None:
    """Values from the TOML file replace the defaults, section by section."""
    path = write_toml(
        tmp_path,
        "[processing]\nconcurrency = 5\nmax_retries = 1\n"
        '[limits]\nallowed_types = ["PDF", ".csv"]\n'
        '[http]\nhost = "0.0.0.0"\nport = 9000\n'
        '[watch]\nfolder_ready = "marker"\n',
    )
    settings = load_settings(path, {})
    assert settings.processing.concurrency == 5
    assert settings.processing.max_retries == 1
    assert settings.processing.timeout_seconds == 1800  # untouched keys keep defaults
    assert settings.limits.allowed_types == ("pdf", "csv")
    assert (settings.http.host, settings.http.port) == ("0.0.0.0", 9000)
    assert settings.watch.folder_ready == "marker"


def test_batchd_config_env_picks_the_file(tmp_path: Path) -> None:
    """Without --config, $BATCHD_CONFIG names the file to read."""
    path = write_toml(tmp_path, "[processing]\nconcurrency = 11\n")
    settings = load_settings(None, {"BATCHD_CONFIG": str(path)})
    assert settings.processing.concurrency == 11


def test_explicit_path_wins_over_batchd_config(tmp_path: Path) -> None:
    """--config is preferred over $BATCHD_CONFIG."""
    explicit = write_toml(tmp_path, "[processing]\nconcurrency = 4\n", "a.toml")
    other = write_toml(tmp_path, "[processing]\nconcurrency = 8\n", "b.toml")
    assert config_path(explicit, {"BATCHD_CONFIG": str(other)}) == explicit
    assert load_settings(explicit, {"BATCHD_CONFIG": str(other)}).processing.concurrency == 4


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A --config path that does not exist is refused, naming the path."""
    missing = tmp_path / "nope.toml"
    message = load_error(missing, {})
    assert str(missing) in message
    assert "does not exist" in message


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    """A file that is not TOML is refused with a one-line message naming it."""
    path = write_toml(tmp_path, "[processing\nconcurrency = = 3\n")
    message = load_error(path, {})
    assert "not valid TOML" in message
    assert str(path) in message
    assert "\n" not in message


# -- environment ---------------------------------------------------------------


def test_env_overrides_the_file(tmp_path: Path) -> None:
    """BATCHD_<SECTION>__<KEY> beats the file; other file keys in the section stay."""
    path = write_toml(tmp_path, "[processing]\nconcurrency = 5\nmax_retries = 7\n")
    settings = load_settings(path, {"BATCHD_PROCESSING__CONCURRENCY": "9"})
    assert settings.processing.concurrency == 9
    assert settings.processing.max_retries == 7


def test_env_overrides_the_defaults(tmp_path: Path) -> None:
    """An environment variable sets a key the file does not mention."""
    settings = load_settings(
        write_toml(tmp_path, ""),
        {"BATCHD_HTTP__PORT": "9123", "BATCHD_SPOOL__ROOT": str(tmp_path / "spool")},
    )
    assert settings.http.port == 9123
    assert settings.spool.root == tmp_path / "spool"


def test_env_list_value_is_json(tmp_path: Path) -> None:
    """A list key is overridden by a JSON list in the environment."""
    settings = load_settings(
        write_toml(tmp_path, '[limits]\nallowed_types = ["pdf"]\n'),
        {"BATCHD_LIMITS__ALLOWED_TYPES": '["csv", "*"]'},
    )
    assert settings.limits.allowed_types == ("csv", "*")
    assert settings.limits.allows("anything")


def test_only_the_given_env_mapping_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load_settings reads the mapping passed in, not the process environment."""
    monkeypatch.setenv("BATCHD_PROCESSING__CONCURRENCY", "42")
    settings = load_settings(write_toml(tmp_path, ""), {})
    assert settings.processing.concurrency == 3


# -- bad values ------------------------------------------------------------------


def test_bad_file_value_names_key_and_value_on_one_line(tmp_path: Path) -> None:
    """A wrong type in the file gives one line naming the key and the value."""
    path = write_toml(tmp_path, '[processing]\nconcurrency = "abc"\n')
    message = load_error(path, {})
    assert "\n" not in message
    assert "processing.concurrency" in message
    assert "'abc'" in message


def test_out_of_range_value_says_what_is_allowed(tmp_path: Path) -> None:
    """A number outside its range names key, value and the bound."""
    path = write_toml(tmp_path, "[processing]\nconcurrency = 0\n")
    message = load_error(path, {})
    assert "\n" not in message
    assert "processing.concurrency = 0" in message
    assert "greater than or equal to 1" in message


def test_bad_choice_names_the_key(tmp_path: Path) -> None:
    """A value outside a Literal's choices names the key and the value."""
    path = write_toml(tmp_path, '[watch]\nobserver = "inotify"\n')
    message = load_error(path, {})
    assert "\n" not in message
    assert "watch.observer" in message
    assert "inotify" in message


def test_bad_env_value_names_key_and_value(tmp_path: Path) -> None:
    """A bad environment value is refused with one line naming key and value."""
    message = load_error(write_toml(tmp_path, ""), {"BATCHD_PROCESSING__CONCURRENCY": "abc"})
    assert "\n" not in message
    assert "processing.concurrency" in message
    assert "'abc'" in message


def test_non_json_env_list_names_key_and_value(tmp_path: Path) -> None:
    """A list key set to non-JSON in the environment names the key and the value."""
    message = load_error(write_toml(tmp_path, ""), {"BATCHD_WATCH__IGNORE": "notjson"})
    assert "\n" not in message
    assert "ignore" in message.lower()
    assert "notjson" in message


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    """A misspelt key in a section is refused, naming it."""
    path = write_toml(tmp_path, "[processing]\nconcurency = 4\n")
    message = load_error(path, {})
    assert "processing.concurency" in message
    assert "unknown key" in message


def test_unknown_section_in_file_is_refused(tmp_path: Path) -> None:
    """A section batchd does not know is refused, naming it."""
    path = write_toml(tmp_path, "[procesing]\nconcurrency = 4\n")
    message = load_error(path, {})
    assert "procesing" in message
    assert "unknown key" in message


def test_unknown_key_in_env_is_refused(tmp_path: Path) -> None:
    """A misspelt BATCHD_ environment variable inside a section is refused."""
    message = load_error(write_toml(tmp_path, ""), {"BATCHD_PROCESSING__BOGUS": "1"})
    assert "processing.bogus" in message
    assert "unknown key" in message


def test_marker_must_be_a_plain_name(tmp_path: Path) -> None:
    """watch.marker with a slash is refused."""
    message = load_error(write_toml(tmp_path, '[watch]\nmarker = "a/b"\n'), {})
    assert "watch.marker" in message
    assert "plain file name" in message


def test_empty_allowed_types_is_refused(tmp_path: Path) -> None:
    """An empty limits.allowed_types is refused (use ["*"] to allow everything)."""
    message = load_error(write_toml(tmp_path, "[limits]\nallowed_types = []\n"), {})
    assert "limits.allowed_types" in message


# -- objects ----------------------------------------------------------------------


def test_settings_pickle_round_trip(tmp_path: Path) -> None:
    """Loaded settings pickle and unpickle equal (they cross into worker processes)."""
    path = write_toml(tmp_path, "[processing]\nconcurrency = 6\n")
    settings = load_settings(path, {"BATCHD_HTTP__PORT": "0"})
    assert type(settings) is Settings
    copy = pickle.loads(pickle.dumps(settings))
    assert copy == settings
    assert copy.processing.concurrency == 6
    assert copy.http.port == 0


def test_settings_are_frozen(tmp_path: Path) -> None:
    """Settings cannot be changed after loading."""
    settings = load_settings(write_toml(tmp_path, ""), {})
    with pytest.raises(Exception, match="frozen"):
        settings.processing.concurrency = 9  # type: ignore[misc]


def test_backoff_doubles_from_the_base(tmp_path: Path) -> None:
    """backoff_seconds is base, 2*base, 4*base ... for retries 1, 2, 3."""
    path = write_toml(
        tmp_path, "[processing]\nretry_backoff_seconds = 1.5\nretry_backoff_max_seconds = 1000\n"
    )
    processing = load_settings(path, {}).processing
    assert [processing.backoff_seconds(n) for n in (1, 2, 3, 4)] == [1.5, 3.0, 6.0, 12.0]


def test_backoff_is_capped(tmp_path: Path) -> None:
    """backoff_seconds never exceeds retry_backoff_max_seconds, however many retries."""
    path = write_toml(
        tmp_path, "[processing]\nretry_backoff_seconds = 2\nretry_backoff_max_seconds = 10\n"
    )
    processing = load_settings(path, {}).processing
    assert [processing.backoff_seconds(n) for n in (1, 2, 3, 4, 50)] == [
        2.0,
        4.0,
        8.0,
        10.0,
        10.0,
    ]


def test_priority_rank_orders_high_first() -> None:
    """Priority.rank sorts high before normal before low."""
    assert sorted(Priority, key=lambda p: p.rank) == [Priority.HIGH, Priority.NORMAL, Priority.LOW]


# -- the command line ----------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchd", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=CLI_TIMEOUT_SECONDS,
        check=False,
    )


def test_cli_bad_config_file_exits_78_with_one_line(tmp_path: Path) -> None:
    """`batchd init --config bad.toml` exits 78 with one stderr line naming the key."""
    bad = write_toml(tmp_path, '[processing]\nconcurrency = "abc"\n')
    proc = run_cli("init", "--config", str(bad), env=cli_env())
    assert proc.returncode == EXIT_CONFIG == 78
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "processing.concurrency" in lines[0]
    assert "abc" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "state").exists()


def test_cli_bad_env_value_exits_78(tmp_path: Path) -> None:
    """BATCHD_PROCESSING__CONCURRENCY=abc makes the CLI exit 78 with one line."""
    env = cli_env(
        BATCHD_PROCESSING__CONCURRENCY="abc",
        BATCHD_SPOOL__ROOT=str(tmp_path / "spool"),
        BATCHD_CONFIG=str(write_toml(tmp_path, "")),
    )
    proc = run_cli("init", env=env)
    assert proc.returncode == 78
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "processing.concurrency" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "spool").exists()
