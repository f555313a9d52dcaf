"""Batches the API no longer has: a batch that answers 404 (retrieve or results) long enough is given up,
and its requests go back to the queue."""

from __future__ import annotations

import logging

from .. import metrics
from ..logs import log_event
from ..store import BatchRecord, custom_id_for, now_ms
from .context import Context
from .deliver import deliver_lines
from .resultline import errored_line

__all__ = ["LOST_AFTER_S", "UNSEEN_LOST_AFTER_S", "lose_batch", "note_missing"]

log = logging.getLogger(__name__)

# A batch that was found before and now answers 404 this long (deleted by someone, or forgotten by an API
# that restarted) is lost: its requests go back to the queue. A new batch may 404 for a while as it
# propagates (API reference, pain point 4), so one never found is given UNSEEN_LOST_AFTER_S from create.
LOST_AFTER_S = 30.0
UNSEEN_LOST_AFTER_S = 300.0
_DELIVER_CHUNK = 500


async def note_missing(ctx: Context, record: BatchRecord) -> bool:
    """The API does not have this batch right now (a 404, or absent from a list that reached it). True if
    it is now given up as lost (its requests are back in the queue); False: wait and look again."""
    since = await ctx.store.note_batch_missing(record.batch_id)
    now = now_ms()
    # Found before: lost once missing for LOST_AFTER_S. Never found: give it UNSEEN_LOST_AFTER_S from create.
    seen_lost_at = since + LOST_AFTER_S * 1000
    lost_at = seen_lost_at if record.seen else record.created_ms + UNSEEN_LOST_AFTER_S * 1000
    if now < lost_at:
        return False
    await lose_batch(ctx, record, f"not found for {(now - since) / 1000:.0f}s")
    return True


async def lose_batch(ctx: Context, record: BatchRecord, why: str) -> str:
    """Give up a batch the API no longer has: every request still waiting on it goes back to the queue under
    a fresh custom id (or, out of attempts, is answered with an api_error saying so)."""
    unanswered = await ctx.store.unanswered(record.fid) if record.fid else []
    message = f"batch {record.batch_id} was lost by the API ({why}); its requests were sent again"
    lines = [
        errored_line(custom_id_for(rid, attempt), "api_error", message, None) for rid, attempt in unanswered
    ]
    for start in range(0, len(lines), _DELIVER_CHUNK):
        await deliver_lines(ctx, lines[start : start + _DELIVER_CHUNK])
    await ctx.store.finish_batch(record, lines=0, ttl_seconds=ctx.settings.result_ttl_seconds)
    metrics.BATCHES_LOST.inc()
    log_event(
        log,
        "batch.lost",
        batch_id=record.batch_id,
        flush=record.fid,
        requests=len(unanswered),
        reason=why,
        level=logging.ERROR,
    )
    return "lost"
