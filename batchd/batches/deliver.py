"""Delivering results lines: each to its caller, or back to the queue for another attempt."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from .. import metrics
from ..store import DeliverOutcome, now_ms
from .context import Context
from .resultline import ResultLine, parse_line

__all__ = ["deliver_lines"]

log = logging.getLogger(__name__)


async def deliver_lines(
    ctx: Context, lines: Sequence[bytes], *, allow_retry: bool = True, batch_id: str | None = None
) -> dict[str, int]:
    """Deliver each results line (one script call). Malformed lines are counted and skipped.
    ``batch_id``: the batch the lines come from, whose succeeded lines are charged once each."""
    parsed: list[ResultLine] = []
    tally = {"delivered": 0, "requeued": 0, "duplicate": 0, "stale": 0, "malformed": 0}
    for raw in lines:
        try:
            parsed.append(parse_line(raw))
        except Exception:
            tally["malformed"] += 1
            log.warning("skipping a malformed results line: %.200r", raw)
    deliveries = [p.delivery(allow_retry=allow_retry) for p in parsed]
    replies = await ctx.store.scripts.deliver(
        deliveries,
        max_attempts=ctx.settings.max_attempts,
        ttl_seconds=ctx.settings.result_ttl_seconds,
        batch_id=batch_id,
        dedupe_window=ctx.settings.dedupe_window,
    )
    at = now_ms()
    for line, delivery, reply in zip(parsed, deliveries, replies, strict=True):
        if reply.outcome is DeliverOutcome.DELIVERED:
            tally["delivered"] += 1
            metrics.RESULTS.labels(type=line.type).inc()
            if reply.enqueued_ms:
                metrics.REQUEST_LATENCY.observe(max(0.0, (at - reply.enqueued_ms) / 1000))
        elif reply.outcome is DeliverOutcome.REQUEUED:
            tally["requeued"] += 1
            reason = "expired" if line.type == "expired" else line.error_type
            metrics.REQUESTS_RETRIED.labels(reason=metrics.retry_reason(reason)).inc()
        elif reply.outcome is DeliverOutcome.DUPLICATE:
            tally["duplicate"] += 1
        else:
            tally["stale"] += 1
        if reply.charged and delivery.charge is not None:
            # Billed once per custom id, delivered or dropped as stale or duplicate (the ledger agrees).
            metrics.record_charge(delivery.charge)
        if reply.followers:
            metrics.REQUESTS_DEDUPED.labels(how="coalesced").inc(reply.followers)
    return tally
