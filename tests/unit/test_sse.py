"""sse.py: the stream built from a final Message accumulates, in the official SDK, to that very Message:
for text, tool_use, thinking (and signature), citations, redacted thinking and a block type the SDK does not
know. The SDK reads the bytes through an httpx2 transport (its own client, unchanged)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import anthropic
import httpx2
import orjson
import pytest

from batchd import sse

TEXT = "Hello, world! " * 40 + "é😀 end"
MESSAGES: dict[str, dict[str, Any]] = {
    "text": {"content": [{"type": "text", "text": TEXT}], "stop_reason": "end_turn"},
    "tool_use": {
        "content": [
            {"type": "text", "text": "Let me check."},
            {
                "type": "tool_use",
                "id": "toolu_01",
                "name": "get_weather",
                "input": {"city": "Paris", "days": [1, 2.5, {"nested": None}], "note": "x" * 300},
            },
        ],
        "stop_reason": "tool_use",
    },
    "thinking": {
        "content": [
            {"type": "thinking", "thinking": "Step by step. " * 30, "signature": "EqQBCkYIBxgCKkA=="},
            {"type": "redacted_thinking", "data": "opaque=="},
            {"type": "text", "text": "42"},
        ],
        "stop_reason": "end_turn",
    },
    "unknown_block": {
        "content": [
            {"type": "mcp_tool_use", "id": "mcptoolu_1", "name": "q", "server_name": "s", "input": {"a": 1}},
            {"type": "brand_new_block", "payload": {"deep": [1, {"x": "y"}]}},
            {"type": "text", "text": "done", "citations": [{"type": "char_location", "cited_text": "c"}]},
        ],
        "stop_reason": "end_turn",
        "container": {"id": "cntr_1", "expires_at": "2026-12-01T00:00:00Z"},
    },
}


def full(name: str) -> dict[str, Any]:
    return {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-haiku-4-5",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 25,
            "output_tokens": 77,
            "cache_creation_input_tokens": 3,
            "cache_read_input_tokens": 4,
            "service_tier": "batch",
            "server_tool_use": {"web_search_requests": 1},
        },
        **copy.deepcopy(MESSAGES[name]),
    }


def client_for(body: bytes) -> anthropic.Anthropic:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": sse.CONTENT_TYPE}, content=body)

    return anthropic.Anthropic(
        api_key="test", http_client=httpx2.Client(transport=httpx2.MockTransport(handler)), max_retries=0
    )


KWARGS: dict[str, Any] = {
    "model": "claude-haiku-4-5",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "q"}],
}


def as_dict(message: Any) -> dict[str, Any]:
    data: dict[str, Any] = message.to_dict(mode="json", warnings=False)  # unknown blocks make pydantic warn
    # The SDK's accumulator sets stop_details from message_delta (None when absent), as for the real API.
    if data.get("stop_details") is None:
        data.pop("stop_details", None)
    return data


@pytest.mark.parametrize("name", list(MESSAGES))
def test_messages_stream_accumulates_to_the_original(name: str) -> None:
    message = full(name)
    with client_for(sse.render(message)).messages.stream(**KWARGS) as stream:
        final = stream.get_final_message()
    assert as_dict(final) == message


@pytest.mark.parametrize("name", list(MESSAGES))
def test_beta_stream_accumulates_to_the_original(name: str) -> None:
    message = full(name)
    with client_for(sse.render(message)).beta.messages.stream(betas=["x-1"], **KWARGS) as stream:
        final = stream.get_final_message()
    assert as_dict(final) == message


def test_create_stream_true_yields_the_api_event_sequence() -> None:
    message = full("tool_use")
    events = list(client_for(sse.render(message)).messages.create(stream=True, **KWARGS))
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    start = events[0].message  # type: ignore[union-attr]
    assert (start.content, start.stop_reason, start.usage.input_tokens, start.usage.output_tokens) == (
        [],
        None,
        25,
        1,
    )
    tool_start = [e for e in events if e.type == "content_block_start"][1]
    assert tool_start.content_block.input == {}  # type: ignore[union-attr]
    partial = "".join(
        e.delta.partial_json  # type: ignore[union-attr]
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    )
    assert orjson.loads(partial) == message["content"][1]["input"]
    text_deltas = [e for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta"]
    assert len(text_deltas) == 1  # "Let me check." fits one chunk
    assert events[-2].usage.output_tokens == 77  # type: ignore[union-attr]


def test_text_is_chunked_and_pings_and_errors_are_skipped_or_raised() -> None:
    message = full("text")
    body = sse.PING + sse.render(message)
    assert body.count(b"text_delta") == -(-len(TEXT) // sse.TEXT_CHUNK_CHARS)
    with client_for(body).messages.stream(**KWARGS) as stream:
        assert stream.get_final_message().content[0].text == TEXT  # type: ignore[union-attr]
    envelope: Mapping[str, Any] = {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
        "request_id": "r1",
    }
    with (
        pytest.raises(anthropic.APIStatusError, match="Overloaded"),
        client_for(sse.PING + sse.error_event(envelope)).messages.stream(**KWARGS) as stream,
    ):
        stream.get_final_message()


def test_every_event_is_one_data_line() -> None:
    body = sse.render(full("unknown_block") | {"content": [{"type": "text", "text": "a\nb\r\nc"}]})
    for chunk in body.split(b"\n\n")[:-1]:
        lines = chunk.split(b"\n")
        assert len(lines) == 2 and lines[0].startswith(b"event: ") and lines[1].startswith(b"data: ")
