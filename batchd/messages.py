"""``client.messages`` and ``client.beta.messages`` on batchd's own clients: the SDK's ``create``, answered at
batch prices.

The keyword arguments are the SDK's (plus batchd's own ``tags`` and ``dedupe``), normalised by the SDK
itself (its own request preparation dumps the pydantic blocks of a previous response passed back in a tool
loop, reads files, drops NOT_GIVEN), so batchd queues exactly the body the SDK would send. ``betas``, the
API version, the workspace and the user profile are the batch's headers (``BatchHeaders``), never body
fields. Results are read as the SDK's own decoder reads them: validated when they validate (its first
choice, here without trying every variant of each union), else leniently, so a block type the installed
SDK does not know still reaches the caller.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple, Union

import orjson
import pydantic
from anthropic._models import construct_type_unchecked
from anthropic._utils._prepare import async_prepare_request_data
from anthropic.types import Message
from anthropic.types.beta import BetaMessage
from anthropic.types.beta.messages import BetaMessageBatchIndividualResponse
from anthropic.types.messages import MessageBatchIndividualResponse, MessageBatchResult

from .errors import (
    InvalidParams,
    RequestCanceled,
    RequestErrored,
    RequestExpired,
    RequestFailed,
    ResultTimeout,
)
from .routing import RouteName
from .store import BatchHeaders
from .tags import TagSet, parse_tags

if TYPE_CHECKING:
    from .client import AsyncClient

__all__ = [
    "AsyncBeta",
    "AsyncBetaMessages",
    "AsyncMessages",
    "PreparedCall",
    "parse_result",
    "prepare_call",
    "raise_for_result",
]

# Keyword arguments of the SDK's create that are not params: the HTTP call's own.
_CALL_KWARGS = frozenset({"extra_headers", "extra_query", "extra_body", "timeout"})
_HEADER_KWARGS = {"workspace_id": "anthropic-workspace-id", "user_profile_id": "anthropic-user-profile-id"}


@dataclass(frozen=True, slots=True)
class PreparedCall:
    params: dict[str, Any]
    headers: BatchHeaders
    timeout: float | None
    tags: TagSet = field(default_factory=TagSet)
    dedupe: bool | None = None  # None: the client's default
    route: RouteName | None = None  # None: auto with a deadline, else batch (routing.plan)
    deadline: float | datetime | None = None


def _given(value: object) -> bool:
    return type(value).__name__ not in {"NotGiven", "Omit"}


async def prepare_call(kwargs: Mapping[str, Any], *, default_timeout: float | None) -> PreparedCall:
    """An SDK ``messages.create`` call's keyword arguments -> batch params, batch headers and the wait, and
    batchd's own ``tags`` (cost ledger and budgets), ``dedupe``, ``route`` and ``deadline``.

    Raises InvalidParams for what a batch cannot carry (stream, extra query parameters) and for bad tags."""
    call = {k: v for k, v in kwargs.items() if _given(v)}
    tags = parse_tags(call.pop("tags", None))
    dedupe = call.pop("dedupe", None)
    route = call.pop("route", None)
    deadline = call.pop("deadline", None)
    if dedupe is not None and not isinstance(dedupe, bool):
        raise InvalidParams(f"dedupe must be True or False, not {dedupe!r}")
    timeout = call.pop("timeout", default_timeout)
    if timeout is not None and not isinstance(timeout, int | float):
        raise InvalidParams(f"timeout must be a number of seconds (the wait for the answer), not {timeout!r}")
    extra_query = call.pop("extra_query", None)
    if extra_query:
        raise InvalidParams("extra_query cannot be sent with a batch request")
    extra_headers = {k.lower(): v for k, v in (call.pop("extra_headers", None) or {}).items() if _given(v)}
    extra_body = call.pop("extra_body", None) or {}
    betas: list[str] = list(call.pop("betas", None) or ())
    header = {name: str(call.pop(kw)) for kw, name in _HEADER_KWARGS.items() if call.get(kw) is not None}
    if call.get("stream"):
        raise InvalidParams("stream=True: batchd's client answers whole messages; drop stream")
    call.pop("stream", None)
    params = _plain_copy(call)
    if params is None:
        params = await async_prepare_request_data(call, location="body")
    if not isinstance(params, dict):
        raise InvalidParams("messages.create takes keyword arguments")
    params.update(extra_body)
    beta_header = extra_headers.get("anthropic-beta")
    if beta_header:
        betas += [b.strip() for b in str(beta_header).split(",") if b.strip()]
    headers = BatchHeaders(
        betas=tuple(sorted(set(betas))),
        anthropic_version=extra_headers.get("anthropic-version"),
        workspace_id=header.get("anthropic-workspace-id") or extra_headers.get("anthropic-workspace-id"),
        user_profile_id=header.get("anthropic-user-profile-id")
        or extra_headers.get("anthropic-user-profile-id"),
    )
    wait = None if timeout is None else float(timeout)
    return PreparedCall(params, headers, wait, tags, dedupe, route, deadline)


class _Decoder(NamedTuple):
    """Validators for a results line's parts, each union dispatched on its ``type`` by pydantic-core."""

    result: pydantic.TypeAdapter[Any]
    message: type[pydantic.BaseModel]
    blocks: pydantic.TypeAdapter[list[Any]]


def _tagged(annotation: Any) -> Any:
    """The SDK's union in ``annotation`` (under ``List[...]`` / ``Annotated[...]``) as a union pydantic
    dispatches on ``type``: the SDK marks its unions with its own discriminator, which pydantic ignores, so
    it would try every variant of a block (~50 us a block)."""
    while typing.get_origin(annotation) in (list, Annotated):
        annotation = typing.get_args(annotation)[0]
    return Annotated[Union[typing.get_args(annotation)], pydantic.Discriminator("type")]  # noqa: UP007


@functools.cache
def _decoder(beta: bool) -> _Decoder | None:
    """None if the installed SDK's unions cannot be dispatched on ``type`` (then every line takes the
    SDK's own path)."""
    response, message = (
        (BetaMessageBatchIndividualResponse, BetaMessage)
        if beta
        else (MessageBatchIndividualResponse, Message)
    )
    try:
        return _Decoder(
            pydantic.TypeAdapter(_tagged(response.model_fields["result"].annotation)),
            message,
            pydantic.TypeAdapter(list[_tagged(message.model_fields["content"].annotation)]),  # type: ignore[misc,arg-type]
        )
    except (pydantic.PydanticUserError, KeyError, TypeError):
        return None


def _validated(obj: Any, beta: bool) -> Any:
    """The line's result as the SDK's decoder builds it when it validates (the decoder's first choice:
    pydantic's validation of the result union), or None if it does not (then the SDK's lenient build is
    the answer). Each union part is validated as the one variant its ``type`` names, which is what
    pydantic picks when it tries them all: the same objects, without the tries. ``obj`` is not changed."""
    result = obj.get("result") if isinstance(obj, dict) else None
    decoder = _decoder(beta)
    if not isinstance(result, dict) or decoder is None:
        return None
    try:
        message = result.get("message")
        if (
            result.get("type") == "succeeded"
            and isinstance(message, dict)
            and isinstance(message.get("content"), list)
        ):
            content = decoder.blocks.validate_python(message["content"])
            result = {**result, "message": decoder.message.model_validate({**message, "content": content})}
        return decoder.result.validate_python(result)
    except (ValueError, TypeError):  # pydantic.ValidationError is a ValueError
        return None


# orjson refuses (TypeError) dates, dataclasses and subclasses of str, int, dict and list with these, as it
# does pydantic models, files, NotGiven and sets: the things the SDK's preparation transforms.
_PLAIN_JSON = (
    orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def _plain_copy(call: dict[str, Any]) -> dict[str, Any] | None:
    """A copy of ``call`` if it is plain JSON data (dicts, lists, strings, numbers, booleans): equal to what
    the SDK's preparation returns for it, which transforms nothing in such data, at a quarter of the cost.
    None for anything else, which the SDK prepares."""
    try:
        raw = orjson.dumps(call, option=_PLAIN_JSON)
    except TypeError:
        return None
    if b"null" in raw:  # None, or a NaN or infinity (which orjson writes as null) that the checks refuse
        return None
    copy: dict[str, Any] = orjson.loads(raw)
    # Not equal if orjson wrote something the SDK keeps as it is (a tuple as a list, an enum as its value;
    # a str or int enum is equal to its value, and sent as it either way).
    return copy if copy == call else None


def parse_result(request_id: str, line: bytes, *, beta: bool = False) -> Any:
    """A stored results line as the SDK's result type, built as leniently as the SDK's own decoder does
    (unknown block types and fields are kept, not refused)."""
    try:
        obj = orjson.loads(line)
        result = _validated(obj, beta)
        if result is None:
            kind = BetaMessageBatchIndividualResponse if beta else MessageBatchIndividualResponse
            response: Any = construct_type_unchecked(value=obj, type_=kind)
            result = response.result
        _ = result.type  # a line without a result type is unreadable, not a result
    except (ValueError, AttributeError, TypeError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise RequestFailed(
            request_id, f"request {request_id!r} has a result batchd cannot read: {reason}"
        ) from None
    return result


def raise_for_result(request_id: str, result: Any) -> Any:
    """The message of a succeeded result, or the typed batchd error for any other result."""
    kind = getattr(result, "type", None)
    if kind == "succeeded":
        return result.message
    if kind == "errored":
        error = getattr(getattr(result, "error", None), "error", None)
        raise RequestErrored(
            request_id, str(getattr(error, "type", "api_error")), str(getattr(error, "message", ""))
        )
    if kind == "canceled":
        raise RequestCanceled(request_id)
    if kind == "expired":
        raise RequestExpired(request_id)
    raise RequestFailed(request_id, f"request {request_id!r} ended with an unknown result type {kind!r}")


async def _create(
    client: AsyncClient, kwargs: Mapping[str, Any], *, beta: bool, default_timeout: float | None
) -> Any:
    rid, timeout = await _submit(client, kwargs, default_timeout)
    line = await client.result_line(rid, timeout)
    if line is None:
        raise ResultTimeout(rid, timeout if timeout is not None else float("inf"))
    return raise_for_result(rid, parse_result(rid, line, beta=beta))


async def _submit(
    client: AsyncClient, kwargs: Mapping[str, Any], default_timeout: float | None
) -> tuple[str, float | None]:
    """Queue the call: its request id and how long to wait. The prepared call is not kept while waiting
    (thousands of waiting callers are that many fewer objects for every pass of Python's GC)."""
    call = await prepare_call(kwargs, default_timeout=default_timeout)
    rid = await client.submit(
        call.params,
        headers=call.headers,
        tags=call.tags,
        dedupe=call.dedupe,
        route=call.route,
        deadline=call.deadline,
    )
    return rid, call.timeout


class AsyncMessages:
    """``client.messages``: the SDK's ``messages.create`` (no streaming), answered at batch prices."""

    def __init__(self, client: AsyncClient, default_timeout: float | None) -> None:
        self._client = client
        self._default_timeout = default_timeout

    async def create(self, **kwargs: Any) -> Message:
        """The SDK's keyword arguments (``timeout`` is how long to wait for the answer), and batchd's
        ``tags={"team": "search"}``, ``dedupe=True/False``, ``route`` and ``deadline`` (see
        AsyncClient.submit). Returns the SDK's
        Message; raises RequestErrored/RequestCanceled/RequestExpired when the request ends without one,
        ResultTimeout (with the request id, to collect it later) when ``timeout`` passes first, and
        BudgetExceeded when its estimate would pass a daily budget."""
        message: Message = await _create(
            self._client, kwargs, beta=False, default_timeout=self._default_timeout
        )
        return message


class AsyncBetaMessages:
    """``client.beta.messages``: as the SDK's, with ``betas=[...]``; returns the SDK's BetaMessage."""

    def __init__(self, client: AsyncClient, default_timeout: float | None) -> None:
        self._client = client
        self._default_timeout = default_timeout

    async def create(self, **kwargs: Any) -> BetaMessage:
        message: BetaMessage = await _create(
            self._client, kwargs, beta=True, default_timeout=self._default_timeout
        )
        return message


class AsyncBeta:
    def __init__(self, client: AsyncClient, default_timeout: float | None) -> None:
        self.messages = AsyncBetaMessages(client, default_timeout)


def result_of(request_id: str, line: bytes) -> MessageBatchResult:
    """A stored line as the SDK's (non-beta) result type, read leniently."""
    result: MessageBatchResult = parse_result(request_id, line)
    return result
