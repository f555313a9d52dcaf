"""Fan-out: stream an ended batch's results and deliver each line to its caller (or back to intake)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import anthropic
import httpx2

from .. import metrics
from ..logs import log_event
from ..store import BatchState, custom_id_for
from .context import Context, RetryLater, backoff
from .deliver import Prepared, deliver_lines, deliver_prepared, prepare_lines
from .lost import note_missing
from .resultline import expired_line

__all__ = ["fanout_results"]

log = logging.getLogger(__name__)

_DELIVER_CHUNK = 500


@contextlib.asynccontextmanager
async def _results_stream(
    ctx: Context, batch_id: str, headers: dict[str, str]
) -> AsyncIterator[httpx2.Response]:
    """The results download, streamed. Not the SDK's ``batches.results``: it retrieves the batch first for
    its ``results_url``, a second call against the per-minute limit for every batch. The poller has just
    seen the batch end, and the results endpoint is the documented
    ``GET /v1/messages/batches/{id}/results`` (what ``results_url`` names)."""
    response = await ctx.api.get(
        f"/v1/messages/batches/{batch_id}/results",
        cast_to=httpx2.Response,
        stream=True,
        options={"headers": {"Accept": "application/binary", **headers}},
    )
    try:
        yield response
    finally:
        await response.aclose()


async def fanout_results(ctx: Context, batch_id: str) -> str:
    """Stream the batch's results and deliver each line. Checkpointed every chunk; delivery is idempotent.

    The checkpoint only skips lines on a resumed download. Requests of the flush that no line answered are
    sent back to intake only after a complete download from the first line, so a results order that
    differs between downloads can never make batchd resubmit a request that was in fact answered.
    """
    store = ctx.store
    record = await store.batch(batch_id)
    if record is not None and record.state is BatchState.DONE:
        return BatchState.DONE.value  # fanned out already (a job run again after it finished)
    cursor = record.cursor if record is not None else 0
    resumed = cursor > 0
    lineno = 0
    # Requests a line of this download settled: only the others need their state read afterwards.
    settled: set[str] = set()
    metrics.API_REQUESTS.labels(op="results").inc()
    try:
        headers = (await store.batch_headers(record.group)).http_headers() if record is not None else {}
        async with _results_stream(ctx, batch_id, headers) as response:
            metrics.count_api_success("results")
            pending: list[bytes] = []
            # One chunk is delivered (Redis runs its script) while the next is read and parsed here: the two
            # halves overlap. Chunks still land, and the cursor still moves, one at a time and in order.
            inflight: asyncio.Task[None] | None = None

            async def deliver(prepared: Prepared, upto: int) -> None:
                await deliver_prepared(ctx, prepared, batch_id=batch_id, settled=settled)
                await store.set_cursor(batch_id, upto)

            try:
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    lineno += 1
                    if lineno <= cursor:
                        continue
                    pending.append(line.encode())
                    if len(pending) >= _DELIVER_CHUNK:
                        prepared = prepare_lines(pending)
                        pending = []
                        if inflight is not None:
                            await inflight
                        inflight = asyncio.create_task(deliver(prepared, lineno))
                if inflight is not None:
                    await inflight
                    inflight = None
                if pending:
                    await deliver(prepare_lines(pending), lineno)
            finally:
                if inflight is not None and not inflight.done():
                    inflight.cancel()
                    with contextlib.suppress(BaseException):
                        await inflight
    except anthropic.NotFoundError as exc:
        metrics.count_api_error("results", exc)
        if record is not None and await note_missing(ctx, record):
            return "lost"
        raise RetryLater(ctx.settings.poll_interval_seconds, "results not found (404)") from exc
    except (anthropic.APIError, httpx2.HTTPError, OSError) as exc:
        metrics.count_api_error("results", exc)
        log.warning(
            "results of %s broke off after line %d (%s); resuming", batch_id, lineno, type(exc).__name__
        )
        # Its own count: a good retrieve between two broken downloads must not reset the backoff.
        errors = await store.count_download_error(batch_id)
        raise RetryLater(backoff(errors), "results stream broke off") from exc

    unanswered = (
        await store.unanswered(record.fid, settled=settled) if record is not None and record.fid else []
    )
    if unanswered and resumed:
        await store.set_cursor(batch_id, 0)
        raise RetryLater(
            0.0, f"{len(unanswered)} requests unanswered after a resumed download; reading all again"
        )
    if unanswered:
        log.warning("batch %s: %d requests had no results line; retrying them", batch_id, len(unanswered))
        lines = [expired_line(custom_id_for(rid, attempt)) for rid, attempt in unanswered]
        for start in range(0, len(lines), _DELIVER_CHUNK):
            await deliver_lines(ctx, lines[start : start + _DELIVER_CHUNK])
    if record is not None:
        await store.finish_batch(record, lines=lineno, ttl_seconds=ctx.settings.result_ttl_seconds)
    log_event(log, "batch.delivered", batch_id=batch_id, lines=lineno, unanswered=len(unanswered))
    return "delivered"
