"""The drop-in Python client: the official SDK's own client classes, answered at batch prices.

``batchd.AsyncAnthropic`` and ``batchd.Anthropic`` subclass ``anthropic.AsyncAnthropic`` and
``anthropic.Anthropic``. Their HTTP transport hands ``POST /v1/messages`` (``?beta=true`` too) to a
``Backend`` in-process and answers with the HTTP response the Messages API would give (JSON, or SSE for
``stream``), built by translate.py and sse.py. Every other request goes to the API through an ordinary
transport, unchanged. The SDK does all the rest itself: its own types, ``betas=``, ``extra_headers``,
``with_raw_response``, ``messages.stream``, ``beta.messages.create`` -> ``BetaMessage``, and
``BadRequestError`` & co. for an errored result::

    client = batchd.AsyncAnthropic(backend=backend)          # and any anthropic.AsyncAnthropic keyword
    message = await client.messages.create(model=..., max_tokens=..., messages=[...])

Paying once: the SDK retries timeouts, connection errors, 429 and 5xx. These clients make the SDK send one
``Idempotency-Key`` per call (the same on every retry of that call), and that key is the batchd request id,
so a retry reattaches to the request it retries. Answers rendered from a stored result carry
``x-should-retry: false``: the same id can only give the same answer again.

Waiting: a batch takes minutes to hours, so the SDK's ``timeout`` (600 s by default, per read) does not
cut the wait for a batchd answer; ``wait_timeout`` does (None: wait for the answer). When it passes, the
SDK sees a read timeout and retries, reattaching each time; after its retries it raises
``APITimeoutError`` and the request stays queued.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Coroutine, Iterable
from concurrent.futures import Future
from typing import Any, TypeVar

import anthropic
import httpx2

from . import sse
from .backend import Backend
from .translate import (
    ApiError,
    Validator,
    answer_from_line,
    api_error_for,
    is_messages_path,
    parse_request,
)

__all__ = ["IDEMPOTENCY_HEADER", "Anthropic", "AsyncAnthropic", "AsyncBatchdTransport", "BatchdTransport"]

log = logging.getLogger("batchd.sdk")

IDEMPOTENCY_HEADER = "Idempotency-Key"
# The prefix of the keys the SDK mints itself (anthropic/_base_client.py: _idempotency_key).
_SDK_KEY_PREFIX = "stainless-"
_T = TypeVar("_T")

Reply = tuple[int, list[tuple[str, str]], bytes]


async def answer_request(
    backend: Backend,
    method: str,
    path: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    *,
    validate: Validator | None,
    wait_timeout: float | None,
) -> Reply | None:
    """The Messages API's HTTP answer for one request: (status, headers, body); None if ``wait_timeout``
    passed first (the request stays queued; the same idempotency key reattaches to it)."""
    rid: str | None = None
    try:
        request = parse_request(method, path, headers, body, validate=validate)
        if request.respond_async:
            raise ApiError(400, "invalid_request_error", "Prefer: respond-async is for batchd's HTTP front")
        rid = await backend.submit(request, request.request_id)
        line = await backend.wait(rid, wait_timeout)
    except Exception as exc:
        error = api_error_for(exc)
        if error.status >= 500 and not isinstance(exc, ApiError):
            log.error("request %s failed in the backend", rid, exc_info=exc)
        reply_headers = [("content-type", "application/json"), *error.headers.items()]
        if rid is not None:
            reply_headers += [("request-id", rid), ("batchd-request-id", rid)]
        return error.status, reply_headers, error.body(rid)
    if line is None:
        return None
    answer = answer_from_line(line, rid)
    reply_headers = [("request-id", rid), ("batchd-request-id", rid), *answer.headers.items()]
    if request.stream and answer.message is not None:
        return 200, [("content-type", sse.CONTENT_TYPE), *reply_headers], sse.render(answer.message)
    return answer.status, [("content-type", "application/json"), *reply_headers], answer.body


def _is_batchd_request(request: httpx2.Request) -> bool:
    return request.method == "POST" and is_messages_path(request.url.path)


def _strip_sdk_key(request: httpx2.Request) -> None:
    # The key exists for batchd; a request batchd does not answer goes out as the plain SDK would send it.
    if request.headers.get(IDEMPOTENCY_HEADER, "").startswith(_SDK_KEY_PREFIX):
        del request.headers[IDEMPOTENCY_HEADER]


def _timed_out(request: httpx2.Request) -> httpx2.ReadTimeout:
    return httpx2.ReadTimeout(
        "batchd: no answer within wait_timeout; the request stays queued (a retry reattaches)",
        request=request,
    )


class AsyncBatchdTransport(httpx2.AsyncBaseTransport):
    """Answers ``POST /v1/messages`` from ``backend``; sends everything else through ``upstream``."""

    def __init__(
        self,
        backend: Backend,
        upstream: httpx2.AsyncClient | None = None,
        *,
        validate: Validator | None = None,
        wait_timeout: float | None = None,
    ) -> None:
        self.backend = backend
        self.validate = validate
        self.wait_timeout = wait_timeout
        self._upstream = upstream if upstream is not None else anthropic.DefaultAsyncHttpxClient()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if not _is_batchd_request(request):
            _strip_sdk_key(request)
            response = await self._upstream.send(request, stream=True)
            return httpx2.Response(
                response.status_code, headers=response.headers, stream=response.stream, request=request
            )
        reply = await answer_request(
            self.backend,
            request.method,
            request.url.raw_path.decode("ascii"),
            request.headers.multi_items(),
            await request.aread(),
            validate=self.validate,
            wait_timeout=self.wait_timeout,
        )
        if reply is None:
            raise _timed_out(request)
        status, headers, body = reply
        return httpx2.Response(status, headers=headers, content=body, request=request)

    async def aclose(self) -> None:
        await self._upstream.aclose()


class _LoopThread:
    """A private event loop in a daemon thread: the sync client drives its async backend on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="batchd-sdk", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        future: Future[_T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result()

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class BatchdTransport(httpx2.BaseTransport):
    """The synchronous twin of AsyncBatchdTransport: the backend runs on a private event loop thread, so
    many threads may share one client. The backend must be used only from that loop (it is)."""

    def __init__(
        self,
        backend: Backend,
        upstream: httpx2.Client | None = None,
        *,
        validate: Validator | None = None,
        wait_timeout: float | None = None,
    ) -> None:
        self.backend = backend
        self.validate = validate
        self.wait_timeout = wait_timeout
        self._upstream = upstream if upstream is not None else anthropic.DefaultHttpxClient()
        self._loop = _LoopThread()

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        if not _is_batchd_request(request):
            _strip_sdk_key(request)
            response = self._upstream.send(request, stream=True)
            return httpx2.Response(
                response.status_code, headers=response.headers, stream=response.stream, request=request
            )
        reply = self._loop.run(
            answer_request(
                self.backend,
                request.method,
                request.url.raw_path.decode("ascii"),
                request.headers.multi_items(),
                request.read(),
                validate=self.validate,
                wait_timeout=self.wait_timeout,
            )
        )
        if reply is None:
            raise _timed_out(request)
        status, headers, body = reply
        return httpx2.Response(status, headers=headers, content=body, request=request)

    def run(self, awaitable: Awaitable[_T]) -> _T:
        """Run a coroutine on the backend's loop (e.g. to close the backend)."""

        async def call() -> _T:
            return await awaitable

        return self._loop.run(call())

    def close(self) -> None:
        self._upstream.close()
        self._loop.stop()


class _AsyncHttpClient(httpx2.AsyncClient):
    """The SDK's http client of batchd.AsyncAnthropic; the SDK client's copies (``with_options``) share it."""

    def __init__(self, transport: AsyncBatchdTransport) -> None:
        super().__init__(transport=transport, timeout=anthropic.DEFAULT_TIMEOUT, follow_redirects=True)
        self.batchd_transport = transport


class _HttpClient(httpx2.Client):
    def __init__(self, transport: BatchdTransport) -> None:
        super().__init__(transport=transport, timeout=anthropic.DEFAULT_TIMEOUT, follow_redirects=True)
        self.batchd_transport = transport


class AsyncAnthropic(anthropic.AsyncAnthropic):
    """``anthropic.AsyncAnthropic`` whose ``messages.create`` / ``messages.stream`` (and beta) go to batchd.

    ``backend``: where requests go (required, except in the SDK's own ``copy()``). ``validate``: the check
    a request must pass before it is queued (``validate(params, betas)``; e.g. batchd.apispec's).
    ``wait_timeout``: how long one attempt waits for the answer (None: until it comes). ``http_client``: used
    for every request batchd does not answer (proxies, custom transports). batchd's requests need no API
    key; the others need one as usual. Every other keyword is ``anthropic.AsyncAnthropic``'s.
    """

    def __init__(
        self,
        *,
        backend: Backend | None = None,
        validate: Validator | None = None,
        wait_timeout: float | None = None,
        http_client: httpx2.AsyncClient | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(http_client, _AsyncHttpClient):  # else: a copy() of a batchd client shares its own
            if backend is None:
                raise TypeError("batchd.AsyncAnthropic needs backend= (where requests are queued)")
            transport = AsyncBatchdTransport(
                backend, http_client, validate=validate, wait_timeout=wait_timeout
            )
            http_client = _AsyncHttpClient(transport)
        super().__init__(http_client=http_client, **kwargs)
        self._idempotency_header = IDEMPOTENCY_HEADER

    @property
    def backend(self) -> Backend:
        assert isinstance(self._client, _AsyncHttpClient)
        return self._client.batchd_transport.backend

    def _validate_headers(self, headers: httpx2.Headers, omitted: frozenset[str]) -> None:
        # batchd's requests need no API key; a forwarded request without one gets the API's own 401.
        return None


class Anthropic(anthropic.Anthropic):
    """``anthropic.Anthropic`` whose ``messages.create`` / ``messages.stream`` (and beta) go to batchd.

    Same keywords as ``AsyncAnthropic`` (``http_client`` is an ``httpx2.Client``). The async ``backend`` runs
    on a private event loop thread owned by the client; ``close()`` stops it (``run(backend.aclose())``
    first to close a backend there).
    """

    def __init__(
        self,
        *,
        backend: Backend | None = None,
        validate: Validator | None = None,
        wait_timeout: float | None = None,
        http_client: httpx2.Client | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(http_client, _HttpClient):
            if backend is None:
                raise TypeError("batchd.Anthropic needs backend= (where requests are queued)")
            transport = BatchdTransport(backend, http_client, validate=validate, wait_timeout=wait_timeout)
            http_client = _HttpClient(transport)
        super().__init__(http_client=http_client, **kwargs)
        self._idempotency_header = IDEMPOTENCY_HEADER

    @property
    def backend(self) -> Backend:
        assert isinstance(self._client, _HttpClient)
        return self._client.batchd_transport.backend

    def run(self, awaitable: Awaitable[_T]) -> _T:
        """Run a coroutine on the loop the backend lives on (e.g. ``client.run(backend.aclose())``)."""
        assert isinstance(self._client, _HttpClient)
        return self._client.batchd_transport.run(awaitable)

    def _validate_headers(self, headers: httpx2.Headers, omitted: frozenset[str]) -> None:
        return None
