"""Running the emulator: `serve` inside an event loop, `EmulatorThread` beside synchronous code."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

from ..httpserver import serve_app, url_for
from .app import create_app
from .config import EmulatorConfig
from .state import EmulatorState

__all__ = ["DEFAULT_PORT", "EmulatorThread", "serve"]

DEFAULT_PORT = 8765
# Shorter in-process: a test suite stops one emulator per test, and aiohttp can sit out the whole
# timeout on a connection still lingering after an early 413.
_THREAD_SHUTDOWN_TIMEOUT = 0.25

_T = TypeVar("_T")


async def serve(
    config: EmulatorConfig | None = None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    access_log: bool = False,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until cancelled. `on_ready` gets the base URL once the socket listens."""
    site = await serve_app(create_app(config), host, port, access_log=access_log)
    try:
        if on_ready is not None:
            on_ready(site.url)
        await asyncio.Event().wait()
    finally:
        await site.close()


class EmulatorThread:
    """The emulator on its own event loop in a daemon thread: for tests, including users' own suites.

        with EmulatorThread(EmulatorConfig(processing_seconds=0.1)) as emu:
            client = anthropic.Anthropic(base_url=emu.base_url, api_key="test-key")

    stop() then start() again serves the same port and keeps every batch: an API outage, not data loss.
    """

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`clock` (epoch seconds) drives every batch timeline, the RPM window and the prompt cache: a test
        can pass a settable one to move time without sleeping. It is called on the emulator's thread."""
        self.config = config if config is not None else EmulatorConfig()
        self.host = host
        self.port = port
        self._state = EmulatorState(self.config, clock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        return url_for(self.host, self.port)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("EmulatorThread already started")
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="batchd-emulator", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise self._error

    def stop(self) -> None:
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        thread.join()
        self._thread = None
        self._loop = None

    def __enter__(self) -> EmulatorThread:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def configure(self, **knobs: object) -> None:
        """Same as POST /_emulator/config; raises ValueError naming a bad knob."""
        self._call(lambda state: state.configure(knobs))

    def stats(self) -> dict[str, int]:
        """Same as GET /_emulator/stats."""
        return self._call(lambda state: state.stats())

    def reset(self) -> None:
        """Same as POST /_emulator/reset: forget all batches, caches and canned responses; zero the stats."""
        self._call(lambda state: state.reset())

    def set_responses(self, responses: list[dict[str, object]]) -> None:
        """Same as POST /_emulator/responses: canned answers, [{"match", "content", "stop_reason"?}, ...]."""
        self._call(lambda state: state.set_responses(responses))

    def batch_info(self, batch_id: str) -> dict[str, object] | None:
        """What GET /_emulator/batches/{id} shows (None if unknown): betas, anthropic_version, ..."""
        return self._call(lambda state: state.batch_info(batch_id))

    def forget_batch(self, batch_id: str) -> bool:
        """Same as DELETE /_emulator/batches/{id}: the batch is gone everywhere; False if it was unknown."""
        return self._call(lambda state: state.store.forget(batch_id) is not None)

    def _call(self, fn: Callable[[EmulatorState], _T]) -> _T:
        state, loop = self._state, self._loop
        if loop is None:
            # Stopped (or not started): no handler can be touching the state.
            return fn(state)

        # Running: only ever touch the state on the emulator's own loop, so handlers never race the caller.
        async def call() -> _T:
            return fn(state)

        return asyncio.run_coroutine_threadsafe(call(), loop).result()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            if self._ready.is_set():
                raise
            self._error = exc  # surfaced by start()
            self._ready.set()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        site = await serve_app(
            create_app(state=self._state), self.host, self.port, shutdown_timeout=_THREAD_SHUTDOWN_TIMEOUT
        )
        self.port = site.port
        self._loop = asyncio.get_running_loop()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await site.close()
