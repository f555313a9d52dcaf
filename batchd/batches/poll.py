"""Following one open batch until it ends, then handing it to the fan-out."""

from __future__ import annotations

import logging
import random

import anthropic

from .. import metrics
from ..logs import log_event
from ..settings import Settings
from ..store import BatchState
from .context import Context, RetryLater, backoff, retry_after
from .fanout import fanout_results
from .lost import note_missing

__all__ = ["poll_batch", "poll_delay"]

log = logging.getLogger(__name__)


async def poll_batch(ctx: Context, batch_id: str) -> str:
    """Check one open batch; when it has ended, fan its results out. Raises RetryLater until then."""
    store = ctx.store
    record = await store.batch(batch_id)
    if record is None or record.state is BatchState.DONE:
        return BatchState.DONE.value
    metrics.API_REQUESTS.labels(op="retrieve").inc()
    try:
        headers = (await store.batch_headers(record.group)).http_headers()
        batch = await ctx.api.messages.batches.retrieve(batch_id, extra_headers=headers)
    except anthropic.NotFoundError as exc:
        metrics.count_api_error("retrieve", exc)
        return await note_missing(ctx, record)
    except anthropic.APIStatusError as exc:
        metrics.count_api_error("retrieve", exc)
        errors = await store.count_batch_error(batch_id)
        raise RetryLater(retry_after(exc) or backoff(errors), f"retrieve: HTTP {exc.status_code}") from exc
    except anthropic.APIConnectionError as exc:
        metrics.count_api_error("retrieve", exc)
        errors = await store.count_batch_error(batch_id)
        raise RetryLater(backoff(errors), f"retrieve: {type(exc).__name__}") from exc
    metrics.count_api_success("retrieve")
    if record.errors or not record.seen or record.missing_since_ms is not None:
        await store.note_batch_found(record)  # backoff counts consecutive errors only
    if batch.processing_status != "ended":
        polls = await store.count_poll(batch_id)
        raise RetryLater(poll_delay(ctx.settings, polls), f"batch {batch.processing_status}")
    log_event(log, "batch.ended", batch_id=batch_id, **batch.request_counts.model_dump())
    return await fanout_results(ctx, batch_id)


def poll_delay(settings: Settings, polls: int) -> float:
    """From poll_min_seconds, doubling each poll, up to poll_max_seconds, with 10 % jitter."""
    base = min(settings.poll_max_seconds, settings.poll_min_seconds * 2 ** min(polls - 1, 30))
    return float(base * (0.9 + 0.2 * random.random()))
