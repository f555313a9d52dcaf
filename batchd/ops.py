"""The operations endpoints of a replica: ``GET /metrics``, ``/healthz`` and ``/readyz`` on one port."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .health import Health
from .httpserver import Site, serve_app
from .metrics import REGISTRY

__all__ = ["ops_app", "start_ops_server"]


def ops_app(health: Health, before_scrape: Callable[[], Awaitable[None]] | None = None) -> web.Application:
    async def metrics(_request: web.Request) -> web.Response:
        if before_scrape is not None:
            await before_scrape()
        # Set the header directly: aiohttp's content_type= refuses a value carrying parameters.
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        alive, body = health.liveness()
        return web.json_response(body, status=200 if alive else 503)

    async def readyz(_request: web.Request) -> web.Response:
        ready, body = await health.readiness()
        return web.json_response(body, status=200 if ready else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_ops_server(
    host: str, port: int, health: Health, *, before_scrape: Callable[[], Awaitable[None]] | None = None
) -> Site:
    """Serve the ops endpoints on ``host:port`` (port 0: any free port); ``before_scrape`` refreshes what
    is read on demand (the queue gauges). No access log: a scrape every few seconds would bury the daemon's
    own lines."""
    return await serve_app(ops_app(health, before_scrape), host, port)
