"""The batch lifecycle: submit a sealed flush, poll the batch, fan its results out, reconcile leftovers.

Each function is one job and is idempotent: the job runner (arq, see ``jobs.py``) runs jobs at least
once, so a job killed half-way simply runs again. A job asks to run again later by raising RetryLater.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anthropic
import httpx2
import orjson
from anthropic.types.messages import MessageBatch

from . import metrics
from .batchbody import build_body
from .keys import Keys, custom_id_for, split_custom_id
from .logs import log_event
from .scripts import Scripts
from .settings import Settings
from .validation import validate_request_id

__all__ = ["Context", "RetryLater", "Scheduler", "fanout_results", "poll_batch", "reconcile", "submit_flush"]

log = logging.getLogger(__name__)

# Inner error types of an `errored` result that mean "the API failed, not the request": try again.
RETRYABLE_ERROR_TYPES = frozenset({"api_error", "overloaded_error"})
_RETRYABLE_STATUS = frozenset({408, 409, 429})
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
_DELIVER_CHUNK = 500
_READ_CHUNK = 1000
# A batch answering 404 this soon after create is still propagating (API reference, pain point 4).
_TRANSIENT_404_S = 600.0
# When looking for an orphan of an interrupted create: allow this much clock skew against the API.
_ORPHAN_SKEW_S = 300.0
# An unknown create is looked for in the list for at least this long before creating again.
_LIST_GRACE_S = 3.0
# Statuses that mean the API refused the create outright: nothing was created, the outcome is known.
_NOT_CREATED_STATUS = frozenset({429, 529})
# A flush still 'building' this long after it started belongs to an accumulator that died mid-flush.
STALE_BUILDING_S = 60.0
_RECENT_FLUSHES = 50


class RetryLater(Exception):
    """Run this job again after ``defer`` seconds."""

    def __init__(self, defer: float, reason: str = "") -> None:
        super().__init__(reason or f"retry in {defer:.2f}s")
        self.defer = defer


class Scheduler(Protocol):
    async def submit(self, fid: str) -> None: ...
    async def poll(self, batch_id: str, defer: float) -> None: ...


@dataclass
class Context:
    redis: Any  # redis.asyncio.Redis
    keys: Keys
    scripts: Scripts
    settings: Settings
    api: anthropic.AsyncAnthropic
    scheduler: Scheduler


# --- submit -----------------------------------------------------------------------------------------------
async def submit_flush(ctx: Context, fid: str) -> str:
    """Create the batch of a sealed flush. Returns the batch id, or the flush's final state."""
    k = ctx.keys
    flush = await _hgetall(ctx.redis, k.flush(fid))
    state = flush.get("state")
    if state is None:
        return "missing"
    if state != "sealed" and state != "submitting":
        return state  # building (the reconciler seals it), submitted, failed, empty, done
    lock = k.create_lock
    # The lock outlives the job's timeout: a live holder is never overtaken; a dead one frees it then.
    lock_ms = int((ctx.settings.job_timeout_seconds + 30) * 1000)
    if not await ctx.redis.set(lock, fid, nx=True, px=lock_ms):
        raise RetryLater(0.2 + random.random() * 0.5, "another create is in flight")
    try:
        adopted = await _settle_inflight_create(ctx)
        if adopted is not None and adopted[0] == fid:
            return adopted[1]
        items = await _load_items(ctx, fid)
        if not items:
            await ctx.redis.hset(k.flush(fid), "state", "empty")
            await ctx.redis.zrem(k.flushes, fid)
            return "empty"
        body = build_body((custom_id_for(rid, attempts).encode(), params) for rid, attempts, params in items)
        async with ctx.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                k.flush(fid),
                mapping={"state": "submitting", "intent": _now_ms(), "sent": len(items), "size": len(body)},
            )
            # From here until the outcome is known, this is the one create that may be unrecorded.
            pipe.set(k.create_inflight, fid)
            await pipe.execute()
        flush["sent"] = str(len(items))  # canceled requests are not sent: record the batch's real size
        metrics.API_REQUESTS.labels(op="create").inc()
        try:
            batch = await ctx.api.post(
                "/v1/messages/batches",
                cast_to=MessageBatch,
                content=body,
                # No SDK retries: a retried POST without an idempotency key can create the batch twice.
                options={
                    "max_retries": 0,
                    "timeout": ctx.settings.job_timeout_seconds,
                    "headers": {"Content-Type": "application/json"},
                },
            )
        except anthropic.APIStatusError as exc:
            metrics.count_api_error("create", exc)
            if _retryable_status(exc.status_code):
                if exc.status_code in _NOT_CREATED_STATUS:
                    await ctx.redis.delete(k.create_inflight)
                errors = await ctx.redis.hincrby(k.flush(fid), "errors", 1)
                raise RetryLater(
                    _retry_after(exc) or _backoff(errors), f"create: HTTP {exc.status_code}"
                ) from exc
            await _fail_flush(ctx, fid, items, exc)
            await ctx.redis.delete(k.create_inflight)
            return "failed"
        except anthropic.APIConnectionError as exc:
            metrics.count_api_error("create", exc)
            errors = await ctx.redis.hincrby(k.flush(fid), "errors", 1)
            raise RetryLater(_backoff(errors), f"create: {type(exc).__name__}") from exc
        await _record_batch(ctx, fid, batch, flush, adopted=False)
        return batch.id
    finally:
        await ctx.scripts.release_lock(keys=[lock], args=[fid], client=ctx.redis)


async def _settle_inflight_create(ctx: Context) -> tuple[str, str] | None:
    """Called under the create lock: if the last create's outcome was never learnt (its job died, or the
    response was lost), find its batch on the API and record it for *that* flush. Returns (fid, batch id)
    when a batch was adopted.

    Creates are serialised, so only the flush named in ``create_inflight`` can have an unrecorded batch:
    no other flush can adopt it, and a flush that is merely 'submitting' without being named simply
    creates again.
    """
    k = ctx.keys
    raw = await ctx.redis.get(k.create_inflight)
    if raw is None:
        return None
    fid = _text(raw)
    flush = await _hgetall(ctx.redis, k.flush(fid))
    adopted: tuple[str, str] | None = None
    if flush.get("state") == "submitting":
        intent = int(flush["intent"])
        orphan = await _find_orphan(ctx, intent, int(flush["sent"]))
        if orphan is None and _now_ms() - intent < _LIST_GRACE_S * 1000:
            # A batch created a moment ago may not be listed yet: look again shortly, not create now.
            raise RetryLater(_LIST_GRACE_S / 2, "the last create's outcome is unknown; checking again")
        if orphan is not None:
            log.warning("flush %s: adopting batch %s created by an interrupted submit", fid, orphan.id)
            await _record_batch(ctx, fid, orphan, flush, adopted=True)
            adopted = (fid, orphan.id)
    await ctx.redis.delete(k.create_inflight)
    return adopted


async def _load_items(ctx: Context, fid: str) -> list[tuple[str, int, bytes]]:
    """(rid, attempt, params bytes) of every request still in this flush (a canceled one is left out)."""
    k = ctx.keys
    rids = [_text(r) for r in await ctx.redis.lrange(k.flush_rids(fid), 0, -1)]
    items: list[tuple[str, int, bytes]] = []
    for start in range(0, len(rids), _READ_CHUNK):
        chunk = rids[start : start + _READ_CHUNK]
        async with ctx.redis.pipeline(transaction=False) as pipe:
            for rid in chunk:
                pipe.hmget(k.request(rid), "state", "fid", "attempts", "body")
            rows = await pipe.execute()
        for rid, (state, owner, attempts, body) in zip(chunk, rows, strict=True):
            if _text(state) == "flushed" and _text(owner) == fid and body is not None:
                items.append((rid, int(attempts), bytes(body)))
    return items


async def _find_orphan(ctx: Context, intent_ms: int, sent: int) -> MessageBatch | None:
    """A batch created at or after the intent that batchd never recorded, with as many requests as sent.

    Creates are serialised by the create lock and only the in-flight flush is looked up, so an unrecorded
    batch can only be that flush's; the request count and creation time confirm it.
    """
    metrics.API_REQUESTS.labels(op="list").inc()
    since = intent_ms / 1000 - _ORPHAN_SKEW_S
    candidates: list[MessageBatch] = []
    try:
        async for batch in ctx.api.messages.batches.list(limit=100):
            if batch.created_at.timestamp() < since:
                break
            if await ctx.redis.zscore(ctx.keys.known_batches, batch.id) is not None:
                continue
            counts = batch.request_counts
            total = counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
            if total == sent:
                candidates.append(batch)
    except (anthropic.APIStatusError, anthropic.APIConnectionError) as exc:
        metrics.count_api_error("list", exc)
        # Not knowing is not "no orphan": submitting now could pay twice.
        raise RetryLater(2.0, "list batches failed while looking for an orphan") from exc
    if not candidates:
        return None
    return min(candidates, key=lambda b: abs(b.created_at.timestamp() * 1000 - intent_ms))


async def _record_batch(
    ctx: Context, fid: str, batch: MessageBatch, flush: dict[str, str], *, adopted: bool
) -> None:
    k = ctx.keys
    created_ms = int(batch.created_at.timestamp() * 1000)
    n = int(flush.get("sent") or flush.get("n") or 0)
    trigger = flush.get("trigger", "age")
    summary = orjson.dumps(
        {
            "fid": fid,
            "batch": batch.id,
            "requests": n,
            "bytes": int(flush.get("bytes", 0)),
            "trigger": trigger,
            "at": _now_ms(),
            "adopted": adopted,
        }
    )
    async with ctx.redis.pipeline(transaction=True) as pipe:
        pipe.hset(k.flush(fid), mapping={"state": "submitted", "batch": batch.id})
        pipe.delete(k.create_inflight)
        pipe.zrem(k.flushes, fid)
        pipe.zadd(k.known_batches, {batch.id: created_ms})
        pipe.zadd(k.open_batches, {batch.id: created_ms})
        pipe.hset(k.batch(batch.id), mapping={"fid": fid, "n": n, "created": created_ms, "state": "open"})
        pipe.lpush(k.recent_flushes, summary)
        pipe.ltrim(k.recent_flushes, 0, _RECENT_FLUSHES - 1)
        await pipe.execute()
    metrics.BATCHES_CREATED.labels(trigger=trigger if trigger in ("count", "bytes", "age") else "age").inc()
    metrics.BATCH_REQUESTS.observe(n)
    log_event(
        log, "batch.created", batch_id=batch.id, flush=fid, requests=n, trigger=trigger, adopted=adopted
    )
    await ctx.scheduler.poll(batch.id, ctx.settings.poll_min_seconds)


async def _fail_flush(
    ctx: Context, fid: str, items: Sequence[tuple[str, int, bytes]], exc: anthropic.APIStatusError
) -> None:
    """A final create error (4xx): every caller in the flush gets the API's error as its answer."""
    error_type = _STATUS_ERROR_TYPES.get(exc.status_code, "invalid_request_error")
    message = getattr(exc, "api_message", None) or f"batch create failed with HTTP {exc.status_code}"
    for start in range(0, len(items), _DELIVER_CHUNK):
        lines = [
            orjson.dumps(
                {
                    "custom_id": custom_id_for(rid, attempts),
                    "result": {
                        "type": "errored",
                        "error": {
                            "type": "error",
                            "error": {"type": error_type, "message": message},
                            "request_id": exc.request_id,
                        },
                    },
                }
            )
            for rid, attempts, _ in items[start : start + _DELIVER_CHUNK]
        ]
        await deliver_lines(ctx, lines, allow_retry=False)
    await ctx.redis.hset(
        ctx.keys.flush(fid), mapping={"state": "failed", "error": f"{exc.status_code} {error_type}"}
    )
    await ctx.redis.zrem(ctx.keys.flushes, fid)
    log_event(
        log,
        "batch.create_failed",
        flush=fid,
        requests=len(items),
        status=exc.status_code,
        error_type=error_type,
        level=logging.ERROR,
    )


# --- poll -------------------------------------------------------------------------------------------------
async def poll_batch(ctx: Context, batch_id: str) -> str:
    """Check one open batch; when it has ended, fan its results out. Raises RetryLater until then."""
    k = ctx.keys
    record = await _hgetall(ctx.redis, k.batch(batch_id))
    if not record or record.get("state") == "done":
        return "done"
    metrics.API_REQUESTS.labels(op="retrieve").inc()
    try:
        batch = await ctx.api.messages.batches.retrieve(batch_id)
    except anthropic.NotFoundError as exc:
        metrics.count_api_error("retrieve", exc)
        age = time.time() - int(record.get("created", 0)) / 1000
        if age < _TRANSIENT_404_S:
            raise RetryLater(ctx.settings.poll_min_seconds, "batch not visible yet (transient 404)") from exc
        log.error("batch %s answers 404 %.0fs after create; still polling", batch_id, age)
        raise RetryLater(ctx.settings.poll_max_seconds, "batch not found") from exc
    except anthropic.APIStatusError as exc:
        metrics.count_api_error("retrieve", exc)
        errors = await ctx.redis.hincrby(k.batch(batch_id), "errors", 1)
        raise RetryLater(_retry_after(exc) or _backoff(errors), f"retrieve: HTTP {exc.status_code}") from exc
    except anthropic.APIConnectionError as exc:
        metrics.count_api_error("retrieve", exc)
        errors = await ctx.redis.hincrby(k.batch(batch_id), "errors", 1)
        raise RetryLater(_backoff(errors), f"retrieve: {type(exc).__name__}") from exc
    if int(record.get("errors", 0)):
        await ctx.redis.hset(k.batch(batch_id), "errors", 0)  # backoff counts consecutive errors only
    if batch.processing_status != "ended":
        polls = await ctx.redis.hincrby(k.batch(batch_id), "polls", 1)
        raise RetryLater(poll_delay(ctx.settings, polls), f"batch {batch.processing_status}")
    log_event(log, "batch.ended", batch_id=batch_id, **batch.request_counts.model_dump())
    return await fanout_results(ctx, batch_id)


def poll_delay(settings: Settings, polls: int) -> float:
    """From poll_min_seconds, doubling each poll, up to poll_max_seconds, with 10 % jitter."""
    base = min(settings.poll_max_seconds, settings.poll_min_seconds * 2 ** min(polls - 1, 30))
    return float(base * (0.9 + 0.2 * random.random()))


# --- fan-out ----------------------------------------------------------------------------------------------
async def fanout_results(ctx: Context, batch_id: str) -> str:
    """Stream the batch's results and deliver each line. Checkpointed every chunk; delivery is idempotent.

    The checkpoint only skips lines on a resumed download. Requests of the flush that no line answered are
    sent back to intake only after a complete download from the first line, so a results order that
    differs between downloads can never make batchd resubmit a request that was in fact answered.
    """
    k = ctx.keys
    record = await _hgetall(ctx.redis, k.batch(batch_id))
    cursor = int(record.get("cursor", 0))
    resumed = cursor > 0
    lineno = 0
    metrics.API_REQUESTS.labels(op="results").inc()
    try:
        async with ctx.api.messages.batches.with_streaming_response.results(batch_id) as response:
            pending: list[bytes] = []
            async for line in response.iter_lines():
                if not line.strip():
                    continue
                lineno += 1
                if lineno <= cursor:
                    continue
                pending.append(line.encode())
                if len(pending) >= _DELIVER_CHUNK:
                    await deliver_lines(ctx, pending)
                    await ctx.redis.hset(k.batch(batch_id), "cursor", lineno)
                    pending = []
            if pending:
                await deliver_lines(ctx, pending)
                await ctx.redis.hset(k.batch(batch_id), "cursor", lineno)
    except anthropic.NotFoundError as exc:
        metrics.count_api_error("results", exc)
        raise RetryLater(ctx.settings.poll_min_seconds, "results not visible yet") from exc
    except (anthropic.APIError, httpx2.HTTPError, OSError) as exc:
        metrics.count_api_error("results", exc)
        log.warning(
            "results of %s broke off after line %d (%s); resuming", batch_id, lineno, type(exc).__name__
        )
        errors = await ctx.redis.hincrby(k.batch(batch_id), "errors", 1)
        raise RetryLater(_backoff(errors), "results stream broke off") from exc

    fid = record.get("fid", "")
    unanswered = await _unanswered(ctx, fid)
    if unanswered and resumed:
        await ctx.redis.hset(k.batch(batch_id), "cursor", 0)
        raise RetryLater(
            0.0, f"{len(unanswered)} requests unanswered after a resumed download; reading all again"
        )
    if unanswered:
        log.warning("batch %s: %d requests had no results line; retrying them", batch_id, len(unanswered))
        lines = [
            orjson.dumps({"custom_id": custom_id_for(rid, att), "result": {"type": "expired"}})
            for rid, att in unanswered
        ]
        for start in range(0, len(lines), _DELIVER_CHUNK):
            await deliver_lines(ctx, lines[start : start + _DELIVER_CHUNK])
    ttl = ctx.settings.result_ttl_seconds
    async with ctx.redis.pipeline(transaction=True) as pipe:
        pipe.hset(k.batch(batch_id), mapping={"state": "done", "lines": lineno})
        pipe.zrem(k.open_batches, batch_id)
        if fid:
            pipe.hset(k.flush(fid), "state", "done")
            pipe.expire(k.flush(fid), ttl)
            pipe.expire(k.flush_rids(fid), ttl)
        pipe.expire(k.batch(batch_id), ttl)
        await pipe.execute()
    log_event(log, "batch.delivered", batch_id=batch_id, lines=lineno, unanswered=len(unanswered))
    return "delivered"


async def _unanswered(ctx: Context, fid: str) -> list[tuple[str, int]]:
    """(rid, attempt) of requests still waiting on this flush: no results line reached them."""
    if not fid:
        return []
    k = ctx.keys
    rids = [_text(r) for r in await ctx.redis.lrange(k.flush_rids(fid), 0, -1)]
    out: list[tuple[str, int]] = []
    for start in range(0, len(rids), _READ_CHUNK):
        chunk = rids[start : start + _READ_CHUNK]
        async with ctx.redis.pipeline(transaction=False) as pipe:
            for rid in chunk:
                pipe.hmget(k.request(rid), "state", "fid", "attempts")
            rows = await pipe.execute()
        for rid, (state, owner, attempts) in zip(chunk, rows, strict=True):
            if _text(state) == "flushed" and _text(owner) == fid:
                out.append((rid, int(attempts)))
    return out


async def deliver_lines(ctx: Context, lines: Sequence[bytes], *, allow_retry: bool = True) -> dict[str, int]:
    """Run the deliver script for each results line, pipelined. Malformed lines are counted and skipped."""
    k = ctx.keys
    settings = ctx.settings
    parsed: list[tuple[str, str, str | None, dict[str, Any]]] = []
    tally = {"delivered": 0, "requeued": 0, "duplicate": 0, "stale": 0, "malformed": 0}
    async with ctx.redis.pipeline(transaction=False) as pipe:
        for raw in lines:
            try:
                obj = orjson.loads(raw)
                result = obj["result"]
                rtype = result["type"]
                rid, attempt = split_custom_id(obj["custom_id"])
                validate_request_id(rid)
                inner = result["error"]["error"]["type"] if rtype == "errored" else None
                if rtype not in metrics.RESULT_TYPES or (rtype == "errored" and not isinstance(inner, str)):
                    raise ValueError("not a results line")
                if rtype == "succeeded" and not isinstance(result.get("message"), dict):
                    raise ValueError("succeeded without a message")
            except Exception:
                tally["malformed"] += 1
                log.warning("skipping a malformed results line: %.200r", raw)
                continue
            retry = allow_retry and (rtype == "expired" or inner in RETRYABLE_ERROR_TYPES)
            await ctx.scripts.deliver(  # queued in the pipeline; runs at execute()
                keys=[k.request(rid), k.result(rid), k.intake, k.queue_stats],
                args=[
                    attempt,
                    raw,
                    "1" if retry else "0",
                    settings.max_attempts,
                    settings.result_ttl_seconds,
                    k.delivered_channel,
                    rid,
                ],
                client=pipe,
            )
            parsed.append((rid, rtype, inner, result))
        replies = await pipe.execute() if parsed else []
    now_ms = _now_ms()
    for (_rid, rtype, inner, result), (code, enq, _attempts) in zip(parsed, replies, strict=True):
        code = int(code)
        if code == 1:
            tally["delivered"] += 1
            metrics.RESULTS.labels(type=rtype if rtype in metrics.RESULT_TYPES else "errored").inc()
            if enq:
                metrics.REQUEST_LATENCY.observe(max(0.0, (now_ms - int(enq)) / 1000))
        elif code == 2:
            tally["requeued"] += 1
            metrics.REQUESTS_RETRIED.labels(
                reason=metrics.retry_reason("expired" if rtype == "expired" else inner)
            ).inc()
        elif code == 0:
            tally["duplicate"] += 1
        else:
            tally["stale"] += 1
        if code in (1, 2) and rtype == "succeeded":
            # A succeeded line is billed whether it is delivered or (never) requeued.
            message = result.get("message") or {}
            usage = message.get("usage")
            if isinstance(usage, dict):
                metrics.record_usage(str(message.get("model", "")), usage)
    return tally


# --- reconcile --------------------------------------------------------------------------------------------
async def reconcile(ctx: Context) -> dict[str, int]:
    """Upkeep, safe to run anywhere and often: seal abandoned flushes, and make sure every sealed flush
    has a submit job and every open batch a poll job (the job ids make re-enqueueing a no-op)."""
    k = ctx.keys
    counts = {"sealed": 0, "submit": 0, "poll": 0}
    if not await ctx.redis.set(k.reconcile_lock, "1", nx=True, px=4000):
        return counts
    now = _now_ms()
    for raw_fid, created in await ctx.redis.zrange(k.flushes, 0, -1, withscores=True):
        fid = _text(raw_fid)
        state = _text(await ctx.redis.hget(k.flush(fid), "state"))
        if state == "building" and now - created > STALE_BUILDING_S * 1000:
            n = await ctx.scripts.seal_flush(
                keys=[k.flush(fid), k.flushes, k.flush_rids(fid)], args=[fid, "age", now], client=ctx.redis
            )
            if int(n) > 0:
                log.warning("sealed flush %s (%s requests) left unsealed by a stopped replica", fid, n)
                counts["sealed"] += 1
                state = "sealed"
        if state in ("sealed", "submitting"):
            await ctx.scheduler.submit(fid)
            counts["submit"] += 1
        elif state not in ("building",):
            await ctx.redis.zrem(k.flushes, fid)
    for raw_batch in await ctx.redis.zrange(k.open_batches, 0, -1):
        await ctx.scheduler.poll(_text(raw_batch), 0)
        counts["poll"] += 1
    return counts


# --- helpers ----------------------------------------------------------------------------------------------
def _retryable_status(status: int) -> bool:
    return status in _RETRYABLE_STATUS or status >= 500


def _retry_after(exc: anthropic.APIStatusError) -> float | None:
    value = exc.response.headers.get("retry-after") if exc.response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _backoff(errors: int) -> float:
    """Backoff after the n-th consecutive error: 0.5 s doubling to 60 s, with jitter."""
    return float(min(60.0, 0.5 * 2 ** min(errors - 1, 10)) * (0.75 + 0.5 * random.random()))


async def _hgetall(redis: Any, key: str) -> dict[str, str]:
    return {_text(f): _text(v) for f, v in (await redis.hgetall(key)).items()}


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def _now_ms() -> int:
    return int(time.time() * 1000)
