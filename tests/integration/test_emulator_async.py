"""Conformance: the official async SDK (AsyncAnthropic) against the emulator over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import anthropic
import httpx2
import pytest

from batchd.emulator import EmulatorConfig, EmulatorThread
from batchd.emulator.testing import async_wait_for_batch
from tests.emulator_helpers import req


@pytest.fixture
def emu() -> Iterator[EmulatorThread]:
    with EmulatorThread(EmulatorConfig(processing_seconds=0.05, cancel_seconds=0.02)) as emulator:
        yield emulator


@pytest.fixture
async def client(emu: EmulatorThread) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=emu.base_url, api_key="test-key", max_retries=0) as sdk:
        yield sdk


async def test_full_lifecycle(client: anthropic.AsyncAnthropic) -> None:
    batch = await client.messages.batches.create(requests=[req("a", "alpha"), req("b", "beta")])
    assert batch.processing_status == "in_progress"
    assert (await client.messages.batches.retrieve(batch.id)).id == batch.id

    ended = await async_wait_for_batch(client, batch.id)
    assert ended.request_counts.succeeded == 2

    texts = {}
    async for line in await client.messages.batches.results(batch.id):
        assert line.result.type == "succeeded"
        texts[line.custom_id] = line.result.message.content[0].text
        assert line.result.message.usage.service_tier == "batch"
    assert texts == {"a": "echo: alpha", "b": "echo: beta"}

    deleted = await client.messages.batches.delete(batch.id)
    assert deleted.type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError) as info:
        await client.messages.batches.retrieve(batch.id)
    assert info.value.request_id is not None


async def test_list_auto_pagination(client: anthropic.AsyncAnthropic) -> None:
    ids = []
    for i in range(5):
        ids.append((await client.messages.batches.create(requests=[req(f"x{i}")])).id)
    seen = [b.id async for b in client.messages.batches.list(limit=2)]
    assert seen == ids[::-1]
    page = await client.messages.batches.list(limit=2, after_id=ids[-1])
    assert [b.id for b in page.data] == [ids[3], ids[2]] and page.has_more


async def test_cancel(emu: EmulatorThread, client: anthropic.AsyncAnthropic) -> None:
    emu.configure(processing_seconds=60)
    batch = await client.messages.batches.create(requests=[req("a"), req("b")])
    canceling = await client.messages.batches.cancel(batch.id)
    assert canceling.processing_status == "canceling"
    ended = await async_wait_for_batch(client, batch.id)
    assert ended.request_counts.canceled == 2
    kinds = [line.result.type async for line in await client.messages.batches.results(batch.id)]
    assert kinds == ["canceled", "canceled"]


async def test_messages_create(client: anthropic.AsyncAnthropic) -> None:
    message = await client.messages.create(
        model="m", max_tokens=4, messages=[{"role": "user", "content": "yo"}]
    )
    assert message.content[0].type == "text" and message.content[0].text == "echo: yo"
    assert message.usage.service_tier == "standard"


async def test_rate_limit_error(emu: EmulatorThread, client: anthropic.AsyncAnthropic) -> None:
    emu.configure(rate_limit_rate=1.0)
    with pytest.raises(anthropic.RateLimitError) as info:
        await client.messages.batches.list()
    assert info.value.request_id is not None


async def test_errored_and_expired_results(emu: EmulatorThread, client: anthropic.AsyncAnthropic) -> None:
    emu.configure(errored_rate=1.0)
    errored = await client.messages.batches.create(requests=[req("e1"), req("e2")])
    emu.configure(errored_rate=0.0, expired_rate=1.0)
    expired = await client.messages.batches.create(requests=[req("x1")])
    await async_wait_for_batch(client, errored.id)
    await async_wait_for_batch(client, expired.id)
    async for line in await client.messages.batches.results(errored.id):
        assert line.result.type == "errored"
        assert line.result.error.error.type in ("api_error", "overloaded_error")
    assert [line.result.type async for line in await client.messages.batches.results(expired.id)] == [
        "expired"
    ]


async def test_results_cut_raises_during_async_iteration(
    emu: EmulatorThread, client: anthropic.AsyncAnthropic
) -> None:
    batch = await client.messages.batches.create(requests=[req(f"r{i}", "y" * 300) for i in range(300)])
    await async_wait_for_batch(client, batch.id)
    emu.configure(results_cut_rate=1.0)
    decoder = await client.messages.batches.results(batch.id)
    received = 0
    with pytest.raises(httpx2.TransportError):
        async for _line in decoder:
            received += 1
    await decoder.close()
    assert received < 300
