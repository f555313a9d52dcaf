"""One deterministic test per crash window (docs/reliability.md names each one and its test).

Each test builds the exact state a crash leaves behind, by calling batchd's own steps up to the crash
point (the accumulator, the Lua scripts, ``batches.*`` with a Context whose scheduler records jobs and
runs them on demand), then lets batchd recover and counts: every request answered exactly once (one
publication on the delivered channel each, read after a barrier), nothing sent to the API twice.
Where only a real process shows the window (a job SIGKILLed inside arq), a real ``batchd run`` is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from batchd import AsyncClient, batches
from batchd import accumulator as accumulator_module
from batchd.accumulator import Accumulator
from batchd.batches import Context, RetryLater
from batchd.batches import reconciler as reconcile_module
from batchd.batches.lost import LOST_AFTER_S
from batchd.emulator.testing import async_wait_for_batch
from batchd.leases import LEASE_S
from batchd.settings import Settings, load_settings
from batchd.store import FlushState, Keys, RequestState, Store, Trigger, now_ms
from tests.chaos.harness import DaemonProcess, Publications, daemon_env
from tests.daemon_harness import running_daemon
from tests.eventually import eventually

KEYS = Keys()


def params(text: str) -> dict[str, Any]:
    return {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": text}]}


# --- a tiny job runner, the answers, the flushes ----------------------------------------------------------
class Jobs:
    """A batches.Scheduler that records the jobs batchd asks for and runs them on demand: a tiny arq with
    arq's job-id rule (a job already waiting is not enqueued twice) and its deferrals, plus the daemon's
    poller (a tick while batches are open)."""

    def __init__(self) -> None:
        self.submits: list[str] = []
        self.fanouts: list[str] = []
        self._due: dict[tuple[str, str], float] = {}

    async def submit(self, fid: str) -> None:
        self.submits.append(fid)
        self._due.setdefault(("submit", fid), time.monotonic())

    async def fanout(self, batch_id: str) -> bool:
        if ("fanout", batch_id) in self._due:
            return False
        self.fanouts.append(batch_id)
        self._due[("fanout", batch_id)] = time.monotonic()
        return True

    async def run(self, ctx: Context, timeout: float = 30.0, poll_every: float = 0.1) -> dict[str, str]:
        """Run the due jobs (waiting out each deferral, as arq does), and a poller tick every ``poll_every``
        while batches are open, until no job is due and no batch is open."""
        outcomes: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        next_tick = time.monotonic()
        while self._due or await ctx.store.open_batch_ids():
            if time.monotonic() > deadline:
                raise AssertionError(f"jobs still due after {timeout}s: {sorted(self._due)}")
            if time.monotonic() >= next_tick and await ctx.store.open_batch_ids():
                await batches.poll_open_batches(ctx)
                next_tick = time.monotonic() + poll_every
                continue
            job, when = min(self._due.items(), key=lambda item: item[1], default=(None, next_tick))
            if when > time.monotonic():
                await asyncio.sleep(min(when, next_tick) - time.monotonic())  # the deferral asked for
                continue
            assert job is not None
            del self._due[job]
            kind, arg = job
            job_fn = batches.submit_flush if kind == "submit" else batches.fanout_results
            try:
                outcomes[f"{kind}:{arg}"] = await job_fn(ctx, arg)
            except RetryLater as exc:
                self._due[job] = time.monotonic() + exc.defer
        return outcomes


async def run_until_settled(
    job: Callable[[Context, str], Awaitable[str]], ctx: Context, arg: str, timeout: float = 30.0
) -> str:
    """Run one job as arq would: again after each RetryLater's deferral, until it returns."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await job(ctx, arg)
        except RetryLater as exc:
            if time.monotonic() + exc.defer > deadline:
                raise
            await asyncio.sleep(exc.defer)  # the deferral the job asked for


@contextlib.asynccontextmanager
async def batch_context(settings: Settings, store: Store, jobs: Jobs) -> AsyncIterator[Context]:
    """A Context like the daemon's (daemon.Daemon.run), with the recording scheduler."""
    assert settings.anthropic_api_key is not None
    api = anthropic.AsyncAnthropic(
        api_key=settings.anthropic_api_key.get_secret_value(),
        base_url=settings.anthropic_base_url,
        max_retries=2,
    )
    try:
        yield Context(store, settings, api, jobs)
    finally:
        await api.close()


class Answers:
    """The delivered channel, counted from before the first submit."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.publications = Publications()

    async def published(self) -> Counter[str]:
        """Publications per request id so far (complete up to this call: a barrier comes back first)."""
        await self.publications.barrier(self.redis, KEYS.delivered_channel)
        return self.publications.answers()

    async def assert_answered_once(self, texts: dict[str, str]) -> dict[str, Any]:
        """Every request published exactly once, and its stored answer is its own; returns the results."""
        assert await self.published() == Counter({rid: 1 for rid in texts})
        lines = await self.redis.mget([KEYS.result(rid) for rid in texts])
        results = {}
        for (rid, text), line in zip(texts.items(), lines, strict=True):
            assert line is not None, f"{rid} has no answer"
            obj = orjson.loads(line)
            assert obj["custom_id"].rpartition("-")[0] == rid
            assert obj["result"]["type"] == "succeeded", obj
            assert obj["result"]["message"]["content"][0]["text"] == "echo: " + text
            results[rid] = obj
        return results


@pytest.fixture
async def answers(redis_url: str) -> AsyncIterator[Answers]:
    client = aioredis.Redis.from_url(redis_url)
    result = Answers(client)
    listener = asyncio.create_task(result.publications.listen(client, KEYS.delivered_channel))
    try:
        await asyncio.wait_for(result.publications.listening.wait(), 5)
        yield result
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        await client.aclose()


class FlushLog:
    """on_flush for test accumulators: which consumer sealed which flush."""

    def __init__(self) -> None:
        self.flushes: list[tuple[str, str, int]] = []

    def on_flush(self, consumer: str) -> Callable[[str, Trigger, int, int], Any]:
        async def record(fid: str, trigger: Trigger, n: int, nbytes: int) -> None:
            self.flushes.append((consumer, fid, n))

        return record


def make_accumulator(
    store: Store,
    consumer: str,
    log: FlushLog,
    *,
    max_age_s: float = 0.0,
    dead_after_s: float = 10.0,
) -> Accumulator:
    return Accumulator(
        store,
        consumer=consumer,
        max_requests=1000,
        max_bytes=10_000_000,
        max_age_s=max_age_s,
        on_flush=log.on_flush(consumer),
        dead_after_s=dead_after_s,
    )


async def flush_queued(acc: Accumulator) -> None:
    """One round of the accumulator: what is queued is read and (max age 0) flushed at once."""
    await acc.store.intake.ensure_group()
    await acc.step()


async def submit(client: AsyncClient, label: str, n: int) -> dict[str, str]:
    texts = [f"{label} {i}" for i in range(n)]
    rids = await client.submit_many([params(t) for t in texts])
    return dict(zip(rids, texts, strict=True))


async def states(store: Store, rids: Sequence[str]) -> Counter[RequestState | None]:
    return Counter((await store.request_states(rids)).values())


async def flush_state(store: Store, fid: str) -> FlushState | None:
    flush = await store.flush(fid)
    return None if flush is None else flush.state


# --- submit -> flush --------------------------------------------------------------------------------------
async def test_submit_to_flush_a_dead_replicas_entries_are_claimed_a_live_replicas_are_not(
    store: Store, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A consumer must be idle this long before it counts as gone (3 s in production).
    monkeypatch.setattr(accumulator_module, "_CONSUMER_IDLE_MS", 100)
    log = FlushLog()
    dead = make_accumulator(store, "dead", log, max_age_s=3600)
    live = make_accumulator(store, "live", log, max_age_s=3600)
    heir = make_accumulator(store, "heir", log, max_age_s=0.05, dead_after_s=1.0)
    started = now_ms()
    for name in ("dead", "live", "heir"):
        await store.heartbeat(name, started)
    async with AsyncClient(settings=make_settings()) as client:
        dead_texts = await submit(client, "read by the replica that dies", 10)
        await store.intake.ensure_group()
        await dead.step()
        live_texts = await submit(client, "read by the replica that lives", 5)
        await live.step()
    # Read, not flushed: in each consumer's pending list.
    assert {c.name: c.pending for c in await store.intake.consumers()} == {"dead": 10, "live": 5}

    # "dead" is SIGKILLed here: its heartbeat stops. "live" keeps beating (and is just as idle on the stream).
    await store.heartbeat("dead", started - 60_000)
    claimed = 0

    async def heir_claimed_the_dead_replicas_entries() -> bool:
        nonlocal claimed
        await store.heartbeat("live", now_ms())
        await store.heartbeat("heir", now_ms())
        claimed += await heir.claim_from_dead()
        return claimed >= 10

    await eventually(heir_claimed_the_dead_replicas_entries, timeout=10, interval=0.05)
    await heir.step()  # the claimed entries are long past their age: flushed at once

    assert claimed == 10
    assert [(consumer, n) for consumer, _, n in log.flushes] == [("heir", 10)]
    assert set(await store.flush_rids(log.flushes[0][1])) == set(dead_texts)
    pending = {c.name: c.pending for c in await store.intake.consumers() if c.pending}
    assert pending == {"live": 5}  # the live replica keeps its own
    assert await states(store, list(live_texts)) == {RequestState.QUEUED: 5}


async def test_submit_to_flush_a_redis_error_inside_a_flush_strands_no_request(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """The accumulator loses Redis in the middle of a flush (the commit script never ran). The daemon's
    supervisor runs the same Accumulator again: the entries it had taken for that flush are still in its
    pending list and must be flushed, not skipped as "already held"."""
    real_commit = store.scripts.commit_flush
    failures = 0

    async def commit_flush_losing_redis_once(
        fid: str, ids: Sequence[str], rids: Sequence[str], *, now_ms: int, group: str = ""
    ) -> tuple[int, int]:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise RedisConnectionError("Connection lost (injected before the script ran)")
        return await real_commit(fid, ids, rids, now_ms=now_ms, group=group)

    log = FlushLog()
    store.scripts.commit_flush = commit_flush_losing_redis_once  # type: ignore[method-assign]
    acc = make_accumulator(store, "c1", log)
    async with AsyncClient(settings=make_settings()) as client:
        texts = await submit(client, "in the flush that failed", 10)
    stop = asyncio.Event()
    with pytest.raises(RedisConnectionError):
        await acc.run(stop)  # the supervisor (daemon.Daemon._supervise) logs this and runs it again
    task = asyncio.create_task(acc.run(stop))

    async def all_flushed() -> bool:
        return await states(store, list(texts)) == {RequestState.FLUSHED: 10}

    try:
        await eventually(all_flushed, timeout=5)
    except AssertionError:
        pending = await store.intake.group_pending()
        raise AssertionError(
            f"requests stranded after the flush failed: states {dict(await states(store, list(texts)))}, "
            f"still pending for the (live) consumer: {pending}; nothing will ever read them again"
        ) from None
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert failures == 1


# --- inside a chunked flush -------------------------------------------------------------------------------
async def test_inside_a_chunked_flush_the_unsealed_flush_is_sealed_by_reconcile_and_answered(
    aredis: aioredis.Redis,
    store: Store,
    make_settings: Callable[..., Settings],
    emulator: Any,
    answers: Answers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reconcile_module, "STALE_BUILDING_S", 0.5)
    monkeypatch.setattr(accumulator_module, "_CONSUMER_IDLE_MS", 100)
    settings = make_settings(emulator=True)
    async with AsyncClient(settings=settings) as client:
        texts = await submit(client, "chunked", 7)
    await store.intake.ensure_group()
    entries = await store.intake.read_new("dying", count=100, block_ms=None)
    assert [e.rid for e in entries] == list(texts)

    # The accumulator commits the first chunk of its flush, then dies: no second chunk, no seal.
    fid = f"{now_ms()}-deadbeef0001"
    first, rest = entries[:4], entries[4:]
    await store.scripts.commit_flush(
        fid, [e.entry_id for e in first], [e.rid for e in first], now_ms=now_ms()
    )
    assert await flush_state(store, fid) is FlushState.BUILDING

    jobs = Jobs()
    async with batch_context(settings, store, jobs) as ctx:
        # Too young to be abandoned: a live accumulator may still be adding chunks.
        assert (await batches.reconcile(ctx))["sealed"] == 0
        assert jobs.submits == []

        async def reconcile_sealed_it() -> bool:
            await aredis.delete(KEYS.reconcile_lock)  # the cron's own lock; the test runs it back to back
            return (await batches.reconcile(ctx))["sealed"] == 1

        await eventually(reconcile_sealed_it, timeout=5, interval=0.05)
        assert await flush_state(store, fid) is FlushState.SEALED
        assert jobs.submits == [fid]

        # The entries of the chunk that never ran are still the dead consumer's: claimed and flushed.
        log = FlushLog()
        heir = make_accumulator(store, "heir", log, dead_after_s=0.2)
        await store.heartbeat("heir", now_ms())

        async def heir_flushed_the_rest() -> bool:
            await heir.claim_from_dead()
            await heir.step()
            return sum(n for _, _, n in log.flushes) == len(rest)

        await eventually(heir_flushed_the_rest, timeout=10, interval=0.05)
        for _, heir_fid, _ in log.flushes:
            await jobs.submit(heir_fid)
        await jobs.run(ctx)

    assert await store.flush_rids(fid) == [e.rid for e in first]
    await answers.assert_answered_once(texts)
    stats = emulator.stats()
    assert (stats["requests_received"], stats["duplicate_custom_ids"]) == (7, 0)


# --- between seal and the submit job ----------------------------------------------------------------------
async def test_between_seal_and_submit_job_reconcile_submits_the_sealed_flush(
    store: Store, make_settings: Callable[..., Settings], emulator: Any, answers: Answers
) -> None:
    settings = make_settings(emulator=True)
    log = FlushLog()  # its on_flush enqueues nothing: the replica died right after seal_flush
    async with AsyncClient(settings=settings) as client:
        texts = await submit(client, "sealed, never enqueued", 5)
    await flush_queued(make_accumulator(store, "acc", log))
    [(_, fid, n)] = log.flushes
    assert n == 5 and await flush_state(store, fid) is FlushState.SEALED

    jobs = Jobs()
    async with batch_context(settings, store, jobs) as ctx:
        assert (await batches.reconcile(ctx))["submit"] == 1
        assert jobs.submits == [fid]
        await jobs.run(ctx)
    await answers.assert_answered_once(texts)
    assert emulator.stats()["batches_created"] == 1


# --- between the intent and batches.create returning ------------------------------------------------------
class ProcessKilled(BaseException):
    """The replica dies here (a BaseException: no `except Exception` in the SDK or batchd stops it)."""


class DiesAroundCreate(httpx2.AsyncBaseTransport):
    """An HTTP transport for the SDK that lets every call through, except that the process dies at the
    batches.create POST: before it leaves (``reached_api=False``), or once the API has created the batch
    and before its reply is read (``reached_api=True``). Everything submit_flush wrote before the POST
    stays in Redis exactly as it wrote it."""

    def __init__(self, *, reached_api: bool) -> None:
        self.inner = httpx2.AsyncHTTPTransport()
        self.reached_api = reached_api

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if request.method == "POST" and request.url.path == "/v1/messages/batches":
            if self.reached_api:
                response = await self.inner.handle_async_request(request)
                await response.aread()
                await response.aclose()
            raise ProcessKilled
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def die_around_create(settings: Settings, store: Store, fid: str, *, reached_api: bool) -> None:
    """Run submit_flush in a replica that dies at its create POST."""
    assert settings.anthropic_api_key is not None
    http = httpx2.AsyncClient(transport=DiesAroundCreate(reached_api=reached_api))
    api = anthropic.AsyncAnthropic(
        api_key=settings.anthropic_api_key.get_secret_value(),
        base_url=settings.anthropic_base_url,
        http_client=http,
    )
    try:
        ctx = Context(store, settings, api, Jobs())
        with pytest.raises(ProcessKilled):
            await batches.submit_flush(ctx, fid)
    finally:
        await api.close()
        await http.aclose()


async def test_between_intent_and_create_returning_the_orphan_batch_is_adopted_not_created_again(
    store: Store, make_settings: Callable[..., Settings], emulator: Any, answers: Answers
) -> None:
    settings = make_settings(emulator=True)
    log = FlushLog()
    async with AsyncClient(settings=settings) as client:
        texts = await submit(client, "created, never recorded", 5)
    await flush_queued(make_accumulator(store, "acc", log))
    [(_, fid, _)] = log.flushes

    await die_around_create(settings, store, fid, reached_api=True)
    assert emulator.stats()["batches_created"] == 1
    assert await flush_state(store, fid) is FlushState.SUBMITTING
    assert await store.known_batch_ids() == []  # the API has a batch batchd never recorded

    jobs = Jobs()
    async with batch_context(settings, store, jobs) as ctx:
        # The job runs again (arq re-runs it; the reconciler re-enqueues it).
        orphan = await batches.submit_flush(ctx, fid)
        assert emulator.stats()["batches_created"] == 1  # adopted, not created again
        flush = await store.flush(fid)
        assert flush is not None and (flush.state, flush.batch_id) == (FlushState.SUBMITTED, orphan)
        assert (await store.recent_flushes(1))[0].adopted is True
        assert await store.open_batch_ids() == [orphan]  # the poller follows it from here
        await jobs.run(ctx)
    await answers.assert_answered_once(texts)
    stats = emulator.stats()
    assert (stats["batches_created"], stats["requests_received"], stats["duplicate_custom_ids"]) == (1, 5, 0)


async def test_between_intent_and_create_returning_nothing_created_means_one_create(
    store: Store, make_settings: Callable[..., Settings], emulator: Any, answers: Answers
) -> None:
    """The job died after recording its intent, before the POST left: no orphan to find, so the retry
    creates the batch, once."""
    settings = make_settings(emulator=True)
    log = FlushLog()
    async with AsyncClient(settings=settings) as client:
        texts = await submit(client, "intent only", 5)
    await flush_queued(make_accumulator(store, "acc", log))
    [(_, fid, _)] = log.flushes

    await die_around_create(settings, store, fid, reached_api=False)
    assert await flush_state(store, fid) is FlushState.SUBMITTING
    assert emulator.stats()["batches_created"] == 0
    jobs = Jobs()
    async with batch_context(settings, store, jobs) as ctx:
        await jobs.submit(fid)
        await jobs.run(ctx)
    await answers.assert_answered_once(texts)
    stats = emulator.stats()
    assert (stats["batches_created"], stats["duplicate_custom_ids"]) == (1, 0)


async def test_between_intent_and_create_returning_another_flushs_orphan_is_not_adopted(
    store: Store, make_settings: Callable[..., Settings], emulator: Any, answers: Answers
) -> None:
    """Two flushes of the same size. A's replica died once the API had created A's batch (the orphan); the
    create lock was freed; B's create then failed with a retryable error that created nothing (500/529),
    so B is 'submitting' too. B's retry must not take A's orphan for its own: if it does, A's retry finds
    no orphan and sends A's requests again (paid twice), and B's requests burn an attempt unsent."""
    settings = make_settings(emulator=True)
    log = FlushLog()
    acc = make_accumulator(store, "acc", log)
    async with AsyncClient(settings=settings) as client:
        texts_a = await submit(client, "flush A", 5)
        await flush_queued(acc)
        texts_b = await submit(client, "flush B", 5)
        await flush_queued(acc)
    [(_, fid_a, _), (_, fid_b, _)] = log.flushes

    await die_around_create(settings, store, fid_a, reached_api=True)
    [orphan_a] = [b.id async for b in _batches(settings)]
    jobs = Jobs()
    async with batch_context(settings, store, jobs) as ctx:
        emulator.configure(create_error_rate=1.0)
        with pytest.raises(RetryLater):
            await batches.submit_flush(ctx, fid_b)
        emulator.configure(create_error_rate=0.0)
        assert await flush_state(store, fid_b) is FlushState.SUBMITTING
        # The two jobs run again, B's first (A's waits out arq's in-progress TTL). B's may be asked to
        # wait first: after a 500 its own create's outcome is unknown until the list has had time to show it.
        await run_until_settled(batches.submit_flush, ctx, fid_b)
        await run_until_settled(batches.submit_flush, ctx, fid_a)
        flush_a, flush_b = await store.flush(fid_a), await store.flush(fid_b)
        assert flush_a is not None and flush_b is not None
        batch_a, batch_b = flush_a.batch_id, flush_b.batch_id
        outcome = {
            "A kept its own batch": batch_a == orphan_a,
            "B took A's batch": batch_b == orphan_a,
            "duplicate_custom_ids": emulator.stats()["duplicate_custom_ids"],
        }
        assert outcome == {"A kept its own batch": True, "B took A's batch": False, "duplicate_custom_ids": 0}
        await jobs.run(ctx)
    await answers.assert_answered_once({**texts_a, **texts_b})
    records = [await store.request(r) for r in [*texts_a, *texts_b]]
    assert [r.attempts if r else None for r in records] == [1] * 10


async def test_a_create_that_outlives_its_timeout_and_then_succeeds_is_adopted_not_paid_twice(
    store: Store, make_settings: Callable[..., Settings], emulator: Any, answers: Answers
) -> None:
    """The create call times out (create_timeout_seconds) while the API still works on the body, and the API
    then makes the batch. The retry must wait for it and adopt it, never create again.

    The timeout is shortened here only to reach this window in seconds rather than five minutes: the
    window's own bound (SETTLE_S after the attempt ended) is the default."""
    settings = make_settings(emulator=True, create_timeout_seconds=5.0)  # its lowest
    log = FlushLog()
    async with AsyncClient(settings=settings) as client:
        texts = await submit(client, "created after the timeout", 5)
    await flush_queued(make_accumulator(store, "acc", log))
    [(_, fid, _)] = log.flushes
    emulator.configure(create_delay_seconds=7.0)  # the API makes the batch 2 s after the call gave up
    jobs = Jobs()
    async with batch_context(settings, store, jobs) as ctx:
        with pytest.raises(RetryLater, match="TimeoutError"):
            await batches.submit_flush(ctx, fid)
        emulator.configure(create_delay_seconds=0.0)
        flush = await store.flush(fid)
        assert flush is not None and flush.attempt_ended_ms is not None and not flush.attempt_answered
        batch_id = await run_until_settled(batches.submit_flush, ctx, fid)
        assert (await store.recent_flushes(1))[0].adopted is True
        assert emulator.stats()["batches_created"] == 1
        await jobs.run(ctx)
    await answers.assert_answered_once(texts)
    stats = emulator.stats()
    assert (stats["batches_created"], stats["duplicate_custom_ids"]) == (1, 0)
    assert (await store.batch(batch_id)) is not None


async def test_a_batch_the_api_forgot_is_sent_again(
    store: Store, make_settings: Callable[..., Settings], emulator: Any, answers: Answers
) -> None:
    """A batch the API has shown once and then no longer has (forgotten: deleted, or an API that lost it):
    after LOST_AFTER_S of not finding it, its requests are sent again in a new batch and answered once."""
    emulator.configure(processing_seconds=3600.0)
    settings = make_settings(emulator=True, max_batch_age_seconds=0.1)
    async with running_daemon(settings), AsyncClient(settings=settings) as client:
        texts = await submit(client, "in a batch the API forgets", 3)

        async def seen_open() -> bool:
            ids = await store.open_batch_ids()
            record = await store.batch(ids[0]) if ids else None
            return record is not None and record.seen

        await eventually(seen_open, timeout=30)
        [lost] = await store.open_batch_ids()
        emulator.configure(processing_seconds=0.2)
        assert emulator.forget_batch(lost)
        forgotten_at = time.monotonic()

        async def all_answered() -> bool:
            return sum(line is not None for line in await store.result_lines(list(texts))) == len(texts)

        await eventually(all_answered, timeout=LOST_AFTER_S + 30, interval=0.2)
        took = time.monotonic() - forgotten_at
    await answers.assert_answered_once(texts)
    stats = emulator.stats()
    assert (stats["batches_created"], stats["batches_forgotten"]) == (2, 1)
    assert LOST_AFTER_S <= took < LOST_AFTER_S + 10, f"sent again {took:.1f}s after the API forgot it"
    assert await store.open_batch_ids() == []


async def _batches(settings: Settings) -> AsyncIterator[Any]:
    assert settings.anthropic_api_key is not None
    async with anthropic.AsyncAnthropic(
        api_key=settings.anthropic_api_key.get_secret_value(), base_url=settings.anthropic_base_url
    ) as api:
        async for batch in api.messages.batches.list():
            yield batch


# --- inside fan-out ---------------------------------------------------------------------------------------
async def test_inside_fanout_a_cut_results_stream_resumes_from_its_checkpoint_and_delivers_once(
    store: Store, make_settings: Callable[..., Settings], emulator: Any, answers: Answers
) -> None:
    n = 1300  # more than two deliver chunks (500 lines each), so the cursor checkpoints mid-stream
    settings = make_settings(emulator=True)
    real_deliver = store.scripts.deliver
    deliver_calls = 0

    async def counting_deliver(deliveries: Sequence[Any], **kwargs: Any) -> Any:
        nonlocal deliver_calls
        deliver_calls += len(deliveries)
        return await real_deliver(deliveries, **kwargs)

    log = FlushLog()
    async with AsyncClient(settings=settings) as client:
        texts = await submit(client, "fan-out", n)
    acc = make_accumulator(store, "acc", log, max_age_s=3600)
    acc.max_requests = n  # one flush of all n, by count

    await store.intake.ensure_group()

    async def flushed_all() -> bool:
        await acc.step()
        return sum(count for _, _, count in log.flushes) == n

    await eventually(flushed_all, timeout=10)
    [(_, fid, _)] = log.flushes

    jobs = Jobs()
    store.scripts.deliver = counting_deliver  # type: ignore[method-assign]
    async with batch_context(settings, store, jobs) as ctx:
        batch_id = await batches.submit_flush(ctx, fid)
        ended = await anthropic_wait_ended(ctx, batch_id)
        assert ended

        emulator.configure(results_cut_rate=1.0, seed=20_241)  # every download breaks off somewhere
        cursors = []
        while len(cursors) < 30 and not (cursors and cursors[-1] >= 500):
            with pytest.raises(RetryLater, match="broke off"):
                await batches.fanout_results(ctx, batch_id)
            record = await store.batch(batch_id)
            cursors.append(record.cursor if record else 0)
        assert cursors[-1] >= 500, f"no checkpoint in {len(cursors)} cut downloads: {cursors}"
        assert cursors == sorted(cursors), "the checkpoint moved back"
        cursor = cursors[-1]
        during_cuts = await answers.published()
        assert set(during_cuts.values()) == {1} and len(during_cuts) >= cursor

        emulator.configure(results_cut_rate=0.0)
        calls_before = deliver_calls
        assert await batches.fanout_results(ctx, batch_id) == "delivered"
        assert deliver_calls - calls_before == n - cursor, (
            "the complete download did not resume at the cursor"
        )
        results = await answers.assert_answered_once(texts)

        # Running the fan-out of a finished batch again answers nobody twice, and the poller no longer
        # looks at it.
        assert await batches.fanout_results(ctx, batch_id) == "done"
        assert (await batches.poll_open_batches(ctx))["open"] == 0 and jobs.fanouts == []
        assert await answers.published() == Counter({rid: 1 for rid in texts})
        again = await store.result_lines(list(texts))
        assert [orjson.loads(line) for line in again if line] == list(results.values())
    assert emulator.stats()["results_cut"] == len(cursors)


async def anthropic_wait_ended(ctx: Context, batch_id: str, within: float = 10.0) -> bool:
    return (await async_wait_for_batch(ctx.api, batch_id, within=within)).processing_status == "ended"


async def test_inside_fanout_a_cut_after_many_polls_is_retried_within_seconds(
    make_settings: Callable[..., Settings], emulator: Any, store: Store
) -> None:
    """The backoff after a broken results download counts failed downloads of this batch, not polls:
    a batch polled many times and then cut once must not wait the 60 s cap (arq's job_try, once used as
    the attempt, counted every run of the old per-batch poll job)."""
    emulator.configure(processing_seconds=3.0)
    settings = make_settings(emulator=True, max_batch_age_seconds=0.1, poll_interval_seconds=0.1)
    async with running_daemon(settings), AsyncClient(settings=settings) as client:
        rid = await client.submit(params("cut once, after a long wait"))
        emulator.configure(results_cut_rate=1.0)

        async def cut_once() -> bool:
            return emulator.stats()["results_cut"] >= 1

        await eventually(cut_once, timeout=30, interval=0.01)
        emulator.configure(results_cut_rate=0.0)
        cut_at = time.monotonic()
        result = await client.peek(rid)
        assert result is None

        async def answered() -> bool:
            return await client.peek(rid) is not None

        try:
            await eventually(answered, timeout=10)
        except AssertionError:
            [batch_id] = await store.known_batch_ids()
            record = await store.batch(batch_id)
            polls = record.polls if record else 0
            raise AssertionError(
                f"still unanswered {time.monotonic() - cut_at:.0f}s after one cut results download; "
                f"the batch had been polled {polls} times before the cut"
            ) from None
    assert emulator.stats()["results_cut"] == 1


# --- a job SIGKILLed inside arq ---------------------------------------------------------------------------
async def _kill_mid_create(
    store: Store, emulator: Any, client: AsyncClient, first: DaemonProcess
) -> tuple[str, str, float, float]:
    """Start ``first``, get its submit job held inside the create call, SIGKILL ``first`` there. The API
    creates the batch 3 s later all the same (the reply goes nowhere): an orphan for the next replica.
    Returns (request id, the job's in-progress key, its TTL at the kill (s), the kill time)."""
    emulator.configure(create_delay_seconds=3.0)
    first.start()
    rid = await client.submit(params("killed mid-create"))

    async def creating() -> bool:
        return await store.inflight_create() is not None

    await eventually(creating, timeout=30, interval=0.01)
    in_progress = f"{KEYS.arq_namespace}in-progress:submit:{await store.inflight_create()}"

    async def submit_job_running() -> bool:
        return bool(await store.redis.exists(in_progress))

    await eventually(submit_job_running, timeout=10, interval=0.01)

    # The API has the whole body: from here it makes the batch, whatever happens to the caller.
    async def api_has_the_body() -> bool:
        return bool(emulator.stats()["creates_in_flight"] == 1)

    await eventually(api_has_the_body, timeout=10, interval=0.01)
    first.kill()
    killed_at = time.monotonic()
    emulator.configure(create_delay_seconds=0.0)
    return rid, in_progress, await store.redis.pttl(in_progress) / 1000, killed_at


@pytest.mark.timeout(120)
async def test_a_replica_killed_mid_create_is_taken_over_within_seconds(
    redis_url: str, store: Store, emulator: Any, tmp_path: Path
) -> None:
    """A replica is SIGKILLed while its submit job is inside the create call, at default settings. arq marks
    a running job with an in-progress key; batchd makes it a lease renewed by the replica's heartbeat, so
    another replica runs the job once it lapses (LEASE_S), not after the longest job timeout; it finds the
    batch the dead replica's create made and adopts it (nothing is paid twice)."""
    env = daemon_env(
        redis_url, emulator.base_url, max_batch_age_seconds=0.1, poll_interval_seconds=0.1, api_tier=4
    )
    first, second = DaemonProcess("first", env, tmp_path), DaemonProcess("second", env, tmp_path)
    try:
        async with AsyncClient(settings=load_settings(redis_url=redis_url)) as client:
            rid, _, ttl_s, killed_at = await _kill_mid_create(store, emulator, client, first)
            assert 0 < ttl_s <= LEASE_S, f"a killed job is blocked for {ttl_s:.0f}s by its in-progress key"
            second.start()
            result = await client.result(rid, timeout=LEASE_S + 30)
            assert result.type == "succeeded"
            assert time.monotonic() - killed_at < LEASE_S + 15
        stats = emulator.stats()
        assert (stats["batches_created"], stats["duplicate_custom_ids"]) == (1, 0), "paid twice"
    finally:
        first.kill()
        second.kill()


@pytest.mark.timeout(120)
async def test_a_restarted_replica_takes_back_its_own_jobs_at_once(
    redis_url: str, store: Store, emulator: Any, tmp_path: Path
) -> None:
    """The same replica (same name) restarts after a SIGKILL: it frees the jobs its dead process held at once,
    rather than when their leases lapse."""
    env = daemon_env(
        redis_url, emulator.base_url, max_batch_age_seconds=0.1, poll_interval_seconds=0.1, api_tier=4
    )
    replica = DaemonProcess("only", env, tmp_path)
    try:
        async with AsyncClient(settings=load_settings(redis_url=redis_url)) as client:
            rid, in_progress, _, _ = await _kill_mid_create(store, emulator, client, replica)
            # Its lease would now outlive the test: only the restarted process taking it back can free it
            # (whatever this machine's start-up time).
            assert await store.redis.pexpire(in_progress, 3_600_000)
            replica.start()

            async def freed() -> bool:
                return not await store.redis.exists(in_progress)

            await eventually(freed, timeout=120)
            result = await client.result(rid, timeout=30)
            assert result.type == "succeeded"
        stats = emulator.stats()
        assert (stats["batches_created"], stats["duplicate_custom_ids"]) == (1, 0), "paid twice"
    finally:
        replica.kill()
