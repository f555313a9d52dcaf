"""Replicated Redis for the tests: a primary, a replica and (optionally) three sentinels, all private
``redis-server`` processes on free ports (never the machine's 6379), like tests/redis_server.py's.

The timings here are the test infrastructure's, not batchd's settings: sentinels that call a primary down
after 1 s (production: tens of seconds) and replicas that sync at once, so a failover takes seconds.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from tests.eventually import eventually_sync
from tests.redis_server import RedisServer

__all__ = ["SERVICE", "RedisHA", "SentinelServer", "redis_ha"]

SERVICE = "batchd-ha"
# A replica (and a restarted old primary) syncs as soon as it connects (Redis waits 5 s by default, to
# serve several replicas with one transfer); a stopping primary does not wait for lagging replicas.
_DATA_ARGS = ("--repl-diskless-sync-delay", "0", "--shutdown-timeout", "0")
# Sentinel: primary down after 1 s without answers; a failover that stalls is retried after 2 x 2 s.
_SENTINEL_CONF = """\
sentinel monitor {service} 127.0.0.1 {port} 2
sentinel down-after-milliseconds {service} 1000
sentinel failover-timeout {service} 2000
"""


class SentinelServer(RedisServer):
    """``redis-server <conf> --sentinel``: the config file (sentinel rewrites it) must come first."""

    def __init__(self, directory: Path, primary_port: int) -> None:
        super().__init__(directory)
        self.config = self.dir / "sentinel.conf"
        self.config.write_text(_SENTINEL_CONF.format(service=SERVICE, port=primary_port))

    def command(self) -> list[str]:
        binary, *args = super().command()
        return [binary, str(self.config), "--sentinel", *args]

    def master_port(self) -> int | None:
        """The primary's port as this sentinel sees it (None if it cannot say)."""
        with self.client() as client:
            address = client.sentinel_get_master_addr_by_name(SERVICE)
        return int(address[1]) if address else None

    def sees(self) -> tuple[int, int]:
        """(other sentinels, replicas) this sentinel knows for the service."""
        with self.client() as client:
            state = client.sentinel_master(SERVICE)
        return int(state["num-other-sentinels"]), int(state["num-slaves"])


class RedisHA:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.primary = RedisServer(directory / "primary", extra_args=_DATA_ARGS)
        self.replica: RedisServer | None = None
        self.sentinels: list[SentinelServer] = []
        self._data_servers: list[RedisServer] = [self.primary]  # every one ever started, to stop them all
        self.started_in = 0.0  # seconds to start everything and see the sentinels agree

    def start(self, *, sentinels: int) -> None:
        self.primary.start()
        self.replica = self.start_replica(self.dir / "replica", of=self.primary)
        self.sentinels = [
            SentinelServer(self.dir / f"sentinel{i}", self.primary.port) for i in range(sentinels)
        ]
        for sentinel in self.sentinels:
            sentinel.start()
        if self.sentinels:
            # Each sentinel must know the others (hello messages, every 2 s) and the replica before a
            # failover can be voted and has a replica to promote.
            eventually_sync(
                lambda: all(s.sees() == (sentinels - 1, 1) for s in self.sentinels),
                timeout=30,
                what="the sentinels know each other and the replica",
            )

    def start_replica(self, directory: Path, *, of: RedisServer, port: int | None = None) -> RedisServer:
        """A replica of ``of`` (on ``port``, e.g. a dead primary's), returned once it is in sync."""
        replica = RedisServer(
            directory, port=port, extra_args=(*_DATA_ARGS, "--replicaof", "127.0.0.1", str(of.port))
        )
        self._data_servers.append(replica)
        replica.start()
        with replica.client() as client:
            eventually_sync(
                lambda: client.info("replication").get("master_link_status") == "up",
                timeout=30,
                what=f"replica {replica.port} in sync with {of.port}",
            )
        return replica

    @property
    def servers(self) -> list[RedisServer]:
        return [*self._data_servers, *self.sentinels]

    def url(self, db: int = 0) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/{db}"

    def promoted(self, server: RedisServer) -> bool:
        """Every sentinel names ``server`` as the primary, and it says it is one."""
        if not all(s.master_port() == server.port for s in self.sentinels):
            return False
        with server.client() as client:
            return client.info("replication").get("role") == "master"

    def stop(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.stop()


@contextlib.contextmanager
def redis_ha(tmp_path: Path, *, sentinels: int = 3) -> Iterator[RedisHA]:
    """A primary and an in-sync replica, watched by ``sentinels`` sentinels that agree on both."""
    ha = RedisHA(tmp_path / "redis-ha")
    started = time.monotonic()
    try:
        ha.start(sentinels=sentinels)
        ha.started_in = time.monotonic() - started
        yield ha
    finally:
        ha.stop()
