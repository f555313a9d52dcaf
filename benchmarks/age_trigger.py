"""age_trigger_*: how long after the oldest request's age limit a real Accumulator seals its flush.

A real ``Accumulator`` runs against the suite's redis-server (default ``hz 10``) with ``max_batch_age`` A
= 50 ms; each round submits one to three requests through ``AsyncClient`` at random moments, waits for the
flush, and pauses a random while. Lateness = the moment the flush is sealed (``on_flush``, when the submit
job would be queued) minus the oldest entry's deadline (its stream-id time + A). The reference is the floor
of any "block until the deadline" loop: one ``XREADGROUP BLOCK`` timed to a random deadline on an idle
stream, and how late it returns (Redis checks BLOCK timeouts every 1/hz s).
"""

from __future__ import annotations

import asyncio
import random
import time

import redis.asyncio as aioredis

from batchd import AsyncClient
from batchd.accumulator import Accumulator, Entry
from batchd.store import Keys, Store, Trigger

from ._common import Env, Row, at_most, params, percentiles

AGE_S = 0.05


async def measure_accumulator(env: Env, rounds: int, age: float) -> tuple[list[float], list[float], int]:
    keys = Keys()
    decided: list[float] = []
    sealed: list[float] = []
    early = 0
    flushed = asyncio.Event()
    current: dict[str, float] = {}

    settings = env.settings(max_batch_age_seconds=age)
    async with aioredis.Redis.from_url(env.redis_url) as r, AsyncClient(settings=settings) as c:
        await r.flushall()

        async def on_flush(fid: str, trigger: Trigger, n: int, nbytes: int) -> None:
            sealed.append(time.time() - current["deadline"])
            flushed.set()

        acc = Accumulator(
            Store(r, keys),
            consumer="bench",
            max_requests=settings.max_batch_requests,
            max_bytes=settings.max_batch_bytes,
            max_age_s=settings.max_batch_age_seconds,
            on_flush=on_flush,
        )
        original = acc.flush

        async def flush(entries: list[Entry], trigger: Trigger, group: str = "") -> str | None:
            current["deadline"] = (
                min(int(e[0].partition("-")[0]) for e in entries) / 1000 + age
            )  # stream-id ms
            decided.append(time.time() - current["deadline"])
            return await original(entries, trigger, group)

        acc.flush = flush  # type: ignore[method-assign]
        stop = asyncio.Event()
        task = asyncio.create_task(acc.run(stop))
        await c.submit(params(0))  # warm up: the group, the scripts, the connections
        await asyncio.wait_for(flushed.wait(), 10)
        decided.clear()
        sealed.clear()
        rng = random.Random(7)
        for i in range(rounds):
            flushed.clear()
            for _ in range(rng.randint(1, 3)):
                await c.submit(params(i))
                await asyncio.sleep(rng.uniform(0, age / 3))
            await asyncio.wait_for(flushed.wait(), 10)
            await asyncio.sleep(rng.uniform(0, age))
        stop.set()
        await asyncio.wait_for(task, 10)
    early = sum(1 for d in decided if d < -0.001)
    return decided, sealed, early


async def measure_raw(url: str, rounds: int, age: float) -> list[float]:
    lateness: list[float] = []
    async with aioredis.Redis.from_url(url) as r:
        await r.xgroup_create("ref:stream", "ref", id="0", mkstream=True)
        rng = random.Random(7)
        for _ in range(rounds):
            deadline = time.time() + rng.uniform(age / 3, age)
            block_ms = max(1, int((deadline - time.time()) * 1000))
            await r.xreadgroup("ref", "c", {"ref:stream": ">"}, count=1, block=block_ms)
            lateness.append(time.time() - deadline)
    return lateness


async def run(env: Env) -> list[Row]:
    rounds = 100 if env.quick else 300
    _, sealed, early = await measure_accumulator(env, rounds, AGE_S)
    raw = await measure_raw(env.redis_url, rounds, AGE_S)
    ps, pr = percentiles([s * 1000 for s in sealed]), percentiles([r * 1000 for r in raw])
    return [
        at_most("age_trigger_p50", ps["p50"], "ms", limit=None, reference=pr["p50"]),
        at_most("age_trigger_p99", ps["p99"], "ms", limit=20, reference=pr["p99"]),
        at_most("age_trigger_early", float(early), "flushes", limit=0),
    ]
