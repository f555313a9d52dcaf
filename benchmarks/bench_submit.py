"""(a) Submit throughput: ``AsyncClient.submit_many`` and ``submit`` against raw redis-py XADD.

batchd's submit is one Lua call per chunk of 500 requests that validates nothing in Redis but writes the
request hash, appends to the intake stream and updates the queue totals atomically (with backpressure).
The raw reference is the least an application could do to queue the same bytes: ``orjson.dumps`` the params
and XADD them with a random id, pipelined in chunks of the same size. Both include encoding and id making.

    python -m benchmarks.bench_submit [--requests 20000] [--single 2000] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time

import orjson
import redis.asyncio as aioredis

from batchd import AsyncClient
from batchd.settings import load_settings

from ._common import describe_machine, out, params, percentiles, private_redis, table

CHUNK = 500  # the client's own chunk size, so both sides make the same number of round trips


async def _used_memory(r: aioredis.Redis) -> int:
    return int((await r.info("memory"))["used_memory"])


async def batchd_many(url: str, bodies: list[dict[str, object]]) -> tuple[float, int]:
    async with aioredis.Redis.from_url(url) as admin, AsyncClient(settings=load_settings(redis_url=url)) as c:
        await admin.flushall()
        await c.ping()
        before = await _used_memory(admin)
        started = time.perf_counter()
        await c.submit_many(bodies)
        elapsed = time.perf_counter() - started
        return elapsed, (await _used_memory(admin)) - before


async def raw_many(url: str, bodies: list[dict[str, object]]) -> tuple[float, int]:
    async with aioredis.Redis.from_url(url) as r:
        await r.flushall()
        await r.ping()
        before = await _used_memory(r)
        started = time.perf_counter()
        for start in range(0, len(bodies), CHUNK):
            async with r.pipeline(transaction=False) as pipe:
                for p in bodies[start : start + CHUNK]:
                    pipe.xadd("ref:intake", {"rid": secrets.token_urlsafe(16), "body": orjson.dumps(p)})
                await pipe.execute()
        elapsed = time.perf_counter() - started
        return elapsed, (await _used_memory(r)) - before


async def batchd_single(url: str, bodies: list[dict[str, object]]) -> list[float]:
    async with aioredis.Redis.from_url(url) as admin, AsyncClient(settings=load_settings(redis_url=url)) as c:
        await admin.flushall()
        await c.submit(bodies[0])  # load the script, open the connection
        times = []
        for p in bodies:
            started = time.perf_counter()
            await c.submit(p)
            times.append(time.perf_counter() - started)
        return times


async def raw_single(url: str, bodies: list[dict[str, object]]) -> list[float]:
    async with aioredis.Redis.from_url(url) as r:
        await r.flushall()
        await r.ping()
        times = []
        for p in bodies:
            started = time.perf_counter()
            await r.xadd("ref:intake", {"rid": secrets.token_urlsafe(16), "body": orjson.dumps(p)})
            times.append(time.perf_counter() - started)
        return times


async def main(requests: int, single: int, reps: int) -> None:
    bodies = [params(i) for i in range(requests)]
    size = sum(len(orjson.dumps(b)) for b in bodies) / requests
    with private_redis() as server:
        url = server.url
        many_b, many_r = [], []
        mem_b = mem_r = 0
        for _ in range(reps):  # alternate, so drift on a noisy machine hits both sides alike
            t, mem_b = await batchd_many(url, bodies)
            many_b.append(t)
            t, mem_r = await raw_many(url, bodies)
            many_r.append(t)
        one_b = await batchd_single(url, bodies[:single])
        one_r = await raw_single(url, bodies[:single])
    best_b, best_r = min(many_b), min(many_r)
    pb, pr = percentiles(one_b), percentiles(one_r)
    out(describe_machine())
    out(
        f"{requests:,} requests of {size:.0f} B params each; best of {reps}; "
        f"single: {single:,} sequential calls"
    )
    rows = [
        ["submit_many: requests/s", requests / best_b, requests / best_r, best_r / best_b],
        [
            "submit_many: MB/s of params",
            requests * size / best_b / 1e6,
            requests * size / best_r / 1e6,
            best_r / best_b,
        ],
        ["single submit: p50 us", pb["p50"] * 1e6, pr["p50"] * 1e6, pb["p50"] / pr["p50"]],
        ["single submit: p99 us", pb["p99"] * 1e6, pr["p99"] * 1e6, pb["p99"] / pr["p99"]],
        ["single submit: calls/s", single / sum(one_b), single / sum(one_r), sum(one_r) / sum(one_b)],
        ["Redis memory: bytes/request", mem_b / requests, mem_r / requests, mem_b / max(mem_r, 1)],
    ]
    out(table("submit: batchd vs raw XADD", ["measure", "batchd", "raw XADD", "ratio"], rows))
    out(
        "ratio column: throughput rows = batchd/raw (1.0 = as fast as raw); latency and memory rows = "
        "batchd/raw (1.0 = no overhead)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--single", type=int, default=2_000)
    parser.add_argument("--reps", type=int, default=3)
    a = parser.parse_args()
    asyncio.run(main(a.requests, a.single, a.reps))
