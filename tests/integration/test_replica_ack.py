"""``redis_min_replicas_ack``: a submit returns only once its write is on that many replicas (Redis WAIT).

A real primary and replica (tests/redis_ha.py). A SIGSTOPped replica stays connected but acknowledges
nothing; a replica pointed elsewhere is cut off, as in a partition. Without the setting, a submit the
replica has not received is lost when it is promoted; with it, that submit raised ReplicationTimeout.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchd import AsyncClient, QueueFull, RedisUnavailable, ReplicationTimeout
from batchd.settings import load_settings
from batchd.store import Keys, connect
from batchd.store.connection import one_connection, require_replicas
from tests.redis_ha import RedisHA, redis_ha
from tests.redis_server import RedisServer, free_port

KEYS = Keys()


def params(text: str) -> dict[str, Any]:
    return {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": text}]}


@pytest.fixture
def ha(tmp_path: Path) -> Iterator[RedisHA]:
    """A primary and one replica in sync, no sentinels (a plain redis:// URL to the primary)."""
    with redis_ha(tmp_path, sentinels=0) as ha:
        yield ha


def replica_of(ha: RedisHA) -> RedisServer:
    assert ha.replica is not None and ha.replica.process is not None
    return ha.replica


class stalled:
    """SIGSTOP the replica: its link stays up, it acknowledges nothing, until SIGCONT."""

    def __init__(self, server: RedisServer) -> None:
        assert server.process is not None
        self.pid = server.process.pid

    def __enter__(self) -> stalled:
        os.kill(self.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc: object) -> None:
        os.kill(self.pid, signal.SIGCONT)


def client_for(ha: RedisHA, acks: int) -> AsyncClient:
    return AsyncClient(settings=load_settings(redis_url=ha.primary.url, redis_min_replicas_ack=acks))


def on(server: RedisServer, rid: str) -> bool:
    with server.client() as client:
        return bool(client.exists(KEYS.request(rid)))


async def test_a_submit_returns_once_the_replica_has_it(ha: RedisHA) -> None:
    replica = replica_of(ha)
    async with client_for(ha, 1) as client:
        rid = await client.submit(params("one"))
        assert on(replica, rid)  # at once: WAIT returned only after the replica applied it
        rids = await client.submit_many([params(f"many {i}") for i in range(1200)])  # three chunks
        with replica.client() as r:
            assert sum(r.exists(KEYS.request(x)) for x in rids) == 1200


async def test_an_unacknowledged_submit_raises_replication_timeout_and_a_resubmit_is_the_remedy(
    ha: RedisHA,
) -> None:
    replica = replica_of(ha)
    settings = load_settings(redis_url=ha.primary.url, redis_min_replicas_ack=1)
    timeout = settings.redis_min_replicas_ack_timeout_seconds
    async with AsyncClient(settings=settings) as client:
        with stalled(replica):
            started = time.monotonic()
            with pytest.raises(ReplicationTimeout) as info:
                await client.submit(params("unconfirmed"), request_id="req-1")
            assert time.monotonic() - started >= timeout
            assert isinstance(info.value, RedisUnavailable)
            assert info.value.request_ids == ["req-1"]
            assert (info.value.wanted, info.value.acked) == (1, 0)
            assert "same request id" in str(info.value)
            assert on(ha.primary, "req-1")  # written on the primary: it will run unless a failover loses it
            # A resubmit of the same id is a no-op on the primary, and yet waits for the replica to have
            # the first write: it raises again while the replica is behind, even from another connection
            # (another client, or process) than the one that wrote it.
            async with AsyncClient(settings=settings) as another:
                with pytest.raises(ReplicationTimeout):
                    await another.submit(params("unconfirmed"), request_id="req-1")
        assert await client.submit(params("unconfirmed"), request_id="req-1") == "req-1"
        assert on(replica, "req-1")
        with ha.primary.client() as primary:
            assert primary.xlen(KEYS.intake) == 1  # queued once, however often it was submitted


async def test_the_wait_covers_writes_made_through_other_connections(ha: RedisHA) -> None:
    # WAIT is documented to count the writes of its own connection only. A resubmitted id writes nothing,
    # so require_replicas must first move its connection's offset to the primary's (Redis 7.0 happens to
    # do so for any keyed command, e.g. the enqueue script; the documented contract does not promise it).
    redis = connect(ha.primary.url, "client")
    try:
        await redis.set("written-elsewhere", 1)
        with stalled(replica_of(ha)):
            await redis.set("written-elsewhere", 2)
            async with one_connection(redis, pinned=True) as pinned:
                await pinned.initialize()  # a connection of its own that has sent nothing yet
                with pytest.raises(ReplicationTimeout):
                    await require_replicas(pinned, KEYS, 1, 0.2, ["rid"])
        async with one_connection(redis, pinned=True) as pinned:
            await pinned.initialize()
            await require_replicas(pinned, KEYS, 1, 5.0, ["rid"])
    finally:
        await redis.aclose(close_connection_pool=True)


async def test_a_timeout_under_a_millisecond_still_ends(ha: RedisHA) -> None:
    # WAIT with 0 ms would block for ever: the smallest accepted setting waits 1 ms.
    settings = load_settings(
        redis_url=ha.primary.url, redis_min_replicas_ack=1, redis_min_replicas_ack_timeout_seconds=1e-6
    )
    async with AsyncClient(settings=settings) as client:
        with stalled(replica_of(ha)), pytest.raises(ReplicationTimeout):
            await asyncio.wait_for(client.submit(params("quick")), 5)


async def test_a_refused_submit_does_not_wait_for_replicas(ha: RedisHA) -> None:
    # QueueFull is about the queue, not replication: a stalled replica must not turn it into a timeout.
    settings = load_settings(redis_url=ha.primary.url, redis_min_replicas_ack=1, max_queued_requests=1)
    async with AsyncClient(settings=settings) as client:
        await client.submit(params("fits"))
        with stalled(replica_of(ha)), pytest.raises(QueueFull):
            await client.submit(params("does not fit"))


async def test_when_a_replica_that_is_behind_is_promoted_only_the_acknowledged_submitter_was_warned(
    ha: RedisHA,
) -> None:
    """What docs/operations.md says is lost with the acknowledgement off: a submit that returned."""
    replica = replica_of(ha)
    async with client_for(ha, 0) as plain, client_for(ha, 1) as acked:
        await plain.submit(params("before"), request_id="before")
        # Acknowledged: on the replica, with every write the primary had before it ("before" too).
        await acked.submit(params("before, acked"), request_id="before-acked")
        with replica.client() as r:
            # Cut off from the primary (it keeps its data and receives nothing more), as in a partition.
            r.replicaof("127.0.0.1", str(free_port()))
        assert await plain.submit(params("accepted"), request_id="lost") == "lost"
        with pytest.raises(ReplicationTimeout):
            await acked.submit(params("warned"), request_id="warned")
        assert on(ha.primary, "lost") and on(ha.primary, "warned")
        ha.primary.kill()
    with replica.client() as promoted:
        promoted.replicaof("NO", "ONE")  # what a sentinel does to the replica it promotes
        assert promoted.exists(KEYS.request("before"), KEYS.request("before-acked")) == 2
        # Accepted without the acknowledgement, and gone; the acknowledged client had been told.
        assert not promoted.exists(KEYS.request("lost"))
        assert not promoted.exists(KEYS.request("warned"))
