"""batchd's exceptions: one small tree, so callers can catch as broadly or narrowly as they need.

BatchdError
├── ConfigError              a setting is missing or invalid (the CLI exits 2)
├── ClientClosed             the client was closed (also wakes calls still waiting for a result)
├── InvalidRequest           refused at submit; nothing was written
│   ├── InvalidParams        not a mapping, missing model/max_tokens/messages, stream, not JSON
│   ├── InvalidRequestId     outside [A-Za-z0-9_-]{1,60}
│   ├── RequestConflict      a request id already known with other params
│   └── RequestTooLarge      bigger than one batch may hold
├── QueueFull                backpressure: the queue cap was reached (and the wait, if any, ran out)
├── BudgetExceeded           the request's estimated cost would pass a daily budget (global or a tag's)
├── RedisUnavailable         Redis could not be reached or refused the write (e.g. out of memory)
│   └── ReplicationTimeout   written on the primary, not confirmed on enough replicas: resubmit the same ids
├── RequestNotFound          no such request id (never submitted, or its result expired)
├── ResultTimeout            the caller's wait ended first; the answer can be collected later by id
└── RequestFailed            the request ended without a message
    ├── RequestErrored       the API answered with an error (error_type, message)
    ├── RequestCanceled      canceled before it was processed
    └── RequestExpired       the API did not process it in time, on every attempt
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "BatchdError",
    "BudgetExceeded",
    "ClientClosed",
    "ConfigError",
    "InvalidParams",
    "InvalidRequest",
    "InvalidRequestId",
    "QueueFull",
    "RedisUnavailable",
    "ReplicationTimeout",
    "RequestCanceled",
    "RequestConflict",
    "RequestErrored",
    "RequestExpired",
    "RequestFailed",
    "RequestNotFound",
    "RequestTooLarge",
    "ResultTimeout",
]


class BatchdError(Exception):
    """Base of every error batchd raises on purpose."""


class ConfigError(BatchdError):
    """A setting is invalid; the message names it."""


class ClientClosed(BatchdError):
    """The client was closed: nothing more can be submitted or waited for through it."""


class InvalidRequest(BatchdError):
    """The request was refused at submit and nothing was written."""


class InvalidParams(InvalidRequest):
    pass


class InvalidRequestId(InvalidRequest):
    pass


class RequestTooLarge(InvalidRequest):
    pass


class RequestConflict(InvalidRequest):
    """A request id that batchd already knows was submitted again with other params. Nothing of the call
    that hit it was written, but ``accepted`` lists the ids of earlier chunks of a ``submit_many`` that were
    queued before it (as QueueFull does)."""

    def __init__(self, request_id: str, accepted: list[str] | None = None) -> None:
        super().__init__(
            f"request id {request_id!r} is already known with other params: submit the same params to "
            "collect its answer, or use another id"
        )
        self.request_id = request_id
        self.accepted = list(accepted or [])


class QueueFull(BatchdError):
    """The intake queue is at its configured cap of requests or bytes.

    ``accepted`` lists the request ids that were queued before the cap was hit (submit_many).
    """

    def __init__(self, message: str, accepted: list[str] | None = None) -> None:
        super().__init__(message)
        self.accepted = list(accepted or [])


class BudgetExceeded(BatchdError):
    """A request's estimated cost (its size and ``max_tokens`` at its model's batch price) would take a
    daily budget past its limit. Nothing of the refused request was written.

    ``scope`` is the budget: ``"*"`` (the global one) or a tag's ``key=value``; ``day`` is the UTC day it
    counts against; ``spent_usd`` what that day has spent or reserved, ``estimate_usd`` the request's
    estimate and ``limit_usd`` the budget. ``accepted`` lists the ids queued before the refusal
    (``submit_many``), as QueueFull does.
    """

    def __init__(
        self,
        scope: str,
        *,
        day: str,
        spent_usd: float,
        estimate_usd: float,
        limit_usd: float,
        accepted: list[str] | None = None,
    ) -> None:
        name = "the global daily budget" if scope == "*" else f"the daily budget of tag {scope}"
        super().__init__(
            f"{name} would be exceeded: {day} has spent or reserved ${spent_usd:.6f} of ${limit_usd:.6f}, "
            f"and this request's estimate is ${estimate_usd:.6f}; nothing was queued"
        )
        self.scope = scope
        self.day = day
        self.spent_usd = spent_usd
        self.estimate_usd = estimate_usd
        self.limit_usd = limit_usd
        self.accepted = list(accepted or [])


class RedisUnavailable(BatchdError):
    """Redis could not be reached, or refused the write. Nothing was half-written."""


class ReplicationTimeout(RedisUnavailable):
    """A submit was written on the Redis primary, but fewer replicas than ``redis_min_replicas_ack``
    confirmed it within ``redis_min_replicas_ack_timeout_seconds``.

    The requests in ``request_ids`` are queued and will be answered unless the primary fails before they
    reach a replica: a Sentinel failover then loses them. Submit them again *with the same ids* (idempotent:
    a no-op for a request that is still there, queued again if it was lost) until the submit returns; never
    under new ids, which could run and bill them twice. For ``submit_many``, the requests before these were
    confirmed and the ones after were not written: repeating the whole call with the same ids is safe.
    """

    def __init__(self, request_ids: Sequence[str], wanted: int, acked: int, timeout: float) -> None:
        ids = ", ".join(repr(rid) for rid in request_ids[:3]) + (", ..." if len(request_ids) > 3 else "")
        super().__init__(
            f"{len(request_ids)} request(s) ({ids}) queued on the Redis primary but confirmed by {acked} of "
            f"the {wanted} replicas required within {timeout:g}s: they may not survive a failover; "
            f"submit them again with the same request ids"
        )
        self.request_ids = list(request_ids)
        self.wanted = wanted
        self.acked = acked


class RequestNotFound(BatchdError):
    def __init__(self, request_id: str) -> None:
        super().__init__(f"no request {request_id!r} (never submitted, or its result has expired)")
        self.request_id = request_id


class ResultTimeout(BatchdError):
    """The wait ended before the answer arrived. The request is still in flight: collect it later."""

    def __init__(self, request_id: str, timeout: float) -> None:
        super().__init__(
            f"request {request_id!r} has no answer yet after {timeout:g}s; "
            f"collect it later with client.result({request_id!r})"
        )
        self.request_id = request_id
        self.timeout = timeout


class RequestFailed(BatchdError):
    """The request ended without a message; ``result_type`` is the batch result type."""

    result_type: str = ""

    def __init__(self, request_id: str, message: str) -> None:
        super().__init__(message)
        self.request_id = request_id


class RequestErrored(RequestFailed):
    """The API answered with an error; ``error_type`` is the API's own (e.g. invalid_request_error)."""

    result_type = "errored"

    def __init__(self, request_id: str, error_type: str, message: str) -> None:
        super().__init__(request_id, f"{error_type}: {message} (request {request_id})")
        self.error_type = error_type
        self.api_message = message


class RequestCanceled(RequestFailed):
    result_type = "canceled"

    def __init__(self, request_id: str) -> None:
        super().__init__(request_id, f"request {request_id!r} was canceled")


class RequestExpired(RequestFailed):
    result_type = "expired"

    def __init__(self, request_id: str) -> None:
        super().__init__(request_id, f"request {request_id!r} expired before the API processed it")
