"""Checks made at submit, before anything is written: a bad request fails here, in the caller's process."""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Mapping
from functools import cache

import orjson

from .batchbody import EMPTY_BODY_SIZE, item_size
from .errors import InvalidParams, InvalidRequestId, RequestTooLarge
from .store import custom_id_for

__all__ = ["MAX_REQUEST_ID_LEN", "encode_params", "new_request_id", "validate_request_id"]

# custom_id allows 64 characters; batchd appends "-<attempt>" (up to 3 characters with max_attempts <= 20).
MAX_REQUEST_ID_LEN = 60
_RID_RE = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_REQUEST_ID_LEN}}}")
_REQUIRED = ("model", "max_tokens", "messages")


def new_request_id() -> str:
    """22 URL-safe random characters: unguessable, and inside the custom_id alphabet."""
    return secrets.token_urlsafe(16)


def validate_request_id(request_id: object) -> str:
    if not isinstance(request_id, str) or not _RID_RE.fullmatch(request_id):
        raise InvalidRequestId(
            f"request id {request_id!r} must be 1-{MAX_REQUEST_ID_LEN} characters of [A-Za-z0-9_-]"
        )
    return request_id


def encode_params(params: object, *, max_batch_bytes: int, max_attempts: int = 3) -> bytes:
    """Validate Messages create params and return them as compact JSON bytes (stored and sent as they are)."""
    if not isinstance(params, dict | Mapping):  # dict first: an ABC check costs more, per request
        raise InvalidParams(
            f"params must be a mapping of Messages create arguments, not {type(params).__name__}"
        )
    if not ("model" in params and "max_tokens" in params and "messages" in params):
        missing = [name for name in _REQUIRED if name not in params]
        raise InvalidParams(f"params lack required field(s): {', '.join(missing)}")
    if params.get("stream"):
        raise InvalidParams("params ask for stream=True; batches cannot stream: drop 'stream'")
    try:
        body = orjson.dumps(params)
    except TypeError as exc:
        raise InvalidParams(f"params do not serialise to JSON: {exc}") from None
    # orjson writes NaN and +-Infinity as null; a null in the output is the only sign one was there.
    if b"null" in body and _has_non_finite(params):
        raise InvalidParams("params contain NaN or Infinity, which JSON cannot carry")
    if len(body) + _envelope(max_attempts) > max_batch_bytes:
        raise RequestTooLarge(
            f"request is {len(body)} bytes; a batch may hold at most {max_batch_bytes} bytes "
            "(BATCHD_MAX_BATCH_BYTES) including the envelope"
        )
    return body


@cache
def _envelope(max_attempts: int) -> int:
    """The bytes a batch of this request alone adds to its params, with the largest custom id it can have
    (on its last attempt)."""
    return EMPTY_BODY_SIZE + item_size(len(custom_id_for("x" * MAX_REQUEST_ID_LEN, max_attempts)), 0)


def _has_non_finite(value: object) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return True
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return False
