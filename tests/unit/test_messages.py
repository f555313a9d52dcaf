"""messages.py: a call's params are what the SDK's own preparation makes of them, whether plain JSON data
skips it or not; a results line is read into the very objects the SDK's own decoder builds, whether it
takes the fast path (validated, each union dispatched on its ``type``) or the SDK's lenient build."""

from __future__ import annotations

import datetime
import enum
import math
import uuid
from typing import Any

import orjson
import pydantic
import pytest
from anthropic import NOT_GIVEN
from anthropic._models import construct_type_unchecked
from anthropic._utils._prepare import async_prepare_request_data
from anthropic.types import TextBlock
from anthropic.types.beta.messages import BetaMessageBatchIndividualResponse
from anthropic.types.messages import MessageBatchIndividualResponse

from batchd.errors import RequestFailed
from batchd.messages import _plain_copy, _validated, parse_result, prepare_call

MESSAGE: dict[str, Any] = {
    "id": "msg_0",
    "type": "message",
    "role": "assistant",
    "model": "claude-haiku-4-5",
    "content": [{"type": "text", "text": "ok"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 1, "output_tokens": 1},
}
CITATION = {
    "type": "char_location",
    "cited_text": "c",
    "document_index": 0,
    "document_title": None,
    "start_char_index": 0,
    "end_char_index": 1,
}
BLOCKS: list[dict[str, Any]] = [
    {"type": "text", "text": "x", "citations": [CITATION]},
    {"type": "text", "text": "x", "citations": None, "a_new_field": [1]},
    {"type": "tool_use", "id": "tu", "name": "f", "input": {"a": [1, 2.5, None]}},
    {"type": "thinking", "thinking": "hm", "signature": "s"},
    {"type": "redacted_thinking", "data": "d"},
    {"type": "server_tool_use", "id": "s1", "name": "web_search", "input": {"q": "x"}},
]


def succeeded(**message: Any) -> dict[str, Any]:
    return {"custom_id": "r-1", "result": {"type": "succeeded", "message": {**MESSAGE, **message}}}


def errored(kind: str) -> dict[str, Any]:
    error = {"type": "error", "error": {"type": kind, "message": "bad"}, "request_id": None}
    return {"custom_id": "r-1", "result": {"type": "errored", "error": error}}


# (line, whether it validates: the fast path)
CASES: list[tuple[dict[str, Any], bool]] = [
    (succeeded(), True),
    (succeeded(content=BLOCKS), True),
    (succeeded(content=[]), True),
    (succeeded(usage={"input_tokens": "1", "output_tokens": True}), True),  # pydantic's lax coercion
    (succeeded(model="claude-not-in-this-sdk"), True),
    (succeeded(a_new_field={"x": 1}), True),
    (errored("invalid_request_error"), True),
    ({"custom_id": "r-1", "result": {"type": "canceled", "extra": 1}}, True),
    ({"custom_id": "r-1", "result": {"type": "expired"}}, True),
    # What the installed SDK does not know: its lenient build keeps it.
    (succeeded(content=[{"type": "hologram", "frames": 3}, *BLOCKS]), False),
    (succeeded(content=[{"type": "text"}]), False),
    (succeeded(stop_reason="a_new_reason"), False),
    (succeeded(id=5), False),
    (errored("a_new_error_type"), False),
    ({"custom_id": "r-1", "result": {"type": "a_new_result_type"}}, False),
]


def same(a: Any, b: Any, path: str = "$") -> None:
    """Equal, of the same classes, with the same fields set (what model_dump(exclude_unset) reads)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, pydantic.BaseModel):
        assert a.model_fields_set == b.model_fields_set, path
        assert a.__pydantic_extra__ == b.__pydantic_extra__, path
        assert a.__dict__.keys() == b.__dict__.keys(), path
        for key, value in a.__dict__.items():
            same(value, b.__dict__[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key, value in a.items():
            same(value, b[key], f"{path}.{key}")
    else:
        assert a == b, path


@pytest.mark.parametrize("beta", [False, True])
@pytest.mark.parametrize(("line", "fast"), CASES)
def test_a_line_reads_as_the_sdk_decoder_reads_it(line: dict[str, Any], fast: bool, beta: bool) -> None:
    kind: Any = BetaMessageBatchIndividualResponse if beta else MessageBatchIndividualResponse
    sdk = construct_type_unchecked(value=orjson.loads(orjson.dumps(line)), type_=kind).result
    assert (_validated(orjson.loads(orjson.dumps(line)), beta) is not None) is fast
    result = parse_result("r", orjson.dumps(line), beta=beta)
    same(result, sdk)
    assert result == sdk


def test_a_line_without_a_result_is_unreadable() -> None:
    with pytest.raises(RequestFailed, match="cannot read"):
        parse_result("r", orjson.dumps({"custom_id": "r-1"}))


class Role(enum.StrEnum):
    USER = "user"


class Plain(enum.Enum):
    ONE = 1


def with_message(content: Any) -> dict[str, Any]:
    return {"model": "claude-haiku-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": content}]}


# (params, whether they are plain JSON data: the SDK's preparation is skipped)
PARAMS: list[tuple[dict[str, Any], bool]] = [
    (with_message("hi"), True),
    (
        {
            **with_message([{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]),
            "top_k": 2,
        },
        True,
    ),
    ({**with_message("hi"), "temperature": 0.5, "stop_sequences": ["a", "b"]}, True),
    ({**with_message("hi"), "messages": ({"role": "user", "content": "hi"},)}, False),  # a tuple
    ({**with_message("hi"), "messages": [{"role": Role.USER, "content": "hi"}]}, True),  # equal, same JSON
    ({**with_message("hi"), "metadata": {"x": Plain.ONE}}, False),
    ({**with_message("hi"), "system": None}, False),
    ({**with_message("hi"), "temperature": math.nan}, False),
    ({**with_message("hi"), "metadata": {"user_id": NOT_GIVEN}}, False),
    ({**with_message([TextBlock(type="text", text="a block passed back")])}, False),
    ({**with_message("hi"), "metadata": {"at": datetime.date(2026, 1, 1)}}, False),
    ({**with_message("hi"), "metadata": {"id": uuid.UUID(int=1)}}, False),
    ({**with_message("hi"), "metadata": {"tags": {"a"}}}, False),
]


@pytest.mark.parametrize(("params", "plain"), PARAMS)
async def test_params_are_what_the_sdk_prepares(params: dict[str, Any], plain: bool) -> None:
    sdk = await async_prepare_request_data(params, location="body")
    assert (_plain_copy(params) is not None) is plain
    call = await prepare_call(params, default_timeout=None)
    assert call.params == sdk
    assert orjson.dumps(call.params) == orjson.dumps(sdk)
    if plain:  # a copy: the caller's own containers are never the queued ones
        assert call.params["messages"] is not params["messages"]
