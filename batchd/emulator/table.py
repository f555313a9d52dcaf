"""A batch's requests kept compactly: the create body is parsed once, checked, and reduced to columns.

Nothing of the parsed params survives create: a 100,000-request, 256 MB batch keeps only its custom
ids, each answer's text (or error message), token counts and the fault drawn for it. The few answers that
are more than a text echo (tool calls, thinking, canned) and requests with a cache breakpoint get sparse
entries of their own.
"""

from __future__ import annotations

import contextlib
import gc
import random
import re
from array import array
from collections.abc import Iterator, Sequence
from enum import IntEnum

import orjson

from .answers import CannedResponse, ParamError, answer
from .cache import CacheKey, CacheUsage
from .errors import ApiError

__all__ = ["MAX_REQUESTS", "Kind", "RequestTable", "compile_batch"]

MAX_REQUESTS = 100_000
_CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")


class Kind(IntEnum):
    """How one request ends. The first five are decided at create; the last two by the batch's fate."""

    SUCCEEDED = 0
    INVALID = 1  # errored: invalid_request_error (params checks)
    API_ERROR = 2  # errored: api_error (fault)
    OVERLOADED = 3  # errored: overloaded_error (fault)
    EXPIRED = 4  # expired (fault, or the batch hit its expiry first)
    CANCELED = 5  # canceled (the batch was canceled before the request was processed)


class RequestTable:
    """Column-wise storage (one list/array per field) costs a pointer or a few bytes per request."""

    __slots__ = (
        "cache_keys",
        "cache_usage",
        "custom_ids",
        "input_tokens",
        "kinds",
        "models",
        "output_tokens",
        "rich",
        "texts",
    )

    def __init__(self) -> None:
        self.custom_ids: list[str] = []
        self.kinds = bytearray()
        # Echo text for SUCCEEDED, the error message for INVALID, "" otherwise.
        self.texts: list[str] = []
        self.models: list[str] = []
        # Uncached input tokens (the cache lookup at create moves the prefix's share to cache_usage).
        self.input_tokens = array("L")
        self.output_tokens = array("L")
        # Sparse: index -> (content blocks, stop_reason) for answers that are not a plain text echo.
        self.rich: dict[int, tuple[list[dict[str, object]], str]] = {}
        # Sparse: index -> the request's cacheable prefix; filled at compile, used once the batch exists.
        self.cache_keys: dict[int, CacheKey] = {}
        # Sparse: index -> what the cache lookup decided (writes, reads).
        self.cache_usage: dict[int, CacheUsage] = {}

    def __len__(self) -> int:
        return len(self.custom_ids)

    def append(
        self, custom_id: str, kind: Kind, text: str, model: str, tokens_in: int, tokens_out: int
    ) -> None:
        self.custom_ids.append(custom_id)
        self.kinds.append(kind)
        self.texts.append(text)
        self.models.append(model)
        self.input_tokens.append(tokens_in)
        self.output_tokens.append(tokens_out)


def _bad(message: str) -> ApiError:
    return ApiError(400, "invalid_request_error", message)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    # A parsed body is ~10 containers per request; the cyclic GC would rescan them again and again
    # (it more than doubles the parse time). Nothing here makes cycles, so pausing it is safe.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def compile_batch(
    body: bytes | bytearray,
    *,
    errored_rate: float,
    expired_rate: float,
    rng: random.Random,
    betas: Sequence[str] = (),
    canned: Sequence[CannedResponse] = (),
) -> RequestTable:
    """Validate a create body and reduce it to a RequestTable; raises ApiError(400) on a bad batch.

    Params are checked (against the batch's `betas`) but a failure does not reject the batch, as the API
    defers that to results: a bad request becomes an INVALID row.
    """
    with _gc_paused():
        return _compile(body, errored_rate, expired_rate, rng, betas, canned)


def _compile(
    body: bytes | bytearray,
    errored_rate: float,
    expired_rate: float,
    rng: random.Random,
    betas: Sequence[str],
    canned: Sequence[CannedResponse],
) -> RequestTable:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"Request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _bad("Request body should be a JSON object")
    requests = doc.pop("requests", None)
    del doc
    if requests is None:
        raise _bad("requests: Field required")
    if not isinstance(requests, list):
        raise _bad("requests: Input should be a valid list")
    if not requests:
        raise _bad("requests: List should have at least 1 item after validation, not 0")
    if len(requests) > MAX_REQUESTS:
        raise _bad(
            f"requests: List should have at most {MAX_REQUESTS} items after validation, not {len(requests)}"
        )

    table = RequestTable()
    seen: set[str] = set()
    # One model string object shared by every request naming it, instead of one copy per request.
    models: dict[str, str] = {}
    for i in range(len(requests)):
        entry = requests[i]
        # Drop each parsed entry as soon as it is reduced, so peak memory is the parsed body, not twice it.
        requests[i] = None
        custom_id = _custom_id(entry, i)
        if custom_id in seen:
            raise _bad(
                f"requests.{i}.custom_id: Duplicate custom_id {custom_id!r}; "
                "custom_ids must be unique within a batch"
            )
        seen.add(custom_id)
        params = entry.get("params")
        if params is None:
            raise _bad(f"requests.{i}.params: Field required")
        if not isinstance(params, dict):
            raise _bad(f"requests.{i}.params: Input should be a valid dictionary")
        # Always draw, so a request's fault does not depend on whether earlier ones were valid.
        draw = rng.random()
        try:
            ans = answer(params, betas=betas, in_batch=True, canned=canned)
        except ParamError as exc:
            table.append(custom_id, Kind.INVALID, str(exc), "", 0, 0)
            continue
        model = models.setdefault(ans.model, ans.model)
        if draw < errored_rate:
            # Half and half between the two server-side error types, decided by the same draw.
            kind = Kind.API_ERROR if draw < errored_rate / 2 else Kind.OVERLOADED
            table.append(custom_id, kind, "", model, 0, 0)
        elif draw < errored_rate + expired_rate:
            table.append(custom_id, Kind.EXPIRED, "", model, 0, 0)
        else:
            if ans.content is not None:
                table.rich[len(table)] = (ans.content, ans.stop_reason)
            if ans.cache is not None:
                table.cache_keys[len(table)] = ans.cache
            table.append(custom_id, Kind.SUCCEEDED, ans.text, model, ans.input_tokens, ans.output_tokens)
    return table


def _custom_id(entry: object, i: int) -> str:
    if not isinstance(entry, dict):
        raise _bad(f"requests.{i}: Input should be a valid dictionary")
    custom_id = entry.get("custom_id")
    if custom_id is None:
        raise _bad(f"requests.{i}.custom_id: Field required")
    if not isinstance(custom_id, str):
        raise _bad(f"requests.{i}.custom_id: Input should be a valid string")
    if not custom_id:
        raise _bad(f"requests.{i}.custom_id: String should have at least 1 character")
    if len(custom_id) > 64:
        raise _bad(f"requests.{i}.custom_id: String should have at most 64 characters")
    if not _CUSTOM_ID.fullmatch(custom_id):
        raise _bad(f"requests.{i}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'")
    return custom_id
