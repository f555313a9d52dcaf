"""Prompt-cache-aware batching in the accumulator (on the private redis-server): requests sharing a prefix
are flushed together, whole runs in the order of their oldest request; priming sends one request of a new
prefix ahead and holds the rest until the prefix is warm or the wait runs out."""

from __future__ import annotations

import time
from collections.abc import Callable

from batchd.accumulator import Accumulator
from batchd.store import BatchHeaders, NewRequest, Store, Trigger, now_ms

BIG = 10**12


async def queue(store: Store, layout: list[str]) -> list[str]:
    """One request per item of ``layout`` (its prefix id, "" for none), in order; returns their ids."""
    rids = [f"r{i}" for i in range(len(layout))]
    body = b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"x"}]}'
    requests = [
        NewRequest(rid, body, prefix=pfx, prefix_ttl=300 if pfx else 0)
        for rid, pfx in zip(rids, layout, strict=True)
    ]
    assert await store.scripts.enqueue(requests, now_ms=now_ms(), max_requests=BIG, max_bytes=BIG)
    return rids


class Flushes:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.seen: list[tuple[Trigger, list[str]]] = []

    async def __call__(self, fid: str, trigger: Trigger, n: int, nbytes: int) -> None:
        self.seen.append((trigger, await self.store.flush_rids(fid)))


def accumulator(store: Store, flushes: Flushes, **options: object) -> Accumulator:
    values: dict[str, object] = {"max_requests": 8, "max_bytes": BIG, "max_age_s": 0.2, "on_flush": flushes}
    values.update(options)
    return Accumulator(store, consumer="c1", **values)  # type: ignore[arg-type]


async def run_until(acc: Accumulator, done: Callable[[], object], within: float = 10.0) -> None:
    """Step the accumulator (as its loop does) until ``done()``: each step blocks at most until its next
    deadline, so this waits on events, not on sleeps."""
    deadline = time.monotonic() + within
    while not done():
        assert time.monotonic() < deadline, "the accumulator did not get there in time"
        await acc.step()


async def test_a_flush_takes_whole_prefix_runs_in_order_of_their_oldest_request(store: Store) -> None:
    await store.intake.ensure_group()
    # a b c a b c a b c a b c, then two without a breakpoint.
    rids = await queue(store, ["A", "B", "C"] * 4 + ["", ""])
    flushes = Flushes(store)
    acc = accumulator(store, flushes)

    await run_until(acc, lambda: sum(len(r) for _, r in flushes.seen) == 14)

    by_prefix = {
        p: [rid for rid, q in zip(rids, ["A", "B", "C"] * 4 + ["", ""], strict=True) if q == p] for p in "ABC"
    }
    assert flushes.seen[0] == (Trigger.COUNT, by_prefix["A"] + by_prefix["B"])
    assert flushes.seen[1] == (Trigger.AGE, by_prefix["C"] + rids[12:])


async def test_without_grouping_a_flush_keeps_arrival_order(store: Store) -> None:
    await store.intake.ensure_group()
    rids = await queue(store, ["A", "B", "C"] * 4)
    flushes = Flushes(store)
    acc = accumulator(store, flushes, grouping=False)

    await run_until(acc, lambda: sum(len(r) for _, r in flushes.seen) == 12)

    assert flushes.seen == [(Trigger.COUNT, rids[:8]), (Trigger.AGE, rids[8:])]


async def test_priming_sends_one_request_per_new_prefix_first_and_the_rest_once_it_is_warm(
    store: Store,
) -> None:
    await store.intake.ensure_group()
    layout = ["A", "B"] * 4 + ["C"]  # C has too few requests to be worth priming
    rids = await queue(store, layout)
    flushes = Flushes(store)
    acc = accumulator(store, flushes, priming=True, prime_min_requests=3, prime_wait_s=60)

    await run_until(acc, lambda: len(flushes.seen) >= 2)

    assert flushes.seen[0] == (Trigger.PRIME, ["r0", "r1"])  # the oldest of A and of B, in one small batch
    assert flushes.seen[1] == (Trigger.AGE, ["r8"])
    assert await store.prefix_states(["A", "B"]) == {"A": "p", "B": "p"}
    # Held: past their age limit, and still not flushed.
    for _ in range(3):
        await acc.step()
    assert len(flushes.seen) == 2

    # A's primer is answered (deliver.lua marks it warm): A's other requests follow at once, B's wait on.
    await store.redis.set(store.keys.prefix_state("A"), "w", ex=300)
    await run_until(acc, lambda: len(flushes.seen) >= 3)
    assert flushes.seen[2] == (
        Trigger.AGE,
        [rid for rid, p in zip(rids, layout, strict=True) if p == "A"][1:],
    )
    await store.redis.set(store.keys.prefix_state("B"), "w", ex=300)
    await run_until(acc, lambda: len(flushes.seen) >= 4)
    assert flushes.seen[3] == (
        Trigger.AGE,
        [rid for rid, p in zip(rids, layout, strict=True) if p == "B"][1:],
    )


async def test_a_prefix_another_replica_primes_is_held_and_a_late_primer_stops_the_wait(store: Store) -> None:
    await store.intake.ensure_group()
    assert await store.start_priming("A", ms=60_000)
    rids = await queue(store, ["A"] * 4)
    flushes = Flushes(store)
    acc = accumulator(store, flushes, priming=True, prime_min_requests=2, prime_wait_s=0.5)
    started = time.monotonic()

    await run_until(acc, lambda: flushes.seen)

    # No primer of its own; sent as they are once the wait ran out.
    assert flushes.seen == [(Trigger.AGE, rids)]
    assert time.monotonic() - started >= 0.5


async def test_a_warm_prefix_is_not_primed(store: Store) -> None:
    await store.intake.ensure_group()
    await store.redis.set(store.keys.prefix_state("A"), "w", ex=300)
    rids = await queue(store, ["A"] * 4)
    flushes = Flushes(store)
    acc = accumulator(store, flushes, priming=True, prime_min_requests=2)
    await run_until(acc, lambda: flushes.seen)
    assert flushes.seen == [(Trigger.AGE, rids)]


async def test_a_primer_that_failed_is_replaced(store: Store) -> None:
    await store.intake.ensure_group()
    await queue(store, ["A"] * 4)
    flushes = Flushes(store)
    acc = accumulator(store, flushes, priming=True, prime_min_requests=2, prime_wait_s=60)
    await run_until(acc, lambda: flushes.seen)
    assert flushes.seen[0] == (Trigger.PRIME, ["r0"])

    # deliver.lua frees the prefix when its primer fails for good: the next oldest goes first.
    await store.redis.delete(store.keys.prefix_state("A"))
    await run_until(acc, lambda: len(flushes.seen) >= 2)
    assert flushes.seen[1] == (Trigger.PRIME, ["r1"])


async def test_a_prefix_shared_across_batch_headers_still_never_shares_a_batch(store: Store) -> None:
    await store.intake.ensure_group()
    body = b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"x"}]}'
    beta = BatchHeaders(betas=("output-300k-2026-03-24",))
    requests = [
        NewRequest(f"r{i}", body, beta if i % 2 else BatchHeaders(), prefix="A", prefix_ttl=300)
        for i in range(6)
    ]
    assert await store.scripts.enqueue(requests, now_ms=now_ms(), max_requests=BIG, max_bytes=BIG)
    flushes = Flushes(store)
    acc = accumulator(store, flushes)

    await run_until(acc, lambda: sum(len(r) for _, r in flushes.seen) == 6)

    assert sorted(rids for _, rids in flushes.seen) == [["r0", "r2", "r4"], ["r1", "r3", "r5"]]
