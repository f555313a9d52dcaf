"""Creating a sealed flush's batch, and adopting the batch of a create whose outcome was never learnt.

Creates are serialised by a lock (one ``batches.create`` in flight across all replicas), so at most one
create's outcome can be unknown (its job died, or the reply was lost): ``Store.inflight_create`` names that
flush from the intent until the outcome is recorded, and only that flush may adopt an unrecorded batch.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterable

import anthropic
from anthropic.types.messages import MessageBatch

from .. import metrics
from ..batchbody import body_size, stream_body
from ..logs import log_event
from ..store import FlushChanged, FlushEntry, FlushRecord, FlushState, custom_id_for, now_ms
from .context import Context, RetryLater, backoff, retry_after, retryable_status
from .deliver import deliver_lines
from .resultline import errored_line

__all__ = ["LIST_LAG_S", "QUEUE_HOLD_NOTE_S", "SETTLE_S", "WHOLE_BODY_BYTES", "submit_flush"]

log = logging.getLogger(__name__)

# Error types for a final create failure, limited to those the SDK's ErrorObject union accepts (it has no
# request_too_large: a 413 reaches the caller as invalid_request_error with the API's message).
_STATUS_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
}
# When looking for an orphan of an interrupted create: allow this much clock skew against the API.
_ORPHAN_SKEW_S = 300.0
# How long after a create attempt ended without a known outcome a batch it made may still appear in the
# list: the API finishing a body it had whole, then listing it. Until then nothing is created again.
SETTLE_S = 15.0
# The same after the API had replied (an error: it was done with the body): only the list's own lag.
LIST_LAG_S = 3.0
# Statuses that mean the API refused the create outright: nothing was created, the outcome is known.
_NOT_CREATED_STATUS = frozenset({429, 529})
_DELIVER_CHUNK = 500
# Create bodies up to this size are read whole before the call; bigger ones are streamed from Redis as sent.
WHOLE_BODY_BYTES = 16 * 1024 * 1024
# How long one queue-cap hold is remembered: outlives the held flushes' retry interval, so the note stays set
# for as long as any flush keeps being held, and lapses soon after the last one is created.
QUEUE_HOLD_NOTE_S = 10.0


async def submit_flush(ctx: Context, fid: str) -> str:
    """Create the batch of a sealed flush. Returns the batch id, or the flush's final state."""
    store = ctx.store
    flush = await store.flush(fid)
    if flush is None:
        return "missing"
    if flush.state not in (FlushState.SEALED, FlushState.SUBMITTING):
        return flush.state.value  # building (the reconciler seals it), submitted, failed, empty, done
    # A lease, renewed while this replica lives: a live holder is never overtaken, a dead one's lapses.
    async with ctx.leases.hold(store.keys.create_lock, f"{ctx.replica}|{fid}") as held:
        if not held:
            raise RetryLater(0.2 + random.random() * 0.5, "another create is in flight")
        adopted = await _settle_inflight_create(ctx)
        if adopted is not None and adopted[0] == fid:
            return adopted[1]
        items = await store.flush_entries(fid)
        if not items:
            await store.mark_flush_empty(fid)
            return FlushState.EMPTY.value
        await _wait_for_queue_room(ctx, fid, len(items))
        # The body is streamed from Redis as it is sent (a 250 MB body is never held whole), with its exact
        # length announced first: if a request's params changed meanwhile the stream breaks off, which the
        # API sees as a broken upload (FlushChanged, an unknown outcome below), never as a different body.
        custom_ids = [custom_id_for(i.rid, i.attempt).encode() for i in items]
        size = body_size((len(cid), i.size) for cid, i in zip(custom_ids, items, strict=True))
        stream = stream_body(custom_ids, store.flush_bodies(fid, items))
        body: bytes | AsyncIterable[bytes] = stream
        if size <= WHOLE_BODY_BYTES:
            # A small body is read whole first, so a create in flight never needs Redis: if Redis dies
            # meanwhile the batch is still made, and adopted later. Only a big one depends on it mid-upload.
            try:
                body = b"".join([part async for part in stream])
            except FlushChanged as exc:
                raise RetryLater(0.0, "a request of the flush changed while its body was read") from exc
        # Betas and the API version are the create call's headers: they apply to the whole batch.
        headers = (await store.batch_headers(flush.group)).http_headers()
        # From here until the outcome is known, this is the one create that may be unrecorded.
        await store.begin_create(fid, sent=len(items), body_bytes=size, by=ctx.replica)
        metrics.API_REQUESTS.labels(op="create").inc()
        try:
            batch = await _create(ctx, body, size, headers)
        except anthropic.APIStatusError as exc:
            metrics.count_api_error("create", exc)
            if retryable_status(exc.status_code):
                if exc.status_code in _NOT_CREATED_STATUS:
                    await store.clear_inflight_create()
                else:
                    await store.end_create_attempt(fid, answered=True)
                errors = await store.count_flush_error(fid)
                raise RetryLater(
                    retry_after(exc) or backoff(errors), f"create: HTTP {exc.status_code}"
                ) from exc
            await _fail_flush(ctx, fid, items, exc)
            return FlushState.FAILED.value
        except (anthropic.APIConnectionError, TimeoutError) as exc:
            # A timeout or a broken connection says nothing of what the API did with the body.
            metrics.count_api_error("create", exc)
            await store.end_create_attempt(fid, answered=False)
            errors = await store.count_flush_error(fid)
            raise RetryLater(backoff(errors), f"create: {type(exc).__name__}") from exc
        except asyncio.CancelledError:
            # The job is being stopped (its timeout, a shutdown): the create may still land; say when the
            # attempt ended, so the next one waits for it rather than creating again.
            await asyncio.shield(store.end_create_attempt(fid, answered=False))
            raise
        metrics.count_api_success("create")
        await _record(ctx, flush, batch, requests=len(items), adopted=False)
        # Room was found: the accumulator may go on at once (a flush still held says so again on its retry).
        await store.clear_held_by_queue_cap()
        return batch.id


async def _wait_for_queue_room(ctx: Context, fid: str, requests: int) -> None:
    """Hold the flush back (RetryLater) while its batch would take batchd's requests in the API's processing
    queue past the cap (BATCHD_API_QUEUE_LIMIT, or the tier's): the API would refuse it with a 429 anyway.
    Called under the create lock, so the count cannot change between this check and the create. A batch
    alone larger than the cap is sent when nothing else is open (waiting could never help it)."""
    store = ctx.store
    open_requests = await store.open_requests()
    limit = ctx.settings.effective_api_queue_limit
    if open_requests == 0 or open_requests + requests <= limit:
        return
    # Seen by `batchd status`, the batchd_held_by_queue_cap gauge and the accumulator (which stops
    # flushing, so intake fills and backpressure reaches the producers) for as long as holds continue.
    first = await store.held_by_queue_cap_since() is None
    await store.note_held_by_queue_cap(
        ms=int(max(QUEUE_HOLD_NOTE_S, 2 * ctx.settings.poll_interval_seconds) * 1000)
    )
    log.log(
        logging.INFO if first else logging.DEBUG,
        "flush %s (%d requests) waits: the API's queue holds %d of batchd's requests (cap %d)",
        fid,
        requests,
        open_requests,
        limit,
    )
    raise RetryLater(ctx.settings.poll_interval_seconds, "the API's processing queue is full")


async def _create(
    ctx: Context, body: bytes | AsyncIterable[bytes], size: int, headers: dict[str, str]
) -> MessageBatch:
    """One batches.create call, bounded in total by create_timeout_seconds (the SDK's timeouts bound each
    read or write, not the whole upload)."""
    async with asyncio.timeout(ctx.settings.create_timeout_seconds):
        return await ctx.api.post(
            "/v1/messages/batches",
            cast_to=MessageBatch,
            content=body,
            # No SDK retries: a retried POST without an idempotency key can create the batch twice.
            options={
                "max_retries": 0,
                "timeout": ctx.settings.create_timeout_seconds,
                # The length is known, so the body goes as one sized request, not chunked encoding.
                "headers": {"Content-Type": "application/json", "Content-Length": str(size), **headers},
            },
        )


async def _settle_inflight_create(ctx: Context) -> tuple[str, str] | None:
    """Called under the create lock: if the last create's outcome was never learnt, find its batch on the
    API and record it for *that* flush. Returns (fid, batch id) when a batch was adopted.

    Only the flush named in-flight can have an unrecorded batch: no other flush can adopt it, and a flush
    that is merely 'submitting' without being named simply creates again. Nothing is created while a batch
    from that attempt could still appear: until ``LIST_LAG_S`` after the API replied with an error, or
    ``SETTLE_S`` after the attempt ended otherwise (its call timed out or broke, or its replica died and
    its create lease lapsed).
    """
    store = ctx.store
    fid = await store.inflight_create()
    if fid is None:
        return None
    flush = await store.flush(fid)
    adopted: tuple[str, str] | None = None
    if flush is not None and flush.state is FlushState.SUBMITTING and flush.intent_ms is not None:
        orphan = await _find_orphan(ctx, flush, flush.intent_ms, flush.sent or 0)
        if orphan is not None:
            log.warning("flush %s: adopting batch %s created by an interrupted submit", fid, orphan.id)
            await _record(ctx, flush, orphan, requests=flush.sent or flush.requests, adopted=True)
            adopted = (fid, orphan.id)
        else:
            ended, answered = flush.attempt_ended_ms, flush.attempt_answered
            if ended is None:
                # The attempt never said how it ended: its replica died or stalled and its create lease
                # lapsed (this replica holds the lock now), so its connection is gone by now.
                ended = await store.end_create_attempt(fid, answered=False)
                log.warning(
                    "flush %s: the create attempted by %s at %s ended without an outcome; "
                    "waiting %gs for a batch it may have made before creating again",
                    fid,
                    flush.attempt_by or "?",
                    flush.intent_ms,
                    SETTLE_S,
                )
            remaining = (ended + (LIST_LAG_S if answered else SETTLE_S) * 1000 - now_ms()) / 1000
            if remaining > 0:
                raise RetryLater(min(2.0, remaining), "the last create's outcome is unknown; checking again")
    await store.clear_inflight_create()
    return adopted


async def _find_orphan(ctx: Context, flush: FlushRecord, intent_ms: int, sent: int) -> MessageBatch | None:
    """A batch created at or after the intent that batchd never recorded, with as many requests as sent.

    Creates are serialised by the create lock and only the in-flight flush is looked up, so an unrecorded
    batch can only be that flush's; the request count and creation time confirm it.
    """
    metrics.API_REQUESTS.labels(op="list").inc()
    since = intent_ms / 1000 - _ORPHAN_SKEW_S
    candidates: list[MessageBatch] = []
    try:
        headers = (await ctx.store.batch_headers(flush.group)).http_headers()  # its workspace, if any
        async for batch in ctx.api.messages.batches.list(limit=100, extra_headers=headers):
            if batch.created_at.timestamp() < since:
                break
            if await ctx.store.is_known_batch(batch.id):
                continue
            counts = batch.request_counts
            total = counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
            if total == sent:
                candidates.append(batch)
        metrics.count_api_success("list")
    except (anthropic.APIStatusError, anthropic.APIConnectionError) as exc:
        metrics.count_api_error("list", exc)
        # Not knowing is not "no orphan": submitting now could pay twice.
        raise RetryLater(2.0, "list batches failed while looking for an orphan") from exc
    if not candidates:
        return None
    return min(candidates, key=lambda b: abs(b.created_at.timestamp() * 1000 - intent_ms))


async def _record(
    ctx: Context, flush: FlushRecord, batch: MessageBatch, *, requests: int, adopted: bool
) -> None:
    summary = await ctx.store.record_batch(
        flush,
        batch.id,
        created_ms=int(batch.created_at.timestamp() * 1000),
        requests=requests,
        adopted=adopted,
    )
    metrics.BATCHES_CREATED.labels(trigger=metrics.trigger_label(summary.trigger)).inc()
    metrics.BATCH_REQUESTS.observe(requests)
    log_event(
        log,
        "batch.created",
        batch_id=batch.id,
        flush=flush.fid,
        requests=requests,
        trigger=summary.trigger,
        adopted=adopted,
    )


async def _fail_flush(ctx: Context, fid: str, items: list[FlushEntry], exc: anthropic.APIStatusError) -> None:
    """A final create error (4xx): every caller in the flush gets the API's error as its answer."""
    error_type = _STATUS_ERROR_TYPES.get(exc.status_code, "invalid_request_error")
    message = getattr(exc, "api_message", None) or f"batch create failed with HTTP {exc.status_code}"
    for start in range(0, len(items), _DELIVER_CHUNK):
        lines = [
            errored_line(custom_id_for(i.rid, i.attempt), error_type, message, exc.request_id)
            for i in items[start : start + _DELIVER_CHUNK]
        ]
        await deliver_lines(ctx, lines, allow_retry=False)
    await ctx.store.fail_flush(fid, f"{exc.status_code} {error_type}")
    log_event(
        log,
        "batch.create_failed",
        flush=fid,
        requests=len(items),
        status=exc.status_code,
        error_type=error_type,
        level=logging.ERROR,
    )
