"""``batchd demo``: the whole path on one machine, with nothing to set up.

Redis: the one named by ``--redis-url``/``BATCHD_REDIS_URL``; otherwise a private ``redis-server`` (if one is
on PATH) or an in-process fakeredis server, removed at the end. API: the real one when an API key and a
base URL are configured, else batchd's emulator. The daemon runs in-process; a few hundred concurrent
callers each make one ``messages.create`` call; the demo prints what happened and what it cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydantic import SecretStr

from . import pricing
from .client import AsyncClient
from .daemon import Daemon
from .errors import InvalidParams, RequestErrored, RequestFailed
from .settings import Settings, load_settings

__all__ = ["run_demo"]

MODELS = ("claude-haiku-4-5", "claude-sonnet-4-5", "claude-opus-4-5")
_LONG_PROMPT = "Summarise this paragraph. " + "The quick brown fox jumps over the lazy dog. " * 110


@dataclass
class _Tally:
    answers: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    mismatched: int = 0
    batch_cost: float = 0.0
    standard_cost: float = 0.0


@contextlib.contextmanager
def _embedded_redis(out: IO[str]) -> Iterator[str]:
    """A private Redis for the demo: redis-server if installed, else fakeredis over TCP."""
    if shutil.which("redis-server"):
        from .localredis import RedisServer

        with tempfile.TemporaryDirectory(prefix="batchd-demo-") as tmp:
            server = RedisServer(Path(tmp))
            server.start()
            print(f"Redis:  private redis-server on 127.0.0.1:{server.port} (removed at exit)", file=out)
            try:
                yield server.url
            finally:
                server.stop()
        return
    from fakeredis import TcpFakeServer

    from .localredis import free_port

    port = free_port()
    fake = TcpFakeServer(("127.0.0.1", port), server_type="redis")
    thread = threading.Thread(target=fake.serve_forever, daemon=True)
    thread.start()
    print(f"Redis:  in-process fakeredis on 127.0.0.1:{port} (no redis-server on PATH)", file=out)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        fake.shutdown()
        fake.server_close()


@contextlib.contextmanager
def _api(base: Settings, out: IO[str]) -> Iterator[dict[str, Any]]:
    if base.anthropic_api_key is not None and base.anthropic_base_url:
        print(f"API:    {base.anthropic_base_url} (configured)", file=out)
        yield {}
        return
    from .emulator import EmulatorConfig, EmulatorThread

    # The emulator keeps tier 4's limits, and batchd is told so: the demo's few batches never wait on them.
    config = EmulatorConfig(processing_seconds=0.5)
    config.update({"tier": 4})
    with EmulatorThread(config) as emulator:
        print(f"API:    batchd emulator at {emulator.base_url} (0.5 s per batch, tier 4 limits)", file=out)
        yield {
            "anthropic_base_url": emulator.base_url,
            "anthropic_api_key": SecretStr("demo-key"),
            "api_tier": 4,
        }


async def run_demo(
    *, requests: int = 300, redis_url: str | None = None, config: str | None = None, out: IO[str] = sys.stdout
) -> int:
    base = load_settings(config)
    named = redis_url or os.environ.get("BATCHD_REDIS_URL")
    with contextlib.ExitStack() as stack:
        if named:
            url = named
            print("Redis:  " + url.split("@")[-1] + " (named)", file=out)
        else:
            url = stack.enter_context(_embedded_redis(out))
        api = stack.enter_context(_api(base, out))
        settings = base.model_copy(
            update={
                "redis_url": url,
                # A prefix of its own: the demo never touches a real deployment's keys on a named Redis.
                "key_prefix": f"batchd-demo-{uuid.uuid4().hex[:8]}",
                # Limits scaled to the run, so each trigger fires: about three batches of short
                # requests by count, the long ones by bytes (a few per batch), the tail by age.
                "max_batch_requests": max(5, requests // 3),
                "max_batch_bytes": max(4, requests // 30) * (len(_LONG_PROMPT) + 200),
                "max_batch_age_seconds": 1.0,
                "poll_interval_seconds": 0.2,
                "metrics_port": 0,
                **api,
            }
        )
        return await _drive(settings, requests, out)
    return 0  # pragma: no cover - ExitStack does not swallow exceptions


async def _drive(settings: Settings, total: int, out: IO[str]) -> int:
    daemon = Daemon(settings, consumer="demo")
    runner = asyncio.create_task(daemon.run(install_signal_handlers=False))
    await daemon.wait_ready()
    tally = _Tally()
    started = time.monotonic()
    try:
        async with AsyncClient(settings=settings) as client:
            # Three waves, so each trigger shows: many short requests at once (count), long documents
            # (bytes), and a small tail that waits for the age limit.
            long_n = max(1, total // 10)
            tail = max(1, total // 6)
            short = max(0, total - long_n - tail)
            waves = [("short", short), ("long", long_n), ("short", tail)]
            print(
                f"\nsending {total} requests from {total} concurrent callers "
                f"({short} short, {long_n} long, then {tail} stragglers), models {', '.join(MODELS)}",
                file=out,
            )
            n = 0
            for kind, count in waves:
                await asyncio.gather(*(_call(client, n + i, kind, tally) for i in range(count)))
                n += count
            recent = [f.as_dict() for f in await daemon.store.recent_flushes()]
    finally:
        daemon.stop()
        await runner
    elapsed = time.monotonic() - started
    _report(out, tally, list(reversed(recent)), elapsed)
    ok = tally.mismatched == 0 and sum(tally.answers.values()) == total
    return 0 if ok else 1


async def _call(client: AsyncClient, n: int, kind: str, tally: _Tally) -> None:
    model = MODELS[n % len(MODELS)]
    text = f"request {n}: {_LONG_PROMPT}" if kind == "long" else f"request {n}: what is {n} + {n}?"
    # Every 50th request is invalid on purpose (max_tokens 0): batchd refuses it at submit with the API's
    # own message, rather than let its caller wait a whole batch for the same 400.
    max_tokens = 0 if n % 50 == 49 else 64
    t0 = time.monotonic()
    try:
        message = await client.messages.create(
            model=model, max_tokens=max_tokens, messages=[{"role": "user", "content": text}], timeout=120
        )
    except InvalidParams as exc:
        tally.answers["refused"] += 1
        tally.errors[str(exc)] += 1
        return
    except RequestErrored:
        tally.answers["errored"] += 1
        return
    except RequestFailed as exc:
        tally.answers[exc.result_type] += 1
        return
    finally:
        tally.latencies.append(time.monotonic() - t0)
    tally.answers["succeeded"] += 1
    first = message.content[0]
    if getattr(first, "text", None) != f"echo: {text}":
        tally.mismatched += 1
    costs = pricing.costs(message.model, message.usage.model_dump())
    if costs is not None:
        tally.batch_cost += costs[0]
        tally.standard_cost += costs[1]


def _report(out: IO[str], tally: _Tally, flushes: list[dict[str, Any]], elapsed: float) -> None:
    print(f"\nbatches ({len(flushes)}):", file=out)
    for f in flushes:
        print(
            f"  {f['batch']}  {f['requests']:>4} requests  {f['bytes']:>7} bytes  flushed by {f['trigger']}",
            file=out,
        )
    by_trigger = Counter(f["trigger"] for f in flushes)
    print("  triggers: " + ", ".join(f"{k} {v}" for k, v in sorted(by_trigger.items())), file=out)
    answers = ", ".join(f"{k} {v}" for k, v in sorted(tally.answers.items()))
    print(f"\nanswers: {answers}", file=out)
    for reason, count in sorted(tally.errors.items()):
        print(f"  refused at submit, as the API would: {count} ({reason}; sent on purpose)", file=out)
    verdict = "yes" if tally.mismatched == 0 else f"NO: {tally.mismatched} callers got someone else's answer"
    print(f"every caller got its own answer: {verdict}", file=out)
    lat = sorted(tally.latencies)
    if lat:
        p95 = lat[min(len(lat) - 1, int(len(lat) * 0.95))]
        print(
            f"latency, call to answer: median {statistics.median(lat):.2f}s, p95 {p95:.2f}s, "
            f"max {lat[-1]:.2f}s (batches wait up to max_batch_age_seconds to fill)",
            file=out,
        )
    if tally.standard_cost:
        saved = tally.standard_cost - tally.batch_cost
        print(
            f"cost of these tokens: ${tally.standard_cost:.6f} at standard price, ${tally.batch_cost:.6f} at "
            f"batch price: saved ${saved:.6f} ({saved / tally.standard_cost:.0%})",
            file=out,
        )
    print(f"done in {elapsed:.1f}s", file=out)
