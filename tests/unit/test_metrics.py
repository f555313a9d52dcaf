from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator

import aiohttp
import anthropic
import httpx2
import pytest
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from batchd import metrics
from batchd.health import Health
from batchd.httpserver import Site
from batchd.metrics import (
    API_ERROR_KINDS,
    REGISTRY,
    classify_api_error,
    model_label,
    queue_gauges,
    record_usage,
    retry_reason,
)
from batchd.ops import start_ops_server
from batchd.store import QueueSnapshot
from batchd.version import __version__

QUEUE_FAMILIES = (
    "batchd_intake_pending_requests",
    "batchd_intake_pending_bytes",
    "batchd_intake_oldest_age_seconds",
    "batchd_open_batches",
    "batchd_api_queue_requests",
    "batchd_held_by_queue_cap",
    "batchd_routed_requests",
    "batchd_replicas",
)


@pytest.fixture(autouse=True)
def _no_leader_state() -> Iterator[None]:
    queue_gauges.clear()
    yield
    queue_gauges.clear()


def value(name: str, **labels: str) -> float:
    found = REGISTRY.get_sample_value(name, labels)
    return 0.0 if found is None else found


def exposition() -> str:
    return generate_latest(REGISTRY).decode()


# --- labels -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "label"),
    [
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
        ("claude-opus-4-0", "claude-opus-4"),
        ("claude-sonnet-4-6", "claude-sonnet-4-6"),
        ("claude-opus-4-9", "other"),
        ("my-fine-tune", "other"),
        ("", "other"),
    ],
)
def test_model_label_is_bounded(model: str, label: str) -> None:
    assert model_label(model) == label


@pytest.mark.parametrize(
    ("error_type", "reason"),
    [
        ("expired", "expired"),
        ("api_error", "api_error"),
        ("overloaded_error", "overloaded_error"),
        ("timeout_error", "other"),
        (None, "other"),
    ],
)
def test_retry_reason(error_type: str | None, reason: str) -> None:
    assert retry_reason(error_type) == reason


REQUEST = httpx2.Request("POST", "http://127.0.0.1/v1/messages/batches")


def status_error(cls: type[anthropic.APIStatusError], status: int) -> anthropic.APIStatusError:
    return cls("error", response=httpx2.Response(status, request=REQUEST), body=None)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (status_error(anthropic.RateLimitError, 429), "rate_limit"),
        (status_error(anthropic.InternalServerError, 500), "server"),
        (status_error(anthropic.ServiceUnavailableError, 503), "server"),
        (status_error(anthropic.OverloadedError, 529), "overloaded"),
        (status_error(anthropic.APIStatusError, 529), "overloaded"),
        (status_error(anthropic.NotFoundError, 404), "not_found"),
        (status_error(anthropic.BadRequestError, 400), "client"),
        (status_error(anthropic.AuthenticationError, 401), "client"),
        (status_error(anthropic.ContentTooLargeError, 413), "client"),
        (status_error(anthropic.RequestTimeoutError, 408), "timeout"),
        (anthropic.APITimeoutError(request=REQUEST), "timeout"),
        (anthropic.APIConnectionError(request=REQUEST), "connection"),
        (TimeoutError(), "timeout"),
        (ConnectionResetError(), "connection"),
        (anthropic.AnthropicError("No `results_url` for the given batch"), "client"),
        (ValueError("odd"), "client"),
    ],
)
def test_classify_api_error(exc: BaseException, kind: str) -> None:
    assert classify_api_error(exc) == kind
    assert kind in API_ERROR_KINDS


def test_count_api_error() -> None:
    before = value("batchd_api_errors_total", op="create", kind="overloaded")
    assert metrics.count_api_error("create", status_error(anthropic.OverloadedError, 529)) == "overloaded"
    assert value("batchd_api_errors_total", op="create", kind="overloaded") == before + 1


# --- usage --------------------------------------------------------------------------------------------------


def test_record_usage_counts_tokens_cost_and_savings() -> None:
    def snap() -> list[float]:
        return [
            value("batchd_tokens_total", model="claude-haiku-4-5", kind=kind)
            for kind in ("input", "output", "cache_write", "cache_read")
        ] + [
            value("batchd_cost_usd_total", model="claude-haiku-4-5"),
            value("batchd_savings_usd_total", model="claude-haiku-4-5"),
        ]

    before = snap()
    usage = {
        "input_tokens": 1000,
        "output_tokens": 500,
        "cache_creation_input_tokens": 2000,
        "cache_read_input_tokens": 10_000,
    }
    # Hand-worked in test_pricing: $0.007 standard, $0.0035 at batch prices.
    assert record_usage("claude-haiku-4-5-20251001", usage) == pytest.approx(0.0035)
    deltas = [b - a for a, b in zip(before, snap(), strict=True)]
    assert deltas == pytest.approx([1000, 500, 2000, 10_000, 0.0035, 0.0035])


def test_record_usage_unknown_model_counts_tokens_only() -> None:
    before_tokens = value("batchd_tokens_total", model="other", kind="output")
    before_cost = value("batchd_cost_usd_total", model="other")
    assert record_usage("someone-elses-model", {"input_tokens": 3, "output_tokens": 4}) is None
    assert value("batchd_tokens_total", model="other", kind="output") == before_tokens + 4
    assert value("batchd_cost_usd_total", model="other") == before_cost


# --- queue gauges -------------------------------------------------------------------------------------------


def snapshot(
    *, pending_requests: int, pending_bytes: int, oldest_age_seconds: float, open_batches: int, alive: int
) -> QueueSnapshot:
    return QueueSnapshot(
        at_ms=0,
        pending_requests=pending_requests,
        pending_bytes=pending_bytes,
        oldest_age_seconds=oldest_age_seconds,
        read_not_flushed=0,
        flushes_waiting=0,
        open_batches=open_batches,
        open_requests=open_batches * 100,
        held_by_queue_cap=True,
        routed_requests=7,
        replicas={f"r{i}": 0 for i in range(alive)},
        alive_replicas=alive,
    )


def test_queue_gauges_only_when_set() -> None:
    text = exposition()
    for family in QUEUE_FAMILIES:
        assert family not in text  # a non-leader exports nothing, not even HELP/TYPE
    queue_gauges.update(
        snapshot(pending_requests=812, pending_bytes=4096, oldest_age_seconds=2.5, open_batches=3, alive=2)
    )
    assert value("batchd_intake_pending_requests") == 812
    assert value("batchd_intake_pending_bytes") == 4096
    assert value("batchd_intake_oldest_age_seconds") == 2.5
    assert value("batchd_open_batches") == 3
    assert value("batchd_api_queue_requests") == 300
    assert value("batchd_held_by_queue_cap") == 1
    assert value("batchd_routed_requests") == 7
    assert value("batchd_replicas") == 2
    assert "# TYPE batchd_replicas gauge" in exposition()
    queue_gauges.clear()
    assert queue_gauges.snapshot is None
    assert REGISTRY.get_sample_value("batchd_replicas") is None


def test_bounded_series_exist_before_first_event() -> None:
    assert REGISTRY.get_sample_value("batchd_results_total", {"type": "expired"}) is not None
    assert (
        REGISTRY.get_sample_value("batchd_api_errors_total", {"op": "cancel", "kind": "timeout"}) is not None
    )
    assert REGISTRY.get_sample_value("batchd_build_info", {"version": __version__}) == 1


# --- HTTP and promtool --------------------------------------------------------------------------------------


def exercise_everything() -> None:
    metrics.REQUESTS_SUBMITTED.inc(5)
    metrics.REQUESTS_RETRIED.labels(reason=retry_reason("expired")).inc()
    metrics.RESULTS.labels(type="succeeded").inc(4)
    metrics.BATCHES_CREATED.labels(trigger="age").inc()
    metrics.BATCH_REQUESTS.observe(5)
    metrics.REQUEST_LATENCY.observe(42.0)
    record_usage("claude-sonnet-4-6", {"input_tokens": 10, "output_tokens": 20, "cache_read_input_tokens": 5})
    metrics.API_REQUESTS.labels(op="create").inc()
    metrics.count_api_error("retrieve", status_error(anthropic.NotFoundError, 404))
    queue_gauges.update(
        snapshot(pending_requests=1, pending_bytes=100, oldest_age_seconds=0.5, open_batches=1, alive=1)
    )


async def test_metrics_endpoint_passes_promtool() -> None:
    exercise_everything()
    server = await start(Health())
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{server.port}/metrics") as response,
        ):
            assert response.status == 200
            assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
            body = await response.text()
    finally:
        await server.close()
    for name in (
        "batchd_requests_submitted_total",
        "batchd_requests_retried_total",
        "batchd_results_total",
        "batchd_batches_created_total",
        "batchd_batch_requests_bucket",
        "batchd_request_latency_seconds_bucket",
        "batchd_cost_usd_total",
        "batchd_savings_usd_total",
        "batchd_tokens_total",
        "batchd_api_requests_total",
        "batchd_api_errors_total",
        "batchd_build_info",
        *QUEUE_FAMILIES,
    ):
        assert f"\n{name}" in body, name
    assert 'batchd_request_latency_seconds_bucket{le="86400.0"}' in body
    assert 'batchd_batch_requests_bucket{le="100000.0"}' in body

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus'): exposition not linted")
    proc = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(body.encode()), timeout=30)
    assert proc.returncode == 0, output.decode()


async def start(health: Health) -> Site:
    return await start_ops_server("127.0.0.1", 0, health)


async def test_server_port_and_close() -> None:
    server = await start(Health())
    port = server.port
    assert port > 0
    await server.close()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics"):
            pass


async def test_port_in_use_is_an_error() -> None:
    first = await start(Health())
    try:
        with pytest.raises(OSError):
            await start_ops_server("127.0.0.1", first.port, Health())
    finally:
        await first.close()
