"""Every request ends, whatever happens to its batch outside batchd: canceled by someone else, deleted, or
forgotten by the API. (A waiter whose request vanished from Redis: test_client.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import anthropic

from batchd import AsyncClient
from batchd.settings import Settings
from batchd.store import Store
from tests.daemon_harness import running_daemon
from tests.eventually import eventually


def params(text: str) -> dict[str, Any]:
    return {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": text}]}


async def test_a_batch_canceled_outside_batchd_is_sent_again_not_answered_canceled(
    make_settings: Callable[..., Settings], emulator: Any, store: Store
) -> None:
    emulator.configure(processing_seconds=30.0, cancel_seconds=0.0)
    settings = make_settings(emulator=True, max_batch_age_seconds=0.2)
    async with running_daemon(settings), AsyncClient(settings=settings) as client:
        rids = await client.submit_many([params(f"canceled elsewhere {i}") for i in range(3)])

        async def batch_open() -> bool:
            return bool(await store.open_batch_ids())

        await eventually(batch_open, timeout=15)
        [batch_id] = await store.open_batch_ids()
        emulator.configure(processing_seconds=0.2)  # the retry's batch ends at once
        assert settings.anthropic_api_key is not None
        async with anthropic.AsyncAnthropic(
            api_key=settings.anthropic_api_key.get_secret_value(), base_url=settings.anthropic_base_url
        ) as someone_else:
            await someone_else.messages.batches.cancel(batch_id)
        results = await asyncio.gather(*(client.result(rid, timeout=30) for rid in rids))
    assert [r.type for r in results] == ["succeeded"] * 3
    records = [await store.request(rid) for rid in rids]
    assert [r.attempts for r in records if r] == [2, 2, 2]  # a fresh custom id each: nothing sent twice
    assert emulator.stats()["duplicate_custom_ids"] == 0
