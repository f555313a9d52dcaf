"""Upkeep: seal flushes a stopped replica left building, and make sure every piece of work has its job."""

from __future__ import annotations

import logging

from ..store import FlushState, Trigger, now_ms
from .context import Context

__all__ = ["STALE_BUILDING_S", "reconcile"]

log = logging.getLogger(__name__)

# A flush still 'building' this long after it started belongs to an accumulator that died mid-flush.
STALE_BUILDING_S = 60.0


async def reconcile(ctx: Context) -> dict[str, int]:
    """Safe to run anywhere and often: seal abandoned flushes, make sure every sealed flush has a submit job
    (the job ids make re-enqueueing a no-op), and recount the requests in open batches (the API queue's
    share that is ours). Open batches need nothing here: the poller looks at every one each tick."""
    store = ctx.store
    counts = {"sealed": 0, "submit": 0}
    if not await store.take_reconcile_turn(ms=4000):
        return counts
    now = now_ms()
    for fid, state, created_ms in await store.pending_flushes():
        if state is FlushState.BUILDING and now - created_ms > STALE_BUILDING_S * 1000:
            n = await store.scripts.seal_flush(fid, Trigger.AGE, now_ms=now)
            if n:
                log.warning("sealed flush %s (%s requests) left unsealed by a stopped replica", fid, n)
                counts["sealed"] += 1
                state = FlushState.SEALED
        if state in (FlushState.SEALED, FlushState.SUBMITTING):
            await ctx.scheduler.submit(fid)
            counts["submit"] += 1
        elif state is not FlushState.BUILDING:
            await store.forget_flush(fid)
    await store.recount_open_requests()
    return counts
