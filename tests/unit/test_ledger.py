"""The Python side of spend: tags, prompt-cache prefixes, what an answer is charged, estimates, budgets at
submit (through the client on fakeredis), the costs report, and the front's 429 for an over-budget request.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import orjson
import pytest

from batchd import BudgetExceeded, InvalidParams
from batchd.client import AsyncClient
from batchd.emulator.answers import prompt_tokens
from batchd.ledger import (
    budget_limits,
    charge_of,
    estimate,
    format_report,
    parse_day,
    realtime_charge_of,
    summarize,
)
from batchd.promptcache import TTL_1H, TTL_5M, cache_prefix, with_ttl_1h
from batchd.settings import load_settings
from batchd.store import LedgerRow, utc_day
from batchd.tags import parse_tags
from batchd.translate import api_error_for

SYSTEM = "You are a careful assistant. " * 50


def cached(question: str, *, ttl: str | None = None, model: str = "claude-haiku-4-5") -> dict[str, Any]:
    control: dict[str, str] = {"type": "ephemeral", **({"ttl": ttl} if ttl else {})}
    return {
        "model": model,
        "max_tokens": 100,
        "system": [{"type": "text", "text": SYSTEM, "cache_control": control}],
        "messages": [{"role": "user", "content": question}],
    }


# --- tags ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tags", "problem"),
    [
        ({"team search": "x"}, "tag name 'team search'"),
        ({"team": "a b"}, "team='a b'"),
        ({"team": ""}, "team=''"),
        ({"t" * 33: "x"}, "is not allowed"),
        ({"team": "v" * 65}, "is not allowed"),
        ({f"k{i}": "v" for i in range(9)}, "9 tags; at most 8"),
        ({"team": 3}, "team: a tag value must be a string, not int"),
        (["team=search"], "must be a mapping"),
    ],
)
def test_bad_tags_are_refused_naming_the_problem(tags: Any, problem: str) -> None:
    with pytest.raises(InvalidParams, match="tags: ") as info:
        parse_tags(tags)
    assert problem in str(info.value)


def test_tags_are_sorted_and_scoped() -> None:
    tags = parse_tags({"team": "search", "env": "prod/eu"})
    assert tags.items == (("env", "prod/eu"), ("team", "search"))
    assert tags.scopes == ("env=prod/eu", "team=search")
    assert parse_tags(None).canonical == ""


# --- prompt-cache prefixes -------------------------------------------------------------------------------
def test_requests_sharing_the_content_up_to_the_breakpoint_share_a_prefix() -> None:
    a, b = cache_prefix(cached("one")), cache_prefix(cached("two"))
    assert a is not None and b is not None
    assert a.id == b.id and a.ttl == TTL_5M
    # The marker's TTL is not part of the prefix; the model and the content are.
    one_hour = cache_prefix(cached("one", ttl="1h"))
    assert one_hour is not None and (one_hour.id, one_hour.ttl) == (a.id, TTL_1H)
    assert cache_prefix(cached("one", model="claude-sonnet-4-5")) != a
    assert cache_prefix({**cached("x"), "system": SYSTEM}) is None  # no breakpoint


def test_the_prefix_follows_the_apis_order_and_a_top_level_breakpoint() -> None:
    tool = {"name": "t", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}}
    base = {"model": "m", "max_tokens": 5, "tools": [tool]}
    first = cache_prefix({**base, "messages": [{"role": "user", "content": "a"}]})
    second = cache_prefix({**base, "messages": [{"role": "user", "content": "b"}]})
    assert first is not None and first == second  # the breakpoint is on the tool, before the messages
    whole = {**base, "cache_control": {"type": "ephemeral"}}
    assert cache_prefix({**whole, "messages": [{"role": "user", "content": "a"}]}) != cache_prefix(
        {**whole, "messages": [{"role": "user", "content": "b"}]}
    )


def test_with_ttl_1h_raises_every_breakpoint_and_keeps_the_input() -> None:
    params = cached("q")
    params["messages"] = [{"role": "user", "content": [{"type": "text", "text": "q", "cache_control": {}}]}]
    params["cache_control"] = {"type": "ephemeral"}
    raised = with_ttl_1h(params)
    assert raised["system"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    assert raised["messages"][0]["content"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    assert raised["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    assert params["system"][0]["cache_control"] == {"type": "ephemeral"}


# --- what an answer is charged, and what a request is expected to cost -----------------------------------
def test_an_answer_is_charged_at_batch_prices_with_its_standard_cost() -> None:
    message = {
        "model": "claude-haiku-4-5-20251001",
        "usage": {
            "input_tokens": 100,
            "output_tokens": 10,
            "cache_creation_input_tokens": 300,
            "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
            "cache_read_input_tokens": 1000,
        },
    }
    charge = charge_of(message)
    # Haiku 4.5 in a batch: $0.50/M in, $2.50/M out, $0.625/M 5m write, $1/M 1h write, $0.05/M read.
    picos = 100 * 500_000 + 10 * 2_500_000 + 100 * 625_000 + 200 * 1_000_000 + 1000 * 50_000
    assert (charge.model, charge.cost, charge.standard, charge.cache_write_1h) == (
        "claude-haiku-4-5",
        picos,
        2 * picos,
        200,
    )
    assert realtime_charge_of(message).cost == 2 * picos
    unknown = charge_of({"model": "made|up model", "usage": {"input_tokens": 5}})
    assert (unknown.model, unknown.priced, unknown.cost, unknown.input) == ("made_up_model", False, 0, 5)


def test_the_estimate_is_never_below_what_the_emulator_bills() -> None:
    for params in (cached("short"), cached("x" * 5000), {**cached("q"), "max_tokens": 4000}):
        body = orjson.dumps(params)
        guess = estimate(params, len(body), cache_prefix(params))
        tokens, _ = prompt_tokens(params)
        # The dearest the emulator can bill: every input token as a cache write, max_tokens of output.
        worst = tokens * 625_000 + params["max_tokens"] * 2_500_000
        assert guess >= worst
    assert estimate({"model": "nope", "max_tokens": 5}, 100, None) == 0


def test_budgets_from_settings_in_picos() -> None:
    limits = budget_limits(load_settings(daily_budget_usd=12.5, tag_budgets_usd={"team=search": 0.25}))
    assert (limits.daily, dict(limits.tags)) == (12_500_000_000_000, {"team=search": 250_000_000_000})
    assert budget_limits(load_settings()).daily is None


# --- the report ------------------------------------------------------------------------------------------
def test_parse_day_takes_dates_times_and_relative_days() -> None:
    now = datetime.datetime(2026, 12, 3, 1, 0, tzinfo=datetime.UTC)
    assert parse_day("2026-11-30", now=now) == "2026-11-30"
    assert parse_day("2026-12-02T23:30:00-02:00", now=now) == "2026-12-03"
    assert parse_day("today", now=now) == "2026-12-03"
    assert parse_day("yesterday", now=now) == "2026-12-02"
    assert parse_day("7d", now=now) == "2026-11-26"
    for bad in ("soon", "2026-12-02T10:00:00", "2026-13-01"):
        with pytest.raises(ValueError):
            parse_day(bad, now=now)


def test_summaries_by_model_tag_and_day() -> None:
    team, both = parse_tags({"team": "a"}), parse_tags({"team": "b", "env": "prod"})
    rows = [
        LedgerRow(
            "2026-12-01", "m1", team.id, requests=2, cost=10, standard=20, cache_read=30, cache_write_5m=10
        ),
        LedgerRow("2026-12-01", "m2", both.id, requests=1, cost=5, standard=10),
        LedgerRow("2026-12-02", "m1", "", requests=1, cost=1, standard=2, reused=3, reused_standard=6),
    ]
    tag_sets = {team.id: team.canonical, both.id: both.canonical}
    total, _ = summarize(rows, None, tag_sets)
    assert (total.requests, total.cost, total.savings, total.cache_hit_rate) == (4, 16, 16 + 6, 0.75)
    _, by_tag = summarize(rows, "tag", tag_sets)
    assert {k: v.requests for k, v in by_tag.items()} == {
        "(untagged)": 1,
        "env=prod": 1,
        "team=a": 2,
        "team=b": 1,
    }
    _, by_day = summarize(rows, "day", tag_sets)
    assert {k: v.cost for k, v in by_day.items()} == {"2026-12-01": 15, "2026-12-02": 1}
    _, by_model = summarize(rows, "model", tag_sets)
    assert {k: v.reused for k, v in by_model.items()} == {"m1": 3, "m2": 0}


def test_the_report_prints_as_a_table() -> None:
    total, groups = summarize([LedgerRow("2026-12-01", "m1", "", requests=2, cost=10**12)], "model", {})
    report = {
        "days": ["2026-12-01"],
        "by": "model",
        "prices": {"date": "2026-11-30", "source": "s"},
        "total": total.as_dict(),
        "rows": [{"model": k, **v.as_dict()} for k, v in groups.items()],
    }
    text = format_report(report)
    assert "2026-12-01" in text and "m1" in text and "$1.00" in text


# --- budgets at submit, through the client ---------------------------------------------------------------
@pytest.fixture
async def fake() -> AsyncIterator[fakeredis.FakeAsyncRedis]:
    client = fakeredis.FakeAsyncRedis()
    try:
        yield client
    finally:
        await client.aclose()


async def test_the_client_refuses_over_budget_naming_the_budget_and_queues_what_fits(
    fake: fakeredis.FakeAsyncRedis,
) -> None:
    one = cached("q")
    each = estimate(one, len(orjson.dumps(one)), cache_prefix(one)) / 10**12
    settings = load_settings(tag_budgets_usd={"team=search": each * 2.5})
    async with AsyncClient(settings=settings, redis=fake) as client:
        with pytest.raises(BudgetExceeded) as info:
            await client.submit_many([one] * 4, ["a", "b", "c", "d"], tags={"team": "search"})
        error = info.value
        assert (error.scope, error.day, error.accepted) == ("team=search", utc_day(_now_ms()), ["a", "b"])
        assert error.estimate_usd == pytest.approx(each) and error.spent_usd == pytest.approx(2 * each)
        assert "the daily budget of tag team=search would be exceeded" in str(error)
        # Untagged requests are not under that budget.
        assert await client.submit(one, "e")
        with pytest.raises(InvalidParams, match="tags: "):
            await client.submit(one, "f", tags={"bad key": "x"})
        assert not await fake.exists(client._store.keys.request("f"))


async def test_messages_create_takes_tags_and_dedupe(fake: fakeredis.FakeAsyncRedis) -> None:
    from batchd.messages import prepare_call

    call = await prepare_call(
        {**cached("q"), "tags": {"team": "search"}, "dedupe": True}, default_timeout=1.0
    )
    assert (call.tags.canonical, call.dedupe) == ("team=search", True)
    assert "tags" not in call.params and "dedupe" not in call.params
    with pytest.raises(InvalidParams, match="dedupe"):
        await prepare_call({**cached("q"), "dedupe": "yes"}, default_timeout=1.0)


def test_over_budget_is_a_429_in_the_apis_shape_that_the_sdk_does_not_retry() -> None:
    error = api_error_for(
        BudgetExceeded("*", day="2026-12-01", spent_usd=1.0, estimate_usd=0.5, limit_usd=1.2)
    )
    assert (error.status, error.error_type) == (429, "rate_limit_error")
    assert error.headers["x-should-retry"] == "false"
    assert 0 < int(error.headers["retry-after"]) <= 86_401
    assert error.envelope("req_1")["error"]["message"].startswith("the global daily budget would be exceeded")


def _now_ms() -> int:
    from batchd.store import now_ms

    return now_ms()


async def test_cache_ttl_1h_raises_the_breakpoints_of_what_is_queued(fake: fakeredis.FakeAsyncRedis) -> None:
    settings = load_settings(cache_ttl_1h=True)
    async with AsyncClient(settings=settings, redis=fake) as client:
        rid = await client.submit(cached("q"))
        body = await fake.hget(client._store.keys.request(rid), "body")
        fields = await fake.hmget(client._store.keys.request(rid), ["pfx", "pttl"])
    assert orjson.loads(body)["system"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    prefix = cache_prefix(cached("q"))
    assert prefix is not None and fields == [prefix.id.encode(), b"3600"]
