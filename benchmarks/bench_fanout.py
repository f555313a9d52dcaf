"""(b) Fan-out: ``batches.deliver_lines`` against raw pipelined ``SET key line NX EX ttl``.

deliver_lines is what fanout_results runs per chunk of 500 results lines: parse each line, run the deliver
script (check the attempt, SET NX EX, mark the request done, drop its body, PUBLISH the wake-up), then
count results, latency, tokens and cost. The raw reference stores the same lines under the same keys with
pipelined SET NX EX in chunks of the same size: the least any fan-out could do.

Before each batchd run the request hashes are put in the state a real flush leaves them in (flushed,
attempt 1, with a body), outside the timing.

    python -m benchmarks.bench_fanout [--lines 20000] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import orjson
import redis.asyncio as aioredis

from batchd.batches import Context, deliver_lines
from batchd.settings import load_settings
from batchd.store import Keys, NewRequest, Store, custom_id_for
from batchd.validation import new_request_id

from ._common import MODELS, describe_machine, out, params, private_redis, table

CHUNK = 500  # batches._DELIVER_CHUNK
TTL = 7 * 86_400


def results_line(rid: str, n: int) -> bytes:
    """A succeeded results line shaped like the API's (and the emulator's)."""
    model = MODELS[n % 3]
    return orjson.dumps(
        {
            "custom_id": custom_id_for(rid, 1),
            "result": {
                "type": "succeeded",
                "message": {
                    "id": f"msg_{n:024d}",
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [{"type": "text", "text": f"echo: request {n}: " + "y" * 100}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": 40,
                        "output_tokens": 30,
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": 0,
                        "service_tier": "batch",
                    },
                },
            },
        }
    )


async def prepare(store: Store, rids: list[str]) -> None:
    """Every request queued and moved into flush "f": waiting for its results line, as the daemon has it."""
    await store.redis.flushall()
    await store.intake.ensure_group()
    now = int(time.time() * 1000)
    for start in range(0, len(rids), 1000):
        chunk = [
            NewRequest(rid, orjson.dumps(params(i)))
            for i, rid in enumerate(rids[start : start + 1000], start)
        ]
        await store.scripts.enqueue(chunk, now_ms=now, max_requests=10**9, max_bytes=10**12)
        entries = await store.intake.read_new("bench", count=len(chunk), block_ms=None)
        await store.scripts.commit_flush("f", entries, now_ms=now)


async def run_batchd(url: str, rids: list[str], lines: list[bytes]) -> float:
    async with aioredis.Redis.from_url(url) as r:
        store = Store(r, Keys())
        await prepare(store, rids)
        settings = load_settings(redis_url=url, result_ttl_seconds=TTL)
        ctx = Context(store, settings, api=None, scheduler=None)  # type: ignore[arg-type]
        await r.ping()
        started = time.perf_counter()
        tally: dict[str, int] = {}
        for start in range(0, len(lines), CHUNK):
            for k, v in (await deliver_lines(ctx, lines[start : start + CHUNK])).items():
                tally[k] = tally.get(k, 0) + v
        elapsed = time.perf_counter() - started
        assert tally["delivered"] == len(lines), tally
        return elapsed


async def run_raw(url: str, rids: list[str], lines: list[bytes]) -> float:
    keys = Keys()
    async with aioredis.Redis.from_url(url) as r:
        await r.flushall()
        await r.ping()
        started = time.perf_counter()
        for start in range(0, len(lines), CHUNK):
            async with r.pipeline(transaction=False) as pipe:
                for rid, line in zip(rids[start : start + CHUNK], lines[start : start + CHUNK], strict=True):
                    pipe.set(keys.result(rid), line, nx=True, ex=TTL)
                await pipe.execute()
        return time.perf_counter() - started


async def main(n: int, reps: int) -> None:
    rids = [new_request_id() for _ in range(n)]
    lines = [results_line(rid, i) for i, rid in enumerate(rids)]
    size = sum(map(len, lines)) / n
    b_times: list[float] = []
    r_times: list[float] = []
    with private_redis() as server:
        for _ in range(reps):
            b_times.append(await run_batchd(server.url, rids, lines))
            r_times.append(await run_raw(server.url, rids, lines))
    b, raw = min(b_times), min(r_times)
    out(describe_machine())
    out(f"{n:,} succeeded results lines of {size:.0f} B; chunks of {CHUNK}; best of {reps}")
    rows: list[list[Any]] = [
        ["lines/s", n / b, n / raw, raw / b],
        ["MB/s of results", n * size / b / 1e6, n * size / raw / 1e6, raw / b],
        ["us per line", b / n * 1e6, raw / n * 1e6, b / raw],
    ]
    out(table("fan-out: deliver_lines vs raw SET NX EX", ["measure", "batchd", "raw SET", "ratio"], rows))
    out("ratio column: rates = batchd/raw (1.0 = as fast as raw); us per line = batchd/raw (cost multiple)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--reps", type=int, default=3)
    a = parser.parse_args()
    asyncio.run(main(a.lines, a.reps))
