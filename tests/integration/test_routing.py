"""Routing and deadlines, end to end: a private redis-server, a daemon replica in-process, the emulator with
slow batches, and batchd's client and the HTTP front (the official SDK) as callers.

A request routed ``realtime`` is never batched; one whose deadline a slow batch would miss is answered
through the real-time Messages API (at standard prices) when its deadline less the margin comes, its
batch is canceled once all of its requests fell back, and the batch's own lines, when they land, are
dropped as duplicates; a deadline no batch could meet goes to real time at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
from pydantic import SecretStr

from batchd import AsyncClient
from batchd.backend import ClientBackend
from batchd.batches import realtime
from batchd.front import FrontConfig, serve_front
from batchd.leases import LEASE_S
from batchd.settings import Settings
from batchd.store import RequestState, Store, now_ms
from tests.daemon_harness import running_daemon
from tests.front_helpers import kwargs

TOKEN = "tok-routing-test-0123456789"
SLOW = 600.0  # seconds the emulator takes over a batch: longer than any test
# The default margin (30 s) plus a little: the fallback comes a few seconds after submit.
DEADLINE = 33.0


def params(text: str) -> dict[str, Any]:
    return {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": text}]}


async def until(check: Callable[[], Awaitable[bool]], *, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def costs(store: Store) -> tuple[int, int, int]:
    """(requests billed, cost, standard cost) over the whole ledger, in pico-USD."""
    rows = await store.ledger_rows(await store.ledger_days())
    return sum(r.requests for r in rows), sum(r.cost for r in rows), sum(r.standard for r in rows)


async def test_a_realtime_request_is_never_batched_and_costs_the_standard_price(
    make_settings: Callable[..., Settings], emulator: Any, store: Store
) -> None:
    settings = make_settings(emulator=True, max_batch_age_seconds=0.2)
    async with running_daemon(settings), AsyncClient(settings=settings) as client:
        message = await client.messages.create(**params("right now"), route="realtime", timeout=30)
    assert message.content[0].text == "echo: right now"  # type: ignore[union-attr]
    stats = emulator.stats()
    assert (stats["realtime_requests"], stats["batches_created"]) == (1, 0)
    billed, cost, standard = await costs(store)
    assert billed == 1 and cost == standard > 0  # nothing saved: it was not batched


async def test_a_deadline_a_slow_batch_would_miss_is_met_in_real_time(
    make_settings: Callable[..., Settings], emulator: Any, store: Store
) -> None:
    emulator.configure(processing_seconds=SLOW)
    settings = make_settings(emulator=True, max_batch_age_seconds=0.2)
    async with running_daemon(settings), AsyncClient(settings=settings) as client:
        started = time.monotonic()
        rids = await client.submit_many([params(f"hurry {i}") for i in range(3)], deadline=DEADLINE)
        # Batched first: the batch exists and is slow.
        await until(lambda: _created(emulator))
        results = [await client.result(rid, timeout=DEADLINE) for rid in rids]
        took = time.monotonic() - started
        assert [r.type for r in results] == ["succeeded"] * 3
        assert [r.message.content[0].text for r in results] == [f"echo: hurry {i}" for i in range(3)]  # type: ignore[union-attr]
        # Answered before the deadline, and not before its fallback time (deadline less the 30 s margin).
        assert DEADLINE - 30 - 0.5 <= took < DEADLINE, took
        assert emulator.stats()["realtime_requests"] == 3
        # Every request of the batch fell back: batchd canceled it, and its lines, once it ended, were
        # dropped as duplicates: each caller keeps its real-time answer.
        await until(lambda: _canceled(emulator))
        await until(lambda: _no_open_batches(store))
        again = [await client.result(rid, timeout=5) for rid in rids]
        assert [r.type for r in again] == ["succeeded"] * 3
        for rid in rids:
            record = await store.request(rid)
            assert record is not None and record.state is RequestState.DONE
    billed, cost, standard = await costs(store)
    # Three real-time answers at standard prices; the canceled batch billed nothing (it processed none).
    assert billed == 3 and cost == standard > 0


async def test_the_sender_sleeps_until_a_request_is_listed_or_due(
    make_settings: Callable[..., Settings], emulator: Any, monkeypatch: Any
) -> None:
    """No polling: with its safety look out of reach, an idle sender is woken by the listing of a request
    routed realtime, and sends one routed auto when its deadline less the margin comes."""
    asleep = asyncio.Event()
    first_of = realtime._first_of

    async def watched(stop: asyncio.Event, woken: asyncio.Event, *, timeout: float) -> None:
        if timeout >= 3600:  # nothing listed: asleep until woken
            asleep.set()
        await first_of(stop, woken, timeout=timeout)

    monkeypatch.setattr(realtime, "_SAFETY_S", 3600.0)
    monkeypatch.setattr(realtime, "_first_of", watched)
    emulator.configure(processing_seconds=SLOW)
    settings = make_settings(emulator=True, max_batch_age_seconds=0.2)
    async with running_daemon(settings), AsyncClient(settings=settings) as client:
        await asyncio.wait_for(asleep.wait(), 30)
        message = await client.messages.create(**params("wake up"), route="realtime", timeout=30)
        assert message.content[0].text == "echo: wake up"  # type: ignore[union-attr]
        asleep.clear()
        await asyncio.wait_for(asleep.wait(), 30)
        started = time.monotonic()
        rid = await client.submit(params("on time"), deadline=DEADLINE)
        result = await client.result(rid, timeout=DEADLINE)
        assert result.type == "succeeded"
        assert time.monotonic() - started >= DEADLINE - 30 - 0.5  # sent when due, not before
    assert emulator.stats()["realtime_requests"] == 2


async def test_a_deadline_no_batch_could_meet_goes_to_real_time_at_once(
    make_settings: Callable[..., Settings], emulator: Any
) -> None:
    emulator.configure(processing_seconds=SLOW)
    settings = make_settings(emulator=True, max_batch_age_seconds=0.2)
    async with running_daemon(settings), AsyncClient(settings=settings) as client:
        # 10 s is inside the 30 s margin: no batch could answer in time.
        message = await client.messages.create(**params("too soon"), deadline=10, timeout=10)
    assert message.content[0].text == "echo: too soon"  # type: ignore[union-attr]
    stats = emulator.stats()
    assert (stats["realtime_requests"], stats["batches_created"]) == (1, 0)


async def test_the_front_takes_route_and_deadline_headers(
    make_settings: Callable[..., Settings], emulator: Any
) -> None:
    """The official SDK against the front: batchd-route: realtime, and batchd-deadline with a slow batch."""
    emulator.configure(processing_seconds=SLOW)
    settings = make_settings(emulator=True, max_batch_age_seconds=0.2)
    async with running_daemon(settings), AsyncClient(settings=settings) as queue:
        site = await serve_front(
            ClientBackend(queue), FrontConfig(tokens=(SecretStr(TOKEN),)), "127.0.0.1", 0
        )
        try:
            async with anthropic.AsyncAnthropic(base_url=site.url, api_key=TOKEN, timeout=60) as client:
                now = await client.messages.create(
                    **kwargs("realtime via the front"), extra_headers={"batchd-route": "realtime"}
                )
                started = time.monotonic()
                raw = await client.messages.with_raw_response.create(
                    **kwargs("deadline via the front"), extra_headers={"batchd-deadline": str(DEADLINE)}
                )
                took = time.monotonic() - started
                refused = None
                try:
                    await client.messages.create(
                        **kwargs("bad"), extra_headers={"batchd-route": "realtime", "batchd-deadline": "60"}
                    )
                except anthropic.BadRequestError as exc:
                    refused = exc
        finally:
            await site.close()
    assert now.content[0].text == "echo: realtime via the front"  # type: ignore[union-attr]
    message = await raw.parse()
    assert message.content[0].text == "echo: deadline via the front"  # type: ignore[union-attr]
    assert raw.headers["batchd-request-id"]
    assert DEADLINE - 30 - 0.5 <= took < DEADLINE, took
    assert refused is not None and "batchd-deadline" in refused.message
    stats = emulator.stats()
    assert stats["realtime_requests"] == 2 and stats["batches_created"] == 1


async def _created(emulator: Any) -> bool:
    return bool(emulator.stats()["batches_created"] >= 1)


async def _canceled(emulator: Any) -> bool:
    return bool(emulator.stats()["batches_canceled"] >= 1)


async def _no_open_batches(store: Store) -> bool:
    return not await store.open_batches()


async def test_a_replica_killed_mid_realtime_call_is_taken_over_within_seconds(
    make_settings: Callable[..., Settings], emulator: Any, store: Store
) -> None:
    """The state a SIGKILL leaves mid-call: the request claimed and its real-time lease held by a replica that
    no longer renews it. Another replica sends it once the lease lapses (LEASE_S), not later."""
    settings = make_settings(emulator=True, max_batch_age_seconds=0.2)
    async with AsyncClient(settings=settings) as client:
        rid = await client.submit(params("orphaned call"), route="realtime")
        claims, _ = await store.scripts.claim_realtime(
            now_ms=now_ms(), limit=10, claim_ms=int(LEASE_S * 1000)
        )
        assert [c.rid for c in claims] == [rid]
        assert await store.take_lock(store.keys.realtime_lease(rid), "dead-replica", ms=int(LEASE_S * 1000))
        started = time.monotonic()
        async with running_daemon(settings, consumer="survivor"):
            result = await client.result(rid, timeout=LEASE_S + 15)
        took = time.monotonic() - started
    assert result.type == "succeeded"
    assert LEASE_S - 1 <= took <= LEASE_S + 5, took
    assert emulator.stats()["realtime_requests"] == 1


async def test_a_real_time_refusal_is_the_callers_answer_with_the_apis_error(
    make_settings: Callable[..., Settings], emulator: Any
) -> None:
    """More max_tokens than the model allows is accepted in a batch with the output-300k beta, but refused in
    real time: routed realtime, the caller gets the API's 400 as an errored result, at once and unpaid."""
    settings = make_settings(emulator=True, max_batch_age_seconds=0.2)
    huge = {**params("too long for real time"), "model": "claude-sonnet-4-6", "max_tokens": 200_000}
    async with running_daemon(settings), AsyncClient(settings=settings) as client:
        rid = await client.submit(huge, betas=["output-300k-2026-03-24"], route="realtime")
        result = await client.result(rid, timeout=30)
    assert result.type == "errored"
    assert result.error.error.type == "invalid_request_error"  # type: ignore[union-attr]
    assert "max_tokens" in result.error.error.message  # type: ignore[union-attr]
    stats = emulator.stats()
    assert (stats["realtime_requests"], stats["batches_created"]) == (1, 0)
