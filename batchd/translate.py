"""The one translation core of the ways in (the HTTP front, the drop-in SDK transport): pure, no I/O.

Inbound: an Anthropic ``POST /v1/messages`` HTTP request (method, path, headers, body bytes) becomes an
``ApiRequest``: the batch ``params`` (the body minus ``stream``), their compact JSON bytes, and everything
the headers say that must travel with the request (betas, API version, workspace and user-profile ids, the
idempotency key) or that batchd itself reads (``batchd-route``, ``batchd-deadline``, ``batchd-tags``,
``Prefer: respond-async``). A bad body or header raises ``ApiError``: an HTTP status, the API's error type
and a message, rendered in the API's error envelope.

Outbound: a stored results line (``{"custom_id", "result"}``) becomes the ``Answer`` the Messages API would
have given: 200 with the Message for ``succeeded``; the error envelope with the status of its
``error.type`` for ``errored``; 410 for ``canceled``; 529 for ``expired`` (docs/front.md says why). Lines
are read leniently, as the SDK reads them: unknown fields and block types pass through untouched.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson

from .errors import (
    BatchdError,
    BudgetExceeded,
    InvalidRequest,
    QueueFull,
    RedisUnavailable,
    RequestNotFound,
    RequestTooLarge,
)
from .tags import MAX_TAGS, TAG_KEY, TAG_RULES, TAG_VALUE
from .validation import MAX_REQUEST_ID_LEN

__all__ = [
    "ERROR_STATUS",
    "MAX_BODY_BYTES",
    "ROUTES",
    "Answer",
    "ApiError",
    "ApiRequest",
    "Route",
    "Validator",
    "answer_from_line",
    "api_error_for",
    "error_envelope",
    "is_messages_path",
    "parse_request",
    "request_id_for_key",
]

Route = Literal["batch", "realtime", "auto"]
# validate(params, betas): raise ValueError (e.g. batchd.apispec.ParamError) or ApiError to refuse.
Validator = Callable[[Mapping[str, Any], tuple[str, ...]], None]

# The Messages API's own request size limit (a batch may be bigger, one request may not).
MAX_BODY_BYTES = 32 * 1024 * 1024

# error.type -> HTTP status, as the Messages API answers them.
ERROR_STATUS: dict[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "conflict_error": 409,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
_UNKNOWN_ERROR_STATUS = 500
CANCELED_STATUS = 410
EXPIRED_STATUS = 529

# Headers that apply to a whole batch and so must travel with the request (issue 12 groups batches by them).
BATCH_HEADERS = ("anthropic-workspace-id", "anthropic-user-profile-id")
_BATCHD_HEADERS = frozenset({"batchd-route", "batchd-deadline", "batchd-tags"})
ROUTES: tuple[Route, ...] = ("batch", "realtime", "auto")

_BETA = re.compile(r"[A-Za-z0-9_.-]{1,100}")
_HEADER_VALUE = re.compile(r"[\x21-\x7e]{1,255}")  # visible ASCII: ids, versions, keys
_REQUEST_ID = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_REQUEST_ID_LEN}}}")
MAX_IDEMPOTENCY_KEY_LEN = 255


class ApiError(BatchdError):
    """An answer in the API's error shape: ``status``, ``error_type`` (the API's), ``message``.

    ``headers`` are extra response headers (``retry-after``, ``x-should-retry``).
    """

    def __init__(
        self,
        status: int,
        error_type: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        envelope: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})
        # The API's own envelope when there is one (an errored result), kept whole (details and all).
        self._envelope = dict(envelope) if envelope is not None else None

    def envelope(self, request_id: str | None) -> dict[str, Any]:
        if self._envelope is not None:
            body = dict(self._envelope)
            if body.get("request_id") is None:
                body["request_id"] = request_id
            return body
        return error_envelope(self.error_type, self.message, request_id)

    def body(self, request_id: str | None) -> bytes:
        return orjson.dumps(self.envelope(request_id))

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.error_type!r}, {self.message!r})"


def error_envelope(error_type: str, message: str, request_id: str | None) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}, "request_id": request_id}


def _invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_request_error", message)


@dataclass(frozen=True, slots=True)
class ApiRequest:
    """One Messages request, as batchd stores and routes it.

    ``params`` is the batch ``params`` object (the body without ``stream``) and ``body`` its compact JSON
    bytes (stored and sent as they are). ``headers`` are the per-batch headers (lower-case names) that must
    be sent with the batch create. ``request_id`` is the batchd id an ``Idempotency-Key`` maps to (else
    None: the backend mints one). ``deadline`` is a Unix time.
    """

    params: Mapping[str, Any]
    body: bytes
    stream: bool = False
    betas: tuple[str, ...] = ()
    anthropic_version: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    idempotency_key: str | None = None
    request_id: str | None = None
    route: Route = "batch"
    deadline: float | None = None
    tags: tuple[tuple[str, str], ...] = ()
    respond_async: bool = False

    def fingerprint(self) -> str:
        """A digest of what the API would see: params, betas, version and per-batch headers.

        Equal fingerprints mean the same request (used to recognise a client's retry, and for coalescing).
        """
        digest = hashlib.sha256(self.body)
        for part in (self.betas, (self.anthropic_version or "",), self.headers):
            digest.update(b"\0" + orjson.dumps(part))
        return digest.hexdigest()


def is_messages_path(path: str) -> bool:
    """Whether a URL path (query allowed) is the Messages create endpoint, under any base-URL prefix."""
    return urlsplit(path).path.rstrip("/").endswith("/v1/messages")


def request_id_for_key(key: str) -> str:
    """The batchd request id for an ``Idempotency-Key``: the key itself when it is a valid id
    (``[A-Za-z0-9_-]{1,60}``, e.g. the SDKs' UUID-based keys), else ``k_`` + a SHA-256 of it, so the same key
    always maps to the same request and a retry reattaches."""
    if _REQUEST_ID.fullmatch(key):
        return key
    digest = base64.urlsafe_b64encode(hashlib.sha256(key.encode()).digest()).decode().rstrip("=")
    return "k_" + digest


def parse_request(
    method: str,
    path: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    *,
    validate: Validator | None = None,
    now: float | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> ApiRequest:
    """An Anthropic ``POST /v1/messages`` request -> ``ApiRequest``; ApiError (400, 404, 413) if it is bad.

    ``headers`` are (name, value) pairs, repeats allowed (``anthropic-beta`` may repeat). ``validate`` is
    called with the params and betas after the built-in checks; it refuses by raising ValueError (its
    message becomes the 400's) or ApiError.
    """
    if method.upper() != "POST" or not is_messages_path(path):
        raise ApiError(404, "not_found_error", f"{method.upper()} {urlsplit(path).path}: no such endpoint")
    if len(body) > max_body_bytes:
        raise ApiError(
            413, "request_too_large", f"request body is {len(body)} bytes; the limit is {max_body_bytes}"
        )
    grouped = _group_headers(headers)
    params = _parse_body(body)
    stream = params.pop("stream", False)
    if not isinstance(stream, bool):
        raise _invalid("stream: Input should be a valid boolean")
    _check_params(params)
    betas = _betas(grouped.get("anthropic-beta", []))
    version = _single(grouped, "anthropic-version")
    if version is None:
        raise _invalid("anthropic-version: header is required")
    batch_headers = tuple(
        (name, value) for name in BATCH_HEADERS if (value := _single(grouped, name)) is not None
    )
    key = _single(grouped, "idempotency-key", limit=MAX_IDEMPOTENCY_KEY_LEN)
    unknown = sorted(name for name in grouped if name.startswith("batchd-") and name not in _BATCHD_HEADERS)
    if unknown:
        raise _invalid(f"{unknown[0]}: unknown batchd header (known: {', '.join(sorted(_BATCHD_HEADERS))})")
    route, deadline = _route(grouped, time.time() if now is None else now)
    tags = _tags(grouped.get("batchd-tags", []))
    prefer = {token.strip().lower() for value in grouped.get("prefer", []) for token in value.split(",")}
    if validate is not None:
        try:
            validate(params, betas)
        except ApiError:
            raise
        except ValueError as exc:
            raise _invalid(str(exc)) from None
    return ApiRequest(
        params=params,
        body=orjson.dumps(params),
        stream=stream,
        betas=betas,
        anthropic_version=version,
        headers=batch_headers,
        idempotency_key=key,
        request_id=None if key is None else request_id_for_key(key),
        route=route,
        deadline=deadline,
        tags=tags,
        respond_async="respond-async" in prefer,
    )


def _group_headers(headers: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for name, value in headers:
        grouped.setdefault(name.lower(), []).append(value)
    return grouped


def _single(grouped: Mapping[str, list[str]], name: str, *, limit: int = 255) -> str | None:
    values = grouped.get(name)
    if not values:
        return None
    if len(values) > 1 and len(set(values)) > 1:
        raise _invalid(f"{name}: header given {len(values)} times with different values")
    value = values[0].strip()
    if len(value) > limit or not _HEADER_VALUE.fullmatch(value):
        raise _invalid(f"{name}: must be 1-{limit} visible ASCII characters")
    return value


def _parse_body(body: bytes) -> dict[str, Any]:
    try:
        params = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _invalid(f"request body is not valid JSON: {exc}") from None
    if not isinstance(params, dict):
        raise _invalid("request body must be a JSON object")
    return params


def _check_params(params: Mapping[str, Any]) -> None:
    """The checks every way in makes whatever validator is installed: the three required fields."""
    model = params.get("model")
    if model is None:
        raise _invalid("model: Field required")
    if not isinstance(model, str) or not model:
        raise _invalid("model: Input should be a non-empty string")
    max_tokens = params.get("max_tokens")
    if max_tokens is None:
        raise _invalid("max_tokens: Field required")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise _invalid("max_tokens: Input should be a valid integer")
    if max_tokens < 1:
        raise _invalid("max_tokens: Input should be greater than or equal to 1")
    messages = params.get("messages")
    if messages is None:
        raise _invalid("messages: Field required")
    if not isinstance(messages, list):
        raise _invalid("messages: Input should be a valid list")
    if not messages:
        raise _invalid("messages: List should have at least 1 item after validation, not 0")


def _betas(values: list[str]) -> tuple[str, ...]:
    """``anthropic-beta`` values (comma-joined, maybe repeated) -> unique names in first-seen order."""
    seen: dict[str, None] = {}
    for value in values:
        for name in value.split(","):
            name = name.strip()
            if not name:
                continue
            if not _BETA.fullmatch(name):
                raise _invalid(f"anthropic-beta: {name[:40]!r} is not a beta name")
            seen.setdefault(name, None)
    return tuple(seen)


def _route(grouped: Mapping[str, list[str]], now: float) -> tuple[Route, float | None]:
    raw_route = _single(grouped, "batchd-route")
    raw_deadline = _single(grouped, "batchd-deadline")
    deadline = None if raw_deadline is None else _deadline(raw_deadline, now)
    if raw_route is None:
        return ("auto" if deadline is not None else "batch"), deadline
    route = raw_route.lower()
    if route not in ROUTES:
        raise _invalid(f"batchd-route: {raw_route!r} is not one of batch, realtime, auto")
    if route == "auto" and deadline is None:
        raise _invalid("batchd-route: auto needs a batchd-deadline")
    if route != "auto" and deadline is not None:
        raise _invalid(f"batchd-deadline: applies to batchd-route auto, not {route}")
    return route, deadline


def _deadline(raw: str, now: float) -> float:
    """Seconds from now (``"900"``, ``"1.5"``) or an RFC 3339 time with a zone -> a future Unix time."""
    try:
        seconds: float | None = float(raw)
    except ValueError:
        seconds = None
    if seconds is None:
        try:
            when = datetime.fromisoformat(raw)
        except ValueError:
            raise _invalid(
                f"batchd-deadline: {raw!r} is neither seconds from now nor an RFC 3339 time"
            ) from None
        if when.tzinfo is None:
            raise _invalid("batchd-deadline: an RFC 3339 time needs a zone (Z or +hh:mm)")
        at = when.timestamp()
    else:
        if not math.isfinite(seconds) or seconds <= 0:
            raise _invalid("batchd-deadline: seconds from now must be a positive number")
        at = now + seconds
    if at <= now:
        raise _invalid(f"batchd-deadline: {raw!r} has already passed")
    return at


def _tags(values: list[str]) -> tuple[tuple[str, str], ...]:
    tags: dict[str, str] = {}
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, tag_value = item.partition("=")
            key, tag_value = key.strip(), tag_value.strip()
            if not sep or not TAG_KEY.fullmatch(key) or not TAG_VALUE.fullmatch(tag_value):
                raise _invalid(f"batchd-tags: {item[:80]!r} is not key=value ({TAG_RULES})")
            if key in tags:
                raise _invalid(f"batchd-tags: {key!r} given twice")
            tags[key] = tag_value
    if len(tags) > MAX_TAGS:
        raise _invalid(f"batchd-tags: {len(tags)} tags; at most {MAX_TAGS}")
    return tuple(tags.items())


# --- results line -> HTTP answer -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """The HTTP answer for a results line. ``message`` is the Message (for SSE) when it succeeded, else
    ``error`` says what to send. ``body`` is the JSON body of a non-streaming answer."""

    status: int
    body: bytes
    message: dict[str, Any] | None = None
    error: ApiError | None = None

    @property
    def headers(self) -> dict[str, str]:
        # A stored result is final for its request id: an SDK retry (same idempotency key) would get the
        # same answer again, so tell SDKs not to burn their retries on it (docs/front.md).
        extra = self.error.headers if self.error is not None else {}
        return {"x-should-retry": "false", **extra}


def answer_from_line(line: bytes, request_id: str) -> Answer:
    """The Messages API's answer for a stored results line ``{"custom_id", "result"}``."""
    try:
        record = orjson.loads(line)
        result = record["result"]
        kind = result["type"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return _error_answer(
            ApiError(500, "api_error", f"batchd holds a result for {request_id} that it cannot read"),
            request_id,
        )
    if kind == "succeeded":
        message = result.get("message")
        if not isinstance(message, dict):
            return _error_answer(
                ApiError(500, "api_error", f"result of {request_id} succeeded without a message"), request_id
            )
        return Answer(200, orjson.dumps(message), message=message)
    if kind == "errored":
        return _error_answer(_errored(result.get("error"), request_id), request_id)
    if kind == "canceled":
        return _error_answer(
            ApiError(
                CANCELED_STATUS,
                "invalid_request_error",
                f"request {request_id} was canceled before the API answered it",
            ),
            request_id,
        )
    if kind == "expired":
        return _error_answer(
            ApiError(
                EXPIRED_STATUS,
                "overloaded_error",
                f"request {request_id} expired: the API did not process it in time, on every attempt; "
                "send it again",
            ),
            request_id,
        )
    return _error_answer(
        ApiError(500, "api_error", f"result of {request_id} has unknown type {str(kind)[:40]!r}"), request_id
    )


def _errored(envelope: object, request_id: str) -> ApiError:
    inner = envelope.get("error") if isinstance(envelope, dict) else None
    if not isinstance(envelope, dict) or not isinstance(inner, dict):
        return ApiError(500, "api_error", f"result of {request_id} errored without an error object")
    error_type = str(inner.get("type") or "api_error")
    message = str(inner.get("message") or error_type)
    status = ERROR_STATUS.get(error_type, _UNKNOWN_ERROR_STATUS)
    return ApiError(status, error_type, message, envelope=envelope)


def _error_answer(error: ApiError, request_id: str) -> Answer:
    return Answer(error.status, error.body(request_id), error=error)


def api_error_for(exc: BaseException) -> ApiError:
    """The answer for an exception raised by a Backend (or the translation itself).

    ApiError passes as it is; batchd's own errors map to the API's shapes; anything else is a 500.
    """
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestNotFound):
        return ApiError(404, "not_found_error", str(exc))
    if isinstance(exc, RequestTooLarge):
        return ApiError(413, "request_too_large", str(exc))
    if isinstance(exc, InvalidRequest):
        return _invalid(str(exc))
    if isinstance(exc, BudgetExceeded):
        # A day's budget frees at the next UTC midnight; an SDK that retries at once would only be refused
        # again (and pay nothing), so it is told not to.
        now = time.time()
        until = int(86_400 - now % 86_400) + 1
        return ApiError(
            429, "rate_limit_error", str(exc), headers={"retry-after": str(until), "x-should-retry": "false"}
        )
    if isinstance(exc, QueueFull):
        return ApiError(429, "rate_limit_error", str(exc), headers={"retry-after": "1"})
    if isinstance(exc, RedisUnavailable):
        return ApiError(
            503, "api_error", f"batchd's queue is unavailable: {exc}", headers={"retry-after": "1"}
        )
    return ApiError(500, "api_error", f"batchd: internal error ({type(exc).__name__})")
