"""The Message Batches create body, built from the stored params bytes, and its exact size.

The accumulator counts bytes with ``item_size``/``body_size`` while it reads intake; the submit step builds
the body with ``stream_body``, a chunk of requests at a time (``build_body``: in one piece, for tests). All
use the same framing, so the byte trigger measures the real body.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence

__all__ = ["EMPTY_BODY_SIZE", "body_size", "build_body", "item_size", "stream_body"]

_OPEN = b'{"requests":['
_CLOSE = b"]}"
_ITEM_HEAD = b'{"custom_id":"'
_ITEM_MID = b'","params":'
_ITEM_TAIL = b"}"
_ITEM_OVERHEAD = len(_ITEM_HEAD) + len(_ITEM_MID) + len(_ITEM_TAIL)

EMPTY_BODY_SIZE = len(_OPEN) + len(_CLOSE)


def item_size(custom_id_len: int, params_len: int) -> int:
    """Bytes one request adds to the body, not counting the comma that separates it from the previous one."""
    return _ITEM_OVERHEAD + custom_id_len + params_len


def body_size(items: Iterable[tuple[int, int]]) -> int:
    """Exact size of build_body() for items given as (custom_id length, params length)."""
    total, count = EMPTY_BODY_SIZE, 0
    for cid_len, params_len in items:
        total += item_size(cid_len, params_len)
        count += 1
    return total + max(count - 1, 0)


def build_body(items: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Join (custom_id, params JSON) pairs into the create body without decoding the params.

    custom ids are batchd's own ([A-Za-z0-9_-]), so they need no JSON escaping.
    """
    parts = [_ITEM_HEAD + cid + _ITEM_MID + params + _ITEM_TAIL for cid, params in items]
    return _OPEN + b",".join(parts) + _CLOSE


async def stream_body(
    custom_ids: Sequence[bytes], params_chunks: AsyncIterable[Sequence[bytes]]
) -> AsyncIterator[bytes]:
    """``build_body`` one chunk of requests at a time: ``params_chunks`` yields the params of the next
    requests, in the order of ``custom_ids``. A 250 MB body is sent without ever being held whole."""
    yield _OPEN
    i = 0
    async for chunk in params_chunks:
        # One join of the pieces: each byte is copied once (concatenating per item copies it four times).
        pieces = [b","] if i else []
        for cid, params in zip(custom_ids[i : i + len(chunk)], chunk, strict=True):
            pieces += (_ITEM_HEAD, cid, _ITEM_MID, params, _ITEM_TAIL, b",")
        if chunk:
            pieces.pop()  # no comma after the chunk's last item
        yield b"".join(pieces)
        i += len(chunk)
    if i != len(custom_ids):
        raise ValueError(f"stream_body: {len(custom_ids)} custom ids but {i} params")
    yield _CLOSE
