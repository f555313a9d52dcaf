"""cache_*: what prompt-cache-aware batching saves, measured with the emulator's prompt-caching model.

The workload: many requests over 20 shared prefixes (a ~1,150-token system prompt each, with a
``cache_control`` breakpoint, and a short question), arriving interleaved (p0 p1 ... p19 p0 ...), sent through
a real daemon to the emulator three times, each on a fresh queue and a fresh emulator cache:

- ``off``: ``cache_grouping = false``: flushes in arrival order, so every batch holds every prefix;
- ``grouped``: ``cache_grouping = true`` (the default): requests sharing a prefix flush into one batch,
  next to each other;
- ``primed``: grouping plus ``cache_priming``: one request per new prefix goes first in a small batch, the
  rest once it has written the cache.

The emulator runs on a settable clock that only moves when every batch of a wave is created, so batches
created together are processed together, as the API processes them: that is when concurrent requests miss
each other's writes (docs/emulator.md, "Prompt caching"). Its knobs here: a batch takes 10 s,
a write is readable 0.2 s after its request (about 2 neighbours of a 100-request batch run concurrently).
Hit rate and cost come from batchd's own ledger (``batchd costs``); latency is in batch round trips.

Runnable alone: ``python -m benchmarks.cache_workload [--quick] [--json PATH]``. ``run(quick)`` returns the
rows in the suite's shape (``{"name", "value", "unit", "reference", "ratio", "target", "pass"}``); each mode's
reference is the mode before it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from batchd.client import AsyncClient
from batchd.daemon import Daemon
from batchd.emulator import EmulatorConfig, EmulatorThread
from batchd.ledger import costs_report
from batchd.settings import Settings, load_settings
from batchd.store import Keys, Store, connect

from ._common import describe_machine, out, private_redis, table

__all__ = ["MODES", "run"]

PREFIXES = 20
MAX_BATCH_REQUESTS = 100
PROCESSING_S = 10.0  # emulator clock
VISIBILITY_S = 0.2  # emulator clock
MODES = ("off", "grouped", "primed")
_QUIET_S = 0.5  # real time with no new batch before the wave is taken as complete


class _Clock:
    """The emulator's clock: it moves only when the driver moves it."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _params(prefix: int, question: int) -> dict[str, Any]:
    system = (
        f"You are assistant {prefix} of the house. " + "Answer in the house style, briefly and kindly. " * 100
    )
    return {
        "model": "claude-haiku-4-5",
        "max_tokens": 64,
        "system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": f"question {question} for assistant {prefix}"}],
    }


@dataclass
class ModeResult:
    mode: str
    requests: int
    hit_rate: float
    cost_usd: float
    round_trips: float  # emulator time from the first create to the last batch's end, in batch durations
    batches: int


@contextlib.asynccontextmanager
async def _daemon(settings: Settings) -> AsyncIterator[Daemon]:
    daemon = Daemon(settings, consumer="cache-bench")
    task = asyncio.create_task(daemon.run(install_signal_handlers=False))
    ready = asyncio.create_task(daemon.wait_ready())
    done, _ = await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ready.cancel()
        await task
    try:
        yield daemon
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 60)


async def _run_mode(
    mode: str, per_prefix: int, redis_url: str, emu: EmulatorThread, clock: _Clock
) -> ModeResult:
    emu.reset()
    settings = load_settings(
        redis_url=redis_url,
        key_prefix=f"cache-{mode}",
        anthropic_api_key="cache-bench",
        anthropic_base_url=emu.base_url,
        max_batch_requests=MAX_BATCH_REQUESTS,
        max_batch_age_seconds=0.2,
        poll_interval_seconds=0.1,
        metrics_port=0,
        cache_grouping=mode != "off",
        cache_priming=mode == "primed",
    )
    params = [_params(p, q) for q in range(per_prefix) for p in range(PREFIXES)]  # interleaved
    started_at = clock.now
    async with AsyncClient(settings=settings) as client:
        # Queued before the daemon starts, so its first read takes them all (1,000 at most) whatever this
        # machine's timing: every mode starts from the same buffer.
        rids = await client.submit_many(params)
        async with _daemon(settings):
            await _drive(client, rids, settings, emu, clock, mode)
        redis = connect(settings.redis_url, "client")
        report = await costs_report(Store(redis, Keys(settings.key_prefix)))
        await redis.aclose(close_connection_pool=True)
    total = report["total"]
    return ModeResult(
        mode=mode,
        requests=total["requests"],
        hit_rate=float(total["cache_hit_rate"] or 0.0),
        cost_usd=float(total["cost_usd"]),
        round_trips=(clock.now - started_at) / (PROCESSING_S + 1),
        batches=emu.stats()["batches_created"],
    )


async def _drive(
    client: AsyncClient, rids: list[str], settings: Settings, emu: EmulatorThread, clock: _Clock, mode: str
) -> None:
    """Move the emulator's clock past each wave of batches (once every batch of it is created) until every
    request is answered."""
    # Requests not yet in a batch when a wave is complete: none, or (primed) all but the primers.
    settled = {0, len(rids) - PREFIXES} if mode == "primed" else {0}
    waiting = asyncio.ensure_future(asyncio.gather(*(client.result(rid, timeout=600) for rid in rids)))
    redis = connect(settings.redis_url, "client")
    store = Store(redis, Keys(settings.key_prefix))
    try:
        created, quiet_since = -1, time.monotonic()
        while not waiting.done():
            stats = emu.stats()
            if stats["batches_created"] != created:
                created, quiet_since = stats["batches_created"], time.monotonic()
            snapshot = await store.snapshot(dead_after_ms=10_000)
            wave_complete = (
                time.monotonic() - quiet_since >= _QUIET_S
                and snapshot.flushes_waiting == 0
                and snapshot.pending_requests in settled
            )
            if wave_complete and stats["batches_open"] > 0:
                clock.now += PROCESSING_S + 1  # every batch of the wave ends, together
                quiet_since = time.monotonic()
            await asyncio.wait({waiting}, timeout=0.05)
    finally:
        await redis.aclose(close_connection_pool=True)
    assert all(r.type == "succeeded" for r in waiting.result()), "every request should succeed"


def _rows(results: list[ModeResult]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    previous: ModeResult | None = None
    for result in results:
        before = previous.mode if previous is not None else None
        hit_ref = previous.hit_rate if previous is not None else None
        cost_ref = previous.cost_usd if previous is not None else None
        rows.append(
            {
                "name": f"cache_hit_rate_{result.mode}",
                "value": result.hit_rate,
                "unit": "ratio",
                "reference": hit_ref,
                "ratio": result.hit_rate / hit_ref if hit_ref else None,
                "target": f"> {before}" if before else "baseline",
                "pass": hit_ref is None or result.hit_rate > hit_ref,
            }
        )
        rows.append(
            {
                "name": f"cache_cost_{result.mode}",
                "value": result.cost_usd,
                "unit": "USD",
                "reference": cost_ref,
                "ratio": result.cost_usd / cost_ref if cost_ref else None,
                "target": f"< {before}" if before else "baseline",
                "pass": cost_ref is None or result.cost_usd < cost_ref,
            }
        )
        rows.append(
            {
                "name": f"cache_latency_{result.mode}",
                "value": result.round_trips,
                "unit": "batch round trips",
                "reference": previous.round_trips if previous is not None else None,
                "ratio": result.round_trips / previous.round_trips if previous is not None else None,
                "target": "informational (priming adds one round trip)",
                "pass": True,
            }
        )
        previous = result
    return rows


async def run(quick: bool) -> list[dict[str, Any]]:
    """The three modes on one private Redis and one emulator; the rows of the suite's table."""
    per_prefix = 20 if quick else 50
    clock = _Clock()
    config = EmulatorConfig(processing_seconds=PROCESSING_S, cache_visibility_seconds=VISIBILITY_S)
    results: list[ModeResult] = []
    with private_redis() as server, EmulatorThread(config, clock=clock) as emu:
        for mode in MODES:
            results.append(await _run_mode(mode, per_prefix, server.url, emu, clock))
    out(
        table(
            f"cache workload: {PREFIXES} prefixes x {per_prefix} requests, interleaved "
            f"({MAX_BATCH_REQUESTS} per batch)",
            ["mode", "requests", "batches", "hit rate", "cost USD", "round trips"],
            [[r.mode, r.requests, r.batches, r.hit_rate, r.cost_usd, r.round_trips] for r in results],
        )
    )
    return _rows(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="20 requests per prefix instead of 50")
    parser.add_argument("--json", type=Path, help="write {'results': [...]} here")
    args = parser.parse_args()
    out(describe_machine())
    rows = asyncio.run(run(args.quick))
    for row in rows:
        out(f"{row['name']:<24} {row['value']:.6g} {row['unit']}  target {row['target']}  pass={row['pass']}")
    if args.json is not None:
        args.json.write_bytes(orjson.dumps({"results": rows}, option=orjson.OPT_INDENT_2))
    if not all(row["pass"] for row in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
