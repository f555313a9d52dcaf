"""Run a real daemon replica inside the test's event loop, against the private Redis and the emulator."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from batchd.daemon import Daemon
from batchd.settings import Settings


@contextlib.asynccontextmanager
async def running_daemon(
    settings: Settings, *, consumer: str = "test-replica", ready: bool = True
) -> AsyncIterator[Daemon]:
    """A replica in this event loop; entered once it takes work (``ready=False``: once its ops endpoints
    answer, for a daemon whose start-up is meant to be stuck waiting for Redis)."""
    daemon = Daemon(settings, consumer=consumer)
    task = asyncio.create_task(daemon.run(install_signal_handlers=False))
    ready_task = asyncio.create_task(daemon.wait_ready() if ready else daemon.wait_serving())
    done, _ = await asyncio.wait({task, ready_task}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ready_task.cancel()
        await task  # raises what made the daemon fail to start
    if ready_task not in done:
        ready_task.cancel()
        daemon.stop()
        await asyncio.wait_for(task, 60)
        raise AssertionError(f"the daemon was not {'ready' if ready else 'serving'} within 30 s")
    try:
        yield daemon
    finally:
        daemon.stop()
        assert await asyncio.wait_for(task, 60) == 0
