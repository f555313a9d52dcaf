"""The routing side of the Lua scripts: requests routed to real time never enter intake; claims push a due
request back by a lease and drop answered ones; a real-time answer is delivered once, charged once at
standard prices whether or not it is delivered, settles the budget reservation, takes a queued request out
of the queue, and counts a flushed one toward its batch's cancel. On fakeredis and on a real redis-server.
"""

# The fixtures r and store come from test_spend_scripts (fakeredis and redis-server): tests name them.
# ruff: noqa: F811

from __future__ import annotations

import orjson

from batchd.store import (
    CancelOutcome,
    Charge,
    DeliverOutcome,
    Delivery,
    RequestState,
    Route,
    Store,
)
from tests.unit.test_spend_scripts import (  # noqa: F401
    NOW,
    SUCCEEDED,
    TEAM,
    TTL,
    budget,
    enqueue,
    flush,
    ledger,
    line_for,
    r,
    req,
    store,
)

STANDARD = Charge("claude-haiku-4-5", input=10, output=20, cost=110_000_000, standard=110_000_000)
LEASE_MS = 15_000


def realtime_line(rid: str, attempt: int = 1) -> bytes:
    return line_for(rid, attempt, SUCCEEDED)


async def state_of(store: Store, rid: str) -> RequestState | None:
    record = await store.request(rid)
    return None if record is None else record.state


async def test_a_realtime_request_never_enters_intake_and_is_due_at_once(store: Store) -> None:
    await enqueue(store, req("rt", route=Route.REALTIME, due_ms=NOW), req("b"))

    entries = await store.intake.read_new("c1", count=100, block_ms=None)
    assert [e.rid for e in entries] == ["b"]
    assert await state_of(store, "rt") is RequestState.REALTIME
    snapshot = await store.redis.hgetall(store.keys.queue_stats)
    assert int(snapshot[b"requests"]) == 1  # only the batched one is queued
    claims, next_due = await store.scripts.claim_realtime(now_ms=NOW, limit=10, claim_ms=LEASE_MS)
    assert [(c.rid, c.state, c.route, c.attempt) for c in claims] == [
        ("rt", RequestState.REALTIME, Route.REALTIME, 1)
    ]
    assert orjson.loads(claims[0].body)["model"] == "claude-haiku-4-5"
    # Claimed: pushed back by the lease, so neither this nor another replica claims it again meanwhile.
    assert next_due == NOW + LEASE_MS
    again, _ = await store.scripts.claim_realtime(now_ms=NOW + 1, limit=10, claim_ms=LEASE_MS)
    assert again == []
    later, _ = await store.scripts.claim_realtime(now_ms=NOW + LEASE_MS, limit=10, claim_ms=LEASE_MS)
    assert [c.rid for c in later] == ["rt"]


async def test_an_auto_request_is_batched_and_due_at_its_fallback_time(store: Store) -> None:
    await enqueue(store, req("a", route=Route.AUTO, due_ms=NOW + 60_000))
    entries = await store.intake.read_new("c1", count=100, block_ms=None)
    assert [e.rid for e in entries] == ["a"]
    claims, next_due = await store.scripts.claim_realtime(now_ms=NOW, limit=10, claim_ms=LEASE_MS)
    assert (claims, next_due) == ([], NOW + 60_000)


async def test_a_request_its_batch_answered_first_is_dropped_from_the_deadlines(store: Store) -> None:
    await enqueue(store, req("a", route=Route.AUTO, due_ms=NOW + 1000))
    await flush(store)
    await store.scripts.deliver(
        [Delivery("a", 1, realtime_line("a"), False, STANDARD)], max_attempts=3, ttl_seconds=TTL, now=NOW
    )
    claims, next_due = await store.scripts.claim_realtime(now_ms=NOW + 1000, limit=10, claim_ms=LEASE_MS)
    assert (claims, next_due) == ([], None)


async def test_a_realtime_answer_is_delivered_once_and_charged_at_standard_prices(store: Store) -> None:
    await enqueue(store, req("rt", tags=TEAM, estimate=100_000_000, route=Route.REALTIME, due_ms=NOW))
    assert await budget(store) == {"*": 100_000_000, "team=search": 100_000_000}

    first = await store.scripts.answer_realtime(
        "rt", line=realtime_line("rt"), charge=STANDARD, ttl_seconds=TTL, now=NOW
    )
    assert first.outcome is DeliverOutcome.DELIVERED
    assert (first.fell_back, first.batch_id, first.batch_all_fell_back) == (0, None, False)
    assert await store.redis.get(store.keys.result("rt")) == realtime_line("rt")
    assert await state_of(store, "rt") is RequestState.DONE
    row = (await ledger(store))[("claude-haiku-4-5", TEAM.id)]
    assert (row.requests, row.cost, row.standard, row.undelivered) == (1, 110_000_000, 110_000_000, 0)
    # The reservation is settled with what the call cost.
    assert await budget(store) == {"*": 110_000_000, "team=search": 110_000_000}
    assert await store.realtime_pending() == 0

    # A second call's answer (a replica that took over mid-call): not delivered, but charged: it was billed.
    second = await store.scripts.answer_realtime(
        "rt",
        line=line_for("rt", 1, {"type": "succeeded", "message": {"id": "msg_2"}}),
        charge=STANDARD,
        ttl_seconds=TTL,
        now=NOW,
    )
    assert second.outcome is DeliverOutcome.DUPLICATE
    assert await store.redis.get(store.keys.result("rt")) == realtime_line("rt")
    row = (await ledger(store))[("claude-haiku-4-5", TEAM.id)]
    assert (row.requests, row.undelivered) == (2, 1)
    assert (await budget(store))["*"] == 220_000_000


async def test_a_queued_request_answered_in_real_time_leaves_the_queue(store: Store) -> None:
    await enqueue(store, req("a", route=Route.AUTO, due_ms=NOW), req("b"))
    answer = await store.scripts.answer_realtime(
        "a", line=realtime_line("a"), charge=STANDARD, ttl_seconds=TTL, now=NOW
    )
    assert answer.outcome is DeliverOutcome.DELIVERED
    stats = await store.redis.hgetall(store.keys.queue_stats)
    assert int(stats[b"requests"]) == 1
    # Its intake entry is acknowledged, not moved: the flush holds only b.
    await flush(store)
    assert await store.flush_rids("f1") == ["b"]


async def test_a_batch_whose_requests_all_fell_back_is_named_for_cancel(store: Store) -> None:
    await enqueue(store, req("a", route=Route.AUTO, due_ms=NOW), req("b", route=Route.AUTO, due_ms=NOW))
    await flush(store)
    record = await store.flush("f1")
    assert record is not None
    await store.begin_create("f1", sent=2, body_bytes=100, by="r1")
    await store.record_batch(record, "b1", created_ms=NOW, requests=2, adopted=False)

    first = await store.scripts.answer_realtime(
        "a", line=realtime_line("a"), charge=STANDARD, ttl_seconds=TTL, now=NOW
    )
    assert (first.fell_back, first.sent, first.batch_id, first.batch_all_fell_back) == (1, 2, "b1", False)
    second = await store.scripts.answer_realtime(
        "b", line=realtime_line("b"), charge=STANDARD, ttl_seconds=TTL, now=NOW
    )
    assert second.batch_all_fell_back
    flushed = await store.flush("f1")
    assert flushed is not None and flushed.fell_back == 2

    # The batch's own lines land later: duplicates, never delivered twice, but billed (the ledger says so).
    replies = await store.scripts.deliver(
        [Delivery(rid, 1, line_for(rid, 1, SUCCEEDED), False, STANDARD) for rid in ("a", "b")],
        max_attempts=3,
        ttl_seconds=TTL,
        batch_id="b1",
        now=NOW,
    )
    assert [x.outcome for x in replies] == [DeliverOutcome.DUPLICATE, DeliverOutcome.DUPLICATE]
    assert await store.redis.get(store.keys.result("a")) == realtime_line("a")


async def test_a_failed_call_is_counted_and_listed_again(store: Store) -> None:
    await enqueue(store, req("rt", route=Route.REALTIME, due_ms=NOW))
    await store.scripts.claim_realtime(now_ms=NOW, limit=10, claim_ms=LEASE_MS)
    assert await store.count_realtime_failure("rt") == 1
    await store.reschedule_realtime("rt", NOW + 2000)
    claims, _ = await store.scripts.claim_realtime(now_ms=NOW + 2000, limit=10, claim_ms=LEASE_MS)
    assert [c.rid for c in claims] == ["rt"]


async def test_a_realtime_request_canceled_before_its_call_releases_its_budget_and_is_never_sent(
    store: Store,
) -> None:
    await enqueue(store, req("rt", estimate=100_000_000, route=Route.REALTIME, due_ms=NOW))
    line = orjson.dumps({"custom_id": "rt", "result": {"type": "canceled"}})
    # Its call may already be under way, so the caller is told it may still be billed.
    assert await store.scripts.cancel("rt", line=line, ttl_seconds=TTL) is CancelOutcome.ANSWERED
    assert (await budget(store))["*"] == 0
    claims, next_due = await store.scripts.claim_realtime(now_ms=NOW, limit=10, claim_ms=LEASE_MS)
    assert (claims, next_due) == ([], None)
    # A call that was under way answers too late: not delivered, but charged (it was billed).
    late = await store.scripts.answer_realtime(
        "rt", line=realtime_line("rt"), charge=STANDARD, ttl_seconds=TTL, now=NOW
    )
    assert late.outcome is DeliverOutcome.DUPLICATE
    assert await store.redis.get(store.keys.result("rt")) == line
    assert (await budget(store))["*"] == 110_000_000


async def test_a_request_answered_before_its_batch_was_created_does_not_count_toward_its_cancel(
    store: Store,
) -> None:
    await enqueue(store, *(req(rid, route=Route.AUTO, due_ms=NOW) for rid in ("a", "b", "c")))
    await flush(store)
    # a falls back while its flush waits for its create: the create leaves it out (sent = 2).
    early = await store.scripts.answer_realtime(
        "a", line=realtime_line("a"), charge=STANDARD, ttl_seconds=TTL, now=NOW
    )
    assert (early.fell_back, early.batch_id) == (0, None)
    assert [i.rid for i in await store.flush_items("f1")] == ["b", "c"]
    record = await store.flush("f1")
    assert record is not None
    await store.begin_create("f1", sent=2, body_bytes=100, by="r1")
    await store.record_batch(record, "b1", created_ms=NOW, requests=2, adopted=False)
    b = await store.scripts.answer_realtime(
        "b", line=realtime_line("b"), charge=STANDARD, ttl_seconds=TTL, now=NOW
    )
    assert (b.fell_back, b.sent, b.batch_all_fell_back) == (1, 2, False)  # c still waits on the batch
    c = await store.scripts.answer_realtime(
        "c", line=realtime_line("c"), charge=STANDARD, ttl_seconds=TTL, now=NOW
    )
    assert c.batch_all_fell_back


async def test_a_request_whose_call_is_under_way_is_due_again_when_its_lease_lapses(store: Store) -> None:
    """A claim that finds another sender's lease does not push the request back a whole claim: it is due
    again the moment that lease lapses (so a dead sender is taken over in LEASE_S, not two)."""
    await enqueue(store, req("rt", route=Route.REALTIME, due_ms=NOW))
    await store.take_lock(store.keys.realtime_lease("rt"), "other", ms=4000)
    claims, next_due = await store.scripts.claim_realtime(now_ms=NOW, limit=10, claim_ms=LEASE_MS)
    assert claims == []
    assert next_due is not None and NOW + 3000 < next_due <= NOW + 4001
