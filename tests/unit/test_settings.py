"""Settings: defaults, BATCHD_* environment, TOML file, secrets directory, precedence, and errors.

The autouse ``_isolate_env`` fixture (conftest) clears BATCHD_*/ANTHROPIC_*/CREDENTIALS_DIRECTORY first,
so every test here starts from the defaults whatever the developer's shell exports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from batchd.errors import ConfigError
from batchd.settings import API_MAX_BATCH_BYTES, API_MAX_BATCH_REQUESTS, Settings, load_settings

SECRET = "sk-ant-very-secret-value"

DEFAULTS: dict[str, Any] = {
    "redis_url": "redis://127.0.0.1:6379/0",
    "redis_min_replicas_ack": 0,
    "redis_min_replicas_ack_timeout_seconds": 1.0,
    "key_prefix": "batchd",
    "anthropic_api_key": None,
    "anthropic_base_url": None,
    "max_batch_requests": 10_000,
    "max_batch_bytes": 250_000_000,
    "max_batch_age_seconds": 30.0,
    "poll_interval_seconds": 5.0,
    "result_ttl_seconds": 7 * 86_400,
    "max_attempts": 3,
    "max_queued_requests": 1_000_000,
    "max_queued_bytes": 2 * 1024**3,
    "metrics_host": "127.0.0.1",
    "metrics_port": 9464,
    "log_format": "text",
    "log_level": "INFO",
    "shutdown_grace_seconds": 30.0,
    "replica_name": None,
    "create_timeout_seconds": 300.0,
    "job_timeout_seconds": 600.0,
    "allow_evicting_redis": False,
    "api_tier": 1,
    "api_rpm": None,
    "api_queue_limit": None,
    "http_host": "127.0.0.1",
    "http_port": None,
    "http_tokens": None,
    "http_token_file": None,
    "http_ping_seconds": 15.0,
    "daily_budget_usd": None,
    "tag_budgets_usd": {},
    "cache_grouping": True,
    "cache_ttl_1h": False,
    "cache_priming": False,
    "cache_prime_min_requests": 4,
    "cache_prime_wait_seconds": 900.0,
    "dedupe": False,
    "dedupe_window_seconds": 86_400,
    "realtime_margin_seconds": 30.0,
    "realtime_concurrency": 16,
}

# field -> (environment value, parsed value). One row per setting: test_env_table_covers_every_setting
# makes a new setting without a row fail, so none can be left untested.
ENV_CASES: dict[str, tuple[str, Any]] = {
    "redis_url": ("redis://user:pw@redis.example:6380/2", "redis://user:pw@redis.example:6380/2"),
    "redis_min_replicas_ack": ("1", 1),
    "redis_min_replicas_ack_timeout_seconds": ("2.5", 2.5),
    "key_prefix": ("staging.v2", "staging.v2"),
    "anthropic_api_key": (SECRET, SECRET),
    "anthropic_base_url": ("http://127.0.0.1:8999", "http://127.0.0.1:8999"),
    "max_batch_requests": ("100000", 100_000),
    "max_batch_bytes": ("268435456", 268_435_456),
    "max_batch_age_seconds": ("2.5", 2.5),
    "poll_interval_seconds": ("0.5", 0.5),
    "result_ttl_seconds": ("3600", 3600),
    "max_attempts": ("5", 5),
    "max_queued_requests": ("42", 42),
    "max_queued_bytes": ("4096", 4096),
    "metrics_host": ("0.0.0.0", "0.0.0.0"),
    "metrics_port": ("0", 0),
    "log_format": ("json", "json"),
    "log_level": ("DEBUG", "DEBUG"),
    "shutdown_grace_seconds": ("0", 0.0),
    "replica_name": ("worker-2@eu", "worker-2@eu"),
    "create_timeout_seconds": ("120", 120.0),
    "job_timeout_seconds": ("400", 400.0),
    "allow_evicting_redis": ("true", True),
    "api_tier": ("3", 3),
    "api_rpm": ("900", 900),
    "api_queue_limit": ("5000", 5000),
    "http_host": ("0.0.0.0", "0.0.0.0"),
    "http_port": ("8080", 8080),
    "http_tokens": ("tok-a,tok-b", "tok-a,tok-b"),
    "http_token_file": ("/etc/batchd/http_tokens", Path("/etc/batchd/http_tokens")),
    "http_ping_seconds": ("5", 5.0),
    "daily_budget_usd": ("12.5", 12.5),
    "tag_budgets_usd": ('{"team=search": 50, "env=prod": 0.25}', {"team=search": 50.0, "env=prod": 0.25}),
    "cache_grouping": ("false", False),
    "cache_ttl_1h": ("true", True),
    "cache_priming": ("true", True),
    "cache_prime_min_requests": ("10", 10),
    "cache_prime_wait_seconds": ("60", 60.0),
    "dedupe": ("true", True),
    "dedupe_window_seconds": ("0", 0),
    "realtime_margin_seconds": ("90", 90.0),
    "realtime_concurrency": ("4", 4),
}


def value(settings: Settings, field: str) -> Any:
    raw = getattr(settings, field)
    secret = field in ("anthropic_api_key", "http_tokens")
    return raw.get_secret_value() if secret and raw is not None else raw


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults and environment ----------------------------------------------------------------------------
def test_defaults() -> None:
    settings = load_settings()
    assert {field: value(settings, field) for field in DEFAULTS} == DEFAULTS
    assert settings.max_batch_requests <= API_MAX_BATCH_REQUESTS
    assert settings.max_batch_bytes < API_MAX_BATCH_BYTES  # room for the envelope


def test_env_table_covers_every_setting() -> None:
    assert set(ENV_CASES) == set(Settings.model_fields) == set(DEFAULTS)


@pytest.mark.parametrize("field", sorted(ENV_CASES))
def test_each_batchd_env_var_sets_its_setting(monkeypatch: pytest.MonkeyPatch, field: str) -> None:
    raw, expected = ENV_CASES[field]
    monkeypatch.setenv(f"BATCHD_{field.upper()}", raw)
    assert value(load_settings(), field) == expected


def test_anthropic_api_key_falls_back_to_the_sdk_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    settings = load_settings()
    assert settings.anthropic_api_key is not None
    assert settings.anthropic_api_key.get_secret_value() == SECRET


def test_batchd_api_key_beats_the_sdk_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "generic")
    monkeypatch.setenv("BATCHD_ANTHROPIC_API_KEY", SECRET)
    settings = load_settings()
    assert settings.anthropic_api_key is not None
    assert settings.anthropic_api_key.get_secret_value() == SECRET


def test_keyword_overrides_beat_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHD_MAX_ATTEMPTS", "5")
    assert load_settings(max_attempts=7).max_attempts == 7


# --- TOML ------------------------------------------------------------------------------------------------
TOML = """
redis_url = "redis://from-toml:6379/1"
max_batch_requests = 500
max_batch_age_seconds = 4.5
log_format = "json"
"""


def test_toml_file_via_config_path(tmp_path: Path) -> None:
    settings = load_settings(config_path=write(tmp_path / "batchd.toml", TOML))
    assert settings.redis_url == "redis://from-toml:6379/1"
    assert settings.max_batch_requests == 500
    assert settings.max_batch_age_seconds == 4.5
    assert settings.log_format == "json"
    assert settings.max_attempts == DEFAULTS["max_attempts"]  # untouched settings keep their default


def test_toml_file_via_batchd_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHD_CONFIG", str(write(tmp_path / "batchd.toml", TOML)))
    assert load_settings().max_batch_requests == 500


def test_config_path_argument_beats_batchd_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHD_CONFIG", str(write(tmp_path / "env.toml", "max_batch_requests = 1\n")))
    assert load_settings(config_path=write(tmp_path / "arg.toml", TOML)).max_batch_requests == 500


def test_env_beats_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHD_MAX_BATCH_REQUESTS", "777")
    settings = load_settings(config_path=write(tmp_path / "batchd.toml", TOML))
    assert settings.max_batch_requests == 777
    assert settings.redis_url == "redis://from-toml:6379/1"  # the rest still comes from the file


def test_config_path_does_not_leak_into_later_loads(tmp_path: Path) -> None:
    load_settings(config_path=write(tmp_path / "batchd.toml", TOML))
    assert load_settings().max_batch_requests == DEFAULTS["max_batch_requests"]


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_settings(config_path=missing)
    assert str(missing) in str(info.value)


def test_missing_batchd_config_file_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHD_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match=r"BATCHD_CONFIG.*does not exist"):
        load_settings()


def test_toml_syntax_error_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_settings(config_path=write(tmp_path / "bad.toml", "max_batch_requests = = 3\n"))


def test_unknown_toml_key_is_a_config_error(tmp_path: Path) -> None:
    # A typo in the file must not be silently ignored.
    with pytest.raises(ConfigError, match=r"(?i)max_batch_reqests"):
        load_settings(config_path=write(tmp_path / "typo.toml", "max_batch_reqests = 3\n"))


# --- secrets directory -----------------------------------------------------------------------------------
def test_api_key_from_credentials_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "anthropic_api_key", SECRET + "\n")  # systemd credentials often end in a newline
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    settings = load_settings()
    assert settings.anthropic_api_key is not None
    assert settings.anthropic_api_key.get_secret_value() == SECRET


@pytest.mark.parametrize("variable", ["BATCHD_ANTHROPIC_API_KEY", "ANTHROPIC_API_KEY"])
def test_env_key_with_a_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    # A systemd unit with LoadCredential= and an environment key must start, not fail validation.
    write(tmp_path / "anthropic_api_key", "from-credentials")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.setenv(variable, "from-env")
    key = load_settings().anthropic_api_key
    assert key is not None and key.get_secret_value() == "from-env"


def test_env_beats_credentials_directory_which_beats_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    write(creds / "anthropic_api_key", "from-credentials")
    toml = write(tmp_path / "batchd.toml", 'anthropic_api_key = "from-toml"\n')
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))

    key = load_settings(config_path=toml).anthropic_api_key
    assert key is not None and key.get_secret_value() == "from-credentials"

    monkeypatch.setenv("BATCHD_ANTHROPIC_API_KEY", "from-env")
    key = load_settings(config_path=toml).anthropic_api_key
    assert key is not None and key.get_secret_value() == "from-env"


# --- errors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("BATCHD_MAX_BATCH_REQUESTS", "0"),
        ("BATCHD_MAX_BATCH_REQUESTS", str(API_MAX_BATCH_REQUESTS + 1)),
        ("BATCHD_MAX_BATCH_REQUESTS", "many"),
        ("BATCHD_MAX_BATCH_BYTES", str(API_MAX_BATCH_BYTES + 1)),
        ("BATCHD_MAX_BATCH_BYTES", "1023"),
        ("BATCHD_MAX_BATCH_AGE_SECONDS", "0"),
        ("BATCHD_MAX_ATTEMPTS", "21"),
        ("BATCHD_RESULT_TTL_SECONDS", "59"),
        ("BATCHD_METRICS_PORT", "65536"),
        ("BATCHD_LOG_FORMAT", "xml"),
        ("BATCHD_LOG_LEVEL", "TRACE"),
        ("BATCHD_KEY_PREFIX", "has space"),
        ("BATCHD_POLL_INTERVAL_SECONDS", "-1"),
        ("BATCHD_POLL_INTERVAL_SECONDS", "301"),
        ("BATCHD_API_TIER", "5"),
        ("BATCHD_API_RPM", "0"),
        ("BATCHD_JOB_TIMEOUT_SECONDS", "4"),
    ],
)
def test_bad_env_value_is_a_config_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, raw: str
) -> None:
    monkeypatch.setenv(name, raw)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith(f"{name}:")


def test_bad_toml_value_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^BATCHD_MAX_BATCH_REQUESTS:"):
        load_settings(config_path=write(tmp_path / "bad.toml", "max_batch_requests = 0\n"))


@pytest.mark.parametrize(
    ("env", "value", "says"),
    [
        ("BATCHD_JOB_TIMEOUT_SECONDS", "inf", "finite"),
        ("BATCHD_CREATE_TIMEOUT_SECONDS", "nan", "finite"),
        ("BATCHD_POLL_INTERVAL_SECONDS", "inf", "finite"),
        ("BATCHD_MAX_BATCH_AGE_SECONDS", "nan", "finite"),
        ("BATCHD_SHUTDOWN_GRACE_SECONDS", "Infinity", ""),
        ("BATCHD_JOB_TIMEOUT_SECONDS", "300", "create_timeout_seconds + 60"),
        ("BATCHD_REPLICA_NAME", "two words", "pattern"),
        ("BATCHD_ANTHROPIC_API_KEY", "sk-ant one two", "whitespace"),
    ],
)
def test_nonsensical_values_are_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, says: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith(f"{env}: ")
    assert says in str(info.value)


def test_an_api_key_with_a_trailing_newline_is_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHD_ANTHROPIC_API_KEY", f"  {SECRET}\n")
    key = load_settings().anthropic_api_key
    assert key is not None and key.get_secret_value() == SECRET


def test_api_limits_follow_the_tier_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    # 90 % of the tier's requests per minute: the API's window and batchd's do not start together.
    assert (load_settings().effective_api_rpm, load_settings().effective_api_queue_limit) == (45, 100_000)
    monkeypatch.setenv("BATCHD_API_TIER", "4")
    assert (load_settings().effective_api_rpm, load_settings().effective_api_queue_limit) == (3600, 500_000)
    monkeypatch.setenv("BATCHD_API_RPM", "100")
    monkeypatch.setenv("BATCHD_API_QUEUE_LIMIT", "700")
    assert (load_settings().effective_api_rpm, load_settings().effective_api_queue_limit) == (100, 700)


def test_config_error_does_not_chain_the_pydantic_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI prints one line; a chained ValidationError would drag a multi-line dump into tracebacks.
    monkeypatch.setenv("BATCHD_MAX_ATTEMPTS", "0")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


# --- secrets never shown ---------------------------------------------------------------------------------
def test_repr_and_str_never_show_the_api_key() -> None:
    settings = load_settings(anthropic_api_key=SECRET)
    for text in (repr(settings), str(settings), repr(settings.anthropic_api_key), str(settings.model_dump())):
        assert SECRET not in text


def test_redacted_masks_the_key_and_the_redis_password() -> None:
    settings = load_settings(anthropic_api_key=SECRET, redis_url="redis://user:hunter2@host:6379/0")
    redacted = settings.redacted()
    assert redacted["anthropic_api_key"] == "**********"
    assert redacted["redis_url"] == "redis://user:***@host:6379/0"
    assert SECRET not in str(redacted)
    assert "hunter2" not in str(redacted)


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (
            {"tag_budgets_usd": {"team": 5.0}},
            "BATCHD_TAG_BUDGETS_USD: Value error, 'team' is not a tag as key=value",
        ),
        ({"tag_budgets_usd": {"team=a b": 5.0}}, "is not a tag as key=value"),
        ({"tag_budgets_usd": {"team=x": 0.0}}, "must be a positive number of USD"),
        ({"daily_budget_usd": 0}, "BATCHD_DAILY_BUDGET_USD"),
        (
            {"cache_grouping": False, "cache_priming": True},
            "BATCHD_CACHE_PRIMING: Value error, needs cache_grouping",
        ),
        ({"cache_prime_min_requests": 1}, "BATCHD_CACHE_PRIME_MIN_REQUESTS"),
    ],
)
def test_spend_settings_are_checked(overrides: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(**overrides)
    assert problem in str(info.value)


def test_the_dedupe_window_never_outlives_the_answers() -> None:
    assert load_settings().dedupe_window == 86_400
    assert load_settings(result_ttl_seconds=3600).dedupe_window == 3600
