"""translate.py: the HTTP request -> ApiRequest direction (every header batchd reads, every refusal), and the
results line -> HTTP answer direction (status per result and error type, lenient reading)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
import pytest

from batchd.errors import (
    InvalidParams,
    QueueFull,
    RedisUnavailable,
    RequestNotFound,
    RequestTooLarge,
)
from batchd.translate import (
    ERROR_STATUS,
    ApiError,
    answer_from_line,
    api_error_for,
    parse_request,
    request_id_for_key,
)
from batchd.validation import validate_request_id

NOW = 1_800_000_000.0
PARAMS = {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
BASE_HEADERS = [("anthropic-version", "2023-06-01"), ("content-type", "application/json")]


def parse(
    body: Mapping[str, Any] | bytes = PARAMS,
    headers: list[tuple[str, str]] | None = None,
    path: str = "/v1/messages",
    **kwargs: Any,
) -> Any:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return parse_request("POST", path, [*BASE_HEADERS, *(headers or [])], raw, now=NOW, **kwargs)


def refused(*args: Any, **kwargs: Any) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(*args, **kwargs)
    return info.value


# --- request -> ApiRequest ----------------------------------------------------------------------------------


def test_body_becomes_params_without_stream_and_compact_bytes() -> None:
    req = parse({**PARAMS, "stream": True, "temperature": 0.5, "unknown_future_field": {"x": [1]}})
    assert req.stream is True
    assert "stream" not in req.params
    assert req.params["unknown_future_field"] == {"x": [1]}
    assert orjson.loads(req.body) == req.params
    assert b" " not in req.body.replace(b'"content":"hi"', b"")  # compact
    assert (req.route, req.deadline, req.tags, req.respond_async, req.request_id) == (
        "batch",
        None,
        (),
        False,
        None,
    )


def test_beta_path_and_prefix_are_messages() -> None:
    assert parse(path="/v1/messages?beta=true").params == PARAMS
    assert parse(path="/anthropic/v1/messages").params == PARAMS


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/v1/messages"), ("POST", "/v1/messages/batches"), ("POST", "/v1/complete")]
)
def test_other_endpoints_are_404(method: str, path: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_request(method, path, BASE_HEADERS, orjson.dumps(PARAMS))
    assert (info.value.status, info.value.error_type) == (404, "not_found_error")


def test_betas_are_split_trimmed_and_unique_in_order() -> None:
    req = parse(headers=[("anthropic-beta", "b-2, a-1,,b-2"), ("Anthropic-Beta", "c-3 , a-1")])
    assert req.betas == ("b-2", "a-1", "c-3")
    assert refused(headers=[("anthropic-beta", "good, bad name")]).status == 400


def test_version_is_required_and_per_batch_headers_travel() -> None:
    with pytest.raises(ApiError) as info:
        parse_request("POST", "/v1/messages", [], orjson.dumps(PARAMS))
    assert "anthropic-version" in info.value.message
    req = parse(headers=[("Anthropic-Workspace-Id", "wrkspc_1"), ("anthropic-user-profile-id", "up_2")])
    assert req.anthropic_version == "2023-06-01"
    assert req.headers == (("anthropic-workspace-id", "wrkspc_1"), ("anthropic-user-profile-id", "up_2"))


def test_conflicting_repeats_of_a_single_header_are_refused() -> None:
    assert "anthropic-version" in refused(headers=[("anthropic-version", "2026-10-21")]).message
    assert parse(headers=[("anthropic-version", "2023-06-01")]).anthropic_version == "2023-06-01"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        ({"max_tokens": 1, "messages": []}, "model: Field required"),
        ({**PARAMS, "model": ""}, "model: Input should be a non-empty string"),
        ({**PARAMS, "max_tokens": "10"}, "max_tokens: Input should be a valid integer"),
        ({**PARAMS, "max_tokens": True}, "max_tokens: Input should be a valid integer"),
        ({**PARAMS, "max_tokens": 0}, "greater than or equal to 1"),
        ({"model": "m", "max_tokens": 1}, "messages: Field required"),
        ({**PARAMS, "messages": {}}, "messages: Input should be a valid list"),
        ({**PARAMS, "messages": []}, "at least 1 item"),
        ({**PARAMS, "stream": "yes"}, "stream: Input should be a valid boolean"),
    ],
)
def test_bad_bodies_are_400_with_the_field(body: Mapping[str, Any] | bytes, message: str) -> None:
    error = refused(body)
    assert (error.status, error.error_type) == (400, "invalid_request_error")
    assert message in error.message
    envelope = error.envelope("rid1")
    assert envelope == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": error.message},
        "request_id": "rid1",
    }


def test_oversized_body_is_413_before_parsing() -> None:
    error = refused(b"x" * 101, max_body_bytes=100)
    assert (error.status, error.error_type) == (413, "request_too_large")


def test_validator_hook_refusals_become_400() -> None:
    seen: list[tuple[Any, tuple[str, ...]]] = []

    def check(params: Mapping[str, Any], betas: tuple[str, ...]) -> None:
        seen.append((dict(params), betas))
        if "speed" in params:
            raise ValueError("speed: not allowed in a batch")
        if "store" in params:
            raise ApiError(403, "permission_error", "no")

    parse(headers=[("anthropic-beta", "x-1")], validate=check)
    assert seen == [(PARAMS, ("x-1",))]
    error = refused({**PARAMS, "speed": "fast"}, validate=check)
    assert (error.status, error.message) == (400, "speed: not allowed in a batch")
    assert refused({**PARAMS, "store": True}, validate=check).status == 403


def test_idempotency_key_maps_to_a_request_id() -> None:
    sdk_key = "stainless-python-retry-0b6f6f0e-6a0b-4c4e-9d0e-3f1f4d1c2b3a"
    assert parse(headers=[("Idempotency-Key", sdk_key)]).request_id == sdk_key
    odd = "order:42/attempt#1"
    req = parse(headers=[("idempotency-key", odd)])
    assert req.idempotency_key == odd
    assert req.request_id == request_id_for_key(odd) == request_id_for_key(odd)
    assert validate_request_id(req.request_id) != request_id_for_key(odd + "x")
    assert validate_request_id(request_id_for_key("k" * 200))
    assert refused(headers=[("idempotency-key", "k" * 256)]).status == 400


def test_route_and_deadline() -> None:
    assert parse(headers=[("batchd-route", "realtime")]).route == "realtime"
    req = parse(headers=[("batchd-deadline", "900")])
    assert (req.route, req.deadline) == ("auto", NOW + 900)
    # NOW is 2027-01-15T08:00:00Z.
    req = parse(headers=[("batchd-route", "AUTO"), ("batchd-deadline", "2027-01-16T09:00:00+01:00")])
    assert (req.route, req.deadline) == ("auto", NOW + 86_400)


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ([("batchd-route", "fast")], "not one of batch, realtime, auto"),
        ([("batchd-route", "auto")], "auto needs a batchd-deadline"),
        ([("batchd-route", "batch"), ("batchd-deadline", "60")], "applies to batchd-route auto"),
        ([("batchd-deadline", "0")], "positive"),
        ([("batchd-deadline", "nan")], "positive"),
        ([("batchd-deadline", "tomorrow")], "neither seconds"),
        ([("batchd-deadline", "2027-01-15T08:00:00")], "needs a zone"),
        ([("batchd-deadline", "2027-01-15T08:00:00Z")], "already passed"),
        ([("batchd-dedline", "60")], "unknown batchd header"),
    ],
)
def test_bad_batchd_headers_are_400(headers: list[tuple[str, str]], message: str) -> None:
    error = refused(headers=headers)
    assert error.status == 400
    assert message in error.message


def test_tags_are_a_bounded_set_of_pairs() -> None:
    req = parse(headers=[("batchd-tags", "team=search, env=prod"), ("batchd-tags", "job=eval/2026:11")])
    assert req.tags == (("team", "search"), ("env", "prod"), ("job", "eval/2026:11"))
    for bad in ("team", "team=", "=x", "te am=x", "team=a b", "k=" + "v" * 65, "team=a,team=b"):
        assert refused(headers=[("batchd-tags", bad)]).status == 400, bad
    many = ",".join(f"k{i}=v" for i in range(9))
    assert "at most 8" in refused(headers=[("batchd-tags", many)]).message


def test_prefer_respond_async() -> None:
    assert parse(headers=[("Prefer", "wait=5, respond-async")]).respond_async is True
    assert parse(headers=[("prefer", "return=minimal")]).respond_async is False


def test_fingerprint_covers_what_the_api_sees() -> None:
    base = parse()
    assert parse(headers=[("idempotency-key", "a")]).fingerprint() == base.fingerprint()
    assert parse(headers=[("anthropic-beta", "x")]).fingerprint() != base.fingerprint()
    assert parse({**PARAMS, "max_tokens": 17}).fingerprint() != base.fingerprint()


# --- results line -> answer ---------------------------------------------------------------------------------

MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-haiku-4-5",
    "content": [{"type": "text", "text": "hi"}, {"type": "mcp_tool_result", "whatever": [1, {"deep": None}]}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 1, "output_tokens": 1, "brand_new_counter": 7},
    "brand_new_field": "kept",
}


def line(result: Mapping[str, Any]) -> bytes:
    return orjson.dumps({"custom_id": "r1", "result": result})


def test_succeeded_is_200_with_the_message_untouched() -> None:
    answer = answer_from_line(line({"type": "succeeded", "message": MESSAGE}), "r1")
    assert answer.status == 200
    assert orjson.loads(answer.body) == MESSAGE
    assert answer.message == MESSAGE
    assert answer.headers == {"x-should-retry": "false"}


@pytest.mark.parametrize(("error_type", "status"), [*ERROR_STATUS.items(), ("brand_new_error", 500)])
def test_errored_status_follows_the_error_type(error_type: str, status: int) -> None:
    envelope = {
        "type": "error",
        "error": {"type": error_type, "message": "boom", "details": {"error_visibility": "user_facing"}},
        "request_id": None,
    }
    answer = answer_from_line(line({"type": "errored", "error": envelope}), "r1")
    assert answer.status == status
    assert orjson.loads(answer.body) == {**envelope, "request_id": "r1"}  # details kept
    assert answer.error is not None and answer.error.error_type == error_type
    assert answer.headers["x-should-retry"] == "false"


def test_canceled_is_a_final_410_and_expired_a_529() -> None:
    canceled = answer_from_line(line({"type": "canceled"}), "r1")
    assert canceled.status == 410
    assert orjson.loads(canceled.body)["error"]["type"] == "invalid_request_error"
    expired = answer_from_line(line({"type": "expired"}), "r1")
    assert expired.status == 529
    assert orjson.loads(expired.body)["error"]["type"] == "overloaded_error"
    assert canceled.headers["x-should-retry"] == expired.headers["x-should-retry"] == "false"


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"{}",
        line({"type": "mystery"}),
        line({"type": "succeeded"}),
        line({"type": "errored", "error": "x"}),
    ],
)
def test_unreadable_lines_are_a_500_envelope(raw: bytes) -> None:
    answer = answer_from_line(raw, "r1")
    assert answer.status == 500
    assert orjson.loads(answer.body)["error"]["type"] == "api_error"


def test_backend_exceptions_map_to_api_answers() -> None:
    cases = [
        (RequestNotFound("r1"), 404, "not_found_error"),
        (RequestTooLarge("big"), 413, "request_too_large"),
        (InvalidParams("bad"), 400, "invalid_request_error"),
        (QueueFull("full"), 429, "rate_limit_error"),
        (RedisUnavailable("down"), 503, "api_error"),
        (RuntimeError("secret detail"), 500, "api_error"),
    ]
    for exc, status, error_type in cases:
        error = api_error_for(exc)
        assert (error.status, error.error_type) == (status, error_type), exc
    assert "secret detail" not in api_error_for(RuntimeError("secret detail")).message
    assert api_error_for(QueueFull("full")).headers == {"retry-after": "1"}
    same = ApiError(429, "rate_limit_error", "budget")
    assert api_error_for(same) is same
