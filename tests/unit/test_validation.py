"""Submit-time validation: every refusal class, its message, and the exact size limit."""

from __future__ import annotations

import string
from typing import Any

import orjson
import pytest

from batchd.batchbody import EMPTY_BODY_SIZE, item_size
from batchd.errors import InvalidParams, InvalidRequest, InvalidRequestId, RequestTooLarge
from batchd.store import custom_id_for
from batchd.validation import MAX_REQUEST_ID_LEN, encode_params, new_request_id, validate_request_id

BIG = 256 * 1024 * 1024


def good(**extra: Any) -> dict[str, Any]:
    return {"model": "claude-x", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}], **extra}


# --- request ids -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rid",
    ["a", "A-b_c-9", "-", "_", "x" * MAX_REQUEST_ID_LEN, string.ascii_letters[:30] + string.digits + "-_"],
)
def test_valid_request_ids_are_returned_unchanged(rid: str) -> None:
    assert validate_request_id(rid) == rid


@pytest.mark.parametrize(
    "rid",
    ["", "x" * (MAX_REQUEST_ID_LEN + 1), "has space", "dot.ted", "slash/", "uni\u00e9", "new\nline", "a:b"],
)
def test_bad_request_ids_are_refused_with_the_rule(rid: str) -> None:
    with pytest.raises(InvalidRequestId) as info:
        validate_request_id(rid)
    assert "1-60 characters of [A-Za-z0-9_-]" in str(info.value)
    assert repr(rid) in str(info.value)


@pytest.mark.parametrize("rid", [None, 42, b"abc"])
def test_non_string_request_ids_are_refused(rid: object) -> None:
    with pytest.raises(InvalidRequestId):
        validate_request_id(rid)


def test_max_request_id_len_leaves_room_for_the_attempt_suffix() -> None:
    # custom_id is at most 64 characters; batchd appends "-<attempt>" with attempts up to 20.
    assert MAX_REQUEST_ID_LEN == 60
    assert len(custom_id_for("x" * MAX_REQUEST_ID_LEN, 20)) <= 64


def test_new_request_ids_are_valid_and_distinct() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    for rid in ids:
        assert validate_request_id(rid) == rid
        assert len(rid) == 22


# --- params ----------------------------------------------------------------------------------------------
def test_encode_params_returns_compact_json_of_the_params() -> None:
    params = good(temperature=0.5, system="be brief")
    body = encode_params(params, max_batch_bytes=BIG)
    assert orjson.loads(body) == params
    assert b" " not in body.replace(b"be brief", b"")  # compact: no separators padding


@pytest.mark.parametrize("params", [None, "text", 42, [("model", "x")], b"{}"])
def test_non_mapping_params_are_refused(params: object) -> None:
    with pytest.raises(InvalidParams, match="params must be a mapping"):
        encode_params(params, max_batch_bytes=BIG)


@pytest.mark.parametrize("missing", ["model", "max_tokens", "messages"])
def test_missing_required_field_is_named(missing: str) -> None:
    params = good()
    del params[missing]
    with pytest.raises(InvalidParams, match=f"lack required field\\(s\\): {missing}$"):
        encode_params(params, max_batch_bytes=BIG)


def test_all_missing_fields_are_named_together() -> None:
    with pytest.raises(InvalidParams, match="model, max_tokens, messages"):
        encode_params({}, max_batch_bytes=BIG)


def test_stream_true_is_refused() -> None:
    with pytest.raises(InvalidParams, match="stream"):
        encode_params(good(stream=True), max_batch_bytes=BIG)


def test_stream_false_is_accepted() -> None:
    assert orjson.loads(encode_params(good(stream=False), max_batch_bytes=BIG))["stream"] is False


@pytest.mark.parametrize("value", [object(), {1, 2}, b"\xff-bytes"])
def test_params_that_are_not_json_are_refused(value: object) -> None:
    with pytest.raises(InvalidParams, match="do not serialise to JSON"):
        encode_params(good(metadata=value), max_batch_bytes=BIG)


def test_every_refusal_is_an_invalid_request() -> None:
    # Callers catch InvalidRequest to mean "nothing was written, fix the request".
    for exc_type in (InvalidParams, InvalidRequestId, RequestTooLarge):
        assert issubclass(exc_type, InvalidRequest)


# --- size ------------------------------------------------------------------------------------------------
def _largest_body(params: dict[str, Any], max_attempts: int) -> int:
    body = orjson.dumps(params)
    cid = custom_id_for("x" * MAX_REQUEST_ID_LEN, max_attempts)
    return EMPTY_BODY_SIZE + item_size(len(cid), len(body))


@pytest.mark.parametrize("max_attempts", [1, 3, 20])
def test_size_limit_is_exact_for_the_largest_custom_id(max_attempts: int) -> None:
    params = good(system="s" * 5000)
    limit = _largest_body(params, max_attempts)

    assert encode_params(params, max_batch_bytes=limit, max_attempts=max_attempts) == orjson.dumps(params)
    with pytest.raises(RequestTooLarge) as info:
        encode_params(params, max_batch_bytes=limit - 1, max_attempts=max_attempts)
    message = str(info.value)
    assert f"request is {len(orjson.dumps(params))} bytes" in message
    assert str(limit - 1) in message
    assert "BATCHD_MAX_BATCH_BYTES" in message


def test_oversize_request_is_refused() -> None:
    with pytest.raises(RequestTooLarge):
        encode_params(good(system="s" * 2_000_000), max_batch_bytes=1_000_000)
