"""The client when Redis is down, frozen, restarted, or out of memory: a clear error, never a hang.

Tests that stop or freeze Redis start their own server (``RedisServer.start_new``) so the session server
that every other test shares is never disturbed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from anthropic.types.messages import MessageBatchSucceededResult

from batchd import AsyncClient, Client, RedisUnavailable, ResultTimeout
from batchd.settings import Settings
from batchd.store import DeliverOutcome, Delivery, IntakeEntry, Keys, Store, custom_id_for
from tests.eventually import eventually
from tests.redis_server import RedisServer

K = Keys()
# "Within a few seconds": refused connections must fail at once, a frozen server within socket_timeout.
FAIL_FAST = 5.0


def params(text: str = "hello") -> dict[str, Any]:
    return {"model": "claude-x", "max_tokens": 16, "messages": [{"role": "user", "content": text}]}


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    # AOF on, so a stop/start keeps the queued requests (the restart test needs them back).
    server = RedisServer.start_new(tmp_path, "--appendonly", "yes", "--appendfsync", "always")
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            # A frozen (SIGSTOP) server would ignore SIGTERM until continued.
            os.kill(server.process.pid, signal.SIGCONT)
        server.stop()


@pytest.fixture
async def own_client(
    own_server: RedisServer, make_settings: Callable[..., Settings]
) -> AsyncIterator[AsyncClient]:
    settings = make_settings(redis_url=own_server.url)
    async with AsyncClient(settings=settings, socket_timeout=1.0) as client:
        yield client


async def _flush_and_deliver(r: aioredis.Redis, rid: str, text: str) -> str:
    """The daemon's part for one request: commit it into a flush, then deliver a succeeded line.
    Returns the params the request was stored with (what the daemon would have sent)."""
    store = Store(r, K)
    await store.intake.ensure_group()
    entries = await store.intake.read_new("double", count=100, block_ms=None)
    await store.scripts.commit_flush("f1", [e.entry_id for e in entries], [e.rid for e in entries], now_ms=0)
    [item] = [i for i in await store.flush_items("f1") if i.rid == rid]
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }
    line = orjson.dumps(
        {"custom_id": custom_id_for(rid, 1), "result": {"type": "succeeded", "message": message}}
    )
    [reply] = await store.scripts.deliver(
        [Delivery(rid, 1, line, retry=False)], max_attempts=3, ttl_seconds=3600
    )
    assert reply.outcome is DeliverOutcome.DELIVERED
    return item.body.decode()


async def _listener_subscribed(url: str) -> None:
    async with aioredis.Redis.from_url(url) as r:

        async def subscribed() -> bool:
            return int((await r.pubsub_numsub(K.delivered_channel))[0][1]) > 0

        await eventually(subscribed, timeout=FAIL_FAST, what="the result listener to subscribe")


# --- Redis down ------------------------------------------------------------------------------------------
async def test_submit_with_redis_stopped_raises_redis_unavailable(
    own_server: RedisServer, own_client: AsyncClient
) -> None:
    own_server.stop()
    started = time.monotonic()
    async with asyncio.timeout(FAIL_FAST):
        with pytest.raises(RedisUnavailable, match="unreachable"):
            await own_client.submit(params())
        with pytest.raises(RedisUnavailable):
            await own_client.submit_many([params(), params()])
    assert time.monotonic() - started < FAIL_FAST


async def test_result_with_redis_stopped_raises_redis_unavailable(
    own_server: RedisServer, own_client: AsyncClient
) -> None:
    rid = await own_client.submit(params())
    own_server.stop()
    async with asyncio.timeout(FAIL_FAST):
        with pytest.raises(RedisUnavailable):
            await own_client.result(rid, timeout=60)
        with pytest.raises(RedisUnavailable):
            await own_client.peek(rid)
        with pytest.raises(RedisUnavailable):
            await own_client.cancel(rid)
        with pytest.raises(RedisUnavailable):
            await own_client.ping()


def test_sync_client_with_redis_stopped_raises_redis_unavailable(
    own_server: RedisServer, make_settings: Callable[..., Settings]
) -> None:
    with Client(settings=make_settings(redis_url=own_server.url), socket_timeout=1.0) as client:
        own_server.stop()
        started = time.monotonic()
        with pytest.raises(RedisUnavailable):
            client.submit(params())
        assert time.monotonic() - started < FAIL_FAST


async def test_frozen_redis_fails_within_socket_timeout(
    own_server: RedisServer, own_client: AsyncClient
) -> None:
    await own_client.ping()  # a connection is open and pooled before the freeze
    assert own_server.process is not None
    os.kill(own_server.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        async with asyncio.timeout(FAIL_FAST):
            with pytest.raises(RedisUnavailable):
                await own_client.submit(params())
        # socket_timeout is 1 s: the error comes from it, not from the test's own guard.
        assert time.monotonic() - started < 3.0
    finally:
        os.kill(own_server.process.pid, signal.SIGCONT)


async def test_waiter_survives_a_redis_restart(own_server: RedisServer, own_client: AsyncClient) -> None:
    rid = await own_client.submit(params())
    waiting = asyncio.create_task(own_client.result(rid, timeout=60))
    await _listener_subscribed(own_server.url)

    own_server.stop()
    own_server.start()  # same port; the AOF brings the queued request back
    assert not waiting.done()

    async with aioredis.Redis.from_url(own_server.url) as r:
        assert await Store(r, K).request(rid) is not None
        await _flush_and_deliver(r, rid, "after restart")

    # The listener reconnects (backoff <= a few s) and re-checks pending ids, even though the publish
    # may have happened while it was disconnected.
    async with asyncio.timeout(15):
        result = await waiting
    assert isinstance(result, MessageBatchSucceededResult)
    assert result.message.content[0].text == "after restart"  # type: ignore[union-attr]


async def test_wait_with_redis_gone_ends_in_result_timeout(
    own_server: RedisServer, own_client: AsyncClient
) -> None:
    # Redis goes away *during* the wait: the caller's timeout still bounds it.
    rid = await own_client.submit(params())
    waiting = asyncio.create_task(own_client.result(rid, timeout=1.0))
    await _listener_subscribed(own_server.url)
    own_server.stop()
    async with asyncio.timeout(FAIL_FAST):
        with pytest.raises(ResultTimeout):
            await waiting


# --- out of memory ---------------------------------------------------------------------------------------
async def test_submit_out_of_memory_raises_and_writes_nothing(
    redis_server: RedisServer, make_settings: Callable[..., Settings], aredis: aioredis.Redis
) -> None:
    async with AsyncClient(settings=make_settings()) as client:
        await client.ping()  # connect (and load nothing) before memory runs out
        # The session fixture resets both settings for the next test.
        redis_server.config_set("maxmemory-policy", "noeviction")
        redis_server.config_set("maxmemory", 1)

        with pytest.raises(RedisUnavailable, match="out of memory") as info:
            await client.submit(params(), "oom-1")
        assert "nothing was written" in str(info.value)
        with pytest.raises(RedisUnavailable, match="out of memory"):
            await client.submit_many([params(), params()], ["oom-2", "oom-3"])

    for rid in ("oom-1", "oom-2", "oom-3"):
        assert await aredis.exists(K.request(rid)) == 0
    assert await aredis.exists(K.intake) == 0
    assert await aredis.exists(K.queue_stats) == 0


# --- Redis crash -----------------------------------------------------------------------------------------
async def test_acknowledged_submit_survives_a_redis_crash(
    own_server: RedisServer, own_client: AsyncClient
) -> None:
    # own_server runs with appendfsync always: once submit returns, the request is on disk.
    rid = await own_client.submit(params("durable"), "durable-1")
    port = own_server.port
    own_server.kill()
    own_server.start()
    assert own_server.port == port  # clients keep their URL across the restart

    async with aioredis.Redis.from_url(own_server.url) as r:
        queued = [IntakeEntry.from_stream(i, f) for i, f in await r.xrange(K.intake)]
        assert [e.rid for e in queued if e is not None] == [rid]
        assert orjson.loads(await _flush_and_deliver(r, rid, "answered")) == params("durable")
    # The same client object carries on once Redis is back (its pooled connections were dropped).
    assert await own_client.submit(params("durable"), "durable-1") == rid
    assert isinstance(await own_client.submit(params("after")), str)
