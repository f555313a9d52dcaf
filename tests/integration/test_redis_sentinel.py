"""Redis Sentinel: ``redis+sentinel://`` URLs for the clients, the daemon and arq, and a failover.

Every server is a private ``redis-server`` started by the test (tests/redis_ha.py): a primary, a replica and
three sentinels. The failover test SIGKILLs the primary while callers submit and wait; the sentinels
promote the replica; the same clients and the same daemon carry on. With ``redis_min_replicas_ack=1``
every request a caller got accepted is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from anthropic.types.messages import MessageBatchResult

from batchd import AsyncClient, Client, RedisUnavailable
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
        "poll_interval_seconds": 0.1,
        "api_tier": 4,  # the emulator here enforces no rate limit
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


# --- failover ---------------------------------------------------------------------------------------------
class Callers:
    """Callers that each submit one request under their own id and await its answer, retrying as
    docs/operations.md tells them to: on RedisUnavailable (ReplicationTimeout included), submit again with
    the same request id, or ask for the result again."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.tasks: list[asyncio.Task[MessageBatchResult]] = []
        self.accepted: set[str] = set()
        self.answered: set[str] = set()
        self.errors: Counter[str] = Counter()

    def start(self) -> str:
        rid = f"caller-{len(self.tasks):04d}"
        self.tasks.append(asyncio.create_task(self._call(rid)))
        return rid

    async def _call(self, rid: str) -> MessageBatchResult:
        deadline = time.monotonic() + CALLER_DEADLINE
        while True:
            try:
                await self.client.submit(params(rid), request_id=rid)
                break
            except RedisUnavailable as exc:
                self._note(exc, deadline)
                await asyncio.sleep(0.05)
        self.accepted.add(rid)
        while True:
            try:
                result = await self.client.result(rid, timeout=max(0.1, deadline - time.monotonic()))
                break
            except RedisUnavailable as exc:
                self._note(exc, deadline)
                await asyncio.sleep(0.05)
        self.answered.add(rid)
        return result

    def _note(self, exc: RedisUnavailable, deadline: float) -> None:
        self.errors[type(exc).__name__] += 1
        if time.monotonic() > deadline:
            raise exc


async def test_failover_mid_flow_every_accepted_request_is_answered(tmp_path: Path, emulator: Any) -> None:
    with redis_ha(tmp_path) as ha:
        assert ha.replica is not None
        old_primary, replica = ha.primary, ha.replica
        settings = settings_for(ha, emulator, redis_min_replicas_ack=1)
        async with running_daemon(settings) as daemon, AsyncClient(settings=settings) as client:
            callers = Callers(client)

            async def produce(stop: asyncio.Event) -> None:
                # A caller every 50 ms, until told to stop: the failover happens under load.
                while not stop.is_set():
                    callers.start()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.05)

            stop = asyncio.Event()
            producer = asyncio.create_task(produce(stop))
            try:
                await eventually(lambda: _async(len(callers.answered) >= 5), what="answers before the kill")
                in_flight = len(callers.accepted - callers.answered)
                old_primary.kill()  # SIGKILL: nothing flushed, no goodbye to the replica
                killed_at = time.monotonic()

                await eventually(lambda: _async(ha.promoted(replica)), timeout=30, what="replica promoted")
                promoted_in = time.monotonic() - killed_at
                # The new primary has no replica yet: a submit is written but cannot be acknowledged.
                await eventually(
                    lambda: _async(callers.errors["ReplicationTimeout"] > 0),
                    timeout=15,
                    what="a submit refused for want of a replica",
                )
                # The old primary comes back as a replica of the new one (as an operator, or sentinel
                # itself, would make it); acknowledged submits resume.
                ha.start_replica(old_primary.dir, of=replica, port=old_primary.port)
                resumed = len(callers.accepted)
                await eventually(
                    lambda: _async(len(callers.accepted) >= resumed + 5), timeout=30, what="submits resume"
                )
            finally:
                stop.set()
                await producer
            results = await asyncio.wait_for(asyncio.gather(*callers.tasks), CALLER_DEADLINE + 15)

            assert not daemon.stop_event.is_set()  # the same daemon carried on throughout
        summary = (
            f"{len(callers.tasks)} callers, {in_flight} in flight at the kill, "
            f"promoted after {promoted_in:.1f}s, retries {dict(callers.errors)}, emulator {emulator.stats()}"
        )
        assert (
            callers.answered == callers.accepted == {f"caller-{i:04d}" for i in range(len(callers.tasks))}
        ), summary
        for i, result in enumerate(results):
            assert result.type == "succeeded", (i, result)
            assert result.message.content[0].text == f"echo: caller-{i:04d}", (i, summary)  # type: ignore[union-attr]
        # The kill landed mid-flow: callers saw Redis go away, and the new primary refuse to acknowledge.
        assert callers.errors["RedisUnavailable"] > 0, summary
        assert callers.errors["ReplicationTimeout"] > 0, summary
        print(summary)
