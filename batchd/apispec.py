"""What the Messages API accepts, checked before anything is sent: the params of one request, and the models.

Pure (no I/O besides reading the packaged ``data/models.toml`` once) and importable by both batchd's emulator
and its submit path, so a request the API would reject is refused with the API's own message before a caller
waits a whole batch for it.

The shape of a request is learnt from the installed ``anthropic`` SDK's own param types (the beta ones when
betas are given): a field or content block type the SDK knows is accepted, one it does not know is refused.
So batchd learns new API fields by upgrading the SDK. What the types cannot say (params refused inside
batches, per-model output caps) is written down here and in ``data/models.toml``.

Messages follow the API's pydantic style, ``field.path: problem``, for example
``messages.0.content.1: Input tag 'foo' found using 'type' does not match any of the expected tags: ...``.

Public API::

    check_params(params, *, betas=(), in_batch)        # raises ParamError
    check_count_tokens_params(params, *, betas=())     # raises ParamError
    parse_betas(header_values) -> tuple[str, ...]
    known_params(*, beta=False) -> frozenset[str]
    model_spec(model) -> ModelSpec | None
    models() -> tuple[ModelSpec, ...]
    max_output_tokens(model, *, betas=(), in_batch) -> int | None
"""

from __future__ import annotations

import functools
import re
import tomllib
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from typing_extensions import is_typeddict

__all__ = [
    "BATCH_REFUSED_PARAMS",
    "BATCH_TIERS",
    "HEADER_PARAMS",
    "LEGACY_SAMPLING_PARAMS",
    "OUTPUT_300K_BETA",
    "OUTPUT_300K_CAP",
    "BatchLimits",
    "ModelSpec",
    "ParamError",
    "check_count_tokens_params",
    "check_params",
    "known_params",
    "max_output_tokens",
    "model_spec",
    "models",
    "parse_betas",
]


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """A usage tier's Message Batches limits: requests per minute across every batch endpoint (polling
    included), and requests waiting in the processing queue (anthropic-batches-api.md, section 4)."""

    rpm: int
    queue: int


BATCH_TIERS: dict[int, BatchLimits] = {
    1: BatchLimits(rpm=50, queue=100_000),
    2: BatchLimits(rpm=1_000, queue=200_000),
    3: BatchLimits(rpm=2_000, queue=300_000),
    4: BatchLimits(rpm=4_000, queue=500_000),
}

OUTPUT_300K_BETA = "output-300k-2026-03-24"
"""The beta that lifts a model's output cap to ``OUTPUT_300K_CAP``, inside batches only."""
OUTPUT_300K_CAP = 300_000

HEADER_PARAMS = frozenset({"betas", "workspace_id", "user_profile_id"})
"""Arguments of the SDK's ``create`` that it sends as headers (``anthropic-beta``, ``anthropic-workspace-id``,
``anthropic-user-profile-id``), not body fields: in a request body they are unknown params."""

BATCH_REFUSED_PARAMS: Mapping[str, str] = {
    "speed": "fast mode is not available in Message Batches",
    "store": "not supported in Message Batches",
    "previous_thread_event_id": "not supported in Message Batches",
    "cache_hint": "not supported in Message Batches",
    "context_hint": "not supported in Message Batches",
}
"""Params the batch docs refuse (besides ``stream: true`` and ``research_preview_2026_02: "active"``), with
the problem reported for them. The exact wording is not known (UNCONFIRMED); the field name leads it."""

LEGACY_SAMPLING_PARAMS = frozenset({"temperature", "top_p", "top_k"})
"""Sampling params the SDK 2.x types dropped (API version 2026-10-21 removed them) but which the reference
says still pass as plain dict keys for older models: accepted (numbers) whatever the model (UNCONFIRMED)."""

# Every key _check_batch_refusals looks at: most requests have none, and skip it.
_BATCH_CHECKED = frozenset({"stream", "research_preview_2026_02", *BATCH_REFUSED_PARAMS})
_STREAM_IN_BATCH = "stream: Message Batches requests cannot be streamed"
_RESEARCH_PREVIEW = "research_preview_2026_02"
_THINKING_MIN_BUDGET = 1024


class ParamError(ValueError):
    """Params the API would reject; ``str(error)`` is the API-style ``field.path: problem`` message."""


# --- the SDK's types, read once --------------------------------------------------------------------------


def _typeddicts(hint: object) -> list[Any]:
    """The TypedDicts a type hint can hold, looking through Union, Optional, Iterable, Required, ..."""
    if is_typeddict(hint):
        return [hint]
    found: list[Any] = []
    for arg in typing.get_args(hint):
        found.extend(_typeddicts(arg))
    return found


def _tags(typed_dict: Any) -> tuple[str | None, ...]:
    """The ``type`` literal(s) of one TypedDict; None in the result means ``type`` may be omitted."""
    hint = typing.get_type_hints(typed_dict).get("type")
    if hint is None:
        return (None,)
    tags: list[str | None] = []
    for arg in typing.get_args(hint) or (hint,):
        for value in typing.get_args(arg) or (arg,):
            if isinstance(value, str):
                tags.append(value)
            elif value is type(None):
                tags.append(None)
    return tuple(tags)


def _union_tags(hint: object) -> dict[str | None, Any]:
    """tag -> the TypedDict it selects, for a discriminated union of TypedDicts."""
    return {tag: td for td in _typeddicts(hint) for tag in _tags(td)}


def _hints(typed_dict: Any) -> dict[str, Any]:
    return typing.get_type_hints(typed_dict)


@dataclass(frozen=True, slots=True)
class _Shape:
    """What the SDK's types say a request may contain: its body fields and the tags of each union."""

    body_params: frozenset[str]
    roles: Mapping[str, frozenset[str]]  # role -> content block types
    tool_result_types: frozenset[str]
    system_types: frozenset[str]
    tool_types: frozenset[str | None]  # None: a custom tool may omit `type`
    tool_choice_types: frozenset[str]
    thinking_types: frozenset[str]


def _shape(params_type: Any, message_type: Any) -> _Shape:
    hints = _hints(params_type)
    roles: dict[str, frozenset[str]] = {}
    tool_result: set[str] = set()
    for message in _typeddicts(message_type):
        message_hints = _hints(message)
        blocks = _union_tags(message_hints["content"])
        for role in _tags_of_field(message_hints["role"]):
            roles[role] = frozenset(tag for tag in blocks if tag is not None)
        if "tool_result" in blocks:
            tool_result |= {
                tag for tag in _union_tags(_hints(blocks["tool_result"])["content"]) if tag is not None
            }

    def tags(field: str) -> frozenset[str | None]:
        return frozenset(_union_tags(hints[field])) if field in hints else frozenset()

    # The API's own order in messages: user, assistant, then any newer roles.
    order = {"user": 0, "assistant": 1}
    return _Shape(
        body_params=frozenset(hints) - HEADER_PARAMS,
        roles=dict(sorted(roles.items(), key=lambda item: (order.get(item[0], 2), item[0]))),
        tool_result_types=frozenset(tool_result),
        system_types=frozenset(t for t in tags("system") if t is not None),
        tool_types=tags("tools"),
        tool_choice_types=frozenset(t for t in tags("tool_choice") if t is not None),
        thinking_types=frozenset(t for t in tags("thinking") if t is not None),
    )


def _tags_of_field(hint: object) -> list[str]:
    """The string literals of a ``Literal[...]`` hint (through Required/Optional)."""
    values: list[str] = []
    for arg in typing.get_args(hint) or (hint,):
        nested = typing.get_args(arg)
        values.extend(v for v in (nested or (arg,)) if isinstance(v, str))
    return values


@functools.cache
def _create_shape(beta: bool) -> _Shape:
    if beta:
        from anthropic.types.beta import BetaMessageParam
        from anthropic.types.beta.message_create_params import MessageCreateParamsNonStreaming as Beta

        return _shape(Beta, BetaMessageParam)
    from anthropic.types import MessageParam
    from anthropic.types.message_create_params import MessageCreateParamsNonStreaming

    return _shape(MessageCreateParamsNonStreaming, MessageParam)


@functools.cache
def _count_tokens_shape(beta: bool) -> _Shape:
    if beta:
        from anthropic.types.beta import BetaMessageParam
        from anthropic.types.beta.message_count_tokens_params import MessageCountTokensParams as Beta

        return _shape(Beta, BetaMessageParam)
    from anthropic.types import MessageParam
    from anthropic.types.message_count_tokens_params import MessageCountTokensParams

    return _shape(MessageCountTokensParams, MessageParam)


def known_params(*, beta: bool = False) -> frozenset[str]:
    """The body fields of ``messages.create`` the installed SDK knows (its beta types' with ``beta``).

    Excludes ``HEADER_PARAMS``, which the SDK sends as headers.
    """
    return _create_shape(beta).body_params


def parse_betas(header_values: Iterable[str]) -> tuple[str, ...]:
    """``anthropic-beta`` header values (comma-separated, possibly repeated): sorted, without repeats."""
    return tuple(sorted({b.strip() for value in header_values for b in value.split(",") if b.strip()}))


# --- models ---------------------------------------------------------------------------------------------

_SUFFIX = re.compile(r"[-@](?:\d{8}|latest)")
_MODEL_KEYS = frozenset({"name", "snapshot", "aliases", "created_at", "max_tokens", "output_300k"})
_EPOCH = "1970-01-01T00:00:00Z"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model of ``data/models.toml``."""

    id: str
    display_name: str
    created_at: str  # RFC 3339; the epoch when unknown (as the Models API does)
    max_tokens: int | None  # the output cap; None when unknown (no cap check)
    output_300k: bool  # OUTPUT_300K_BETA lifts the cap to OUTPUT_300K_CAP in batches
    snapshot: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def full_id(self) -> str:
        """The dated id when known (the API names it in its messages), else the base id."""
        return self.snapshot or self.id


def _parse_models(data: Mapping[str, Any]) -> tuple[ModelSpec, ...]:
    table = data.get("models")
    if not isinstance(table, dict):
        raise ValueError("models.toml: needs a [models.<id>] table per model")
    specs: list[ModelSpec] = []
    for model_id, entry in table.items():
        where = f"models.{model_id}"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"models.toml: {where} must be a table with a name")
        unknown = set(entry) - _MODEL_KEYS
        if unknown:
            raise ValueError(f"models.toml: {where} has unknown keys {sorted(unknown)}")
        cap = entry.get("max_tokens")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"models.toml: {where}.max_tokens must be a positive integer")
        aliases = entry.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise ValueError(f"models.toml: {where}.aliases must be a list of strings")
        specs.append(
            ModelSpec(
                id=model_id,
                display_name=entry["name"],
                created_at=str(entry.get("created_at", _EPOCH)),
                max_tokens=cap,
                output_300k=bool(entry.get("output_300k", False)),
                snapshot=entry.get("snapshot"),
                aliases=tuple(aliases),
            )
        )
    return tuple(specs)


@functools.cache
def models() -> tuple[ModelSpec, ...]:
    """Every model of ``data/models.toml``, in the file's order (newest first within a family)."""
    text = resources.files("batchd").joinpath("data", "models.toml").read_text(encoding="utf-8")
    return _parse_models(tomllib.loads(text))


@functools.cache
def _names() -> dict[str, ModelSpec]:
    names: dict[str, ModelSpec] = {}
    for spec in models():
        for name in (spec.id, *spec.aliases, *((spec.snapshot,) if spec.snapshot else ())):
            if name in names:
                raise ValueError(f"models.toml: {name!r} is listed twice")
            names[name] = spec
    return names


@functools.lru_cache(maxsize=512)  # called per request; the set of model strings seen is small
def model_spec(model: str) -> ModelSpec | None:
    """The model a name means: a base id, an alias, a snapshot, or a base id plus a date or ``-latest``."""
    names = _names()
    if model in names:
        return names[model]
    best: str | None = None
    for known in names:
        extends = model.startswith(known) and _SUFFIX.fullmatch(model, len(known))
        if extends and (best is None or len(known) > len(best)):
            best = known
    return names[best] if best is not None else None


def max_output_tokens(model: str, *, betas: Sequence[str] = (), in_batch: bool) -> int | None:
    """The largest ``max_tokens`` the API takes for ``model`` under these betas; None when not known."""
    spec = model_spec(model)
    if spec is None:
        return None
    if in_batch and spec.output_300k and OUTPUT_300K_BETA in betas:
        return OUTPUT_300K_CAP
    return spec.max_tokens


# --- the checks -----------------------------------------------------------------------------------------


def check_params(params: Mapping[str, object], *, betas: Sequence[str] = (), in_batch: bool) -> None:
    """Raise ParamError if the API would refuse these ``messages.create`` params.

    ``betas`` are the request's (or its batch's) ``anthropic-beta`` values: with any, the SDK's beta types
    decide which fields and blocks are known. ``in_batch`` adds what the batch docs refuse (``stream: true``,
    ``speed``, ``store``, ...) and allows the ``OUTPUT_300K_BETA`` output cap. Everything the API accepts
    passes; nothing is changed.
    """
    shape = _create_shape(bool(betas))
    if not isinstance(params, dict | Mapping):  # dict first: an ABC check costs more, per request
        raise ParamError("params: Input should be a valid dictionary")
    if in_batch and not _BATCH_CHECKED.isdisjoint(params):
        _check_batch_refusals(params)
    _check_keys(params, shape)
    model = _check_model(params)
    max_tokens = params.get("max_tokens")
    if max_tokens is None:
        raise ParamError("max_tokens: Field required")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise ParamError("max_tokens: Input should be a valid integer")
    if max_tokens < 1:
        raise ParamError("max_tokens: Input should be greater than or equal to 1")
    stream = params.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ParamError("stream: Input should be a valid boolean")
    _check_body(params, shape)
    _check_thinking_budget(params, max_tokens)
    cap = max_output_tokens(model, betas=betas, in_batch=in_batch)
    if cap is not None and max_tokens > cap:
        spec = model_spec(model)
        name = spec.full_id if spec is not None else model
        raise ParamError(
            f"max_tokens: {max_tokens} > {cap}, "
            f"which is the maximum allowed number of output tokens for {name}"
        )


def check_count_tokens_params(params: Mapping[str, object], *, betas: Sequence[str] = ()) -> None:
    """Raise ParamError if ``POST /v1/messages/count_tokens`` would refuse these params.

    The same checks as ``check_params`` outside a batch, against the SDK's count-tokens param types (which
    have no ``max_tokens``).
    """
    shape = _count_tokens_shape(bool(betas))
    if not isinstance(params, dict | Mapping):
        raise ParamError("params: Input should be a valid dictionary")
    _check_keys(params, shape)
    _check_model(params)
    _check_body(params, shape)


def _check_batch_refusals(params: Mapping[str, object]) -> None:
    if params.get("stream") is True:
        raise ParamError(_STREAM_IN_BATCH)
    for key, problem in BATCH_REFUSED_PARAMS.items():
        if params.get(key) is not None:
            raise ParamError(f"{key}: {problem}")
    if params.get(_RESEARCH_PREVIEW) == "active":
        raise ParamError(f"{_RESEARCH_PREVIEW}: research previews are not available in Message Batches")


def _check_keys(params: Mapping[str, object], shape: _Shape) -> None:
    if shape.body_params.issuperset(params):
        return
    for key, value in params.items():
        if key in LEGACY_SAMPLING_PARAMS and key not in shape.body_params:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ParamError(f"{key}: Input should be a valid number")
        elif key not in shape.body_params:
            raise ParamError(f"{key}: Extra inputs are not permitted")


def _check_model(params: Mapping[str, object]) -> str:
    model = params.get("model")
    if model is None:
        raise ParamError("model: Field required")
    if not isinstance(model, str) or not model:
        raise ParamError("model: Input should be a non-empty string")
    return model


def _check_body(params: Mapping[str, object], shape: _Shape) -> None:
    messages = params.get("messages")
    if messages is None:
        raise ParamError("messages: Field required")
    if not isinstance(messages, list):
        raise ParamError("messages: Input should be a valid list")
    if not messages:
        raise ParamError("messages: List should have at least 1 item after validation, not 0")
    has_user = False
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict):
            raise ParamError(f"{where}: Input should be a valid dictionary")
        role = message.get("role")
        if not isinstance(role, str) or role not in shape.roles:
            raise ParamError(f"{where}.role: Input should be {_alternatives(shape.roles)}")
        if "content" not in message:
            raise ParamError(f"{where}.content: Field required")
        _check_content(message["content"], f"{where}.content", shape.roles[role], shape)
        has_user = has_user or role == "user"
    if not has_user:
        raise ParamError("messages: at least one message must have role 'user'")

    system = params.get("system")
    if system is not None:
        _check_content(system, "system", shape.system_types, shape)
    tools = params.get("tools")
    if tools is not None:
        _check_tools(tools, shape)
    tool_choice = params.get("tool_choice")
    if tool_choice is not None:
        choice = _check_tagged(tool_choice, "tool_choice", shape.tool_choice_types)
        if choice == "tool" and not isinstance(_get(tool_choice, "name"), str):
            raise ParamError("tool_choice.tool.name: Field required")
    thinking = params.get("thinking")
    if thinking is not None:
        _check_tagged(thinking, "thinking", shape.thinking_types)


def _check_thinking_budget(params: Mapping[str, object], max_tokens: int) -> None:
    thinking = params.get("thinking")
    if not isinstance(thinking, dict) or thinking.get("type") != "enabled":
        return
    budget = thinking.get("budget_tokens")
    if budget is None:
        raise ParamError("thinking.enabled.budget_tokens: Field required")
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise ParamError("thinking.enabled.budget_tokens: Input should be a valid integer")
    if budget < _THINKING_MIN_BUDGET:
        raise ParamError(
            f"thinking.enabled.budget_tokens: Input should be greater than or equal to {_THINKING_MIN_BUDGET}"
        )
    if max_tokens <= budget:
        raise ParamError("max_tokens: must be greater than thinking.budget_tokens")


def _get(value: object, key: str) -> object:
    return value.get(key) if isinstance(value, dict) else None


def _alternatives(options: Iterable[str]) -> str:
    quoted = [repr(o) for o in options]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def _check_tagged(value: object, where: str, tags: frozenset[str]) -> str:
    """A member of a union discriminated by ``type``: an object whose ``type`` is one of ``tags``."""
    if not isinstance(value, dict):
        raise ParamError(f"{where}: Input should be a valid dictionary")
    tag = value.get("type")
    if tag is None:
        raise ParamError(f"{where}: Unable to extract tag using discriminator 'type'")
    if not isinstance(tag, str) or tag not in tags:
        raise ParamError(
            f"{where}: Input tag {tag!r} found using 'type' does not match any of the expected tags: "
            + ", ".join(repr(t) for t in sorted(tags))
        )
    return tag


def _check_content(content: object, where: str, types: frozenset[str], shape: _Shape) -> None:
    """A string, or a list of blocks whose types the SDK's union for this place knows."""
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise ParamError(f"{where}: Input should be a valid string or a list of content blocks")
    for j, block in enumerate(content):
        spot = f"{where}.{j}"
        tag = _check_tagged(block, spot, types)
        assert isinstance(block, dict)  # _check_tagged proved it
        if tag == "text" and not isinstance(block.get("text"), str):
            raise ParamError(f"{spot}.text: Input should be a valid string")
        if tag == "tool_result" and block.get("content") is not None:
            _check_content(block["content"], f"{spot}.content", shape.tool_result_types, shape)


def _check_tools(tools: object, shape: _Shape) -> None:
    if not isinstance(tools, list):
        raise ParamError("tools: Input should be a valid list")
    named = sorted(t for t in shape.tool_types if t is not None)
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict):
            raise ParamError(f"{where}: Input should be a valid dictionary")
        tag = tool.get("type")
        if tag not in shape.tool_types:
            raise ParamError(
                f"{where}: Input tag {tag!r} found using 'type' does not match any of the expected tags: "
                + ", ".join(repr(t) for t in named)
            )
        if tag is None or tag == "custom":
            if not isinstance(tool.get("name"), str):
                raise ParamError(f"{where}.custom.name: Field required")
            if not isinstance(tool.get("input_schema"), dict):
                raise ParamError(f"{where}.custom.input_schema: Field required")
