"""An in-memory Backend: for tests (batchd's and yours), demos and benchmarks of the ways in. Not durable.

Each submitted request is answered by a *responder*, ``async (request_id, request) -> results line``:

- ``batch_responder(client)`` sends the request as a one-request Message Batch through the official SDK
  (point ``client`` at batchd's emulator) and returns its raw results line;
- ``message_responder(make)`` renders a ``succeeded`` line from ``make(request) -> Message dict``.

Ids are idempotent as the Backend contract says: submitting a known id neither queues nor answers it again.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from .errors import RequestNotFound
from .translate import ApiRequest
from .validation import validate_request_id

if TYPE_CHECKING:
    import anthropic

__all__ = ["MemoryBackend", "Responder", "batch_responder", "message_responder", "result_line"]

Responder = Callable[[str, ApiRequest], Awaitable[bytes]]


class MemoryBackend:
    """Answers every request with ``responder``, at most once per id; results are kept in memory.

    ``requests`` maps each id to the request it was first submitted with; ``submit_calls`` counts calls
    (a retry that reattached shows as a call without a new request).
    """

    def __init__(self, responder: Responder) -> None:
        self._responder = responder
        self.requests: dict[str, ApiRequest] = {}
        self.submit_calls = 0
        self._results: dict[str, asyncio.Future[bytes]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, request: ApiRequest, request_id: str | None) -> str:
        self.submit_calls += 1
        rid = validate_request_id(request_id) if request_id is not None else secrets.token_urlsafe(16)
        if rid in self._results:
            return rid
        self.requests[rid] = request
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._results[rid] = future
        task = asyncio.create_task(self._answer(rid, request, future))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return rid

    async def _answer(self, rid: str, request: ApiRequest, future: asyncio.Future[bytes]) -> None:
        try:
            line = await self._responder(rid, request)
        except Exception as exc:  # the API would have answered: an errored result, never a lost request
            error = {"type": "error", "error": {"type": "api_error", "message": repr(exc)}}
            line = result_line(rid, {"type": "errored", "error": error})
        future.set_result(line)

    async def wait(self, request_id: str, timeout: float | None) -> bytes | None:
        future = self._future(request_id)
        if future.done():
            return future.result()
        if timeout is not None and timeout <= 0:
            return None
        try:
            # shield: a waiter that gives up (or is cancelled) must not cancel the answer.
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            return None

    async def peek(self, request_id: str) -> bytes | None:
        future = self._future(request_id)
        return future.result() if future.done() else None

    def _future(self, request_id: str) -> asyncio.Future[bytes]:
        future = self._results.get(request_id)
        if future is None:
            raise RequestNotFound(request_id)
        return future

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def result_line(custom_id: str, result: Mapping[str, Any]) -> bytes:
    return orjson.dumps({"custom_id": custom_id, "result": result})


def message_responder(make: Callable[[ApiRequest], Mapping[str, Any]]) -> Responder:
    """A responder answering ``succeeded`` with the Message ``make(request)`` returns."""

    async def respond(request_id: str, request: ApiRequest) -> bytes:
        return result_line(request_id, {"type": "succeeded", "message": make(request)})

    return respond


def batch_responder(client: anthropic.AsyncAnthropic, *, poll: float = 0.02) -> Responder:
    """A responder that sends each request as a one-request Message Batch and returns its raw results line.

    The batch is created with the request's betas, API version and per-batch headers, as batchd's daemon
    will create it. Meant for the emulator: ``poll`` is short.
    """

    async def respond(request_id: str, request: ApiRequest) -> bytes:
        headers = dict(request.headers)
        if request.betas:
            headers["anthropic-beta"] = ",".join(request.betas)
        if request.anthropic_version:
            headers["anthropic-version"] = request.anthropic_version
        batch = await client.messages.batches.create(
            requests=[{"custom_id": request_id, "params": dict(request.params)}],  # type: ignore[typeddict-item]
            extra_headers=headers,
        )
        while batch.processing_status != "ended":
            await asyncio.sleep(poll)
            batch = await client.messages.batches.retrieve(batch.id)
        async with client.messages.batches.with_streaming_response.results(batch.id) as response:
            async for line in response.iter_lines():
                if line.strip():
                    return line.encode()
        raise RuntimeError(f"batch {batch.id} ended without a result for {request_id}")

    return respond
