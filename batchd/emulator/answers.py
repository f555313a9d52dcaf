"""Deterministic answers: the checks a request's params must pass and the echo message it gets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Answer", "ParamError", "answer", "count_tokens", "message_json"]

# Nothing is generated: the answer echoes the prompt so tests can tell whose answer is whose.
ECHO_PREFIX = "echo: "


class ParamError(ValueError):
    """Params the real API would reject; message is the API-style `field: problem` text."""


@dataclass(frozen=True, slots=True)
class Answer:
    text: str
    model: str
    input_tokens: int
    output_tokens: int


def count_tokens(chars: int) -> int:
    # About four characters per token, never zero: a stand-in, but stable and proportional.
    return max(1, -(-chars // 4))


def _block_text(content: object, where: str) -> str:
    """Text of a message content (a string, or a list of blocks whose text blocks are joined)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ParamError(f"{where}: Input should be a valid string or a list of content blocks")
    parts: list[str] = []
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise ParamError(f"{where}.{j}: Input should be a content block object with a 'type'")
        if block["type"] == "text":
            text = block.get("text")
            if not isinstance(text, str):
                raise ParamError(f"{where}.{j}.text: Input should be a valid string")
            parts.append(text)
    return "".join(parts)


def answer(params: Mapping[str, object], *, streaming_message: str) -> Answer:
    """Check params as the API would and build the echo answer; raises ParamError.

    `streaming_message` differs between batches (never allowed) and /v1/messages (not emulated).
    """
    model = params.get("model")
    if model is None:
        raise ParamError("model: Field required")
    if not isinstance(model, str) or not model:
        raise ParamError("model: Input should be a non-empty string")
    max_tokens = params.get("max_tokens")
    if max_tokens is None:
        raise ParamError("max_tokens: Field required")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise ParamError("max_tokens: Input should be a valid integer")
    if max_tokens < 1:
        raise ParamError("max_tokens: Input should be greater than or equal to 1")
    if params.get("stream") is True:
        raise ParamError(streaming_message)
    messages = params.get("messages")
    if messages is None:
        raise ParamError("messages: Field required")
    if not isinstance(messages, list):
        raise ParamError("messages: Input should be a valid list")
    if not messages:
        raise ParamError("messages: List should have at least 1 item after validation, not 0")

    chars = 0
    last_user: str | None = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ParamError(f"messages.{i}: Input should be a valid dictionary")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise ParamError(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if "content" not in message:
            raise ParamError(f"messages.{i}.content: Field required")
        text = _block_text(message["content"], f"messages.{i}.content")
        chars += len(text)
        if role == "user":
            last_user = text
    if last_user is None:
        raise ParamError("messages: at least one message must have role 'user'")

    system = params.get("system")
    if system is not None:
        chars += len(_block_text(system, "system"))

    reply = ECHO_PREFIX + last_user
    return Answer(
        text=reply, model=model, input_tokens=count_tokens(chars), output_tokens=count_tokens(len(reply))
    )


def message_json(
    msg_id: str, model: str, text: str, input_tokens: int, output_tokens: int, service_tier: str
) -> dict[str, object]:
    """A Message object shaped like a real one (required fields plus the usual usage block)."""
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "service_tier": service_tier,
        },
    }
