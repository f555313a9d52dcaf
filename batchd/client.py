"""The producer side: submit requests, wait for their answers, cancel them.

``AsyncClient`` talks to Redis directly (one Lua call per submit, or per chunk of ``submit_many``); the
daemon does the rest. ``Client`` (syncclient.py) is the same thing without ``await``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

import orjson
import redis.asyncio as aioredis
from anthropic.types.messages import MessageBatchResult
from redis.exceptions import AuthenticationError as RedisAuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import apispec, metrics, routing
from .errors import (
    BudgetExceeded,
    ClientClosed,
    InvalidParams,
    QueueFull,
    RedisUnavailable,
    RequestConflict,
    RequestNotFound,
    RequestTooLarge,
    ResultTimeout,
)
from .ledger import budget_limits, estimate, usd
from .messages import AsyncBeta, AsyncMessages, result_of
from .promptcache import cache_prefix, with_ttl_1h
from .routing import RouteName
from .settings import Settings, load_settings, redact_url
from .store import (
    CLIENT_SOCKET_TIMEOUT,
    BatchHeaders,
    BudgetRefused,
    CancelOutcome,
    EnqueueConflict,
    EnqueueOutcome,
    EnqueueRefused,
    Keys,
    NewRequest,
    Route,
    Scripts,
    Store,
    connect,
    now_ms,
)
from .store.connection import one_connection, require_replicas
from .tags import TagSet, parse_tags
from .validation import encode_params, new_request_id, validate_request_id
from .waiter import ResultWaiter

__all__ = ["DEFAULT_RESULT_TIMEOUT", "AsyncClient", "redis_errors"]

T = TypeVar("T")

# One Lua call carries at most this many requests: big enough to amortise the round trip, small enough
# not to stall Redis for other clients.
_SUBMIT_CHUNK = 500
_SUBMIT_CHUNK_BYTES = 16 * 1024 * 1024
DEFAULT_RESULT_TIMEOUT = 600.0


class AsyncClient:
    """Submit requests to batchd and collect their answers.

    Construct it from settings (``AsyncClient()`` reads ``BATCHD_*``), or explicitly::

        async with AsyncClient(redis_url="redis://127.0.0.1:6379/0") as client:
            message = await client.messages.create(model=..., max_tokens=..., messages=[...])
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        settings: Settings | None = None,
        redis: aioredis.Redis | None = None,
        key_prefix: str | None = None,
        socket_timeout: float = CLIENT_SOCKET_TIMEOUT,
        max_connections: int = 8,
        dedupe: bool | None = None,
    ) -> None:
        """``dedupe``: this client's default for dedupe (None: the ``dedupe`` setting); see ``submit``."""
        if settings is None:
            settings = load_settings(**({"redis_url": redis_url} if redis_url else {}))
        self.settings = settings
        self._owns_redis = redis is None
        if redis is None:
            redis = connect(
                redis_url or settings.redis_url,
                "client",
                max_connections=max_connections,
                socket_timeout=socket_timeout,
            )
        self._redis: aioredis.Redis = redis
        self.dedupe = settings.dedupe if dedupe is None else dedupe
        self._budgets = budget_limits(settings)
        self._store = Store(redis, Keys(key_prefix or settings.key_prefix))
        self._waiter = ResultWaiter(self._store)
        # Concurrent submit() calls waiting to be queued together (see _coalesced).
        self._coalescing: list[tuple[NewRequest, float, asyncio.Future[None]]] = []
        self._coalescer: asyncio.Task[None] | None = None
        self._alone: set[asyncio.Task[None]] = set()  # refused parts, each call retried on its own
        self._closed = False
        self.messages = AsyncMessages(self, DEFAULT_RESULT_TIMEOUT)
        self.beta = AsyncBeta(self, DEFAULT_RESULT_TIMEOUT)

    def __repr__(self) -> str:
        prefix = self._store.keys.prefix
        return f"AsyncClient(redis_url={redact_url(self.settings.redis_url)!r}, prefix={prefix!r})"

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Release the connections. Calls waiting for a result raise ClientClosed; so does any later call."""
        if self._closed:
            return
        self._closed = True
        waiting, self._coalescing = self._coalescing, []
        for _, _, future in waiting:
            if not future.done():
                future.set_exception(
                    ClientClosed("the batchd client was closed before the request was queued")
                )
        await self._waiter.close()
        if self._owns_redis:
            await self._redis.aclose(close_connection_pool=True)

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed("this batchd client is closed")

    # --- submit --------------------------------------------------------------------------------------------
    async def submit(
        self,
        params: Mapping[str, Any],
        request_id: str | None = None,
        *,
        wait: float = 0.0,
        betas: Sequence[str] = (),
        anthropic_version: str | None = None,
        headers: BatchHeaders | None = None,
        tags: Mapping[str, str] | TagSet | None = None,
        dedupe: bool | None = None,
        route: RouteName | None = None,
        deadline: float | datetime | None = None,
    ) -> str:
        """Queue one request and return its id at once. Submitting an id that exists (with the same params)
        is a no-op; with other params it is a RequestConflict.

        ``betas`` and ``anthropic_version`` (or ``headers``, all of a batch's headers at once) travel with
        the request: it only shares a batch with requests sent with the same ones. ``tags`` (at most 8
        ``{"key": "value"}`` pairs) label it in the cost ledger and put it under those tags' budgets.
        ``dedupe`` (None: the client's default): an identical request in flight answers this one too, and
        one answered within ``dedupe_window_seconds`` answers it at once, so it is paid for once. When the
        queue is full, wait up to ``wait`` seconds for room, then raise QueueFull; a request whose estimate
        would pass a daily budget raises BudgetExceeded.

        ``route``: ``"batch"`` (the default), ``"realtime"`` (the Messages API at once, at standard prices,
        never batched) or ``"auto"`` with a ``deadline`` (seconds from now, or an aware datetime): batched,
        and sent in real time as well if its batch has not answered ``realtime_margin_seconds`` before the
        deadline (at once if no batch could meet it). A deadline alone means ``"auto"``. Routes other than
        batch are never deduped.
        """
        items = self._items(
            [params],
            None if request_id is None else [request_id],
            betas,
            anthropic_version,
            headers,
            tags,
            dedupe,
            route,
            deadline,
        )
        await self._coalesced(items[0], wait)
        return items[0].rid

    async def submit_many(
        self,
        params_list: Iterable[Mapping[str, Any]],
        request_ids: Sequence[str] | None = None,
        *,
        wait: float = 0.0,
        betas: Sequence[str] = (),
        anthropic_version: str | None = None,
        headers: BatchHeaders | None = None,
        tags: Mapping[str, str] | TagSet | None = None,
        dedupe: bool | None = None,
        route: RouteName | None = None,
        deadline: float | datetime | None = None,
    ) -> list[str]:
        """Queue many requests (all with the same batch headers and tags), pipelined; returns their ids in
        order.

        Every request is checked as the API would check it before anything is written (InvalidParams with
        the API's message), and its tags too. Chunks of requests are written atomically; if the queue fills
        part-way, QueueFull is raised and ``exc.accepted`` holds the ids that were queued (BudgetExceeded
        likewise, when a request's estimate would pass a daily budget). ``route`` and ``deadline`` as for
        ``submit``.
        """
        items = self._items(
            params_list, request_ids, betas, anthropic_version, headers, tags, dedupe, route, deadline
        )
        await self._queue_items(items, wait)
        return [item.rid for item in items]

    def _items(
        self,
        params_list: Iterable[Mapping[str, Any]],
        request_ids: Sequence[str] | None,
        betas: Sequence[str],
        anthropic_version: str | None,
        headers: BatchHeaders | None,
        tags: Mapping[str, str] | TagSet | None,
        dedupe: bool | None,
        route: RouteName | None = None,
        deadline: float | datetime | None = None,
    ) -> list[NewRequest]:
        """The requests as queued, every one checked before anything is written."""
        self._check_open()
        routed = routing.plan(route, deadline, self.settings)
        if headers is None:
            headers = BatchHeaders(betas=tuple(sorted(set(betas))), anthropic_version=anthropic_version)
        tag_set = parse_tags(tags)
        # Routed requests are never deduped: a deadline is its caller's own.
        deduped = (self.dedupe if dedupe is None else bool(dedupe)) and routed.route is Route.BATCH
        # A request sent in real time at once costs the standard price: twice the batch estimate.
        scale = 2 if routed.route in (Route.REALTIME, Route.AUTO_NOW) else 1
        prepared = [self._prepare(p, headers) for p in params_list]
        if request_ids is None:
            rids = [new_request_id() for _ in prepared]
        else:
            if len(request_ids) != len(prepared):
                raise InvalidParams(f"{len(request_ids)} request ids for {len(prepared)} requests")
            rids = [validate_request_id(rid) for rid in request_ids]
        cfg = self.settings
        for request in prepared:
            if len(request.body) > cfg.max_queued_bytes:
                raise RequestTooLarge(
                    f"request is {len(request.body)} bytes; the queue holds at most "
                    f"BATCHD_MAX_QUEUED_BYTES={cfg.max_queued_bytes}"
                )
        _refuse_conflicting_duplicates(rids, [r.body for r in prepared])
        return [
            NewRequest(
                rid,
                p.body,
                headers,
                tag_set,
                p.estimate * scale,
                p.prefix,
                p.prefix_ttl,
                deduped,
                routed.route,
                routed.due_ms,
            )
            for rid, p in zip(rids, prepared, strict=True)
        ]

    async def _queue_items(self, items: list[NewRequest], wait: float) -> None:
        """Queue the requests chunk by chunk, waiting up to ``wait`` for room (else QueueFull)."""
        cfg = self.settings
        deadline = time.monotonic() + wait
        accepted: list[str] = []
        for chunk in _chunks(items):
            backoff = 0.05
            while chunk:
                queued = await self._enqueue(chunk, accepted)
                if queued is None:
                    accepted.extend(r.rid for r in chunk)
                    break
                # Refused whole: queue the part that fits now, wait for room for the rest.
                fit = _fitting_prefix(chunk, *queued, cfg.max_queued_requests, cfg.max_queued_bytes)
                if fit and await self._enqueue(chunk[:fit], accepted) is None:
                    accepted.extend(r.rid for r in chunk[:fit])
                    chunk = chunk[fit:]
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise QueueFull(
                        f"batchd queue is full (BATCHD_MAX_QUEUED_REQUESTS={cfg.max_queued_requests}, "
                        f"BATCHD_MAX_QUEUED_BYTES={cfg.max_queued_bytes}); "
                        f"{len(accepted)} of {len(items)} requests were queued",
                        accepted,
                    )
                await asyncio.sleep(min(backoff, remaining))
                backoff = min(backoff * 2, 1.0)

    async def _coalesced(self, item: NewRequest, wait: float) -> None:
        """Queue one request together with the others submitted meanwhile in this process: one Lua call
        per chunk of concurrent ``submit`` calls instead of one each (10,000 concurrent callers would
        otherwise queue for the pool's connections, a round trip each)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._coalescing.append((item, wait, future))
        if self._coalescer is None or self._coalescer.done():
            self._coalescer = asyncio.create_task(self._submit_coalesced(), name="batchd-submit")
        await future

    async def _submit_coalesced(self) -> None:
        while self._coalescing:
            waiting, self._coalescing = self._coalescing, []
            futures = {id(item): (wait, future) for item, wait, future in waiting}
            # Cut as submit_many cuts (count and bytes); NewRequests are tuples, so look them up by identity.
            for items in _chunks([item for item, _, _ in waiting]):
                part = [(item, *futures[id(item)]) for item in items]
                if len({item.rid for item in items}) < len(items):
                    refused = True  # one id twice: each call gets its own answer (one may conflict)
                else:
                    try:
                        refused = await self._enqueue(items, []) is not None
                    except (RequestConflict, BudgetExceeded):
                        refused = True
                    except Exception as exc:
                        for _, _, future in part:
                            if not future.done():
                                future.set_exception(exc)
                        continue
                    except BaseException:
                        for _, _, future in waiting:
                            future.cancel()
                        raise
                if not refused:
                    for _, _, future in part:
                        if not future.done():
                            future.set_result(None)
                    continue
                # Refused (queue full, a conflict, a budget): each call on its own, with its own outcome
                # and its own wait (a request of the part already queued is an idempotent no-op).
                for item, wait, future in part:
                    task = asyncio.create_task(self._submit_alone(item, wait, future))
                    self._alone.add(task)
                    task.add_done_callback(self._alone.discard)

    async def _submit_alone(self, item: NewRequest, wait: float, future: asyncio.Future[None]) -> None:
        try:
            await self._queue_items([item], wait)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(None)

    def _prepare(self, params: Mapping[str, Any], headers: BatchHeaders) -> _Prepared:
        """The request as stored and sent (its breakpoints raised to 1 h with ``cache_ttl_1h``), once it
        passes the checks the API would make in the batch; with its cache prefix and estimated cost."""
        if self.settings.cache_ttl_1h and isinstance(params, Mapping):
            params = with_ttl_1h(params)
        body = encode_params(
            params, max_batch_bytes=self.settings.max_batch_bytes, max_attempts=self.settings.max_attempts
        )
        try:
            apispec.check_params(params, betas=headers.betas, in_batch=True)
        except apispec.ParamError as exc:
            raise InvalidParams(str(exc)) from None
        prefix = cache_prefix(params, body)
        return _Prepared(
            body,
            estimate(params, len(body), prefix),
            prefix.id if prefix is not None else "",
            prefix.ttl if prefix is not None else 0,
        )

    async def _enqueue(self, chunk: list[NewRequest], accepted: list[str]) -> tuple[int, int] | None:
        """Queue the chunk atomically: None if it was written, else the queue's (requests, bytes) that
        refused it (nothing written). Raises RequestConflict for a known id with other params, and
        BudgetExceeded (after queueing the requests before the one refused) for an estimate over budget."""
        acks = self.settings.redis_min_replicas_ack
        # With acks, the write and its WAIT must share one connection (see store.require_replicas).
        async with redis_errors(), one_connection(self._redis, pinned=acks > 0) as redis:
            scripts = Scripts(redis, self._store.keys) if acks else self._store.scripts
            reply = await scripts.enqueue(
                chunk,
                now_ms=now_ms(),
                max_requests=self.settings.max_queued_requests,
                max_bytes=self.settings.max_queued_bytes,
                budgets=self._budgets,
                result_ttl=self.settings.result_ttl_seconds,
            )
            if acks and isinstance(reply, list):  # written: wait for the replicas
                timeout = self.settings.redis_min_replicas_ack_timeout_seconds
                await require_replicas(redis, self._store.keys, acks, timeout, [r.rid for r in chunk])
        if isinstance(reply, EnqueueRefused):
            return reply.queued_requests, reply.queued_bytes
        if isinstance(reply, EnqueueConflict):
            raise RequestConflict(chunk[reply.index].rid, accepted)
        if isinstance(reply, BudgetRefused):
            if reply.index and await self._enqueue(chunk[: reply.index], accepted) is None:
                accepted.extend(r.rid for r in chunk[: reply.index])
            raise BudgetExceeded(
                reply.scope,
                day=reply.day,
                spent_usd=usd(reply.spent),
                estimate_usd=usd(chunk[reply.index].estimate),
                limit_usd=usd(reply.limit),
                accepted=accepted,
            )
        reused = sum(1 for outcome in reply if outcome is EnqueueOutcome.REUSED)
        if reused:
            metrics.REQUESTS_DEDUPED.labels(how="stored").inc(reused)
        return None

    # --- results -------------------------------------------------------------------------------------------
    async def result(
        self, request_id: str, timeout: float | None = DEFAULT_RESULT_TIMEOUT
    ) -> MessageBatchResult:
        """Wait for the request's result (succeeded, errored, canceled or expired).

        Raises ResultTimeout if ``timeout`` passes first (the request stays in flight), RequestNotFound for an
        id batchd does not know.
        """
        line = await self.result_line(request_id, timeout)
        if line is None:
            raise ResultTimeout(request_id, timeout if timeout is not None else float("inf"))
        return result_of(request_id, line)

    async def result_line(self, request_id: str, timeout: float | None) -> bytes | None:
        """The stored results line as the API wrote it (``{"custom_id", "result"}`` JSON), or None if
        ``timeout`` passes first: for callers that render the API's own answer (the HTTP front, the drop-in
        client), which must not lose a block the installed SDK's models do not know."""
        validate_request_id(request_id)
        self._check_open()
        return await self._waiter.wait(request_id, timeout)

    async def peek_line(self, request_id: str) -> bytes | None:
        """The stored results line if the request is answered, else None; never waits."""
        validate_request_id(request_id)
        self._check_open()
        async with redis_errors():
            line, known = await self._store.result_line(request_id)
        if not known:
            raise RequestNotFound(request_id)
        return line

    async def peek(self, request_id: str) -> MessageBatchResult | None:
        """The result if it has arrived, else None; never waits."""
        line = await self.peek_line(request_id)
        return None if line is None else result_of(request_id, line)

    async def cancel(self, request_id: str) -> bool:
        """Cancel a request. Returns True if it was still queued (it will never be sent to the API), False
        if it had already been flushed into a batch (its caller is answered ``canceled`` now; the API may
        still process and bill it). Raises RequestNotFound for an unknown id; a request that already has
        its answer keeps it (returns False).
        """
        validate_request_id(request_id)
        self._check_open()
        line = orjson.dumps({"custom_id": request_id, "result": {"type": "canceled"}})
        async with redis_errors():
            outcome = await self._store.scripts.cancel(
                request_id, line=line, ttl_seconds=self.settings.result_ttl_seconds
            )
        if outcome is CancelOutcome.UNKNOWN:
            raise RequestNotFound(request_id)
        return outcome is CancelOutcome.REMOVED

    async def ping(self) -> None:
        self._check_open()
        async with redis_errors():
            await self._redis.ping()


class _Prepared(NamedTuple):
    body: bytes
    estimate: int
    prefix: str
    prefix_ttl: int


def _refuse_conflicting_duplicates(rids: Sequence[str], bodies: Sequence[bytes]) -> None:
    """The same id twice in one call is one request, unless the params differ: refused before any write."""
    if len(set(rids)) == len(rids):
        return
    first: dict[str, bytes] = {}
    for rid, body in zip(rids, bodies, strict=True):
        if first.setdefault(rid, body) != body:
            raise RequestConflict(rid, [])


def _chunks(items: list[NewRequest]) -> Iterator[list[NewRequest]]:
    """Cut a submit into Lua calls of at most _SUBMIT_CHUNK requests and _SUBMIT_CHUNK_BYTES bytes (one
    huge request still goes alone): Redis buffers a whole call in memory before it runs it."""
    chunk: list[NewRequest] = []
    size = 0
    for item in items:
        if chunk and (len(chunk) >= _SUBMIT_CHUNK or size + len(item.body) > _SUBMIT_CHUNK_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += len(item.body)
    if chunk:
        yield chunk


def _fitting_prefix(
    chunk: list[NewRequest], queued_n: int, queued_bytes: int, max_n: int, max_bytes: int
) -> int:
    """How many requests from the head of ``chunk`` fit under the caps right now."""
    n, nbytes = queued_n, queued_bytes
    for i, request in enumerate(chunk):
        n += 1
        nbytes += len(request.body)
        if n > max_n or nbytes > max_bytes:
            return i
    return len(chunk)


@contextlib.asynccontextmanager
async def redis_errors() -> AsyncIterator[None]:
    """Redis failures become RedisUnavailable with a one-line reason; the scripts never half-write."""
    try:
        yield
    except RedisAuthenticationError as exc:
        raise RedisUnavailable(f"Redis refused the credentials in the Redis URL: {exc}") from exc
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise RedisUnavailable(f"Redis is unreachable: {exc}") from exc
    except OutOfMemoryError as exc:
        raise RedisUnavailable(
            "Redis is out of memory (maxmemory reached with noeviction); nothing was written"
        ) from exc
    except ResponseError as exc:
        raise RedisUnavailable(f"Redis refused the command: {exc}") from exc
    except RedisError as exc:
        raise RedisUnavailable(f"Redis error: {exc}") from exc
