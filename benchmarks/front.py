"""front_*: 1,000 held connections on one HTTP front (``batchd front``, a child process).

1,000 callers POST /v1/messages at once and are held (the front queues each request and keeps the
connection until its answer). Once all 1,000 are queued, the front's RSS growth is read against its RSS
after a warm-up request; then every answer is written the way deliver.lua writes it (SET + PUBLISH,
pipelined) and every caller must get its 200 with the Message.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from batchd.localredis import free_port
from batchd.store import Keys

from ._common import MB, Env, Row, at_least, at_most, params, rss_bytes
from .waiters import _line

HEADERS = {"anthropic-version": "2023-06-01", "content-type": "application/json", "x-api-key": "unused"}


async def _deliver(admin: aioredis.Redis, keys: Keys, cids: list[str]) -> None:
    async with admin.pipeline(transaction=False) as pipe:
        for cid in cids:
            rid = cid.rsplit("-", 1)[0]
            pipe.set(keys.result(rid), _line(cid), ex=3600)
            pipe.publish(keys.delivered_channel, rid)
        await pipe.execute()


async def _cids(admin: aioredis.Redis, keys: Keys) -> list[str]:
    return [fields[b"cid"].decode() for _, fields in await admin.xrange(keys.intake)]


async def run(env: Env) -> list[Row]:
    n = 1_000
    port = free_port()
    keys = Keys()
    environ = {**os.environ, "BATCHD_REDIS_URL": env.redis_url, "BATCHD_METRICS_PORT": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchd.cli", "front", "--port", str(port)],
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1/messages"
    try:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=300)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            aioredis.Redis.from_url(env.redis_url) as admin,
        ):
            await admin.flushall()

            async def call(i: int) -> tuple[int, dict[str, Any]]:
                async with session.post(url, json=params(i), headers=HEADERS) as r:
                    return r.status, await r.json()

            deadline = time.monotonic() + 30
            while True:  # until it listens
                try:
                    warm = asyncio.create_task(call(0))
                    while not await _cids(admin, keys):
                        if warm.done():
                            warm.result()
                        await asyncio.sleep(0.02)
                    break
                except aiohttp.ClientConnectionError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise
                    await asyncio.sleep(0.1)
            await _deliver(admin, keys, await _cids(admin, keys))
            status, _ = await warm
            assert status == 200, status
            await admin.delete(keys.intake)
            base = rss_bytes(proc.pid)
            tasks = [asyncio.create_task(call(i)) for i in range(1, n + 1)]
            while len(cids := await _cids(admin, keys)) < n:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # every queued caller is now held on its connection
            held = sum(1 for t in tasks if not t.done())
            growth = rss_bytes(proc.pid) - base
            started = time.perf_counter()
            for start in range(0, n, 500):
                await _deliver(admin, keys, cids[start : start + 500])
            replies = await asyncio.gather(*tasks)
            answer_s = time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(30)
    answered = sum(1 for status, body in replies if status == 200 and body.get("type") == "message")
    return [
        at_most("front_rss_growth", growth / MB, "MB", limit=100),
        at_least("front_held", float(held), "conns", min_value=n),
        at_least("front_answered", float(answered), "calls", min_value=n),
        at_most("front_answer_all_s", answer_s, "s", limit=None),
    ]
