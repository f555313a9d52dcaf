"""What the ways in (the HTTP front, the drop-in SDK transport) need from batchd's queue: three calls.

A ``Backend`` takes an ``ApiRequest`` (translate.py) and hands back the stored results line, the same bytes
the Message Batches API wrote for it (``{"custom_id", "result"}``), so the ways in render exactly what the
API said, unknown fields and all. The contract:

``submit(request, request_id)``
    Queue the request and return its id. Idempotent by id: a request id that was already submitted (queued,
    in flight or answered) is not queued again, and the same id comes back, so a client's retry reattaches
    to its request instead of paying twice. ``request_id=None`` mints a new id. Refusals, before anything is
    written: ``errors.InvalidRequest`` (400; ``RequestTooLarge`` 413), ``errors.QueueFull`` (429 with
    ``retry-after``), ``errors.RedisUnavailable`` (503 with ``retry-after``), or a ``translate.ApiError``
    for anything else that has its own answer (e.g. an over-budget request: 429 ``rate_limit_error``).
``wait(request_id, timeout)``
    The results line once the request is answered; None if ``timeout`` seconds pass first (None: no limit;
    0: look once). Raises ``errors.RequestNotFound`` for an id that was never submitted or whose result has
    expired. Cancelling the call only stops the wait: the request goes on and can be collected later.
``peek(request_id)``
    The results line if the request is answered, else None; never waits. RequestNotFound as for wait.

Every exception is turned into the API's answer by ``translate.api_error_for``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .store import BatchHeaders
from .translate import ApiRequest

if TYPE_CHECKING:
    from .client import AsyncClient

__all__ = ["Backend", "ClientBackend"]


@runtime_checkable
class Backend(Protocol):
    async def submit(self, request: ApiRequest, request_id: str | None) -> str: ...

    async def wait(self, request_id: str, timeout: float | None) -> bytes | None: ...

    async def peek(self, request_id: str) -> bytes | None: ...


class ClientBackend:
    """The Backend over batchd's ``AsyncClient`` (the Redis queue).

    Betas, the API version and the workspace / user-profile headers travel with the request as its batch's
    headers; its tags (``batchd-tags``) go into the cost ledger and the budgets; its route and deadline
    (``batchd-route``, ``batchd-deadline``) decide whether and when it also goes through the real-time API.
    """

    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    async def submit(self, request: ApiRequest, request_id: str | None) -> str:
        extra = dict(request.headers)
        headers = BatchHeaders(
            betas=tuple(sorted(set(request.betas))),
            anthropic_version=request.anthropic_version,
            workspace_id=extra.get("anthropic-workspace-id"),
            user_profile_id=extra.get("anthropic-user-profile-id"),
        )
        deadline = None if request.deadline is None else datetime.fromtimestamp(request.deadline, UTC)
        return await self.client.submit(
            request.params,
            request_id,
            headers=headers,
            tags=dict(request.tags),
            route=request.route,
            deadline=deadline,
        )

    async def wait(self, request_id: str, timeout: float | None) -> bytes | None:
        # The raw line, not the client's parsed model: it keeps blocks the installed SDK does not know.
        if timeout is not None and timeout <= 0:
            return await self.client.peek_line(request_id)
        return await self.client.result_line(request_id, timeout)

    async def peek(self, request_id: str) -> bytes | None:
        return await self.client.peek_line(request_id)
