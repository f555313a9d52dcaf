"""Delivering results lines: each to its caller, or back to the queue for another attempt."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from .. import metrics
from ..store import Charge, DeliverOutcome, Delivery, now_ms
from .context import Context
from .resultline import ResultLine, parse_line

__all__ = ["Prepared", "deliver_lines", "deliver_prepared", "prepare_lines"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Prepared:
    """Results lines parsed and made ready for deliver.lua (the CPU-bound half of a delivery)."""

    parsed: list[ResultLine]
    deliveries: list[Delivery]
    malformed: int


def prepare_lines(lines: Sequence[bytes], *, allow_retry: bool = True) -> Prepared:
    """Parse the lines and price the succeeded ones. Malformed lines are logged and counted."""
    parsed: list[ResultLine] = []
    malformed = 0
    for raw in lines:
        try:
            parsed.append(parse_line(raw))
        except Exception:
            malformed += 1
            log.warning("skipping a malformed results line: %.200r", raw)
    return Prepared(parsed, [p.delivery(allow_retry=allow_retry) for p in parsed], malformed)


async def deliver_lines(
    ctx: Context,
    lines: Sequence[bytes],
    *,
    allow_retry: bool = True,
    batch_id: str | None = None,
    settled: set[str] | None = None,
) -> dict[str, int]:
    """Deliver each results line (one script call). Malformed lines are counted and skipped.
    ``batch_id``: the batch the lines come from, whose succeeded lines are charged once each.
    ``settled``: gets the id of every request a line left waiting on no batch (answered, sent back to the
    queue, or answered already)."""
    return await deliver_prepared(
        ctx, prepare_lines(lines, allow_retry=allow_retry), batch_id=batch_id, settled=settled
    )


async def deliver_prepared(
    ctx: Context, prepared: Prepared, *, batch_id: str | None = None, settled: set[str] | None = None
) -> dict[str, int]:
    """The script call of deliver_lines, and the metrics of its outcome."""
    parsed, deliveries = prepared.parsed, prepared.deliveries
    tally = {"delivered": 0, "requeued": 0, "duplicate": 0, "stale": 0, "malformed": prepared.malformed}
    replies = await ctx.store.scripts.deliver(
        deliveries,
        max_attempts=ctx.settings.max_attempts,
        ttl_seconds=ctx.settings.result_ttl_seconds,
        batch_id=batch_id,
        dedupe_window=ctx.settings.dedupe_window,
    )
    at = now_ms()
    # Counted per chunk, not per line: a prometheus label lookup and increment cost microseconds each.
    results: dict[str, int] = {}
    charges: list[Charge] = []
    followers = 0
    for line, delivery, reply in zip(parsed, deliveries, replies, strict=True):
        if reply.outcome is DeliverOutcome.DELIVERED:
            tally["delivered"] += 1
            results[line.type] = results.get(line.type, 0) + 1
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
        if settled is not None and reply.outcome is not DeliverOutcome.STALE:
            settled.add(line.rid)
        if reply.charged and delivery.charge is not None:
            # Billed once per custom id, delivered or dropped as stale or duplicate (the ledger agrees).
            charges.append(delivery.charge)
        followers += reply.followers
    for rtype, n in results.items():
        metrics.RESULTS.labels(type=rtype).inc(n)
    metrics.record_charges(charges)
    if followers:
        metrics.REQUESTS_DEDUPED.labels(how="coalesced").inc(followers)
    return tally
