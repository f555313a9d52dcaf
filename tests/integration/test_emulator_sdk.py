"""Conformance: the official sync SDK against the emulator over HTTP, endpoint by endpoint."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import anthropic
import httpx2
import pytest
from anthropic.types.messages import MessageBatch

from batchd.emulator import EmulatorConfig, EmulatorThread
from batchd.emulator.testing import wait_for_batch
from tests.emulator_helpers import req

RFC3339_MICRO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture
def emu() -> Iterator[EmulatorThread]:
    with EmulatorThread(EmulatorConfig(processing_seconds=0.05, cancel_seconds=0.02)) as emulator:
        yield emulator


@pytest.fixture
def client(emu: EmulatorThread) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=emu.base_url, api_key="test-key", max_retries=0) as sdk:
        yield sdk


def create(client: anthropic.Anthropic, n: int = 3, prefix: str = "r") -> MessageBatch:
    return client.messages.batches.create(requests=[req(f"{prefix}{i}", f"hi {i}") for i in range(n)])


def results_by_id(client: anthropic.Anthropic, batch_id: str) -> dict[str, Any]:
    return {line.custom_id: line.result for line in client.messages.batches.results(batch_id)}


# --- create / retrieve ----------------------------------------------------------------------------


def test_create_returns_an_in_progress_batch(client: anthropic.Anthropic) -> None:
    raw = client.messages.batches.with_raw_response.create(requests=[req("a"), req("b")])
    batch = raw.parse()
    body = raw.http_response.json()

    assert re.fullmatch(r"msgbatch_[0-9A-Za-z]{24}", batch.id)
    assert batch.type == "message_batch"
    assert batch.processing_status == "in_progress"
    assert batch.request_counts.model_dump() == {
        "processing": 2,
        "succeeded": 0,
        "errored": 0,
        "canceled": 0,
        "expired": 0,
    }
    assert batch.ended_at is None and batch.results_url is None
    assert batch.cancel_initiated_at is None and batch.archived_at is None
    assert batch.expires_at - batch.created_at == timedelta(hours=24)
    assert RFC3339_MICRO_Z.match(body["created_at"]) and RFC3339_MICRO_Z.match(body["expires_at"])
    assert set(body) == {
        "id",
        "type",
        "processing_status",
        "request_counts",
        "ended_at",
        "created_at",
        "expires_at",
        "archived_at",
        "cancel_initiated_at",
        "results_url",
    }
    assert raw.headers["request-id"].startswith("req_")
    assert batch._request_id == raw.headers["request-id"]


def test_batch_ends_with_final_counts_and_a_results_url_back_to_the_emulator(
    emu: EmulatorThread, client: anthropic.Anthropic
) -> None:
    batch = client.messages.batches.create(requests=[req("ok1"), req("ok2"), req("bad", max_tokens=0)])
    assert batch.request_counts.processing == 3

    ended = wait_for_batch(client, batch.id)

    assert ended.request_counts.model_dump() == {
        "processing": 0,
        "succeeded": 2,
        "errored": 1,
        "canceled": 0,
        "expired": 0,
    }
    assert ended.ended_at is not None and ended.ended_at >= ended.created_at
    assert ended.results_url == f"{emu.base_url}/v1/messages/batches/{batch.id}/results"
    raw = client.messages.batches.with_raw_response.retrieve(batch.id).http_response.json()
    assert RFC3339_MICRO_Z.match(raw["ended_at"])


def test_retrieve_unknown_batch_is_404_with_request_id(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.batches.retrieve("msgbatch_01doesnotexist0000000000")
    err = info.value
    assert err.type == "not_found_error"
    assert err.request_id is not None and err.request_id.startswith("req_")
    assert isinstance(err.body, dict) and err.body["request_id"] == err.request_id


def test_beta_batches_hit_the_same_endpoints(client: anthropic.Anthropic) -> None:
    batch = client.beta.messages.batches.create(
        requests=[req("b1")],
        betas=["message-batches-2024-09-24"],
    )
    wait_for_batch(client, batch.id)
    lines = list(client.beta.messages.batches.results(batch.id))
    assert [line.custom_id for line in lines] == ["b1"]
    assert lines[0].result.type == "succeeded"


# --- results --------------------------------------------------------------------------------------


def test_succeeded_results_echo_the_last_user_message(client: anthropic.Anthropic) -> None:
    blocks = [{"type": "text", "text": "part one, "}, {"type": "text", "text": "part two"}]
    batch = client.messages.batches.create(
        requests=[
            req("plain", "hello there"),
            {
                "custom_id": "multi",
                "params": {
                    "model": "claude-sonnet-4-5",
                    "max_tokens": 5,
                    "system": "be brief",
                    "messages": [
                        {"role": "user", "content": "first question"},
                        {"role": "assistant", "content": "first answer"},
                        {"role": "user", "content": blocks},
                    ],
                },
            },
        ]
    )
    wait_for_batch(client, batch.id)
    results = results_by_id(client, batch.id)

    plain = results["plain"]
    assert plain.type == "succeeded"
    message = plain.message
    assert message.content[0].text == "echo: hello there"
    assert message.model == "claude-haiku-4-5"
    assert message.role == "assistant" and message.type == "message"
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert re.fullmatch(r"msg_[0-9A-Za-z]{24}", message.id)
    usage = message.usage
    assert usage.service_tier == "batch"
    assert usage.input_tokens == 3  # ceil(len("hello there") / 4)
    assert usage.output_tokens == 5  # ceil(len("echo: hello there") / 4)
    assert usage.cache_creation_input_tokens == 0 and usage.cache_read_input_tokens == 0

    multi = results["multi"].message
    assert multi.content[0].text == "echo: part one, part two"
    assert multi.model == "claude-sonnet-4-5"
    chars = len("first question") + len("first answer") + len("part one, part two") + len("be brief")
    assert multi.usage.input_tokens == -(-chars // 4)


BAD_PARAMS: list[tuple[str, dict[str, Any], str]] = [
    ("no_model", {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, "model"),
    ("no_max_tokens", {"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    (
        "zero_max_tokens",
        {"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]},
        "max_tokens",
    ),
    (
        "str_max_tokens",
        {"model": "m", "max_tokens": "5", "messages": [{"role": "user", "content": "x"}]},
        "max_tokens",
    ),
    ("no_messages", {"model": "m", "max_tokens": 5}, "messages"),
    ("empty_messages", {"model": "m", "max_tokens": 5, "messages": []}, "messages"),
    ("messages_not_list", {"model": "m", "max_tokens": 5, "messages": "hi"}, "messages"),
    (
        "streaming",
        {"model": "m", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "x"}]},
        "stream",
    ),
]


def test_each_bad_params_case_ends_errored_with_invalid_request_error(client: anthropic.Anthropic) -> None:
    requests = [{"custom_id": cid, "params": params} for cid, params, _ in BAD_PARAMS]
    batch = client.messages.batches.create(requests=[*requests, req("fine")])
    ended = wait_for_batch(client, batch.id)
    assert ended.request_counts.errored == len(BAD_PARAMS)
    assert ended.request_counts.succeeded == 1

    results = results_by_id(client, batch.id)
    for cid, _, field in BAD_PARAMS:
        result = results[cid]
        assert result.type == "errored", cid
        assert result.error.type == "error"
        assert result.error.request_id is None
        assert result.error.error.type == "invalid_request_error"
        assert result.error.error.message.startswith(field + ":"), (cid, result.error.error.message)


def test_errored_rate_gives_api_and_overloaded_errors(
    emu: EmulatorThread, client: anthropic.Anthropic
) -> None:
    emu.configure(errored_rate=1.0, seed=7)
    batch = create(client, n=40)
    ended = wait_for_batch(client, batch.id)
    assert ended.request_counts.errored == 40

    kinds = {(r.error.error.type, r.error.error.message) for r in results_by_id(client, batch.id).values()}
    assert kinds == {("api_error", "Internal server error"), ("overloaded_error", "Overloaded")}
    assert emu.stats()["faults_errored"] == 40


def test_expired_rate_gives_expired_results(emu: EmulatorThread, client: anthropic.Anthropic) -> None:
    emu.configure(expired_rate=1.0)
    batch = create(client, n=4)
    assert wait_for_batch(client, batch.id).request_counts.expired == 4
    assert {r.type for r in results_by_id(client, batch.id).values()} == {"expired"}


def test_expiry_ends_unfinished_requests_expired(emu: EmulatorThread, client: anthropic.Anthropic) -> None:
    # Processing would take an hour; the batch expires after 0.05 s with nothing processed.
    emu.configure(processing_seconds=3600, expiry_seconds=0.05)
    batch = create(client, n=5)
    ended = wait_for_batch(client, batch.id)
    assert ended.request_counts.expired == 5
    assert ended.expires_at - ended.created_at == timedelta(hours=24)
    assert {r.type for r in results_by_id(client, batch.id).values()} == {"expired"}


def test_results_come_in_the_same_order_on_every_download(client: anthropic.Anthropic) -> None:
    batch = create(client, n=50)
    wait_for_batch(client, batch.id)
    first = [line.custom_id for line in client.messages.batches.results(batch.id)]
    second = [line.custom_id for line in client.messages.batches.results(batch.id)]
    assert first == second
    assert sorted(first) == sorted(f"r{i}" for i in range(50))


def test_results_are_streamed_jsonl_with_clean_framing(client: anthropic.Anthropic) -> None:
    batch = create(client, n=20)
    wait_for_batch(client, batch.id)
    with client.messages.batches.with_streaming_response.results(batch.id) as response:
        assert response.headers["content-type"] == "application/x-jsonl"
        assert response.headers["request-id"].startswith("req_")
        body = b"".join(response.iter_bytes())
    assert b"\r" not in body
    assert body.endswith(b"\n")
    lines = body.split(b"\n")[:-1]
    assert len(lines) == 20 and all(lines)


def test_results_before_the_batch_ends(emu: EmulatorThread, client: anthropic.Anthropic) -> None:
    emu.configure(processing_seconds=60)
    batch = create(client, n=1)
    # The SDK itself refuses while results_url is null...
    with pytest.raises(anthropic.AnthropicError, match="results_url"):
        client.messages.batches.results(batch.id)
    # ...and the endpoint, called directly, answers 400.
    response = httpx2.get(
        f"{emu.base_url}/v1/messages/batches/{batch.id}/results",
        headers={"x-api-key": "k", "anthropic-version": "2023-06-01"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


# --- list -----------------------------------------------------------------------------------------


def test_list_pages_newest_first_with_cursors(client: anthropic.Anthropic) -> None:
    ids = [create(client, n=1, prefix=f"b{i}_").id for i in range(5)]
    newest_first = ids[::-1]

    page = client.messages.batches.list(limit=2)
    assert [b.id for b in page.data] == newest_first[:2]
    assert page.has_more is True
    assert page.first_id == newest_first[0] and page.last_id == newest_first[1]

    page = client.messages.batches.list(limit=2, after_id=newest_first[1])
    assert [b.id for b in page.data] == newest_first[2:4] and page.has_more is True
    page = client.messages.batches.list(limit=2, after_id=newest_first[3])
    assert [b.id for b in page.data] == newest_first[4:] and page.has_more is False

    page = client.messages.batches.list(limit=2, before_id=newest_first[3])
    assert [b.id for b in page.data] == newest_first[1:3] and page.has_more is True
    page = client.messages.batches.list(limit=2, before_id=newest_first[1])
    assert [b.id for b in page.data] == newest_first[:1] and page.has_more is False

    default = client.messages.batches.list()
    assert [b.id for b in default.data] == newest_first and default.has_more is False

    empty = client.messages.batches.list(after_id=newest_first[-1])
    assert empty.data == [] and empty.has_more is False
    assert empty.first_id is None and empty.last_id is None


def test_list_auto_pagination_visits_every_batch(client: anthropic.Anthropic) -> None:
    ids = [create(client, n=1, prefix=f"b{i}_").id for i in range(7)]
    assert [b.id for b in client.messages.batches.list(limit=2)] == ids[::-1]
    # Paging backwards from the oldest: pages of newer batches, each page newest first.
    backwards = [b.id for b in client.messages.batches.list(limit=3, before_id=ids[0])]
    assert sorted(backwards) == sorted(ids[1:])


@pytest.mark.parametrize("limit", [0, 1001])
def test_list_limit_out_of_range_is_400(client: anthropic.Anthropic, limit: int) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.batches.list(limit=limit)
    assert info.value.type == "invalid_request_error"


# --- cancel / delete ------------------------------------------------------------------------------


def test_cancel_ends_unprocessed_requests_canceled(emu: EmulatorThread, client: anthropic.Anthropic) -> None:
    emu.configure(processing_seconds=60)
    batch = create(client, n=4)

    canceling = client.messages.batches.cancel(batch.id)
    assert canceling.processing_status == "canceling"
    assert canceling.cancel_initiated_at is not None
    assert canceling.request_counts.processing == 4 and canceling.results_url is None

    ended = wait_for_batch(client, batch.id)
    assert ended.request_counts.canceled == 4
    assert ended.cancel_initiated_at == canceling.cancel_initiated_at
    assert {r.type for r in results_by_id(client, batch.id).values()} == {"canceled"}
    assert emu.stats()["batches_canceled"] == 1

    # Canceling an ended batch answers it unchanged.
    again = client.messages.batches.cancel(batch.id)
    assert again.model_dump() == ended.model_dump()
    assert emu.stats()["batches_canceled"] == 1


def test_delete_only_after_the_batch_ended(emu: EmulatorThread, client: anthropic.Anthropic) -> None:
    emu.configure(processing_seconds=60)
    batch = create(client, n=1)
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.batches.delete(batch.id)
    assert info.value.type == "invalid_request_error"

    client.messages.batches.cancel(batch.id)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.batches.delete(batch.id)  # canceling is not ended either
    wait_for_batch(client, batch.id)
    deleted = client.messages.batches.delete(batch.id)
    assert deleted.id == batch.id and deleted.type == "message_batch_deleted"

    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(batch.id)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.delete(batch.id)
    assert [b.id for b in client.messages.batches.list()] == []


# --- real-time messages ---------------------------------------------------------------------------


def test_messages_create_answers_with_the_standard_tier(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model="claude-haiku-4-5", max_tokens=10, messages=[{"role": "user", "content": "ping"}]
    )
    assert message.content[0].type == "text" and message.content[0].text == "echo: ping"
    assert message.usage.service_tier == "standard"
    assert message.model == "claude-haiku-4-5"
    assert message._request_id is not None


def test_messages_create_rejects_bad_params_synchronously(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="m", max_tokens=0, messages=[{"role": "user", "content": "x"}])
    assert info.value.type == "invalid_request_error"
    assert info.value.api_message is not None and info.value.api_message.startswith("max_tokens:")


def test_messages_create_streaming_is_refused(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}], stream=True
        )
    assert info.value.api_message is not None and "stream" in info.value.api_message


# --- stats ----------------------------------------------------------------------------------------


def test_stats_count_custom_ids_sent_in_more_than_one_batch(
    emu: EmulatorThread, client: anthropic.Anthropic
) -> None:
    emu.configure(processing_seconds=60)  # all still open when counted
    create(client, n=3, prefix="x")
    create(client, n=5, prefix="x")  # x0..x2 again: paid twice
    create(client, n=2, prefix="y")
    stats = emu.stats()
    assert stats["batches_created"] == 3
    assert stats["requests_received"] == 10
    assert stats["duplicate_custom_ids"] == 3
    assert stats["batches_open"] == 3
