"""The Message Batches API's requests-per-minute limit: a sliding 60 s window per API key."""

from __future__ import annotations

import math
from collections import deque

__all__ = ["WINDOW_SECONDS", "RpmLimiter"]

WINDOW_SECONDS = 60.0


class RpmLimiter:
    """Admits at most `limit` calls per key in any 60 s window. Refused calls do not use up the window
    (a client that keeps retrying too early is not punished beyond the 429 itself)."""

    def __init__(self) -> None:
        self._calls: dict[str, deque[float]] = {}

    def clear(self) -> None:
        self._calls.clear()

    def admit(self, key: str, now: float, limit: int) -> int | None:
        """None if the call is admitted (and counted); else whole seconds until a slot frees (>= 1)."""
        if limit <= 0:
            return None
        calls = self._calls.setdefault(key, deque())
        while calls and calls[0] <= now - WINDOW_SECONDS:
            calls.popleft()
        if len(calls) < limit:
            calls.append(now)
            return None
        # The limit may have been lowered at run time: the slot that frees next is the one that takes the
        # window back under it.
        oldest = calls[len(calls) - limit]
        return max(1, math.ceil(oldest + WINDOW_SECONDS - now))
