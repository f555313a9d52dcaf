"""end_to_end_*: submit-to-answer latency through a real daemon and the emulator at zero processing time.

A daemon runs in this process with the product's defaults except a short batch age (A) and poll interval
(the daemon stretches the tick T to 5.3 s at the default API tier, so T is that); callers submit one
request each at random moments and wait for its answer (``AsyncClient.submit`` then ``result``).
Nothing else is between submit and answer, so the bound is what batchd itself adds: a
request waits at most A for its flush, the batch is created at once and ends at once, the poller sees it
end within one tick T, and fan-out delivers it. Target: p99 <= A + T + 0.3 s.
"""

from __future__ import annotations

import asyncio
import random
import time

from batchd import AsyncClient
from batchd.emulator import EmulatorConfig, EmulatorThread

from ._common import Env, Row, at_most, params, percentiles, running_daemon

AGE_S = 1.0
POLL_S = 1.0


async def run(env: Env) -> list[Row]:
    # 15 s of a flush a second: a batch costs two API calls (create, results) and the poller ~one call a
    # tick, ~33 calls in all, inside the daemon's 45-a-minute budget at tier 1. A longer stream of 1 s
    # batches waits for API slots (49 s p99 over 30 s) and measures the rate limit, not batchd.
    callers, window = (150, 15.0) if env.quick else (400, 15.0)
    rng = random.Random(11)
    with EmulatorThread(EmulatorConfig(processing_seconds=0.0)) as emu:
        settings = env.settings(
            anthropic_base_url=emu.base_url, max_batch_age_seconds=AGE_S, poll_interval_seconds=POLL_S
        )
        latencies: list[float] = []
        async with running_daemon(settings) as daemon, AsyncClient(settings=settings) as client:
            # The tick as the daemon runs it: the interval, stretched so polling takes at most a quarter of
            # the API's requests per minute (5.3 s at the default tier 1).
            tick = daemon._poll_every()
            await client.result(await client.submit(params(0)), timeout=60)  # warm up every path

            async def caller(i: int) -> None:
                await asyncio.sleep(rng.uniform(0, window))
                started = time.perf_counter()
                rid = await client.submit(params(i))
                result = await client.result(rid, timeout=60)
                latencies.append(time.perf_counter() - started)
                assert result.type == "succeeded", result

            await asyncio.gather(*(caller(i) for i in range(1, callers + 1)))
    p = percentiles(latencies)
    bound = AGE_S + tick + 0.3
    return [
        at_most("end_to_end_p50", p["p50"], "s", limit=None, reference=bound),
        at_most("end_to_end_p99", p["p99"], "s", limit=bound, reference=bound),
    ]
