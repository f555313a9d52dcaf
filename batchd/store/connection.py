"""Redis connections: every client batchd opens is made here, so timeouts and retries live in one place.

Three kinds, by who uses them:

- ``client``: application processes (AsyncClient). A bounded, *blocking* pool: thousands of concurrent
  calls queue for a few connections instead of opening one each (one is the waiters' pub/sub connection).
- ``daemon``: a replica's own commands; retried a few times on connection errors (a Redis restart).
- ``jobs``: the pool arq runs on (``batchd/jobs.py`` wraps it in its namespaced ArqRedis).

URLs: ``redis://``, ``rediss://`` and ``unix://`` go to redis-py as they are. ``redis+sentinel://`` is
batchd's own, for a primary found through Redis Sentinel (redis-py's ``redis.asyncio.sentinel`` does the
discovery and the reconnection to a promoted replica)::

    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db]
                     [?sentinel_username=NAME&sentinel_password=SECRET]

The hosts are the sentinels (port 26379 unless given); ``user:password`` is for the primary (as in a
``redis://`` URL), ``sentinel_username``/``sentinel_password`` for the sentinels, if they require it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import BlockingConnectionPool, ConnectionPool, parse_url
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from ..errors import ReplicationTimeout
from .keys import Keys

__all__ = [
    "CLIENT_SOCKET_TIMEOUT",
    "SENTINEL_SCHEME",
    "Purpose",
    "SentinelUrl",
    "connect",
    "connection_pool",
    "one_connection",
    "parse_redis_url",
    "require_replicas",
]

Purpose = Literal["client", "daemon", "jobs"]

# A command that takes longer than this has lost its connection: long enough for a 500-request submit
# chunk on a busy server, short enough that a dead server is noticed.
CLIENT_SOCKET_TIMEOUT = 10.0
_DAEMON_SOCKET_TIMEOUT = 15.0
_CONNECT_TIMEOUT = 5.0
# A sentinel answers from memory: one that takes longer is down or cut off, and the next one is asked.
_SENTINEL_TIMEOUT = 2.0

SENTINEL_SCHEME = "redis+sentinel"
_PLAIN_SCHEMES = ("redis", "rediss", "unix")
_SENTINEL_PORT = 26379
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")
_SCHEME = re.compile(r"[a-z][a-z0-9+.\-]*")
_URL_FORMS = (
    "redis://[[user]:password@]host[:port][/db], rediss://..., unix:///path.sock, or "
    "redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db]"
)


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    """A parsed ``redis+sentinel://`` URL (``repr`` leaves the passwords out)."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    def __repr__(self) -> str:
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
        return f"SentinelUrl({hosts}/{self.service}/{self.db})"


def parse_redis_url(url: str) -> SentinelUrl | None:
    """Check a Redis URL: the parsed sentinel URL, or None for a URL redis-py takes as it is.

    Raises ValueError with a one-line reason (never the URL itself: it may hold a password).
    """
    scheme, sep, _ = url.partition("://")
    scheme = scheme.lower()
    if not sep or not _SCHEME.fullmatch(scheme):
        raise ValueError(f"not a Redis URL; expected {_URL_FORMS}")
    if scheme == SENTINEL_SCHEME:
        try:
            return _parse_sentinel_url(url)
        except ValueError as exc:
            raise ValueError(str(exc).splitlines()[0]) from None
    if scheme not in _PLAIN_SCHEMES:
        raise ValueError(f"unknown scheme {scheme + '://'!r}; expected {_URL_FORMS}")
    try:
        parse_url(url)  # what redis-py will do with it: a bad port or query value fails here, not later
    except ValueError as exc:
        raise ValueError(f"not a valid Redis URL: {exc}") from None
    return None


def _parse_sentinel_url(url: str) -> SentinelUrl:
    parts = urlsplit(url)
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon and secret else None
    sentinels = tuple(_host_port(item) for item in hostlist.split(","))
    path = [unquote(p) for p in parts.path.split("/")[1:]]
    if not path or not path[0]:
        raise ValueError(f"a {SENTINEL_SCHEME}:// URL needs the service name as its path: {_URL_FORMS}")
    if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"the path of a {SENTINEL_SCHEME}:// URL is /service_name[/db], db a number")
    options: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in _SENTINEL_OPTIONS:
            known = ", ".join(_SENTINEL_OPTIONS)
            raise ValueError(f"unknown option {name!r} in a {SENTINEL_SCHEME}:// URL (known: {known})")
        options[name] = value
    return SentinelUrl(
        sentinels=sentinels,
        service=path[0],
        db=int(path[1]) if len(path) == 2 else 0,
        username=username,
        password=password,
        sentinel_username=options.get("sentinel_username") or None,
        sentinel_password=options.get("sentinel_password") or None,
    )


def _host_port(item: str) -> tuple[str, int]:
    if item.startswith("["):  # [IPv6]:port
        host, _, rest = item[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else rest
    else:
        host, _, port = item.partition(":")
    if not host:
        raise ValueError(f"a {SENTINEL_SCHEME}:// URL needs its sentinels: host[:port][,host[:port]...]")
    if port and not (port.isdigit() and 0 < int(port) < 65_536):
        raise ValueError(f"sentinel {host!r}: the port must be a number from 1 to 65535")
    return host, int(port) if port else _SENTINEL_PORT


class _Sentinel(Sentinel):
    """redis-py's Sentinel, one discovery at a time.

    After a successful query, redis-py 5's ``discover_master`` swaps that sentinel to the front of its list
    by positions read before the query's ``await``: concurrent discoveries (every new connection runs one)
    then duplicate a sentinel and drop another, which is never asked again and whose connections leak.
    Serialised, the swap is safe, and a burst of new connections asks the sentinel that answered last.
    """

    def __init__(self, sentinels: list[tuple[str, int]], sentinel_kwargs: dict[str, Any]) -> None:
        super().__init__(sentinels, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
        self._discovering = asyncio.Lock()

    async def discover_master(self, service_name: str) -> Any:
        async with self._discovering:
            return await super().discover_master(service_name)


class _SentinelPool(SentinelConnectionPool):
    """redis-py's sentinel-managed pool, closing its sentinel connections with its own."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        try:
            await super().disconnect(inuse_connections)
        finally:
            if inuse_connections:  # a full disconnect is a close (a new primary only drops idle connections)
                sentinels = self.sentinel_manager.sentinels
                await asyncio.gather(*(s.aclose() for s in sentinels), return_exceptions=True)


class _BlockingSentinelPool(_SentinelPool, BlockingConnectionPool):
    """Sentinel-managed and bounded: callers queue for a free connection (BlockingConnectionPool's
    get_connection and release), each connection finds the primary through the sentinels."""


def connection_pool(
    url: str, purpose: Purpose, *, max_connections: int = 8, socket_timeout: float = CLIENT_SOCKET_TIMEOUT
) -> ConnectionPool:
    """``max_connections`` and ``socket_timeout`` apply to client pools (the caller's choice)."""
    sentinel = parse_redis_url(url)
    options: dict[str, Any]
    if purpose == "client":
        options = {
            "max_connections": max(2, max_connections),
            "timeout": socket_timeout,  # the wait for a free connection
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
            "health_check_interval": 30,
        }
        if sentinel is None:
            return BlockingConnectionPool.from_url(url, **options)
        return _sentinel_pool(sentinel, _BlockingSentinelPool, options)
    options = {
        "socket_timeout": _DAEMON_SOCKET_TIMEOUT,
        "socket_connect_timeout": _CONNECT_TIMEOUT,
        "health_check_interval": 15,
    }
    if purpose == "daemon":
        options["retry"] = Retry(ExponentialBackoff(cap=2.0, base=0.1), 3)
        options["retry_on_error"] = [RedisConnectionError, RedisTimeoutError]
    if sentinel is None:
        return ConnectionPool.from_url(url, **options)
    return _sentinel_pool(sentinel, _SentinelPool, options)


def _sentinel_pool(
    url: SentinelUrl, pool_class: type[_SentinelPool], options: dict[str, Any]
) -> SentinelConnectionPool:
    sentinel_options: dict[str, Any] = {
        "socket_timeout": _SENTINEL_TIMEOUT,
        "socket_connect_timeout": _SENTINEL_TIMEOUT,
    }
    if url.sentinel_username:
        sentinel_options["username"] = url.sentinel_username
    if url.sentinel_password:
        sentinel_options["password"] = url.sentinel_password
    manager = _Sentinel(list(url.sentinels), sentinel_options)
    return pool_class(
        url.service,
        manager,
        is_master=True,
        db=url.db,
        username=url.username,
        password=url.password,
        **options,
    )


def connect(
    url: str, purpose: Purpose, *, max_connections: int = 8, socket_timeout: float = CLIENT_SOCKET_TIMEOUT
) -> aioredis.Redis:
    """A client on its own pool; ``await client.aclose(close_connection_pool=True)`` releases both."""
    pool = connection_pool(url, purpose, max_connections=max_connections, socket_timeout=socket_timeout)
    return aioredis.Redis(connection_pool=pool)


# --- acknowledged writes (Redis WAIT) ---------------------------------------------------------------------
@contextlib.asynccontextmanager
async def one_connection(redis: aioredis.Redis, *, pinned: bool) -> AsyncIterator[aioredis.Redis]:
    """``redis`` itself, or (``pinned``) a client on one connection of its pool, released at the end: the
    write and the WAIT that acknowledges it must go through the same connection."""
    if not pinned:
        yield redis
        return
    client = redis.client()
    try:
        yield client
    finally:
        await client.aclose()


async def require_replicas(
    redis: aioredis.Redis, keys: Keys, replicas: int, timeout: float, rids: Sequence[str]
) -> None:
    """Return once ``replicas`` replicas hold every write the pinned client ``redis`` has made, and all the
    primary had before; raise ReplicationTimeout naming ``rids`` if they do not within ``timeout``.

    WAIT counts the replicas that have every write made through *its own connection*. A PUBLISH (propagated
    to replicas; harmless, nobody subscribes to that channel) first moves the connection's replication
    offset to the primary's current one, so a write made earlier through another connection (the first
    submit of an id that is now resubmitted, a no-op) is waited for too.
    """
    conn = redis.connection
    if conn is None or not conn.is_connected:
        # A new connection would acknowledge writes of its own only (or another primary's).
        raise RedisConnectionError("lost the connection of the write before its replication was confirmed")
    wait_ms = max(1, round(timeout * 1000))  # WAIT 0 would wait for ever
    barrier = ("PUBLISH", keys.replication_barrier, b"")
    await conn.send_packed_command(
        conn.pack_commands([barrier, ("WAIT", replicas, wait_ms)]), check_health=False
    )
    await conn.read_response()
    # WAIT answers after up to `timeout`: read it with that much more than the usual socket timeout.
    acked = int(await conn.read_response(timeout=timeout + (conn.socket_timeout or CLIENT_SOCKET_TIMEOUT)))
    if acked < replicas:
        raise ReplicationTimeout(rids, replicas, acked, timeout)
