"""Price table and cost arithmetic. Expected figures are worked by hand from the reference's section 7."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from batchd import pricing
from batchd.pricing import cost_usd, costs, known_models, price_for, token_counts

M = 1_000_000


def batch_cost_of(model: str, **usage: Any) -> float:
    cost = cost_usd(model, usage, batch=True)
    assert cost is not None
    return cost


# (model, batch input, batch output, batch 5m write, batch 1h write, batch read) per million tokens: the
# reference table's batch columns, copied as they are printed there.
REFERENCE_BATCH = [
    ("claude-fable-5-1", 5, 25, 6.25, 10, 0.125),
    ("claude-mythos-5-1", 5, 25, 6.25, 10, 0.125),
    ("claude-fable-5", 5, 25, 6.25, 10, 0.50),
    ("claude-mythos-5", 5, 25, 6.25, 10, 0.50),
    ("claude-opus-5-5", 2, 10, 2.50, 4, 0.10),
    ("claude-opus-5", 2.50, 12.50, 3.125, 5, 0.25),
    ("claude-opus-4-8", 2.50, 12.50, 3.125, 5, 0.25),
    ("claude-opus-4-7", 2.50, 12.50, 3.125, 5, 0.25),
    ("claude-opus-4-6", 2.50, 12.50, 3.125, 5, 0.25),
    ("claude-opus-4-5", 2.50, 12.50, 3.125, 5, 0.25),
    ("claude-opus-4-1", 7.50, 37.50, 9.375, 15, 0.75),
    ("claude-opus-4", 7.50, 37.50, 9.375, 15, 0.75),
    ("claude-sonnet-5-5", 1, 5, 1.25, 2, 0.10),
    ("claude-sonnet-5", 1, 5, 1.25, 2, 0.10),
    ("claude-sonnet-4-6", 1.50, 7.50, 1.875, 3, 0.15),
    ("claude-sonnet-4-5", 1.50, 7.50, 1.875, 3, 0.15),
    ("claude-sonnet-4", 1.50, 7.50, 1.875, 3, 0.15),
    ("claude-3-7-sonnet", 1.50, 7.50, 1.875, 3, 0.15),
    ("claude-3-5-sonnet", 1.50, 7.50, 1.875, 3, 0.15),
    ("claude-haiku-4-5", 0.50, 2.50, 0.625, 1, 0.05),
    ("claude-3-5-haiku", 0.40, 2, 0.50, 0.80, 0.04),
]


@pytest.mark.parametrize(("model", "inp", "out", "w5m", "w1h", "read"), REFERENCE_BATCH)
def test_batch_prices_match_reference_table(
    model: str, inp: float, out: float, w5m: float, w1h: float, read: float
) -> None:
    assert batch_cost_of(model, input_tokens=M) == pytest.approx(inp)
    assert batch_cost_of(model, output_tokens=M) == pytest.approx(out)
    assert batch_cost_of(model, cache_creation_input_tokens=M) == pytest.approx(w5m)
    assert batch_cost_of(
        model,
        cache_creation_input_tokens=M,
        cache_creation={"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": M},
    ) == pytest.approx(w1h)
    assert batch_cost_of(model, cache_read_input_tokens=M) == pytest.approx(read)


@pytest.mark.parametrize(
    ("model", "inp", "out"),
    [("claude-3-haiku", 0.125, 0.625), ("claude-3-opus", 7.50, 37.50)],
)
def test_batch_prices_without_cache_columns(model: str, inp: float, out: float) -> None:
    assert batch_cost_of(model, input_tokens=M) == pytest.approx(inp)
    assert batch_cost_of(model, output_tokens=M) == pytest.approx(out)


def test_every_reference_model_is_priced() -> None:
    expected = {row[0] for row in REFERENCE_BATCH} | {"claude-3-haiku", "claude-3-opus", "claude-haiku-5-5"}
    assert expected == set(known_models())


def test_standard_is_twice_batch_for_every_model() -> None:
    usage = {
        "input_tokens": 1234,
        "output_tokens": 567,
        "cache_creation_input_tokens": 89,
        "cache_read_input_tokens": 4321,
    }
    for model in known_models():
        both = costs(model, usage)
        assert both is not None
        batch, standard = both
        assert standard == pytest.approx(2 * batch)
        assert cost_usd(model, usage, batch=True) == batch
        assert cost_usd(model, usage, batch=False) == standard


def test_mixed_usage_haiku_4_5_dated_id() -> None:
    # 1000 in x $1 + 500 out x $5 + 2000 5m writes x $1.25 + 10000 reads x $0.10 = 7000 micro-USD standard.
    usage = {
        "input_tokens": 1000,
        "output_tokens": 500,
        "cache_creation_input_tokens": 2000,
        "cache_read_input_tokens": 10_000,
    }
    assert costs("claude-haiku-4-5-20251001", usage) == pytest.approx((0.0035, 0.007))


def test_real_result_line_usage() -> None:
    # The captured Sonnet 4.5 message in the reference: 10 in x $3 + 12 out x $15 = 210 micro-USD standard.
    usage = {
        "input_tokens": 10,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 12,
        "service_tier": "batch",
        "inference_geo": "not_available",
    }
    assert costs("claude-sonnet-4-5-20250929", usage) == pytest.approx((0.000105, 0.00021))


def test_cache_breakdown_is_used_and_any_remainder_is_5m() -> None:
    # Haiku 4.5: 1h x $2.00, 5m x $1.25.
    split = {"cache_creation_input_tokens": 3000, "cache_creation": {"ephemeral_1h_input_tokens": 3000}}
    assert cost_usd("claude-haiku-4-5", split, batch=False) == pytest.approx(0.006)
    # 3000 total, breakdown accounts for 1000 (1h): the other 2000 are 5m -> 2000 x 1.25 + 1000 x 2 = 4500.
    partial = {
        "cache_creation_input_tokens": 3000,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 1000},
    }
    assert cost_usd("claude-haiku-4-5", partial, batch=False) == pytest.approx(0.0045)
    # No breakdown: all 5m.
    assert cost_usd("claude-haiku-4-5", {"cache_creation_input_tokens": 3000}, batch=False) == pytest.approx(
        0.00375
    )


def test_cache_read_exceptions() -> None:
    # Opus 5.5 reads at 0.05x of $4; Fable/Mythos 5.1 at 0.025x of $10; Opus 5 at the usual 0.1x of $5.
    assert cost_usd("claude-opus-5-5", {"cache_read_input_tokens": M}, batch=False) == pytest.approx(0.20)
    assert cost_usd("claude-fable-5-1", {"cache_read_input_tokens": M}, batch=False) == pytest.approx(0.25)
    assert cost_usd("claude-mythos-5-1", {"cache_read_input_tokens": M}, batch=False) == pytest.approx(0.25)
    assert cost_usd("claude-opus-5", {"cache_read_input_tokens": M}, batch=False) == pytest.approx(0.50)


def test_us_inference_geo_applies_to_4_6_and_newer_only() -> None:
    us = {"input_tokens": M, "output_tokens": M, "inference_geo": "us"}
    # Sonnet 4.6: ($3 + $15) x 1.1 = $19.80 standard, $9.90 batch.
    assert costs("claude-sonnet-4-6", us) == pytest.approx((9.90, 19.80))
    # Haiku 4.5 predates data residency: no premium.
    assert costs("claude-haiku-4-5", us) == pytest.approx((3.0, 6.0))
    assert costs("claude-sonnet-4-6", {**us, "inference_geo": "global"}) == pytest.approx((9.0, 18.0))


def test_haiku_5_5_long_prompt_tier() -> None:
    # Up to 100K prompt tokens: $0.10 in / $0.50 out. 100,000 x 0.10 + 1000 x 0.50 = 10,500 micro-USD.
    assert cost_usd("claude-haiku-5-5", {"input_tokens": 100_000, "output_tokens": 1000}, batch=False) == (
        pytest.approx(0.0105)
    )
    assert cost_usd("claude-haiku-5-5", {"input_tokens": 100_000}, batch=True) == pytest.approx(0.005)
    # Over it, the whole request at $0.50 / $2.50: 100,001 x 0.5 + 1000 x 2.5 = 52,500.5 micro-USD.
    assert cost_usd("claude-haiku-5-5", {"input_tokens": 100_001, "output_tokens": 1000}, batch=False) == (
        pytest.approx(0.0525005)
    )
    # Cache reads count toward the prompt: 50,000 in + 60,000 read -> long tier; reads at 0.1 x $0.50.
    usage = {"input_tokens": 50_000, "cache_read_input_tokens": 60_000}
    assert cost_usd("claude-haiku-5-5", usage, batch=False) == pytest.approx(
        (50_000 * 0.5 + 60_000 * 0.05) / M
    )


@pytest.mark.parametrize(
    ("model", "base"),
    [
        ("claude-haiku-4-5", "claude-haiku-4-5"),
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
        ("claude-opus-4-5-20251101", "claude-opus-4-5"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1"),
        ("claude-opus-4-20250514", "claude-opus-4"),
        ("claude-opus-4-0", "claude-opus-4"),
        ("claude-sonnet-4-0", "claude-sonnet-4"),
        ("claude-3-5-sonnet-latest", "claude-3-5-sonnet"),
        ("claude-3-5-haiku-20241022", "claude-3-5-haiku"),
        ("claude-3-haiku-20240307", "claude-3-haiku"),
        ("claude-sonnet-4-5@20250929", "claude-sonnet-4-5"),
    ],
)
def test_ids_resolve_to_base(model: str, base: str) -> None:
    price = price_for(model)
    assert price is not None
    assert price.model == base


@pytest.mark.parametrize(
    "model",
    [
        "gpt-4o",
        "",
        "claude-opus-4-9",
        "claude-fable-5-2",
        "claude-haiku-4-5-fast",
        "claude-haiku-4",
        "claude",
    ],
)
def test_unknown_models_cost_nothing_known(model: str) -> None:
    assert price_for(model) is None
    assert cost_usd(model, {"input_tokens": 10}, batch=True) is None
    assert costs(model, {"input_tokens": 10}) is None


def test_nulls_and_junk_in_usage_count_as_zero() -> None:
    usage: dict[str, Any] = {
        "input_tokens": 1000,
        "output_tokens": None,
        "cache_creation_input_tokens": None,
        "cache_read_input_tokens": True,  # not a count
        "cache_creation": None,
    }
    assert cost_usd("claude-haiku-4-5", usage, batch=False) == pytest.approx(0.001)
    assert cost_usd("claude-haiku-4-5", {}, batch=True) == 0.0


def test_token_counts() -> None:
    n = token_counts(
        {
            "input_tokens": 5,
            "output_tokens": 7,
            "cache_creation_input_tokens": 30,
            "cache_creation": {"ephemeral_5m_input_tokens": 10, "ephemeral_1h_input_tokens": 20},
            "cache_read_input_tokens": 100,
        }
    )
    assert (n.input, n.output, n.cache_write_5m, n.cache_write_1h, n.cache_read) == (5, 7, 10, 20, 100)
    assert n.cache_write == 30
    assert n.prompt == 135


def test_price_is_derived_from_multipliers() -> None:
    price = price_for("claude-opus-5-5")
    assert price is not None
    assert (price.input, price.output) == (4.0, 20.0)
    assert price.cache_write_5m == pytest.approx(5.0)
    assert price.cache_write_1h == pytest.approx(8.0)
    assert price.cache_read == pytest.approx(0.2)
    assert price.batch_multiplier == 0.5
    assert price.us_geo_multiplier == pytest.approx(1.1)


DEFAULTS = {"cache_write_5m": 1.25, "cache_write_1h": 2.0, "cache_read": 0.1, "batch_multiplier": 0.5}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"defaults": DEFAULTS, "models": {}}, r"\[defaults\]"),
        (
            {"defaults": {**DEFAULTS, "us_geo_multiplier": 1.1}, "models": {"m": {"input": -1, "output": 1}}},
            "models.m.input",
        ),
        (
            {
                "defaults": {**DEFAULTS, "us_geo_multiplier": 1.1},
                "models": {"m": {"input": 1, "output": 1, "x": 1}},
            },
            "unknown keys",
        ),
        (
            {
                "defaults": {**DEFAULTS, "us_geo_multiplier": 1.1},
                "models": {"a": {"input": 1, "output": 1}, "b": {"input": 1, "output": 1, "aliases": ["a"]}},
            },
            "listed twice",
        ),
        (
            {
                "defaults": {**DEFAULTS, "us_geo_multiplier": 1.1},
                "models": {"m": {"input": True, "output": 1}},
            },
            "models.m.input",
        ),
    ],
)
def test_bad_price_files_are_refused(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pricing._parse(doc)


# --- exact pico-dollar figures, the table's date and source, server tools ----------------------------------


def test_picos_are_exact_and_batch_is_exactly_half() -> None:
    # Fable 5.1 reads at 0.025 x $10 = $0.25/M standard, $0.125/M batch: 125,000 pico-USD a token in a batch.
    both = pricing.picos("claude-fable-5-1", {"cache_read_input_tokens": 3})
    assert both == (375_000, 750_000)
    for model in known_models():
        usage = {"input_tokens": 1231, "output_tokens": 77, "cache_read_input_tokens": 4321}
        batch, standard = pricing.picos(model, usage) or (0, 0)
        assert 2 * batch == standard, model


def test_us_geo_premium_stays_exact_in_picos() -> None:
    # Fable 5.1 cache read in a batch: $0.125/M x 1.1 = $0.1375/M = 137,500 pico-USD a token.
    assert pricing.picos("claude-fable-5-1", {"cache_read_input_tokens": 1, "inference_geo": "us"}) == (
        137_500,
        275_000,
    )


def test_server_tool_uses_are_priced_per_use_and_not_discounted() -> None:
    usage = {"input_tokens": 1000, "server_tool_use": {"web_search_requests": 3, "web_fetch_requests": 2}}
    # Haiku 4.5: 1000 x $1/M = $0.001 standard; 3 searches x $10/1000 = $0.03 either way; fetches are free.
    assert costs("claude-haiku-4-5", usage) == pytest.approx((0.0005 + 0.03, 0.001 + 0.03))
    counts = token_counts(usage)
    assert dict(counts.server_tools) == {"web_search_requests": 3, "web_fetch_requests": 2}
    assert counts.server_tool_uses == 5


def test_the_table_keeps_its_date_and_source() -> None:
    info = pricing.table_info()
    assert info.date == "2026-11-30"
    assert "Pricing" in info.source


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (None, r"\[table\]"),
        ({"date": "2026-11-30", "source": "x"}, "must be a date"),
        ({"date": datetime.date(2026, 11, 30), "source": " "}, "must name"),
    ],
)
def test_a_table_without_its_date_and_source_is_refused(table: Any, message: str) -> None:
    doc: dict[str, Any] = {"defaults": {**DEFAULTS, "us_geo_multiplier": 1.1}, "models": {}}
    if table is not None:
        doc["table"] = table
    with pytest.raises(ValueError, match=message):
        pricing._parse(doc)
