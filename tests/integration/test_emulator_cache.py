"""The emulator's prompt-caching model, through the SDK on a settable clock: reads and writes per API key,
visibility between requests processed at nearly the same time, TTLs, and real-time writes batches never
read. The workload test shows what batchd's cache-aware batching is for: primed > grouped > interleaved."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
from anthropic.types import Usage

from batchd.emulator import EmulatorConfig, EmulatorThread
from tests.emulator_helpers import Clock, req

# Four shared prefixes, each a system prompt of about 200 estimated tokens (800 characters).
PREFIXES = [f"You are assistant number {p}. " + "Follow the house style. " * 32 for p in range(4)]
MIN_TOKENS = 100
PROCESSING = 8.0  # seconds per batch on the fake clock: one request per second in a batch of 8
VISIBILITY = 2.0


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def emu(clock: Clock) -> Iterator[EmulatorThread]:
    config = EmulatorConfig(
        processing_seconds=PROCESSING, cache_visibility_seconds=VISIBILITY, cache_min_tokens=MIN_TOKENS
    )
    with EmulatorThread(config, clock=clock) as emulator:
        yield emulator


def sdk(emu: EmulatorThread, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=emu.base_url, api_key=key, max_retries=0)


def cached(custom_id: str, prefix: int, question: str = "q", ttl: str | None = None) -> dict[str, Any]:
    control: dict[str, str] = {"type": "ephemeral"}
    if ttl is not None:
        control["ttl"] = ttl
    system = [{"type": "text", "text": PREFIXES[prefix], "cache_control": control}]
    return req(custom_id, f"{question} {custom_id}", system=system)


def usages(client: anthropic.Anthropic, batch_ids: list[str]) -> list[Usage]:
    out = []
    for batch_id in batch_ids:
        for line in client.messages.batches.results(batch_id):
            assert line.result.type == "succeeded"
            out.append(line.result.message.usage)
    return out


def prefix_tokens(prefix: int) -> int:
    return -(-len(PREFIXES[prefix]) // 4)


# --- one request at a time ------------------------------------------------------------------------------


def test_a_write_then_a_read_with_the_usage_split_like_the_api(emu: EmulatorThread, clock: Clock) -> None:
    with sdk(emu, "k") as client:
        first = client.messages.batches.create(requests=[cached("a", 0)])
        clock.advance(PROCESSING)
        second = client.messages.batches.create(requests=[cached("b", 0, ttl="1h")])
        clock.advance(PROCESSING)
        [write] = usages(client, [first.id])
        [read] = usages(client, [second.id])

    tokens = prefix_tokens(0)
    assert write.cache_creation_input_tokens == tokens and write.cache_read_input_tokens == 0
    assert write.cache_creation is not None
    assert write.cache_creation.ephemeral_5m_input_tokens == tokens
    assert write.cache_creation.ephemeral_1h_input_tokens == 0
    assert read.cache_read_input_tokens == tokens and read.cache_creation_input_tokens == 0
    # Whatever comes after the breakpoint is still input: prefix + rest is the whole prompt's estimate.
    whole = -(-(len(PREFIXES[0]) + len("q a")) // 4)
    assert write.input_tokens + tokens == whole
    assert emu.stats()["prompt_cache_writes"] == 1 and emu.stats()["prompt_cache_reads"] == 1


def test_requests_processed_close_together_in_one_batch_miss_each_other(
    emu: EmulatorThread, clock: Clock
) -> None:
    with sdk(emu, "k") as client:
        # Four requests over 8 s: 2 s apart, exactly the visibility delay.
        batch = client.messages.batches.create(requests=[cached(f"r{i}", 0) for i in range(4)])
        clock.advance(PROCESSING)
        found = usages(client, [batch.id])
    # r0 writes at 2 s, readable at 4 s: r1 (4 s) and the rest read.
    assert sorted(bool(u.cache_read_input_tokens) for u in found) == [False, True, True, True]
    emu.configure(cache_visibility_seconds=3.0)
    with sdk(emu, "k2") as client:
        batch = client.messages.batches.create(requests=[cached(f"s{i}", 0) for i in range(4)])
        clock.advance(PROCESSING)
        found = usages(client, [batch.id])
    # r0 writes at 2 s (readable at 5 s): r1 at 4 s misses and writes too; r2 (6 s) and r3 (8 s) read.
    assert sorted(bool(u.cache_read_input_tokens) for u in found) == [False, False, True, True]


def test_caches_are_per_api_key_and_expire_after_their_ttl(emu: EmulatorThread, clock: Clock) -> None:
    with sdk(emu, "alice") as alice, sdk(emu, "bob") as bob:
        a = alice.messages.batches.create(requests=[cached("a", 1), cached("h", 2, ttl="1h")])
        clock.advance(PROCESSING)
        b = bob.messages.batches.create(requests=[cached("b", 1)])
        clock.advance(PROCESSING)
        [bob_usage] = usages(bob, [b.id])
        assert bob_usage.cache_read_input_tokens == 0  # alice's write is not bob's

        clock.advance(301)  # past 5 minutes, inside 1 hour
        later = alice.messages.batches.create(requests=[cached("c", 1), cached("i", 2)])
        clock.advance(PROCESSING)
        by_id = {
            line.custom_id: line.result.message.usage for line in alice.messages.batches.results(later.id)
        }
        assert by_id["c"].cache_read_input_tokens == 0 and by_id["c"].cache_creation_input_tokens > 0
        assert by_id["i"].cache_read_input_tokens == prefix_tokens(2)
        assert usages(alice, [a.id])[0].cache_creation is not None


def test_real_time_writes_are_not_read_by_batches(emu: EmulatorThread, clock: Clock) -> None:
    params = cached("rt", 3)["params"]
    with sdk(emu, "k") as client:
        first = client.messages.create(**params)
        assert first.usage.cache_creation_input_tokens == prefix_tokens(3)
        clock.advance(10)
        batch = client.messages.batches.create(requests=[cached("b", 3)])
        clock.advance(PROCESSING)
        [in_batch] = usages(client, [batch.id])
        assert in_batch.cache_read_input_tokens == 0 and in_batch.cache_creation_input_tokens > 0
        # Real-time calls read what either wrote.
        again = client.messages.create(**params)
        assert again.usage.cache_read_input_tokens == prefix_tokens(3)


def test_prefixes_shorter_than_the_minimum_are_not_cached(emu: EmulatorThread, clock: Clock) -> None:
    short = [{"type": "text", "text": "tiny", "cache_control": {"type": "ephemeral"}}]
    with sdk(emu, "k") as client:
        batch = client.messages.batches.create(
            requests=[req("a", "x", system=short), req("b", "x", system=short)]
        )
        clock.advance(PROCESSING)
        for usage in usages(client, [batch.id]):
            assert usage.cache_creation_input_tokens == 0 and usage.cache_read_input_tokens == 0
            assert usage.input_tokens == -(-len("tinyx") // 4)


def test_top_level_cache_control_caches_the_whole_prompt_and_tools_come_first(
    emu: EmulatorThread, clock: Clock
) -> None:
    tool = {"name": "t", "description": "d" * 600, "input_schema": {"type": "object"}}
    with sdk(emu, "k") as client:
        batch = client.messages.batches.create(
            requests=[req("a", "same", tools=[tool], cache_control={"type": "ephemeral"})]
        )
        clock.advance(PROCESSING)
        again = client.messages.batches.create(
            requests=[
                req("b", "same", tools=[tool], cache_control={"type": "ephemeral"}),
                req("c", "other", tools=[tool], cache_control={"type": "ephemeral"}),
            ]
        )
        clock.advance(PROCESSING)
        [first] = usages(client, [batch.id])
        assert first.cache_creation_input_tokens > 0 and first.input_tokens == 0
        by_id = {
            line.custom_id: line.result.message.usage for line in client.messages.batches.results(again.id)
        }
    assert by_id["b"].cache_read_input_tokens == first.cache_creation_input_tokens
    assert by_id["c"].cache_read_input_tokens == 0  # a different last message: a different prefix


# --- the workload batchd's cache-aware batching is measured on ------------------------------------------


def hit_rate_and_cost(found: list[Usage]) -> tuple[float, float]:
    """Cache hit rate over the cacheable tokens, and the prompt's cost in base-input-token units."""
    read = sum(u.cache_read_input_tokens or 0 for u in found)
    write_5m = sum(u.cache_creation.ephemeral_5m_input_tokens for u in found if u.cache_creation)
    write_1h = sum(u.cache_creation.ephemeral_1h_input_tokens for u in found if u.cache_creation)
    plain = sum(u.input_tokens for u in found)
    return read / (read + write_5m + write_1h), plain + 1.25 * write_5m + 2.0 * write_1h + 0.1 * read


def test_primed_beats_grouped_beats_interleaved(emu: EmulatorThread, clock: Clock) -> None:
    """32 requests over 4 prefixes (8 each), sent as four batches of 8 created at the same moment."""
    with sdk(emu, "interleaved") as client:
        # Arrival order p0 p1 p2 p3 p0 ...: every batch holds every prefix twice, 4 s apart.
        ids = [
            client.messages.batches.create(requests=[cached(f"b{b}r{i}", i % 4) for i in range(8)]).id
            for b in range(4)
        ]
        clock.advance(PROCESSING)
        interleaved = usages(client, ids)

    with sdk(emu, "grouped") as client:
        # One prefix per batch, its requests next to each other.
        ids = [
            client.messages.batches.create(requests=[cached(f"p{p}r{i}", p) for i in range(8)]).id
            for p in range(4)
        ]
        clock.advance(PROCESSING)
        grouped = usages(client, ids)

    with sdk(emu, "primed") as client:
        # One request per prefix first; the other 28 once that small batch has ended.
        primer = client.messages.batches.create(requests=[cached(f"p{p}r0", p) for p in range(4)]).id
        clock.advance(PROCESSING)
        ids = [
            client.messages.batches.create(requests=[cached(f"p{p}r{i}", p) for i in range(1, 8)]).id
            for p in range(4)
        ]
        clock.advance(PROCESSING)
        primed = usages(client, [primer, *ids])

    assert len(interleaved) == len(grouped) == len(primed) == 32
    rates = {name: hit_rate_and_cost(u) for name, u in [("i", interleaved), ("g", grouped), ("p", primed)]}
    # Interleaved: 4 concurrent first writes per prefix, then reads (4 of 8). Grouped: the request 1 s
    # after the first still misses (visibility 2 s), the rest read (6 of 8). Primed: only the primer
    # writes (7 of 8).
    assert rates["i"][0] == pytest.approx(4 / 8)
    assert rates["g"][0] == pytest.approx(6 / 8)
    assert rates["p"][0] == pytest.approx(7 / 8)
    assert rates["p"][1] < rates["g"][1] < rates["i"][1]
