"""Two daemon replicas on one Redis: the work spreads over both, and still every request is in exactly
one flush, sent to the API once, and answered once. A replica that stops gracefully hands its queued
requests over to the other."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from batchd import AsyncClient
from batchd import daemon as daemon_module
from batchd.accumulator import Accumulator, Entry
from batchd.settings import Settings
from batchd.store import Keys, Store, Trigger
from tests.chaos.harness import Publications
from tests.daemon_harness import running_daemon
from tests.eventually import eventually

KEYS = Keys()


def params(text: str) -> dict[str, Any]:
    return {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": text}]}


class FlushRecord:
    def __init__(self) -> None:
        self.flushes: list[tuple[str, str, list[str]]] = []  # consumer, fid, rids

    def by_consumer(self) -> Counter[str]:
        return Counter(consumer for consumer, _, _ in self.flushes)

    def consumer_of(self) -> dict[str, str]:
        return {rid: consumer for consumer, _, rids in self.flushes for rid in rids}


@pytest.fixture
def flush_record(monkeypatch: pytest.MonkeyPatch) -> Iterator[FlushRecord]:
    """The daemons' accumulators, recording which replica sealed which flush (the flush record does not
    name its replica)."""
    record = FlushRecord()

    class RecordingAccumulator(Accumulator):
        async def flush(self, entries: list[Entry], trigger: Trigger, group: str = "") -> str | None:
            fid = await super().flush(entries, trigger, group)
            if fid is not None:
                record.flushes.append((self.consumer, fid, [rid for _, rid, _ in entries]))
            return fid

    monkeypatch.setattr(daemon_module, "Accumulator", RecordingAccumulator)
    yield record


@pytest.fixture
async def publications(redis_url: str) -> AsyncIterator[tuple[Publications, aioredis.Redis]]:
    client = aioredis.Redis.from_url(redis_url)
    counter = Publications()
    listener = asyncio.create_task(counter.listen(client, KEYS.delivered_channel))
    try:
        await asyncio.wait_for(counter.listening.wait(), 5)
        yield counter, client
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        await client.aclose()


async def test_two_replicas_share_2000_requests_each_answered_once_and_sent_once(
    store: Store,
    make_settings: Callable[..., Settings],
    emulator: Any,
    flush_record: FlushRecord,
    publications: tuple[Publications, aioredis.Redis],
) -> None:
    counter, observer = publications
    settings = make_settings(emulator=True, max_batch_requests=100, max_batch_age_seconds=0.2)
    texts = {f"req-{i:04d}": f"replicated request {i}" for i in range(2000)}
    async with (
        running_daemon(settings, consumer="replica-a"),
        running_daemon(settings, consumer="replica-b"),
        AsyncClient(settings=settings) as client,
    ):

        async def caller(rid: str) -> None:
            await client.submit(params(texts[rid]), rid)
            result = await client.result(rid, timeout=60)
            assert result.type == "succeeded"
            assert result.message.content[0].text == "echo: " + texts[rid]  # type: ignore[union-attr]

        await asyncio.gather(*(caller(rid) for rid in texts))

        async def drained() -> bool:
            snap = await store.snapshot(dead_after_ms=10_000)
            return not snap.open_batches and not snap.flushes_waiting

        await eventually(drained, timeout=30)
    await counter.barrier(observer, KEYS.delivered_channel)

    # Spread: both replicas read and flushed requests.
    by_consumer = flush_record.by_consumer()
    assert set(by_consumer) == {"replica-a", "replica-b"}, by_consumer
    # Every request in exactly one flush, every flush in one batch, every custom id sent once.
    flushed = Counter(rid for _, _, rids in flush_record.flushes for rid in rids)
    assert flushed == Counter(dict.fromkeys(texts, 1))
    batch_of_flush: Counter[str] = Counter()
    for _, fid, _ in flush_record.flushes:
        flush = await store.flush(fid)
        batch_of_flush[flush.batch_id or "" if flush else ""] += 1
    assert "" not in batch_of_flush and set(batch_of_flush.values()) == {1}
    stats = emulator.stats()
    assert (stats["requests_received"], stats["duplicate_custom_ids"]) == (2000, 0)
    assert stats["batches_created"] == len(flush_record.flushes)
    # Every request answered exactly once.
    assert counter.answers() == Counter(dict.fromkeys(texts, 1))
    print(
        f"\nreplicas: {dict(by_consumer)} flushes, {stats['batches_created']} batches, "
        f"{len(texts)} requests each answered once"
    )


async def test_a_replica_stopping_gracefully_hands_its_queued_requests_to_the_other(
    store: Store,
    make_settings: Callable[..., Settings],
    emulator: Any,
    flush_record: FlushRecord,
    publications: tuple[Publications, aioredis.Redis],
) -> None:
    counter, observer = publications
    # Long enough that neither replica flushes before the stop; short enough to keep the test quick.
    settings = make_settings(emulator=True, max_batch_requests=1000, max_batch_age_seconds=4.0)
    texts: dict[str, str] = {}
    async with running_daemon(settings, consumer="stays"), AsyncClient(settings=settings) as client:
        async with running_daemon(settings, consumer="leaves"):

            async def pending_by_consumer() -> dict[str, int]:
                return {c.name: c.pending for c in await store.intake.consumers()}

            async def both_hold_requests() -> bool:
                # One request at a time: the two replicas' blocked reads take turns.
                n = len(texts)
                texts[f"handover-{n}"] = f"held by a replica {n}"
                await client.submit(params(texts[f"handover-{n}"]), f"handover-{n}")
                pending = await pending_by_consumer()
                return pending.get("leaves", 0) > 0 and pending.get("stays", 0) > 0

            await eventually(both_hold_requests, timeout=3, interval=0.01)
            held = (await pending_by_consumer())["leaves"]
            assert not flush_record.flushes  # read, not flushed yet: only in the replicas' pending lists
        # "leaves" has stopped (SIGTERM path): it flushed nothing and left the heartbeat set.
        assert "leaves" not in await store.heartbeats()

        async def all_answered() -> bool:
            # peek, not result(): see the report on ResultWaiter.close (a cancel lost inside redis-py).
            return all([await client.peek(rid) is not None for rid in texts])

        await eventually(all_answered, timeout=30, interval=0.05)
    await counter.barrier(observer, KEYS.delivered_channel)
    assert counter.answers() == Counter(dict.fromkeys(texts, 1))
    owner = flush_record.consumer_of()
    assert set(owner.values()) == {"stays"}  # everything, including what "leaves" held, flushed by "stays"
    assert held > 0 and len(owner) == len(texts)
    stats = emulator.stats()
    assert (stats["requests_received"], stats["duplicate_custom_ids"]) == (len(texts), 0)
    lines = [orjson.loads(line) for line in await store.result_lines(list(texts)) if line is not None]
    assert [line["result"]["message"]["content"][0]["text"] for line in lines] == [
        "echo: " + text for text in texts.values()
    ]
