"""Backpressure: max_queued_requests / max_queued_bytes cap the intake queue.

Past a cap, submit fails fast with QueueFull (naming the setting) and writes nothing; with ``wait=S`` it waits
up to S seconds for a daemon to make room. Redis out-of-memory at submit is covered in
test_redis_faults_client.py (test_submit_out_of_memory_raises_and_writes_nothing).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from batchd import AsyncClient, BatchdError, InvalidRequest, QueueFull
from batchd.settings import Settings
from batchd.store import IntakeEntry, Keys, Store
from tests.daemon_harness import running_daemon

K = Keys()


def params(text: str = "hi", pad: int = 0) -> dict[str, Any]:
    return {
        "model": "claude-haiku-4-5",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": text + "x" * pad}],
    }


def size(p: dict[str, Any]) -> int:
    return len(orjson.dumps(p))


async def queued(r: aioredis.Redis) -> list[int]:
    """The queue's stats: [requests, bytes] queued and not yet flushed."""
    snap = await Store(r, K).snapshot(dead_after_ms=10_000)
    return [snap.pending_requests, snap.pending_bytes]


async def stream(r: aioredis.Redis) -> list[IntakeEntry]:
    return [e for i, f in await r.xrange(K.intake) if (e := IntakeEntry.from_stream(i, f)) is not None]


async def snapshot(r: aioredis.Redis) -> tuple[int, list[int], set[bytes]]:
    """Everything a refused submit must leave alone: stream length, queue stats, the set of keys."""
    return await r.xlen(K.intake), await queued(r), set(await r.keys("*"))


# --- caps, fail fast -----------------------------------------------------------------------------------
async def test_past_the_request_cap_submit_fails_fast_and_writes_nothing(
    make_settings: Callable[..., Settings], aredis: aioredis.Redis
) -> None:
    settings = make_settings(max_queued_requests=5)
    async with AsyncClient(settings=settings) as client:
        for i in range(5):
            await client.submit(params(f"q{i}"), f"ok-{i}")
        before = await snapshot(aredis)
        assert before[0] == 5 and before[1][0] == 5

        started = time.monotonic()
        with pytest.raises(QueueFull) as info:
            await client.submit(params("one too many"), "refused-1")
        assert time.monotonic() - started < 0.5, "a full queue without wait= must fail at once"
        assert "BATCHD_MAX_QUEUED_REQUESTS=5" in str(info.value)
        assert info.value.accepted == []
        with pytest.raises(QueueFull):
            await client.submit_many([params("a"), params("b")], ["refused-2", "refused-3"])

        assert await snapshot(aredis) == before
        for rid in ("refused-1", "refused-2", "refused-3"):
            assert await aredis.exists(K.request(rid), K.result(rid)) == 0
        # A duplicate of a queued id is not new work: the cap does not refuse it.
        assert await client.submit(params("q0"), "ok-0") == "ok-0"
        assert await snapshot(aredis) == before


async def test_caps_count_bytes(make_settings: Callable[..., Settings], aredis: aioredis.Redis) -> None:
    p = params(pad=800)
    n = size(p)
    # Room for two such requests, not three; the request cap is far away.
    settings = make_settings(max_queued_requests=1000, max_queued_bytes=max(1024, 2 * n + n // 2))
    async with AsyncClient(settings=settings) as client:
        await client.submit_many([p, p], ["b-1", "b-2"])
        assert await queued(aredis) == [2, 2 * n]
        before = await snapshot(aredis)
        with pytest.raises(QueueFull) as info:
            await client.submit(p, "b-3")
        assert "BATCHD_MAX_QUEUED_BYTES" in str(info.value)
        assert await snapshot(aredis) == before
        # A small request still fits in the bytes left.
        small = params("s")
        assert 2 * n + size(small) <= settings.max_queued_bytes
        await client.submit(small, "b-small")
        assert await queued(aredis) == [3, 2 * n + size(small)]


async def test_cancel_of_a_queued_request_frees_its_room(
    make_settings: Callable[..., Settings], aredis: aioredis.Redis
) -> None:
    async with AsyncClient(settings=make_settings(max_queued_requests=2)) as client:
        await client.submit_many([params("a"), params("b")], ["c-1", "c-2"])
        with pytest.raises(QueueFull):
            await client.submit(params("c"), "c-3")
        assert await client.cancel("c-1") is True
        assert await client.submit(params("c"), "c-3") == "c-3"


async def test_concurrent_submitters_never_pass_the_cap(
    make_settings: Callable[..., Settings], aredis: aioredis.Redis
) -> None:
    settings = make_settings(max_queued_requests=10)
    clients = [AsyncClient(settings=settings) for _ in range(5)]
    try:
        outcomes = await asyncio.gather(
            *(clients[i % 5].submit(params(f"r{i}"), f"race-{i}") for i in range(60)), return_exceptions=True
        )
    finally:
        for c in clients:
            await c.close()
    accepted = [o for o in outcomes if isinstance(o, str)]
    refused = [o for o in outcomes if isinstance(o, QueueFull)]
    assert len(accepted) == 10 and len(refused) == 50, outcomes
    assert await aredis.xlen(K.intake) == 10
    assert (await queued(aredis))[:1] == [10]
    assert sum([await aredis.exists(K.request(f"race-{i}")) for i in range(60)]) == 10


# --- submit_many: partial acceptance ------------------------------------------------------------------
async def test_submit_many_reports_the_prefix_it_queued(
    make_settings: Callable[..., Settings], aredis: aioredis.Redis
) -> None:
    # More than one Lua chunk (500): the queue fills part-way through the call.
    settings = make_settings(max_queued_requests=700)
    rids = [f"m-{i:04d}" for i in range(1000)]
    async with AsyncClient(settings=settings) as client:
        with pytest.raises(QueueFull) as info:
            await client.submit_many([params(r) for r in rids], rids)
    accepted = info.value.accepted
    assert 500 <= len(accepted) <= 700
    assert accepted == rids[: len(accepted)], "accepted must be the queued prefix, in order"
    assert f"{len(accepted)} of 1000" in str(info.value)
    assert await aredis.xlen(K.intake) == len(accepted)
    queued = [e.rid for e in await stream(aredis)]
    assert queued == accepted
    assert await aredis.exists(*(K.request(r) for r in rids[len(accepted) :])) == 0


async def test_submit_many_of_more_than_the_cap_fills_the_room_it_has(
    make_settings: Callable[..., Settings], aredis: aioredis.Redis
) -> None:
    # An empty queue with room for 5, and 8 requests in one call (one Lua chunk): the 5 that fit are queued
    # and reported, as when the queue fills part-way through a call of several chunks.
    settings = make_settings(max_queued_requests=5)
    rids = [f"p-{i}" for i in range(8)]
    async with AsyncClient(settings=settings) as client:
        with pytest.raises(QueueFull) as info:
            await client.submit_many([params(r) for r in rids], rids)
    assert info.value.accepted == rids[:5]
    assert await aredis.xlen(K.intake) == 5


# --- wait= ---------------------------------------------------------------------------------------------
async def test_submit_with_wait_succeeds_once_a_daemon_drains_the_queue(
    make_settings: Callable[..., Settings], emulator: Any, store: Store
) -> None:
    settings = make_settings(emulator=True, max_queued_requests=3, max_batch_age_seconds=0.2)
    async with AsyncClient(settings=settings) as client:
        full = await client.submit_many([params(f"f{i}") for i in range(3)])
        waiting = asyncio.create_task(client.submit(params("patient"), "patient-1", wait=20))
        # No daemon yet: nothing can make room, so the submit is still waiting (not failed, not through).
        done, _ = await asyncio.wait({waiting}, timeout=0.5)
        assert not done
        assert await store.request("patient-1") is None

        started = time.monotonic()
        async with running_daemon(settings):
            async with asyncio.timeout(15):
                assert await waiting == "patient-1"
            assert time.monotonic() - started < 15
            results = await asyncio.gather(*(client.result(r, timeout=30) for r in [*full, "patient-1"]))
    assert [r.type for r in results] == ["succeeded"] * 4


async def test_submit_with_wait_raises_queue_full_when_nothing_drains(
    make_settings: Callable[..., Settings], aredis: aioredis.Redis
) -> None:
    async with AsyncClient(settings=make_settings(max_queued_requests=2)) as client:
        await client.submit_many([params("a"), params("b")])
        before = await snapshot(aredis)
        wait = 1.5
        started = time.monotonic()
        with pytest.raises(QueueFull, match="BATCHD_MAX_QUEUED_REQUESTS"):
            await client.submit(params("c"), "w-1", wait=wait)
        elapsed = time.monotonic() - started
        # It waited the time it was given (room could have come at any moment of it), and not much more.
        assert wait * 0.9 <= elapsed < wait + 1.0, f"gave up after {elapsed:.2f}s of wait={wait}"
        assert await snapshot(aredis) == before


async def test_submit_many_with_wait_larger_than_the_cap_completes_as_the_daemon_drains(
    make_settings: Callable[..., Settings], emulator: Any
) -> None:
    # 8 requests, room for 3 at a time: with wait= and a daemon draining, all of them get in.
    settings = make_settings(emulator=True, max_queued_requests=3, max_batch_age_seconds=0.1)
    async with running_daemon(settings), AsyncClient(settings=settings) as client:
        async with asyncio.timeout(10):
            rids = await client.submit_many([params(f"d{i}") for i in range(8)], wait=4)
        results = await asyncio.gather(*(client.result(r, timeout=30) for r in rids))
    assert [r.type for r in results] == ["succeeded"] * 8


async def test_a_request_bigger_than_the_byte_cap_is_refused_at_once_even_with_wait(
    make_settings: Callable[..., Settings], aredis: aioredis.Redis
) -> None:
    # It can never fit, however long the caller waits: waiting out `wait` would only hide the mistake.
    settings = make_settings(max_queued_bytes=1024)
    huge = params(pad=2000)
    async with AsyncClient(settings=settings) as client:
        started = time.monotonic()
        with pytest.raises((QueueFull, InvalidRequest)) as info:
            await client.submit(huge, "huge-1", wait=5)
        assert isinstance(info.value, BatchdError)
        assert time.monotonic() - started < 1.0, "refused only after waiting for room that can never come"
        assert "BATCHD_MAX_QUEUED_BYTES" in str(info.value)
    assert await aredis.exists(K.request("huge-1")) == 0
    assert await aredis.xlen(K.intake) == 0
