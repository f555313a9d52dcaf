"""Waiting for results: every waiter in a process shares one pub/sub connection.

The deliver script publishes each answered request id on one channel. One listener task per client
subscribes, and on each id wakes the futures waiting for it, fetching results with one MGET per burst of
ids. A waiter checks the result key itself *after* the subscription is live, so an answer that landed
before it started waiting is never missed; after every (re)subscription, and every ``sweep_seconds``, the
listener re-checks all pending ids, so a message lost while disconnected costs a delay, not an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import ClientClosed
from .store import Store, text

__all__ = ["ResultWaiter"]

log = logging.getLogger(__name__)


class ResultWaiter:
    def __init__(self, store: Store, *, sweep_seconds: float = 5.0) -> None:
        self._store = store
        self._sweep_seconds = sweep_seconds
        self._pending: dict[str, list[asyncio.Future[bytes]]] = {}
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    async def wait(
        self, rid: str, timeout: float | None, fetch: Callable[[], Awaitable[bytes | None]]
    ) -> bytes | None:
        """The stored results line for ``rid``, or None if ``timeout`` passes first.

        ``fetch`` reads the result key; it runs once the subscription is live and this waiter is
        registered, so an answer is either already stored or announced to the listener: never missed.
        Raises ClientClosed if the waiter is closed meanwhile.
        """
        if self._closing:
            raise ClientClosed("this batchd client is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        self._pending.setdefault(rid, []).append(future)
        try:
            self._ensure_listener()
            async with asyncio.timeout(timeout):
                if not self._subscribed.is_set():
                    # Wait for the subscription, unless close() answers this future first.
                    subscribed = asyncio.ensure_future(self._subscribed.wait())
                    either: set[asyncio.Future[Any]] = {subscribed, future}
                    try:
                        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        subscribed.cancel()
                    if future.done():
                        return future.result()
                try:
                    line = await fetch()
                except (RedisConnectionError, RedisTimeoutError, OSError):
                    # Lost Redis just now: the listener re-checks every pending id once it reconnects.
                    line = None
                if line is not None:
                    return line
                return await future
        except TimeoutError:
            return None
        finally:
            waiters = self._pending.get(rid, [])
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._pending.pop(rid, None)

    @property
    def waiting(self) -> int:
        return sum(len(v) for v in self._pending.values())

    def _ensure_listener(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._listen(), name="batchd-result-listener")

    async def close(self) -> None:
        """Stop listening; every call still waiting raises ClientClosed at once."""
        self._closing = True
        for futures in self._pending.values():
            for future in futures:
                if not future.done():
                    future.set_exception(ClientClosed("the batchd client was closed while waiting"))
        task, self._task = self._task, None
        # Cancel until it is done: redis-py can swallow a cancellation that lands inside a command.
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)
        if task is not None and not task.cancelled():
            with contextlib.suppress(Exception):
                task.result()

    async def _listen(self) -> None:
        backoff = 0.1
        channel = self._store.keys.delivered_channel
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
                        rid = text(message.get("data"))
                        if rid in self._pending:
                            ids.add(rid)
                        # Drain what is already buffered so one MGET serves the burst.
                        message = await pubsub.get_message(timeout=0)
                    if ids:
                        await self._fetch(list(ids))
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
        await self._fetch(list(self._pending))

    async def _fetch(self, rids: list[str]) -> None:
        for rid, value in zip(rids, await self._store.result_lines(rids), strict=True):
            if value is None:
                continue
            for future in self._pending.get(rid, []):
                if not future.done():
                    future.set_result(value)
