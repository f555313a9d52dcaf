"""What every batch job gets (a Context), how it asks to run again (RetryLater), and backoff."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol

import anthropic

from ..leases import Leases
from ..settings import Settings
from ..store import Store

__all__ = ["Context", "RetryLater", "Scheduler", "backoff", "retry_after", "retryable_status"]

_RETRYABLE_STATUS = frozenset({408, 409, 429})


class RetryLater(Exception):
    """Run this job again after ``defer`` seconds."""

    def __init__(self, defer: float, reason: str = "") -> None:
        super().__init__(reason or f"retry in {defer:.2f}s")
        self.defer = defer


class Scheduler(Protocol):
    """Enqueues batch jobs; ``jobs.ArqScheduler`` on arq, a recorder in tests."""

    async def submit(self, fid: str) -> None: ...

    async def fanout(self, batch_id: str) -> bool:
        """Enqueue the fan-out of an ended batch; False if that job is already waiting or running."""
        ...


@dataclass
class Context:
    store: Store
    settings: Settings
    api: anthropic.AsyncAnthropic
    scheduler: Scheduler
    replica: str = "test"
    leases: Leases = field(init=False)

    def __post_init__(self) -> None:
        # The daemon's heartbeat renews these; without a daemon (tests, tools) a lease simply lasts LEASE_S.
        self.leases = Leases(self.store)


def retryable_status(status: int) -> bool:
    return status in _RETRYABLE_STATUS or status >= 500


def retry_after(exc: anthropic.APIStatusError) -> float | None:
    """The API's ``retry-after`` (seconds), if it sent a usable one."""
    value = exc.response.headers.get("retry-after") if exc.response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def backoff(errors: int) -> float:
    """Backoff after the n-th consecutive error: 0.5 s doubling to 60 s, with jitter."""
    return float(min(60.0, 0.5 * 2 ** min(errors - 1, 10)) * (0.75 + 0.5 * random.random()))
