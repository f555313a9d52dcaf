"""A Messages API event stream (SSE) built from a final Message, for callers that asked for ``stream``.

The answer is complete before the first event is written, so the stream replays it the way the API
streams one: ``message_start`` (the message with no content, no stop reason, and the usage known at
start), then per block ``content_block_start`` / deltas / ``content_block_stop``, then ``message_delta``
(stop reason, stop sequence, final usage) and ``message_stop``. The SDKs' accumulators rebuild the very
Message the batch returned: text is sent as ``text_delta`` chunks (and citations as ``citations_delta``),
``tool_use`` / ``server_tool_use`` start with ``input: {}`` and send their input as ``input_json_delta``
chunks, ``thinking`` sends ``thinking_delta`` then ``signature_delta``; every other block type, known or
not, starts whole and stops (so a block the installed SDK does not know is never lost).

``PING`` is what a waiting front sends every few seconds so proxies keep an idle connection open.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import orjson

__all__ = ["CONTENT_TYPE", "PING", "error_event", "event", "message_events", "render"]

CONTENT_TYPE = "text/event-stream; charset=utf-8"
TEXT_CHUNK_CHARS = 100
JSON_CHUNK_CHARS = 100

# Blocks whose input the SDKs' accumulators rebuild from input_json_delta (both the beta and the plain one).
_TOOL_INPUT_BLOCKS = frozenset({"tool_use", "server_tool_use"})
# Usage fields a message_delta carries (cumulative); the rest are known at message_start.
_DELTA_USAGE = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")
_LATE_USAGE = ("server_tool_use", "output_tokens_details")


def event(name: str, data: Mapping[str, Any]) -> bytes:
    """One SSE event. orjson never writes a raw newline, so ``data`` is always a single line."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


PING = event("ping", {"type": "ping"})


def error_event(envelope: Mapping[str, Any]) -> bytes:
    """The API's mid-stream error: ``event: error`` with the error envelope."""
    return event("error", envelope)


def render(message: Mapping[str, Any]) -> bytes:
    """The whole stream for ``message`` as one bytes object."""
    return b"".join(message_events(message))


def message_events(
    message: Mapping[str, Any], *, text_chunk: int = TEXT_CHUNK_CHARS, json_chunk: int = JSON_CHUNK_CHARS
) -> Iterator[bytes]:
    """The events that stream ``message`` (a Message JSON object, unknown fields kept)."""
    usage = dict(message.get("usage") or {})
    final_output = usage.get("output_tokens", 0)
    start_usage = {k: v for k, v in usage.items() if not (k in _LATE_USAGE and v is not None)}
    # The API reports the first output token(s) at start; the delta carries the total.
    start_usage["output_tokens"] = min(1, final_output) if isinstance(final_output, int) else final_output
    start = {k: v for k, v in message.items() if k not in ("content", "usage")}
    start.update(content=[], stop_reason=None, stop_sequence=None, usage=start_usage)
    for late in ("stop_details", "container"):
        if start.get(late) is not None:
            del start[late]  # sent with message_delta, where the accumulators take it from
    yield event("message_start", {"type": "message_start", "message": start})

    for index, block in enumerate(message.get("content") or []):
        yield from _block_events(index, block, text_chunk, json_chunk)

    delta: dict[str, Any] = {
        "stop_reason": message.get("stop_reason"),
        "stop_sequence": message.get("stop_sequence"),
    }
    for late in ("stop_details", "container"):
        if message.get(late) is not None:
            delta[late] = message[late]
    delta_usage = {k: usage[k] for k in (*_DELTA_USAGE, *_LATE_USAGE) if usage.get(k) is not None}
    yield event("message_delta", {"type": "message_delta", "delta": delta, "usage": delta_usage})
    yield event("message_stop", {"type": "message_stop"})


def _block_events(index: int, block: Any, text_chunk: int, json_chunk: int) -> Iterator[bytes]:
    kind = block.get("type") if isinstance(block, Mapping) else None
    deltas: list[dict[str, Any]] = []
    if kind == "text" and isinstance(block.get("text"), str):
        start = {**block, "text": ""}
        citations = block.get("citations")
        if isinstance(citations, list) and citations:
            start["citations"] = None
            deltas += [{"type": "citations_delta", "citation": c} for c in citations]
        deltas += [{"type": "text_delta", "text": part} for part in _chunks(block["text"], text_chunk)]
    elif kind == "thinking" and isinstance(block.get("thinking"), str):
        start = {**block, "thinking": ""}
        deltas += [
            {"type": "thinking_delta", "thinking": part} for part in _chunks(block["thinking"], text_chunk)
        ]
        if isinstance(block.get("signature"), str):
            start["signature"] = ""
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
    elif kind in _TOOL_INPUT_BLOCKS and "input" in block:
        start = {**block, "input": {}}
        partial = orjson.dumps(block["input"]).decode()
        deltas += [{"type": "input_json_delta", "partial_json": p} for p in _chunks(partial, json_chunk)]
    else:
        start = block  # redacted_thinking, server tool results, and any type not known here: whole
    yield event(
        "content_block_start",
        {"type": "content_block_start", "index": index, "content_block": start},
    )
    for delta in deltas:
        yield event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
    yield event("content_block_stop", {"type": "content_block_stop", "index": index})


def _chunks(text: str, size: int) -> Iterator[str]:
    for i in range(0, len(text), size):
        yield text[i : i + size]
