"""What a request cost: the price table (``batchd/data/prices.toml``) applied to a Message ``usage`` block.

The table is data, read once: standard USD per million tokens for each model's input and output, plus the
multipliers that derive the rest (cache writes and reads from the base input price, the batch discount, the
``inference_geo: "us"`` premium). A model the table does not know costs ``None``, never a guess.

Not counted: server-tool fees (e.g. ``server_tool_use.web_search_requests``), which are billed per call.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

__all__ = ["Price", "TokenCounts", "cost_usd", "costs", "known_models", "price_for", "token_counts"]

_MILLION = 1_000_000
# What may follow a base id and still be that model: a snapshot date or the "-latest" alias.
_SUFFIX = re.compile(r"[-@](?:\d{8}|latest)")
_MODEL_KEYS = frozenset(
    {
        "name",
        "input",
        "output",
        "aliases",
        "us_geo",
        "cache_write_5m",
        "cache_write_1h",
        "cache_read",
        "long_prompt_threshold",
        "long_input",
        "long_output",
    }
)
_DEFAULT_KEYS = frozenset(
    {"cache_write_5m", "cache_write_1h", "cache_read", "batch_multiplier", "us_geo_multiplier"}
)


@dataclass(frozen=True, slots=True)
class Price:
    """One model's standard (non-batch) prices, USD per million tokens, cache prices already derived.

    ``long_prompt`` is the tier used when a prompt's input tokens (plain + cache write + cache read) exceed
    ``long_prompt_threshold``; ``None`` for models with one tier.
    """

    model: str
    name: str
    input: float
    output: float
    cache_write_5m: float
    cache_write_1h: float
    cache_read: float
    batch_multiplier: float
    us_geo_multiplier: float
    long_prompt_threshold: int | None = None
    long_prompt: Price | None = None

    def tier(self, prompt_tokens: int) -> Price:
        """The price that applies to a prompt of this many input tokens."""
        if (
            self.long_prompt is not None
            and self.long_prompt_threshold is not None
            and prompt_tokens > self.long_prompt_threshold
        ):
            return self.long_prompt
        return self


@dataclass(frozen=True, slots=True)
class _Table:
    prices: dict[str, Price]  # base id -> price
    ids: dict[str, str]  # base id or alias -> base id


def _number(entry: Mapping[str, Any], key: str, where: str) -> float:
    value = entry[key]
    # bool is an int subclass; "input = true" is a typo, not a price.
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"prices.toml: {where}.{key} must be a non-negative number, got {value!r}")
    return float(value)


def _tier(inp: float, out: float, cache: tuple[float, ...], common: Mapping[str, Any]) -> Price:
    write_5m, write_1h, read = cache
    return Price(
        input=inp,
        output=out,
        cache_write_5m=inp * write_5m,
        cache_write_1h=inp * write_1h,
        cache_read=inp * read,
        **common,
    )


def _parse(data: Mapping[str, Any]) -> _Table:
    """Validate the TOML document and build the lookup table; raise ValueError naming the bad entry."""
    defaults = data.get("defaults", {})
    unknown = set(defaults) - _DEFAULT_KEYS
    if unknown or set(_DEFAULT_KEYS) - set(defaults):
        raise ValueError(f"prices.toml: [defaults] needs exactly {sorted(_DEFAULT_KEYS)}")
    mult = {key: _number(defaults, key, "defaults") for key in _DEFAULT_KEYS}

    prices: dict[str, Price] = {}
    ids: dict[str, str] = {}
    for model, entry in data.get("models", {}).items():
        where = f"models.{model}"
        if not isinstance(entry, Mapping):
            raise ValueError(f"prices.toml: {where} must be a table")
        unknown = set(entry) - _MODEL_KEYS
        if unknown:
            raise ValueError(f"prices.toml: {where} has unknown keys {sorted(unknown)}")
        # Multipliers of base input; per-model keys override the defaults (e.g. Opus 5.5 reads at 0.05x).
        cache = tuple(
            _number(entry, key, where) if key in entry else mult[key]
            for key in ("cache_write_5m", "cache_write_1h", "cache_read")
        )
        common: dict[str, Any] = {
            "model": model,
            "name": str(entry.get("name", model)),
            "batch_multiplier": mult["batch_multiplier"],
            "us_geo_multiplier": mult["us_geo_multiplier"] if entry.get("us_geo", False) is True else 1.0,
        }
        price = _tier(_number(entry, "input", where), _number(entry, "output", where), cache, common)
        if "long_prompt_threshold" in entry:
            threshold = entry["long_prompt_threshold"]
            if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 1:
                raise ValueError(f"prices.toml: {where}.long_prompt_threshold must be a positive integer")
            long_tier = _tier(
                _number(entry, "long_input", where), _number(entry, "long_output", where), cache, common
            )
            price = dataclasses.replace(price, long_prompt_threshold=threshold, long_prompt=long_tier)
        prices[model] = price
        aliases = entry.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise ValueError(f"prices.toml: {where}.aliases must be a list of strings")
        for name in (model, *aliases):
            if name in ids:
                raise ValueError(f"prices.toml: {name!r} is listed twice")
            ids[name] = model
    return _Table(prices=prices, ids=ids)


@functools.cache
def _table() -> _Table:
    # Loaded on first use and kept: the file ships inside the package and does not change under us.
    text = resources.files("batchd").joinpath("data", "prices.toml").read_text(encoding="utf-8")
    return _parse(tomllib.loads(text))


@functools.lru_cache(maxsize=512)  # called per result line; the set of model strings seen is small
def _base_id(model: str) -> str | None:
    ids = _table().ids
    if model in ids:
        return ids[model]
    # Longest base id that the model extends by a date or "-latest" only: "claude-opus-4-1-20250805" is
    # Opus 4.1, while an unknown "claude-opus-4-9" is not Opus 4.
    best: str | None = None
    for known in ids:
        if (
            model.startswith(known)
            and _SUFFIX.fullmatch(model, len(known))
            and (best is None or len(known) > len(best))
        ):
            best = known
    return ids[best] if best is not None else None


def price_for(model: str) -> Price | None:
    """The price of ``model`` (a base id, an alias, or a dated id), or ``None`` if the table lacks it."""
    base = _base_id(model)
    return _table().prices[base] if base is not None else None


def known_models() -> tuple[str, ...]:
    """Every base id in the table (the bounded set of ``model`` label values, with "other")."""
    return tuple(_table().prices)


def _count(usage: Mapping[str, Any], key: str) -> int:
    # The API sends null for fields that do not apply; anything not a count is treated as none.
    value = usage.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return 0
    return value


@dataclass(frozen=True, slots=True)
class TokenCounts:
    """The billable token counts of one ``usage`` block, cache writes split by TTL."""

    input: int
    output: int
    cache_write_5m: int
    cache_write_1h: int
    cache_read: int

    @property
    def cache_write(self) -> int:
        return self.cache_write_5m + self.cache_write_1h

    @property
    def prompt(self) -> int:
        """Every input token of the request: plain, cache writes and cache reads."""
        return self.input + self.cache_write + self.cache_read


def token_counts(usage: Mapping[str, Any]) -> TokenCounts:
    """Read a Message ``usage`` mapping; without a ``cache_creation`` breakdown, cache writes count as 5m."""
    write_total = _count(usage, "cache_creation_input_tokens")
    breakdown = usage.get("cache_creation")
    if isinstance(breakdown, Mapping):
        write_5m = _count(breakdown, "ephemeral_5m_input_tokens")
        write_1h = _count(breakdown, "ephemeral_1h_input_tokens")
        # A total larger than its breakdown: the rest is billed at the 5-minute rate, the API's default TTL.
        write_5m += max(0, write_total - write_5m - write_1h)
    else:
        write_5m, write_1h = write_total, 0
    return TokenCounts(
        input=_count(usage, "input_tokens"),
        output=_count(usage, "output_tokens"),
        cache_write_5m=write_5m,
        cache_write_1h=write_1h,
        cache_read=_count(usage, "cache_read_input_tokens"),
    )


def _standard_cost(price: Price, usage: Mapping[str, Any]) -> float:
    n = token_counts(usage)
    tier = price.tier(n.prompt)
    micro = (
        n.input * tier.input
        + n.output * tier.output
        + n.cache_write_5m * tier.cache_write_5m
        + n.cache_write_1h * tier.cache_write_1h
        + n.cache_read * tier.cache_read
    )
    geo = tier.us_geo_multiplier if usage.get("inference_geo") == "us" else 1.0
    return micro / _MILLION * geo


def costs(model: str, usage: Mapping[str, Any]) -> tuple[float, float] | None:
    """``(batch_cost, standard_cost)`` in USD of one Message ``usage`` block; None for an unknown model."""
    price = price_for(model)
    if price is None:
        return None
    standard = _standard_cost(price, usage)
    return standard * price.batch_multiplier, standard


def cost_usd(model: str, usage: Mapping[str, Any], *, batch: bool) -> float | None:
    """USD cost of one Message ``usage`` block at batch or standard rates; ``None`` for an unknown model."""
    both = costs(model, usage)
    if both is None:
        return None
    return both[0] if batch else both[1]
