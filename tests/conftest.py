"""Fixtures shared by every test: a private redis-server, fakeredis, the emulator, and Settings.

Names here are a contract with the other test modules; keep them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fakeredis
import pytest
import redis
import redis.asyncio as aioredis

from batchd.settings import Settings, load_settings
from batchd.store import Keys, Store
from tests.redis_server import RedisServer

if TYPE_CHECKING:
    from batchd.emulator import EmulatorThread

_TESTS_DIR = Path(__file__).resolve().parent
# Directory name under tests/ -> marker every test in it gets, so `-m "not integration"` works without
# anyone remembering to decorate a module.
_DIR_MARKERS = {"integration": "integration", "chaos": "chaos"}
# Environment that would leak a developer's (or CI's) configuration into Settings or the SDK.
_ENV_PREFIXES = ("BATCHD_", "ANTHROPIC_")
_ENV_NAMES = ("CREDENTIALS_DIRECTORY",)


# --- options and markers --------------------------------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos-long",
        action="store_true",
        default=False,
        help="run the chaos tests in long mode (more kills, more requests)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            relative = Path(str(item.path)).resolve().relative_to(_TESTS_DIR)
        except ValueError:
            continue
        marker = _DIR_MARKERS.get(relative.parts[0]) if len(relative.parts) > 1 else None
        if marker is not None:
            item.add_marker(getattr(pytest.mark, marker))


@pytest.fixture(scope="session")
def chaos_long(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--chaos-long"))


# --- environment isolation ------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _isolate_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees BATCHD_*, ANTHROPIC_* or CREDENTIALS_DIRECTORY from the shell that runs pytest."""
    for name in list(os.environ):
        if name.startswith(_ENV_PREFIXES) or name in _ENV_NAMES:
            monkeypatch.delenv(name, raising=False)


# --- Redis ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private redis-server for the session, on a free port: never the machine's 6379."""
    directory = tmp_path_factory.mktemp("redis-session")
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL, emptied and with its memory limit reset: each test starts clean."""
    if not redis_server.running:
        # A test that stopped the shared server must not take every later test down with it.
        redis_server.start()
    with redis_server.client() as client:
        client.flushall()
        client.config_set("maxmemory", 0)
        client.config_set("maxmemory-policy", "noeviction")
        client.script_flush()
    return redis_server.url


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def store(aredis: aioredis.Redis) -> Store:
    """The storage layer on the private server, under the default prefix: how tests read batchd's records."""
    return Store(aredis, Keys())


@pytest.fixture
def fake_redis() -> Iterator[fakeredis.FakeRedis]:
    """A fresh in-process Redis with Lua (fakeredis[lua]); each instance gets its own server state."""
    client = fakeredis.FakeRedis()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
async def fake_aredis() -> AsyncIterator[fakeredis.FakeAsyncRedis]:
    client = fakeredis.FakeAsyncRedis()
    try:
        yield client
    finally:
        await client.aclose()


# --- the emulator ---------------------------------------------------------------------------------------
@pytest.fixture
def emulator() -> Iterator[EmulatorThread]:
    """The Batches API emulator on a free port, with fast batches (0.2 s)."""
    # Imported here so tests that do not use the emulator run even while it is missing or broken.
    try:
        from batchd.emulator import EmulatorConfig, EmulatorThread
    except ImportError as exc:  # pragma: no cover - only while the emulator is being written
        pytest.skip(f"batchd.emulator is not available: {exc}")
    with EmulatorThread(EmulatorConfig(processing_seconds=0.2), host="127.0.0.1", port=0) as thread:
        yield thread


# --- settings -------------------------------------------------------------------------------------------
@pytest.fixture
def make_settings(request: pytest.FixtureRequest, redis_url: str) -> Callable[..., Settings]:
    """``make_settings(emulator=False, **overrides)``: test Settings on the private Redis.

    ``emulator=True`` starts the emulator fixture (only then) and points anthropic_base_url at it.
    """

    def make(*, emulator: bool = False, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": redis_url,
            "anthropic_api_key": "test-key",
            "max_batch_age_seconds": 0.5,
            "poll_interval_seconds": 0.1,
            # The test emulator enforces no rate limit; tier 4's 4,000 a minute never slows a test down.
            # Tests of the limits themselves run the emulator at a tier and set the same one here.
            "api_tier": 4,
            "metrics_port": 0,
        }
        if emulator:
            values["anthropic_base_url"] = request.getfixturevalue("emulator").base_url
        values.update(overrides)
        return load_settings(**values)

    return make


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    """A plain sync client to the private server, for tests that drive the sync Client."""
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()
