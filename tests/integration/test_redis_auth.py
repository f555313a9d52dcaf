"""Redis with credentials and with TLS: ACL user:password URLs, wrong passwords, rediss:// end to end.

batchd hands the URL to redis-py as it is (``Redis.from_url`` in the client and daemon,
``ConnectionPool.from_url`` for arq), so whatever redis-py understands in a URL (user, password, rediss://,
ssl_* query arguments) must work through every connection batchd opens.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from batchd import AsyncClient, RedisUnavailable
from batchd.settings import Settings
from tests.daemon_harness import running_daemon
from tests.eventually import eventually
from tests.redis_server import RedisServer, free_port

USER, PASSWORD = "batchd-app", "acl-Pass-7f3e9"
ADMIN_PASSWORD = "admin-Pass-11d2"
FAIL_FAST = 5.0
CLEAR_AUTH = re.compile(r"password|auth|credential|WRONGPASS|NOAUTH", re.IGNORECASE)


def params(text: str) -> dict[str, Any]:
    return {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": text}]}


def user_url(server: RedisServer, user: str = USER, password: str = PASSWORD) -> str:
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


def admin(server: RedisServer) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, password=ADMIN_PASSWORD, socket_timeout=5)


@pytest.fixture
def acl_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private server where only authenticated users get in: the default user needs a password too."""
    server = RedisServer.start_new(tmp_path)
    with server.client() as r:
        r.execute_command("ACL", "SETUSER", USER, "on", f">{PASSWORD}", "~*", "&*", "+@all")
        # Last: from here on, a connection without credentials is refused (NOAUTH).
        r.execute_command("ACL", "SETUSER", "default", "on", f">{ADMIN_PASSWORD}")
    try:
        yield server
    finally:
        server.stop()


# --- ACL user:password ---------------------------------------------------------------------------------
async def test_acl_user_url_works_for_client_and_daemon(
    acl_server: RedisServer, make_settings: Callable[..., Settings], emulator: Any
) -> None:
    settings = make_settings(emulator=True, redis_url=user_url(acl_server), max_batch_age_seconds=0.2)
    async with running_daemon(settings), AsyncClient(settings=settings) as client:
        rids = await client.submit_many([params(f"acl {i}") for i in range(3)])
        results = await asyncio.gather(*(client.result(r, timeout=30) for r in rids))
        assert [r.type for r in results] == ["succeeded"] * 3
        message = await client.messages.create(**params("acl create"), timeout=30)
        assert message.content[0].text == "echo: acl create"  # type: ignore[union-attr]

        # Every connection batchd holds (client, waiter, daemon, arq) is the ACL user's.
        with admin(acl_server) as r:
            me = r.client_id()
            users = {c["user"] for c in r.client_list() if int(c["id"]) != me}
        assert users == {USER}, users
        whoami = await client._redis.acl_whoami()  # the client's own connection (private: read only here)
        assert (whoami.decode() if isinstance(whoami, bytes) else whoami) == USER


@pytest.mark.parametrize(
    "make_url",
    [
        pytest.param(lambda s: user_url(s, password="not-the-password"), id="wrong-password"),
        pytest.param(lambda s: user_url(s, user="nobody"), id="unknown-user"),
        pytest.param(
            lambda s: f"redis://:not-the-password@127.0.0.1:{s.port}/0", id="wrong-default-password"
        ),
        pytest.param(lambda s: f"redis://127.0.0.1:{s.port}/0", id="no-credentials"),
    ],
)
async def test_bad_credentials_give_redis_unavailable_with_a_clear_message(
    acl_server: RedisServer,
    make_settings: Callable[..., Settings],
    make_url: Callable[[RedisServer], str],
) -> None:
    url = make_url(acl_server)
    async with AsyncClient(settings=make_settings(redis_url=url)) as client:
        started = time.monotonic()
        async with asyncio.timeout(FAIL_FAST):
            with pytest.raises(RedisUnavailable) as submit_error:
                await client.submit(params("refused"), "auth-1")
            with pytest.raises(RedisUnavailable):
                await client.result("auth-1", timeout=30)
            with pytest.raises(RedisUnavailable):
                await client.ping()
        assert time.monotonic() - started < FAIL_FAST
    message = str(submit_error.value)
    assert CLEAR_AUTH.search(message), f"the message does not say it is about credentials: {message!r}"
    assert "not-the-password" not in message
    with admin(acl_server) as r:
        assert r.dbsize() == 0


async def test_daemon_with_a_wrong_password_says_so_and_is_not_ready(
    acl_server: RedisServer,
    make_settings: Callable[..., Settings],
    emulator: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="batchd")
    settings = make_settings(emulator=True, redis_url=user_url(acl_server, password="not-the-password"))
    async with running_daemon(settings, ready=False) as daemon:

        async def complained() -> bool:
            return any(
                r.name == "batchd.daemon" and CLEAR_AUTH.search(r.getMessage()) for r in list(caplog.records)
            )

        await eventually(complained, timeout=10)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{daemon.metrics_port}/readyz") as response,
        ):
            body = await response.json()
        assert response.status == 503
        assert body["checks"]["redis"]["ok"] is False
        assert CLEAR_AUTH.search(body["checks"]["redis"]["error"])
    assert not any("not-the-password" in r.getMessage() for r in caplog.records)


# --- TLS ------------------------------------------------------------------------------------------------
def _tls_unsupported_reason() -> str | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return "redis-server is not installed"
    if shutil.which("openssl") is None:
        return "openssl is not installed (needed for a self-signed certificate)"
    # Parse the options and stop at a directive no build knows: a build without TLS stops earlier, at
    # tls-port ("Bad directive" naming it). Nothing is started either way.
    probe = subprocess.run(
        [binary, "--port", "0", "--tls-port", "0", "--batchd-tls-probe", "x"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    output = probe.stdout + probe.stderr
    if "batchd-tls-probe" not in output:
        return (
            f"this redis-server was built without TLS support (--tls-port refused): {output.strip()[-200:]}"
        )
    return None


class TlsRedisServer(RedisServer):
    """A TLS-only server (``--port 0``): nothing reaches it without TLS."""

    def __init__(self, directory: Path, cert: Path, key: Path) -> None:
        port = free_port()
        super().__init__(
            directory,
            port=port,
            extra_args=(
                "--port", "0",
                "--tls-port", str(port),
                "--tls-cert-file", str(cert),
                "--tls-key-file", str(key),
                "--tls-ca-cert-file", str(cert),
                "--tls-auth-clients", "no",
            ),
        )  # fmt: skip
        self.cert = cert

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            ssl=True,
            ssl_ca_certs=str(self.cert),
            socket_timeout=5,
            **kwargs,
        )

    def _wait_ready(self) -> bool:  # the base class pings without TLS
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not self.running:
                return False
            try:
                with self.client(socket_connect_timeout=1) as r:
                    if r.ping():
                        return True
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                pass
            time.sleep(0.02)  # polling for readiness, bounded by the deadline
        return False


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[TlsRedisServer]:
    reason = _tls_unsupported_reason()
    if reason is not None:
        pytest.skip(reason)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    server = TlsRedisServer(tmp_path / "redis", cert, key)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("verify", ["ca-certs", "cert-reqs-none"])
async def test_rediss_url_works_for_client_and_daemon(
    tls_server: TlsRedisServer, make_settings: Callable[..., Settings], emulator: Any, verify: str
) -> None:
    if verify == "ca-certs":
        url = f"{tls_server.url}?ssl_ca_certs={tls_server.cert}"
    else:
        url = f"{tls_server.url}?ssl_cert_reqs=none"
    settings = make_settings(emulator=True, redis_url=url, max_batch_age_seconds=0.2)
    async with running_daemon(settings), AsyncClient(settings=settings) as client:
        rids = await client.submit_many([params(f"tls {i}") for i in range(3)])
        results = await asyncio.gather(*(client.result(r, timeout=30) for r in rids))
        assert [r.type for r in results] == ["succeeded"] * 3
    with tls_server.client() as r:
        # The daemon really ran its whole path over TLS: its flush records and batches are in this server.
        assert r.llen("{batchd}:flushes:recent") >= 1
        assert r.zcard("{batchd}:batches:known") >= 1


async def test_rediss_with_an_untrusted_certificate_gives_redis_unavailable(
    tls_server: TlsRedisServer, make_settings: Callable[..., Settings]
) -> None:
    # No CA given and verification on (redis-py's default): the self-signed certificate is refused.
    async with AsyncClient(settings=make_settings(redis_url=tls_server.url)) as client:
        async with asyncio.timeout(FAIL_FAST):
            with pytest.raises(RedisUnavailable, match=re.compile("certificate|SSL", re.IGNORECASE)):
                await client.submit(params("untrusted"))


async def test_plain_redis_url_to_a_tls_only_server_fails_fast(
    tls_server: TlsRedisServer, make_settings: Callable[..., Settings]
) -> None:
    plain = tls_server.url.replace("rediss://", "redis://")
    async with AsyncClient(settings=make_settings(redis_url=plain), socket_timeout=2.0) as client:
        async with asyncio.timeout(FAIL_FAST):
            with pytest.raises(RedisUnavailable):
                await client.submit(params("plain"))
