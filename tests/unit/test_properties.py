"""Properties, on fakeredis (with Lua), over thousands of generated inputs.

Submit: whatever a caller passes that is not a valid request raises an InvalidRequest subclass (never any
other exception) and writes nothing. Results: whatever a results line looks like, ``deliver_lines`` never
raises, counts the malformed ones, and still delivers the valid ones; and whatever sits in a result key,
``result()`` answers with a result or a batchd error, never another exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import string
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal
from typing import Any, TypeVar

import fakeredis
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from batchd import AsyncClient, BatchdError
from batchd.batches import Context, deliver_lines
from batchd.errors import InvalidParams, InvalidRequest, InvalidRequestId, RequestTooLarge
from batchd.settings import Settings, load_settings
from batchd.store import Keys, NewRequest, RequestState, Store
from batchd.validation import MAX_REQUEST_ID_LEN

T = TypeVar("T")
K = Keys()
MAX_BATCH_BYTES = 4096  # small, so "too large" needs only a few KB
PROPS = settings(
    max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
# Results lines: each example runs the deliver script per line (Lua in fakeredis), so fewer examples.
LINES_PROPS = settings(PROPS, max_examples=400)
VALID: dict[str, Any] = {
    "model": "claude-haiku-4-5",
    "max_tokens": 16,
    "messages": [{"role": "user", "content": "hi"}],
}
REQUIRED = ("model", "max_tokens", "messages")
RID_ALPHABET = string.ascii_letters + string.digits + "_-"
RID_RE = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_REQUEST_ID_LEN}}}")


class Loop:
    """One event loop for all the examples of a test: hypothesis calls the test body synchronously."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)  # type: ignore[arg-type]

    def close(self) -> None:
        self.loop.close()


@pytest.fixture
def loop() -> Iterator[Loop]:
    runner = Loop()
    try:
        yield runner
    finally:
        runner.close()


def make_test_settings() -> Settings:
    return load_settings(
        redis_url="redis://unused.invalid:1/0",
        anthropic_api_key="test-key",
        max_batch_bytes=MAX_BATCH_BYTES,
        max_queued_requests=1_000_000,
    )


# --- strategies: params --------------------------------------------------------------------------------
json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


class Opaque:
    """An application object that is not JSON."""


# Values orjson cannot serialise (it does serialise datetimes, UUIDs, dataclasses and tuples: not here).
not_json = st.one_of(
    st.binary(max_size=8),
    st.sets(st.integers(), max_size=3),
    st.frozensets(st.text(max_size=3), max_size=3),
    st.builds(object),
    st.builds(Opaque),
    st.complex_numbers(allow_nan=False, allow_infinity=False),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.integers(min_value=2**64, max_value=2**80),  # past JSON-as-int64
    st.dictionaries(st.integers(), st.integers(), min_size=1, max_size=2),  # non-string keys
    st.just(Decimal("1.5")),
    st.just(Ellipsis),
)
not_finite = st.sampled_from([math.nan, math.inf, -math.inf])


@st.composite
def with_value_inside(draw: st.DrawFn, value: st.SearchStrategy[Any]) -> dict[str, Any]:
    """VALID with ``value`` put at a drawn place: a new field, a message's content, deep in metadata."""
    bad = draw(value)
    where = draw(st.sampled_from(["field", "content", "deep", "max_tokens", "system-list"]))
    params = orjson.loads(orjson.dumps(VALID))
    if where == "field":
        params[draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in (*REQUIRED, "stream")))] = bad
    elif where == "content":
        params["messages"][0]["content"] = bad
    elif where == "deep":
        params["metadata"] = {"a": [1, {"b": [bad]}]}
    elif where == "max_tokens":
        params["max_tokens"] = bad
    else:
        params["system"] = [{"type": "text", "text": "s"}, bad]
    return params


@st.composite
def missing_fields(draw: st.DrawFn) -> dict[str, Any]:
    drop = draw(st.sets(st.sampled_from(REQUIRED), min_size=1))
    extra = draw(
        st.dictionaries(st.text(max_size=8).filter(lambda k: k not in REQUIRED), json_value, max_size=3)
    )
    params = {k: v for k, v in VALID.items() if k not in drop}
    params.update({k: v for k, v in extra.items() if k != "stream"})
    return params


truthy = st.one_of(
    st.just(True),
    st.integers(min_value=1),
    st.text(min_size=1, max_size=5),
    st.lists(json_leaf, min_size=1, max_size=2),
    st.dictionaries(st.text(max_size=3), json_leaf, min_size=1, max_size=2),
    st.floats(min_value=0.5, max_value=1e6),
)
streaming = truthy.map(lambda value: {**VALID, "stream": value})
too_large = st.integers(min_value=MAX_BATCH_BYTES, max_value=64 * 1024).map(
    lambda n: {**VALID, "messages": [{"role": "user", "content": "é" * (n // 2)}]}
)
non_mapping = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.lists(json_value, max_size=3),
    st.lists(st.tuples(st.sampled_from(REQUIRED), json_leaf), max_size=3),  # a list of pairs, not a dict
    st.tuples(json_leaf),
    st.sets(st.integers(), max_size=3),
    st.builds(Opaque),
    st.just(VALID.items()),
    st.just(list(VALID)),
)

# (strategy, the InvalidRequest subclass it must raise)
bad_params = st.one_of(
    non_mapping.map(lambda p: (p, InvalidParams)),
    missing_fields().map(lambda p: (p, InvalidParams)),
    streaming.map(lambda p: (p, InvalidParams)),
    with_value_inside(not_json).map(lambda p: (p, InvalidParams)),
    too_large.map(lambda p: (p, RequestTooLarge)),
)

# --- strategies: request ids ---------------------------------------------------------------------------
bad_rid_strings = st.one_of(
    st.text(max_size=80).filter(lambda s: not RID_RE.fullmatch(s)),  # unicode, spaces, punctuation, empty
    st.text(RID_ALPHABET, min_size=MAX_REQUEST_ID_LEN + 1, max_size=300),  # too long
    st.just(""),
    st.sampled_from(
        ["a b", "ré", "id\n", "\u0660", "\uff49\uff44", "a.b", "a/b", "a:1", "x" * 61, "\x00", "🙂"]
    ),
)
bad_rids = st.one_of(
    bad_rid_strings,
    st.integers(),
    st.binary(max_size=10),
    st.floats(),
    st.lists(st.text(RID_ALPHABET, min_size=1, max_size=3), max_size=2),
    st.builds(Opaque),
)


# --- the submit properties ------------------------------------------------------------------------------
async def _state(r: fakeredis.FakeAsyncRedis) -> tuple[int, int, int, list[bytes]]:
    snap = await Store(r, K).snapshot(dead_after_ms=10_000)
    return (await r.xlen(K.intake), snap.pending_requests, snap.pending_bytes, sorted(await r.keys("*")))


def _client(loop: Loop) -> tuple[AsyncClient, fakeredis.FakeAsyncRedis, tuple[Any, ...]]:
    redis = fakeredis.FakeAsyncRedis()
    client = AsyncClient(settings=make_test_settings(), redis=redis)

    async def seed() -> tuple[Any, ...]:
        # Something queued already, so "nothing written" is checked against a live stream and stats.
        await client.submit_many([VALID, VALID], ["seed-1", "seed-2"])
        return await _state(redis)

    return client, redis, loop.run(seed())


def _check_refused(
    loop: Loop,
    client: AsyncClient,
    redis: fakeredis.FakeAsyncRedis,
    before: tuple[Any, ...],
    call: Callable[[], Awaitable[Any]],
    expected: type[InvalidRequest],
) -> None:
    with pytest.raises(InvalidRequest) as info:  # anything else (TypeError, ValueError...) fails the test
        loop.run(call())
    assert isinstance(info.value, expected), repr(info.value)
    assert str(info.value)
    assert loop.run(_state(redis)) == before, "a refused submit wrote something"


def test_submit_refuses_malformed_params_with_invalid_request_and_writes_nothing(loop: Loop) -> None:
    client, redis, before = _client(loop)

    @PROPS
    @given(case=bad_params, index=st.integers(0, 3), n_good=st.integers(0, 3))
    def check(case: tuple[Any, type[InvalidRequest]], index: int, n_good: int) -> None:
        bad, expected = case
        _check_refused(loop, client, redis, before, lambda: client.submit(bad), expected)
        _check_refused(loop, client, redis, before, lambda: client.submit(bad, "caller-id"), expected)
        # One bad request among good ones: the whole call is refused, the good ones are not queued either.
        batch = [VALID] * n_good
        batch.insert(min(index, n_good), bad)
        _check_refused(loop, client, redis, before, lambda: client.submit_many(batch), expected)

    try:
        check()
    finally:
        loop.run(client.close())


def test_submit_refuses_non_finite_numbers(loop: Loop) -> None:
    # orjson writes NaN and +-Infinity as null: accepting them would send the API a different request than
    # the caller made (a temperature of NaN silently becomes "no temperature").
    client, redis, before = _client(loop)

    @settings(max_examples=50, deadline=None)
    @given(params=with_value_inside(not_finite))
    def check(params: dict[str, Any]) -> None:
        _check_refused(loop, client, redis, before, lambda: client.submit(params), InvalidParams)

    try:
        check()
    finally:
        loop.run(client.close())


def test_submit_refuses_malformed_request_ids_with_invalid_request_id_and_writes_nothing(loop: Loop) -> None:
    client, redis, before = _client(loop)

    @PROPS
    @given(rid=bad_rids, n=st.integers(1, 4), data=st.data())
    def check(rid: Any, n: int, data: st.DataObject) -> None:
        _check_refused(loop, client, redis, before, lambda: client.submit(VALID, rid), InvalidRequestId)
        good_ids = data.draw(
            st.lists(st.text(RID_ALPHABET, min_size=1, max_size=10), min_size=n - 1, max_size=n - 1)
        )
        ids: list[Any] = list(good_ids)
        ids.insert(data.draw(st.integers(0, n - 1)), rid)
        _check_refused(
            loop, client, redis, before, lambda: client.submit_many([VALID] * n, ids), InvalidRequestId
        )
        # None inside submit_many's ids is not "make one up": it is a bad id too.
        _check_refused(
            loop,
            client,
            redis,
            before,
            lambda: client.submit_many([VALID, VALID], ["ok", None]),
            InvalidRequestId,
        )
        # As many ids as requests, or nothing is written.
        _check_refused(
            loop,
            client,
            redis,
            before,
            lambda: client.submit_many([VALID] * (n + 1), [f"r{i}" for i in range(n)]),
            InvalidParams,
        )

    try:
        check()
    finally:
        loop.run(client.close())


# --- the results path -----------------------------------------------------------------------------------
KNOWN = [f"known{i}" for i in range(4)]
FID = "f1"


def message(text: str) -> dict[str, Any]:
    return {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-haiku-4-5",
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 2},
    }


def succeeded(custom_id: Any, text: str = "ok") -> dict[str, Any]:
    return {"custom_id": custom_id, "result": {"type": "succeeded", "message": message(text)}}


def errored(custom_id: Any, error_type: str = "invalid_request_error") -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "result": {
            "type": "errored",
            "error": {
                "type": "error",
                "error": {"type": error_type, "message": "bad"},
                "request_id": "req_1",
            },
        },
    }


# Valid lines: a known request, its current attempt, a final result (no retry), any text (unicode too).
valid_line = st.builds(
    lambda rid, text, kind: orjson.dumps(succeeded(f"{rid}-1", text) if kind else errored(f"{rid}-1")),
    st.sampled_from(KNOWN),
    st.text(max_size=30),
    st.booleans(),
)

# custom_ids batchd never makes. Wrapped in otherwise valid lines.
bad_custom_id = st.one_of(
    st.sampled_from(KNOWN),  # no attempt
    st.sampled_from([f"{KNOWN[0]}-", "-1", f"{KNOWN[0]}-x", f"{KNOWN[0]}-1.0", f"{KNOWN[0]}- 1"]),
    st.sampled_from([f"{KNOWN[0]}-\uff11", f"{KNOWN[0]}-\u00b2", f"{KNOWN[0]}-\u0661"]),  # non-ASCII digits
    st.sampled_from(["kn own0-1", "ré-1", "a.b-1", "x" * (MAX_REQUEST_ID_LEN + 1) + "-1", "🙂-1"]),
    st.builds(lambda t: t + "-1", st.text(max_size=70).filter(lambda s: not RID_RE.fullmatch(s))),
    st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), st.booleans()),
    st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=2),
)
known_cid = st.sampled_from([f"{rid}-1" for rid in KNOWN])
not_a_dict = json_value.filter(lambda v: not isinstance(v, dict))
unknown_type = st.text(max_size=12).filter(lambda t: t not in ("succeeded", "errored", "canceled", "expired"))


@st.composite
def wrong_shape(draw: st.DrawFn) -> bytes:
    """A line for a known request's current attempt whose result is not a results line's result."""
    cid = draw(known_cid)
    kind = draw(st.integers(0, 10))
    if kind == 0:
        obj: Any = draw(not_a_dict)
    elif kind == 1:
        obj = {"custom_id": cid}
    elif kind == 2:
        obj = {"custom_id": cid, "result": draw(not_a_dict)}
    elif kind == 3:
        obj = {"custom_id": cid, "result": {"message": message("no type")}}
    elif kind == 4:
        obj = {
            "custom_id": cid,
            "result": {
                "type": draw(
                    st.one_of(st.none(), st.integers(-9, 9), st.lists(st.text(max_size=3), max_size=2))
                )
            },
        }
    elif kind == 5:
        obj = {"custom_id": cid, "result": {"type": draw(unknown_type), "message": message("odd")}}
    elif kind == 6:
        obj = {"custom_id": cid, "result": {"type": "succeeded"}}
    elif kind == 7:
        obj = {"custom_id": cid, "result": {"type": "succeeded", "message": draw(not_a_dict)}}
    elif kind == 8:
        obj = {"custom_id": cid, "result": {"type": "errored"}}
    elif kind == 9:
        obj = {
            "custom_id": cid,
            "result": {"type": "errored", "error": {"type": "error", "error": draw(not_a_dict)}},
        }
    else:
        inner = draw(
            st.one_of(st.none(), st.integers(0, 9), st.lists(st.integers(0, 9), max_size=2), st.just({}))
        )
        obj = {
            "custom_id": cid,
            "result": {"type": "errored", "error": {"type": "error", "error": {"type": inner}}},
        }
    return orjson.dumps(obj)


@st.composite
def truncated(draw: st.DrawFn) -> bytes:
    whole = orjson.dumps(succeeded(draw(known_cid), draw(st.text(max_size=20))))
    return whole[: draw(st.integers(0, len(whole) - 1))]


@st.composite
def broken_utf8(draw: st.DrawFn) -> bytes:
    whole = orjson.dumps(succeeded(draw(known_cid), "text"))
    at = whole.index(b'"text"') + 2
    return whole[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"])) + whole[at:]


malformed_line = st.one_of(
    st.binary(max_size=120),
    truncated(),
    wrong_shape(),
    broken_utf8(),
    bad_custom_id.map(lambda cid: orjson.dumps(succeeded(cid))),
    st.text(max_size=60).map(lambda s: s.encode()),
)
lines_case = st.lists(
    st.one_of(valid_line.map(lambda b: (True, b)), malformed_line.map(lambda b: (False, b))), max_size=16
)


class _Unused:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"deliver_lines must not touch the API or the scheduler ({name})")


async def _reset_known(store: Store) -> None:
    """Every KNOWN request queued, read and committed into flush FID: waiting for its results line."""
    await store.redis.flushall()
    await store.intake.ensure_group()
    await store.scripts.enqueue(
        [NewRequest(rid, b"{}") for rid in KNOWN],
        now_ms=1_700_000_000_000,
        max_requests=10**9,
        max_bytes=10**12,
    )
    entries = await store.intake.read_new("c1", count=len(KNOWN), block_ms=None)
    await store.scripts.commit_flush(
        FID, [e.entry_id for e in entries], [e.rid for e in entries], now_ms=1_700_000_000_000
    )


def test_deliver_lines_never_raises_counts_malformed_and_delivers_the_rest(loop: Loop) -> None:
    redis = fakeredis.FakeAsyncRedis()
    store = Store(redis, K)
    ctx = Context(store, make_test_settings(), _Unused(), _Unused())  # type: ignore[arg-type]

    @LINES_PROPS
    @given(case=lines_case)
    @example(
        case=[
            (False, orjson.dumps(succeeded(f"{KNOWN[0]}-\uff11"))),
            (True, orjson.dumps(succeeded(f"{KNOWN[1]}-1"))),
        ]
    )
    @example(case=[(False, orjson.dumps({"custom_id": f"{KNOWN[0]}-1", "result": {"type": "succeeded"}}))])
    @example(case=[(False, orjson.dumps({"custom_id": f"{KNOWN[0]}-1", "result": {"type": "bogus"}}))])
    @example(
        case=[
            (
                False,
                orjson.dumps(
                    errored(f"{KNOWN[0]}-1")
                    | {"result": {"type": "errored", "error": {"error": {"type": []}}}}
                ),
            )
        ]
    )
    def check(case: list[tuple[bool, bytes]]) -> None:
        loop.run(_reset_known(store))
        tally = loop.run(deliver_lines(ctx, [line for _, line in case]))  # must not raise

        valid = [line for ok, line in case if ok]
        first: dict[str, bytes] = {}
        for line in valid:
            first.setdefault(orjson.loads(line)["custom_id"].rsplit("-", 1)[0], line)
        assert tally["malformed"] == sum(not ok for ok, _ in case), tally
        assert tally["delivered"] == len(first), tally
        assert tally["duplicate"] == len(valid) - len(first), tally
        assert tally["requeued"] == tally["stale"] == 0, tally

        async def outcome() -> tuple[list[bytes | None], dict[str, RequestState | None], int]:
            results = await store.result_lines(KNOWN)
            return results, await store.request_states(KNOWN), await redis.xlen(K.intake)

        results, states, intake = loop.run(outcome())
        for rid, result in zip(KNOWN, results, strict=True):
            # Each valid request got its first line; nothing malformed answered (or requeued) anyone.
            assert result == first.get(rid), rid
            assert states[rid] == (RequestState.DONE if rid in first else RequestState.FLUSHED), rid
        assert intake == 0

    try:
        check()
    finally:
        loop.run(redis.aclose())


stored_line = st.one_of(
    valid_line,
    malformed_line,
    st.builds(lambda t: orjson.dumps(errored(f"{KNOWN[0]}-1", t)), st.text(max_size=20)),
    st.sampled_from([orjson.dumps(errored(f"{KNOWN[0]}-1", "request_too_large"))]),
)


def test_result_answers_a_result_or_a_batchd_error_whatever_the_stored_line(loop: Loop) -> None:
    # A line already in a result key (delivered by this or an older daemon, or by _fail_flush with an error
    # type the SDK's model does not list, such as request_too_large on a 413) must not crash the caller with
    # a pydantic ValidationError or an orjson error: the caller catches BatchdError.
    redis = fakeredis.FakeAsyncRedis()
    client = AsyncClient(settings=make_test_settings(), redis=redis)
    rid = KNOWN[0]

    @LINES_PROPS
    @given(line=stored_line)
    @example(line=orjson.dumps(errored(f"{rid}-1", "request_too_large")))
    @example(line=orjson.dumps({"custom_id": f"{rid}-1", "result": {"type": "succeeded"}}))
    def check(line: bytes) -> None:
        loop.run(redis.set(K.result(rid), line))
        for call in (lambda: client.result(rid, timeout=1), lambda: client.peek(rid)):
            with contextlib.suppress(BatchdError):  # anything else fails the test
                loop.run(call())

    try:
        check()
    finally:
        loop.run(client.close())
