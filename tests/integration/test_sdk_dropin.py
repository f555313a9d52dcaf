"""batchd.AsyncAnthropic / batchd.Anthropic: the official SDK, unchanged, answered by a Backend in-process.

The backend sends each request as a one-request batch to the emulator (or answers with canned tool-use
messages), so the SDK reads real results lines: sync, async, messages.stream, beta.messages.create with betas,
with_raw_response, an errored result as BadRequestError, a tool loop passing response.content back, retries
that reattach instead of paying twice, and requests batchd does not answer going to the API unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx2
import orjson
import pytest
from anthropic.types import Message
from anthropic.types.beta import BetaMessage

import batchd
from batchd.emulator import EmulatorThread
from batchd.membackend import MemoryBackend, batch_responder, message_responder, result_line
from batchd.translate import ApiRequest
from tests.front_helpers import (
    WEATHER_TOOL,
    Gate,
    emulator_backend,
    eventually,
    gated,
    kwargs,
    tool_backend,
)


@pytest.fixture
async def backend(emulator: EmulatorThread) -> AsyncIterator[MemoryBackend]:
    backend = emulator_backend(emulator.base_url)
    try:
        yield backend
    finally:
        await backend.aclose()


@pytest.fixture
async def client(backend: MemoryBackend) -> AsyncIterator[batchd.AsyncAnthropic]:
    async with batchd.AsyncAnthropic(backend=backend) as client:
        yield client


async def test_async_create_is_answered_by_a_batch(
    client: batchd.AsyncAnthropic, backend: MemoryBackend
) -> None:
    message = await client.messages.create(**kwargs("hello there"))
    assert isinstance(message, Message)
    assert message.content[0].text == "echo: hello there"  # type: ignore[union-attr]
    assert message.usage.service_tier == "batch"
    [(rid, request)] = backend.requests.items()
    assert message._request_id == rid
    assert rid.startswith("stainless-")  # the SDK's idempotency key is the request id
    assert request.params == kwargs("hello there")


def test_sync_client_drives_the_async_backend(emulator: EmulatorThread) -> None:
    backend = emulator_backend(emulator.base_url)
    with batchd.Anthropic(backend=backend) as client:
        first = client.messages.create(**kwargs("one"))
        second = client.with_options(max_retries=1).messages.create(**kwargs("two"))
        with client.messages.stream(**kwargs("three")) as stream:
            streamed = stream.get_final_message()
        client.run(backend.aclose())
    assert [first.content[0].text, second.content[0].text] == ["echo: one", "echo: two"]  # type: ignore[union-attr]
    assert streamed.content[0].text == "echo: three"  # type: ignore[union-attr]
    assert len(backend.requests) == 3


async def test_stream_matches_the_non_streamed_answer(
    client: batchd.AsyncAnthropic, backend: MemoryBackend
) -> None:
    async with client.messages.stream(**kwargs("stream me")) as stream:
        texts = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
        rid = stream.request_id
    assert "".join(texts) == "echo: stream me"
    request = next(iter(backend.requests.values()))
    assert request.stream is True and "stream" not in request.params
    events = [e.type async for e in await client.messages.create(stream=True, **kwargs("raw events"))]
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert rid is not None and rid == stream.response.headers["batchd-request-id"]
    stored = orjson.loads(await backend.peek(rid) or b"")["result"]["message"]
    assert final.to_dict(mode="json") == {**stored, "stop_details": None}


async def test_beta_create_returns_beta_message_with_betas_and_headers(
    client: batchd.AsyncAnthropic, backend: MemoryBackend
) -> None:
    raw = await client.beta.messages.with_raw_response.create(
        betas=["output-300k-2026-03-24", "context-1m-2025-08-07"],
        extra_headers={"anthropic-workspace-id": "wrkspc_1", "batchd-tags": "team=search"},
        **kwargs("beta"),
    )
    message = await raw.parse()
    assert isinstance(message, BetaMessage)
    assert message.content[0].text == "echo: beta"  # type: ignore[union-attr]
    rid = raw.headers["batchd-request-id"]
    request = backend.requests[rid]
    assert request.betas == ("output-300k-2026-03-24", "context-1m-2025-08-07")
    assert request.headers == (("anthropic-workspace-id", "wrkspc_1"),)
    assert request.tags == (("team", "search"),)
    assert request.anthropic_version == anthropic._constants.ANTHROPIC_API_VERSION  # type: ignore[attr-defined]
    assert raw.headers["x-should-retry"] == "false"


async def test_errored_result_raises_the_sdks_error_once(
    client: batchd.AsyncAnthropic, backend: MemoryBackend
) -> None:
    bad = {"model": "claude-haiku-4-5", "max_tokens": 8, "messages": [{"role": "robot", "content": "x"}]}
    with pytest.raises(anthropic.BadRequestError) as info:
        await client.messages.create(**bad)
    assert info.value.status_code == 400
    assert "messages.0.role" in info.value.message
    assert (backend.submit_calls, len(backend.requests)) == (1, 1)  # x-should-retry: false, no retries


async def test_bad_params_are_refused_before_anything_is_queued(backend: MemoryBackend) -> None:
    def no_speed(params: Any, betas: tuple[str, ...]) -> None:
        if "speed" in params:
            raise ValueError("speed: fast mode is not available in batches")

    async with batchd.AsyncAnthropic(backend=backend, validate=no_speed) as client:
        with pytest.raises(anthropic.BadRequestError, match="fast mode"):
            await client.messages.create(**kwargs(), extra_body={"speed": "fast"})
        with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
            await client.messages.create(model="m", max_tokens=0, messages=[{"role": "user", "content": "x"}])
    assert backend.submit_calls == 0


async def test_tool_loop_passes_response_content_back() -> None:
    backend = tool_backend()
    async with batchd.AsyncAnthropic(backend=backend) as client:
        messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
        first = await client.messages.create(**kwargs(tools=[WEATHER_TOOL]) | {"messages": messages})
        assert first.stop_reason == "tool_use"
        tool_use = first.content[1]
        assert tool_use.type == "tool_use" and tool_use.input == {"city": "Paris"}
        messages += [
            {"role": "assistant", "content": first.content},  # the SDK's own block objects
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "sunny"}],
            },
        ]
        second = await client.messages.create(**kwargs(tools=[WEATHER_TOOL]) | {"messages": messages})
    assert second.content[0].text == "Done: sunny"  # type: ignore[union-attr]
    sent = list(backend.requests.values())[1].params["messages"][1]["content"]
    assert sent == [
        {"type": "text", "text": "Let me look that up."},
        {"type": "tool_use", "id": "toolu_0", "name": "get_weather", "input": {"city": "Paris"}},
    ]


async def test_a_timed_out_attempt_retries_and_reattaches(emulator: EmulatorThread) -> None:
    gate = Gate()
    inner = batch_responder(anthropic.AsyncAnthropic(base_url=emulator.base_url, api_key="k", max_retries=0))
    backend = MemoryBackend(gated(gate, inner))
    async with batchd.AsyncAnthropic(backend=backend, wait_timeout=0.1, max_retries=5) as client:
        call = asyncio.create_task(client.messages.create(**kwargs("slow")))
        await eventually(lambda: backend.submit_calls >= 2)  # the SDK timed out once and retried
        gate.open()
        message = await asyncio.wait_for(call, 30)
    assert message.content[0].text == "echo: slow"  # type: ignore[union-attr]
    assert len(backend.requests) == 1 < backend.submit_calls  # one request, however many attempts


async def test_wait_timeout_gives_up_with_the_sdks_timeout_error() -> None:
    gate = Gate()
    backend = MemoryBackend(gated(gate, message_responder(lambda r: {})))
    async with batchd.AsyncAnthropic(backend=backend, wait_timeout=0.05, max_retries=0) as client:
        with pytest.raises(anthropic.APITimeoutError):
            await client.messages.create(**kwargs())
    gate.open()
    assert len(backend.requests) == 1


async def test_unknown_blocks_reach_the_caller() -> None:
    block = {"type": "brand_new_block", "payload": {"x": [1, 2]}}

    def make(request: ApiRequest) -> dict[str, Any]:
        return {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "m",
            "content": [block, {"type": "text", "text": "ok"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 1, "output_tokens": 1},
        }

    async with batchd.AsyncAnthropic(backend=MemoryBackend(message_responder(make))) as client:
        message = await client.messages.create(**kwargs())
        async with client.messages.stream(**kwargs()) as stream:
            streamed = await stream.get_final_message()
    for got in (message, streamed):
        assert got.content[0].to_dict(warnings=False) == block


async def test_other_results_map_to_api_statuses() -> None:
    results = iter([{"type": "canceled"}, {"type": "expired"}])

    async def respond(rid: str, request: ApiRequest) -> bytes:
        return result_line(rid, next(results))

    async with batchd.AsyncAnthropic(backend=MemoryBackend(respond)) as client:
        with pytest.raises(anthropic.APIStatusError) as canceled:
            await client.messages.create(**kwargs())
        with pytest.raises(anthropic.OverloadedError):
            await client.messages.create(**kwargs())
    assert canceled.value.status_code == 410


def passthrough_client(seen: list[httpx2.Request]) -> httpx2.Client:
    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(200, json={"data": [], "has_more": False, "first_id": None, "last_id": None})

    return httpx2.Client(transport=httpx2.MockTransport(handler))


def test_requests_batchd_does_not_answer_go_upstream_unchanged() -> None:
    seen: list[httpx2.Request] = []
    backend = tool_backend()
    with batchd.Anthropic(backend=backend, api_key="sk-user", http_client=passthrough_client(seen)) as client:
        assert client.models.list().data == []
        client.messages.batches.cancel("msgbatch_1")
        copy = client.with_options(timeout=30)
        assert copy.messages.create(**kwargs()).content[0].text == "Done: no tools"  # type: ignore[union-attr]
    assert [(r.method, r.url.path) for r in seen] == [
        ("GET", "/v1/models"),
        ("POST", "/v1/messages/batches/msgbatch_1/cancel"),
    ]
    assert seen[0].headers["authorization"] == "Bearer sk-user"
    assert "idempotency-key" not in seen[1].headers  # batchd's key never reaches the API
    assert len(backend.requests) == 1


def test_no_api_key_is_needed_for_batchds_requests() -> None:
    with batchd.Anthropic(backend=tool_backend()) as client:
        assert client.messages.create(**kwargs()).stop_reason == "end_turn"
    with pytest.raises(TypeError, match="backend="):
        batchd.Anthropic()
