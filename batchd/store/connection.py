"""Redis connections: every client batchd opens is made here, so timeouts and retries live in one place.

Three kinds, by who uses them:

- ``client``: application processes (AsyncClient). A bounded, *blocking* pool: thousands of concurrent
  calls queue for a few connections instead of opening one each (one is the waiters' pub/sub connection).
- ``daemon``: a replica's own commands; retried a few times on connection errors (a Redis restart).
- ``jobs``: the pool arq runs on (``batchd/jobs.py`` wraps it in its namespaced ArqRedis).
"""

from __future__ import annotations

from typing import Literal

import redis.asyncio as aioredis
from redis.asyncio.connection import BlockingConnectionPool, ConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

__all__ = ["CLIENT_SOCKET_TIMEOUT", "Purpose", "connect", "connection_pool"]

Purpose = Literal["client", "daemon", "jobs"]

# A command that takes longer than this has lost its connection: long enough for a 500-request submit
# chunk on a busy server, short enough that a dead server is noticed.
CLIENT_SOCKET_TIMEOUT = 10.0
_DAEMON_SOCKET_TIMEOUT = 15.0
_CONNECT_TIMEOUT = 5.0


def connection_pool(
    url: str, purpose: Purpose, *, max_connections: int = 8, socket_timeout: float = CLIENT_SOCKET_TIMEOUT
) -> ConnectionPool:
    """``max_connections`` and ``socket_timeout`` apply to client pools (the caller's choice)."""
    if purpose == "client":
        return BlockingConnectionPool.from_url(
            url,
            max_connections=max(2, max_connections),
            timeout=socket_timeout,  # the wait for a free connection
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            health_check_interval=30,
        )
    options: dict[str, object] = {
        "socket_timeout": _DAEMON_SOCKET_TIMEOUT,
        "socket_connect_timeout": _CONNECT_TIMEOUT,
        "health_check_interval": 15,
    }
    if purpose == "daemon":
        options["retry"] = Retry(ExponentialBackoff(cap=2.0, base=0.1), 3)
        options["retry_on_error"] = [RedisConnectionError, RedisTimeoutError]
    return ConnectionPool.from_url(url, **options)


def connect(
    url: str, purpose: Purpose, *, max_connections: int = 8, socket_timeout: float = CLIENT_SOCKET_TIMEOUT
) -> aioredis.Redis:
    """A client on its own pool; ``await client.aclose(close_connection_pool=True)`` releases both."""
    pool = connection_pool(url, purpose, max_connections=max_connections, socket_timeout=socket_timeout)
    return aioredis.Redis(connection_pool=pool)
