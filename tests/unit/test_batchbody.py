"""The batch create body: built from stored bytes, and sized exactly before it is built."""

from __future__ import annotations

import asyncio
import string
from collections.abc import AsyncIterator, Sequence

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from batchd.batchbody import EMPTY_BODY_SIZE, body_size, build_body, item_size, stream_body

_CID_ALPHABET = string.ascii_letters + string.digits + "_-"
_CID = st.text(alphabet=_CID_ALPHABET, min_size=1, max_size=64)
_PARAMS = st.fixed_dictionaries(
    {
        "model": st.text(min_size=1, max_size=20),
        "max_tokens": st.integers(min_value=1, max_value=64_000),
        "messages": st.lists(
            st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": st.text()}),
            min_size=1,
            max_size=3,
        ),
    }
)
_ITEMS = st.lists(st.tuples(_CID, _PARAMS), max_size=20)


@settings(max_examples=200, deadline=None)
@given(_ITEMS)
def test_body_size_equals_the_built_body_length(items: list[tuple[str, dict[str, object]]]) -> None:
    encoded = [(cid.encode(), orjson.dumps(params)) for cid, params in items]
    body = build_body(encoded)
    assert body_size((len(cid), len(params)) for cid, params in encoded) == len(body)


@settings(max_examples=100, deadline=None)
@given(_ITEMS)
def test_built_body_is_the_create_request_json(items: list[tuple[str, dict[str, object]]]) -> None:
    body = build_body((cid.encode(), orjson.dumps(params)) for cid, params in items)
    parsed = orjson.loads(body)
    assert parsed == {"requests": [{"custom_id": cid, "params": params} for cid, params in items]}


def test_empty_body() -> None:
    assert build_body([]) == b'{"requests":[]}'
    assert body_size([]) == EMPTY_BODY_SIZE == len(b'{"requests":[]}')


def test_item_size_excludes_the_separating_comma() -> None:
    one = build_body([(b"a-1", b"{}")])
    two = build_body([(b"a-1", b"{}"), (b"b-1", b"{}")])
    assert len(one) == EMPTY_BODY_SIZE + item_size(3, 2)
    assert len(two) - len(one) == item_size(3, 2) + 1  # the item plus one comma


def test_params_bytes_are_embedded_verbatim() -> None:
    # Stored bytes go into the body as they are: no decode/re-encode (key order and spacing survive).
    params = b'{"z":1, "a":"\\u00e9"}'
    assert build_body([(b"r-1", params)]) == b'{"requests":[{"custom_id":"r-1","params":' + params + b"}]}"


@settings(max_examples=100, deadline=None)
@given(_ITEMS, st.integers(min_value=1, max_value=7))
def test_streamed_body_is_the_built_body(items: list[tuple[str, dict[str, object]]], chunk: int) -> None:
    encoded = [(cid.encode(), orjson.dumps(params)) for cid, params in items]

    async def chunks() -> AsyncIterator[Sequence[bytes]]:
        for start in range(0, len(encoded), chunk):
            yield [params for _, params in encoded[start : start + chunk]]

    async def streamed() -> bytes:
        return b"".join([part async for part in stream_body([cid for cid, _ in encoded], chunks())])

    assert asyncio.run(streamed()) == build_body(encoded)
