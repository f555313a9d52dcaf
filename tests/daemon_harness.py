"""Run a real daemon replica inside the test's event loop, against the private Redis and the emulator."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from batchd.daemon import Daemon
from batchd.settings import Settings


@contextlib.asynccontextmanager
async def running_daemon(settings: Settings, *, consumer: str = "test-replica") -> AsyncIterator[Daemon]:
    daemon = Daemon(settings, consumer=consumer)
    task = asyncio.create_task(daemon.run(install_signal_handlers=False))
    ready = asyncio.create_task(daemon.wait_ready())
    done, _ = await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ready.cancel()
        await task  # raises what made the daemon fail to start
    try:
        yield daemon
    finally:
        daemon.stop()
        assert await asyncio.wait_for(task, 60) == 0


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout: float = 30.0, interval: float = 0.02
) -> None:
    """Poll ``check`` until it is true; fail the test with a clear message at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s: {getattr(check, '__name__', check)}")
