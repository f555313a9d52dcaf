from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from batchd import logs
from batchd.health import Health
from batchd.httpserver import Site
from batchd.logs import register_secret
from batchd.ops import start_ops_server


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def health(clock: FakeClock) -> Health:
    return Health(clock=clock)


def test_loops_alive_until_silent_too_long(health: Health, clock: FakeClock) -> None:
    assert health.all_alive()  # nothing registered
    health.register("accumulator", max_silence=10)
    health.register("poller", max_silence=60)
    clock.now += 10
    assert health.all_alive()  # registration counts as a beat; exactly at the limit is fine
    clock.now += 0.5
    assert not health.all_alive()
    assert health.stale() == ["accumulator"]
    health.beat("accumulator")
    assert health.all_alive()
    clock.now += 61
    assert health.stale() == ["accumulator", "poller"]


def test_liveness_body(health: Health, clock: FakeClock) -> None:
    health.register("accumulator", max_silence=10)
    health.register("poller", max_silence=60)
    clock.now += 20
    health.beat("poller")
    alive, body = health.liveness()
    assert not alive
    assert body == {
        "status": "stale",
        "stale": ["accumulator"],
        "loops": {
            "accumulator": {"ok": False, "age_seconds": 20.0, "max_silence_seconds": 10},
            "poller": {"ok": True, "age_seconds": 0.0, "max_silence_seconds": 60},
        },
    }


def test_beat_unknown_loop_and_bad_limits(health: Health) -> None:
    with pytest.raises(KeyError):
        health.beat("nope")
    with pytest.raises(ValueError, match="max_silence"):
        health.register("x", max_silence=0)

    async def ok() -> None:
        return None

    with pytest.raises(ValueError, match="timeout"):
        health.add_check("x", ok, timeout=0)


@pytest.fixture
def _forget_secrets() -> Iterator[None]:
    yield
    logs._secrets.clear()
    logs._secrets_re = None


@pytest.mark.usefixtures("_forget_secrets")
async def test_readiness_reports_each_check() -> None:
    health = Health()
    secret = "sk-ant-api03-" + "Z" * 40
    register_secret("hunter2-redis-pass")

    async def redis_ok() -> bool:
        return True

    async def anthropic_down() -> None:
        raise ConnectionError(
            f"cannot reach api with key {secret} via redis://u:hunter2-redis-pass@h\n" + "x" * 500
        )

    async def refuses() -> bool:
        return False

    health.add_check("redis", redis_ok)
    health.add_check("anthropic", anthropic_down)
    health.add_check("flag", refuses)
    ready, body = await health.readiness()
    assert not ready
    assert body["status"] == "unavailable"
    checks = body["checks"]
    assert checks["redis"] == {"ok": True}
    assert checks["flag"] == {"ok": False, "error": "check returned False"}
    error = checks["anthropic"]["error"]
    assert error.startswith("ConnectionError: cannot reach api with key sk-ant-***")
    assert secret not in error
    assert "hunter2" not in error
    assert "\n" not in error
    assert len(error) < 250


async def test_readiness_all_ok_and_empty() -> None:
    health = Health()
    assert await health.readiness() == (
        True,
        {"status": "ok", "checks": {}, "seconds": pytest.approx(0, abs=0.5)},
    )

    async def ok() -> None:
        return None

    health.add_check("redis", ok)
    ready, body = await health.readiness()
    assert ready
    assert body["checks"] == {"redis": {"ok": True}}


async def test_checks_time_out_and_run_concurrently() -> None:
    health = Health()

    async def hangs() -> None:
        await asyncio.sleep(30)

    async def own_timeout() -> None:
        raise TimeoutError("redis read timed out")

    health.add_check("a", hangs, timeout=0.2)
    health.add_check("b", hangs, timeout=0.2)
    health.add_check("c", own_timeout)
    started = time.monotonic()
    ready, body = await health.readiness()
    assert time.monotonic() - started < 1.0  # both 0.2 s timeouts ran side by side
    assert not ready
    assert body["checks"]["a"] == {"ok": False, "error": "TimeoutError: no answer within 0.2s"}
    assert body["checks"]["c"] == {"ok": False, "error": "TimeoutError: redis read timed out"}


# --- over HTTP ----------------------------------------------------------------------------------------------


@pytest.fixture
async def served(health: Health) -> AsyncIterator[tuple[Site, aiohttp.ClientSession]]:
    server = await start_ops_server("127.0.0.1", 0, health)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.port}") as session:
            yield server, session
    finally:
        await server.close()


async def get_json(session: aiohttp.ClientSession, path: str) -> tuple[int, Any]:
    async with session.get(path) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


async def test_healthz_over_http(
    served: tuple[Site, aiohttp.ClientSession], health: Health, clock: FakeClock
) -> None:
    server, session = served
    assert server.port > 0
    assert await get_json(session, "/healthz") == (200, {"status": "ok", "loops": {}})
    health.register("accumulator", max_silence=5)
    status, body = await get_json(session, "/healthz")
    assert status == 200
    assert body["loops"]["accumulator"]["ok"] is True
    clock.now += 6
    status, body = await get_json(session, "/healthz")
    assert status == 503
    assert body["stale"] == ["accumulator"]
    health.beat("accumulator")
    status, _ = await get_json(session, "/healthz")
    assert status == 200


async def test_readyz_over_http(served: tuple[Site, aiohttp.ClientSession], health: Health) -> None:
    _, session = served
    healthy = True

    async def redis() -> None:
        if not healthy:
            raise OSError("Connection refused")

    health.add_check("redis", redis)
    assert await get_json(session, "/readyz") == (
        200,
        {"status": "ok", "checks": {"redis": {"ok": True}}, "seconds": 0},
    )
    healthy = False
    status, body = await get_json(session, "/readyz")
    assert status == 503
    assert body["checks"]["redis"] == {"ok": False, "error": "OSError: Connection refused"}


async def test_unknown_path_is_404(served: tuple[Site, aiohttp.ClientSession]) -> None:
    _, session = served
    async with session.get("/nope") as response:
        assert response.status == 404


async def test_a_cached_check_runs_at_most_once_per_period(health: Health, clock: FakeClock) -> None:
    calls = 0

    async def costly() -> None:
        nonlocal calls
        calls += 1

    health.add_check("anthropic", costly, cache_seconds=30)
    for _ in range(5):
        ready, _body = await health.readiness()
        assert ready
    assert calls == 1
    clock.now += 30
    await health.readiness()
    assert calls == 2
