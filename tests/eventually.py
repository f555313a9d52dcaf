"""The tests' one way to wait for something: poll a condition until it holds, or fail at a deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def eventually(
    check: Callable[[], Awaitable[bool]],
    *,
    timeout: float = 30.0,
    interval: float = 0.02,
    what: str | None = None,
) -> None:
    """Poll ``check`` until it is true; fail the test with a clear message at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"condition not met within {timeout}s: {what or getattr(check, '__name__', check)}"
            )
        await asyncio.sleep(interval)


def eventually_sync(
    check: Callable[[], bool], *, timeout: float = 30.0, interval: float = 0.02, what: str | None = None
) -> None:
    """The blocking twin of :func:`eventually`, for tests outside an event loop."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"condition not met within {timeout}s: {what or getattr(check, '__name__', check)}"
            )
        time.sleep(interval)
