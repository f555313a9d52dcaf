"""Results JSONL of an ended batch, rendered line by line while it streams (never whole in memory)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import orjson

from .answers import message_json
from .errors import envelope
from .ids import message_id
from .store import Batch, Outcome
from .table import Kind

__all__ = ["CHUNK_BYTES", "iter_chunks", "render_line", "result_order"]

CHUNK_BYTES = 64 * 1024

_SERVER_ERRORS = {
    Kind.API_ERROR: ("api_error", "Internal server error"),
    Kind.OVERLOADED: ("overloaded_error", "Overloaded"),
}


def result_order(batch: Batch) -> Iterator[int]:
    """Request indexes in download order: scrambled (the API promises no order) but the same every time.

    i -> (offset + i * stride) mod n with stride coprime to n visits every index once, needing no stored
    permutation; both numbers come from the batch id so each download of a batch agrees.
    """
    n = len(batch)
    seed = int.from_bytes(hashlib.blake2b(batch.id.encode(), digest_size=8).digest(), "big")
    stride = seed % n or 1
    while math.gcd(stride, n) != 1:
        stride += 1
    offset = (seed >> 32) % n
    for i in range(n):
        yield (offset + i * stride) % n


def render_line(batch: Batch, index: int, outcome: Outcome) -> bytes:
    """One results line, `\\n`-terminated: the SDK's decoder chokes on `\\r` and on blank lines."""
    table = batch.table
    kind = batch.kind(index, outcome)
    result: dict[str, object]
    if kind is Kind.SUCCEEDED:
        rich = table.rich.get(index)
        cache = table.cache_usage.get(index)
        message = message_json(
            message_id(batch.id, index),
            table.models[index],
            table.texts[index],
            table.input_tokens[index],
            table.output_tokens[index],
            "batch",
            content=rich[0] if rich else None,
            stop_reason=rich[1] if rich else "end_turn",
            cache_write_5m=cache.write_5m if cache else 0,
            cache_write_1h=cache.write_1h if cache else 0,
            cache_read=cache.read if cache else 0,
        )
        result = {"type": "succeeded", "message": message}
    elif kind is Kind.INVALID:
        result = {"type": "errored", "error": envelope("invalid_request_error", table.texts[index], None)}
    elif kind in _SERVER_ERRORS:
        error_type, text = _SERVER_ERRORS[kind]
        result = {"type": "errored", "error": envelope(error_type, text, None)}
    elif kind is Kind.CANCELED:
        result = {"type": "canceled"}
    else:
        result = {"type": "expired"}
    return orjson.dumps(
        {"custom_id": table.custom_ids[index], "result": result}, option=orjson.OPT_APPEND_NEWLINE
    )


def iter_chunks(batch: Batch, outcome: Outcome, cut: tuple[int, float] | None = None) -> Iterator[bytes]:
    """The body in chunks of about CHUNK_BYTES.

    With `cut = (line, fraction)` it stops part-way: after `line` whole lines and the first `fraction`
    of the next one, so the caller can drop the connection mid-stream.
    """
    pending: list[bytes] = []
    size = 0
    for position, index in enumerate(result_order(batch)):
        line = render_line(batch, index, outcome)
        if cut is not None and position == cut[0]:
            pending.append(line[: int(len(line) * cut[1])])
            break
        pending.append(line)
        size += len(line)
        if size >= CHUNK_BYTES:
            yield b"".join(pending)
            pending.clear()
            size = 0
    if pending:
        yield b"".join(pending)
