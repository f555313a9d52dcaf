"""Run a real daemon replica inside the test's event loop, against the private Redis and the emulator."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

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
