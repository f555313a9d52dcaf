"""The API key and the Redis password never show: not in logs, Redis, metrics, health bodies, reprs, errors.

A daemon and a client make real round trips with a distinctive key and a password-protected private Redis;
then every place batchd writes text is scanned for either secret.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from batchd import AsyncClient, Client, InvalidParams, RedisUnavailable, RequestErrored
from batchd.daemon import Daemon
from batchd.logs import setup_logging
from batchd.settings import Settings
from tests.daemon_harness import running_daemon
from tests.redis_server import RedisServer

API_KEY = "sk-ant-test-SECRET-0123456789"
REDIS_PASSWORD = "redisPASSWORD-5551234-zq"
# A leak of part of a secret is a leak too: look for the distinctive middles as well as the whole values.
NEEDLES = (API_KEY, "SECRET-0123456789", REDIS_PASSWORD, "5551234-zq")
_NOISY = ("httpx", "httpx2", "anthropic", "aiohttp.access", "arq.worker", "arq.jobs")


def params(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-haiku-4-5",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


class Scan:
    """Everything gathered during a test, by where it came from; `assert_clean` names the place of a leak."""

    def __init__(self) -> None:
        self.places: dict[str, str] = {}

    def add(self, place: str, text: str | bytes) -> None:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        self.places[place] = self.places.get(place, "") + "\n" + text

    def add_exception(self, place: str, exc: BaseException) -> None:
        seen: set[int] = set()
        current: BaseException | None = exc
        while current is not None and id(current) not in seen:  # the whole cause/context chain
            seen.add(id(current))
            self.add(place, f"{type(current).__name__}: {current!s} {current!r} {current.args!r}")
            current = current.__cause__ or current.__context__

    def assert_clean(self) -> None:
        leaks = [
            (place, needle) for place, text in self.places.items() for needle in NEEDLES if needle in text
        ]
        assert not leaks, f"secret found in: {leaks}"


@pytest.fixture
def scan() -> Scan:
    return Scan()


@pytest.fixture
def json_logs(caplog: pytest.LogCaptureFixture) -> Iterator[io.StringIO]:
    """Every record at DEBUG into caplog (raw records) and through batchd's JSON handler (a StringIO)."""
    root = logging.getLogger()
    saved = (root.level, {name: logging.getLogger(name).level for name in _NOISY})
    caplog.set_level(logging.DEBUG)
    stream = io.StringIO()
    handler = setup_logging("json", "DEBUG", stream=stream)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(saved[0])
        for name, level in saved[1].items():
            logging.getLogger(name).setLevel(level)


def add_logs(scan: Scan, caplog: pytest.LogCaptureFixture, stream: io.StringIO) -> None:
    records = caplog.get_records("setup") + caplog.get_records("call")
    assert records, "nothing was logged: the scan would prove nothing"
    for record in records:
        extras = {k: v for k, v in record.__dict__.items() if k not in ("msg", "args", "exc_info")}
        scan.add(f"caplog record {record.name}", f"{record.getMessage()} {extras!r}")
    scan.add("caplog text", caplog.text)
    output = stream.getvalue()
    lines = output.splitlines()
    assert lines, "the JSON handler wrote nothing"
    for line in lines:
        json.loads(line)  # one JSON object per line
    scan.add("JSON log output", output)


@pytest.fixture
def secret_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer.start_new(tmp_path)
    # Set after start: the harness's readiness PING does not authenticate.
    server.config_set("requirepass", REDIS_PASSWORD)
    try:
        yield server
    finally:
        server.stop()


def password_url(server: RedisServer) -> str:
    return f"redis://:{REDIS_PASSWORD}@127.0.0.1:{server.port}/0"


async def add_redis_contents(scan: Scan, url: str) -> int:
    """Every key and value in the database: names, values by type, and DUMP of each."""
    count = 0
    async with aioredis.Redis.from_url(url) as r:
        async for key in r.scan_iter(count=1000):
            count += 1
            kind = (await r.type(key)).decode()
            value: Any
            if kind == "string":
                value = await r.get(key)
            elif kind == "hash":
                value = await r.hgetall(key)
            elif kind == "list":
                value = await r.lrange(key, 0, -1)
            elif kind == "set":
                value = await r.smembers(key)
            elif kind == "zset":
                value = await r.zrange(key, 0, -1, withscores=True)
            elif kind == "stream":
                value = await r.xrange(key)
            else:
                value = kind
            dump = await r.dump(key)
            scan.add(f"redis key {key!r}", f"{key!r} {value!r} {dump!r}")
    return count


async def add_http(scan: Scan, daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as session:
        for path in ("/metrics", "/healthz", "/readyz"):
            async with session.get(f"http://127.0.0.1:{daemon.metrics_port}{path}") as response:
                body = await response.text()
                scan.add(f"GET {path}", f"{response.headers!r} {body}")


def add_reprs(scan: Scan, **objects: Any) -> None:
    for name, obj in objects.items():
        scan.add(f"repr({name})", repr(obj))
        scan.add(f"str({name})", str(obj))


# --- the round trip ------------------------------------------------------------------------------------
async def test_secrets_never_appear_after_a_round_trip(
    secret_redis: RedisServer,
    make_settings: Callable[..., Settings],
    emulator: Any,
    json_logs: io.StringIO,
    caplog: pytest.LogCaptureFixture,
    scan: Scan,
) -> None:
    url = password_url(secret_redis)
    settings = make_settings(
        emulator=True, redis_url=url, anthropic_api_key=API_KEY, max_batch_age_seconds=0.2
    )
    async with running_daemon(settings) as daemon, AsyncClient(settings=settings) as client:
        rid = await client.submit(params("secret round trip"))
        assert (await client.result(rid, timeout=30)).type == "succeeded"
        message = await client.messages.create(**params("create"), timeout=30)
        assert message.content[0].text == "echo: create"  # type: ignore[union-attr]
        # An API error for one request (every attempt fails on the API's side): the caller's exception.
        emulator.configure(errored_rate=1.0)
        with pytest.raises(RequestErrored) as api_error:
            await client.messages.create(**params("bad"), timeout=30)
        emulator.configure(errored_rate=0.0)
        scan.add_exception("RequestErrored (API error)", api_error.value)
        # Requests refused at submit: malformed, and one the API would refuse (max_tokens=0).
        with pytest.raises(InvalidParams) as invalid:
            await client.submit({"model": "claude-haiku-4-5"})
        scan.add_exception("InvalidParams", invalid.value)
        with pytest.raises(InvalidParams) as refused:
            await client.messages.create(**params("bad", max_tokens=0), timeout=30)
        scan.add_exception("InvalidParams (the API's check)", refused.value)

        await add_http(scan, daemon)
        with Client(settings=settings) as sync_client:
            add_reprs(scan, settings=settings, async_client=client, client=sync_client, daemon=daemon)
            scan.add("settings.redacted()", repr(settings.redacted()))
        assert await add_redis_contents(scan, url) > 5

    # Redis gone: the error a caller sees carries no URL password.
    secret_redis.stop()
    with pytest.raises(RedisUnavailable) as down:
        async with AsyncClient(settings=settings, socket_timeout=1.0) as late:
            await late.submit(params("too late"))
    scan.add_exception("RedisUnavailable (Redis stopped)", down.value)

    add_logs(scan, caplog, json_logs)
    scan.assert_clean()


# --- an API that refuses the key ---------------------------------------------------------------------
@pytest.fixture
async def refusing_api() -> AsyncIterator[str]:
    """An API that answers every call 401 authentication_error, as the real one does for a bad key."""

    async def refuse(_request: web.Request) -> web.Response:
        body = {
            "type": "error",
            "error": {"type": "authentication_error", "message": "invalid x-api-key"},
            "request_id": "req_refused",
        }
        return web.json_response(body, status=401, headers={"request-id": "req_refused"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_secrets_never_appear_when_the_api_refuses_the_key(
    secret_redis: RedisServer,
    make_settings: Callable[..., Settings],
    refusing_api: str,
    json_logs: io.StringIO,
    caplog: pytest.LogCaptureFixture,
    scan: Scan,
) -> None:
    url = password_url(secret_redis)
    settings = make_settings(
        redis_url=url, anthropic_api_key=API_KEY, anthropic_base_url=refusing_api, max_batch_age_seconds=0.2
    )
    async with running_daemon(settings) as daemon, AsyncClient(settings=settings) as client:
        with pytest.raises(RequestErrored) as refused:
            await client.messages.create(**params("refused"), timeout=30)
        assert refused.value.error_type == "authentication_error"
        scan.add_exception("RequestErrored (authentication)", refused.value)
        await add_http(scan, daemon)  # /readyz runs the API check: it fails with the 401
        assert "anthropic" in scan.places["GET /readyz"]
        add_reprs(scan, settings=settings, async_client=client, daemon=daemon)
        await add_redis_contents(scan, url)

    add_logs(scan, caplog, json_logs)
    assert "batch.create_failed" in scan.places["JSON log output"]
    scan.assert_clean()
