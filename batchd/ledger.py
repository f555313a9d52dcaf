"""The cost ledger's Python side: what a billed answer adds (``charge_of``), what a request is expected to
cost (``estimate``, for the budgets), the budgets in force, and the ``batchd costs`` report.

The bookkeeping itself is done in Lua next to the delivery (``store/lua/deliver.lua``, ``_ledger.lua``):
every succeeded line is charged once per custom id, at the price it was billed, with the standard-price
cost it avoided, in one bucket per UTC day x model x tag set. Prices are worked here in pico-USD
(``pricing.picos``) so the scripts only add integers.
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from . import pricing
from .promptcache import TTL_1H, Prefix
from .settings import Settings
from .store import BudgetLimits, Charge, LedgerRow, Store

__all__ = [
    "Totals",
    "budget_limits",
    "charge_of",
    "costs_report",
    "estimate",
    "format_report",
    "model_label",
    "parse_day",
    "realtime_charge_of",
    "summarize",
    "usd",
]

Grouping = Literal["model", "tag", "day"]
_MODEL_CHARS = re.compile(r"[^A-Za-z0-9._@:-]")
# A conservative tokens-per-byte for the estimate: English prose runs ~4 bytes a token, code and non-Latin
# scripts nearer 3 (a CJK character is 3 UTF-8 bytes and about one token), JSON framing adds bytes.
_BYTES_PER_TOKEN = 3
UNTAGGED = "(untagged)"


def usd(picos: int) -> float:
    return picos / pricing.PICO


def model_label(model: object) -> str:
    """The ledger's model: the price table's base id, else the id as sent (bounded: 64 safe characters)."""
    name = str(model or "unknown")
    price = pricing.price_for(name)
    if price is not None:
        return price.model
    return _MODEL_CHARS.sub("_", name)[:64] or "unknown"


def charge_of(message: Mapping[str, Any]) -> Charge:
    """What one succeeded answer (its Message) adds to the ledger, at batch prices."""
    model = str(message.get("model") or "")
    usage = message.get("usage")
    # `type(...) is dict` first: this runs per results line, and an ABC isinstance check costs ~0.5 us.
    usage = usage if type(usage) is dict or isinstance(usage, Mapping) else {}
    counts = pricing.token_counts(usage)
    price = pricing.price_for(model)
    both = (
        None if price is None else pricing.picos_of(price, counts, us_geo=usage.get("inference_geo") == "us")
    )
    cost, standard = both if both is not None else (0, 0)
    return Charge(
        price.model if price is not None else model_label(model),
        counts.input,
        counts.output,
        counts.cache_write_5m,
        counts.cache_write_1h,
        counts.cache_read,
        counts.server_tool_uses if counts.server_tools else 0,
        cost,
        standard,
        both is not None,
    )


def realtime_charge_of(message: Mapping[str, Any]) -> Charge:
    """What a real-time answer (Messages API, standard prices) adds: it cost its standard price, so it saved
    nothing (answer_realtime.lua adds it to the ledger)."""
    batch = charge_of(message)
    return batch._replace(cost=batch.standard)


def estimate(params: Mapping[str, Any], body_bytes: int, prefix: Prefix | None) -> int:
    """A request's most likely-high cost at batch prices, in pico-USD: its body's bytes as input tokens
    (at the cache-write price when it has a breakpoint, the dearest case) plus ``max_tokens`` of output.
    0 for a model the price table does not know (no budget can hold it)."""
    price = pricing.price_for(str(params.get("model") or ""))
    max_tokens = params.get("max_tokens")
    if price is None or not isinstance(max_tokens, int):
        return 0
    tokens_in = -(-body_bytes // _BYTES_PER_TOKEN)
    tier = price.tier(tokens_in)
    # Batch prices per token (US-geo when asked), whole pico-dollars for every figure the table holds.
    inp, out, write_5m, write_1h, _ = tier.per_token[3 if params.get("inference_geo") == "us" else 2]
    rate_in = inp if prefix is None else max(inp, write_1h if prefix.ttl >= TTL_1H else write_5m)
    return math.ceil(tokens_in * rate_in + max_tokens * out)


def budget_limits(settings: Settings) -> BudgetLimits:
    """The budgets of these settings in pico-USD."""

    def picos(value: float) -> int:
        return round(value * pricing.PICO)

    daily = settings.daily_budget_usd
    return BudgetLimits(
        daily=None if daily is None else picos(daily),
        tags={scope: picos(value) for scope, value in settings.tag_budgets_usd.items()},
    )


# --- the report (batchd costs) --------------------------------------------------------------------------


@dataclass
class Totals:
    """Ledger rows summed (pico-USD)."""

    requests: int = 0
    reused: int = 0
    undelivered: int = 0
    unpriced: int = 0
    tokens: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read"), 0
        )
    )
    server_tool_uses: int = 0
    cost: int = 0
    standard: int = 0
    reused_standard: int = 0

    def add(self, row: LedgerRow) -> None:
        self.requests += row.requests
        self.reused += row.reused
        self.undelivered += row.undelivered
        self.unpriced += row.unpriced
        for name in self.tokens:
            self.tokens[name] += getattr(row, name)
        self.server_tool_uses += row.server_tool_uses
        self.cost += row.cost
        self.standard += row.standard
        self.reused_standard += row.reused_standard

    @property
    def savings(self) -> int:
        """Against sending the same requests to the Messages API at standard prices: the batch discount,
        plus every answer reused instead of paid for again."""
        return self.standard - self.cost + self.reused_standard

    @property
    def cache_hit_rate(self) -> float | None:
        """Cache reads over all cacheable input tokens (reads and writes); None without any."""
        cached = self.tokens["cache_read"] + self.tokens["cache_write_5m"] + self.tokens["cache_write_1h"]
        return self.tokens["cache_read"] / cached if cached else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "reused_requests": self.reused,
            "undelivered_requests": self.undelivered,
            "unpriced_requests": self.unpriced,
            "tokens": dict(self.tokens),
            "server_tool_uses": self.server_tool_uses,
            "cost_usd": usd(self.cost),
            "standard_usd": usd(self.standard),
            "savings_usd": usd(self.savings),
            "cache_hit_rate": self.cache_hit_rate,
        }


def parse_day(value: str, *, now: datetime.datetime | None = None) -> str:
    """A ``--since``/``--until`` value as a UTC day: YYYY-MM-DD, an RFC 3339 time (its UTC day), "today",
    "yesterday", or N days ago as "Nd". ValueError otherwise."""
    now = now or datetime.datetime.now(datetime.UTC)
    text = value.strip().lower()
    if text == "today":
        return now.date().isoformat()
    if text == "yesterday":
        return (now - datetime.timedelta(days=1)).date().isoformat()
    if re.fullmatch(r"\d{1,4}d", text):
        return (now - datetime.timedelta(days=int(text[:-1]))).date().isoformat()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return datetime.date.fromisoformat(text).isoformat()
    try:
        when = datetime.datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"{value!r} is not a day: use YYYY-MM-DD, an RFC 3339 time, today, yesterday or Nd (N days ago)"
        ) from None
    if when.tzinfo is None:
        raise ValueError(f"{value!r}: an RFC 3339 time needs a zone (Z or +hh:mm)")
    return when.astimezone(datetime.UTC).date().isoformat()


def _keys(row: LedgerRow, by: Grouping | None, tag_sets: Mapping[str, str]) -> Sequence[str]:
    if by == "model":
        return [row.model]
    if by == "day":
        return [row.day]
    if by == "tag":
        canonical = tag_sets.get(row.tag_set, "") if row.tag_set else ""
        return canonical.split(",") if canonical else [UNTAGGED]
    return ["total"]


def summarize(
    rows: Iterable[LedgerRow], by: Grouping | None, tag_sets: Mapping[str, str]
) -> tuple[Totals, dict[str, Totals]]:
    total = Totals()
    groups: dict[str, Totals] = {}
    for row in rows:
        total.add(row)
        if by is not None:
            for key in _keys(row, by, tag_sets):
                groups.setdefault(key, Totals()).add(row)
    return total, dict(sorted(groups.items()))


async def costs_report(
    store: Store, *, since: str | None = None, until: str | None = None, by: Grouping | None = None
) -> dict[str, Any]:
    """What ``batchd costs --json`` prints: the total over the days in range, and one row per group."""
    days = [
        d
        for d in await store.ledger_days()
        if (since is None or d >= since) and (until is None or d <= until)
    ]
    rows = await store.ledger_rows(days)
    tag_sets = await store.tag_sets() if by == "tag" else {}
    total, groups = summarize(rows, by, tag_sets)
    info = pricing.table_info()
    report: dict[str, Any] = {
        "since": since,
        "until": until,
        "days": days,
        "by": by,
        "prices": {"date": info.date, "source": info.source},
        "total": total.as_dict(),
    }
    if by is not None:
        report["rows"] = [{by: key, **totals.as_dict()} for key, totals in groups.items()]
    return report


def _money(value: float) -> str:
    return f"${value:,.6f}" if abs(value) < 1 else f"${value:,.2f}"


def format_report(report: Mapping[str, Any]) -> str:
    """The report as a table for people."""
    days = report["days"]
    span = f"{days[0]} .. {days[-1]}" if days else "no days recorded"
    lines = [f"costs {span} (UTC days; prices of {report['prices']['date']})"]
    by = report.get("by")
    entries = [(str(r[by]), r) for r in report.get("rows", [])] if by else []
    entries.append(("total", report["total"]))
    width = max(len(name) for name, _ in entries)
    head = f"{by or '':<{width}}  {'requests':>9}  {'reused':>7}  {'tokens in':>11}  {'tokens out':>11}"
    head += f"  {'cost':>14}  {'savings':>14}  {'cache hits':>10}"
    lines.append(head)
    for name, row in entries:
        tokens = row["tokens"]
        prompt = tokens["input"] + tokens["cache_write_5m"] + tokens["cache_write_1h"] + tokens["cache_read"]
        rate = row["cache_hit_rate"]
        lines.append(
            f"{name:<{width}}  {row['requests']:>9,}  {row['reused_requests']:>7,}  {prompt:>11,}  "
            f"{tokens['output']:>11,}  {_money(row['cost_usd']):>14}  {_money(row['savings_usd']):>14}  "
            f"{'-' if rate is None else f'{rate:.1%}':>10}"
        )
    if by == "tag":
        lines.append("(a request with several tags counts in each of their rows)")
    return "\n".join(lines)
