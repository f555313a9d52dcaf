"""(c) Age-trigger lateness: how long after the oldest request's deadline a real Accumulator flushes.

A real ``Accumulator`` (the daemon's, against a private redis-server) runs with ``max_batch_age`` A; the
benchmark submits one to three requests through ``AsyncClient`` at a random moment, waits for the flush,
pauses a random while, and repeats. For each flush it records

    decision lateness = time flush() is entered        - (oldest entry's stream-id time + A)
    sealed lateness   = time the flush is sealed (on_flush, when the submit job would be queued) - same

The raw reference is the floor any "block until the deadline" loop has: XREADGROUP BLOCK for exactly the
time left to a deadline on an idle stream, and how late after the deadline the call returns.

Redis notices an expired BLOCK only when its event loop wakes: on traffic, or on its cron tick every
1/hz seconds (hz 10 by default), so ``--hz`` is worth trying (e.g. 100).

    python -m benchmarks.bench_age [--rounds 100] [--age 0.05] [--hz 10]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

import redis.asyncio as aioredis

from batchd import AsyncClient
from batchd.accumulator import Accumulator, Entry
from batchd.settings import load_settings
from batchd.store import Keys, Store, Trigger

from ._common import describe_machine, out, params, percentiles, private_redis, table


async def measure_accumulator(url: str, rounds: int, age: float) -> tuple[list[float], list[float], int]:
    keys = Keys()
    decided: list[float] = []
    sealed: list[float] = []
    early = 0
    flushed = asyncio.Event()
    current: dict[str, float] = {}

    async with aioredis.Redis.from_url(url) as r, AsyncClient(settings=load_settings(redis_url=url)) as c:
        await r.flushall()

        async def on_flush(fid: str, trigger: Trigger, n: int, nbytes: int) -> None:
            sealed.append(time.time() - current["deadline"])
            flushed.set()

        acc = Accumulator(
            Store(r, keys),
            consumer="bench",
            max_requests=10_000,
            max_bytes=200_000_000,
            max_age_s=age,
            on_flush=on_flush,
        )
        original = acc.flush

        async def flush(entries: list[Entry], trigger: Trigger, group: str = "") -> str | None:
            current["deadline"] = min(e.ms for e in entries) / 1000 + age
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


async def main(rounds: int, age: float, hz: int) -> None:
    with private_redis("--hz", str(hz)) as server:
        decided, sealed, early = await measure_accumulator(server.url, rounds, age)
        raw = await measure_raw(server.url, rounds, age)
    out(describe_machine())
    out(
        f"{rounds} flushes, max_batch_age {age * 1000:.0f} ms, redis-server hz {hz}; "
        "lateness in ms after the oldest request's deadline"
    )
    rows: list[list[Any]] = []
    for name, values in (
        ("accumulator: flush decided", decided),
        ("accumulator: flush sealed", sealed),
        ("raw XREADGROUP BLOCK wake-up", raw),
    ):
        p = percentiles([v * 1000 for v in values])
        rows.append([name, min(values) * 1000, p["p50"], p["p95"], p["max"]])
    out(table("age trigger lateness (ms)", ["measure", "min", "p50", "p95", "max"], rows))
    pr = percentiles(raw)
    pd = percentiles(decided)
    out(
        f"ratio decided/raw: p50 {pd['p50'] / pr['p50']:.2f}, p95 {pd['p95'] / pr['p95']:.2f}; "
        f"flushes before the deadline: {early}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--age", type=float, default=0.05, help="max_batch_age in seconds")
    parser.add_argument("--hz", type=int, default=10, help="redis-server hz (its default: 10)")
    a = parser.parse_args()
    asyncio.run(main(a.rounds, a.age, a.hz))
