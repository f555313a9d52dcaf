"""batchd within the Message Batches API's limits (the limits issue): two replicas against the emulator
enforcing a tier's requests per minute and processing-queue cap.

The product settings stay at their defaults except the batch age and poll interval (shortened to make the
tests fast) and the tier, which says what the emulator enforces. batchd stretches the poll tick at tier 1
so polling takes at most a quarter of the rate: 5.3 s, whatever the poll interval.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from typing import Any

import pytest

from batchd import AsyncClient
from batchd.emulator import EmulatorConfig, EmulatorThread
from batchd.settings import Settings
from batchd.store import Store
from tests.daemon_harness import running_daemon
from tests.eventually import eventually


def params(text: str) -> dict[str, Any]:
    return {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": text}]}


class Clock:
    """The emulator's clock: real time plus a shift a test can move forward (to end every batch at once)."""

    def __init__(self) -> None:
        self.shift = 0.0

    def __call__(self) -> float:
        return time.time() + self.shift


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def emulator_at(clock: Clock) -> Iterator[Callable[..., EmulatorThread]]:
    """``emulator_at(tier, **knobs)``: an emulator enforcing that tier's limits (knobs given win)."""
    with contextlib.ExitStack() as threads:

        def start(tier: int, **knobs: Any) -> EmulatorThread:
            config = EmulatorConfig()
            config.update({"tier": tier, **knobs})
            return threads.enter_context(EmulatorThread(config, host="127.0.0.1", port=0, clock=clock))

        yield start


async def two_replicas(stack: AsyncExitStack, settings: Settings) -> None:
    await stack.enter_async_context(running_daemon(settings, consumer="replica-a"))
    await stack.enter_async_context(running_daemon(settings, consumer="replica-b"))


async def answered(store: Store, rids: list[str]) -> int:
    done = 0
    for start in range(0, len(rids), 5000):
        done += sum(line is not None for line in await store.result_lines(rids[start : start + 5000]))
    return done


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as stack:
        yield stack


@pytest.mark.timeout(420)
async def test_two_replicas_at_tier_1_answer_20000_requests_with_under_1_percent_429s(
    make_settings: Callable[..., Settings],
    emulator_at: Callable[..., EmulatorThread],
    store: Store,
    stack: AsyncExitStack,
) -> None:
    """40 batches of 500: 40 creates, 40 downloads and the polls, about 85 calls, well over what tier 1
    allows in a minute. Sent as fast as they could go, half would be answered 429 (82 of 166 calls, with the
    limiter taken out); the shared limiter spreads them over the minutes the tier allows instead."""
    emulator = emulator_at(1, processing_seconds=0.5)
    settings = make_settings(
        anthropic_base_url=emulator.base_url, api_tier=1, max_batch_requests=500, max_batch_age_seconds=0.5
    )
    await two_replicas(stack, settings)
    client = await stack.enter_async_context(AsyncClient(settings=settings))
    rids: list[str] = []
    for chunk in range(20):
        rids += await client.submit_many([params(f"request {chunk}-{i}") for i in range(1000)])
    started = time.monotonic()

    async def all_answered() -> bool:
        return await answered(store, rids) == len(rids)

    await eventually(all_answered, timeout=360, interval=1.0)
    stats = emulator.stats()
    assert (stats["requests_received"], stats["duplicate_custom_ids"]) == (20_000, 0)
    assert stats["api_calls"] > 60, stats  # more than a minute's worth at tier 1: the limit was in play
    assert stats["rate_limited_rpm"] < stats["api_calls"] / 100, stats
    print(
        f"\ntier 1, two replicas: 20000 requests in {stats['batches_created']} batches, "
        f"{stats['api_calls']} API calls ({stats['list_calls']} lists, {stats['retrieve_calls']} retrieves), "
        f"{stats['rate_limited_rpm']} answered 429, {time.monotonic() - started:.0f} s"
    )


@pytest.mark.timeout(180)
async def test_two_hundred_open_batches_are_polled_with_one_list_call_per_tick(
    make_settings: Callable[..., Settings],
    emulator_at: Callable[..., EmulatorThread],
    clock: Clock,
    store: Store,
    stack: AsyncExitStack,
) -> None:
    """At tier 4 (200 creates would take tier 1 four minutes; a poll's cost does not depend on the tier):
    200 open batches cost one list call per poll tick, on one replica of the two, and no retrieve; and all
    200 ending at once are all noticed on the next tick."""
    emulator = emulator_at(4, processing_seconds=3600.0)
    settings = make_settings(
        anthropic_base_url=emulator.base_url,
        api_tier=4,
        max_batch_requests=1,
        max_batch_age_seconds=0.05,
        poll_interval_seconds=0.5,
    )
    await two_replicas(stack, settings)
    client = await stack.enter_async_context(AsyncClient(settings=settings))
    rids = await client.submit_many([params(f"alone {i}") for i in range(200)])

    async def all_open() -> bool:
        return len(await store.open_batch_ids()) == 200

    await eventually(all_open, timeout=120, interval=0.2)
    before, since = emulator.stats(), time.monotonic()

    async def three_seconds_passed() -> bool:
        return time.monotonic() - since >= 3.0

    await eventually(three_seconds_passed, timeout=10, interval=0.1)
    after, elapsed = emulator.stats(), time.monotonic() - since
    lists = after["list_calls"] - before["list_calls"]
    ticks = elapsed / settings.poll_interval_seconds
    assert 1 <= lists <= ticks + 1, f"{lists} list calls in {elapsed:.1f}s of {ticks:.1f} ticks"
    assert after["retrieve_calls"] == before["retrieve_calls"]

    clock.shift = 4000.0  # every batch ends now
    ended_at = time.monotonic()

    async def all_answered() -> bool:
        return await answered(store, rids) == len(rids)

    await eventually(all_answered, timeout=60, interval=0.2)
    stats = emulator.stats()
    assert (stats["batches_created"], stats["duplicate_custom_ids"]) == (200, 0)
    print(
        f"\n200 open batches: {lists} list calls in {elapsed:.1f}s ({ticks:.0f} ticks), 0 retrieves; "
        f"all answered {time.monotonic() - ended_at:.1f}s after they ended"
    )


@pytest.mark.timeout(240)
async def test_the_queue_cap_holds_sealed_flushes_back_without_loss(
    make_settings: Callable[..., Settings],
    emulator_at: Callable[..., EmulatorThread],
    store: Store,
    stack: AsyncExitStack,
) -> None:
    """Tier 1 with the processing queue capped at 300 requests (100,000 would take minutes to fill): 400
    requests in flushes of 100. Three batches go out; the fourth flush waits until one has been answered,
    and meanwhile the accumulator stops flushing (so intake backpressure reaches producers). The API never
    has to refuse a create, and every request is answered once."""
    emulator = emulator_at(1, processing_seconds=4.0, queue_limit=300)
    settings = make_settings(
        anthropic_base_url=emulator.base_url,
        api_tier=1,
        api_queue_limit=300,
        max_batch_requests=100,
        max_batch_age_seconds=0.5,
    )
    await two_replicas(stack, settings)
    client = await stack.enter_async_context(AsyncClient(settings=settings))
    rids = await client.submit_many([params(f"first wave {i}") for i in range(400)])

    async def held() -> bool:
        return await store.held_by_queue_cap_since() is not None

    await eventually(held, timeout=30, interval=0.05)
    snap = await store.snapshot(dead_after_ms=10_000)
    assert snap.open_requests == 300 and snap.held_by_queue_cap and snap.flushes_waiting == 1

    # While a flush is held, what arrives stays in intake: its age grows past the batch age many times.
    later = await client.submit_many([params(f"second wave {i}") for i in range(50)])

    async def waits_in_intake() -> bool:
        snap = await store.snapshot(dead_after_ms=10_000)
        return snap.pending_requests == 50 and (snap.oldest_age_seconds or 0) >= 4 * 0.5

    await eventually(waits_in_intake, timeout=20, interval=0.1)

    everyone = rids + later

    async def all_answered() -> bool:
        return await answered(store, everyone) == len(everyone)

    await eventually(all_answered, timeout=180, interval=0.5)
    stats = emulator.stats()
    assert stats["rate_limited_queue"] == 0, "batchd let the API refuse a create at its queue cap"
    assert (stats["requests_received"], stats["duplicate_custom_ids"]) == (450, 0)
    assert await store.open_requests() == 0
