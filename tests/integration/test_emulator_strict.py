"""The emulator as strict as the API: betas and versions per batch, params refused as the API would refuse
them (errored inside a batch, 400 in real time), a batch the API forgets, and the side endpoints."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx2
import pytest
from anthropic._constants import ANTHROPIC_API_VERSION

from batchd import apispec
from batchd.emulator import EmulatorConfig, EmulatorThread
from batchd.emulator.testing import wait_for_batch
from tests.emulator_helpers import req

OUTPUT_300K = apispec.OUTPUT_300K_BETA


@pytest.fixture
def emu() -> Iterator[EmulatorThread]:
    with EmulatorThread(EmulatorConfig(processing_seconds=0.05)) as emulator:
        yield emulator


@pytest.fixture
def client(emu: EmulatorThread) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=emu.base_url, api_key="test-key", max_retries=0) as sdk:
        yield sdk


@pytest.fixture
def http(emu: EmulatorThread) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=emu.base_url) as raw:
        yield raw


def results_by_id(client: anthropic.Anthropic, batch_id: str) -> dict[str, Any]:
    wait_for_batch(client, batch_id)
    return {line.custom_id: line.result for line in client.messages.batches.results(batch_id)}


# --- betas and versions per batch -----------------------------------------------------------------------


def test_each_batch_records_its_betas_version_and_workspace(
    client: anthropic.Anthropic, http: httpx2.Client
) -> None:
    beta = client.beta.messages.batches.create(
        requests=[req("a"), req("b")], betas=["zeta-2026-01-01", OUTPUT_300K], workspace_id="wrkspc_1"
    )
    plain = client.messages.batches.create(requests=[req("c")])

    info = http.get(f"/_emulator/batches/{beta.id}").json()
    assert info == {
        "id": beta.id,
        "betas": [OUTPUT_300K, "zeta-2026-01-01"],
        "anthropic_version": ANTHROPIC_API_VERSION,
        "workspace_id": "wrkspc_1",
        "requests": 2,
        "processing_status": "in_progress",
        "created_at": info["created_at"],
    }
    assert info["created_at"].startswith(beta.created_at.strftime("%Y-%m-%dT%H:%M:%S"))
    plain_info = http.get(f"/_emulator/batches/{plain.id}").json()
    assert plain_info["betas"] == [] and plain_info["workspace_id"] is None


def test_repeated_beta_headers_are_merged_sorted_and_unique(emu: EmulatorThread, http: httpx2.Client) -> None:
    headers = [
        ("x-api-key", "k"),
        ("anthropic-version", "2023-06-01"),
        ("anthropic-beta", "b-2, a-1"),
        ("anthropic-beta", "b-2"),
    ]
    created = http.post("/v1/messages/batches", headers=headers, json={"requests": [req("a")]})
    assert created.status_code == 200
    info = emu.batch_info(created.json()["id"])
    assert info is not None
    assert info["betas"] == ["a-1", "b-2"] and info["anthropic_version"] == "2023-06-01"


def test_a_request_that_needs_the_output_beta_errors_without_it(client: anthropic.Anthropic) -> None:
    long_sonnet = {"model": "claude-sonnet-4-6", "max_tokens": 100_000}
    without = client.messages.batches.create(requests=[req("long", **long_sonnet), req("short")])
    with_beta = client.beta.messages.batches.create(
        requests=[req("long", **long_sonnet), req("haiku", max_tokens=100_000)], betas=[OUTPUT_300K]
    )

    results = results_by_id(client, without.id)
    assert results["short"].type == "succeeded"
    error = results["long"].error.error
    assert error.type == "invalid_request_error"
    assert error.message == (
        "max_tokens: 100000 > 64000, "
        "which is the maximum allowed number of output tokens for claude-sonnet-4-6"
    )

    wait_for_batch(client, with_beta.id)
    beta_results = {r.custom_id: r.result for r in client.beta.messages.batches.results(with_beta.id)}
    assert beta_results["long"].type == "succeeded"
    # The beta lifts the cap only for the models it covers.
    assert beta_results["haiku"].type == "errored"
    assert "claude-haiku-4-5-20251001" in beta_results["haiku"].error.error.message


# --- params refused as the API refuses them -------------------------------------------------------------

NEWLY_REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("betas_in_body", {"betas": [OUTPUT_300K]}, "betas: Extra inputs are not permitted"),
    ("unknown_param", {"top_n": 3}, "top_n: Extra inputs are not permitted"),
    ("speed", {"speed": "fast"}, "speed: fast mode is not available in Message Batches"),
    ("store", {"store": True}, "store: not supported in Message Batches"),
    ("over_cap", {"max_tokens": 100_000}, "max_tokens: 100000 > 64000, which is the maximum allowed"),
    (
        "bad_block",
        {"messages": [{"role": "user", "content": [{"type": "hologram", "data": "x"}]}]},
        "messages.0.content.0: Input tag 'hologram' found using 'type' does not match any of the expected",
    ),
    ("bad_tool", {"tools": [{"type": "teleport_20990101"}]}, "tools.0: Input tag 'teleport_20990101'"),
]


def test_requests_the_api_would_refuse_end_errored_not_succeeded(client: anthropic.Anthropic) -> None:
    batch = client.messages.batches.create(
        requests=[req(cid, **extra) for cid, extra, _ in NEWLY_REFUSED] + [req("fine")]
    )
    results = results_by_id(client, batch.id)
    assert results["fine"].type == "succeeded"
    for cid, _, message in NEWLY_REFUSED:
        result = results[cid]
        assert result.type == "errored", cid
        assert result.error.type == "error"
        assert result.error.error.type == "invalid_request_error"
        assert result.error.error.message.startswith(message), (cid, result.error.error.message)


def test_real_time_messages_refuse_the_same_params_with_400(client: anthropic.Anthropic) -> None:
    # Outside batches `speed` is fine and `store` is merely a field the SDK does not know.
    realtime = {"store": "store: Extra inputs are not permitted"}
    for cid, extra, batch_message in NEWLY_REFUSED:
        if cid == "speed":
            continue
        message = realtime.get(cid, batch_message)
        body = req(cid, **extra)["params"]
        required = {k: body.pop(k) for k in ("model", "max_tokens", "messages")}
        with pytest.raises(anthropic.BadRequestError) as info:
            client.messages.create(**required, extra_body=body, timeout=10)  # sent as given
        assert info.value.type == "invalid_request_error"
        assert str(info.value.api_message).startswith(message), cid


def test_everything_the_api_accepts_succeeds_in_a_batch(client: anthropic.Anthropic) -> None:
    rich = {
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "metadata": {"user_id": "u1"},
        "stop_sequences": ["END"],
        "container": "container_1",
        "output_config": {"effort": "low"},
        "tools": [
            {"name": "calc", "input_schema": {"type": "object"}},
            {"type": "web_search_20250305", "name": "web_search"},
        ],
        "tool_choice": {"type": "auto"},
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "d"}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                    {"type": "text", "text": "what is this?"},
                ],
            }
        ],
    }
    batch = client.messages.batches.create(requests=[req("rich", **rich), req("speedy", speed="standard")])
    results = results_by_id(client, batch.id)
    assert results["rich"].type == "succeeded"
    assert results["rich"].message.content[0].text == "echo: what is this?"
    assert results["speedy"].type == "errored"  # `speed` is refused in batches whatever its value


# --- a batch the API forgets ----------------------------------------------------------------------------


def test_a_forgotten_batch_is_404_everywhere(
    emu: EmulatorThread, client: anthropic.Anthropic, http: httpx2.Client
) -> None:
    emu.configure(processing_seconds=60)
    batch = client.messages.batches.create(requests=[req("a")])
    keep = client.messages.batches.create(requests=[req("b")])

    forgotten = http.delete(f"/_emulator/batches/{batch.id}")
    assert forgotten.status_code == 200 and forgotten.json()["id"] == batch.id

    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(batch.id)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.cancel(batch.id)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.delete(batch.id)
    assert [b.id for b in client.messages.batches.list()] == [keep.id]
    assert http.get(f"/_emulator/batches/{batch.id}").status_code == 404
    assert http.delete(f"/_emulator/batches/{batch.id}").status_code == 404
    assert emu.forget_batch(keep.id) is True and emu.forget_batch(keep.id) is False
    assert emu.stats()["batches_forgotten"] == 2


# --- models and token counting --------------------------------------------------------------------------


def test_models_list_and_retrieve(client: anthropic.Anthropic) -> None:
    listed = [m.id for m in client.models.list(limit=3)]  # auto-paginates page by page
    assert listed == [spec.id for spec in apispec.models()]
    page = client.models.list(limit=2)
    assert page.has_more and page.first_id == listed[0] and page.last_id == listed[1]

    model = client.models.retrieve(model_id="claude-haiku-4-5-20251001")
    assert model.id == "claude-haiku-4-5" and model.type == "model"
    assert model.display_name == "Claude Haiku 4.5" and model.max_tokens == 64_000
    assert model.created_at.year == 2025
    with pytest.raises(anthropic.NotFoundError) as info:
        client.models.retrieve(model_id="claude-nonexistent-1")
    assert info.value.type == "not_found_error"


def test_count_tokens_uses_the_same_estimate_and_checks(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(
        model="claude-haiku-4-5", system="be brief", messages=[{"role": "user", "content": "hello there"}]
    )
    assert counted.input_tokens == -(-len("be briefhello there") // 4)
    batch = client.messages.batches.create(requests=[req("a", "hello there", system="be brief")])
    [line] = results_by_id(client, batch.id).values()
    assert line.message.usage.input_tokens == counted.input_tokens

    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.count_tokens(model="m", messages=[{"role": "robot", "content": "x"}])
    assert str(info.value.api_message).startswith("messages.0.role:")
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.count_tokens(model="m", messages=[], extra_body={"max_tokens": 5})
    assert str(info.value.api_message) == "max_tokens: Extra inputs are not permitted"
