"""The spend side of the Lua scripts: the ledger (every billed line charged once), the budgets (reserved at
enqueue, settled by the final line, released when nothing was billed), dedupe (followers and stored answers),
and the prompt-cache prefix state. Through the typed callers, on fakeredis and on a real redis-server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import orjson
import pytest
import redis.asyncio as aioredis

from batchd.store import (
    BudgetLimits,
    BudgetRefused,
    CancelOutcome,
    Charge,
    DeliverOutcome,
    DeliverReply,
    Delivery,
    EnqueueOutcome,
    IntakeEntry,
    Keys,
    LedgerRow,
    NewRequest,
    RequestState,
    Store,
    Trigger,
    custom_id_for,
    utc_day,
)
from batchd.store.scripts import BUDGET_TTL_S
from batchd.tags import TagSet, parse_tags
from tests.redis_server import RedisServer

K = Keys()
NOW = 1_700_000_000_000  # 2023-11-14 UTC
DAY = utc_day(NOW)
TTL = 3600
BIG = 10**12
TEAM = parse_tags({"team": "search"})
CHARGE = Charge("claude-haiku-4-5", input=10, output=20, cost=55_000_000, standard=110_000_000)


def params(text: str = "hi") -> bytes:
    return orjson.dumps(
        {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": text}]}
    )


def line_for(rid: str, attempt: int, result: dict[str, Any]) -> bytes:
    return orjson.dumps({"custom_id": custom_id_for(rid, attempt), "result": result})


SUCCEEDED = {"type": "succeeded", "message": {"id": "msg_1"}}
EXPIRED = {"type": "expired"}
ERRORED = {"type": "errored", "error": {"type": "error", "error": {"type": "invalid_request_error"}}}


@pytest.fixture(params=["fakeredis", "redis-server"])
async def r(request: pytest.FixtureRequest) -> AsyncIterator[aioredis.Redis]:
    client: aioredis.Redis
    if request.param == "fakeredis":
        client = fakeredis.FakeAsyncRedis()
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        client = aioredis.Redis.from_url(request.getfixturevalue("redis_url"))
        assert server.running
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def store(r: aioredis.Redis) -> Store:
    s = Store(r, K)
    await s.intake.ensure_group()
    return s


def req(rid: str, text: str = "hi", **fields: Any) -> NewRequest:
    return NewRequest(rid, params(text), **fields)


async def enqueue(
    store: Store, *requests: NewRequest, budgets: BudgetLimits | None = None, now: int = NOW
) -> list[EnqueueOutcome] | Any:
    return await store.scripts.enqueue(
        requests,
        now_ms=now,
        max_requests=BIG,
        max_bytes=BIG,
        budgets=budgets or BudgetLimits(),
        result_ttl=TTL,
    )


async def flush(store: Store, fid: str = "f1") -> list[IntakeEntry]:
    entries = await store.intake.read_new("c1", count=10_000, block_ms=None)
    await store.scripts.commit_flush(fid, [e.entry_id for e in entries], [e.rid for e in entries], now_ms=NOW)
    await store.scripts.seal_flush(fid, Trigger.COUNT, now_ms=NOW)
    return entries


async def deliver(
    store: Store,
    rid: str,
    attempt: int,
    result: dict[str, Any],
    *,
    charge: Charge | None = None,
    retry: bool = False,
    batch: str = "b1",
    window: int = 0,
) -> DeliverReply:
    if result["type"] == "succeeded" and charge is None:
        charge = CHARGE
    [reply] = await store.scripts.deliver(
        [Delivery(rid, attempt, line_for(rid, attempt, result), retry, charge)],
        max_attempts=3,
        ttl_seconds=TTL,
        batch_id=batch,
        dedupe_window=window,
        now=NOW,
    )
    return reply


async def cancel(store: Store, rid: str) -> CancelOutcome:
    line = orjson.dumps({"custom_id": rid, "result": {"type": "canceled"}})
    return await store.scripts.cancel(rid, line=line, ttl_seconds=TTL)


async def ledger(store: Store) -> dict[tuple[str, str], LedgerRow]:
    return {(row.model, row.tag_set): row for row in await store.ledger_rows(await store.ledger_days())}


async def budget(store: Store) -> dict[str, int]:
    return await store.budget_spent(DAY)


# --- the ledger: every billed line once ------------------------------------------------------------------
async def test_a_delivered_line_is_charged_to_its_day_model_and_tags(store: Store) -> None:
    await enqueue(store, req("a", tags=TEAM))
    await flush(store)

    reply = await deliver(store, "a", 1, SUCCEEDED)

    assert (reply.outcome, reply.charged) == (DeliverOutcome.DELIVERED, True)
    assert await store.ledger_days() == [DAY]
    row = (await ledger(store))[("claude-haiku-4-5", TEAM.id)]
    assert (row.requests, row.input, row.output, row.cost, row.standard, row.undelivered) == (
        1,
        10,
        20,
        55_000_000,
        110_000_000,
        0,
    )
    assert await store.tag_sets() == {TEAM.id: "team=search"}


async def test_a_line_delivered_again_is_not_charged_again(store: Store) -> None:
    await enqueue(store, req("a"))
    await flush(store)
    await deliver(store, "a", 1, SUCCEEDED)
    before = await ledger(store)

    again = await deliver(store, "a", 1, SUCCEEDED)

    assert (again.outcome, again.charged) == (DeliverOutcome.DUPLICATE, False)
    assert await ledger(store) == before


async def test_a_stale_succeeded_line_is_billed_and_marked_undelivered(store: Store) -> None:
    # Attempt 1 was given up (its batch lost) and retried; its line turns up after all: the API billed it.
    await enqueue(store, req("a"))
    await flush(store)
    await deliver(store, "a", 1, EXPIRED, retry=True)
    await flush(store, "f2")

    stale = await deliver(store, "a", 1, SUCCEEDED, batch="lost")
    assert (stale.outcome, stale.charged) == (DeliverOutcome.STALE, True)
    await deliver(store, "a", 2, SUCCEEDED, batch="b2")

    row = (await ledger(store))[("claude-haiku-4-5", "")]
    assert (row.requests, row.undelivered, row.cost, row.undelivered_cost) == (2, 1, 110_000_000, 55_000_000)


async def test_a_line_of_a_request_canceled_after_its_flush_is_billed_undelivered(store: Store) -> None:
    await enqueue(store, req("a", estimate=70_000_000))
    await flush(store)
    assert await cancel(store, "a") is CancelOutcome.ANSWERED
    assert (await budget(store))["*"] == 70_000_000  # it may still be billed: kept reserved

    late = await deliver(store, "a", 1, SUCCEEDED)

    assert (late.outcome, late.charged) == (DeliverOutcome.DUPLICATE, True)
    row = (await ledger(store))[("claude-haiku-4-5", "")]
    assert (row.requests, row.undelivered) == (1, 1)
    assert (await budget(store))["*"] == 55_000_000  # the estimate settled with the real cost
    assert (await store.result_line("a"))[0] == orjson.dumps(
        {"custom_id": "a", "result": {"type": "canceled"}}
    )


async def test_a_line_of_an_unknown_request_is_still_billed_once(store: Store) -> None:
    first = await deliver(store, "ghost", 1, SUCCEEDED)
    second = await deliver(store, "ghost", 1, SUCCEEDED)
    assert (first.outcome, first.charged, second.charged) == (DeliverOutcome.STALE, True, False)
    assert (await ledger(store))[("claude-haiku-4-5", "")].undelivered == 1


async def test_the_same_custom_id_in_two_batches_is_billed_twice(store: Store) -> None:
    # Only a duplicated create puts one custom id in two batches, and the API then bills both.
    await enqueue(store, req("a"))
    await flush(store)
    await deliver(store, "a", 1, SUCCEEDED, batch="b1")
    assert (await deliver(store, "a", 1, SUCCEEDED, batch="b2")).charged


async def test_failed_lines_cost_nothing(store: Store) -> None:
    await enqueue(store, req("a"), req("b"))
    await flush(store)
    await deliver(store, "a", 1, EXPIRED, retry=True)
    await deliver(store, "b", 1, ERRORED)
    assert await ledger(store) == {}


async def test_an_unpriced_model_counts_its_tokens_not_a_cost(store: Store) -> None:
    await enqueue(store, req("a"))
    await flush(store)
    await deliver(store, "a", 1, SUCCEEDED, charge=Charge("m", input=3, output=4, priced=False))
    row = (await ledger(store))[("m", "")]
    assert (row.requests, row.unpriced, row.input, row.cost) == (1, 1, 3, 0)


async def test_finishing_a_batch_forgets_what_it_charged(store: Store) -> None:
    await enqueue(store, req("a"))
    await flush(store)
    await deliver(store, "a", 1, SUCCEEDED, batch="b1")
    assert await store.redis.exists(K.billed("b1"))
    await store.record_batch(
        await store.flush("f1"),  # type: ignore[arg-type]
        "b1",
        created_ms=NOW,
        requests=1,
        adopted=False,
    )
    record = await store.batch("b1")
    assert record is not None
    await store.finish_batch(record, lines=1, ttl_seconds=TTL)
    assert not await store.redis.exists(K.billed("b1"))


# --- budgets ---------------------------------------------------------------------------------------------
async def test_enqueue_reserves_estimates_per_scope_and_the_final_line_settles_them(store: Store) -> None:
    await enqueue(store, req("a", tags=TEAM, estimate=100_000_000), req("b", estimate=30_000_000))
    assert await budget(store) == {"*": 130_000_000, "team=search": 100_000_000}
    assert await store.redis.ttl(K.budget(DAY)) > BUDGET_TTL_S - 60
    await flush(store)

    await deliver(store, "a", 1, SUCCEEDED)  # cost 55_000_000
    await deliver(store, "b", 1, ERRORED)  # not billed: released

    assert await budget(store) == {"*": 55_000_000, "team=search": 55_000_000}


async def test_a_retried_request_keeps_its_reservation_until_its_final_line(store: Store) -> None:
    await enqueue(store, req("a", estimate=100_000_000))
    await flush(store)
    await deliver(store, "a", 1, EXPIRED, retry=True)
    assert (await budget(store))["*"] == 100_000_000
    await flush(store, "f2")
    await deliver(store, "a", 2, SUCCEEDED, batch="b2")
    assert (await budget(store))["*"] == 55_000_000


async def test_a_request_over_a_budget_is_refused_and_nothing_is_written(store: Store) -> None:
    limits = BudgetLimits(daily=250, tags={"team=search": 100})
    assert await enqueue(store, req("a", estimate=60), budgets=limits) == [EnqueueOutcome.QUEUED]
    before = {k: await store.redis.type(k) for k in await store.redis.keys("*")}
    stream_before = await store.redis.xlen(K.intake)

    # The tag's budget: 0 spent + 120 > 100, though the global one (60 + 120 <= 250) has room.
    refused = await enqueue(store, req("b", tags=TEAM, estimate=120), req("c", estimate=1), budgets=limits)
    assert refused == BudgetRefused(0, "team=search", DAY, 0, 100)
    # And within one call, the requests before it count: 60 + 100 + 100 > 250.
    many = await enqueue(store, req("d", estimate=100), req("e", estimate=100), budgets=limits)
    assert many == BudgetRefused(1, "*", DAY, 160, 250)

    assert {k: await store.redis.type(k) for k in await store.redis.keys("*")} == before
    assert await store.redis.xlen(K.intake) == stream_before
    assert await budget(store) == {"*": 60}


async def test_a_tag_budget_refuses_only_its_tag(store: Store) -> None:
    limits = BudgetLimits(tags={"team=search": 100})
    assert await enqueue(store, req("a", tags=TEAM, estimate=80), budgets=limits) == [EnqueueOutcome.QUEUED]
    refused = await enqueue(store, req("b", tags=TEAM, estimate=30), budgets=limits)
    assert refused == BudgetRefused(0, "team=search", DAY, 80, 100)
    other = parse_tags({"team": "ads"})
    assert await enqueue(store, req("c", tags=other, estimate=30), budgets=limits) == [EnqueueOutcome.QUEUED]


async def test_canceling_a_queued_request_releases_its_reservation(store: Store) -> None:
    await enqueue(store, req("a", tags=TEAM, estimate=100))
    assert await cancel(store, "a") is CancelOutcome.REMOVED
    assert await budget(store) == {"*": 0, "team=search": 0}


async def test_an_idempotent_repeat_reserves_nothing_more(store: Store) -> None:
    await enqueue(store, req("a", estimate=100))
    assert await enqueue(store, req("a", estimate=100)) == [EnqueueOutcome.KNOWN]
    assert await budget(store) == {"*": 100}


# --- dedupe ----------------------------------------------------------------------------------------------
async def test_identical_deduped_requests_in_flight_are_sent_once_and_answered_together(store: Store) -> None:
    team = req("a", "same", dedupe=True, tags=TEAM, estimate=10)
    other = req("b", "same", dedupe=True, estimate=10)
    assert await enqueue(store, team, other) == [EnqueueOutcome.QUEUED, EnqueueOutcome.FOLLOWING]
    # A later one, from another process, follows too.
    assert await enqueue(store, req("c", "same", dedupe=True)) == [EnqueueOutcome.FOLLOWING]
    assert [e.rid for e in await flush(store)] == ["a"]
    assert await budget(store) == {"*": 10, "team=search": 10}  # only the request sent reserves
    follower = await store.request("b")
    assert follower is not None and follower.state is RequestState.FOLLOWING

    reply = await deliver(store, "a", 1, SUCCEEDED, window=60)

    assert reply.followers == 2
    lines = await store.result_lines(["a", "b", "c"])
    assert lines[0] is not None and lines[0] == lines[1] == lines[2]
    rows = await ledger(store)
    assert rows[("claude-haiku-4-5", TEAM.id)].requests == 1
    reused = rows[("claude-haiku-4-5", "")]
    assert (reused.requests, reused.reused, reused.reused_standard) == (0, 2, 2 * 110_000_000)


async def test_an_identical_request_within_the_window_gets_the_stored_answer(store: Store) -> None:
    await enqueue(store, req("a", "same", dedupe=True))
    await flush(store)
    await deliver(store, "a", 1, SUCCEEDED, window=60)

    assert await enqueue(store, req("b", "same", dedupe=True, tags=TEAM)) == [EnqueueOutcome.REUSED]

    assert (await store.result_lines(["b"]))[0] == (await store.result_lines(["a"]))[0]
    assert await store.redis.xlen(K.intake) == 0
    row = (await ledger(store))[("claude-haiku-4-5", TEAM.id)]
    assert (row.reused, row.reused_standard) == (1, 110_000_000)
    # Not deduped, or different params: sent as usual.
    assert (
        await enqueue(store, req("c", "same"), req("d", "other", dedupe=True)) == [EnqueueOutcome.QUEUED] * 2
    )


async def test_without_a_window_an_answer_is_not_reused(store: Store) -> None:
    await enqueue(store, req("a", "same", dedupe=True))
    await flush(store)
    await deliver(store, "a", 1, SUCCEEDED, window=0)
    assert await enqueue(store, req("b", "same", dedupe=True)) == [EnqueueOutcome.QUEUED]


async def test_followers_get_a_failure_too_and_it_is_not_reused(store: Store) -> None:
    await enqueue(store, req("a", "same", dedupe=True), req("b", "same", dedupe=True))
    await flush(store)
    assert (await deliver(store, "a", 1, ERRORED, window=60)).followers == 1
    assert orjson.loads((await store.result_lines(["b"]))[0] or b"")["result"]["type"] == "errored"
    assert await enqueue(store, req("c", "same", dedupe=True)) == [EnqueueOutcome.QUEUED]


async def test_a_canceled_follower_keeps_its_cancel(store: Store) -> None:
    await enqueue(store, req("a", "same", dedupe=True), req("b", "same", dedupe=True))
    assert await cancel(store, "b") is CancelOutcome.REMOVED
    await flush(store)
    assert (await deliver(store, "a", 1, SUCCEEDED)).followers == 0
    assert orjson.loads((await store.result_lines(["b"]))[0] or b"")["result"]["type"] == "canceled"


async def test_canceling_a_request_others_follow_answers_its_caller_and_goes_on_for_them(
    store: Store,
) -> None:
    await enqueue(store, req("a", "same", dedupe=True), req("b", "same", dedupe=True))
    assert await cancel(store, "a") is CancelOutcome.ANSWERED
    assert orjson.loads((await store.result_lines(["a"]))[0] or b"")["result"]["type"] == "canceled"
    assert [e.rid for e in await flush(store)] == ["a"]  # still sent, for b

    # Even retried for b: a transient line does not end it.
    assert (await deliver(store, "a", 1, EXPIRED, retry=True)).outcome is DeliverOutcome.REQUEUED
    await flush(store, "f2")
    reply = await deliver(store, "a", 2, SUCCEEDED, batch="b2")

    assert (reply.outcome, reply.followers) == (DeliverOutcome.DELIVERED, 1)
    assert orjson.loads((await store.result_lines(["b"]))[0] or b"")["result"]["type"] == "succeeded"
    assert orjson.loads((await store.result_lines(["a"]))[0] or b"")["result"]["type"] == "canceled"
    assert await cancel(store, "a") is CancelOutcome.ALREADY_ANSWERED


async def test_a_canceled_request_nobody_follows_is_not_followed_later(store: Store) -> None:
    await enqueue(store, req("a", "same", dedupe=True))
    assert await cancel(store, "a") is CancelOutcome.REMOVED
    assert await enqueue(store, req("b", "same", dedupe=True)) == [EnqueueOutcome.QUEUED]


# --- prompt-cache prefixes -------------------------------------------------------------------------------
async def test_a_prefix_is_warm_for_its_ttl_once_a_request_of_it_is_answered(store: Store) -> None:
    await enqueue(store, req("a", prefix="p1", prefix_ttl=3600))
    [entry] = await flush(store)
    assert entry.prefix == "p1"
    await store.start_priming("p1", ms=60_000)
    assert await store.prefix_states(["p1", "p2"]) == {"p1": "p", "p2": None}

    await deliver(store, "a", 1, SUCCEEDED)

    assert await store.prefix_states(["p1"]) == {"p1": "w"}
    assert 3500 < await store.redis.ttl(K.prefix_state("p1")) <= 3600
    assert not await store.start_priming("p1", ms=60_000)


async def test_a_failed_primer_frees_its_prefix_and_its_retry_keeps_the_prefix(store: Store) -> None:
    await enqueue(store, req("a", prefix="p1", prefix_ttl=300))
    await flush(store)
    assert await store.start_priming("p1", ms=60_000)

    await deliver(store, "a", 1, EXPIRED, retry=True)

    assert await store.prefix_states(["p1"]) == {"p1": None}
    [entry] = await store.intake.read_new("c1", count=10, block_ms=None)
    assert (entry.rid, entry.prefix) == ("a", "p1")


def test_tag_sets_have_a_stable_id_and_canonical_form() -> None:
    tags = parse_tags({"team": "search", "env": "prod"})
    assert tags.canonical == "env=prod,team=search"
    assert tags == TagSet.from_canonical(tags.canonical)
    assert tags.id == parse_tags({"env": "prod", "team": "search"}).id != TEAM.id
    assert TagSet().id == ""
