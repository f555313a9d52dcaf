"""fanout_*: 100,000 results streamed from the emulator into reply keys, against raw pipelined
``SET key line NX EX ttl``.

Setup (not timed): 100,000 requests queued into one flush, its batch created at an emulator child process
that ends it at once. Then, each in a fresh child process (so its RSS is its own):

* batchd: ``batches.fanout_results`` with the daemon's API client: stream the results, and per chunk of
  500 lines the deliver script (attempt check, SET NX EX, state, PUBLISH, the ledger's charge, the budget
  settlement) and the metrics;
* writes: the same download streamed with the same client, each chunk of 500 lines stored with the writes
  a delivery must make, pipelined: per line ``SET NX EX`` of the answer, ``HSET`` of its request's state,
  ``HDEL`` of its body and ``EXPIRE`` of its record (a delivered request must be marked answered and must
  not keep its params for ever), then one ``PUBLISH`` of the chunk's ids (keys of its own: ``ref:``).
  ``fanout_rate`` is measured against this;
* raw: the same download, each chunk stored with pipelined ``SET NX EX`` only: the least any fan-out could
  do (``fanout_vs_set``, informational).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time

import orjson
import redis.asyncio as aioredis

from batchd.store import Keys, Store

from ._common import (
    MB,
    Env,
    Row,
    at_least,
    at_most,
    child_answer,
    emulator_process,
    peak_rss_bytes,
    prepare_flush,
    reset_peak_rss,
    rss_bytes,
    run_child,
)

CHUNK = 500
TTL = 7 * 86_400


async def child(variant: str, redis_url: str, emu_url: str, batch_id: str) -> None:
    import httpx2

    from batchd.apiclient import api_client
    from batchd.batches import Context, fanout_results
    from batchd.settings import load_settings
    from batchd.store import connect

    settings = load_settings(
        redis_url=redis_url, anthropic_api_key="bench-key", anthropic_base_url=emu_url, metrics_port=0
    )
    redis = connect(settings.redis_url, "daemon")
    store = Store(redis, Keys(settings.key_prefix))
    api = api_client(settings, store.scripts)
    ctx = Context(store, settings, api, scheduler=None)  # type: ignore[arg-type]
    await api.messages.batches.list(limit=1)  # warm up: the SDK's lazy imports, the connection
    await redis.ping()
    gc.collect()
    base = rss_bytes()
    reset_peak_rss()
    started = time.perf_counter()
    lines = 0
    if variant == "batchd":
        outcome = await fanout_results(ctx, batch_id)
        assert outcome == "delivered", outcome
        record = await store.batch(batch_id)
        lines = record.lines if record is not None else 0
    else:
        response = await api.get(
            f"/v1/messages/batches/{batch_id}/results",
            cast_to=httpx2.Response,
            stream=True,
            options={"headers": {"Accept": "application/binary"}},
        )
        pending: list[bytes] = []

        async def store_chunk(chunk: list[bytes]) -> None:
            async with redis.pipeline(transaction=False) as pipe:
                rids = []
                for line in chunk:
                    rid = orjson.loads(line)["custom_id"].rsplit("-", 1)[0]
                    pipe.set(f"ref:res:{{{rid}}}", line, nx=True, ex=TTL)
                    if variant == "writes":
                        req = f"ref:req:{{{rid}}}"
                        pipe.hset(req, "state", "done")
                        pipe.hdel(req, "body")
                        pipe.expire(req, TTL)
                        rids.append(rid)
                if rids:
                    pipe.publish("ref:delivered", ",".join(rids))
                await pipe.execute()

        async for text in response.aiter_lines():
            if not text.strip():
                continue
            lines += 1
            pending.append(text.encode())
            if len(pending) >= CHUNK:
                await store_chunk(pending)
                pending = []
        if pending:
            await store_chunk(pending)
        await response.aclose()
    elapsed = time.perf_counter() - started
    peak = peak_rss_bytes()
    await api.close()
    await redis.aclose(close_connection_pool=True)
    child_answer({"elapsed": elapsed, "base": base, "peak": peak, "lines": lines})


async def _create(env: Env, emu_url: str, n: int) -> str:
    from batchd.apiclient import api_client
    from batchd.batches import Context, submit_flush
    from batchd.store import connect

    settings = env.settings(anthropic_base_url=emu_url)
    redis = connect(settings.redis_url, "daemon")
    try:
        await redis.flushall()
        store = Store(redis, Keys(settings.key_prefix))
        await prepare_flush(store, n, fid="bench-fanout")
        api = api_client(settings, store.scripts)
        batch_id = await submit_flush(Context(store, settings, api, scheduler=None), "bench-fanout")  # type: ignore[arg-type]
        while (await api.messages.batches.retrieve(batch_id)).processing_status != "ended":
            await asyncio.sleep(0.1)
        await api.close()
        return batch_id
    finally:
        await redis.aclose(close_connection_pool=True)


async def run(env: Env) -> list[Row]:
    n = 100_000
    with emulator_process("--processing-seconds", "0") as emu:
        batch_id = await _create(env, emu.url, n)
        raw_runs = [await run_child("fanout", "--child", "raw", env.redis_url, emu.url, batch_id)]
        writes_runs = [await run_child("fanout", "--child", "writes", env.redis_url, emu.url, batch_id)]
        got = await run_child("fanout", "--child", "batchd", env.redis_url, emu.url, batch_id)
        writes_runs.append(await run_child("fanout", "--child", "writes", env.redis_url, emu.url, batch_id))
        raw_runs.append(await run_child("fanout", "--child", "raw", env.redis_url, emu.url, batch_id))
    async with aioredis.Redis.from_url(env.redis_url) as r:
        delivered = sum([1 async for _ in r.scan_iter(match=Keys().result("*"), count=10_000)])
    if got["lines"] != n or delivered != n:
        raise RuntimeError(f"fan-out delivered {delivered} of {n} ({got})")
    raw = min(raw_runs, key=lambda g: g["elapsed"])
    writes = min(writes_runs, key=lambda g: g["elapsed"])
    growth = got["peak"] - got["base"]
    return [
        at_least(
            "fanout_rate", n / got["elapsed"], "lines/s", reference=n / writes["elapsed"], min_ratio=0.5
        ),
        at_least(
            "fanout_vs_set", n / got["elapsed"], "lines/s", reference=n / raw["elapsed"], min_ratio=None
        ),
        at_most(
            "fanout_rss_growth", growth / MB, "MB", limit=100, reference=(raw["peak"] - raw["base"]) / MB
        ),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=4, metavar=("VARIANT", "REDIS_URL", "EMULATOR_URL", "BATCH"))
    a = parser.parse_args()
    asyncio.run(child(*a.child))
