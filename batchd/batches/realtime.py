"""The daemon's side of routing: requests sent through the real-time Messages API (store.Route).

A request routed ``realtime`` (or ``auto`` with a deadline no batch could meet) is due at once; an ``auto``
one is due at its deadline less ``realtime_margin_seconds``, and is dropped from the list if its batch answers
first. Each replica claims due requests (claim_realtime.lua pushes a claim back by a lease's length) and
takes the request's real-time lease, renewed by its heartbeat, before it calls the API: a live sender is
never overtaken however long the call takes, and a dead one's requests are claimed again within seconds.

Its answer is delivered like a batch's (answer_realtime.lua), charged at standard prices, and a batch copy
that lands later is dropped as a duplicate (the ledger counts it: the API bills it). A batch whose every
request fell back is canceled. A failed call is tried again with backoff (the SDK's own retries first), up
to ``max_attempts`` calls, then the caller gets the API's error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import anthropic
import httpx2
import orjson

from .. import metrics
from ..leases import LEASE_S
from ..ledger import realtime_charge_of
from ..store import DeliverOutcome, RealtimeClaim, Route, custom_id_for, now_ms
from .context import Context, backoff, retry_after, retryable_status
from .resultline import errored_line

__all__ = ["RealtimeSender"]

log = logging.getLogger(__name__)

# A sender sleeps until its next request is due or it is woken ({p}:realtime-wake, published whenever a
# request is listed or listed again), and looks anyway this often: a lost wake costs at most this long.
_SAFETY_S = 5.0
_REASONS = {Route.REALTIME: "route", Route.AUTO: "deadline", Route.AUTO_NOW: "deadline_at_submit"}


class RealtimeSender:
    """Sends due requests through the real-time API, ``settings.realtime_concurrency`` at a time."""

    def __init__(self, ctx: Context, *, beat: Callable[[], None] = lambda: None) -> None:
        self._ctx = ctx
        self._beat = beat
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        ctx = self._ctx
        woken = asyncio.Event()
        listener = asyncio.create_task(self._listen(woken))
        try:
            while not stop.is_set():
                self._beat()
                if listener.done():
                    listener.result()  # its connection broke: fail, and the supervisor starts again
                woken.clear()
                free = ctx.settings.realtime_concurrency - len(self._tasks)
                now = now_ms()
                claims, next_due = await ctx.store.scripts.claim_realtime(
                    now_ms=now, limit=max(free, 0), claim_ms=int(LEASE_S * 1000)
                )
                for claim in claims:
                    task = asyncio.create_task(self._send(claim))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                    # A call ended: a slot is free, and it may have listed its request again (a retry).
                    task.add_done_callback(lambda _t: woken.set())
                wait = _SAFETY_S
                if next_due is not None and free > len(claims):
                    wait = min(wait, max(0.01, (next_due - now) / 1000))
                await _first_of(stop, woken, timeout=wait)
        except asyncio.CancelledError:
            await self.drain(0.0)
            raise
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
        # Stopped: the calls under way go on; the daemon drains them within its grace period.

    async def _listen(self, woken: asyncio.Event) -> None:
        """Set ``woken`` on every message of the wake channel (and once subscribed: anything listed before
        the subscription is seen by the look that follows)."""
        pubsub = self._ctx.store.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._ctx.store.keys.realtime_wake)
            woken.set()
            while True:
                # Bounded waits: a read blocked past the connection's socket timeout would fail.
                if await pubsub.get_message(timeout=_SAFETY_S) is not None:
                    woken.set()
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    @property
    def busy(self) -> bool:
        """Real-time calls are under way."""
        return any(not task.done() for task in self._tasks)

    async def drain(self, timeout: float) -> None:
        """Let the calls under way finish within ``timeout`` seconds, then cut the rest: each cut one is
        listed again at once for another replica (its call may still be billed: see R11)."""
        if self._tasks and timeout > 0:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _send(self, claim: RealtimeClaim) -> None:
        ctx = self._ctx
        async with ctx.leases.hold(ctx.store.keys.realtime_lease(claim.rid), ctx.replica) as held:
            if not held:
                return  # another replica is calling for it
            try:
                await self._call_and_answer(claim)
            except asyncio.CancelledError:
                # Stopping: whoever is up takes it at once, not when this claim lapses.
                with contextlib.suppress(Exception):
                    await asyncio.shield(ctx.store.reschedule_realtime(claim.rid, now_ms()))
                raise
            except Exception:
                # Redis failing mid-answer, say: the claim lapses and the request is sent again.
                log.exception("real-time call for request %s failed; it will be tried again", claim.rid)

    async def _call_and_answer(self, claim: RealtimeClaim) -> None:
        ctx = self._ctx
        cid = custom_id_for(claim.rid, claim.attempt)
        headers = (await ctx.store.batch_headers(claim.group)).http_headers()
        metrics.API_REQUESTS.labels(op="messages").inc()
        try:
            response = await ctx.api.post(
                "/v1/messages",
                cast_to=httpx2.Response,
                content=claim.body,
                options={"headers": {"Content-Type": "application/json", **headers}},
            )
            message = orjson.loads(response.content)
        except anthropic.APIStatusError as exc:
            metrics.count_api_error("messages", exc)
            if retryable_status(exc.status_code):
                await self._retry(claim, retry_after(exc), f"HTTP {exc.status_code}", _error_of(exc, cid))
            else:
                await self._answer(claim, _error_of(exc, cid), None)
            return
        except (anthropic.APIConnectionError, TimeoutError, ValueError) as exc:
            metrics.count_api_error("messages", exc)
            line = errored_line(cid, "api_error", f"the real-time call failed: {type(exc).__name__}", None)
            await self._retry(claim, None, type(exc).__name__, line)
            return
        metrics.count_api_success("messages")
        # The API's own bytes, as a batch's results line carries them.
        line = b'{"custom_id":%s,"result":{"type":"succeeded","message":%s}}' % (
            orjson.dumps(cid),
            response.content,
        )
        await self._answer(claim, line, message)

    async def _retry(self, claim: RealtimeClaim, after: float | None, why: str, final: bytes) -> None:
        """Try the call again later; after ``max_attempts`` failed calls, answer with the last error."""
        ctx = self._ctx
        failed = await ctx.store.count_realtime_failure(claim.rid)
        if failed >= ctx.settings.max_attempts:
            log.warning(
                "request %s: %d real-time calls failed (%s); answering with the error", claim.rid, failed, why
            )
            await self._answer(claim, final, None)
            return
        delay = after if after is not None else backoff(failed)
        log.info("request %s: real-time call failed (%s); again in %.1fs", claim.rid, why, delay)
        await ctx.store.reschedule_realtime(claim.rid, now_ms() + int(delay * 1000))

    async def _answer(self, claim: RealtimeClaim, line: bytes, message: dict[str, object] | None) -> None:
        ctx = self._ctx
        charge = realtime_charge_of(message) if message is not None else None
        answer = await ctx.store.scripts.answer_realtime(
            claim.rid, line=line, charge=charge, ttl_seconds=ctx.settings.result_ttl_seconds
        )
        if charge is not None:
            metrics.record_charge(charge)
        if answer.outcome is not DeliverOutcome.DELIVERED:
            return  # its batch answered it while the call ran: this answer was paid for, not delivered
        metrics.REALTIME_REQUESTS.labels(reason=_REASONS.get(claim.route, "route")).inc()
        metrics.RESULTS.labels(type="succeeded" if message is not None else "errored").inc()
        if answer.batch_all_fell_back and answer.batch_id is not None:
            await self._cancel_batch(answer.batch_id)

    async def _cancel_batch(self, batch_id: str) -> None:
        """Every request of the batch has its answer: stop paying for the rest of it."""
        metrics.API_REQUESTS.labels(op="cancel").inc()
        try:
            await self._ctx.api.messages.batches.cancel(batch_id)
        except anthropic.APIError as exc:
            # Harmless: its lines are dropped as duplicates when it ends.
            metrics.count_api_error("cancel", exc)
            log.warning("could not cancel batch %s, whose requests all fell back: %s", batch_id, exc)
            return
        metrics.count_api_success("cancel")
        metrics.BATCHES_CANCELED.inc()
        log.info("canceled batch %s: every request in it was answered in real time", batch_id)


def _error_of(exc: anthropic.APIStatusError, cid: str) -> bytes:
    """The API's error as an errored results line (the front answers it with the matching status)."""
    body = exc.body if isinstance(exc.body, dict) else {}
    found = body.get("error")
    error: dict[str, object] = found if isinstance(found, dict) else {}
    kind, text = error.get("type"), error.get("message")
    error_type = kind if isinstance(kind, str) else "api_error"
    message = text if isinstance(text, str) else f"HTTP {exc.status_code}"
    return errored_line(cid, error_type, message, exc.request_id)


async def _first_of(stop: asyncio.Event, woken: asyncio.Event, *, timeout: float) -> None:
    """Until ``stop`` or ``woken`` is set, or ``timeout`` seconds pass."""
    waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(woken.wait())}
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
