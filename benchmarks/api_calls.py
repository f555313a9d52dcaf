"""api_calls_*: the API calls a daemon makes to poll 200 open batches.

Setup (not timed): 200 one-request batches created at an in-process emulator whose batches stay open (each
through ``batches.submit_flush``, recorded as the daemon records them). Then a real daemon (the product's
defaults; the poll interval is the product's tick, 5.3 s at tier 1) runs for a window (30 s with --quick, a
minute otherwise); the emulator's ``/_emulator/stats`` counts the list and retrieve calls, and the daemon's
ticks are counted as they run. Target: polling calls per tick <= one per 1,000 open batches (rounded up).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import anthropic

import batchd.daemon
from batchd.batches import Context, submit_flush
from batchd.emulator import EmulatorConfig, EmulatorThread
from batchd.store import Keys, Store, connect

from ._common import API_KEY, Env, Row, at_most, prepare_flush, running_daemon

OPEN = 200


async def run(env: Env) -> list[Row]:
    window = 30.0 if env.quick else 60.0
    with EmulatorThread(EmulatorConfig(processing_seconds=86_000.0)) as emu:
        settings = env.settings(anthropic_base_url=emu.base_url)
        redis = connect(settings.redis_url, "daemon")
        try:
            await redis.flushall()
            store = Store(redis, Keys(settings.key_prefix))
            api = anthropic.AsyncAnthropic(api_key=API_KEY, base_url=emu.base_url, max_retries=0)
            ctx = Context(store, settings, api, scheduler=None)  # type: ignore[arg-type]
            for i in range(OPEN):
                await prepare_flush(store, 1, fid=f"bench-open-{i}")
                await submit_flush(ctx, f"bench-open-{i}")
            await api.close()
            assert len(await store.open_batch_ids()) == OPEN
        finally:
            await redis.aclose(close_connection_pool=True)

        ticks: list[dict[str, int]] = []
        original = batchd.daemon.poll_open_batches

        async def counted(context: Context) -> dict[str, int]:
            tally = await original(context)
            ticks.append(tally)
            return tally

        batchd.daemon.poll_open_batches = counted  # type: ignore[assignment]
        try:
            # Every call of the daemon's life over every tick it ran: no tick is cut by the window's edges.
            before: dict[str, Any] = emu.stats()
            async with running_daemon(settings):
                await asyncio.sleep(window)
            after: dict[str, Any] = emu.stats()
            n_ticks = len(ticks)
        finally:
            batchd.daemon.poll_open_batches = original  # type: ignore[assignment]
    polling = (after["list_calls"] - before["list_calls"]) + (
        after["retrieve_calls"] - before["retrieve_calls"]
    )
    per_tick = polling / max(n_ticks, 1)
    per_minute = (after["api_calls"] - before["api_calls"]) * 60 / window
    return [
        at_most("api_calls_poll_per_tick", per_tick, "calls", limit=float(math.ceil(OPEN / 1000))),
        at_most("api_calls_per_minute", per_minute, "calls/min", limit=None),
        at_most("api_calls_ticks", float(n_ticks), "ticks", limit=None),
    ]
