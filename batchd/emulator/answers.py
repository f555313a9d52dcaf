"""Deterministic answers: params checked as the API would (batchd.apispec), then the message they get.

Nothing is generated. By default the answer echoes the last user message (`echo: <text>`) so tests can tell
whose answer is whose; on a documented cue it calls a tool, so agents' tool loops can be tested:

- a canned response (POST /_emulator/responses) whose `match` occurs in the last user text answers with its
  own content blocks;
- a last user message carrying `tool_result` blocks is answered with a text block echoing those results;
- with `tools`, a cue `[[tool:NAME {"json": "input"}]]` in the last user message (or a `tool_choice` that
  forces a tool) is answered with `tool_use` blocks and `stop_reason: "tool_use"`;
- `thinking: {"type": "enabled"}` puts a `thinking` block (with a signature) first.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import orjson

from .. import apispec
from .cache import CacheKey, ttl_seconds

__all__ = [
    "STOP_REASONS",
    "Answer",
    "CannedResponse",
    "ParamError",
    "answer",
    "count_tokens",
    "message_json",
    "parse_canned",
    "prompt_tokens",
]

# Nothing is generated: the answer echoes the prompt so tests can tell whose answer is whose.
ECHO_PREFIX = "echo: "
STOP_REASONS = frozenset(
    {
        "end_turn",
        "max_tokens",
        "stop_sequence",
        "tool_use",
        "pause_turn",
        "refusal",
        "model_context_window_exceeded",
    }
)

ParamError = apispec.ParamError

# [[tool:NAME]] or [[tool:NAME {...json object...}]]; the input runs to the first "}]]" that closes it.
_CUE = re.compile(r"\[\[tool:(?P<name>[^\s\]{]+)(?:\s*(?P<input>\{.*?\}))?\s*\]\]", re.DOTALL)
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_SCHEMA_DEPTH = 8


@dataclass(frozen=True, slots=True)
class CannedResponse:
    """Answer with `content` (and `stop_reason`) whenever `match` occurs in the last user text."""

    match: str
    content: tuple[dict[str, object], ...]
    stop_reason: str


@dataclass(frozen=True, slots=True)
class Answer:
    """One succeeded answer. `content` is None for the plain echo, whose only block is `text`."""

    text: str
    model: str
    input_tokens: int
    output_tokens: int
    content: list[dict[str, object]] | None = None
    stop_reason: str = "end_turn"
    cache: CacheKey | None = None  # the request's cacheable prefix, if it has a breakpoint


def count_tokens(chars: int) -> int:
    # About four characters per token, never zero: a stand-in, but stable and proportional.
    return max(1, -(-chars // 4))


# --- reading the prompt ---------------------------------------------------------------------------------


def _text(content: object) -> str:
    """A message content's text: a string as is, or its `text` blocks joined with no separator."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return "".join(b["text"] for b in content if isinstance(b, dict) and b.get("type") == "text")


def _json_len(value: object) -> int:
    return len(orjson.dumps(value))


def _block_chars(block: object) -> int:
    """Characters a block adds to the prompt estimate. Images and files by reference count 0 (UNCONFIRMED)."""
    if isinstance(block, str):
        return len(block)
    if not isinstance(block, dict):
        return 0
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        return len(text) if isinstance(text, str) else 0
    if kind == "thinking":
        thinking = block.get("thinking")
        return len(thinking) if isinstance(thinking, str) else 0
    if kind in ("tool_use", "server_tool_use"):
        return len(str(block.get("name", ""))) + _json_len(block.get("input", {}))
    if kind in ("tool_result", "search_result"):
        content = block.get("content")
        if isinstance(content, list):
            return sum(_block_chars(b) for b in content)
        return len(content) if isinstance(content, str) else 0
    if kind == "document":
        source = block.get("source")
        if isinstance(source, dict) and source.get("type") == "text":
            data = source.get("data")
            return len(data) if isinstance(data, str) else 0
        if isinstance(source, dict) and source.get("type") == "content":
            content = source.get("content")
            return sum(_block_chars(b) for b in content) if isinstance(content, list) else 0
    return 0


def _segments(params: Mapping[str, object]) -> list[tuple[str, object]]:
    """The prompt in the API's cache order (tools, system, messages) as (marker, block) pairs."""
    segments: list[tuple[str, object]] = []
    tools = params.get("tools")
    if isinstance(tools, list):
        segments.extend(("tool", tool) for tool in tools)
    system = params.get("system")
    if isinstance(system, str):
        segments.append(("system", system))
    elif isinstance(system, list):
        segments.extend(("system", block) for block in system)
    messages = params.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            role, content = str(message.get("role")), message.get("content")
            if isinstance(content, list):
                segments.extend((role, block) for block in content)
            else:
                segments.append((role, content))
    return segments


def _plain_chars(params: Mapping[str, object]) -> int | None:
    """The prompt's characters when it is only string messages (and system): most requests, done fast."""
    if "tools" in params or "cache_control" in params:
        return None
    system = params.get("system")
    if system is not None and not isinstance(system, str):
        return None
    chars = len(system) if system is not None else 0
    messages = params.get("messages")
    if not isinstance(messages, list):
        return None
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            return None
        chars += len(content)
    return chars


def _segment_chars(marker: str, block: object) -> int:
    if marker == "tool" and isinstance(block, dict):
        # A tool definition costs about its JSON (its cache_control marker aside).
        return _json_len({k: v for k, v in block.items() if k != "cache_control"})
    return _block_chars(block)


def _breakpoint(block: object) -> object:
    return block.get("cache_control") if isinstance(block, dict) else None


def prompt_tokens(params: Mapping[str, object]) -> tuple[int, CacheKey | None]:
    """Estimated input tokens of the whole prompt, and its cacheable prefix (up to the last breakpoint)."""
    plain = _plain_chars(params)
    if plain is not None:
        return count_tokens(plain), None
    segments = _segments(params)
    chars = [_segment_chars(marker, block) for marker, block in segments]
    total = count_tokens(sum(chars))
    last, control = -1, None
    for i, (_, block) in enumerate(segments):
        if (found := _breakpoint(block)) is not None:
            last, control = i, found
    top = params.get("cache_control")
    if top is not None and segments:
        # Top-level cache_control marks the last cacheable block: the whole prompt is the prefix.
        last, control = len(segments) - 1, top
    if last < 0:
        return total, None
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(params.get("model")).encode())
    for marker, block in segments[: last + 1]:
        if isinstance(block, dict) and "cache_control" in block:
            block = {k: v for k, v in block.items() if k != "cache_control"}
        digest.update(b"\x00" + marker.encode() + b"\x00")
        digest.update(orjson.dumps(block, option=orjson.OPT_SORT_KEYS))
    tokens = min(total, -(-sum(chars[: last + 1]) // 4))
    return total, CacheKey(digest.digest(), tokens, ttl_seconds(control))


# --- building the answer --------------------------------------------------------------------------------


def answer(
    params: Mapping[str, object],
    *,
    betas: Sequence[str] = (),
    in_batch: bool,
    canned: Sequence[CannedResponse] = (),
) -> Answer:
    """Check params as the API would (raises ParamError) and build the deterministic answer."""
    apispec.check_params(params, betas=betas, in_batch=in_batch)
    model = params["model"]
    messages = params["messages"]
    assert isinstance(model, str) and isinstance(messages, list)  # check_params proved both
    input_tokens, cache = prompt_tokens(params)

    last_user = ""
    for message in messages:
        if message["role"] == "user":
            last_user = _text(message["content"])
    final = messages[-1]
    results = (
        [b for b in final["content"] if isinstance(b, dict) and b.get("type") == "tool_result"]
        if final["role"] == "user" and isinstance(final["content"], list)
        else None
    )

    content: list[dict[str, object]] | None = None
    stop_reason = "end_turn"
    text = ECHO_PREFIX + last_user
    match = next((c for c in canned if c.match in last_user), None) if canned else None
    if match is not None:
        content, stop_reason = [dict(block) for block in match.content], match.stop_reason
    elif results:
        text = ECHO_PREFIX + _echo_results(results, _text(final["content"]))
    elif "tools" in params:
        calls = _tool_calls(params, last_user, len(messages))
        if calls:
            content, stop_reason = calls, "tool_use"

    thinking = params.get("thinking")
    if thinking is not None and isinstance(thinking, dict) and thinking.get("type") == "enabled":
        shown = "" if thinking.get("display") == "omitted" else f"Thinking about: {last_user}"
        blocks = content if content is not None else [{"type": "text", "text": text}]
        content = [{"type": "thinking", "thinking": shown, "signature": _signature(shown, model)}, *blocks]

    if content is None:
        return Answer(text, model, input_tokens, count_tokens(len(text)), cache=cache)
    output = sum(_block_chars(block) for block in content)
    return Answer("", model, input_tokens, count_tokens(output), content, stop_reason, cache)


def _echo_results(results: list[dict[str, object]], text: str) -> str:
    """`tool_result <id>: <its text>` per result, then any text that came with them, one per line."""
    lines = []
    for block in results:
        body = block.get("content")
        shown = _text(body) if body is not None else ""
        error = " (error)" if block.get("is_error") is True else ""
        lines.append(f"tool_result {block.get('tool_use_id')}{error}: {shown}")
    if text:
        lines.append(text)
    return "\n".join(lines)


def _tool_calls(params: Mapping[str, object], last_user: str, turn: int) -> list[dict[str, object]]:
    """tool_use blocks for the cues in the last user text, or for a tool_choice that forces a tool."""
    tools = params.get("tools")
    if not isinstance(tools, list) or not tools:
        return []
    by_name = {t["name"]: t for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str)}
    choice = params.get("tool_choice")
    choice_type = choice.get("type") if isinstance(choice, dict) else "auto"
    if choice_type == "none":
        return []
    cues: list[tuple[str, dict[str, object]]] = []
    for found in _CUE.finditer(last_user):
        name, raw = found.group("name"), found.group("input")
        if name not in by_name:
            continue  # a model can only call a tool it was given
        try:
            data = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            continue
        if isinstance(data, dict):
            cues.append((name, data))

    forced: str | None = None
    if choice_type == "tool" and isinstance(choice, dict) and choice.get("name") in by_name:
        forced = str(choice["name"])
    elif choice_type == "any" and not cues:
        forced = next(iter(by_name), None)
    if forced is not None:
        given = [data for name, data in cues if name == forced]
        tool = by_name[forced]
        placeholder = _placeholder(tool.get("input_schema"), 0)
        cues = [(forced, given[0] if given else placeholder if isinstance(placeholder, dict) else {})]
    if isinstance(choice, dict) and choice.get("disable_parallel_tool_use") is True:
        cues = cues[:1]
    return [
        {"type": "tool_use", "id": _tool_id(last_user, turn, i, name), "name": name, "input": data}
        for i, (name, data) in enumerate(cues)
    ]


def _placeholder(schema: object, depth: int) -> object:
    """A value that fits a JSON schema's required parts: defaults, enums, then one per type."""
    if not isinstance(schema, dict) or depth > _SCHEMA_DEPTH:
        return None
    for key in ("default", "const"):
        if key in schema:
            return schema[key]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            return _placeholder(options[0], depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = schema.get("required")
        names = [r for r in required if isinstance(r, str)] if isinstance(required, list) else []
        return {name: _placeholder(properties.get(name), depth + 1) for name in names}
    return {"string": "placeholder", "integer": 0, "number": 0, "boolean": False, "array": []}.get(str(kind))


def _tool_id(text: str, turn: int, index: int, name: str) -> str:
    # Deterministic (the same request gets the same ids), distinct per turn and per block.
    number = int.from_bytes(
        hashlib.blake2b(f"{turn}\x00{index}\x00{name}\x00{text}".encode(), digest_size=16).digest(), "big"
    )
    chars = []
    for _ in range(22):
        number, digit = divmod(number, 62)
        chars.append(_BASE62[digit])
    return "toolu_01" + "".join(chars)


def _signature(thinking: str, model: str) -> str:
    return base64.b64encode(
        hashlib.blake2b(f"{model}\x00{thinking}".encode(), digest_size=48).digest()
    ).decode()


# --- canned responses ----------------------------------------------------------------------------------


def parse_canned(data: object) -> tuple[CannedResponse, ...]:
    """The body of POST /_emulator/responses: a list of {match, content, stop_reason?}; ValueError if bad."""
    if not isinstance(data, list):
        raise ValueError("responses: Input should be a valid list")
    parsed = []
    for i, item in enumerate(data):
        where = f"responses.{i}"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: Input should be a valid dictionary")
        unknown = set(item) - {"match", "content", "stop_reason"}
        if unknown:
            raise ValueError(f"{where}.{sorted(unknown)[0]}: Extra inputs are not permitted")
        match = item.get("match")
        if not isinstance(match, str) or not match:
            raise ValueError(f"{where}.match: Input should be a non-empty string")
        content = item.get("content")
        if not isinstance(content, list) or not content:
            raise ValueError(f"{where}.content: Input should be a non-empty list of content blocks")
        for j, block in enumerate(content):
            if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                raise ValueError(f"{where}.content.{j}: Input should be a content block object with a 'type'")
        uses_tool = any(block["type"] == "tool_use" for block in content)
        stop_reason = item.get("stop_reason", "tool_use" if uses_tool else "end_turn")
        if stop_reason not in STOP_REASONS:
            raise ValueError(f"{where}.stop_reason: Input should be one of {sorted(STOP_REASONS)}")
        parsed.append(CannedResponse(match, tuple(content), str(stop_reason)))
    return tuple(parsed)


# --- the Message object ---------------------------------------------------------------------------------


def message_json(
    msg_id: str,
    model: str,
    text: str,
    input_tokens: int,
    output_tokens: int,
    service_tier: str,
    *,
    content: list[dict[str, object]] | None = None,
    stop_reason: str = "end_turn",
    cache_write_5m: int = 0,
    cache_write_1h: int = 0,
    cache_read: int = 0,
) -> dict[str, object]:
    """A Message object shaped like a real one (required fields plus the usual usage block)."""
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content if content is not None else [{"type": "text", "text": text}],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": cache_write_5m + cache_write_1h,
            "cache_read_input_tokens": cache_read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": cache_write_5m,
                "ephemeral_1h_input_tokens": cache_write_1h,
            },
            "service_tier": service_tier,
        },
    }
