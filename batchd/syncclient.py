"""The synchronous client: AsyncClient's methods without ``await``, on a private event loop thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from anthropic.types import Message
from anthropic.types.beta import BetaMessage
from anthropic.types.messages import MessageBatchResult

from .client import DEFAULT_RESULT_TIMEOUT, AsyncClient
from .errors import ClientClosed

__all__ = ["Client"]

T = TypeVar("T")


class Client:
    """The synchronous client: the same methods as AsyncClient, without ``await``.

    It owns a private event loop in a daemon thread; many threads may share one Client.
    """

    def __init__(self, redis_url: str | None = None, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="batchd-client", daemon=True)
        self._thread.start()

        async def make() -> AsyncClient:
            return AsyncClient(redis_url, **kwargs)

        try:
            self._async = self._run(make())
        except BaseException:
            self._stop_loop()
            raise
        self.settings = self._async.settings
        self.messages = Messages(self)
        self.beta = Beta(self)

    def _run(self, coro: Awaitable[T]) -> T:
        if self._loop.is_closed():
            if asyncio.iscoroutine(coro):
                coro.close()  # never awaited: say so quietly instead of a RuntimeWarning
            raise ClientClosed("this batchd client is closed")
        future: Future[T] = asyncio.run_coroutine_threadsafe(_as_coroutine(coro), self._loop)
        return future.result()

    def __repr__(self) -> str:
        return repr(self._async).replace("AsyncClient", "Client", 1)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._async.close())
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def submit(
        self, params: Mapping[str, Any], request_id: str | None = None, *, wait: float = 0.0, **headers: Any
    ) -> str:
        """As AsyncClient.submit (``betas``, ``anthropic_version``, ``headers``, ``tags``, ``dedupe``,
        ``route`` and ``deadline`` likewise)."""
        return self._run(self._async.submit(params, request_id, wait=wait, **headers))

    def submit_many(
        self,
        params_list: Iterable[Mapping[str, Any]],
        request_ids: Sequence[str] | None = None,
        *,
        wait: float = 0.0,
        **headers: Any,
    ) -> list[str]:
        return self._run(self._async.submit_many(list(params_list), request_ids, wait=wait, **headers))

    def result(self, request_id: str, timeout: float | None = DEFAULT_RESULT_TIMEOUT) -> MessageBatchResult:
        return self._run(self._async.result(request_id, timeout=timeout))

    def peek(self, request_id: str) -> MessageBatchResult | None:
        return self._run(self._async.peek(request_id))

    def cancel(self, request_id: str) -> bool:
        return self._run(self._async.cancel(request_id))

    def ping(self) -> None:
        self._run(self._async.ping())


class Messages:
    def __init__(self, client: Client) -> None:
        self._client = client

    def create(self, **kwargs: Any) -> Message:
        """Same as AsyncClient.messages.create, blocking."""
        return self._client._run(self._client._async.messages.create(**kwargs))


class BetaMessages:
    def __init__(self, client: Client) -> None:
        self._client = client

    def create(self, **kwargs: Any) -> BetaMessage:
        """Same as AsyncClient.beta.messages.create, blocking."""
        return self._client._run(self._client._async.beta.messages.create(**kwargs))


class Beta:
    def __init__(self, client: Client) -> None:
        self.messages = BetaMessages(client)


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable
