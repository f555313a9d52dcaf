"""The emulator's pure parts: answers, the create-body table, the batch lifecycle, results rendering."""

from __future__ import annotations

import mmap
import random
from typing import Any

import orjson
import pytest

from batchd.emulator import table as table_module
from batchd.emulator.answers import ParamError, answer, count_tokens, prompt_tokens
from batchd.emulator.cache import CacheKey, CacheUsage, PromptCache
from batchd.emulator.config import EmulatorConfig
from batchd.emulator.errors import ApiError
from batchd.emulator.ids import message_id, rfc3339
from batchd.emulator.limits import RpmLimiter
from batchd.emulator.results import iter_chunks, result_order
from batchd.emulator.store import BatchStore
from batchd.emulator.table import Kind, RequestTable, compile_batch

STREAMING = "stream: Message Batches requests cannot be streamed"


def params(text: Any = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": text}], **extra}


def body(*requests: Any) -> bytes:
    return orjson.dumps({"requests": list(requests)})


def compile_(*requests: Any, errored_rate: float = 0.0, expired_rate: float = 0.0) -> RequestTable:
    return compile_batch(
        body(*requests), errored_rate=errored_rate, expired_rate=expired_rate, rng=random.Random(0)
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


# --- answers --------------------------------------------------------------------------------------


def test_count_tokens_is_a_quarter_of_the_characters_rounded_up_never_zero() -> None:
    assert [count_tokens(n) for n in (0, 1, 4, 5, 8, 9)] == [1, 1, 1, 2, 2, 3]


def test_answer_echoes_the_last_user_message() -> None:
    ans = answer(
        {
            "model": "claude-x",
            "max_tokens": 1,
            "system": [{"type": "text", "text": "sys"}],
            "messages": [
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": [{"type": "text", "text": "reply"}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "a"},
                        {"type": "image", "source": {}},
                        {"type": "text", "text": "b"},
                    ],
                },
            ],
        },
        in_batch=True,
    )
    assert ans.text == "echo: ab"
    assert ans.model == "claude-x"
    assert ans.input_tokens == count_tokens(len("sys") + len("first") + len("reply") + len("ab"))
    assert ans.output_tokens == count_tokens(len("echo: ab"))


@pytest.mark.parametrize(
    ("bad", "start"),
    [
        ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, "model: Field required"),
        ({"model": 3, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, "model:"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens: Field required"),
        (params(max_tokens=0), "max_tokens: Input should be greater than or equal to 1"),
        (params(max_tokens=True), "max_tokens: Input should be a valid integer"),
        (params(max_tokens=2.5), "max_tokens: Input should be a valid integer"),
        (params(stream=True), STREAMING),
        ({"model": "m", "max_tokens": 5}, "messages: Field required"),
        ({"model": "m", "max_tokens": 5, "messages": []}, "messages: List should have at least 1 item"),
        ({"model": "m", "max_tokens": 5, "messages": {}}, "messages: Input should be a valid list"),
        (
            {"model": "m", "max_tokens": 5, "messages": ["x"]},
            "messages.0: Input should be a valid dictionary",
        ),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "bot", "content": "x"}]}, "messages.0.role"),
        (
            {"model": "m", "max_tokens": 5, "messages": [{"role": "user"}]},
            "messages.0.content: Field required",
        ),
        (params(7), "messages.0.content:"),
        (params([{"type": "text"}]), "messages.0.content.0.text"),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "assistant", "content": "x"}]}, "messages:"),
    ],
)
def test_answer_rejects_bad_params(bad: dict[str, Any], start: str) -> None:
    with pytest.raises(ParamError) as info:
        answer(bad, in_batch=True)
    assert str(info.value).startswith(start)


def test_stream_false_is_fine() -> None:
    assert answer(params(stream=False), in_batch=True).text == "echo: hi"


# --- create body -> table -------------------------------------------------------------------------


def test_compile_keeps_only_compact_columns() -> None:
    table = compile_({"custom_id": "a", "params": params("x")}, {"custom_id": "b", "params": {"model": "m"}})
    assert table.custom_ids == ["a", "b"]
    assert list(table.kinds) == [Kind.SUCCEEDED, Kind.INVALID]
    assert table.texts == ["echo: x", "max_tokens: Field required"]


def test_compile_shares_one_string_per_model() -> None:
    requests = [{"custom_id": f"r{i}", "params": params()} for i in range(3)]
    table = compile_(*requests)
    assert table.models[0] is table.models[1] is table.models[2]


@pytest.mark.parametrize(
    ("raw", "start"),
    [
        (b"{", "Request body is not valid JSON"),
        (b"[]", "Request body should be a JSON object"),
        (b'{"requests": null}', "requests: Field required"),
        (b'{"requests": []}', "requests: List should have at least 1 item"),
        (b'{"requests": [1]}', "requests.0: Input should be a valid dictionary"),
        (
            b'{"requests": [{"custom_id": 5, "params": {}}]}',
            "requests.0.custom_id: Input should be a valid string",
        ),
        (
            b'{"requests": [{"custom_id": "", "params": {}}]}',
            "requests.0.custom_id: String should have at least 1",
        ),
        (b'{"requests": [{"custom_id": "a\\n", "params": {}}]}', "requests.0.custom_id: String should match"),
    ],
)
@pytest.mark.parametrize("buffer", ["bytes", "bytearray", "mmap"])
def test_compile_rejects_bad_bodies(raw: bytes, start: str, buffer: str) -> None:
    with pytest.raises(ApiError) as info:
        compile_batch(as_buffer(raw, buffer), errored_rate=0, expired_rate=0, rng=random.Random(0))
    assert info.value.status == 400 and info.value.error_type == "invalid_request_error"
    assert info.value.message.startswith(start)


def as_buffer(raw: bytes, kind: str) -> bytes | bytearray | mmap.mmap:
    """A create body as the emulator may hold it: bytes (parsed whole), a bytearray or a mapped buffer
    (compiled one request at a time)."""
    if kind == "bytes":
        return raw
    if kind == "bytearray":
        return bytearray(raw)
    mapped = mmap.mmap(-1, max(1, len(raw)))
    mapped[: len(raw)] = raw
    return mapped if len(raw) else mmap.mmap(-1, 1)


TRICKY = [
    {"custom_id": "a", "params": params('braces } { ] [ and "quotes" and \\ backslashes')},
    {"custom_id": "b", "params": params("unicode: \u00e9\u4e2d \U0001f600", system="s")},
    {"custom_id": "c", "params": params([{"type": "text", "text": "}]},{"}])},
    {"custom_id": "d", "params": {"model": "m", "max_tokens": 5, "messages": []}},  # invalid: a row
]


@pytest.mark.parametrize("buffer", ["bytearray", "mmap"])
@pytest.mark.parametrize("indent", [False, True])
def test_compiling_request_by_request_gives_the_whole_parse_table(
    buffer: str, indent: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Memory is given back every few bytes here, so the release path runs on a small body too.
    monkeypatch.setattr(table_module, "_RELEASE_BYTES", 64)
    raw = orjson.dumps({"requests": TRICKY}, option=orjson.OPT_INDENT_2 if indent else 0)
    whole = compile_batch(raw, errored_rate=0.3, expired_rate=0.2, rng=random.Random(4))
    split = compile_batch(as_buffer(raw, buffer), errored_rate=0.3, expired_rate=0.2, rng=random.Random(4))
    for column in ("custom_ids", "kinds", "texts", "models", "input_tokens", "output_tokens", "rich"):
        assert getattr(split, column) == getattr(whole, column), column


def test_a_request_that_is_not_json_inside_the_list_is_a_bad_body() -> None:
    raw = b'{"requests": [{"custom_id": "a", "params": {"model": tru}}]}'
    with pytest.raises(ApiError) as info:
        compile_batch(bytearray(raw), errored_rate=0, expired_rate=0, rng=random.Random(0))
    assert info.value.message.startswith("Request body is not valid JSON")


def test_compile_fault_draws_follow_the_rates() -> None:
    requests = [{"custom_id": f"r{i}", "params": params()} for i in range(2000)]
    table = compile_(*requests, errored_rate=0.2, expired_rate=0.1)
    kinds = table.kinds
    errored = kinds.count(Kind.API_ERROR) + kinds.count(Kind.OVERLOADED)
    assert 300 < errored < 500
    assert 120 < kinds.count(Kind.EXPIRED) < 280
    assert kinds.count(Kind.API_ERROR) > 0 and kinds.count(Kind.OVERLOADED) > 0


# --- lifecycle ------------------------------------------------------------------------------------


def make_store(n: int = 10, **knobs: Any) -> tuple[BatchStore, Clock, Any]:
    clock = Clock()
    store = BatchStore(clock)
    config = EmulatorConfig(**knobs)
    batch = store.add(compile_(*[{"custom_id": f"r{i}", "params": params()} for i in range(n)]), config)
    return store, clock, batch


def test_batch_runs_then_ends_at_created_plus_processing_seconds() -> None:
    _, clock, batch = make_store(processing_seconds=10)
    assert batch.status(clock()) == "in_progress"
    clock.now += 9.99
    assert batch.to_json(clock(), "http://e")["request_counts"]["processing"] == 10
    clock.now += 0.02
    data = batch.to_json(clock(), "http://e")
    assert data["processing_status"] == "ended"
    assert data["ended_at"] == rfc3339(batch.created + 10)
    assert data["request_counts"]["succeeded"] == 10
    assert data["results_url"] == f"http://e/v1/messages/batches/{batch.id}/results"


def test_config_changes_do_not_move_a_running_batch() -> None:
    clock = Clock()
    store = BatchStore(clock)
    config = EmulatorConfig(processing_seconds=10)
    batch = store.add(compile_({"custom_id": "a", "params": params()}), config)
    config.update({"processing_seconds": 0})
    assert batch.status(clock()) == "in_progress"


def test_cancel_midway_keeps_processed_requests_and_cancels_the_rest() -> None:
    _, clock, batch = make_store(n=10, processing_seconds=10)
    clock.now += 4.05  # requests 0..3 done (each takes 1 s of the 10)
    assert batch.cancel(clock(), cancel_seconds=0.9)
    assert batch.status(clock()) == "canceling"
    assert not batch.cancel(clock(), cancel_seconds=0.0)  # a second cancel changes nothing
    clock.now += 1
    outcome = batch.outcome(clock())
    assert outcome is not None
    assert outcome.counts == {"processing": 0, "succeeded": 4, "errored": 0, "canceled": 6, "expired": 0}
    assert batch.kind(3, outcome) is Kind.SUCCEEDED and batch.kind(4, outcome) is Kind.CANCELED
    assert not batch.cancel(clock(), cancel_seconds=0.0)


def test_expiry_midway_expires_the_rest() -> None:
    _, clock, batch = make_store(n=4, processing_seconds=8, expiry_seconds=4)
    clock.now += 4
    outcome = batch.outcome(clock())
    assert outcome is not None and outcome.tail is Kind.EXPIRED
    assert outcome.counts["succeeded"] == 2 and outcome.counts["expired"] == 2


def test_delete_requires_an_ended_batch_and_keeps_the_cursor() -> None:
    store, clock, batch = make_store(processing_seconds=1)
    with pytest.raises(ApiError) as info:
        store.delete(batch)
    assert info.value.status == 400
    clock.now += 2
    store.delete(batch)
    with pytest.raises(ApiError) as info:
        store.lookup(batch.id)
    assert info.value.status == 404
    assert store.page(10, batch.id, None) == ([], False)  # still usable as a cursor


def test_transient_404_window() -> None:
    store, clock, batch = make_store(transient_404_seconds=1)
    with pytest.raises(ApiError):
        store.lookup(batch.id)
    clock.now += 1
    assert store.lookup(batch.id) is batch
    assert store.stats.faults_transient_404 == 1


def test_unknown_cursor_is_400() -> None:
    store, _, _ = make_store()
    with pytest.raises(ApiError) as info:
        store.page(10, "msgbatch_nope", None)
    assert info.value.status == 400


# --- results --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 10, 97, 1000])
def test_result_order_is_a_fixed_permutation(n: int) -> None:
    _, _, batch = make_store(n=n)
    order = list(result_order(batch))
    assert sorted(order) == list(range(n))
    assert order == list(result_order(batch))


def test_results_render_every_kind_as_clean_jsonl() -> None:
    clock = Clock()
    store = BatchStore(clock)
    requests = [{"custom_id": f"r{i}", "params": params(f"t{i}")} for i in range(200)]
    requests.append({"custom_id": "bad", "params": {"model": "m"}})
    table = compile_(*requests, errored_rate=0.3, expired_rate=0.2)
    batch = store.add(table, EmulatorConfig(processing_seconds=10))
    clock.now += 5
    batch.cancel(clock(), 0)
    outcome = batch.outcome(clock())
    assert outcome is not None

    body = b"".join(iter_chunks(batch, outcome))
    assert b"\r" not in body and body.endswith(b"\n") and b"\n\n" not in body
    lines = [orjson.loads(line) for line in body.splitlines()]
    assert len(lines) == 201
    types = {line["result"]["type"] for line in lines}
    assert types == {"succeeded", "errored", "expired", "canceled"}
    for line in lines:
        result = line["result"]
        if result["type"] == "succeeded":
            index = int(line["custom_id"][1:])
            assert result["message"]["content"] == [{"type": "text", "text": f"echo: t{index}"}]
            assert result["message"]["id"] == message_id(batch.id, index)
            assert result["message"]["usage"]["service_tier"] == "batch"
        elif result["type"] == "errored":
            assert result["error"]["type"] == "error" and result["error"]["request_id"] is None
            assert result["error"]["error"]["type"] in (
                "invalid_request_error",
                "api_error",
                "overloaded_error",
            )


def test_cut_results_stop_mid_line() -> None:
    _, clock, batch = make_store(n=50, processing_seconds=0)
    outcome = batch.outcome(clock())
    assert outcome is not None
    full = b"".join(iter_chunks(batch, outcome))
    cut = b"".join(iter_chunks(batch, outcome, cut=(10, 0.5)))
    assert full.startswith(cut)
    assert cut.count(b"\n") == 10 and not cut.endswith(b"\n")


# --- answers for agents ---------------------------------------------------------------------------


def tool_params(text: str, **extra: Any) -> dict[str, Any]:
    tool = {"name": "find", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}
    return params(text, tools=[tool], **extra)


def test_a_cue_input_may_nest_objects_and_brackets() -> None:
    ans = answer(tool_params('[[tool:find {"q": {"deep": "a]]b"}}]]'), in_batch=True)
    assert ans.stop_reason == "tool_use"
    assert ans.content is not None and ans.content[0]["input"] == {"q": {"deep": "a]]b"}}


@pytest.mark.parametrize("text", ["[[tool:find {not json}]]", "[[tool:find [1, 2]]]", "[[tool:nope]]"])
def test_a_cue_that_cannot_be_a_call_leaves_the_echo(text: str) -> None:
    ans = answer(tool_params(text), in_batch=True)
    assert ans.content is None and ans.text == f"echo: {text}" and ans.stop_reason == "end_turn"


def test_tool_ids_are_deterministic_and_differ_per_turn() -> None:
    one = answer(tool_params("[[tool:find]]"), in_batch=True).content
    again = answer(tool_params("[[tool:find]]"), in_batch=True).content
    assert one is not None and again is not None and one[0]["id"] == again[0]["id"]
    later = tool_params("[[tool:find]]")
    later["messages"] = [
        {"role": "user", "content": "start"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "[[tool:find]]"},
    ]
    other = answer(later, in_batch=True).content
    assert other is not None and other[0]["id"] != one[0]["id"]


def test_output_tokens_cover_every_block() -> None:
    thinking = {"type": "enabled", "budget_tokens": 1024}
    ans = answer(params("hello", max_tokens=2048, thinking=thinking), in_batch=True)
    assert ans.content is not None
    thought, text = ans.content
    chars = len(str(thought["thinking"])) + len(str(text["text"]))
    assert ans.output_tokens == count_tokens(chars)
    omitted = answer(
        params("hello", max_tokens=2048, thinking={**thinking, "display": "omitted"}), in_batch=True
    )
    assert omitted.content is not None and omitted.content[0]["thinking"] == ""
    assert omitted.content[0]["signature"]


# --- prompt cache keys ----------------------------------------------------------------------------


def test_the_cache_prefix_ends_at_the_last_breakpoint_in_api_order() -> None:
    mark = {"type": "ephemeral"}
    p = params(
        [{"type": "text", "text": "a" * 400, "cache_control": mark}, {"type": "text", "text": "tail"}],
        system=[{"type": "text", "text": "s" * 40}],
        tools=[
            {
                "name": "t",
                "input_schema": {"type": "object"},
                "cache_control": {"type": "ephemeral", "ttl": "1h"},
            }
        ],
    )
    total, key = prompt_tokens(p)
    assert key is not None and key.ttl == 300.0  # the last breakpoint's TTL
    tool_chars = len(orjson.dumps({"name": "t", "input_schema": {"type": "object"}}))
    assert key.tokens == -(-(tool_chars + 40 + 400) // 4)
    assert total == count_tokens(tool_chars + 40 + 400 + 4)
    # The same prefix with another TTL or another tail is the same cache entry; another model is not.
    same = prompt_tokens({**p, "messages": [{"role": "user", "content": [p["messages"][0]["content"][0]]}]})[
        1
    ]
    assert same is not None and same.digest == key.digest
    other_model = prompt_tokens({**p, "model": "other"})[1]
    assert other_model is not None and other_model.digest != key.digest
    assert prompt_tokens(params("no breakpoint"))[1] is None


def test_prompt_cache_reads_writes_and_origins() -> None:
    cache = PromptCache()
    key = CacheKey(b"k", 500, 300.0)

    def use(at: float, *, batch: bool = True, visible: float | None = None) -> CacheUsage | None:
        seen = visible if visible is not None else at + 1
        return cache.use("key", key, at=at, visible_at=seen, from_batch=batch, min_tokens=100, now=0.0)

    assert use(10) == CacheUsage(write_5m=500)
    assert use(10.5) == CacheUsage(write_5m=500)  # not visible yet
    assert use(11) == CacheUsage(read=500)
    assert use(11 + 299) == CacheUsage(read=500)  # each read extends the entry's life
    assert use(310 + 301) == CacheUsage(write_5m=500)  # expired
    assert (
        cache.use(
            "key", CacheKey(b"short", 99, 300.0), at=0, visible_at=0, from_batch=True, min_tokens=100, now=0.0
        )
        is None
    )

    assert use(2000, batch=False) == CacheUsage(write_5m=500)
    assert use(2005) == CacheUsage(write_5m=500)  # batches never read a real-time write
    assert use(2010, batch=False) == CacheUsage(read=500)  # real time reads either
    long = CacheKey(b"long", 10, 3600.0)
    assert cache.use("key", long, at=0, visible_at=0, from_batch=True, min_tokens=1, now=0.0) == CacheUsage(
        write_1h=10
    )


# --- the RPM window -------------------------------------------------------------------------------


def test_rpm_limiter_slides_over_sixty_seconds() -> None:
    limiter = RpmLimiter()
    assert [limiter.admit("k", 0.0, 2), limiter.admit("k", 10.0, 2)] == [None, None]
    assert limiter.admit("k", 10.0, 2) == 50
    assert limiter.admit("other", 10.0, 2) is None
    assert limiter.admit("k", 59.5, 2) == 1  # never 0: the SDK would retry at once
    assert limiter.admit("k", 60.0, 2) is None
    assert limiter.admit("k", 60.0, 1) == 60  # a lowered limit: both calls in the window must leave it
    assert limiter.admit("k", 60.0, 0) is None  # 0 = unlimited
