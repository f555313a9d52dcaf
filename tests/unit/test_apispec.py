"""batchd.apispec: the params the Messages API accepts, learnt from the installed SDK's types."""

from __future__ import annotations

import copy
import typing
from typing import Any

import pytest
from anthropic.types import ModelParam
from anthropic.types.message_create_params import MessageCreateParamsNonStreaming

from batchd import apispec
from batchd.apispec import ParamError, check_count_tokens_params, check_params


def params(**extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-haiku-4-5",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}],
        **extra,
    }


def refused(p: dict[str, Any], *, betas: tuple[str, ...] = (), in_batch: bool = True) -> str:
    with pytest.raises(ParamError) as info:
        check_params(p, betas=betas, in_batch=in_batch)
    return str(info.value)


# Everything here is something the API accepts: it must pass, and pass unchanged.
RICH: dict[str, Any] = {
    "model": "claude-sonnet-4-5-20250929",
    "max_tokens": 2048,
    "system": [
        {"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}
    ],
    "metadata": {"user_id": "u-1"},
    "stop_sequences": ["STOP"],
    "temperature": 0.2,
    "cache_control": {"type": "ephemeral"},
    "container": "container_abc",
    "output_config": {"effort": "low"},
    "service_tier": "auto",
    "inference_geo": "us",
    "thinking": {"type": "enabled", "budget_tokens": 1024},
    "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
    "tools": [
        {
            "name": "get_weather",
            "description": "Weather for a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
            "cache_control": {"type": "ephemeral"},
        },
        {"type": "custom", "name": "lookup", "input_schema": {"type": "object"}},
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 2},
        {"type": "bash_20250124", "name": "bash"},
    ],
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look at these."},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}},
                {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "doc"}},
                {
                    "type": "search_result",
                    "source": "s",
                    "title": "t",
                    "content": [{"type": "text", "text": "x"}],
                },
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "c2ln"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": [{"type": "text", "text": "sunny"}],
                    "cache_control": {"type": "ephemeral"},
                },
                {"type": "text", "text": "And tomorrow?"},
            ],
        },
    ],
}


def test_everything_the_api_accepts_passes_unchanged() -> None:
    sent = copy.deepcopy(RICH)
    check_params(sent, in_batch=True)
    check_params(sent, in_batch=False)
    assert sent == RICH


def test_known_params_are_the_sdk_types_keys_minus_its_header_arguments() -> None:
    sdk_keys = set(typing.get_type_hints(MessageCreateParamsNonStreaming))
    assert apispec.known_params() == sdk_keys - {"workspace_id", "user_profile_id"}
    assert {"tools", "thinking", "output_config", "cache_control", "container", "metadata"} <= sdk_keys
    # The beta types know more fields (and `betas` is a header there too).
    beta = apispec.known_params(beta=True)
    assert apispec.known_params() < beta and "betas" not in beta


@pytest.mark.parametrize("key", ["betas", "workspace_id", "user_profile_id", "not_a_param", "store"])
def test_params_the_sdk_does_not_send_in_the_body_are_unknown(key: str) -> None:
    assert refused(params(**{key: "x"}), in_batch=False) == f"{key}: Extra inputs are not permitted"


def test_beta_fields_need_betas() -> None:
    p = params(mcp_servers=[{"type": "url", "url": "https://example.com/sse", "name": "x"}])
    assert refused(p) == "mcp_servers: Extra inputs are not permitted"
    check_params(p, betas=("mcp-client-2025-04-04",), in_batch=True)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"stream": True}, "stream: Message Batches requests cannot be streamed"),
        ({"speed": "fast"}, "speed: fast mode is not available in Message Batches"),
        ({"store": True}, "store: not supported in Message Batches"),
        ({"previous_thread_event_id": "e"}, "previous_thread_event_id: not supported in Message Batches"),
        ({"cache_hint": "x"}, "cache_hint: not supported in Message Batches"),
        ({"context_hint": "x"}, "context_hint: not supported in Message Batches"),
        ({"research_preview_2026_02": "active"}, "research_preview_2026_02: research previews are not"),
    ],
)
def test_params_the_batch_docs_refuse(extra: dict[str, Any], message: str) -> None:
    assert refused(params(**extra)).startswith(message)


def test_stream_and_speed_are_fine_in_real_time() -> None:
    check_params(params(stream=True, speed="fast"), in_batch=False)
    check_params(params(stream=False), in_batch=True)


@pytest.mark.parametrize(
    ("p", "message"),
    [
        ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, "model: Field required"),
        (params(model=""), "model: Input should be a non-empty string"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens: Field required"),
        (params(max_tokens=0), "max_tokens: Input should be greater than or equal to 1"),
        (params(max_tokens="5"), "max_tokens: Input should be a valid integer"),
        (params(messages=[]), "messages: List should have at least 1 item after validation, not 0"),
        (params(messages="hi"), "messages: Input should be a valid list"),
        (params(messages=[{"role": "bot", "content": "x"}]), "messages.0.role: Input should be 'user', "),
        (params(messages=[{"role": "user"}]), "messages.0.content: Field required"),
        (params(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages.0.content.0.text:"),
        (
            params(messages=[{"role": "user", "content": [{"type": "video", "url": "x"}]}]),
            "messages.0.content.0: Input tag 'video' found using 'type' does not match any of the expected "
            "tags: 'bash_code_execution_tool_result', ",
        ),
        (params(messages=[{"role": "user", "content": [{"text": "x"}]}]), "messages.0.content.0: Unable to"),
        (
            params(
                messages=[{"role": "user", "content": [{"type": "tool_result", "content": [{"type": "x"}]}]}]
            ),
            "messages.0.content.0.content.0: Input tag 'x'",
        ),
        (params(system=[{"type": "image"}]), "system.0: Input tag 'image'"),
        (params(tools=[{"type": "no_such_tool_20990101"}]), "tools.0: Input tag 'no_such_tool_20990101'"),
        (params(tools=[{"input_schema": {}}]), "tools.0.custom.name: Field required"),
        (params(tool_choice={"type": "tool"}), "tool_choice.tool.name: Field required"),
        (params(tool_choice={"type": "sometimes"}), "tool_choice: Input tag 'sometimes'"),
        (params(thinking={"type": "enabled", "budget_tokens": 512}), "thinking.enabled.budget_tokens:"),
        (params(thinking={"type": "enabled", "budget_tokens": 2048}), "max_tokens: must be greater than"),
        (params(temperature="hot"), "temperature: Input should be a valid number"),
    ],
)
def test_refusals_name_the_field(p: dict[str, Any], message: str) -> None:
    assert refused(p).startswith(message)


def test_beta_block_types_need_betas() -> None:
    block = {"type": "mcp_tool_use", "id": "mcptoolu_1", "name": "n", "server_name": "s", "input": {}}
    p = params(messages=[{"role": "assistant", "content": [block]}, {"role": "user", "content": "go on"}])
    assert refused(p).startswith("messages.0.content.0: Input tag 'mcp_tool_use'")
    check_params(p, betas=("mcp-client-2025-04-04",), in_batch=True)


# --- output caps ----------------------------------------------------------------------------------------


def test_max_tokens_over_the_cap_has_the_apis_message() -> None:
    # The exact text of a real errored result (anthropic-batches-api.md, section 3).
    assert refused(params(max_tokens=100_000)) == (
        "max_tokens: 100000 > 64000, which is the maximum allowed number of output tokens for "
        "claude-haiku-4-5-20251001"
    )
    check_params(params(max_tokens=64_000), in_batch=True)


def test_the_output_beta_lifts_the_cap_in_batches_only_and_for_its_models_only() -> None:
    beta = (apispec.OUTPUT_300K_BETA,)
    sonnet = params(model="claude-sonnet-4-6", max_tokens=200_000)
    assert refused(sonnet).startswith("max_tokens: 200000 > 64000, ")
    check_params(sonnet, betas=beta, in_batch=True)
    assert refused(sonnet, betas=beta, in_batch=False).startswith("max_tokens: 200000 > 64000, ")
    assert refused(params(model="claude-sonnet-4-6", max_tokens=300_001), betas=beta).startswith(
        "max_tokens: 300001 > 300000, "
    )
    assert refused(params(max_tokens=100_000), betas=beta).startswith("max_tokens: 100000 > 64000, ")
    # A model whose own cap is not known still gets the beta's.
    assert apispec.max_output_tokens("claude-opus-4-8", in_batch=True) is None
    assert apispec.max_output_tokens("claude-opus-4-8", betas=beta, in_batch=True) == 300_000


def test_unknown_models_get_no_cap_check() -> None:
    assert apispec.model_spec("m") is None
    check_params(params(model="m", max_tokens=10_000_000), in_batch=True)


def test_model_names_resolve_like_the_api() -> None:
    haiku = apispec.model_spec("claude-haiku-4-5")
    assert haiku is not None and haiku.max_tokens == 64_000
    assert apispec.model_spec("claude-haiku-4-5-20251001") is haiku
    assert apispec.model_spec("claude-haiku-4-5-latest") is haiku
    assert apispec.model_spec("claude-opus-4-0") is apispec.model_spec("claude-opus-4")
    # Opus 4.9 is not "Opus 4 plus a suffix".
    assert apispec.model_spec("claude-opus-4-9") is None


def test_every_model_the_sdk_names_is_in_the_table() -> None:
    literal = typing.get_args(ModelParam)[0]
    names = typing.get_args(literal)
    assert names
    assert [name for name in names if apispec.model_spec(name) is None] == []


# --- count_tokens and headers ---------------------------------------------------------------------------


def test_count_tokens_params_need_no_max_tokens_and_refuse_it() -> None:
    check_count_tokens_params({"model": "m", "messages": [{"role": "user", "content": "x"}], "system": "s"})
    with pytest.raises(ParamError, match="max_tokens: Extra inputs are not permitted"):
        check_count_tokens_params(params())
    with pytest.raises(ParamError, match="messages: Field required"):
        check_count_tokens_params({"model": "m"})


def test_parse_betas_splits_dedupes_and_sorts() -> None:
    assert apispec.parse_betas(["b-2, a-1", "b-2", " ", "c-3,"]) == ("a-1", "b-2", "c-3")
    assert apispec.parse_betas([]) == ()
