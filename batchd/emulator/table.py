"""A batch's requests kept compactly: the create body is parsed once, checked, and reduced to columns.

Nothing of the parsed params survives create: a 100,000-request, 256 MB batch keeps only its custom
ids, each answer's text (or error message), token counts and the fault drawn for it. The few answers that
are more than a text echo (tool calls, thinking, canned) and requests with a cache breakpoint get sparse
entries of their own.
"""

from __future__ import annotations

import contextlib
import gc
import mmap
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
    body: bytes | bytearray | mmap.mmap,
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


# The tokens that decide where one request of the body ends: a JSON string (escapes included) or a bracket.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]]')
_HEAD = re.compile(rb'\s*\{\s*"requests"\s*:\s*\[\s*')
_TAIL = re.compile(rb"\s*\]\s*\}\s*")
_SEPARATOR = re.compile(rb"\s*,\s*")
# Drop the requests already compiled from the front of the body every this many bytes (see _split_compile).
_RELEASE_BYTES = 16 * 1024 * 1024


def _request_bounds(body: bytearray | mmap.mmap) -> array[int] | None:
    """Where each request of a body shaped ``{"requests": [{...}, ...]}`` starts and ends (start, end,
    start, end, ...), found without parsing it; None for any other shape (or broken JSON structure), which
    the whole-body parse then reports as the API would."""
    head = _HEAD.match(body)
    if head is None:
        return None
    bounds, pos, size = array("q"), head.end(), len(body)
    if pos < size and body[pos] == 0x5D:  # "]": an empty list
        return bounds if _TAIL.fullmatch(body, pos) else None
    tokens = _TOKEN.finditer(body, pos)
    while True:
        if pos >= size or body[pos] != 0x7B:  # each request must be an object
            return None
        depth, start = 0, pos
        for token in tokens:
            char = body[token.start()]
            if char == 0x22:  # a string: skipped whole
                continue
            depth += 1 if char in (0x7B, 0x5B) else -1
            if depth == 0:
                pos = token.end()
                break
            if depth < 0:
                return None
        else:
            return None
        bounds.extend((start, pos))
        separator = _SEPARATOR.match(body, pos)
        if separator is not None:
            pos = separator.end()
            tokens = _TOKEN.finditer(body, pos)
            continue
        return bounds if _TAIL.fullmatch(body, pos) else None


def _compile(
    body: bytes | bytearray | mmap.mmap,
    errored_rate: float,
    expired_rate: float,
    rng: random.Random,
    betas: Sequence[str],
    canned: Sequence[CannedResponse],
) -> RequestTable:
    if isinstance(body, (bytearray, mmap.mmap)) and (bounds := _request_bounds(body)) is not None:
        return _split_compile(body, bounds, errored_rate, expired_rate, rng, betas, canned)
    try:
        # Any other shape is parsed whole (orjson reads no mmap: a copy, for this rare case).
        doc = orjson.loads(body[:] if isinstance(body, mmap.mmap) else body)
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

    compiler = _Compiler(errored_rate, expired_rate, rng, betas, canned)
    for i in range(len(requests)):
        entry = requests[i]
        # Drop each parsed entry as soon as it is reduced, so peak memory is the parsed body, not twice it.
        requests[i] = None
        compiler.add(entry, i)
    return compiler.table


def _split_compile(
    body: bytearray | mmap.mmap,
    bounds: array[int],
    errored_rate: float,
    expired_rate: float,
    rng: random.Random,
    betas: Sequence[str],
    canned: Sequence[CannedResponse],
) -> RequestTable:
    """Compile a body one request at a time, giving back the memory of what was compiled as it goes (the
    pages of a mapped body; the front of a bytearray): the peak is about the body plus its table, never
    the body plus all of it parsed (3-5x the body)."""
    count = len(bounds) // 2
    if not count:
        raise _bad("requests: List should have at least 1 item after validation, not 0")
    if count > MAX_REQUESTS:
        raise _bad(f"requests: List should have at most {MAX_REQUESTS} items after validation, not {count}")
    compiler = _Compiler(errored_rate, expired_rate, rng, betas, canned)
    dropped = 0  # bytes deleted from the front of a bytearray body / pages of a mapped one given back
    mapped = isinstance(body, mmap.mmap)
    for i in range(count):
        start, end = bounds[2 * i], bounds[2 * i + 1]
        if not mapped:
            start, end = start - dropped, end - dropped
        try:
            entry = orjson.loads(body[start:end])
        except orjson.JSONDecodeError as exc:
            raise _bad(f"Request body is not valid JSON: {exc}") from None
        compiler.add(entry, i)
        if mapped:
            done = end - end % mmap.PAGESIZE
            if done - dropped >= _RELEASE_BYTES:
                assert isinstance(body, mmap.mmap)
                body.madvise(mmap.MADV_DONTNEED, dropped, done - dropped)  # anonymous pages: freed at once
                dropped = done
        elif end >= _RELEASE_BYTES:
            # bytearray deletes from the front in place and gives the memory back as it shrinks.
            assert isinstance(body, bytearray)
            del body[:end]
            dropped += end
    return compiler.table


class _Compiler:
    """Reduces one parsed request after another to a row of the table."""

    def __init__(
        self,
        errored_rate: float,
        expired_rate: float,
        rng: random.Random,
        betas: Sequence[str],
        canned: Sequence[CannedResponse],
    ) -> None:
        self.table = RequestTable()
        self.seen: set[str] = set()
        # One model string object shared by every request naming it, instead of one copy per request.
        self.models: dict[str, str] = {}
        self.errored_rate, self.expired_rate, self.rng = errored_rate, expired_rate, rng
        self.betas, self.canned = betas, canned

    def add(self, entry: object, i: int) -> None:
        table, seen, models = self.table, self.seen, self.models
        errored_rate, expired_rate, rng = self.errored_rate, self.expired_rate, self.rng
        betas, canned = self.betas, self.canned
        custom_id = _custom_id(entry, i)
        if custom_id in seen:
            raise _bad(
                f"requests.{i}.custom_id: Duplicate custom_id {custom_id!r}; "
                "custom_ids must be unique within a batch"
            )
        seen.add(custom_id)
        assert isinstance(entry, dict)  # _custom_id proved it
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
            return
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
