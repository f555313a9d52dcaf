"""Chaos: real ``batchd run`` processes SIGKILLed and restarted at random moments while requests flow.

The issue this answers: nothing lost, nothing answered twice, nothing paid twice. The test process submits
thousands of requests (distinct texts, in random waves) through AsyncClient while a killer SIGKILLs the
daemon at random moments and starts a new one, against a private AOF redis-server (``appendfsync always``)
and the emulator with its faults on (create errors, 429s, transient 404s, cut results streams, expired
and overloaded/api_error results). When the dust settles it counts:

* every request has exactly one final answer (its result key), the one of its own last attempt;
* every request id was published exactly once on the delivered channel (subscribed before the first
  submit; a barrier message published after the daemons stopped proves the count is complete);
* no caller got another caller's answer (each succeeded text is ``"echo: " + its own text``);
* nothing was paid twice: no custom id in two batches (emulator ``duplicate_custom_ids``), the custom
  ids the API received are exactly ``rid-1 .. rid-<attempts>`` per request, no request succeeded in two
  attempts, every batch created on the API was recorded by batchd, and every flush has one batch.

``CHAOS_SEED=<n>`` replays the schedule (kill times, waves, emulator fault draws); timing still varies.
``CHAOS_FAULTS='{"create_lost_response_rate": 0.05}'`` changes or adds emulator knobs.
``--chaos-long`` runs 20,000 requests and 40 kills. The figures are printed (``-s`` or ``-rA``) and
recorded as junit properties.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from batchd import AsyncClient
from batchd.emulator import EmulatorConfig, EmulatorThread
from batchd.emulator.table import Kind
from batchd.settings import load_settings
from batchd.store import Keys, Store, split_custom_id
from tests.chaos.harness import DaemonProcess, Publications, daemon_env, log_events
from tests.eventually import eventually
from tests.redis_server import RedisServer

pytestmark = pytest.mark.timeout(1800)

# The API's faults, at rates that make each one happen many times in a run. A lost create response
# (the batch is created, the reply is a 500) exercises orphan adoption; CHAOS_FAULTS changes any of them.
FAULTS: dict[str, float] = {
    "processing_seconds": 0.5,
    "create_error_rate": 0.1,  # 500/529 on create, nothing created
    "create_lost_response_rate": 0.05,  # created, but the reply is a 500: adopt, never create again
    "rate_limit_rate": 0.05,  # 429 on any call
    "retry_after_seconds": 0.05,
    "transient_404_seconds": 0.3,  # a new batch is not visible at once
    "results_cut_rate": 0.2,  # the results download breaks off mid-stream
    "errored_rate": 0.03,  # api_error / overloaded_error results: retried
    "expired_rate": 0.03,  # expired results: retried
}

DAEMON_SETTINGS: dict[str, object] = {
    "max_batch_requests": 200,
    "max_batch_age_seconds": 0.3,
    "poll_interval_seconds": 0.1,
    # The emulator here has no rate limit (its faults include 429s): tier 4 describes it.
    "api_tier": 4,
    # Every product setting at its default (timeouts, leases, attempts): only the batch age and the poll
    # interval are shortened, to make the test fast.
}


@dataclass(frozen=True)
class Plan:
    requests: int
    kills: int
    replicas: int
    wave: int  # mean requests per wave
    wave_gap: tuple[float, float]  # random pause between waves (s)
    kill_gap: tuple[float, float]  # random time between kills (s)
    down: tuple[float, float]  # random time a killed slot stays down (s)
    settle_s: float  # after the last kill and wave: every answer within this (90 s: the bound)


CI_SINGLE = Plan(3000, 12, 1, 100, (0.1, 0.9), (0.6, 2.6), (0.0, 0.6), 90.0)
CI_TWO = Plan(3000, 12, 2, 100, (0.1, 0.9), (0.6, 2.6), (0.0, 0.6), 90.0)
LONG_SINGLE = Plan(20_000, 40, 1, 400, (0.1, 1.0), (0.5, 3.0), (0.0, 1.0), 90.0)
LONG_TWO = Plan(20_000, 40, 2, 400, (0.1, 1.0), (0.5, 3.0), (0.0, 1.0), 90.0)


def params(text: str) -> dict[str, Any]:
    return {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": text}]}


# --- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer.start_new(tmp_path, "--appendonly", "yes", "--appendfsync", "always")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1, 2**31))
    print(f"\nchaos seed = {value}  (rerun with CHAOS_SEED={value})", flush=True)
    return value


@pytest.fixture
def record_figure(
    request: pytest.FixtureRequest, record_testsuite_property: Callable[[str, object], None]
) -> Callable[[str, object], None]:
    """record_property where the junit family allows it (legacy/xunit1); pytest's default xunit2 refuses
    per-test properties with a warning (an error here), so there they go on the test suite, named by test."""
    if request.config.getini("junit_family") in ("legacy", "xunit1"):
        record: Callable[[str, object], None] = request.getfixturevalue("record_property")
        return record
    return lambda name, value: record_testsuite_property(f"{request.node.name}.{name}", value)


@pytest.fixture
def faulty_emulator(seed: int) -> Iterator[EmulatorThread]:
    faults = {**FAULTS, **orjson.loads(os.environ.get("CHAOS_FAULTS") or "{}")}
    with EmulatorThread(EmulatorConfig(seed=seed, **faults), host="127.0.0.1", port=0) as emulator:
        yield emulator


@contextlib.asynccontextmanager
async def guarded(client: AsyncClient) -> AsyncIterator[AsyncClient]:
    """The client, closed with a deadline: redis-py can lose the cancel ResultWaiter.close() sends its
    listener (when it lands inside a command), and close() then waits forever (see docs/reliability.md)."""
    try:
        yield client
    finally:
        closing = asyncio.create_task(client.close())
        done, _ = await asyncio.wait({closing}, timeout=20)
        if not done:
            listener = client._waiter._task
            if listener is not None:
                listener.cancel()  # a second cancel is not lost
            await asyncio.wait({closing}, timeout=10)
            pytest.fail("AsyncClient.close() hung: its result listener ignored the first cancel")


# --- the run --------------------------------------------------------------------------------------------
async def run_chaos(
    plan: Plan,
    seed: int,
    tmp_path: Path,
    server: RedisServer,
    emulator: EmulatorThread,
    record_property: Callable[[str, object], None],
) -> None:
    # One generator per actor: their draws must not depend on how the two interleave.
    waves_rng, kills_rng = random.Random(seed), random.Random(seed ^ 0x5EED)
    started = time.monotonic()
    keys = Keys()
    env = daemon_env(server.url, emulator.base_url, **DAEMON_SETTINGS)
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    daemons = [DaemonProcess(f"replica{i}", env, log_dir) for i in range(plan.replicas)]
    settings = load_settings(redis_url=server.url, anthropic_api_key="unused-by-clients")
    texts: dict[str, str] = {}
    waiters: dict[str, asyncio.Task[Any]] = {}
    publications = Publications()
    observer = aioredis.Redis.from_url(server.url)
    store = Store(observer, keys)
    listener = asyncio.create_task(publications.listen(observer, keys.delivered_channel))
    await asyncio.wait_for(publications.listening.wait(), 10)

    try:
        for daemon in daemons:
            daemon.start()
        async with guarded(AsyncClient(settings=settings, max_connections=16)) as client:

            async def produce() -> None:
                n = 0
                while n < plan.requests:
                    size = min(
                        plan.requests - n, waves_rng.randint(max(1, plan.wave // 2), plan.wave * 3 // 2)
                    )
                    wave = [f"chaos {seed} request {i}" for i in range(n, n + size)]
                    rids = await client.submit_many([params(text) for text in wave])
                    for rid, text in zip(rids, wave, strict=True):
                        texts[rid] = text
                        waiters[rid] = asyncio.create_task(client.result(rid, timeout=None))
                    n += size
                    await asyncio.sleep(waves_rng.uniform(*plan.wave_gap))  # chaos: a random gap, not a wait

            order = kills_rng.sample(range(len(daemons)), len(daemons))

            async def kill() -> None:
                for k in range(plan.kills):
                    await asyncio.sleep(kills_rng.uniform(*plan.kill_gap))  # chaos: a random moment
                    # Each replica at least once, in a random order; then any of them.
                    victim = daemons[order[k]] if k < len(order) else kills_rng.choice(daemons)
                    victim.kill()
                    await asyncio.sleep(kills_rng.uniform(*plan.down))
                    victim.start()

            await asyncio.gather(produce(), kill())
            chaos_done = time.monotonic()

            rids = list(texts)
            progress = Progress()

            async def all_answered() -> bool:
                missing = 0
                for start in range(0, len(rids), 1000):
                    values = await observer.mget([keys.result(r) for r in rids[start : start + 1000]])
                    missing += sum(v is None for v in values)
                await progress.note(observer, keys, missing, len(rids), started)
                return missing == 0

            async def drained() -> bool:
                snap = await store.snapshot(dead_after_ms=10_000)
                intake = await observer.xlen(keys.intake)
                return (snap.open_batches, snap.flushes_waiting, intake, snap.pending_requests) == (
                    0,
                    0,
                    0,
                    0,
                )

            try:
                await eventually(all_answered, timeout=plan.settle_s, interval=0.25)
                await eventually(drained, timeout=60, interval=0.1)
            except AssertionError:
                missing = [r for r in rids if not await observer.exists(keys.result(r))]
                states = Counter((await store.request_states(missing[:500])).values())
                raise AssertionError(
                    f"{len(missing)} of {len(rids)} requests unanswered {plan.settle_s:.0f}s after the "
                    f"chaos (states of the first 500: {dict(states)}); seed {seed}\n"
                    f"last progress: {progress.last}\n" + "\n".join(d.tail() for d in daemons)
                ) from None
            settled = time.monotonic()
            callers = await asyncio.wait_for(asyncio.gather(*waiters.values()), 60)

        # A replica restarted by the last kill may still be starting: the graceful stop is for running ones.
        await eventually(lambda: _all_ready(daemons), timeout=30, what="every replica ready before the stop")
        exit_codes = [await asyncio.to_thread(d.stop) for d in daemons]
        # Every daemon is gone: once a barrier comes back, every publication they made has been counted.
        await publications.barrier(observer, keys.delivered_channel)
        await audit(
            plan, seed, keys, observer, emulator, daemons, texts, callers, publications, exit_codes,
            wall=(started, chaos_done, progress.at_99, settled), record_property=record_property,
        )  # fmt: skip
    finally:
        for daemon in daemons:
            daemon.kill()
        for task in waiters.values():
            task.cancel()
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await listener
        await observer.aclose()


async def _all_ready(daemons: list[DaemonProcess]) -> bool:
    return all(d.ready() for d in daemons)


class Progress:
    """What the settle phase saw: when 99 % were answered, and (``CHAOS_DEBUG=1``) a line every 3 s."""

    def __init__(self) -> None:
        self.at_99: float | None = None
        self.last = ""
        self._printed = 0.0

    async def note(self, redis: aioredis.Redis, keys: Keys, missing: int, total: int, started: float) -> None:
        now = time.monotonic()
        if self.at_99 is None and missing <= total // 100:
            self.at_99 = now
        prefix = keys.arq_namespace + "in-progress:"
        in_progress = sorted(
            [
                k.decode().removeprefix(prefix)
                async for k in redis.scan_iter(match=prefix + "*", count=1000)
                if k.decode().startswith((prefix + "submit:", prefix + "fanout:"))
            ]
        )
        open_batches = await redis.zcard(keys.open_batches)
        flushes = await redis.zcard(keys.flushes)
        lock = await redis.get(keys.create_lock)
        self.last = (
            f"t={now - started:.1f}s unanswered={missing} open_batches={open_batches} "
            f"unsubmitted_flushes={flushes} create_lock={lock!r} jobs_in_progress={in_progress}"
        )
        if os.environ.get("CHAOS_DEBUG") and now - self._printed >= 3:
            self._printed = now
            print(self.last, flush=True)


async def audit(
    plan: Plan,
    seed: int,
    keys: Keys,
    redis: aioredis.Redis,
    emulator: EmulatorThread,
    daemons: list[DaemonProcess],
    texts: dict[str, str],
    callers: list[Any],
    publications: Publications,
    exit_codes: list[int | None],
    *,
    wall: tuple[float, float, float | None, float],
    record_property: Callable[[str, object], None],
) -> None:
    rids = list(texts)
    lines = []
    for start in range(0, len(rids), 1000):
        lines += await redis.mget([keys.result(r) for r in rids[start : start + 1000]])
    store = Store(redis, keys)
    attempts: dict[str, int] = {}
    for rid in rids:
        record = await store.request(rid)
        assert record is not None, rid
        attempts[rid] = record.attempts

    # 1. One final answer each, for its own last attempt, and the caller saw exactly that answer.
    types: Counter[str] = Counter()
    wrong: list[str] = []
    for rid, line, seen_by_caller in zip(rids, lines, callers, strict=True):
        assert line is not None, rid
        obj = orjson.loads(line)
        answered_rid, attempt = split_custom_id(obj["custom_id"])
        result = obj["result"]
        types[result["type"]] += 1
        if answered_rid != rid or attempt != attempts[rid]:
            wrong.append(f"{rid}: line for {obj['custom_id']} (attempts {attempts[rid]})")
        elif result["type"] == "succeeded":
            text = result["message"]["content"][0]["text"]
            if text != "echo: " + texts[rid]:
                wrong.append(f"{rid}: got {text!r}, asked {texts[rid]!r}")
        assert seen_by_caller.type == result["type"], rid
    assert not wrong, f"{len(wrong)} wrong answers, e.g. {wrong[:5]}"

    # 2. Exactly one publication per request (and none for anything else).
    published = publications.answers()
    twice = {rid: n for rid, n in published.items() if n != 1}
    assert not twice, f"{len(twice)} requests published more than once: {list(twice.items())[:5]}"
    assert set(published) == set(rids), (
        f"published {len(published)} ids for {len(rids)} requests; "
        f"never published: {sorted(set(rids) - set(published))[:5]}, "
        f"unknown: {sorted(set(published) - set(rids))[:5]}"
    )

    # 3. Nothing paid twice.
    stats = emulator.stats()
    sent = _sent_custom_ids(emulator)
    expected = Counter(f"{rid}-{a}" for rid in rids for a in range(1, attempts[rid] + 1))
    assert stats["duplicate_custom_ids"] == 0
    assert Counter(cid for cid, _ in sent) == expected, "the API received other custom ids than the attempts"
    successes = Counter(split_custom_id(cid)[0] for cid, kind in sent if kind == Kind.SUCCEEDED)
    billed_twice = [rid for rid, n in successes.items() if n > 1]
    assert not billed_twice, f"{len(billed_twice)} requests succeeded in two attempts: {billed_twice[:5]}"
    known = await redis.zcard(keys.known_batches)
    assert stats["batches_created"] == known, "a batch was created on the API that batchd never recorded"
    # Each flush went into one batch, and each attempt of a request into one flush.
    batch_fids: Counter[str] = Counter()
    flush_members: Counter[str] = Counter()
    for batch_id in await store.known_batch_ids():
        batch = await store.batch(batch_id)
        assert batch is not None, batch_id
        batch_fids[batch.fid] += 1
        flush_members.update(await store.flush_rids(batch.fid))
    assert max(batch_fids.values()) == 1, "a flush went into two batches"
    assert sum(batch_fids.values()) == known
    over = {rid: n for rid, n in flush_members.items() if n != attempts[rid]}
    assert not over, f"requests in more flushes than attempts: {list(over.items())[:5]}"

    # 4. Every replica stopped cleanly at the end.
    assert exit_codes == [0] * len(daemons), exit_codes

    started, chaos_done, at_99, settled = wall
    events = log_events(p for d in daemons for p in d.logs)
    figures = {
        "seed": seed,
        "replicas": plan.replicas,
        "requests": len(rids),
        "kills": sum(d.kills for d in daemons),
        "daemon_processes": sum(d.generation for d in daemons),
        "batches_created": stats["batches_created"],
        "batches_adopted": events["batch.adopted"],
        "requests_sent_to_api": stats["requests_received"],
        "retried_attempts": sum(attempts.values()) - len(rids),
        "answers": dict(sorted(types.items())),
        "published_once": sum(1 for n in published.values() if n == 1),
        "duplicate_custom_ids": stats["duplicate_custom_ids"],
        "billed_twice": len(billed_twice),
        "claimed_from_dead": events["claimed_requests"],
        "stale_flushes_sealed": events["stale_flush_sealed"],
        "faults": {
            "create_error": stats["faults_create_error"],
            "create_lost_response": stats["faults_create_lost_response"],
            "rate_limit": stats["faults_rate_limit"],
            "transient_404": stats["faults_transient_404"],
            "results_cut": stats["results_cut"],
            "errored": stats["faults_errored"],
            "expired": stats["faults_expired"],
        },
        "chaos_s": round(chaos_done - started, 1),
        # The tail: the last 1 % waits on whatever recovers slowest (a killed job's arq in-progress key).
        "settle_99pct_s": round((at_99 or settled) - chaos_done, 1),
        "settle_s": round(settled - chaos_done, 1),
        "wall_s": round(time.monotonic() - started, 1),
    }
    print("chaos figures:", orjson.dumps(figures, option=orjson.OPT_INDENT_2).decode(), flush=True)
    for name, value in figures.items():
        shown = value if isinstance(value, int | float) else orjson.dumps(value).decode()
        record_property(f"chaos_{name}", shown)
    assert sum(d.kills for d in daemons) >= plan.kills and all(d.kills for d in daemons)


def _sent_custom_ids(emulator: EmulatorThread) -> list[tuple[str, int]]:
    """(custom id, how it ended) of every request of every batch the emulator created.

    Reads the emulator's store on its own loop (EmulatorThread._call): the stats only count duplicates of
    one custom id, this also shows a request billed in two different attempts.
    """

    def collect(state: Any) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        for batch in state.store._batches.values():
            out += zip(batch.table.custom_ids, batch.table.kinds, strict=True)
        return out

    return emulator._call(collect)


# --- the tests ------------------------------------------------------------------------------------------
async def test_sigkilled_daemon_loses_nothing_answers_once_pays_once(
    aof_redis: RedisServer,
    faulty_emulator: EmulatorThread,
    seed: int,
    tmp_path: Path,
    chaos_long: bool,
    record_figure: Callable[[str, object], None],
) -> None:
    plan = LONG_SINGLE if chaos_long else CI_SINGLE
    await run_chaos(plan, seed, tmp_path, aof_redis, faulty_emulator, record_figure)


async def test_two_sigkilled_replicas_lose_nothing_answer_once_pay_once(
    aof_redis: RedisServer,
    faulty_emulator: EmulatorThread,
    seed: int,
    tmp_path: Path,
    chaos_long: bool,
    record_figure: Callable[[str, object], None],
) -> None:
    plan = LONG_TWO if chaos_long else CI_TWO
    await run_chaos(plan, seed, tmp_path, aof_redis, faulty_emulator, record_figure)
