"""Errors and injected faults: what the SDK (and raw HTTP) sees from each one."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx2
import pytest

from batchd.emulator import EmulatorConfig, EmulatorThread
from batchd.emulator.testing import wait_for_batch
from tests.emulator_helpers import req

HEADERS = {"x-api-key": "k", "anthropic-version": "2023-06-01"}


@pytest.fixture
def emu() -> Iterator[EmulatorThread]:
    with EmulatorThread(EmulatorConfig(processing_seconds=0.05, seed=1234)) as emulator:
        yield emulator


@pytest.fixture
def client(emu: EmulatorThread) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=emu.base_url, api_key="test-key", max_retries=0) as sdk:
        yield sdk


@pytest.fixture
def http(emu: EmulatorThread) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=emu.base_url) as raw:
        yield raw


# --- auth, headers, envelopes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"anthropic-version": "2023-06-01"},
        {"anthropic-version": "2023-06-01", "authorization": "Bearer"},
        {"anthropic-version": "2023-06-01", "authorization": "Basic abc"},
        {"anthropic-version": "2023-06-01", "x-api-key": ""},
    ],
)
def test_missing_credentials_are_401(http: httpx2.Client, headers: dict[str, str]) -> None:
    response = http.get("/v1/messages/batches", headers=headers)
    assert response.status_code == 401
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "authentication_error" and body["error"]["message"]
    assert body["request_id"] == response.headers["request-id"]
    assert body["request_id"].startswith("req_")


@pytest.mark.parametrize(
    "headers",
    [
        {"x-api-key": "k", "anthropic-version": "2023-06-01"},
        {"authorization": "Bearer k", "anthropic-version": "2026-10-21"},
    ],
)
def test_either_credential_style_is_accepted(http: httpx2.Client, headers: dict[str, str]) -> None:
    response = http.get("/v1/messages/batches?beta=true", headers={**headers, "anthropic-beta": "whatever"})
    assert response.status_code == 200
    assert response.json() == {"data": [], "has_more": False, "first_id": None, "last_id": None}


def test_missing_anthropic_version_is_400(http: httpx2.Client) -> None:
    response = http.get("/v1/messages/batches", headers={"x-api-key": "k"})
    assert response.status_code == 400
    assert "anthropic-version" in response.json()["error"]["message"]


def test_unknown_route_and_method_use_the_envelope(http: httpx2.Client) -> None:
    response = http.get("/v1/nothing-here", headers=HEADERS)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"
    assert response.headers["request-id"] == response.json()["request_id"]
    response = http.put("/v1/messages/batches", headers=HEADERS)
    assert response.status_code == 405
    assert response.json()["type"] == "error"


# --- create validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requests", "message"),
    [
        ([], "requests: List should have at least 1 item"),
        ([req("a" * 65)], "requests.0.custom_id: String should have at most 64 characters"),
        ([req("ok"), req("bad id!")], "requests.1.custom_id: String should match pattern"),
        ([req("ok"), {"params": req("x")["params"]}], "requests.1.custom_id: Field required"),
        ([req("dup"), req("dup")], "requests.1.custom_id: Duplicate custom_id"),
        ([{"custom_id": "p", "params": "nope"}], "requests.0.params: Input should be a valid dictionary"),
        ([{"custom_id": "p"}], "requests.0.params: Field required"),
    ],
)
def test_bad_batches_are_rejected_whole(
    emu: EmulatorThread, client: anthropic.Anthropic, requests: list[Any], message: str
) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.batches.create(requests=requests)
    assert info.value.type == "invalid_request_error"
    assert info.value.api_message is not None and info.value.api_message.startswith(message)
    assert emu.stats()["batches_created"] == 0
    assert emu.stats()["batches_rejected"] == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "Request body is not valid JSON"),
        (b"[]", "Request body should be a JSON object"),
        (b"{}", "requests: Field required"),
        (b'{"requests": {}}', "requests: Input should be a valid list"),
    ],
)
def test_malformed_create_bodies_are_400(http: httpx2.Client, body: bytes, message: str) -> None:
    response = http.post("/v1/messages/batches", content=body, headers=HEADERS)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith(message)


def test_more_than_100000_requests_is_400(http: httpx2.Client) -> None:
    entry = b'{"custom_id":"a","params":{}}'
    body = b'{"requests":[' + b",".join([entry] * 100_001) + b"]}"
    response = http.post("/v1/messages/batches", content=body, headers=HEADERS)
    assert response.status_code == 400
    assert "at most 100000 items" in response.json()["error"]["message"]


def test_oversized_create_is_413_before_the_body_is_read(emu: EmulatorThread) -> None:
    # Announce 300 MB but send nothing: the emulator must answer from Content-Length alone.
    with socket.create_connection(("127.0.0.1", emu.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/messages/batches HTTP/1.1\r\nHost: localhost\r\nx-api-key: k\r\n"
            b"anthropic-version: 2023-06-01\r\ncontent-type: application/json\r\n"
            b"Content-Length: 300000000\r\n\r\n"
        )
        received = b""
        while b"request_too_large" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert b"request-id: req_" in head.lower()
    assert b'"type":"request_too_large"' in body


def test_oversized_message_raises_content_too_large(client: anthropic.Anthropic) -> None:
    # /v1/messages has the Messages API's own 32 MB limit, cheap enough to really send.
    with pytest.raises(anthropic.ContentTooLargeError) as info:
        client.messages.create(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "x" * (33 * 1024 * 1024)}]
        )
    assert info.value.status_code == 413
    assert info.value.type == "request_too_large"


# --- injected faults ------------------------------------------------------------------------------


def test_rate_limit_fault_raises_rate_limit_error(emu: EmulatorThread, client: anthropic.Anthropic) -> None:
    emu.configure(rate_limit_rate=1.0)
    with pytest.raises(anthropic.RateLimitError) as info:
        client.messages.batches.list()
    err = info.value
    assert err.type == "rate_limit_error"
    assert err.response.headers["retry-after"] == "0"
    assert err.request_id is not None and err.request_id.startswith("req_")

    emu.configure(retry_after_seconds=0.25)
    with pytest.raises(anthropic.RateLimitError) as info:
        client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert info.value.response.headers["retry-after"] == "0.25"
    assert emu.stats()["faults_rate_limit"] == 2


def test_rate_limit_fault_is_retried_by_the_sdk(emu: EmulatorThread) -> None:
    emu.configure(rate_limit_rate=0.5, retry_after_seconds=0.01, seed=5)
    with anthropic.Anthropic(base_url=emu.base_url, api_key="k", max_retries=10) as sdk:
        for _ in range(10):
            sdk.messages.batches.list()
    assert emu.stats()["faults_rate_limit"] > 0


def test_create_error_fault_creates_nothing(emu: EmulatorThread, client: anthropic.Anthropic) -> None:
    emu.configure(create_error_rate=1.0, seed=3)
    statuses = set()
    for _ in range(12):
        with pytest.raises(anthropic.InternalServerError) as info:
            client.messages.batches.create(requests=[req("a")])
        statuses.add((info.value.status_code, info.value.type))
        assert info.value.request_id is not None
    assert statuses == {(500, "api_error"), (529, "overloaded_error")}
    assert emu.stats()["batches_created"] == 0
    assert emu.stats()["faults_create_error"] == 12
    emu.configure(create_error_rate=0.0)
    assert client.messages.batches.list().data == []


def test_overloaded_create_maps_to_overloaded_error(emu: EmulatorThread, client: anthropic.Anthropic) -> None:
    emu.configure(create_error_rate=1.0, seed=3)
    seen: set[type] = set()
    for _ in range(12):
        with pytest.raises(anthropic.InternalServerError) as info:
            client.messages.batches.create(requests=[req("a")])
        seen.add(type(info.value))
    assert anthropic.OverloadedError in seen


def test_lost_create_response_leaves_an_orphan_batch(
    emu: EmulatorThread, client: anthropic.Anthropic
) -> None:
    emu.configure(create_lost_response_rate=1.0)
    for _ in range(2):  # what the SDK's own retry would do
        with pytest.raises(anthropic.InternalServerError):
            client.messages.batches.create(requests=[req("a"), req("b")])
    assert len(client.messages.batches.list().data) == 2
    stats = emu.stats()
    assert stats["faults_create_lost_response"] == 2
    assert stats["duplicate_custom_ids"] == 2


def test_transient_404_after_create(emu: EmulatorThread, client: anthropic.Anthropic) -> None:
    emu.configure(transient_404_seconds=1.0, processing_seconds=0.05)
    batch = client.messages.batches.create(requests=[req("a")])
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(batch.id)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.cancel(batch.id)
    # Listed all along; retrievable once the window has passed.
    assert [b.id for b in client.messages.batches.list()] == [batch.id]
    ended = _retrieve_when_visible(client, batch.id)
    assert ended.processing_status == "ended"
    assert emu.stats()["faults_transient_404"] >= 2


def _retrieve_when_visible(client: anthropic.Anthropic, batch_id: str) -> Any:
    import time

    deadline = time.monotonic() + 5
    while True:
        try:
            return client.messages.batches.retrieve(batch_id)
        except anthropic.NotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def test_results_cut_breaks_iteration(emu: EmulatorThread, client: anthropic.Anthropic) -> None:
    batch = client.messages.batches.create(requests=[req(f"r{i}", "x" * 200) for i in range(500)])
    wait_for_batch(client, batch.id)
    emu.configure(results_cut_rate=1.0)
    for _ in range(3):
        decoder = client.messages.batches.results(batch.id)
        received = 0
        with pytest.raises(httpx2.TransportError):
            for _line in decoder:
                received += 1
        decoder.close()
        assert received < 500
    emu.configure(results_cut_rate=0.0)
    assert len(list(client.messages.batches.results(batch.id))) == 500
    stats = emu.stats()
    assert stats["results_cut"] == 3 and stats["results_downloads"] == 4


# --- runtime control ------------------------------------------------------------------------------


def test_runtime_config_endpoint(emu: EmulatorThread, http: httpx2.Client) -> None:
    before = http.get("/_emulator/config").json()
    assert before["processing_seconds"] == 0.05 and before["seed"] == 1234

    response = http.post("/_emulator/config", json={"errored_rate": 0.5, "processing_seconds": 2})
    assert response.status_code == 200
    assert response.json()["errored_rate"] == 0.5 and response.json()["processing_seconds"] == 2
    assert emu.config.errored_rate == 0.5

    response = http.post("/_emulator/config", json={"errored_rate": 0.1, "no_such_knob": 1})
    assert response.status_code == 400
    assert "no_such_knob" in response.json()["error"]["message"]
    assert emu.config.errored_rate == 0.5  # all or nothing

    response = http.post("/_emulator/config", json={"expired_rate": 2})
    assert response.status_code == 400 and "expired_rate" in response.json()["error"]["message"]
    response = http.post("/_emulator/config", content=b"[1]")
    assert response.status_code == 400


def test_configure_from_python_raises_value_error(emu: EmulatorThread) -> None:
    with pytest.raises(ValueError, match="results_cut_rate"):
        emu.configure(results_cut_rate=-0.1)
    with pytest.raises(ValueError, match="bogus"):
        emu.configure(bogus=1)


def test_stats_and_reset_endpoints(
    emu: EmulatorThread, client: anthropic.Anthropic, http: httpx2.Client
) -> None:
    client.messages.batches.create(requests=[req("a")])
    stats = http.get("/_emulator/stats").json()
    assert stats["batches_created"] == 1 and stats["requests_received"] == 1
    assert http.post("/_emulator/reset").json()["batches_created"] == 0
    assert client.messages.batches.list().data == []
    assert emu.stats()["requests_received"] == 0


# --- the in-process runner ------------------------------------------------------------------------


def test_restart_is_an_outage_that_keeps_port_and_batches() -> None:
    emu = EmulatorThread(EmulatorConfig(processing_seconds=0.05))
    with emu, anthropic.Anthropic(base_url=emu.base_url, api_key="k", max_retries=0) as client:
        batch = client.messages.batches.create(requests=[req("a")])
    port = emu.port

    with anthropic.Anthropic(base_url=emu.base_url, api_key="k", max_retries=0) as client:
        with pytest.raises(anthropic.APIConnectionError):
            client.messages.batches.retrieve(batch.id)
        assert emu.stats()["batches_created"] == 1  # readable while stopped

        with emu:
            assert emu.port == port
            assert wait_for_batch(client, batch.id).request_counts.succeeded == 1


def test_start_on_a_busy_port_raises(emu: EmulatorThread) -> None:
    with pytest.raises(OSError):
        EmulatorThread(port=emu.port).start()
