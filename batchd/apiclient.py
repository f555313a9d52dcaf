"""The daemon's Anthropic client: the SDK's own, whose every Message Batches call first takes a slot of one
requests-per-minute budget shared through Redis by every replica.

The API counts every call to the batch endpoints (create, list, retrieve, results, cancel) against one
per-minute limit per organisation; at tier 1 that is 50. Without a shared budget, 429s would become the
control loop. The slot is taken in the HTTP client's ``send``, under the SDK: every attempt the SDK makes,
retries included, is one call, exactly as the API counts them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from typing import Any

import anthropic
import httpx2

from . import metrics
from .errors import ConfigError
from .settings import Settings
from .store import Scripts, now_ms

__all__ = ["RATE_WINDOW_S", "RateLimiter", "api_client"]

log = logging.getLogger(__name__)

RATE_WINDOW_S = 60.0
_BATCH_PATH = "/v1/messages/batches"


class RateLimiter:
    """At most ``rpm`` slots in any 60 s window, across every process sharing the Redis."""

    def __init__(self, scripts: Scripts, rpm: int) -> None:
        self._scripts = scripts
        self.rpm = rpm

    async def acquire(self) -> float:
        """Wait for a slot; returns the seconds waited."""
        token = secrets.token_hex(8)
        started = time.monotonic()
        while True:
            wait_ms = await self._scripts.rate_slot(
                now_ms=now_ms(), limit=self.rpm, window_ms=int(RATE_WINDOW_S * 1000), token=token
            )
            if wait_ms == 0:
                waited = time.monotonic() - started
                if waited:
                    metrics.API_THROTTLED_SECONDS.inc(waited)
                return waited
            # Jitter: the waiters of every replica must not all ask again at the same millisecond.
            await asyncio.sleep(wait_ms / 1000 + random.random() * 0.05)


class _LimitedHttpClient(anthropic.DefaultAsyncHttpxClient):
    def __init__(self, limiter: RateLimiter, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._limiter = limiter

    async def send(self, request: httpx2.Request, **kwargs: Any) -> httpx2.Response:
        if request.url.path.startswith(_BATCH_PATH):
            await self._limiter.acquire()
        return await super().send(request, **kwargs)


def api_client(settings: Settings, scripts: Scripts) -> anthropic.AsyncAnthropic:
    """The SDK client the daemon calls the API with, within ``settings.effective_api_rpm``."""
    if settings.anthropic_api_key is None:
        raise ConfigError("BATCHD_ANTHROPIC_API_KEY (or ANTHROPIC_API_KEY) is not set")
    limiter = RateLimiter(scripts, settings.effective_api_rpm)
    return anthropic.AsyncAnthropic(
        api_key=settings.anthropic_api_key.get_secret_value(),
        base_url=settings.anthropic_base_url,
        max_retries=2,
        http_client=_LimitedHttpClient(limiter),
    )
