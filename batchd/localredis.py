"""A private ``redis-server`` child process on a free port: the demo's embedded Redis and the tests' harness.

Never the machine's shared instance: each one has its own port and data directory::

    server = RedisServer.start_new(tmp_path, "--appendonly", "yes")
    try:
        ...
        server.kill()
        server.start()  # same port, same args: the AOF is replayed
    finally:
        server.stop()
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

__all__ = ["RedisServer", "free_port"]

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0
# Poll interval while waiting for PING; the wait itself is bounded by a deadline.
_POLL = 0.02


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it). Racy by nature: start() retries on a clash."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server child process bound to 127.0.0.1 on its own port and data directory."""

    def __init__(self, directory: Path, port: int | None = None, extra_args: Sequence[str] = ()) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen[bytes] | None = None
        # A port picked by free_port() may be taken before redis binds it; only then may start() move it.
        self._port_is_fixed = port is not None

    @classmethod
    def start_new(cls, tmp_path: Path, *extra_args: str) -> RedisServer:
        """Start a server of its own in ``tmp_path/redis`` and return it (the caller stops it)."""
        server = cls(Path(tmp_path) / "redis", extra_args=extra_args)
        server.start()
        return server

    # --- addresses ----------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_file(self) -> Path:
        return self.dir / "redis.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH (install the redis-server package)")
        return [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(self.log_file),
            # Later arguments win, so extra args such as "--appendonly yes" override the defaults above.
            *self.extra_args,
        ]  # fmt: skip

    # --- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start (or restart, on the same port with the same args) and return once PING answers."""
        if self.running:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        attempts = 1 if self._port_is_fixed else 3
        for attempt in range(attempts):
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            if self._wait_ready():
                # From now on restarts must keep this port: clients hold URLs that name it.
                self._port_is_fixed = True
                return
            self._reap()
            if attempt + 1 < attempts:
                self.port = free_port()
        raise RuntimeError(f"redis-server did not answer PING on port {self.port}; log:\n{self._log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + _START_TIMEOUT
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            while time.monotonic() < deadline:
                if not self.running:
                    return False  # it exited: most likely the port was taken
                try:
                    if client.ping():
                        return True
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                time.sleep(_POLL)
            return False
        finally:
            client.close()

    def stop(self) -> None:
        """Graceful stop (SIGTERM: redis fsyncs the AOF if enabled, writes no RDB with --save "")."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=_STOP_TIMEOUT)
        self.process = None

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed beyond what the OS already has."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=_STOP_TIMEOUT)
        self.process = None

    def _reap(self) -> None:
        with contextlib.suppress(Exception):
            self.kill()

    # --- helpers ------------------------------------------------------------------------------------------
    def client(self, **kwargs: Any) -> redis.Redis:
        """A sync client to this server (caller closes it)."""
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5, **kwargs)

    def config_set(self, name: str, value: str | int) -> None:
        with self.client() as client:
            client.config_set(name, value)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"RedisServer(port={self.port}, dir={str(self.dir)!r}, {state})"
