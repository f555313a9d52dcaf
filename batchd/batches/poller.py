"""Polling the open batches by list: API calls spent on polling do not grow with the number of batches.

One ``batches.list`` page (1,000 batches, newest first) covers every open batch created since the oldest on
it, so one call per tick polls up to a thousand open batches, and a few pages cover thousands. A batch the
pages do not reach (older than the newest thousands on the key) is retrieved on its own, a few per tick.
The replica holding the poller lease runs a tick every ``poll_interval_seconds``; an ended batch gets a
fan-out job, so its end is noticed within one tick.
"""

from __future__ import annotations

import logging

import anthropic
from anthropic.types.messages import MessageBatch

from .. import metrics
from ..logs import log_event
from ..store import BatchHeaders, BatchRecord
from .context import Context
from .lost import note_missing

__all__ = ["PAGE_SIZE", "poll_open_batches"]

log = logging.getLogger(__name__)

PAGE_SIZE = 1000  # the API's largest page
_MAX_PAGES = 3  # per tick and workspace: the newest 3,000 batches
_MAX_RETRIEVES = 5  # per tick: open batches the pages did not reach (or did not show), oldest checks first


async def poll_open_batches(ctx: Context) -> dict[str, int]:
    """One tick: look at every open batch; fan-out jobs for the ended ones; missing ones toward lost."""
    tally = {"open": 0, "list_calls": 0, "retrieves": 0, "ended": 0, "missing": 0, "lost": 0}
    records = await ctx.store.open_batches()
    tally["open"] = len(records)
    if not records:
        return tally  # nothing open: no API call at all
    # A list shows one workspace's batches: poll each workspace (and user profile) the batches were made in.
    scopes: dict[tuple[str | None, str | None], list[BatchRecord]] = {}
    for record in records:
        headers = await ctx.store.batch_headers(record.group)
        scopes.setdefault((headers.workspace_id, headers.user_profile_id), []).append(record)
    for (workspace, profile), scoped in scopes.items():
        scope = BatchHeaders(workspace_id=workspace, user_profile_id=profile).http_headers()
        await _poll_scope(ctx, scoped, scope, tally)
    return tally


async def _poll_scope(
    ctx: Context, records: list[BatchRecord], headers: dict[str, str], tally: dict[str, int]
) -> None:
    wanted = {r.batch_id: r for r in records}
    oldest = min(r.created_ms for r in records)
    found: dict[str, MessageBatch] = {}
    reached_ms: int | None = None  # the pages show every batch created after this (0: all of them)
    try:
        page = await ctx.api.messages.batches.list(limit=PAGE_SIZE, extra_headers=headers)
        for number in range(1, _MAX_PAGES + 1):
            tally["list_calls"] += 1
            metrics.API_REQUESTS.labels(op="list").inc()
            found.update((b.id, b) for b in page.data if b.id in wanted)
            if not page.has_next_page():
                reached_ms = 0
                break
            reached_ms = int(page.data[-1].created_at.timestamp() * 1000) if page.data else reached_ms
            if (
                len(found) == len(wanted)
                or (reached_ms is not None and reached_ms < oldest)
                or number == _MAX_PAGES
            ):
                break
            page = await page.get_next_page()
        metrics.count_api_success("list")
    except (anthropic.APIStatusError, anthropic.APIConnectionError) as exc:
        metrics.count_api_error("list", exc)
        # ApiHealth raises the alarm if this lasts; one line a tick would bury it.
        log.debug("listing batches failed (%s); polling again next tick", type(exc).__name__)
        return
    unseen: list[BatchRecord] = []
    for record in records:
        batch = found.get(record.batch_id)
        if batch is None:
            unseen.append(record)
            continue
        if record.errors or not record.seen or record.missing_since_ms is not None:
            await ctx.store.note_batch_found(record)
        await _noted(ctx, record, batch, tally)
    # Not on the pages: too old for them to reach, or (created within their reach) absent. Either way a
    # retrieve says which, a few per tick, the least recently checked first.
    unseen.sort(key=lambda r: r.polls)
    for record in unseen[:_MAX_RETRIEVES]:
        await _retrieve(ctx, record, headers, tally)


async def _retrieve(
    ctx: Context, record: BatchRecord, headers: dict[str, str], tally: dict[str, int]
) -> None:
    tally["retrieves"] += 1
    await ctx.store.count_poll(record.batch_id)
    metrics.API_REQUESTS.labels(op="retrieve").inc()
    try:
        batch = await ctx.api.messages.batches.retrieve(record.batch_id, extra_headers=headers)
    except anthropic.NotFoundError as exc:
        metrics.count_api_error("retrieve", exc)
        tally["missing"] += 1
        if await note_missing(ctx, record):
            tally["lost"] += 1
        return
    except (anthropic.APIStatusError, anthropic.APIConnectionError) as exc:
        metrics.count_api_error("retrieve", exc)
        await ctx.store.count_batch_error(record.batch_id)
        return
    metrics.count_api_success("retrieve")
    if record.errors or not record.seen or record.missing_since_ms is not None:
        await ctx.store.note_batch_found(record)
    await _noted(ctx, record, batch, tally)


async def _noted(ctx: Context, record: BatchRecord, batch: MessageBatch, tally: dict[str, int]) -> None:
    if batch.processing_status != "ended":
        return
    tally["ended"] += 1
    if await ctx.scheduler.fanout(record.batch_id):
        log_event(log, "batch.ended", batch_id=record.batch_id, **batch.request_counts.model_dump())
