"""waiters_*: 10,000 concurrent ``messages.create`` callers in one process.

In a fresh child process, one ``AsyncClient`` (its defaults) and 10,000 tasks each calling
``client.messages.create(...)`` (submit, then wait for the answer). Measured: the process's Redis
connections (CLIENT LIST, sampled while the callers pile up and once all wait), the time until every caller
is registered as a waiter, and, once every answer is written the way deliver.lua writes it (in Redis, one
script call per 500 answers: each SET, then one PUBLISH of their ids), the time until the last caller returns
with its Message. The reference, in another fresh
child: 10,000 tasks awaiting bare asyncio futures, started and then resolved.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

from ._common import Env, Row, at_most, child_answer, params, run_child

ADMIN = "bench-admin"
# The answers are written as the daemon's fan-out writes them: one script call per chunk of 500 lines, in
# Redis (deliver_answers.lua), so the callers' process does only the callers' work.
_DELIVER = Path(__file__).with_name("deliver_answers.lua")
_CHUNK = 500
_MARK = "@@MARK@@"


def _line(custom_id: str) -> bytes:
    return orjson.dumps(
        {
            "custom_id": custom_id,
            "result": {
                "type": "succeeded",
                "message": {
                    "id": "msg_0",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-haiku-4-5",
                    "content": [{"type": "text", "text": "ok"}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": {"input_tokens": 1, "output_tokens": 1},
                },
            },
        }
    )


async def _connections(admin: aioredis.Redis) -> int:
    return sum(1 for c in await admin.client_list() if c.get("name") != ADMIN)


async def child_batchd(url: str, n: int) -> dict[str, float]:
    from batchd import AsyncClient
    from batchd.settings import load_settings
    from batchd.store import Keys

    keys = Keys()
    async with aioredis.Redis.from_url(url, client_name=ADMIN) as admin:
        await admin.flushall()
        client = AsyncClient(settings=load_settings(redis_url=url))
        await client.submit(params(0))  # warm up: the scripts, the connections
        before = await _connections(admin)
        started = time.perf_counter()
        tasks = [asyncio.create_task(client.messages.create(**params(i), timeout=600)) for i in range(n)]
        peak = before
        deadline = time.monotonic() + 120
        while client._waiter.waiting < n:  # sample the connections while the callers pile up
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {client._waiter.waiting} of {n} callers registered")
            peak = max(peak, await _connections(admin))
            await asyncio.sleep(0.005)
        registered = time.perf_counter() - started
        conns = await _connections(admin)
        peak = max(peak, conns)
        entries = await admin.xrange(keys.intake)
        cids = [fields[b"cid"].decode() for _, fields in entries[1:]]  # [0] is the warm-up's
        assert len(cids) == n, len(cids)
        deliver = admin.register_script(_DELIVER.read_text())
        key_head, key_tail = keys.result_parts
        line_head, line_tail = _line(_MARK).decode().split(_MARK)
        started = time.perf_counter()
        for start in range(0, n, _CHUNK):
            args = [key_head, key_tail, keys.delivered_channel, line_head, line_tail]
            for cid in cids[start : start + _CHUNK]:
                args += [cid.rsplit("-", 1)[0], cid]
            await deliver(args=args)
        messages = await asyncio.gather(*tasks)
        woken = time.perf_counter() - started
        assert all(m.content[0].text == "ok" for m in messages)
        await client.close()
    return {"conns": conns, "peak_conns": peak, "register_s": registered, "wake_s": woken}


async def child_futures(n: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    futures = [loop.create_future() for _ in range(n)]

    async def wait(f: asyncio.Future[bytes]) -> bytes:
        return await f

    tasks = [asyncio.create_task(wait(f)) for f in futures]
    await asyncio.sleep(0)  # every task runs up to its await
    registered = time.perf_counter() - started
    started = time.perf_counter()
    for f in futures:
        f.set_result(b"ok")
    await asyncio.gather(*tasks)
    return {"register_s": registered, "wake_s": time.perf_counter() - started}


async def run(env: Env) -> list[Row]:
    n = 10_000
    b: dict[str, Any] = await run_child("waiters", "--child", "batchd", env.redis_url, str(n))
    f: dict[str, Any] = await run_child("waiters", "--child", "futures", env.redis_url, str(n))
    return [
        at_most("waiters_redis_connections", float(b["peak_conns"]), "conns", limit=20),
        at_most("waiters_register_s", b["register_s"], "s", limit=1.0, reference=f["register_s"]),
        at_most("waiters_wake_s", b["wake_s"], "s", limit=0.5, reference=f["wake_s"]),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "REDIS_URL", "N"), required=True)
    a = parser.parse_args()
    variant, url, count = a.child
    if variant == "batchd":
        child_answer(asyncio.run(child_batchd(url, int(count))))
    else:
        child_answer(asyncio.run(child_futures(int(count))))
