"""BATCHD_REDIS_URL: the URL forms batchd accepts (redis+sentinel:// among them), the ones it refuses at
settings load with one line naming the setting (the CLI exits 2), and the passwords it never shows.

The acknowledgement settings are checked here too; their behaviour against real replicas is in
tests/integration/test_replica_ack.py, sentinel failover in tests/integration/test_redis_sentinel.py.
"""

from __future__ import annotations

import pytest
from redis.asyncio.connection import BlockingConnectionPool, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.sentinel import SentinelConnectionPool

from batchd.cli import main
from batchd.errors import ConfigError
from batchd.settings import load_settings, redact_url
from batchd.store.connection import SentinelUrl, connection_pool, parse_redis_url

PASSWORD = "s3cret-Pass"
SENTINEL_PASSWORD = "sentinel-Pass"


# --- accepted ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://localhost",
        f"redis://batchd:{PASSWORD}@redis.example:6380/2",
        f"rediss://batchd:{PASSWORD}@redis.example:6380/0?ssl_cert_reqs=none",
        "unix:///run/redis/redis.sock?db=1",
        "REDIS://127.0.0.1:6379/0",
    ],
)
def test_plain_urls_are_passed_to_redis_py_as_they_are(url: str) -> None:
    assert parse_redis_url(url) is None
    assert load_settings(redis_url=url).redis_url == url


def test_a_sentinel_url_names_the_sentinels_the_service_and_the_db() -> None:
    parsed = parse_redis_url(
        f"redis+sentinel://batchd:{PASSWORD}@s1.example,s2.example:26380,[::1]:26381/main-redis/3"
        f"?sentinel_username=watcher&sentinel_password={SENTINEL_PASSWORD}"
    )
    assert parsed == SentinelUrl(
        sentinels=(("s1.example", 26379), ("s2.example", 26380), ("::1", 26381)),
        service="main-redis",
        db=3,
        username="batchd",
        password=PASSWORD,
        sentinel_username="watcher",
        sentinel_password=SENTINEL_PASSWORD,
    )
    assert PASSWORD not in repr(parsed) and SENTINEL_PASSWORD not in repr(parsed)


def test_a_sentinel_url_defaults_db_0_no_credentials_and_decodes_percent_escapes() -> None:
    assert parse_redis_url("redis+sentinel://s1/svc") == SentinelUrl((("s1", 26379),), "svc")
    parsed = parse_redis_url("redis+sentinel://:p%40ss%3Aword@s1/svc?sentinel_password=x%26y")
    assert parsed is not None
    assert (parsed.username, parsed.password, parsed.sentinel_password) == (None, "p@ss:word", "x&y")


def test_each_purpose_gets_a_sentinel_managed_pool_and_clients_keep_a_bounded_blocking_one() -> None:
    url = f"redis+sentinel://batchd:{PASSWORD}@s1,s2/svc/2?sentinel_password={SENTINEL_PASSWORD}"
    client = connection_pool(url, "client", max_connections=5, socket_timeout=3.0)
    assert isinstance(client, SentinelConnectionPool) and isinstance(client, BlockingConnectionPool)
    assert (client.max_connections, client.timeout) == (5, 3.0)
    assert client.service_name == "svc" and client.is_master
    kwargs = client.connection_kwargs
    assert (kwargs["db"], kwargs["username"], kwargs["password"], kwargs["socket_timeout"]) == (
        2,
        "batchd",
        PASSWORD,
        3.0,
    )
    sentinels = client.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [26379, 26379]
    assert all(s.connection_pool.connection_kwargs["password"] == SENTINEL_PASSWORD for s in sentinels)
    daemon = connection_pool(url, "daemon")
    assert isinstance(daemon, SentinelConnectionPool) and not isinstance(daemon, BlockingConnectionPool)
    assert daemon.connection_kwargs["retry"] is not None
    jobs = connection_pool(url, "jobs")
    assert isinstance(jobs, SentinelConnectionPool) and not isinstance(jobs, BlockingConnectionPool)


def test_plain_urls_keep_their_pools() -> None:
    client = connection_pool(f"rediss://u:{PASSWORD}@host:6380/1", "client")
    assert isinstance(client, BlockingConnectionPool) and not isinstance(client, SentinelConnectionPool)
    assert client.connection_class is SSLConnection
    assert client.connection_kwargs["password"] == PASSWORD
    assert connection_pool("unix:///tmp/r.sock", "daemon").connection_class is UnixDomainSocketConnection


# --- refused at load, with one line naming the setting ----------------------------------------------------
BAD_URLS = {
    "foo": "not a Redis URL",
    "": "not a Redis URL",
    "127.0.0.1:6379": "not a Redis URL",
    "http://127.0.0.1:6379/0": "unknown scheme 'http://'",
    f"rediss+sentinel://u:{PASSWORD}@s1/svc": "unknown scheme",
    f"redis://u:{PASSWORD}@host:port/0": "not a valid Redis URL",
    "redis://host/0?socket_timeout=soon": "not a valid Redis URL",
    "redis+sentinel://s1,s2": "service name",
    "redis+sentinel://s1,s2/": "service name",
    f"redis+sentinel://u:{PASSWORD}@/svc": "sentinels",
    "redis+sentinel://s1,,s2/svc": "sentinels",
    "redis+sentinel://s1:notaport/svc": "port",
    "redis+sentinel://s1:0/svc": "port",
    "redis+sentinel://s1/svc/one": "/service_name[/db]",
    "redis+sentinel://s1/svc/0/extra": "/service_name[/db]",
    f"redis+sentinel://s1/svc?password={PASSWORD}": "unknown option 'password'",
}


@pytest.mark.parametrize("url", sorted(BAD_URLS))
def test_a_bad_url_is_a_one_line_config_error_naming_the_setting(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHD_REDIS_URL", url)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith("BATCHD_REDIS_URL: "), message
    assert BAD_URLS[url] in message
    assert "\n" not in message
    assert PASSWORD not in message
    assert "Value error" not in message  # pydantic's prefix is noise in a one-line error


def test_the_cli_exits_2_naming_the_setting_for_a_bad_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Issue 10: `BATCHD_REDIS_URL=foo batchd status` exited 1 with redis-py's ValueError. In-process: no
    # Redis is ever contacted, the URL is refused before.
    monkeypatch.setenv("BATCHD_REDIS_URL", "foo")
    for command in (["status"], ["cancel", "some-id"], ["run"]):
        assert main(command) == 2, command
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("batchd: error: BATCHD_REDIS_URL: not a Redis URL"), (
            lines
        )


# --- passwords never shown --------------------------------------------------------------------------------
def test_redact_url_masks_every_password_of_a_sentinel_url() -> None:
    url = f"redis+sentinel://batchd:{PASSWORD}@s1,s2/svc/0?sentinel_username=w&sentinel_password={SENTINEL_PASSWORD}"
    redacted = redact_url(url)
    assert PASSWORD not in redacted and SENTINEL_PASSWORD not in redacted
    assert redacted == "redis+sentinel://batchd:***@s1,s2/svc/0?sentinel_username=w&sentinel_password=***"
    settings = load_settings(redis_url=url)
    for text in (repr(settings), str(settings), str(settings.redacted())):
        assert PASSWORD not in text and SENTINEL_PASSWORD not in text


# --- the acknowledgement settings -------------------------------------------------------------------------
def test_the_acknowledgement_is_off_by_default() -> None:
    settings = load_settings()
    assert settings.redis_min_replicas_ack == 0
    assert settings.redis_min_replicas_ack_timeout_seconds == 1.0


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("BATCHD_REDIS_MIN_REPLICAS_ACK", "-1"),
        ("BATCHD_REDIS_MIN_REPLICAS_ACK", "101"),
        ("BATCHD_REDIS_MIN_REPLICAS_ACK", "one"),
        ("BATCHD_REDIS_MIN_REPLICAS_ACK_TIMEOUT_SECONDS", "0"),
        ("BATCHD_REDIS_MIN_REPLICAS_ACK_TIMEOUT_SECONDS", "-1"),
        ("BATCHD_REDIS_MIN_REPLICAS_ACK_TIMEOUT_SECONDS", "61"),
        ("BATCHD_REDIS_MIN_REPLICAS_ACK_TIMEOUT_SECONDS", "inf"),
        ("BATCHD_REDIS_MIN_REPLICAS_ACK_TIMEOUT_SECONDS", "nan"),
    ],
)
def test_bad_acknowledgement_settings_name_the_setting(
    name: str, raw: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, raw)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith(f"{name}:")
