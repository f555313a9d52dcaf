"""idle_*: what an idle daemon costs: ``batchd run`` (a child process, the product's defaults) with nothing
queued and no batch open, against an emulator.

After it is up and has settled, over a window (20 s with --quick, a minute otherwise): its CPU time
(/proc/<pid>/stat) over the wall time, the Redis commands it sends (INFO ``total_commands_processed``, the
commands of its scripts included, less the two INFO calls of the measurement), and the emulator's count of
API calls.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import redis.asyncio as aioredis

from batchd.emulator import EmulatorThread
from batchd.store import Keys

from ._common import API_KEY, Env, Row, at_most, cpu_seconds

SETTLE_S = 5.0


async def _commands(r: aioredis.Redis) -> int:
    return int((await r.info("stats"))["total_commands_processed"])


async def run(env: Env) -> list[Row]:
    window = 20.0 if env.quick else 60.0
    with EmulatorThread() as emu:
        environ = {
            **os.environ,
            "BATCHD_REDIS_URL": env.redis_url,
            "BATCHD_ANTHROPIC_API_KEY": API_KEY,
            "BATCHD_ANTHROPIC_BASE_URL": emu.base_url,
            "BATCHD_METRICS_PORT": "0",
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "batchd.cli", "run"],
            env=environ,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            async with aioredis.Redis.from_url(env.redis_url) as r:
                deadline = time.monotonic() + 30
                while not await r.zcard(Keys().replicas):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("the daemon did not start")
                    await asyncio.sleep(0.1)
                await asyncio.sleep(SETTLE_S)
                api_before = emu.stats()["api_calls"]
                cmd_before = await _commands(r)
                cpu_before, started = cpu_seconds(proc.pid), time.monotonic()
                await asyncio.sleep(window)
                cpu_after, elapsed = cpu_seconds(proc.pid), time.monotonic() - started
                cmd_after = await _commands(r)
                api_after = emu.stats()["api_calls"]
        finally:
            proc.terminate()
            proc.wait(60)
    return [
        at_most("idle_cpu", (cpu_after - cpu_before) / elapsed * 100, "%", limit=0.5),
        at_most("idle_redis_commands", (cmd_after - cmd_before - 2) / elapsed, "cmd/s", limit=10),
        at_most("idle_api_calls", float(api_after - api_before), "calls", limit=0),
    ]
