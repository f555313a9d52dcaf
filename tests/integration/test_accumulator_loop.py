"""The accumulator's loop on a real Redis: reading goes on while a flush is committed, and a stop commits
what was handed over before run() returns."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from batchd import AsyncClient
from batchd.accumulator import Accumulator
from batchd.settings import Settings
from batchd.store import RequestState, Store, Trigger
from tests.eventually import eventually


def params(i: int) -> dict[str, Any]:
    return {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": f"q{i}"}]}


async def test_reading_goes_on_while_a_flush_is_committed_and_a_stop_commits_what_was_handed_over(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    real_commit = store.scripts.commit_flush
    entered, release = asyncio.Event(), asyncio.Event()

    async def held_commit(
        fid: str, ids: Sequence[str], rids: Sequence[str], *, now_ms: int, group: str = ""
    ) -> tuple[int, int]:
        entered.set()
        await release.wait()
        return await real_commit(fid, ids, rids, now_ms=now_ms, group=group)

    store.scripts.commit_flush = held_commit  # type: ignore[method-assign]
    sealed: list[int] = []

    async def on_flush(fid: str, trigger: Trigger, n: int, nbytes: int) -> None:
        sealed.append(n)

    # Flushes by count only (an hour's age): 10 requests make one.
    acc = Accumulator(
        store, consumer="c1", max_requests=10, max_bytes=10_000_000, max_age_s=3600, on_flush=on_flush
    )
    stop = asyncio.Event()
    async with AsyncClient(settings=make_settings()) as client:
        first = await client.submit_many([params(i) for i in range(10)])
        task = asyncio.create_task(acc.run(stop))
        try:
            await asyncio.wait_for(entered.wait(), 10)
            # The first flush's commit is held. The next ten are still read (they stay pending for c1
            # until their own commit): the reader does not wait for the committer.
            second = await client.submit_many([params(i) for i in range(10, 20)])

            async def read_while_held() -> bool:
                return {c.name: c.pending for c in await store.intake.consumers()} == {"c1": 20}

            await eventually(read_while_held, timeout=10)
            assert not sealed  # the first commit is still held
            # A stop while the commit is held: run() returns only once both flushes are committed.
            stop.set()
            release.set()
            await asyncio.wait_for(task, 10)
        finally:
            release.set()
            stop.set()
            if not task.done():
                task.cancel()
    assert sealed == [10, 10]
    states = await store.request_states([*first, *second])
    assert set(states.values()) == {RequestState.FLUSHED}
    assert await store.intake.group_pending() == 0
