"""What a request cost: the price table (``batchd/data/prices.toml``) applied to a Message ``usage`` block.

The table is data, read once, with its date and source (``table_info()``): standard USD per million tokens
for each model's input and output, the multipliers that derive the rest (cache writes and reads from the
base input price, the batch discount, the ``inference_geo: "us"`` premium), and the per-use fees of server
tools (``server_tool_use.web_search_requests``). A model the table does not know costs ``None``, never a
guess.

Costs are worked exactly (fractions of the table's decimal figures) in whole pico-dollars (``picos``), so
the ledger adds integers and a sum never drifts; ``costs`` gives the same figures in USD.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from importlib import resources
from typing import Any, NamedTuple

__all__ = [
    "PICO",
    "Price",
    "TableInfo",
    "TokenCounts",
    "cost_usd",
    "costs",
    "known_models",
    "picos",
    "picos_of",
    "price_for",
    "table_info",
    "token_counts",
]

_MILLION = 1_000_000
# The ledger's unit: one pico-dollar. A table price (USD per million tokens, three decimals at most) times
# the batch, cache and US-geo multipliers is a whole number of pico-dollars per token, so nothing rounds and
# a batch cost is exactly half its standard cost. A signed 64-bit Redis counter holds $9.2 million.
PICO = 1_000_000_000_000
_PICO_PER_MTOK = Fraction(PICO, _MILLION)  # USD per million tokens -> pico-USD per token
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
_TOP_KEYS = frozenset({"table", "defaults", "models", "server_tools"})
# The usage.server_tool_use counters batchd knows; the table prices each (USD per 1,000 uses).
SERVER_TOOLS = ("web_search_requests", "web_fetch_requests")


def _exact(value: float) -> Fraction:
    # TOML floats come back as binary floats; their shortest repr is the decimal the file wrote.
    return Fraction(repr(value))


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
    # The same figures as exact fractions (USD per million tokens), for picos().
    exact: tuple[Fraction, ...] = ()  # input, output, cache_write_5m, cache_write_1h, cache_read
    exact_batch: Fraction = Fraction(1, 2)
    exact_us_geo: Fraction = Fraction(1)
    # pico-USD per token of each kind (as in ``exact``): standard, standard US-geo, batch, batch US-geo.
    # Whole numbers for every figure the table holds (picos() then adds ints: it runs per results line).
    per_token: tuple[tuple[int | Fraction, ...], ...] = ()

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
class TableInfo:
    """Where the figures come from: the date they were taken and their source."""

    date: str  # ISO date
    source: str


@dataclass(frozen=True, slots=True)
class _Table:
    prices: dict[str, Price]  # base id -> price
    ids: dict[str, str]  # base id or alias -> base id
    info: TableInfo
    tool_fees: dict[str, Fraction]  # server tool usage counter -> pico-USD per use


def _number(entry: Mapping[str, Any], key: str, where: str) -> float:
    value = entry[key]
    # bool is an int subclass; "input = true" is a typo, not a price.
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"prices.toml: {where}.{key} must be a non-negative number, got {value!r}")
    return float(value)


def _tier(inp: float, out: float, cache: tuple[float, ...], common: Mapping[str, Any]) -> Price:
    write_5m, write_1h, read = cache
    base = _exact(inp)
    exact = (base, _exact(out), base * _exact(write_5m), base * _exact(write_1h), base * _exact(read))
    batch, geo = common["exact_batch"], common["exact_us_geo"]
    per_token = tuple(
        tuple(_whole(rate * _PICO_PER_MTOK * factor) for rate in exact)
        for factor in (Fraction(1), geo, batch, batch * geo)
    )
    return Price(
        input=inp,
        output=out,
        cache_write_5m=inp * write_5m,
        cache_write_1h=inp * write_1h,
        cache_read=inp * read,
        exact=exact,
        per_token=per_token,
        **common,
    )


def _whole(value: Fraction) -> int | Fraction:
    return value.numerator if value.denominator == 1 else value


def _info(data: Mapping[str, Any]) -> TableInfo:
    table = data.get("table")
    if not isinstance(table, Mapping) or set(table) != {"date", "source"}:
        raise ValueError("prices.toml: [table] needs exactly date and source")
    date, source = table["date"], table["source"]
    if not isinstance(date, datetime.date) or isinstance(date, datetime.datetime):
        raise ValueError("prices.toml: table.date must be a date (YYYY-MM-DD)")
    if not isinstance(source, str) or not source.strip():
        raise ValueError("prices.toml: table.source must name where the prices come from")
    return TableInfo(date=date.isoformat(), source=source.strip())


def _tool_fees(data: Mapping[str, Any]) -> dict[str, Fraction]:
    tools = data.get("server_tools", {})
    if not isinstance(tools, Mapping) or set(tools) - set(SERVER_TOOLS):
        raise ValueError(f"prices.toml: [server_tools] takes only {list(SERVER_TOOLS)}")
    # USD per 1,000 uses -> pico-USD per use.
    return {key: _exact(_number(tools, key, "server_tools")) * PICO / 1000 for key in tools}


def _parse(data: Mapping[str, Any]) -> _Table:
    """Validate the TOML document and build the lookup table; raise ValueError naming the bad entry."""
    unknown_top = set(data) - _TOP_KEYS
    if unknown_top:
        raise ValueError(f"prices.toml: unknown tables {sorted(unknown_top)}")
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
        us_geo = mult["us_geo_multiplier"] if entry.get("us_geo", False) is True else 1.0
        common: dict[str, Any] = {
            "model": model,
            "name": str(entry.get("name", model)),
            "batch_multiplier": mult["batch_multiplier"],
            "us_geo_multiplier": us_geo,
            "exact_batch": _exact(mult["batch_multiplier"]),
            "exact_us_geo": _exact(us_geo),
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
    return _Table(prices=prices, ids=ids, info=_info(data), tool_fees=_tool_fees(data))


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


def table_info() -> TableInfo:
    """The price table's date and source."""
    return _table().info


def _count(usage: Mapping[str, Any], key: str) -> int:
    # The API sends null for fields that do not apply; anything not a count is treated as none (a bool is
    # not an int here: `type(...) is int`, which is also the fast test: this runs per results line).
    value = usage.get(key)
    return value if type(value) is int and value >= 0 else 0


class TokenCounts(NamedTuple):
    """The billable token counts of one ``usage`` block, cache writes split by TTL."""

    input: int
    output: int
    cache_write_5m: int
    cache_write_1h: int
    cache_read: int
    server_tools: tuple[tuple[str, int], ...] = ()  # (usage.server_tool_use counter, uses)

    @property
    def server_tool_uses(self) -> int:
        return sum(uses for _, uses in self.server_tools)

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
    # `is not None` first: this runs per results line, and an ABC isinstance check costs ~0.5 us.
    if breakdown is not None and isinstance(breakdown, Mapping):
        write_5m = _count(breakdown, "ephemeral_5m_input_tokens")
        write_1h = _count(breakdown, "ephemeral_1h_input_tokens")
        # A total larger than its breakdown: the rest is billed at the 5-minute rate, the API's default TTL.
        write_5m += max(0, write_total - write_5m - write_1h)
    else:
        write_5m, write_1h = write_total, 0
    tools = usage.get("server_tool_use")
    server_tools: tuple[tuple[str, int], ...] = ()
    if tools is not None and isinstance(tools, Mapping):
        server_tools = tuple((key, n) for key in SERVER_TOOLS if (n := _count(tools, key)))
    return TokenCounts(
        input=_count(usage, "input_tokens"),
        output=_count(usage, "output_tokens"),
        cache_write_5m=write_5m,
        cache_write_1h=write_1h,
        cache_read=_count(usage, "cache_read_input_tokens"),
        server_tools=server_tools,
    )


def _round(value: int | Fraction) -> int:
    """Half up, to a whole pico-dollar (a no-op for every figure the table can hold)."""
    if isinstance(value, int):
        return value
    return (2 * value.numerator + value.denominator) // (2 * value.denominator)


def picos(model: str, usage: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(batch_cost, standard_cost)`` of one ``usage`` block in pico-USD; None for an unknown model.

    Every token kind is discounted by the batch multiplier; server-tool fees are per use and are the same in
    a batch (GUESS: the reference says the discount covers "all usage" but names only tokens)."""
    price = price_for(model)
    if price is None:
        return None
    return picos_of(price, token_counts(usage), us_geo=usage.get("inference_geo") == "us")


def picos_of(price: Price, n: TokenCounts, *, us_geo: bool) -> tuple[int, int]:
    """``picos`` for counts already read, at a known price."""
    inp, out, write_5m, write_1h, read = n[:5]
    tier = price.tier(inp + write_5m + write_1h + read)  # n.prompt
    s, b = tier.per_token[1 if us_geo else 0], tier.per_token[3 if us_geo else 2]
    # Written out, not a sum over zip: this runs per results line.
    standard = inp * s[0] + out * s[1] + write_5m * s[2] + write_1h * s[3] + read * s[4]
    batch = inp * b[0] + out * b[1] + write_5m * b[2] + write_1h * b[3] + read * b[4]
    if n.server_tools:
        fees = _table().tool_fees
        tool = sum((uses * fees.get(key, Fraction(0)) for key, uses in n.server_tools), Fraction(0))
        standard, batch = standard + tool, batch + tool
    return _round(batch), _round(standard)


def costs(model: str, usage: Mapping[str, Any]) -> tuple[float, float] | None:
    """``(batch_cost, standard_cost)`` in USD of one Message ``usage`` block; None for an unknown model."""
    both = picos(model, usage)
    if both is None:
        return None
    return both[0] / PICO, both[1] / PICO


def cost_usd(model: str, usage: Mapping[str, Any], *, batch: bool) -> float | None:
    """USD cost of one Message ``usage`` block at batch or standard rates; ``None`` for an unknown model."""
    both = costs(model, usage)
    if both is None:
        return None
    return both[0] if batch else both[1]
