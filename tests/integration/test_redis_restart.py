"""Redis crashes (SIGKILL) and comes back on the same port while a daemon and its callers are busy.

The server runs with AOF and ``appendfsync always``: once a submit returns, its request is on disk. Every
such request must still get exactly one answer after the crash, the daemon must say that it lost Redis and
carry on once Redis is back, and a caller that calls while Redis is down gets RedisUnavailable at once,
never a hang.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from anthropic.types.messages import MessageBatchResult

from batchd import AsyncClient, RedisUnavailable
from batchd import metrics as batchd_metrics
from batchd.settings import Settings
from batchd.store import RequestState
from tests.daemon_harness import running_daemon
from tests.eventually import eventually
from tests.redis_server import RedisServer

# "Within a few seconds": a refused connection must fail at once.
FAIL_FAST = 5.0


def params(text: str) -> dict[str, Any]:
    return {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": text}]}


@pytest.fixture
def aof_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer.start_new(tmp_path, "--appendonly", "yes", "--appendfsync", "always")
    try:
        yield server
    finally:
        server.stop()


def _delivered_total() -> float:
    return sum(
        batchd_metrics.REGISTRY.get_sample_value("batchd_results_total", {"type": t}) or 0.0
        for t in batchd_metrics.RESULT_TYPES
    )


async def _collect(client: AsyncClient, rid: str, deadline: float) -> MessageBatchResult:
    """What a caller does: wait for the answer, calling again while Redis is (still) unreachable."""
    while True:
        try:
            return await client.result(rid, timeout=max(0.1, deadline - time.monotonic()))
        except RedisUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)  # a caller's retry backoff, bounded by the deadline


async def _true(value: bool) -> bool:
    return value


def _count(caplog: pytest.LogCaptureFixture, needle: str) -> int:
    return sum(needle in r.getMessage() for r in list(caplog.records))


def _logged(caplog: pytest.LogCaptureFixture, logger: str, *needles: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return any(
            r.name == logger and all(n in r.getMessage() for n in needles) for r in list(caplog.records)
        )

    check.__name__ = f"{logger} logged {needles}"
    return check


async def test_every_accepted_request_is_answered_once_across_a_redis_crash(
    aof_server: RedisServer,
    make_settings: Callable[..., Settings],
    emulator: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="batchd")
    # Batches stay open for a while, so the crash finds requests in every state.
    emulator.configure(processing_seconds=1.0)
    settings = make_settings(
        emulator=True,
        redis_url=aof_server.url,
        max_batch_age_seconds=0.3,
    )
    delivered_before = _delivered_total()
    texts: dict[str, str] = {}

    async with running_daemon(settings) as daemon, AsyncClient(settings=settings) as client:

        async def submit_group(name: str, n: int) -> list[str]:
            rids = await client.submit_many([params(f"{name}-{i}") for i in range(n)])
            texts.update({rid: f"{name}-{i}" for i, rid in enumerate(rids)})
            return rids

        # 1. answered before the crash
        answered = await submit_group("answered", 10)
        await asyncio.gather(*(client.result(r, timeout=30) for r in answered))

        # 2. inside a batch that is still processing at the crash
        in_batch = await submit_group("in-batch", 10)

        async def in_open_batch() -> bool:
            states = await daemon.store.request_states(in_batch)
            return bool(await daemon.store.open_batch_ids()) and all(
                s is RequestState.FLUSHED for s in states.values()
            )

        await eventually(in_open_batch, timeout=15)

        # 3. a steady stream of callers that runs straight through the crash and the restart
        flow_accepted: list[str] = []
        flow_refused: list[str] = []  # submit raised: maybe written (a reply lost in the crash), maybe not
        stop_flow = asyncio.Event()

        async def flow() -> None:
            n = 0
            while not stop_flow.is_set():
                rid = f"flow-{n}"
                texts[rid] = rid
                n += 1
                try:
                    await client.submit(params(rid), rid)
                except RedisUnavailable:
                    flow_refused.append(rid)
                else:
                    flow_accepted.append(rid)
                await asyncio.sleep(0.01)  # pacing: about 100 submits a second, not a synchronisation

        producer = asyncio.create_task(flow())
        try:
            await eventually(lambda: _true(len(flow_accepted) >= 10))

            # 4. still queued (not yet flushed: the age trigger is 0.3 s away) at the crash
            queued = await submit_group("queued", 10)

            aof_server.kill()

            # A caller that calls now gets a clear error at once, never a hang.
            started = time.monotonic()
            async with asyncio.timeout(FAIL_FAST):
                with pytest.raises(RedisUnavailable, match="unreachable"):
                    await client.submit(params("while down"))
                with pytest.raises(RedisUnavailable):
                    await client.submit_many([params("while down 1"), params("while down 2")])
                with pytest.raises(RedisUnavailable):
                    await client.result(queued[0], timeout=60)
                with pytest.raises(RedisUnavailable):
                    await client.result(answered[0], timeout=60)
            assert time.monotonic() - started < FAIL_FAST

            # The daemon notices: its supervisor says Redis is unreachable and that it will reconnect.
            await eventually(
                _logged(caplog, "batchd.daemon", "Redis unreachable", "reconnecting"), timeout=15
            )
            # Down long enough for the callers' stream to run into the crash.
            await eventually(lambda: _true(len(flow_refused) >= 5), timeout=10)

            aof_server.start()  # same port, same args: the AOF is replayed

            # 5. submitted after Redis came back
            after = await submit_group("after", 10)
            accepted_before_restart = len(flow_accepted)
            await eventually(lambda: _true(len(flow_accepted) >= accepted_before_restart + 10))
        finally:
            stop_flow.set()
            await producer

        # A refused submit may still have been written (the crash can eat the reply): if it was, it is an
        # accepted request like any other and is answered too; if not, it left no trace.
        written = [rid for rid in flow_refused if (await daemon.store.result_line(rid))[1]]

        deadline = time.monotonic() + 25
        everyone = answered + in_batch + queued + after + flow_accepted + written
        results = await asyncio.gather(*(_collect(client, rid, deadline) for rid in everyone))
        for rid, result in zip(everyone, results, strict=True):
            assert result.type == "succeeded", (rid, result)
            assert result.message.content[0].text == f"echo: {texts[rid]}"  # type: ignore[union-attr]

        # The daemon kept working after the restart: nothing left in flight, its loops alive.
        async def drained() -> bool:
            snap = await daemon.store.snapshot(dead_after_ms=10_000)
            return (snap.pending_requests, snap.pending_bytes, snap.open_batches) == (0, 0, 0)

        await eventually(drained, timeout=15)
        assert daemon.health.all_alive()

    # Exactly one answer each: one delivery per request (the NX'd result key was never replaced), and no
    # request reached the API twice under the same custom_id.
    assert _delivered_total() - delivered_before == len(everyone)
    stats = emulator.stats()
    assert stats["duplicate_custom_ids"] == 0
    assert stats["requests_received"] == len(everyone)
    # The crash is what the daemon logged about: not an unexpected failure with a traceback.
    assert not [r for r in caplog.records if r.name == "batchd.daemon" and r.levelno >= logging.ERROR]


async def test_a_job_cut_off_by_the_crash_runs_again_soon_after_redis_is_back(
    aof_server: RedisServer,
    make_settings: Callable[..., Settings],
    emulator: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="batchd")
    caplog.set_level(logging.INFO, logger="arq.worker")
    # A submit job is inside its create call when Redis dies; the call returns while Redis is down, so the
    # job cannot record the batch it made. Its arq in-progress key survives the crash (AOF, with its TTL):
    # unless the daemon clears what its dead worker left, the job does not run again until that lease
    # lapses. When it does run, it must adopt the batch its cut-off create made, not pay for it twice.
    emulator.configure(create_delay_seconds=1.5)
    settings = make_settings(
        emulator=True,
        redis_url=aof_server.url,
        max_batch_age_seconds=0.1,
    )
    async with running_daemon(settings) as daemon, AsyncClient(settings=settings) as client:
        rid = await client.submit(params("cut off"), "cut-off-1")

        async def creating() -> bool:
            # Inside the call: the API holds the body (the rate slot, taken from Redis, is behind it).
            recorded = await daemon.store.inflight_create() is not None
            return recorded and bool(emulator.stats()["creates_in_flight"] == 1)

        await eventually(creating, timeout=15, interval=0.01)
        aof_server.kill()
        # The create returns (the API made the batch) while Redis is down...
        await eventually(lambda: _true(emulator.stats()["batches_created"] == 1), timeout=10)
        # ...and Redis stays down until the supervisor's next retry has failed, so the job's writes have
        # certainly been tried against the dead server.
        seen = _count(caplog, "Redis unreachable")
        await eventually(lambda: _true(_count(caplog, "Redis unreachable") > seen), timeout=15)
        emulator.configure(create_delay_seconds=0.0)
        aof_server.start()

        started = time.monotonic()
        result = await _collect(client, rid, time.monotonic() + 15)
        assert result.type == "succeeded"
        assert time.monotonic() - started < 15
    stats = emulator.stats()
    assert (stats["batches_created"], stats["duplicate_custom_ids"]) == (1, 0), "paid twice"
