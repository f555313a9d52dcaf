"""Waiting for results: every waiter in a process shares one pub/sub connection and batched reads.

The deliver script publishes the request ids it answered on one channel (one message a call, the ids
joined by commas; other scripts publish a single id). One listener task per client
subscribes, and on each id wakes the futures waiting for it, fetching results with one MGET per burst of
ids. A new waiter is checked by a second task that reads the result keys of every waiter registered since
its last round in one MGET (and, for those not answered, whether the request still exists), so 100,000
callers cost about a hundred round trips, not 100,000 (nor a connection each). After every
(re)subscription, and every ``sweep_seconds``, the listener re-checks all pending ids: a message lost while
disconnected costs a delay, not an answer, and a request that vanished (evicted, expired, lost with a Redis
that restarted empty) ends its waiters with RequestNotFound instead of a wait for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterable

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import ClientClosed, RedisUnavailable, RequestNotFound
from .store import Store, text

__all__ = ["ResultWaiter"]

log = logging.getLogger(__name__)


class ResultWaiter:
    def __init__(self, store: Store, *, sweep_seconds: float = 5.0) -> None:
        self._store = store
        self._sweep_seconds = sweep_seconds
        self._pending: dict[str, list[asyncio.Future[bytes | None]]] = {}
        self._waiting = 0  # the futures in _pending
        # The timeouts' callback reads no context variable: one empty context (entered by this waiter's
        # loop only), not a copy of the caller's for each timer.
        self._timers = contextvars.Context()
        self._to_check: set[str] = set()
        self._check_wanted = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._fail_fast: set[asyncio.Future[bytes | None]] = set()
        self._checked_once = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    async def wait(self, rid: str, timeout: float | None) -> bytes | None:
        """The stored results line for ``rid``, or None if ``timeout`` passes first.

        Raises RequestNotFound if batchd does not know the request (or it vanished while waited for),
        RedisUnavailable if Redis cannot be read before the shared subscription is up, ClientClosed if the
        client is closed meanwhile.
        """
        if self._closing:
            raise ClientClosed("this batchd client is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes | None] = loop.create_future()
        self._pending.setdefault(rid, []).append(future)
        self._waiting += 1
        if not self._subscribed.is_set():
            # Not listening (yet, or Redis is gone): if the first read fails too, say so at once.
            self._fail_fast.add(future)
        self._to_check.add(rid)
        self._check_wanted.set()
        # A bare timer that answers None: asyncio.timeout's cancel scope costs twice as much a caller.
        expiry = None if timeout is None else loop.call_later(timeout, _expire, future, context=self._timers)
        try:
            self._ensure_tasks()
            return await future
        finally:
            if expiry is not None:
                expiry.cancel()
            self._fail_fast.discard(future)
            waiters = self._pending.get(rid, [])
            if future in waiters:
                waiters.remove(future)
                self._waiting -= 1
            if not waiters:
                self._pending.pop(rid, None)

    @property
    def waiting(self) -> int:
        return self._waiting

    def _ensure_tasks(self) -> None:
        if not self._tasks or any(t.done() for t in self._tasks):
            for task in self._tasks:
                task.cancel()
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._listen(), name="batchd-result-listener"),
                loop.create_task(self._check_new(), name="batchd-result-checker"),
            ]

    async def close(self) -> None:
        """Stop; every call still waiting raises ClientClosed at once."""
        self._closing = True
        self._fail(self._pending, lambda _rid: ClientClosed("the batchd client was closed while waiting"))
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            # Cancel until it is done: redis-py can swallow a cancellation that lands inside a command.
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.5)
            if not task.cancelled():
                with contextlib.suppress(Exception):
                    task.result()

    # --- the two tasks -------------------------------------------------------------------------------------
    async def _check_new(self) -> None:
        """Check newly registered waiters in batches: answered already, unknown, or to be woken later."""
        while not self._closing:
            await self._check_wanted.wait()
            self._check_wanted.clear()
            rids, self._to_check = self._to_check, set()
            try:
                await self._fetch(rids, check_known=True)
            except (RedisError, OSError) as exc:
                # Calls made while not listening fail at once; the others wait: the listener re-checks every
                # pending id once it has Redis again.
                batch = {rid: [f for f in self._pending.get(rid, []) if f in self._fail_fast] for rid in rids}
                reason = f"Redis is unreachable: {exc}"

                def unavailable(_rid: str, reason: str = reason) -> BaseException:
                    return RedisUnavailable(reason)

                self._fail(batch, unavailable)
            finally:
                self._checked_once.set()

    async def _listen(self) -> None:
        backoff = 0.1
        channel = self._store.keys.delivered_channel
        # Subscribe after the first callers' own reads, as a single call would: a Redis that is down then
        # fails those calls at once instead of being waited on.
        await self._checked_once.wait()
        while not self._closing:
            pubsub = self._store.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                self._subscribed.set()
                backoff = 0.1
                await self._sweep()
                loop = asyncio.get_running_loop()
                next_sweep = loop.time() + self._sweep_seconds
                while not self._closing:
                    message = await pubsub.get_message(timeout=self._sweep_seconds)
                    ids: set[str] = set()
                    while message is not None:
                        # One message carries the rids one deliver call answered, joined by commas.
                        for rid in text(message.get("data")).split(","):
                            if rid in self._pending:
                                ids.add(rid)
                        # Drain what is already buffered so one MGET serves the burst.
                        message = await pubsub.get_message(timeout=0)
                    if ids:
                        await self._fetch(ids, check_known=False)
                    if loop.time() >= next_sweep:
                        await self._sweep()
                        next_sweep = loop.time() + self._sweep_seconds
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                self._subscribed.clear()
                log.warning(
                    "result listener lost Redis (%s); reconnecting in %.1fs", type(exc).__name__, backoff
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _sweep(self) -> None:
        await self._fetch(set(self._pending), check_known=True)

    async def _fetch(self, rids: Iterable[str], *, check_known: bool) -> None:
        """Resolve the waiters of ``rids`` that have an answer; with ``check_known``, fail those whose
        request batchd no longer knows."""
        wanted = [rid for rid in rids if rid in self._pending]
        if not wanted:
            return
        missing: list[str] = []
        for rid, value in zip(wanted, await self._store.result_lines(wanted), strict=True):
            if value is None:
                missing.append(rid)
                continue
            for future in self._pending.get(rid, []):
                if not future.done():
                    future.set_result(value)
        if check_known and missing:
            known = await self._store.known_requests(missing)
            gone = [rid for rid in missing if rid not in known]
            if gone:
                # Answered between the two reads? Then its result is there now: read once more.
                for rid, value in zip(gone, await self._store.result_lines(gone), strict=True):
                    for future in self._pending.get(rid, []):
                        if future.done():
                            continue
                        if value is None:
                            future.set_exception(RequestNotFound(rid))
                        else:
                            future.set_result(value)

    @staticmethod
    def _fail(
        pending: dict[str, list[asyncio.Future[bytes | None]]], error: Callable[[str], BaseException]
    ) -> None:
        for rid, futures in pending.items():
            for future in futures:
                if not future.done():
                    future.set_exception(error(rid))


def _expire(future: asyncio.Future[bytes | None]) -> None:
    if not future.done():
        future.set_result(None)
