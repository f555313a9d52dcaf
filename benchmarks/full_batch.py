"""full_batch_*: one 100,000-request, ~250 MB flush built and created against the emulator.

Setup (not timed): 100,000 requests of ~2.4 KB params are queued and moved into one sealed flush. Then a
child process does what the daemon's submit job does, ``batches.submit_flush`` with the daemon's own API
client, against an emulator child process (``batchd emulator``) whose batches stay open. Measured:

* the daemon side's peak RSS growth (VmHWM minus RSS before the job, after a warm-up API call), against
  the body's size: the body should be streamed from Redis, not held;
* the emulator's peak RSS growth, against the body's size;
* the upload rate: body bytes over the time from the first to the last chunk of params the body stream
  took from Redis (the HTTP client pulls the next chunk once it has written the last one), so the
  emulator's own parse, which comes after, is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import redis.asyncio as aioredis

from batchd.batchbody import body_size
from batchd.store import Keys, Store

from ._common import (
    MB,
    Env,
    Row,
    at_least,
    at_most,
    child_answer,
    emulator_process,
    params,
    peak_rss_bytes,
    prepare_flush,
    reset_peak_rss,
    rss_bytes,
    run_child,
)

FID = "bench-full"
TEXT_BYTES = 2_330  # params of ~2.45 KB: 100,000 of them make a ~250 MB body


async def child(redis_url: str, emu_url: str, fid: str) -> None:
    from batchd.apiclient import api_client
    from batchd.batches import Context
    from batchd.batches.create import submit_flush
    from batchd.settings import load_settings
    from batchd.store import connect

    settings = load_settings(
        redis_url=redis_url, anthropic_api_key="bench-key", anthropic_base_url=emu_url, metrics_port=0
    )
    redis = connect(settings.redis_url, "daemon")
    store = Store(redis, Keys(settings.key_prefix))
    api = api_client(settings, store.scripts)
    ctx = Context(store, settings, api, scheduler=None)  # type: ignore[arg-type]
    await api.messages.batches.list(limit=1)  # warm up: the SDK's lazy imports and models, the connection
    await store.flush(fid)
    marks: list[float] = []
    bodies = getattr(store, "flush_bodies", None)  # None: a batchd that builds the body whole

    async def timed_bodies(*args: Any, **kwargs: Any) -> AsyncIterator[list[bytes]]:
        assert bodies is not None
        async for chunk in bodies(*args, **kwargs):
            marks.append(time.perf_counter())
            yield chunk

    if bodies is not None:
        store.flush_bodies = timed_bodies  # type: ignore[method-assign]
    gc.collect()
    base = rss_bytes()
    reset_peak_rss()
    started = time.perf_counter()
    batch_id = await submit_flush(ctx, fid)
    elapsed = time.perf_counter() - started
    peak = peak_rss_bytes()
    await api.close()
    await redis.aclose(close_connection_pool=True)
    upload_s = marks[-1] - marks[0] if len(marks) > 1 else elapsed
    child_answer({"batch": batch_id, "base": base, "peak": peak, "elapsed": elapsed, "upload_s": upload_s})


async def run(env: Env) -> list[Row]:
    n = 100_000
    bodies = [orjson.dumps(params(i, TEXT_BYTES)) for i in range(n)]
    async with aioredis.Redis.from_url(env.redis_url) as r:
        await r.flushall()
        store = Store(r, Keys())
        rids = await prepare_flush(store, n, text_bytes=TEXT_BYTES, fid=FID)
    expected = body_size((len(rid) + 2, len(b)) for rid, b in zip(rids, bodies, strict=True))
    del bodies, rids
    with emulator_process("--processing-seconds", "3600") as emu:
        await asyncio.sleep(0.5)
        emu_rest = rss_bytes(emu.pid)
        reset_peak_rss(emu.pid)
        got = await run_child("full_batch", "--child", env.redis_url, emu.url, FID)
        emu_peak = peak_rss_bytes(emu.pid)
        created = emu.stats()["batches_created"]
    if not str(got["batch"]).startswith("msgbatch_") or created != 1:
        raise RuntimeError(f"the batch was not created: {got}")
    daemon_growth = got["peak"] - got["base"]
    emu_growth = emu_peak - emu_rest
    upload = expected / got["upload_s"] / MB
    return [
        Row(
            "full_batch_daemon_rss_growth",
            daemon_growth / MB,
            "MB",
            expected / MB,
            daemon_growth / expected,
            "<= 0.5x body",
            daemon_growth <= 0.5 * expected,
        ),
        Row(
            "full_batch_emulator_rss_growth",
            emu_growth / MB,
            "MB",
            expected / MB,
            emu_growth / expected,
            "<= 2x body",
            emu_growth <= 2 * expected,
        ),
        at_least("full_batch_upload", upload, "MB/s", min_value=200),
        at_most("full_batch_create_s", got["elapsed"], "s", limit=None),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=3, metavar=("REDIS_URL", "EMULATOR_URL", "FID"), required=True)
    a = parser.parse_args()
    asyncio.run(child(*a.child))
