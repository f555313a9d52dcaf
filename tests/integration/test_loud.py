"""Loud, not silent: what would lose work or stall it without a word is refused or reported at once."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchd import AsyncClient, metrics
from batchd.settings import Settings
from batchd.status import collect_status
from batchd.store import Store
from tests.daemon_harness import running_daemon
from tests.eventually import eventually
from tests.integration.test_cli import batchd_cli, clean_env
from tests.integration.test_service import daemon_process, until
from tests.redis_server import RedisServer, free_port


def params(text: str) -> dict[str, Any]:
    return {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": text}]}


async def test_an_evicting_redis_stops_the_daemon_at_start_unless_allowed(
    redis_server: RedisServer, redis_url: str, emulator: Any, tmp_path: Path
) -> None:
    redis_server.config_set("maxmemory-policy", "allkeys-lru")  # the fixture resets it for the next test
    env = clean_env(
        BATCHD_REDIS_URL=redis_url,
        BATCHD_ANTHROPIC_BASE_URL=emulator.base_url,
        BATCHD_ANTHROPIC_API_KEY="test-key",
        BATCHD_METRICS_PORT="0",
    )
    refused = await batchd_cli("run", env=env, timeout=60)
    assert refused.code == 2
    assert "Traceback" not in refused.err
    line = refused.err.splitlines()[-1]  # after the daemon's own "starting" log line
    assert line.startswith("batchd: error: BATCHD_ALLOW_EVICTING_REDIS") and "allkeys-lru" in line

    async with daemon_process(tmp_path, redis_url, emulator.base_url, BATCHD_ALLOW_EVICTING_REDIS="true"):
        shown = await batchd_cli("status", "--json", env=env)
    assert shown.code == 0, shown.err
    assert json.loads(shown.out)["redis"] == {"maxmemory_policy": "allkeys-lru", "evicting": True}
    text = await batchd_cli("status", env=env)
    assert "WARNING: evicting" in text.out


async def test_readyz_fails_when_redis_starts_evicting(
    redis_server: RedisServer, redis_url: str, emulator: Any, tmp_path: Path
) -> None:
    async with daemon_process(tmp_path, redis_url, emulator.base_url) as daemon:
        # /healthz answers before the start-up checks have run: a policy changed before they pass stops the
        # start (the test above), not readiness. Change it once the replica is ready.
        await until(lambda: bool(daemon.events("daemon.ready")), "the replica is ready")
        redis_server.config_set("maxmemory-policy", "volatile-lru")
        status, body = await daemon.get("/readyz")
    assert status == 503
    assert "maxmemory-policy volatile-lru" in json.loads(body)["checks"]["redis_policy"]["error"]


async def test_an_unreachable_api_shows_in_the_gauge_and_in_status(
    make_settings: Callable[..., Settings], store: Store
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens: every call fails to connect
    settings = make_settings(anthropic_base_url=nowhere, max_batch_age_seconds=0.1)
    async with running_daemon(settings, consumer="cut-off"), AsyncClient(settings=settings) as client:
        await client.submit(params("never created"))

        async def reported() -> bool:
            replicas = (await collect_status(store, queue_limit=100_000))["replicas"]
            api = next((r.get("api") for r in replicas if r["name"] == "cut-off"), None)
            return api is not None and not api["healthy"]

        await eventually(reported, timeout=20, interval=0.2, what="status to report the API failing")
        assert metrics.REGISTRY.get_sample_value("batchd_api_healthy") == 0
        replicas = (await collect_status(store, queue_limit=100_000))["replicas"]
        [api] = [r["api"] for r in replicas if r["name"] == "cut-off"]
        assert "connection" in api["last_error"]
