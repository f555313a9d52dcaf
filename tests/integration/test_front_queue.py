"""The ways in over batchd's real queue: the front and the drop-in client on ClientBackend (AsyncClient on a
private redis-server), a daemon replica in-process and the emulator: answers, one request per
Idempotency-Key, collect later, and betas carried as the batch's header."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
from pydantic import SecretStr

import batchd
from batchd import AsyncClient
from batchd.backend import ClientBackend
from batchd.front import FrontConfig, serve_front
from batchd.settings import Settings
from tests.daemon_harness import running_daemon
from tests.front_helpers import kwargs

TOKEN = "tok-queue-test-0123456789"


def emulator_batches(emulator: Any) -> list[dict[str, Any]]:
    """What each batch on the emulator was created with (its betas, version, request count)."""
    with anthropic.Anthropic(base_url=emulator.base_url, api_key="test-key") as api:
        return [emulator.batch_info(b.id) for b in api.messages.batches.list(limit=100)]


async def test_front_and_dropin_over_the_queue(make_settings: Callable[..., Settings], emulator: Any) -> None:
    settings = make_settings(emulator=True, max_batch_age_seconds=0.3)
    async with running_daemon(settings), AsyncClient(settings=settings) as queue:
        backend = ClientBackend(queue)
        site = await serve_front(backend, FrontConfig(tokens=(SecretStr(TOKEN),)), "127.0.0.1", 0)
        try:
            async with anthropic.AsyncAnthropic(base_url=site.url, api_key=TOKEN) as client:
                message = await client.messages.create(**kwargs("via the front"))
                key = {"Idempotency-Key": "front-queue-1"}
                first = await client.messages.with_raw_response.create(**kwargs("once"), extra_headers=key)
                again = await client.messages.create(**kwargs("once"), extra_headers=key)
                async with client.messages.stream(**kwargs("streamed")) as stream:
                    streamed = await stream.get_final_message()
                beta = await client.beta.messages.with_raw_response.create(
                    betas=["output-300k-2026-03-24"], **kwargs("with a beta")
                )
                accepted = await client.messages.with_raw_response.create(
                    **kwargs("later"), extra_headers={"Prefer": "respond-async"}
                )
                rid = accepted.headers["batchd-request-id"]
                collected = await client.get(
                    f"/v1/batchd/requests/{rid}?wait=30", cast_to=anthropic.types.Message
                )
            async with batchd.AsyncAnthropic(backend=backend) as dropin:
                direct = await dropin.messages.create(**kwargs("in-process"))
        finally:
            await site.close()
    assert message.content[0].text == "echo: via the front"  # type: ignore[union-attr]
    assert first.headers["batchd-request-id"] == "front-queue-1"
    assert (await first.parse()).content == again.content
    assert streamed.content[0].text == "echo: streamed"  # type: ignore[union-attr]
    assert accepted.status_code == 202
    assert collected.content[0].text == "echo: later"  # type: ignore[union-attr]
    assert direct.content[0].text == "echo: in-process"  # type: ignore[union-attr]
    stats = emulator.stats()
    assert stats["requests_received"] == 6  # the Idempotency-Key retry was not sent again
    # The beta travelled as its batch's header, and only that batch's.
    assert (await beta.parse()).content[0].text == "echo: with a beta"  # type: ignore[union-attr]
    betas = sorted(info["betas"] for info in emulator_batches(emulator))
    assert betas[-1] == ["output-300k-2026-03-24"] and all(b == [] for b in betas[:-1]), betas
    assert stats["duplicate_custom_ids"] == 0
