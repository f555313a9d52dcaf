"""Settings: environment ``BATCHD_*``, an optional TOML file, and secrets from ``$CREDENTIALS_DIRECTORY``.

Precedence, highest first: explicit keyword arguments, environment, the secrets directory (systemd
``LoadCredential=``), the TOML file (``--config PATH`` or ``BATCHD_CONFIG``), then the defaults below.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .apispec import BATCH_TIERS
from .errors import ConfigError
from .store.connection import parse_redis_url
from .tags import TAG_KEY, TAG_RULES, TAG_VALUE

__all__ = ["API_MAX_BATCH_BYTES", "API_MAX_BATCH_REQUESTS", "Settings", "load_settings"]

API_MAX_BATCH_REQUESTS = 100_000
API_MAX_BATCH_BYTES = 256 * 1024 * 1024  # 268,435,456: the API's hard limit on a create body
# A submit job does more than its create call (settle an unknown create, build the body, record the batch).
_CREATE_JOB_MARGIN_S = 60.0
# Default leaves ~6 % for the envelope and headers, and for clients sized by another replica's settings.
DEFAULT_MAX_BATCH_BYTES = 250_000_000


class _SecretsDirSource(PydanticBaseSettingsSource):
    """Reads ``$CREDENTIALS_DIRECTORY/<name>`` for secret fields (systemd ``LoadCredential=``).

    A file named ``anthropic_api_key`` (or ``batchd_anthropic_api_key``) fills ``anthropic_api_key``.
    """

    SECRET_FIELDS = ("anthropic_api_key", "http_tokens")

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ is overridden; pydantic-settings requires the method

    def __call__(self) -> dict[str, Any]:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            return {}
        found: dict[str, Any] = {}
        for name in self.SECRET_FIELDS:
            for candidate in (name, f"batchd_{name}", name.upper(), f"BATCHD_{name.upper()}"):
                path = Path(directory) / candidate
                if path.is_file():
                    # Under the alias the env source uses too, so the two merge instead of clashing.
                    found[f"BATCHD_{name.upper()}"] = path.read_text(encoding="utf-8").strip()
                    break
        return found


class Settings(BaseSettings):
    """Every batchd setting. Documented one by one in ``config/batchd.example.toml``."""

    model_config = SettingsConfigDict(
        env_prefix="BATCHD_",
        extra="forbid",
        validate_default=True,
        populate_by_name=True,
        # inf or nan as a timeout or poll interval only ever means a mistake (a crash loop at best).
        allow_inf_nan=False,
    )

    # Where the queue lives. redis://, rediss:// and unix:// URLs (user:password@ for ACLs) are passed to
    # redis-py as they are; redis+sentinel:// finds the primary through Sentinel (store/connection.py).
    redis_url: str = "redis://127.0.0.1:6379/0"
    # A submit returns once its write is on this many replicas (Redis WAIT); 0: once the primary has it.
    redis_min_replicas_ack: int = Field(default=0, ge=0, le=100)
    redis_min_replicas_ack_timeout_seconds: float = Field(default=1.0, gt=0, le=60)
    # Namespace of every key; two deployments can share one Redis with different prefixes.
    key_prefix: str = Field(default="batchd", pattern=r"^[A-Za-z0-9_.-]{1,32}$")

    anthropic_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("BATCHD_ANTHROPIC_API_KEY", "ANTHROPIC_API_KEY"),
    )
    anthropic_base_url: str | None = None

    max_batch_requests: int = Field(default=10_000, ge=1, le=API_MAX_BATCH_REQUESTS)
    max_batch_bytes: int = Field(default=DEFAULT_MAX_BATCH_BYTES, ge=1024, le=API_MAX_BATCH_BYTES)
    max_batch_age_seconds: float = Field(default=30.0, gt=0, le=86_400)
    # How often the open batches are checked: one batches.list call covers up to 1,000 of them, so a batch's
    # end is noticed within this long whatever their number.
    poll_interval_seconds: float = Field(default=5.0, gt=0, le=300)
    result_ttl_seconds: int = Field(default=7 * 86_400, ge=60)
    max_attempts: int = Field(default=3, ge=1, le=20)

    # Backpressure: submit refuses (or waits) past these.
    max_queued_requests: int = Field(default=1_000_000, ge=1)
    max_queued_bytes: int = Field(default=2 * 1024**3, ge=1024)

    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9464, ge=0, le=65_535)
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    shutdown_grace_seconds: float = Field(default=30.0, ge=0, le=3600)
    # This replica's name: its intake consumer, heartbeat and leases. A restarted replica with the same name
    # takes its own leftovers back at once; give each replica on one host its own (default: the host name).
    replica_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.@:-]{1,64}$")
    # Longest one batches.create call may take, upload included. Its outcome stays unknown until then, and
    # batchd never creates that flush again while a batch from it could still appear.
    create_timeout_seconds: float = Field(default=300.0, ge=5, le=3600)
    # Longest run of one job (a create with its upload, a results fan-out), after which it is cancelled and
    # run again. Recovery after a crash does not wait for it: a job's lease lapses within 15 s.
    job_timeout_seconds: float = Field(default=600.0, ge=10, le=86_400)
    # Redis must not evict (an evicted intake stream loses accepted work): the daemon refuses to start on an
    # evicting maxmemory-policy unless this is true.
    allow_evicting_redis: bool = False

    # The API key's usage tier: it sets the Message Batches limits batchd keeps to (requests per minute
    # across every batch endpoint, and requests waiting in the API's processing queue), unless overridden.
    api_tier: int = Field(default=1, ge=1, le=4)
    api_rpm: int | None = Field(default=None, ge=1)
    api_queue_limit: int | None = Field(default=None, ge=1)

    # The HTTP front (`batchd front`, docs/front.md): an Anthropic-compatible base URL for any client.
    http_host: str = "127.0.0.1"
    # Unset: `batchd front` listens on 8787 and `batchd run` serves no front; set: `batchd run` serves it too.
    http_port: int | None = Field(default=None, ge=0, le=65_535)
    # Callers' tokens, comma-separated (x-api-key or Authorization: Bearer). Secrets: never logged.
    http_tokens: SecretStr | None = None
    # A file of tokens, one per line (blank lines and # comments ignored); adds to http_tokens.
    http_token_file: Path | None = None
    # A waiting stream sends an SSE ping this often, so proxies keep the idle connection open.
    http_ping_seconds: float = Field(default=15.0, gt=0, le=300)

    # Routing (docs/front.md): a request with a deadline (route auto) is also sent through the real-time
    # Messages API, at standard prices, if its batch has not answered this long before the deadline; a
    # deadline no batch could meet goes to real time at once. Enough for a long answer to be written.
    realtime_margin_seconds: float = Field(default=30.0, gt=0, le=86_400)
    # Daemon: real-time calls in flight at once, per replica.
    realtime_concurrency: int = Field(default=16, ge=1, le=1000)

    # Spend (docs/spend.md). Budgets: USD a UTC day may spend, over every request (None: no global budget)
    # and per tag ("team=search" -> USD). A request whose estimate would pass one is refused at submit.
    daily_budget_usd: float | None = Field(default=None, gt=0)
    tag_budgets_usd: dict[str, float] = Field(default={})
    # Prompt-cache-aware batching (daemon): requests sharing a cache prefix flush into one batch, together.
    cache_grouping: bool = True
    # Clients: raise each request's last cache breakpoint to the 1-hour TTL before it is queued.
    cache_ttl_1h: bool = False
    # Daemon: a new prefix with this many requests waiting is primed (one request first, in a small batch;
    # the rest once its answer is in), for at most cache_prime_wait_seconds.
    cache_priming: bool = False
    cache_prime_min_requests: int = Field(default=4, ge=2, le=100_000)
    cache_prime_wait_seconds: float = Field(default=900.0, gt=0, le=86_400)
    # Clients: identical requests in flight at once are sent once, and one made again within
    # dedupe_window_seconds of a succeeded answer gets that answer (per client or per request too).
    dedupe: bool = False
    dedupe_window_seconds: int = Field(default=86_400, ge=0)

    @property
    def dedupe_window(self) -> int:
        """The window in force: an answer is reused only while it is kept (result_ttl_seconds)."""
        return min(self.dedupe_window_seconds, self.result_ttl_seconds)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        try:
            parse_redis_url(value)
        except ValueError as exc:
            # A custom error type keeps pydantic's "Value error, " prefix out of the one-line message.
            raise PydanticCustomError("redis_url", str(exc)) from None
        return value

    @property
    def effective_api_rpm(self) -> int:
        """Calls per minute batchd allows itself: api_rpm, or 90 % of the tier's (the API's window and ours
        do not start at the same instant; a margin keeps 429s rare)."""
        return self.api_rpm or max(1, int(BATCH_TIERS[self.api_tier].rpm * 0.9))

    @property
    def effective_api_queue_limit(self) -> int:
        return self.api_queue_limit or BATCH_TIERS[self.api_tier].queue

    @field_validator("job_timeout_seconds")
    @classmethod
    def _job_outlasts_create(cls, value: float, info: ValidationInfo) -> float:
        create = info.data.get("create_timeout_seconds")
        if create is not None and value < create + _CREATE_JOB_MARGIN_S:
            least = create + _CREATE_JOB_MARGIN_S
            raise ValueError(
                f"must be >= create_timeout_seconds + {_CREATE_JOB_MARGIN_S:g} ({least:g}): "
                "a create job must never be cancelled while its create call may still succeed"
            )
        return value

    @field_validator("tag_budgets_usd")
    @classmethod
    def _tag_budgets(cls, value: dict[str, float]) -> dict[str, float]:
        for scope, usd in value.items():
            key, sep, tag_value = scope.partition("=")
            if not sep or not TAG_KEY.fullmatch(key) or not TAG_VALUE.fullmatch(tag_value):
                raise ValueError(f"{scope!r} is not a tag as key=value ({TAG_RULES})")
            if not math.isfinite(usd) or usd <= 0:
                raise ValueError(f"{scope}: the budget must be a positive number of USD, not {usd!r}")
        return value

    @field_validator("cache_priming")
    @classmethod
    def _priming_needs_grouping(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("cache_grouping") is False:
            raise ValueError("needs cache_grouping: priming holds back the requests of a prefix group")
        return value

    @field_validator("anthropic_api_key")
    @classmethod
    def _strip_key(cls, value: SecretStr | None) -> SecretStr | None:
        # A key pasted with a trailing newline (an env file, `echo key > file`) is a key, not a new header.
        if value is None:
            return None
        key = value.get_secret_value().strip()
        if not key:
            raise ValueError("is empty")
        if any(c.isspace() for c in key):
            raise ValueError("contains whitespace inside the key")
        return SecretStr(key)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [
            init_settings,
            env_settings,
            _SecretsDirSource(settings_cls),
        ]
        toml_path = _CONFIG_PATH_OVERRIDE or os.environ.get("BATCHD_CONFIG")
        if toml_path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml_path)))
        return tuple(sources)

    def __repr_args__(self) -> Any:
        # repr() and str() of Settings end up in logs and tracebacks: never show a Redis password.
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "redis_url" and isinstance(value, str) else value

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict fit for logs and ``status``: secrets masked."""
        data = self.model_dump()
        data["anthropic_api_key"] = "**********" if self.anthropic_api_key else None
        data["http_tokens"] = "**********" if self.http_tokens else None
        data["redis_url"] = redact_url(self.redis_url)
        return data


def redact_url(url: str) -> str:
    """``redis://user:pass@host`` -> ``redis://user:***@host``: a Redis password must not reach logs (nor
    a sentinel password: ``?sentinel_password=***``)."""
    url = _SENTINEL_PASSWORD.sub(r"\1***", url)
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0] if ":" in creds else ""
    return f"{scheme}://{user}:***@{host}" if user else f"{scheme}://***@{host}"


_SENTINEL_PASSWORD = re.compile(r"([?&]sentinel_password=)[^&#]*")

# Set by load_settings(config_path=...) for the duration of one construction; keeps Settings() usable bare.
_CONFIG_PATH_OVERRIDE: str | None = None


# Env names, for error messages: BATCHD_<FIELD>.
def _env_name(loc: tuple[int | str, ...]) -> str:
    field = str(loc[0]) if loc else "?"
    if field.lower() in ("anthropic_api_key", "batchd_anthropic_api_key"):  # the field, or one of its aliases
        return "BATCHD_ANTHROPIC_API_KEY"
    return f"BATCHD_{field.upper()}"


def load_settings(config_path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Build Settings, turning every validation failure into one ConfigError naming the setting."""
    global _CONFIG_PATH_OVERRIDE
    path = str(config_path) if config_path is not None else None
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    env_path = os.environ.get("BATCHD_CONFIG")
    if path is None and env_path and not Path(env_path).is_file():
        raise ConfigError(f"BATCHD_CONFIG: config file {env_path!r} does not exist")
    _CONFIG_PATH_OVERRIDE = path
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first.get("loc", ()))
        if first.get("type") == "extra_forbidden" and loc:
            raise ConfigError(f"unknown setting {loc[0]!r} (see config/batchd.example.toml)") from None
        name = _env_name(loc) if loc else "settings"
        raise ConfigError(f"{name}: {first.get('msg', 'invalid value')}") from None
    except (ValueError, OSError) as exc:  # e.g. a TOML syntax error
        raise ConfigError(f"config: {exc}") from None
    finally:
        _CONFIG_PATH_OVERRIDE = None
