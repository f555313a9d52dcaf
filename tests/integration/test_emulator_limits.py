"""The emulator's API limits and access knobs, through the official SDK: RPM per key, the processing-queue
cap, tier presets, valid API keys, and a slow create that outlives its client."""

from __future__ import annotations

import time
from collections.abc import Iterator

import anthropic
import httpx2
import pytest

from batchd.emulator import EmulatorConfig, EmulatorThread
from tests.emulator_helpers import Clock, req


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def emu(clock: Clock) -> Iterator[EmulatorThread]:
    with EmulatorThread(EmulatorConfig(processing_seconds=10.0), clock=clock) as emulator:
        yield emulator


def sdk(emu: EmulatorThread, key: str = "key-a") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=emu.base_url, api_key=key, max_retries=0)


# --- requests per minute --------------------------------------------------------------------------------


def test_rpm_limit_counts_every_batch_endpoint_in_a_sliding_minute(emu: EmulatorThread, clock: Clock) -> None:
    emu.configure(rpm_limit=4)
    with sdk(emu) as client:
        batch = client.messages.batches.create(requests=[req("a")])  # 1: create
        client.messages.batches.retrieve(batch.id)  # 2: retrieve
        clock.advance(20)
        client.messages.batches.list()  # 3: list
        client.messages.batches.cancel(batch.id)  # 4: cancel
        with pytest.raises(anthropic.RateLimitError) as info:
            client.messages.batches.retrieve(batch.id)
        assert info.value.type == "rate_limit_error"
        # The two calls at t0 leave the window 60 s after t0, i.e. 40 s from now.
        assert info.value.response.headers["retry-after"] == "40"

        clock.advance(39)
        with pytest.raises(anthropic.RateLimitError) as info:
            client.messages.batches.list()
        assert info.value.response.headers["retry-after"] == "1"
        clock.advance(1)
        client.messages.batches.list()
        client.messages.batches.list()
        with pytest.raises(anthropic.RateLimitError):
            client.messages.batches.list()

    stats = emu.stats()
    assert stats["rate_limited_rpm"] == 3
    assert stats["api_calls"] == 9  # the refused ones included: they are calls the client made
    assert stats["faults_rate_limit"] == 0


def test_rpm_limit_is_per_api_key_and_spares_the_other_endpoints(emu: EmulatorThread) -> None:
    emu.configure(rpm_limit=1)
    with sdk(emu, "key-a") as a, sdk(emu, "key-b") as b:
        a.messages.batches.list()
        with pytest.raises(anthropic.RateLimitError):
            a.messages.batches.list()
        b.messages.batches.list()  # another key has its own minute
        # Messages, models and token counting are not batch endpoints.
        a.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        a.models.list()
        a.messages.count_tokens(model="m", messages=[{"role": "user", "content": "x"}])
    assert emu.stats()["api_calls"] == 3


def test_results_downloads_count_against_the_rpm(emu: EmulatorThread, clock: Clock) -> None:
    with sdk(emu) as client:
        batch = client.messages.batches.create(requests=[req("a")])
        clock.advance(10)
        emu.configure(rpm_limit=2)  # create is behind us; results() is a retrieve plus the download
        assert [r.custom_id for r in client.messages.batches.results(batch.id)] == ["a"]
        with pytest.raises(anthropic.RateLimitError):
            client.messages.batches.retrieve(batch.id)


def test_rpm_limit_zero_means_unlimited(emu: EmulatorThread) -> None:
    with sdk(emu) as client:
        for _ in range(60):
            client.messages.batches.list()
    assert emu.stats()["rate_limited_rpm"] == 0


# --- processing queue -----------------------------------------------------------------------------------


def test_a_create_that_would_pass_the_queue_cap_is_refused(emu: EmulatorThread, clock: Clock) -> None:
    emu.configure(queue_limit=5)
    with sdk(emu, "key-a") as a, sdk(emu, "key-b") as b:
        first = a.messages.batches.create(requests=[req(f"a{i}") for i in range(3)])
        clock.advance(4)
        with pytest.raises(anthropic.RateLimitError) as info:
            a.messages.batches.create(requests=[req(f"b{i}") for i in range(3)])
        err = info.value
        assert err.type == "rate_limit_error"
        assert "3 queued + 3 in this batch > 5" in str(err.message)
        assert err.response.headers["retry-after"] == "6"  # when the first batch ends

        a.messages.batches.create(requests=[req("c0"), req("c1")])  # exactly at the cap: fine
        b.messages.batches.create(requests=[req(f"d{i}") for i in range(5)])  # another key's queue

        clock.advance(6)  # the first batch has ended: its requests left the queue
        assert a.messages.batches.retrieve(first.id).processing_status == "ended"
        a.messages.batches.create(requests=[req(f"e{i}") for i in range(3)])

    stats = emu.stats()
    assert stats["rate_limited_queue"] == 1
    assert stats["batches_created"] == 4
    assert stats["requests_received"] == 3 + 2 + 5 + 3  # nothing of the refused batch


# --- tiers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tier", "rpm", "queue"),
    [(1, 50, 100_000), (2, 1_000, 200_000), (3, 2_000, 300_000), (4, 4_000, 500_000)],
)
def test_tier_presets_set_both_limits(emu: EmulatorThread, tier: int, rpm: int, queue: int) -> None:
    with httpx2.Client(base_url=emu.base_url) as http:
        config = http.post("/_emulator/config", json={"tier": tier}).json()
    assert (config["rpm_limit"], config["queue_limit"]) == (rpm, queue)
    assert "tier" not in config


def test_tier_1_refuses_the_51st_call_in_a_minute(emu: EmulatorThread) -> None:
    emu.configure(tier=1)
    with sdk(emu) as client:
        for _ in range(50):
            client.messages.batches.list(limit=1)
        with pytest.raises(anthropic.RateLimitError):
            client.messages.batches.list(limit=1)


# --- API keys -------------------------------------------------------------------------------------------


def test_valid_api_keys_can_be_set_and_revoked_at_run_time(emu: EmulatorThread) -> None:
    emu.configure(valid_api_keys=["good-key"])
    with sdk(emu, "good-key") as good, sdk(emu, "other-key") as other:
        good.messages.batches.list()
        with pytest.raises(anthropic.AuthenticationError) as info:
            other.messages.batches.list()
        assert info.value.type == "authentication_error"
        with httpx2.Client(base_url=emu.base_url) as http:
            headers = {"anthropic-version": "2023-06-01", "x-api-key": "good-key"}
            assert http.get("/v1/messages/batches", headers=headers).status_code == 200

        emu.configure(valid_api_keys=["new-key"])  # revoked
        with pytest.raises(anthropic.AuthenticationError):
            good.messages.batches.list()
        with pytest.raises(anthropic.AuthenticationError):
            good.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])

        emu.configure(valid_api_keys=[])  # any key again
        other.messages.batches.list()
    assert emu.stats()["auth_failures"] == 3


# --- a slow create --------------------------------------------------------------------------------------


def test_a_slow_create_still_creates_the_batch_after_the_client_gave_up() -> None:
    with EmulatorThread(EmulatorConfig(processing_seconds=60, create_delay_seconds=1.0)) as emu:
        with (
            anthropic.Anthropic(base_url=emu.base_url, api_key="k", max_retries=0, timeout=0.1) as client,
            pytest.raises(anthropic.APITimeoutError),
        ):
            client.messages.batches.create(requests=[req("a"), req("b")])
        # The client hung up well inside the delay (0.1 s of 1 s): nothing exists yet.
        assert emu.stats()["batches_created"] == 0

        with anthropic.Anthropic(base_url=emu.base_url, api_key="k", max_retries=0) as client:
            deadline = time.monotonic() + 5
            while not (listed := client.messages.batches.list().data):
                assert time.monotonic() < deadline, "the abandoned create never created its batch"
                time.sleep(0.02)
        assert len(listed) == 1 and listed[0].request_counts.processing == 2
        assert emu.stats()["batches_created"] == 1


def test_a_slow_create_answers_when_the_client_waits() -> None:
    with (
        EmulatorThread(EmulatorConfig(create_delay_seconds=0.2)) as emu,
        anthropic.Anthropic(base_url=emu.base_url, api_key="k", max_retries=0) as client,
    ):
        started = time.monotonic()
        batch = client.messages.batches.create(requests=[req("a")])
        assert time.monotonic() - started >= 0.2
        assert client.messages.batches.retrieve(batch.id).id == batch.id
