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
from redis.exceptions import ResponseError

from batchd import AsyncClient, Client, RedisUnavailable, ResultTimeout
from batchd.keys import CONSUMER_GROUP, Keys, custom_id_for
from batchd.scripts import Scripts
from batchd.settings import Settings
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


async def _flush_and_deliver(r: aioredis.Redis, rid: str, text: str) -> None:
    """The daemon's part for one request: commit it into a flush, then deliver a succeeded line."""
    scripts = Scripts.register(r)
    try:
        await r.xgroup_create(K.intake, CONSUMER_GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    reply = await r.xreadgroup(CONSUMER_GROUP, "double", {K.intake: ">"})
    entries = [(eid.decode(), f[b"rid"].decode()) for eid, f in reply[0][1]]
    args: list[Any] = [CONSUMER_GROUP, "f1", 0]
    for eid, entry_rid in entries:
        args += [eid, entry_rid]
    await scripts.commit_flush(
        keys=[K.intake, K.queue_stats, K.flush("f1"), K.flush_rids("f1"), K.flushes]
        + [K.request(entry_rid) for _, entry_rid in entries],
        args=args,
    )
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
    code = await scripts.deliver(
        keys=[K.request(rid), K.result(rid), K.intake, K.queue_stats],
        args=[1, line, "0", 3, 3600, K.delivered_channel, rid],
    )
    assert int(code[0]) == 1


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
    async with aioredis.Redis.from_url(own_server.url) as r:
        deadline = time.monotonic() + FAIL_FAST
        while int((await r.pubsub_numsub(K.delivered_channel))[0][1]) == 0:
            assert time.monotonic() < deadline, "the result listener never subscribed"
            await asyncio.sleep(0.01)

    own_server.stop()
    own_server.start()  # same port; the AOF brings the queued request back
    assert not waiting.done()

    async with aioredis.Redis.from_url(own_server.url) as r:
        assert await r.exists(K.request(rid)) == 1
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
    async with aioredis.Redis.from_url(own_server.url) as r:
        deadline = time.monotonic() + FAIL_FAST
        while int((await r.pubsub_numsub(K.delivered_channel))[0][1]) == 0:
            assert time.monotonic() < deadline, "the result listener never subscribed"
            await asyncio.sleep(0.01)
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
    assert await aredis.hget(K.queue_stats, "n") is None


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
        body = await r.hget(K.request(rid), "body")
        assert body is not None and orjson.loads(body) == params("durable")
        assert [f[b"rid"] for _, f in await r.xrange(K.intake)] == [rid.encode()]
    # The same client object carries on once Redis is back (its pooled connections were dropped).
    assert await own_client.submit(params("durable"), "durable-1") == rid
    assert isinstance(await own_client.submit(params("after")), str)
