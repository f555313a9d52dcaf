"""Redis Sentinel: ``redis+sentinel://`` URLs for the clients, the daemon and arq.

Every server is a private ``redis-server`` started by the test (tests/redis_ha.py): a primary, a replica and
three sentinels.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from batchd import AsyncClient, Client
from batchd.settings import Settings, load_settings
from batchd.store import Keys, connect
from batchd.store.connection import connection_pool
from tests.daemon_harness import running_daemon
from tests.eventually import eventually
from tests.redis_ha import SERVICE, RedisHA, redis_ha
from tests.redis_server import free_port

KEYS = Keys()
# How long a caller keeps retrying: far more than a failover here takes (about 2-3 s), far less than the
# test's timeout.
CALLER_DEADLINE = 45.0


def params(text: str) -> dict[str, Any]:
    return {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": text}]}


def settings_for(ha: RedisHA, emulator: Any, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": ha.url(),
        "anthropic_api_key": "test-key",
        "anthropic_base_url": emulator.base_url,
        # Only the batch age and the poll interval are shortened (to make it fast); the rest are defaults.
        "max_batch_age_seconds": 0.5,
        "poll_min_seconds": 0.1,
        "poll_max_seconds": 0.5,
        "metrics_port": 0,
    }
    values.update(overrides)
    return load_settings(**values)


@pytest.fixture(scope="module")
def shared_ha(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisHA]:
    """One primary, replica and three sentinels for the tests that do not kill anything."""
    with redis_ha(tmp_path_factory.mktemp("sentinel")) as ha:
        yield ha


@pytest.fixture
def ha(shared_ha: RedisHA) -> RedisHA:
    with shared_ha.primary.client() as client:
        client.flushall()
    return shared_ha


# --- through the sentinels, no failover -------------------------------------------------------------------
async def test_clients_daemon_and_arq_find_the_primary_through_the_sentinels(
    ha: RedisHA, emulator: Any
) -> None:
    settings = settings_for(ha, emulator)
    async with running_daemon(settings) as daemon, AsyncClient(settings=settings) as client:
        answers = await asyncio.gather(*(client.messages.create(**params(f"hello {i}")) for i in range(20)))
        assert [a.content[0].text for a in answers] == [f"echo: hello {i}" for i in range(20)]  # type: ignore[union-attr]
        # The daemon's own connection and arq's found the same primary: the batches were created by
        # arq's submit job and are recorded on the primary.
        assert await daemon.redis.ping()
    assert emulator.stats()["batches_created"] >= 1
    with ha.primary.client() as primary:
        assert primary.exists(KEYS.schema)
        assert any(key.startswith(b"{batchd}:arq:") for key in primary.keys("*"))


async def test_the_client_pool_is_bounded_and_blocking_through_sentinel(ha: RedisHA) -> None:
    # Two connections, one of them for the result waiters' pub/sub; six callers each hold one for 0.2 s
    # (a BLPOP that times out): they queue for it instead of failing with "Too many connections".
    redis = connect(ha.url(), "client", max_connections=2)
    try:
        started = time.monotonic()
        replies = await asyncio.gather(*(redis.blpop([f"nothing:{i}"], timeout=0.2) for i in range(6)))
        assert replies == [None] * 6
        assert time.monotonic() - started >= 0.2 * 3  # at most two at a time
    finally:
        await redis.aclose(close_connection_pool=True)


async def test_concurrent_discoveries_keep_every_sentinel(ha: RedisHA) -> None:
    # The first sentinel is down, so each discovery succeeds on a later one and moves it to the front of
    # the list: done by twenty new connections at once, that must leave every sentinel in the list once
    # (redis-py 5's own Sentinel drops one here, and never asks it again).
    hosts = [f"127.0.0.1:{free_port()}", *(f"127.0.0.1:{s.port}" for s in ha.sentinels)]
    pool = connection_pool(f"redis+sentinel://{','.join(hosts)}/{SERVICE}", "client")
    manager = pool.sentinel_manager
    before = list(manager.sentinels)
    try:
        found = await asyncio.gather(*(manager.discover_master(SERVICE) for _ in range(20)))
        assert {(host, int(port)) for host, port in found} == {("127.0.0.1", ha.primary.port)}
        assert sorted(map(id, manager.sentinels)) == sorted(map(id, before))
    finally:
        await pool.disconnect()


async def test_closing_a_sentinel_client_closes_its_sentinel_connections(ha: RedisHA) -> None:
    def sentinel_clients() -> int:
        total = 0
        for sentinel in ha.sentinels:
            with sentinel.client() as client:
                # Our own connection and the other sentinels' links are not the client's.
                total += sum(
                    1 for c in client.client_list() if c.get("name") == "" and c.get("cmd") != "client|list"
                )
        return total

    before = sentinel_clients()
    for purpose in ("client", "daemon", "jobs"):
        redis = connect(ha.url(), purpose)  # type: ignore[arg-type]
        await redis.ping()
        assert sentinel_clients() > before
        await redis.aclose(close_connection_pool=True)
        await eventually(lambda: _async(sentinel_clients() == before), timeout=10, what=f"{purpose}: closed")


async def _async(value: bool) -> bool:
    return value


def test_the_sync_client_works_through_sentinel(ha: RedisHA) -> None:
    # Client runs AsyncClient on a loop of its own, in another thread: the sentinel pool lives there.
    with Client(ha.url()) as client:
        rid = client.submit(params("sync"))
        assert client.peek(rid) is None
    with ha.primary.client() as primary:
        assert primary.exists(KEYS.request(rid))
