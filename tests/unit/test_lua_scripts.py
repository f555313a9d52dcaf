"""The Lua scripts, one behaviour per test, through their typed callers (``Store.scripts``).

Every test runs twice: on fakeredis (Lua 5.1 through lupa) and on a real redis-server, so a script that
only works on one of them fails here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from batchd.store import (
    CancelOutcome,
    DeliverOutcome,
    DeliverReply,
    Delivery,
    EnqueueConflict,
    EnqueueRefused,
    FlushChanged,
    FlushState,
    IntakeEntry,
    Keys,
    NewRequest,
    RequestState,
    Store,
    Trigger,
    custom_id_for,
)
from batchd.store.scripts import SCRIPT_NAMES, script_source
from tests.redis_server import RedisServer

K = Keys()
NOW = 1_700_000_000_000
TTL = 3600
BIG = 10**12


def params(text: str = "hi") -> bytes:
    return orjson.dumps(
        {"model": "claude-x", "max_tokens": 16, "messages": [{"role": "user", "content": text}]}
    )


def line_for(rid: str, attempt: int, result: dict[str, Any]) -> bytes:
    return orjson.dumps({"custom_id": custom_id_for(rid, attempt), "result": result})


SUCCEEDED = {"type": "succeeded", "message": {"id": "msg_1"}}
EXPIRED = {"type": "expired"}


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
    # The daemon creates the group before it reads; entries must be in its pending list to be acked.
    s = Store(r, K)
    await s.intake.ensure_group()
    return s


# --- helpers: the typed callers, with defaults for the tests ---------------------------------------------
async def enqueue(
    store: Store,
    requests: list[tuple[str, bytes]],
    *,
    max_n: int = BIG,
    max_bytes: int = BIG,
    now: int = NOW,
) -> list[bool] | EnqueueRefused:
    return await store.scripts.enqueue(
        [NewRequest(rid, body) for rid, body in requests], now_ms=now, max_requests=max_n, max_bytes=max_bytes
    )


async def read_entries(store: Store, consumer: str = "c1") -> list[IntakeEntry]:
    """Every new intake entry, read into the group's pending list like the daemon."""
    return await store.intake.read_new(consumer, count=10_000, block_ms=None)


async def stream(r: aioredis.Redis) -> list[IntakeEntry]:
    """The intake stream as it stands, without reading it as a consumer."""
    return [e for i, f in await r.xrange(K.intake) if (e := IntakeEntry.from_stream(i, f)) is not None]


async def commit(store: Store, fid: str, entries: list[IntakeEntry], now: int = NOW) -> tuple[int, int]:
    return await store.scripts.commit_flush(
        fid, [e.entry_id for e in entries], [e.rid for e in entries], now_ms=now
    )


async def seal(store: Store, fid: str, trigger: Trigger = Trigger.COUNT, now: int = NOW + 5) -> int | None:
    return await store.scripts.seal_flush(fid, trigger, now_ms=now)


async def deliver(
    store: Store,
    rid: str,
    attempt: int,
    line: bytes,
    *,
    retry: bool = False,
    max_attempts: int = 3,
    ttl: int = TTL,
) -> DeliverReply:
    [reply] = await store.scripts.deliver(
        [Delivery(rid, attempt, line, retry)], max_attempts=max_attempts, ttl_seconds=ttl
    )
    return reply


async def cancel(store: Store, rid: str, ttl: int = TTL) -> CancelOutcome:
    line = orjson.dumps({"custom_id": rid, "result": {"type": "canceled"}})
    return await store.scripts.cancel(rid, line=line, ttl_seconds=ttl)


async def stats(store: Store) -> tuple[int, int]:
    snap = await store.snapshot(dead_after_ms=10_000)
    return snap.pending_requests, snap.pending_bytes


async def dump(r: aioredis.Redis) -> dict[bytes, Any]:
    """Every key with its value: compare two dumps to prove a call wrote nothing."""
    out: dict[bytes, Any] = {}
    for key in await r.keys("*"):
        kind = await r.type(key)
        if kind == b"hash":
            out[key] = await r.hgetall(key)
        elif kind == b"string":
            out[key] = await r.get(key)
        elif kind == b"stream":
            out[key] = [(i, f) for i, f in await r.xrange(key)]
        elif kind == b"list":
            out[key] = await r.lrange(key, 0, -1)
        elif kind == b"zset":
            out[key] = await r.zrange(key, 0, -1, withscores=True)
        else:
            out[key] = kind
    return out


async def queue_and_flush(store: Store, *rids: str, fid: str = "f1") -> None:
    """Bring requests to where the daemon delivers them: enqueued, read, committed into a sealed flush."""
    await enqueue(store, [(rid, params(rid)) for rid in rids])
    entries = await read_entries(store)
    assert {e.rid for e in entries} >= set(rids)
    await commit(store, fid, entries)
    await seal(store, fid)


class Published:
    """Request ids published on the delivered channel (what wakes the waiters)."""

    def __init__(self, r: aioredis.Redis) -> None:
        self._pubsub = r.pubsub()

    async def start(self) -> Published:
        await self._pubsub.subscribe(K.delivered_channel)
        return self

    async def drain(self) -> list[str]:
        out: list[str] = []
        while (message := await self._pubsub.get_message(timeout=0.05)) is not None:
            if message["type"] == "message":
                out += message["data"].decode().split(",")  # deliver.lua: one message a call
        return out

    async def close(self) -> None:
        await self._pubsub.aclose()


@pytest.fixture
async def published(r: aioredis.Redis) -> AsyncIterator[Published]:
    collector = await Published(r).start()
    await collector.drain()  # the subscribe confirmation
    yield collector
    await collector.close()


# --- the scripts load ------------------------------------------------------------------------------------
def test_every_script_has_a_source() -> None:
    for name in SCRIPT_NAMES:
        assert script_source(name).strip()


# --- enqueue ---------------------------------------------------------------------------------------------
async def test_enqueue_new_request_writes_record_stream_entry_and_stats(store: Store) -> None:
    body = params()
    assert await enqueue(store, [("a", body)]) == [True]

    record = await store.request("a")
    assert record is not None
    assert (record.state, record.attempts, record.enqueued_ms, record.params_bytes, record.fid) == (
        RequestState.QUEUED,
        1,
        NOW,
        len(body),
        None,
    )
    [entry] = await stream(store.redis)
    assert (entry.rid, entry.custom_id, entry.params_bytes) == ("a", "a-1", len(body))
    assert await stats(store) == (1, len(body))


async def test_enqueue_duplicate_id_returns_false_and_changes_nothing(store: Store) -> None:
    await enqueue(store, [("a", params("first"))])
    before = await dump(store.redis)

    assert await enqueue(store, [("a", params("first"))], now=NOW + 1) == [False]
    assert await dump(store.redis) == before


async def test_enqueue_known_id_with_other_params_is_a_conflict_and_writes_nothing(store: Store) -> None:
    await enqueue(store, [("a", params("first"))])
    before = await dump(store.redis)

    reply = await enqueue(store, [("b", params()), ("a", params("second, different body"))], now=NOW + 1)
    assert reply == EnqueueConflict(1)
    assert await dump(store.redis) == before


async def test_enqueue_conflict_is_still_seen_once_the_request_is_answered(store: Store) -> None:
    await queue_and_flush(store, "a")
    await deliver(store, "a", 1, line_for("a", 1, SUCCEEDED))  # the params are dropped once answered

    assert await enqueue(store, [("a", params("a"))]) == [False]
    assert await enqueue(store, [("a", params("other"))]) == EnqueueConflict(0)


async def test_enqueue_id_whose_result_exists_is_a_duplicate(store: Store) -> None:
    # The request hash may expire before the result does; the id is still taken.
    await store.redis.set(K.result("a"), b"{}")
    assert await enqueue(store, [("a", params())]) == [False]
    assert await store.request("a") is None
    assert await stream(store.redis) == []


async def test_enqueue_the_same_id_twice_in_one_call_is_one_request_unless_the_params_differ(
    store: Store,
) -> None:
    first, second = params("first"), params("second")
    assert await enqueue(store, [("a", first), ("b", params()), ("a", second)]) == EnqueueConflict(2)
    assert await enqueue(store, [("a", first), ("b", params()), ("a", first)]) == [True, True, False]

    assert [e.rid for e in await stream(store.redis)] == ["a", "b"]
    assert await stats(store) == (2, len(first) + len(params()))


@pytest.mark.parametrize("cap", ["count", "bytes"])
async def test_enqueue_over_a_cap_is_refused_and_writes_nothing(store: Store, cap: str) -> None:
    body = params()
    await enqueue(store, [("a", body), ("b", body)])
    before = await dump(store.redis)
    limits = {"max_n": 3} if cap == "count" else {"max_bytes": 3 * len(body)}

    # Two more would pass the cap: the whole call is refused, not just the request that overflows.
    assert await enqueue(store, [("c", body), ("d", body)], **limits) == EnqueueRefused(2, 2 * len(body))
    assert await dump(store.redis) == before

    # Exactly up to the cap is allowed.
    assert await enqueue(store, [("c", body)], **limits) == [True]
    assert await stats(store) == (3, 3 * len(body))


async def test_enqueue_duplicate_is_not_refused_by_a_full_queue(store: Store) -> None:
    # A retried submit of an already-queued id must stay idempotent even at the cap.
    await enqueue(store, [("a", params())], max_n=1)
    assert await enqueue(store, [("a", params())], max_n=1) == [False]


# --- commit_flush ----------------------------------------------------------------------------------------
async def test_commit_flush_moves_queued_requests_and_acks_their_entries(store: Store) -> None:
    bodies = {rid: params(rid * 3) for rid in ("a", "b", "c")}
    await enqueue(store, list(bodies.items()))
    entries = await read_entries(store)
    total = sum(len(b) for b in bodies.values())

    assert await commit(store, "f1", entries) == (3, total)

    flush = await store.flush("f1")
    assert flush is not None
    assert (flush.state, flush.created_ms, flush.requests, flush.params_bytes) == (
        FlushState.BUILDING,
        NOW,
        3,
        total,
    )
    assert await store.flush_rids("f1") == ["a", "b", "c"]
    assert [(fid, created) for fid, _, created in await store.pending_flushes()] == [("f1", NOW)]
    for rid in bodies:
        record = await store.request(rid)
        assert record is not None and (record.state, record.fid) == (RequestState.FLUSHED, "f1")
    # Acked and deleted: nothing pending, nothing left in the stream.
    assert await stream(store.redis) == []
    assert await store.intake.group_pending() == 0
    assert await stats(store) == (0, 0)


async def test_commit_flush_chunks_accumulate(store: Store) -> None:
    body = params()
    await enqueue(store, [(f"r{i}", body) for i in range(5)])
    entries = await read_entries(store)

    assert await commit(store, "f1", entries[:2]) == (2, 2 * len(body))
    assert await commit(store, "f1", entries[2:]) == (3, 3 * len(body))

    flush = await store.flush("f1")
    assert flush is not None and (flush.requests, flush.params_bytes) == (5, 5 * len(body))
    assert await store.flush_rids("f1") == [f"r{i}" for i in range(5)]


async def test_commit_flush_skips_canceled_requests_but_acks_them(store: Store) -> None:
    body = params()
    await enqueue(store, [("a", body), ("b", body)])
    entries = await read_entries(store)
    assert await cancel(store, "a") is CancelOutcome.REMOVED

    assert await commit(store, "f1", entries) == (1, len(body))

    assert await store.flush_rids("f1") == ["b"]
    record = await store.request("a")
    assert record is not None and record.state is RequestState.DONE
    assert await stream(store.redis) == []
    assert await store.intake.group_pending() == 0
    # cancel already took "a" off the stats; commit must not take it off twice.
    assert await stats(store) == (0, 0)


async def test_commit_flush_moves_a_request_only_once(store: Store) -> None:
    # The same entry handed to two flushes (a re-read after a crash, or a claim by another replica).
    await enqueue(store, [("a", params())])
    entries = await read_entries(store)
    await commit(store, "f1", entries)

    assert await commit(store, "f2", entries) == (0, 0)

    record = await store.request("a")
    assert record is not None and record.fid == "f1"
    assert await store.flush_rids("f2") == []
    assert await stats(store) == (0, 0)


async def test_commit_flush_removes_the_chunk_from_the_stream_and_nothing_else(store: Store) -> None:
    # The stream is trimmed below the chunk's newest entry unless an older entry is still pending: one
    # another consumer read (a dead replica's, or one held for priming) and ones nobody has read stay.
    body = params()
    await enqueue(store, [(rid, body) for rid in "abcde"])
    (a,) = await store.intake.read_new("c2", count=1, block_ms=None)
    b, c, d = await store.intake.read_new("c1", count=3, block_ms=None)

    assert await commit(store, "f1", [c, b]) == (2, 2 * len(body))
    assert [e.rid for e in await stream(store.redis)] == ["a", "d", "e"]
    assert await store.intake.group_pending() == 2

    assert await commit(store, "f1", [a]) == (1, len(body))
    assert [e.rid for e in await stream(store.redis)] == ["d", "e"]
    assert await commit(store, "f1", [d]) == (1, len(body))
    assert [e.rid for e in await stream(store.redis)] == ["e"]
    assert await store.intake.group_pending() == 0
    assert await store.flush_rids("f1") == ["c", "b", "a", "d"]


async def test_commit_flush_refuses_a_flush_that_is_not_building(store: Store) -> None:
    await enqueue(store, [("a", params())])
    await commit(store, "f1", await read_entries(store))
    await seal(store, "f1")
    await enqueue(store, [("b", params())])
    entries = await read_entries(store)

    with pytest.raises(ResponseError, match="not building"):
        await commit(store, "f1", entries)

    record = await store.request("b")
    assert record is not None and record.state is RequestState.QUEUED
    assert len(await stream(store.redis)) == 1
    assert await store.flush_rids("f1") == ["a"]


# --- seal_flush ------------------------------------------------------------------------------------------
async def test_seal_flush_seals_and_returns_its_count(store: Store) -> None:
    await enqueue(store, [("a", params()), ("b", params())])
    await commit(store, "f1", await read_entries(store))

    assert await seal(store, "f1", trigger=Trigger.AGE, now=NOW + 7) == 2

    flush = await store.flush("f1")
    assert flush is not None and (flush.state, flush.trigger) == (FlushState.SEALED, Trigger.AGE)
    assert [(fid, created) for fid, _, created in await store.pending_flushes()] == [("f1", NOW)]
    # Sealed is final: a second seal is refused.
    assert await seal(store, "f1") is None


async def test_seal_flush_removes_an_empty_flush(store: Store) -> None:
    # Every request of the chunk was canceled: the flush exists but holds nothing.
    await enqueue(store, [("a", params())])
    entries = await read_entries(store)
    await cancel(store, "a")
    assert await commit(store, "f1", entries) == (0, 0)
    assert await store.flush("f1") is not None

    assert await seal(store, "f1") == 0

    assert await store.flush("f1") is None
    assert await store.flush_rids("f1") == []
    assert await store.pending_flushes() == []


async def test_seal_flush_of_an_unknown_flush_returns_none(store: Store) -> None:
    assert await seal(store, "nope") is None
    assert await store.flush("nope") is None


# --- deliver ---------------------------------------------------------------------------------------------
async def test_deliver_sets_the_result_once_with_ttl(store: Store, published: Published) -> None:
    await queue_and_flush(store, "a")
    line = line_for("a", 1, SUCCEEDED)

    assert await deliver(store, "a", 1, line, ttl=TTL) == DeliverReply(DeliverOutcome.DELIVERED, NOW, 1)

    assert await store.result_line("a") == (line, True)
    assert 0 < await store.redis.ttl(K.result("a")) <= TTL
    record = await store.request("a")
    assert record is not None and record.state is RequestState.DONE
    # The params are dropped once answered (they can be 256 MB of batch); the record lingers with the TTL.
    assert await store.flush_items("f1") == []
    assert 0 < await store.redis.ttl(K.request("a")) <= TTL
    assert await published.drain() == ["a"]


async def test_deliver_twice_is_a_duplicate_and_keeps_the_first_line(
    store: Store, published: Published
) -> None:
    await queue_and_flush(store, "a")
    first = line_for("a", 1, SUCCEEDED)
    await deliver(store, "a", 1, first)
    await published.drain()

    assert (await deliver(store, "a", 1, line_for("a", 1, EXPIRED))).outcome is DeliverOutcome.DUPLICATE

    assert await store.result_line("a") == (first, True)
    assert await published.drain() == []


async def test_deliver_publishes_the_rids_of_a_call_in_one_message(store: Store, r: aioredis.Redis) -> None:
    # One message a chunk (the waiters split it at the commas), not one a line; a line that answers nobody
    # (a duplicate) is not in it.
    await queue_and_flush(store, "a", "b", "c")
    await deliver(store, "c", 1, line_for("c", 1, SUCCEEDED))
    pubsub = r.pubsub()
    await pubsub.subscribe(K.delivered_channel)
    try:
        lines = [Delivery(rid, 1, line_for(rid, 1, SUCCEEDED), False) for rid in ("a", "b", "c")]
        replies = await store.scripts.deliver(lines, max_attempts=3, ttl_seconds=TTL)
        assert [reply.outcome for reply in replies] == [
            DeliverOutcome.DELIVERED,
            DeliverOutcome.DELIVERED,
            DeliverOutcome.DUPLICATE,
        ]
        messages = []
        for _ in range(10):
            message = await pubsub.get_message(timeout=0.05)
            if message is not None and message["type"] == "message":
                messages.append(message["data"])
        assert messages == [b"a,b"]
    finally:
        await pubsub.aclose()


async def test_deliver_result_key_is_set_nx(store: Store) -> None:
    # A result that already exists (e.g. written by a cancel racing the fan-out) is never overwritten.
    await queue_and_flush(store, "a")
    await store.redis.set(K.result("a"), b"earlier")
    assert (await deliver(store, "a", 1, line_for("a", 1, SUCCEEDED))).outcome is DeliverOutcome.DUPLICATE
    assert await store.result_line("a") == (b"earlier", True)


async def test_deliver_for_another_attempt_is_stale(store: Store) -> None:
    await queue_and_flush(store, "a")
    before = await dump(store.redis)

    assert (await deliver(store, "a", 2, line_for("a", 2, SUCCEEDED))).outcome is DeliverOutcome.STALE
    assert (await deliver(store, "a", 0, line_for("a", 0, SUCCEEDED))).outcome is DeliverOutcome.STALE
    assert await dump(store.redis) == before


async def test_deliver_to_a_queued_or_unknown_request_is_stale(store: Store) -> None:
    await enqueue(store, [("a", params())])
    before = await dump(store.redis)

    assert (await deliver(store, "a", 1, line_for("a", 1, SUCCEEDED))).outcome is DeliverOutcome.STALE
    assert (await deliver(store, "ghost", 1, line_for("ghost", 1, SUCCEEDED))).outcome is DeliverOutcome.STALE
    assert await dump(store.redis) == before


async def test_deliver_retryable_requeues_with_next_attempt(store: Store) -> None:
    await queue_and_flush(store, "a")
    body = params("a")

    reply = await deliver(store, "a", 1, line_for("a", 1, EXPIRED), retry=True)
    assert reply == DeliverReply(DeliverOutcome.REQUEUED, NOW, 2)

    record = await store.request("a")
    assert record is not None
    assert (record.state, record.attempts, record.fid) == (RequestState.QUEUED, 2, None)
    [entry] = await stream(store.redis)
    assert (entry.rid, entry.custom_id, entry.params_bytes) == ("a", "a-2", len(body))
    assert await stats(store) == (1, len(body))
    assert await store.result_line("a") == (None, True)
    # The params are kept: the next batch needs them.
    await commit(store, "f2", await read_entries(store))
    assert [i.body for i in await store.flush_items("f2")] == [body]


async def test_deliver_retries_up_to_max_attempts_then_delivers(store: Store) -> None:
    await queue_and_flush(store, "a", fid="f1")
    expired = {n: line_for("a", n, EXPIRED) for n in (1, 2, 3)}

    assert (await deliver(store, "a", 1, expired[1], retry=True)).outcome is DeliverOutcome.REQUEUED
    await commit(store, "f2", await read_entries(store))
    assert (await deliver(store, "a", 2, expired[2], retry=True)).outcome is DeliverOutcome.REQUEUED
    assert [e.custom_id for e in await stream(store.redis)] == ["a-3"]
    await commit(store, "f3", await read_entries(store))

    # The last attempt: the transient result goes to the caller instead of back to intake.
    assert await deliver(store, "a", 3, expired[3], retry=True, max_attempts=3) == DeliverReply(
        DeliverOutcome.DELIVERED, NOW, 3
    )
    assert await store.result_line("a") == (expired[3], True)
    assert await stream(store.redis) == []
    assert await stats(store) == (0, 0)


async def test_deliver_does_not_requeue_a_canceled_request(store: Store) -> None:
    await queue_and_flush(store, "a")
    assert await cancel(store, "a") is CancelOutcome.ANSWERED
    canceled, _ = await store.result_line("a")

    assert (await deliver(store, "a", 1, line_for("a", 1, EXPIRED), retry=True)).outcome is (
        DeliverOutcome.DUPLICATE
    )

    assert await stream(store.redis) == []
    record = await store.request("a")
    assert record is not None and record.state is RequestState.DONE
    assert await store.result_line("a") == (canceled, True)


async def test_deliver_does_not_requeue_when_cancel_flag_set_on_a_flushed_request(store: Store) -> None:
    # Defence in depth: a request flagged canceled that is somehow not 'done' is answered, not retried.
    # (No script leaves this state, so the test writes the flag itself: the field is cancel.lua's.)
    await queue_and_flush(store, "a")
    await store.redis.hset(K.request("a"), "cancel", 1)
    line = line_for("a", 1, EXPIRED)

    assert (await deliver(store, "a", 1, line, retry=True)).outcome is DeliverOutcome.DELIVERED

    assert await store.result_line("a") == (line, True)
    assert await stream(store.redis) == []


# --- cancel ----------------------------------------------------------------------------------------------
async def test_cancel_queued_removes_it_and_takes_it_off_the_stats(
    store: Store, published: Published
) -> None:
    body = params()
    await enqueue(store, [("a", body), ("b", body)])

    assert await cancel(store, "a", ttl=TTL) is CancelOutcome.REMOVED

    assert await stats(store) == (1, len(body))
    record = await store.request("a")
    assert record is not None and (record.state, record.canceled) == (RequestState.DONE, True)
    line, _ = await store.result_line("a")
    assert line is not None and orjson.loads(line)["result"] == {"type": "canceled"}
    assert 0 < await store.redis.ttl(K.result("a")) <= TTL
    assert 0 < await store.redis.ttl(K.request("a")) <= TTL
    assert await published.drain() == ["a"]
    # Its params are gone: if its stream entry is flushed later, nothing is sent.
    await commit(store, "f1", await read_entries(store))
    assert [i.rid for i in await store.flush_items("f1")] == ["b"]


async def test_flush_entries_size_the_body_and_flush_bodies_stream_it(store: Store) -> None:
    await queue_and_flush(store, "a", "b", "c")
    await cancel(store, "b")  # canceled before the create: left out
    entries = await store.flush_entries("f1")
    items = await store.flush_items("f1")
    assert [(e.rid, e.attempt, e.size) for e in entries] == [(i.rid, i.attempt, len(i.body)) for i in items]
    assert [(e.rid, e.index) for e in entries] == [("a", 0), ("c", 2)]
    # A chunk is a stretch of the flush's list: with 2 positions a and c come apart, with 3 they share one
    # read past the canceled b.
    for chunk, parts in ((2, 2), (3, 1)):
        streamed = [c async for c in store.flush_bodies("f1", entries, chunk=chunk)]
        assert len(streamed) == parts
        assert [b for c in streamed for b in c] == [i.body for i in items]
    # Params gone while the batch is being sent: the stream breaks off, never sends a shorter body.
    await store.redis.hdel(K.request("c"), "body")
    for chunk in (2, 3):
        with pytest.raises(FlushChanged):
            [b async for c in store.flush_bodies("f1", entries, chunk=chunk) for b in c]


async def test_flush_bodies_check_whose_params_they_read(store: Store) -> None:
    """Params of the right size under another request id are not sent in its place."""
    await queue_and_flush(store, "a", "b")
    entries = await store.flush_entries("f1")
    assert entries[0].size == entries[1].size
    await store.redis.lset(K.flush_rids("f1"), 0, "b")
    with pytest.raises(FlushChanged):
        [b async for c in store.flush_bodies("f1", entries) for b in c]


async def test_flush_bodies_under_an_acl_user_that_may_not_sort_get(
    redis_server: RedisServer, redis_url: str
) -> None:
    """``SORT ... GET`` needs read access to every key: a user limited to batchd's keys (Keys.owns) reads
    flush bodies by the script instead."""
    admin = aioredis.Redis.from_url(redis_url)
    await admin.execute_command(
        "ACL", "SETUSER", "scoped", "on", ">pw", "~{batchd}:*", "~batchd:res:*", "&*", "+@all"
    )
    user = aioredis.Redis.from_url(f"redis://scoped:pw@127.0.0.1:{redis_server.port}/0")
    try:
        store = Store(user, K)
        await store.intake.ensure_group()
        await queue_and_flush(store, "a", "b", "c")
        entries = await store.flush_entries("f1")
        items = await store.flush_items("f1")
        with pytest.raises(ResponseError, match="ACL"):
            await user.sort_ro(K.flush_rids("f1"), by="nosort", get=["#", K.request_field("body")])
        assert [b async for c in store.flush_bodies("f1", entries, chunk=2) for b in c] == [
            i.body for i in items
        ]
        await store.redis.hdel(K.request("c"), "body")
        with pytest.raises(FlushChanged):
            [b async for c in store.flush_bodies("f1", entries, chunk=2) for b in c]
    finally:
        await user.aclose()
        await admin.execute_command("ACL", "DELUSER", "scoped")
        await admin.aclose()


async def test_cancel_flushed_answers_canceled(store: Store) -> None:
    await queue_and_flush(store, "a")

    assert await cancel(store, "a") is CancelOutcome.ANSWERED

    assert await stats(store) == (0, 0)  # not double-decremented: commit already took it off
    record = await store.request("a")
    assert record is not None and record.state is RequestState.DONE
    line, _ = await store.result_line("a")
    assert line is not None and orjson.loads(line)["result"]["type"] == "canceled"


async def test_cancel_done_keeps_the_answer(store: Store) -> None:
    await queue_and_flush(store, "a")
    await deliver(store, "a", 1, line_for("a", 1, SUCCEEDED))
    before = await dump(store.redis)

    assert await cancel(store, "a") is CancelOutcome.ALREADY_ANSWERED
    assert await dump(store.redis) == before


async def test_cancel_with_only_the_result_left_is_already_answered(store: Store) -> None:
    await store.redis.set(K.result("a"), b"line")
    assert await cancel(store, "a") is CancelOutcome.ALREADY_ANSWERED
    assert await store.result_line("a") == (b"line", True)


async def test_cancel_unknown_writes_nothing(store: Store) -> None:
    before = await dump(store.redis)
    assert await cancel(store, "ghost") is CancelOutcome.UNKNOWN
    assert await dump(store.redis) == before


# --- unknown_requests ------------------------------------------------------------------------------------
async def test_unknown_requests_names_those_with_neither_a_record_nor_an_answer(store: Store) -> None:
    await enqueue(store, [("queued", params())])
    await store.redis.set(K.result("answered"), b"{}")  # its record expired first
    rids = ["ghost", "queued", "answered", "gone"]
    assert await store.scripts.unknown_requests(rids) == [0, 3]
    assert await store.known_requests(rids) == {"queued", "answered"}
    assert await store.scripts.unknown_requests([]) == []


# --- lease and release_lock ------------------------------------------------------------------------------
async def test_lease_is_held_by_one_holder_until_it_lapses(store: Store) -> None:
    key = K.metrics_leader
    assert await store.scripts.lease(key, "a", ms=60_000)
    assert await store.scripts.lease(key, "a", ms=60_000)  # renewed by its holder
    assert not await store.scripts.lease(key, "b", ms=60_000)
    await store.redis.delete(key)  # as if it had lapsed
    assert await store.scripts.lease(key, "b", ms=60_000)


async def test_release_lock_only_by_its_holder(store: Store) -> None:
    lock = K.create_lock
    assert await store.take_lock(lock, "f1", ms=60_000)
    assert not await store.take_lock(lock, "f2", ms=60_000)
    assert not await store.release_lock(lock, "f2")
    assert await store.release_lock(lock, "f1")
    assert await store.take_lock(lock, "f2", ms=60_000)


# --- beat -----------------------------------------------------------------------------------------------
async def test_beat_renews_the_name_records_the_beat_and_takes_the_metrics_lease(store: Store) -> None:
    beat = await store.scripts.beat("r1", "tok1", now_ms=NOW, name_ms=15_000, metrics_ms=6_000)
    assert beat.owner and beat.leader
    assert await store.redis.get(K.replica_owner("r1")) == b"tok1"
    assert 0 < await store.redis.pttl(K.replica_owner("r1")) <= 15_000
    assert await store.heartbeats() == {"r1": NOW}
    assert await store.redis.get(K.metrics_leader) == b"r1"
    assert 0 < await store.redis.pttl(K.metrics_leader) <= 6_000
    # Another replica beats: its own name, no metrics lease while r1 holds it.
    other = await store.scripts.beat("r2", "tok2", now_ms=NOW + 1, name_ms=15_000, metrics_ms=6_000)
    assert other.owner and not other.leader
    assert await store.heartbeats() == {"r1": NOW, "r2": NOW + 1}
    await store.redis.delete(K.metrics_leader)  # as if r1's had lapsed
    assert (await store.scripts.beat("r2", "tok2", now_ms=NOW + 2, name_ms=15_000, metrics_ms=6_000)).leader


async def test_beat_of_a_process_whose_name_another_holds_writes_nothing(store: Store) -> None:
    await store.scripts.beat("r1", "tok1", now_ms=NOW, name_ms=15_000, metrics_ms=6_000)
    await store.redis.delete(K.metrics_leader)
    before = await dump(store.redis)
    beat = await store.scripts.beat("r1", "impostor", now_ms=NOW + 5, name_ms=15_000, metrics_ms=6_000)
    assert not beat.owner and not beat.leader
    assert await dump(store.redis) == before


# --- rate_slot -------------------------------------------------------------------------------------------
async def test_rate_slot_admits_the_limit_per_window_then_says_when_the_oldest_frees(store: Store) -> None:
    take = store.scripts.rate_slot
    assert [await take(now_ms=NOW + i, limit=3, window_ms=60_000, token=f"t{i}") for i in range(3)] == [
        0,
        0,
        0,
    ]
    # Full: the fourth waits until the first slot (taken at NOW) leaves the window.
    assert await take(now_ms=NOW + 10_000, limit=3, window_ms=60_000, token="t3") == 50_000
    # A refused call takes no slot: still 3 in the window, and the first frees at NOW + 60 s.
    assert await take(now_ms=NOW + 60_000, limit=3, window_ms=60_000, token="t4") == 0
    assert await take(now_ms=NOW + 60_001, limit=3, window_ms=60_000, token="t5") == 0
    assert await take(now_ms=NOW + 60_002, limit=3, window_ms=60_000, token="t6") == 0
    assert await take(now_ms=NOW + 60_003, limit=3, window_ms=60_000, token="t7") == 59_997
