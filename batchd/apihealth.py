"""Is the Anthropic API answering this replica? A key that is wrong or revoked, a wrong base URL or an API
that is down makes every call fail: say so loudly (an ERROR within a minute, then once a minute, a gauge,
a line in ``batchd status``) instead of retrying in silence while callers time out."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ALARM_AFTER_S", "ApiHealth", "ApiState", "api_health"]

log = logging.getLogger("batchd.api")

# Failing this long with no success in between is an outage, not a blip.
ALARM_AFTER_S = 60.0


@dataclass(frozen=True, slots=True)
class ApiState:
    healthy: bool
    failing_for_s: float  # 0 while healthy
    last_error: str  # "" while healthy


class ApiHealth:
    """Every API call's outcome, as seen by this process. Failures that say the API is unusable count: no
    connection, timeouts, 401, 403, 429, 5xx; answers about one batch (404, 400) mean it is answering."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failing_since: float | None = None
        self._last_error = ""
        self._last_alarm = float("-inf")

    def succeeded(self) -> None:
        if self._failing_since is not None:
            failed_for = self._clock() - self._failing_since
            if failed_for >= ALARM_AFTER_S:
                log.warning("the Anthropic API answers again after %.0fs of failures", failed_for)
        self._failing_since = None
        self._last_error = ""

    def failed(self, status: int | None, what: str) -> None:
        """One call failed: ``status`` is the HTTP status (None: no answer), ``what`` a short description."""
        if status is not None and status < 500 and status not in (401, 403, 408, 429):
            self.succeeded()  # it answered, about this request: the API itself works
            return
        if self._failing_since is None:
            self._failing_since = self._clock()
        self._last_error = what

    def state(self) -> ApiState:
        if self._failing_since is None:
            return ApiState(True, 0.0, "")
        return ApiState(False, self._clock() - self._failing_since, self._last_error)

    def alarm(self) -> ApiState:
        """Called by the heartbeat: an ERROR once failures have lasted ALARM_AFTER_S, then once a minute."""
        state = self.state()
        now = self._clock()
        due = now - self._last_alarm >= ALARM_AFTER_S
        if not state.healthy and state.failing_for_s >= ALARM_AFTER_S and due:
            self._last_alarm = now
            log.error(
                "every call to the Anthropic API has failed for %.0fs (last: %s): check "
                "BATCHD_ANTHROPIC_API_KEY, BATCHD_ANTHROPIC_BASE_URL and the API's status; "
                "work waits meanwhile",
                state.failing_for_s,
                state.last_error,
            )
        return state


api_health = ApiHealth()
