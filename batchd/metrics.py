"""Prometheus metrics of one daemon replica (served by ``ops.py``).

Every metric lives in :data:`REGISTRY` (not prometheus_client's global one), so importing batchd never adds
series to an application's own registry. Every label takes values from a small fixed set, listed on each
metric below; free-form values (model ids, exception types, API error types) pass through a helper that
folds the unknown into a bucket ("other", "client", ...), so a caller cannot create unbounded series.

Counters count what *this replica* did; sum them across replicas. The queue gauges are different: they are
read from the shared Redis, so only the replica holding the metrics-leader lease exports them (see
:class:`QueueGauges`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import anthropic
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import pricing
from .apihealth import api_health
from .store import Charge, QueueSnapshot
from .version import __version__

__all__ = [
    "API_ERRORS",
    "API_ERROR_KINDS",
    "API_HEALTHY",
    "API_OPS",
    "API_REQUESTS",
    "API_THROTTLED_SECONDS",
    "BATCHES_CANCELED",
    "BATCHES_CREATED",
    "BATCHES_LOST",
    "BATCH_REQUESTS",
    "BATCH_TRIGGERS",
    "BUILD_INFO",
    "COST_USD",
    "DEDUPE_KINDS",
    "OTHER_MODEL",
    "REALTIME_REASONS",
    "REALTIME_REQUESTS",
    "REGISTRY",
    "REQUESTS_DEDUPED",
    "REQUESTS_RETRIED",
    "REQUESTS_SUBMITTED",
    "REQUEST_LATENCY",
    "RESULTS",
    "RESULT_TYPES",
    "RETRY_REASONS",
    "SAVINGS_USD",
    "TOKENS",
    "TOKEN_KINDS",
    "QueueGauges",
    "classify_api_error",
    "count_api_error",
    "count_api_success",
    "model_label",
    "queue_gauges",
    "record_charge",
    "record_usage",
    "retry_reason",
    "trigger_label",
]

REGISTRY = CollectorRegistry(auto_describe=True)

# The closed sets of label values.
RETRY_REASONS = ("expired", "api_error", "overloaded_error", "other")
RESULT_TYPES = ("succeeded", "errored", "canceled", "expired")
BATCH_TRIGGERS = ("count", "bytes", "age", "prime")
DEDUPE_KINDS = ("coalesced", "stored")
API_OPS = ("create", "retrieve", "results", "list", "cancel", "messages")
REALTIME_REASONS = ("route", "deadline", "deadline_at_submit")
API_ERROR_KINDS = ("rate_limit", "overloaded", "server", "connection", "not_found", "client", "timeout")
TOKEN_KINDS = ("input", "output", "cache_write", "cache_read")
OTHER_MODEL = "other"

REQUESTS_SUBMITTED = Counter(
    "batchd_requests_submitted_total",
    "Requests this replica took from intake on their first attempt (resubmissions count as retries).",
    registry=REGISTRY,
)
REQUESTS_RETRIED = Counter(
    "batchd_requests_retried_total",
    "Requests sent back to intake for another attempt. reason: expired|api_error|overloaded_error|other.",
    ["reason"],
    registry=REGISTRY,
)
REALTIME_REQUESTS = Counter(
    "batchd_realtime_requests_total",
    "Requests answered through the real-time Messages API, at standard prices. reason: route (asked for real "
    "time), deadline (auto: its batch had not answered by the deadline less the margin), deadline_at_submit "
    "(auto: no batch could have met the deadline).",
    ["reason"],
    registry=REGISTRY,
)
BATCHES_CANCELED = Counter(
    "batchd_batches_canceled_total",
    "Batches batchd canceled because every request in them had its answer from the real-time API.",
    registry=REGISTRY,
)
REQUESTS_DEDUPED = Counter(
    "batchd_requests_deduped_total",
    "Deduped requests answered without being sent: coalesced (an identical request was in flight; counted "
    "by the replica that delivered it) or stored (an identical request's stored answer, reused at submit; "
    "counted by the submitting process). The ledger's reused_requests and savings count both.",
    ["how"],
    registry=REGISTRY,
)
RESULTS = Counter(
    "batchd_results_total",
    "Final answers delivered to callers. type: succeeded|errored|canceled|expired.",
    ["type"],
    registry=REGISTRY,
)
BATCHES_CREATED = Counter(
    "batchd_batches_created_total",
    "Message Batches created, by the limit that closed them. trigger: count|bytes|age|prime (a primer of a "
    "prompt-cache prefix).",
    ["trigger"],
    registry=REGISTRY,
)
BATCHES_LOST = Counter(
    "batchd_batches_lost_total",
    "Batches the API no longer had (404 long after create, deleted or forgotten); their requests went back "
    "to the queue.",
    registry=REGISTRY,
)
BATCH_REQUESTS = Histogram(
    "batchd_batch_requests",
    "Requests per created batch.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000),
    registry=REGISTRY,
)
REQUEST_LATENCY = Histogram(
    "batchd_request_latency_seconds",
    "Time from submit to the answer being delivered, per request (0.5 s to the API's 24 h window).",
    buckets=(
        0.5,
        1,
        2,
        5,
        10,
        30,
        60,
        120,
        300,
        600,
        1_200,
        1_800,
        3_600,
        7_200,
        14_400,
        28_800,
        43_200,
        86_400,
    ),
    registry=REGISTRY,
)
COST_USD = Counter(
    "batchd_cost_usd_total",
    "USD billed for succeeded results lines at batch prices (once per custom id, delivered or dropped as "
    "stale or duplicate), and for real-time answers of routed requests at standard prices. model: a "
    "price-table base id, or 'other' (uncosted).",
    ["model"],
    registry=REGISTRY,
)
SAVINGS_USD = Counter(
    "batchd_savings_usd_total",
    "USD saved against standard prices on billed results lines. model: as batchd_cost_usd_total.",
    ["model"],
    registry=REGISTRY,
)
TOKENS = Counter(
    "batchd_tokens_total",
    "Tokens billed on results lines (as batchd_cost_usd_total). model: a price-table base id or 'other'; "
    "kind: input|output|cache_write|cache_read.",
    ["model", "kind"],
    registry=REGISTRY,
)
API_REQUESTS = Counter(
    "batchd_api_requests_total",
    "Calls to the Message Batches API, and real-time Messages calls (op messages) for routed requests (SDK "
    "retries inside one call count once). op: create|retrieve|results|list|cancel|messages.",
    ["op"],
    registry=REGISTRY,
)
API_ERRORS = Counter(
    "batchd_api_errors_total",
    "Message Batches API calls that failed. op: as batchd_api_requests_total; "
    "kind: rate_limit|overloaded|server|connection|not_found|client|timeout.",
    ["op", "kind"],
    registry=REGISTRY,
)
BUILD_INFO = Info("batchd_build", "The running batchd version.", registry=REGISTRY)
API_THROTTLED_SECONDS = Counter(
    "batchd_api_throttled_seconds_total",
    "Seconds this replica's calls waited for a slot of the shared requests-per-minute budget "
    "(BATCHD_API_RPM, or the tier's).",
    registry=REGISTRY,
)
API_HEALTHY = Gauge(
    "batchd_api_healthy",
    "1 while this replica's calls to the Anthropic API succeed, 0 once they all fail (no answer, 401, 403, "
    "429, 5xx) until one succeeds again.",
    registry=REGISTRY,
)
API_HEALTHY.set(1)


BUILD_INFO.info({"version": __version__})

# Create every bounded series now, so a dashboard sees 0 rather than "no data" before the first event.
for _reason in RETRY_REASONS:
    REQUESTS_RETRIED.labels(reason=_reason)
for _type in RESULT_TYPES:
    RESULTS.labels(type=_type)
for _trigger in BATCH_TRIGGERS:
    BATCHES_CREATED.labels(trigger=_trigger)
for _how in DEDUPE_KINDS:
    REQUESTS_DEDUPED.labels(how=_how)
for _why in REALTIME_REASONS:
    REALTIME_REQUESTS.labels(reason=_why)
for _model in (*pricing.known_models(), OTHER_MODEL):
    COST_USD.labels(model=_model)
    SAVINGS_USD.labels(model=_model)
for _op in API_OPS:
    API_REQUESTS.labels(op=_op)
    for _kind in API_ERROR_KINDS:
        API_ERRORS.labels(op=_op, kind=_kind)


# --- bounded label helpers ----------------------------------------------------------------------------------


def model_label(model: str) -> str:
    """The ``model`` label for a model id: its price-table base id (dated ids folded in), else "other"."""
    price = pricing.price_for(model)
    return price.model if price is not None else OTHER_MODEL


def trigger_label(trigger: str) -> str:
    """The ``trigger`` label of a flush's trigger (anything unknown counts as "age")."""
    return trigger if trigger in BATCH_TRIGGERS else "age"


def retry_reason(error_type: str | None) -> str:
    """The ``reason`` label for a retried request: "expired", the API's retryable error type, or "other"."""
    return error_type if error_type in RETRY_REASONS else "other"


def classify_api_error(exc: BaseException) -> str:
    """The ``kind`` label of an exception from an API call (always one of :data:`API_ERROR_KINDS`).

    SDK timeouts and HTTP 408 -> timeout; other transport failures -> connection; 429 -> rate_limit (including
    spend-limit 429s); 529 -> overloaded; 404 -> not_found; other 5xx -> server; anything else, including
    other 4xx and non-HTTP errors raised by the SDK locally, -> client.
    """
    # APITimeoutError subclasses APIConnectionError: test it first.
    if isinstance(exc, anthropic.APITimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, anthropic.APIConnectionError | ConnectionError):
        return "connection"
    if isinstance(exc, anthropic.APIStatusError):
        status = exc.status_code
        if status == 429:
            return "rate_limit"
        if status == 529 or isinstance(exc, anthropic.OverloadedError):
            return "overloaded"
        if status == 404:
            return "not_found"
        if status == 408:
            return "timeout"
        if status >= 500:
            return "server"
    return "client"


def count_api_error(op: str, exc: BaseException) -> str:
    """Count one failed API call (``op`` in :data:`API_OPS`) and return its kind."""
    kind = classify_api_error(exc)
    API_ERRORS.labels(op=op, kind=kind).inc()
    status = exc.status_code if isinstance(exc, anthropic.APIStatusError) else None
    api_health.failed(status, f"{op}: {status or type(exc).__name__} {kind}")
    API_HEALTHY.set(api_health.state().healthy)
    return kind


def count_api_success(op: str) -> None:
    """One API call answered (``op`` in :data:`API_OPS`); failures are counted by count_api_error."""
    api_health.succeeded()
    API_HEALTHY.set(1)


def record_usage(model: str, usage: Mapping[str, Any]) -> float | None:
    """Count a billed message's tokens, cost and savings; return its batch cost (None: unpriced)."""
    from .ledger import charge_of  # the ledger imports the store, which this module's users may not need

    return record_charge(charge_of({"model": model, "usage": usage}))


def record_charges(charges: Iterable[Charge]) -> None:
    """``record_charge`` for many answers (a fan-out chunk): summed first, so each counter is incremented
    once per model and kind rather than once per answer."""
    tokens: dict[tuple[str, str], int] = {}
    money: dict[str, list[int]] = {}
    for charge in charges:
        label = charge.model if charge.priced else OTHER_MODEL
        for kind, n in (
            ("input", charge.input),
            ("output", charge.output),
            ("cache_write", charge.cache_write_5m + charge.cache_write_1h),
            ("cache_read", charge.cache_read),
        ):
            if n:
                tokens[label, kind] = tokens.get((label, kind), 0) + n
        if charge.priced:
            sums = money.setdefault(label, [0, 0])
            sums[0] += charge.cost
            sums[1] += charge.standard - charge.cost
    for (label, kind), n in tokens.items():
        TOKENS.labels(model=label, kind=kind).inc(n)
    for label, (cost, saved) in money.items():
        COST_USD.labels(model=label).inc(cost / pricing.PICO)
        SAVINGS_USD.labels(model=label).inc(saved / pricing.PICO)


def record_charge(charge: Charge) -> float | None:
    """Count a billed answer's tokens, cost and savings, as the ledger charged it; its batch cost in USD
    (None: unpriced)."""
    record_charges([charge])
    return charge.cost / pricing.PICO if charge.priced else None


# --- queue gauges, exported by the metrics leader only ------------------------------------------------------


_QUEUE_FAMILIES: tuple[tuple[str, str, Callable[[QueueSnapshot], float]], ...] = (
    (
        "batchd_intake_pending_requests",
        "Requests queued in intake and not yet flushed.",
        lambda s: s.pending_requests,
    ),
    (
        "batchd_intake_pending_bytes",
        "Bytes of requests queued in intake and not yet flushed.",
        lambda s: s.pending_bytes,
    ),
    (
        "batchd_intake_oldest_age_seconds",
        "Age of the oldest request in intake (0 if empty).",
        lambda s: s.oldest_age_seconds or 0.0,
    ),
    ("batchd_open_batches", "Message Batches created and not yet fanned out.", lambda s: s.open_batches),
    (
        "batchd_api_queue_requests",
        "Requests in batches created and not yet fanned out: batchd's share of the API's processing queue.",
        lambda s: s.open_requests,
    ),
    (
        "batchd_held_by_queue_cap",
        "1 while sealed flushes wait for room in the API's processing queue (BATCHD_API_QUEUE_LIMIT).",
        lambda s: 1.0 if s.held_by_queue_cap else 0.0,
    ),
    (
        "batchd_routed_requests",
        "Routed requests (realtime, or auto with a deadline) not yet answered by a real-time call or their "
        "batch.",
        lambda s: s.routed_requests,
    ),
    ("batchd_replicas", "Daemon replicas with a recent heartbeat.", lambda s: s.alive_replicas),
)


class QueueGauges(Collector):
    """Gauges of the shared queue: batchd_intake_pending_requests, batchd_intake_pending_bytes,
    batchd_intake_oldest_age_seconds, batchd_open_batches, batchd_api_queue_requests,
    batchd_held_by_queue_cap, batchd_routed_requests and batchd_replicas (no labels).

    Every replica could read these from Redis, and summing them across replicas would multiply them. So the
    daemon calls :meth:`update` only on the replica holding the metrics-leader lease, and :meth:`clear` on
    every other one (and on losing the lease): a non-leader exports NO samples at all for these families,
    and ``sum()`` or ``max()`` over replicas gives the true value.
    """

    def __init__(self) -> None:
        self._snapshot: QueueSnapshot | None = None

    @property
    def snapshot(self) -> QueueSnapshot | None:
        return self._snapshot

    def update(self, snapshot: QueueSnapshot) -> None:
        # One reference swap: a scrape sees the old snapshot or the new one, never a mix.
        self._snapshot = snapshot

    def clear(self) -> None:
        self._snapshot = None

    def describe(self) -> Iterable[Metric]:
        # Names for the registry's duplicate check, whether or not we hold a snapshot right now.
        return [GaugeMetricFamily(name, doc) for name, doc, _ in _QUEUE_FAMILIES]

    def collect(self) -> Iterable[Metric]:
        snapshot = self._snapshot
        if snapshot is None:
            return []
        return [GaugeMetricFamily(name, doc, value=value(snapshot)) for name, doc, value in _QUEUE_FAMILIES]


queue_gauges = QueueGauges()
REGISTRY.register(queue_gauges)
