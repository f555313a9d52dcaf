"""The API's error envelope and the exception handlers raise to produce one."""

from __future__ import annotations

__all__ = ["ApiError", "envelope", "not_found"]


def envelope(error_type: str, message: str, request_id: str | None) -> dict[str, object]:
    """The body of every non-2xx answer, and of every `errored` result (with request_id None)."""
    return {"type": "error", "error": {"type": error_type, "message": message}, "request_id": request_id}


class ApiError(Exception):
    """Raised anywhere under a handler; the middleware turns it into the JSON error envelope."""

    def __init__(
        self, status: int, error_type: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.headers = headers or {}


def not_found(what: str = "The requested resource could not be found.") -> ApiError:
    return ApiError(404, "not_found_error", what)
