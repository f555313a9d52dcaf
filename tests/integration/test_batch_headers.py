"""Betas, API versions and workspaces are a batch's headers: requests that differ in them never share a batch,
and each batch is created with its requests' headers. batchd's own client takes them the SDK's way."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import anthropic
import pytest
from anthropic.types.beta import BetaMessage

from batchd import AsyncClient, InvalidParams
from batchd.settings import Settings
from batchd.store import Store
from tests.daemon_harness import running_daemon

OUTPUT_300K = "output-300k-2026-03-24"


def params(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-6",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def batches(emulator: Any) -> list[dict[str, Any]]:
    with anthropic.Anthropic(base_url=emulator.base_url, api_key="test-key") as api:
        return [emulator.batch_info(b.id) for b in api.messages.batches.list(limit=100)]


async def test_requests_with_different_headers_never_share_a_batch(
    make_settings: Callable[..., Settings], emulator: Any, store: Store
) -> None:
    settings = make_settings(emulator=True, max_batch_age_seconds=0.3)
    async with running_daemon(settings), AsyncClient(settings=settings) as client:
        plain = await client.submit_many([params(f"plain {i}") for i in range(4)])
        beta = await client.submit_many([params(f"beta {i}") for i in range(3)], betas=[OUTPUT_300K])
        both = await client.submit_many(
            [params(f"both {i}") for i in range(2)], betas=["b-two", OUTPUT_300K, "b-two"]
        )
        old = await client.submit_many([params(f"old {i}") for i in range(2)], anthropic_version="2023-06-01")
        results = await asyncio.gather(*(client.result(r, timeout=30) for r in [*plain, *beta, *both, *old]))
    assert [r.type for r in results] == ["succeeded"] * 11
    seen = sorted((tuple(i["betas"]), i["anthropic_version"], i["requests"]) for i in batches(emulator))
    old_version = [(betas, n) for betas, version, n in seen if version == "2023-06-01"]
    assert old_version == [((), 2)], seen
    assert sorted((betas, n) for betas, version, n in seen if version != "2023-06-01") == [
        ((), 4),
        (("b-two", OUTPUT_300K), 2),
        ((OUTPUT_300K,), 3),
    ], seen


async def test_a_request_that_needs_a_beta_is_refused_without_it_and_served_with_it(
    make_settings: Callable[..., Settings], emulator: Any
) -> None:
    """max_tokens above the model's cap needs the output-300k beta, in batches only: refused at submit without
    it (as the API would refuse it, a batch later), answered with it."""
    settings = make_settings(emulator=True, max_batch_age_seconds=0.2)
    huge = params("long answer", max_tokens=200_000)
    async with running_daemon(settings), AsyncClient(settings=settings) as client:
        with pytest.raises(InvalidParams, match="max_tokens"):
            await client.submit(huge)
        message = await client.beta.messages.create(betas=[OUTPUT_300K], **huge, timeout=30)
    assert isinstance(message, BetaMessage)
    assert message.content[0].text == "echo: long answer"  # type: ignore[union-attr]
    assert emulator.stats()["requests_received"] == 1


async def test_the_clients_create_takes_the_sdks_arguments(
    make_settings: Callable[..., Settings], emulator: Any
) -> None:
    """What a new user passes, the SDK's way: a previous response's content blocks (pydantic models) in a tool
    loop, extra_headers=None, timeout=NOT_GIVEN, workspace_id; none of it becomes a body field."""
    settings = make_settings(emulator=True, max_batch_age_seconds=0.2)
    tools = [{"name": "lookup", "description": "look it up", "input_schema": {"type": "object"}}]
    async with running_daemon(settings), AsyncClient(settings=settings) as client:
        first = await client.messages.create(
            model="claude-sonnet-4-6",
            max_tokens=64,
            tools=tools,
            messages=[{"role": "user", "content": 'find it [[tool:lookup {"q": "x"}]]'}],
            extra_headers=None,
            timeout=anthropic.NOT_GIVEN,
        )
        assert first.stop_reason == "tool_use"
        [call] = [b for b in first.content if b.type == "tool_use"]
        second = await client.messages.create(
            model="claude-sonnet-4-6",
            max_tokens=64,
            tools=tools,
            messages=[
                {"role": "user", "content": 'find it [[tool:lookup {"q": "x"}]]'},
                {"role": "assistant", "content": first.content},  # the SDK's own block models
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "42"}],
                },
            ],
            workspace_id="wrkspc_test",
            timeout=30,
        )
    assert "42" in second.content[0].text  # type: ignore[union-attr]
    assert sorted(info["workspace_id"] or "" for info in batches(emulator)) == ["", "wrkspc_test"]
