"""drain_*: the accumulator moving 100,000 queued requests into sealed flushes, against raw
XREADGROUP + XACK of the same number of entries.

The requests are queued through ``AsyncClient.submit_many`` first (not timed); then a real ``Accumulator``
with the product's defaults (10,000 requests a flush) runs until every request is in a sealed flush. The
raw reference reads a stream of as many entries with the same fields, 1,000 at a time (the accumulator's
read size), and acknowledges each read: the least any consumer of the intake does.
"""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from batchd import AsyncClient
from batchd.accumulator import Accumulator
from batchd.store import Keys, Store, Trigger

from ._common import Env, Row, at_least, params

READ = 1000


async def _accumulator(env: Env, n: int) -> float:
    settings = env.settings()
    async with aioredis.Redis.from_url(env.redis_url) as r, AsyncClient(settings=settings) as c:
        await r.flushall()
        await c.submit_many([params(i) for i in range(n)])
        moved = [0]
        done = asyncio.Event()

        async def on_flush(fid: str, trigger: Trigger, count: int, nbytes: int) -> None:
            moved[0] += count
            if moved[0] >= n:
                done.set()

        acc = Accumulator(
            Store(r, Keys(settings.key_prefix)),
            consumer="bench",
            max_requests=settings.max_batch_requests,
            max_bytes=settings.max_batch_bytes,
            max_age_s=settings.max_batch_age_seconds,
            on_flush=on_flush,
            grouping=settings.cache_grouping,
            priming=settings.cache_priming,
        )
        stop = asyncio.Event()
        await r.ping()
        started = time.perf_counter()
        task = asyncio.create_task(acc.run(stop))
        await asyncio.wait_for(done.wait(), 300)
        elapsed = time.perf_counter() - started
        stop.set()
        await asyncio.wait_for(task, 30)
        return elapsed


async def _raw(env: Env, n: int) -> float:
    async with aioredis.Redis.from_url(env.redis_url) as r:
        await r.flushall()
        await r.xgroup_create("ref:intake", "g", id="0", mkstream=True)
        for start in range(0, n, READ):
            async with r.pipeline(transaction=False) as pipe:
                for i in range(start, min(n, start + READ)):
                    pipe.xadd(
                        "ref:intake",
                        {"rid": f"r{i:022d}", "cid": f"r{i:022d}-1", "bytes": 200, "group": "", "pfx": ""},
                    )
                await pipe.execute()
        started = time.perf_counter()
        read = 0
        while read < n:
            got = await r.xreadgroup("g", "c", {"ref:intake": ">"}, count=READ)
            ids = [entry_id for _, entries in got for entry_id, _ in entries]
            await r.xack("ref:intake", "g", *ids)
            read += len(ids)
        return time.perf_counter() - started


async def run(env: Env) -> list[Row]:
    n, reps = (100_000, 2) if env.quick else (100_000, 3)
    acc, raw = [], []
    for _ in range(reps):
        acc.append(await _accumulator(env, n))
        raw.append(await _raw(env, n))
    rate, raw_rate = n / min(acc), n / min(raw)
    return [
        at_least("drain_rate", rate, "req/s", reference=raw_rate, min_ratio=0.5, min_value=50_000),
    ]
