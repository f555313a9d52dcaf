"""Listening over HTTP: the one helper every batchd server starts through (the ops endpoints, the emulator,
the HTTP front), so binding, port 0 and shutdown behave the same everywhere."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from aiohttp.log import access_logger

__all__ = ["Site", "serve_app", "url_for"]

# How long a stop waits for requests in flight before cancelling them.
DEFAULT_SHUTDOWN_TIMEOUT = 2.0


@dataclass(slots=True)
class Site:
    """A listening application. ``port`` is the bound port (useful when asked for port 0)."""

    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        return url_for(self.host, self.port)

    async def close(self) -> None:
        await self.runner.cleanup()


async def serve_app(
    app: web.Application,
    host: str,
    port: int,
    *,
    access_log: bool = False,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
) -> Site:
    """Start listening on ``host:port`` (port 0: any free port); ``close()`` the result to stop."""
    runner = web.AppRunner(
        app, access_log=access_logger if access_log else None, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = port
    for address in runner.addresses:
        # (host, port) for IPv4, (host, port, flow, scope) for IPv6.
        if isinstance(address, tuple):
            bound = int(address[1])
            break
    return Site(runner, host, bound)


def url_for(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"
