"""Reading one results line: which request and attempt it answers, its type, and whether it may retry."""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson

from ..ledger import charge_of
from ..metrics import RESULT_TYPES
from ..store import Delivery, split_custom_id
from ..validation import validate_request_id

__all__ = [
    "RESULT_TYPES",
    "RETRYABLE_ERROR_TYPES",
    "ResultLine",
    "errored_line",
    "expired_line",
    "parse_line",
]

# Inner error types of an `errored` result that mean "the API failed, not the request": try again.
RETRYABLE_ERROR_TYPES = frozenset({"api_error", "overloaded_error"})


class ResultLine(NamedTuple):
    """One parsed results line. A NamedTuple: a fan-out makes one per line (a frozen dataclass costs ~3x as
    much to make)."""

    rid: str
    attempt: int
    type: str  # one of RESULT_TYPES
    error_type: str | None  # the inner error type of an errored result
    message: dict[str, Any] | None  # the Message of a succeeded result, as sent
    raw: bytes

    @property
    def transient(self) -> bool:
        """The API did not process the request: it expired, failed on the API's side, or was canceled by
        someone other than its caller (a request its caller canceled is answered already, and deliver.lua
        leaves it so). Worth another attempt."""
        return self.type in ("expired", "canceled") or self.error_type in RETRYABLE_ERROR_TYPES

    def delivery(self, *, allow_retry: bool) -> Delivery:
        """For deliver.lua; a succeeded line carries its charge (the API billed it, delivered or not)."""
        charge = charge_of(self.message) if self.message is not None else None
        return Delivery(self.rid, self.attempt, self.raw, allow_retry and self.transient, charge)


def parse_line(raw: bytes) -> ResultLine:
    """Check the shape batchd relies on; ValueError (or KeyError/TypeError) on anything else."""
    obj = orjson.loads(raw)
    result = obj["result"]
    rtype = result["type"]
    rid, attempt = split_custom_id(obj["custom_id"])
    validate_request_id(rid)
    error_type = result["error"]["error"]["type"] if rtype == "errored" else None
    if rtype not in RESULT_TYPES or (rtype == "errored" and not isinstance(error_type, str)):
        raise ValueError("not a results line")
    message = result.get("message") if rtype == "succeeded" else None
    if rtype == "succeeded" and not isinstance(message, dict):
        raise ValueError("succeeded without a message")
    return ResultLine(rid, attempt, rtype, error_type, message, raw)


def expired_line(custom_id: str) -> bytes:
    """The line batchd writes for a request no results line answered."""
    return orjson.dumps({"custom_id": custom_id, "result": {"type": "expired"}})


def errored_line(custom_id: str, error_type: str, message: str, request_id: str | None) -> bytes:
    """An errored results line carrying the API's own error (a refused create, for every request in it)."""
    return orjson.dumps(
        {
            "custom_id": custom_id,
            "result": {
                "type": "errored",
                "error": {
                    "type": "error",
                    "error": {"type": error_type, "message": message},
                    "request_id": request_id,
                },
            },
        }
    )
