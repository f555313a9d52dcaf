"""Shared by the chaos and crash-window tests: real ``batchd run`` processes (started from the environment,
SIGKILLed, restarted, stopped with SIGTERM; each generation logs JSON to files of its own), and a counter of
the publications on the delivered channel."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["DaemonProcess", "Publications", "daemon_env", "log_events"]

_STOP_TIMEOUT = 30.0


def daemon_env(redis_url: str, base_url: str, **settings: object) -> dict[str, str]:
    """The environment of one ``batchd run``: this process's, minus any batchd/Anthropic configuration,
    plus ``BATCHD_<NAME>`` for each setting given (lower-case names, as in Settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHD_", "ANTHROPIC_"))}
    env.update(
        {
            "BATCHD_REDIS_URL": redis_url,
            "BATCHD_ANTHROPIC_BASE_URL": base_url,
            "BATCHD_ANTHROPIC_API_KEY": "chaos-test-key",
            "BATCHD_METRICS_PORT": "0",
            "BATCHD_LOG_FORMAT": "json",
        }
    )
    env.update({f"BATCHD_{name.upper()}": str(value) for name, value in settings.items()})
    return env


class DaemonProcess:
    """One replica slot. Every start is a new process under the slot's replica name (BATCHD_REPLICA_NAME), so
    a restart takes back what the killed process held, as a restarted service does."""

    def __init__(self, name: str, env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.env = {"BATCHD_REPLICA_NAME": name, **env}
        self.log_dir = log_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.generation = 0
        self.logs: list[Path] = []
        self.kills = 0

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self.generation += 1
        out = self.log_dir / f"{self.name}-{self.generation:03d}.out"
        err = self.log_dir / f"{self.name}-{self.generation:03d}.err"
        self.logs += [out, err]
        with out.open("wb") as stdout, err.open("wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "batchd.cli", "run"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
            )

    def ready(self) -> bool:
        """Whether the current process has said it is ready (it handles SIGTERM from then on; before, a
        SIGTERM finds Python still importing and kills it, exit -15)."""
        if not self.running or not self.logs:
            return False
        with contextlib.suppress(OSError):
            return b'"event":"daemon.ready"' in self.logs[-1].read_bytes()
        return False

    def kill(self) -> None:
        """SIGKILL: nothing runs after it, no finally, no goodbye to Redis."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.kills += 1
        self.process.wait(timeout=_STOP_TIMEOUT)
        self.process = None

    def stop(self) -> int | None:
        """SIGTERM and wait: the graceful stop. Returns the exit code."""
        if self.process is None:
            return None
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=_STOP_TIMEOUT)
            return None

    def tail(self, lines: int = 40) -> str:
        chunks = []
        for path in self.logs[-2:]:
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                chunks.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(chunks)


def log_events(paths: Iterable[Path]) -> Counter[str]:
    """Count the JSON log lines of every generation by event name (or by message for plain log lines)."""
    counts: Counter[str] = Counter()
    for path in paths:
        with contextlib.suppress(OSError), path.open("rb") as handle:
            for raw in handle:
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(record, dict):
                    continue
                event = record.get("event") or record.get("msg", "")
                if event == "batch.created" and record.get("adopted"):
                    event = "batch.adopted"
                counts[str(event)] += 1
                msg = str(record.get("msg", ""))
                if msg.startswith("claimed "):
                    counts["claimed_requests"] += int(msg.split()[1])
                if msg.startswith("sealed flush "):
                    counts["stale_flush_sealed"] += 1
    return counts


class Publications:
    """Counts every request id published on the delivered channel while it listens.

    Start ``listen`` as a task and await ``listening`` before the first submit. To know the count is
    complete, stop whatever publishes, then ``await barrier(redis, channel)``: pub/sub keeps the server's
    order, so once the barrier's own message has arrived every earlier publication has too.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.listening = asyncio.Event()
        self._barriers = 0

    async def listen(self, redis: Any, channel: str) -> None:
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            self.listening.set()
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is not None:
                    data = message["data"]
                    # deliver.lua publishes the rids of a call in one message, joined by commas.
                    self.counts.update((data.decode() if isinstance(data, bytes) else str(data)).split(","))
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def barrier(self, redis: Any, channel: str, timeout: float = 10.0) -> None:
        self._barriers += 1
        token = f"barrier-{id(self)}-{self._barriers}"
        await redis.publish(channel, token)
        deadline = asyncio.get_running_loop().time() + timeout
        while self.counts[token] == 0:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"the barrier message did not come back within {timeout}s")
            await asyncio.sleep(0.01)

    def answers(self) -> Counter[str]:
        """Publications per request id (barriers left out)."""
        return Counter({k: v for k, v in self.counts.items() if not k.startswith("barrier-")})
