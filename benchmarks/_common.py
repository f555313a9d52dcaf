"""Shared by the benchmarks: the row every figure becomes, a private redis-server and emulator, child
processes, timing and percentile helpers, RSS and CPU readings, a compact table."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from batchd.localredis import RedisServer, free_port
from batchd.settings import Settings, load_settings

__all__ = [
    "Env",
    "Row",
    "at_least",
    "at_most",
    "cpu_seconds",
    "describe_machine",
    "emulator_process",
    "median",
    "out",
    "params",
    "peak_rss_bytes",
    "percentiles",
    "private_redis",
    "rss_bytes",
    "table",
]

MODELS = ("claude-haiku-4-5", "claude-sonnet-4-5", "claude-opus-4-5")
API_KEY = "bench-key"
MB = 1e6


@dataclass
class Env:
    """What every row family gets: the size switch and the suite's private redis-server."""

    quick: bool
    redis: RedisServer

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def settings(self, **overrides: Any) -> Settings:
        """Product defaults; a benchmark may shorten only ``max_batch_age_seconds`` and the poll interval
        (and point at its own Redis and emulator)."""
        allowed = {
            "anthropic_base_url",
            "key_prefix",
            "max_batch_age_seconds",
            "poll_interval_seconds",
            "metrics_port",
            "http_port",
        }
        unknown = set(overrides) - allowed
        if unknown:
            raise ValueError(f"benchmarks keep product defaults; not a benchmark knob: {sorted(unknown)}")
        base: dict[str, Any] = {"redis_url": self.redis_url, "anthropic_api_key": API_KEY, "metrics_port": 0}
        return load_settings(**{**base, **overrides})


@dataclass
class Row:
    """One figure: batchd's value, the reference measured in the same run (None for a plain bound), their
    ratio, the target in words, and whether it is met."""

    name: str
    value: float
    unit: str
    reference: float | None
    ratio: float | None
    target: str
    passed: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "reference": self.reference,
            "ratio": self.ratio,
            "target": self.target,
            "pass": self.passed,
        }


def at_least(
    name: str,
    value: float,
    unit: str,
    *,
    reference: float | None = None,
    min_ratio: float | None = None,
    min_value: float | None = None,
) -> Row:
    """A rate: at least ``min_ratio`` of the reference and/or at least ``min_value``."""
    ratio = value / reference if reference else None
    targets, ok = [], True
    if min_ratio is not None:
        targets.append(f">= {min_ratio:g}x ref")
        ok = ok and ratio is not None and ratio >= min_ratio
    if min_value is not None:
        targets.append(f">= {min_value:,g} {unit}")
        ok = ok and value >= min_value
    return Row(name, value, unit, reference, ratio, " and ".join(targets) or "informational", ok)


def at_most(
    name: str, value: float, unit: str, *, limit: float | None, reference: float | None = None
) -> Row:
    """A cost or a delay: at most ``limit`` (None: informational, always passes)."""
    ratio = value / reference if reference else None
    if limit is None:
        return Row(name, value, unit, reference, ratio, "informational", True)
    return Row(name, value, unit, reference, ratio, f"<= {limit:,.4g} {unit}", value <= limit)


def params(n: int, text_bytes: int = 120) -> dict[str, Any]:
    """A typical small request: ~200 bytes of JSON (``text_bytes`` sets the prompt's length)."""
    text = f"request {n}: " + "x" * max(0, text_bytes - 12)
    return {"model": MODELS[n % 3], "max_tokens": 64, "messages": [{"role": "user", "content": text}]}


@contextlib.contextmanager
def private_redis(*extra_args: str) -> Iterator[RedisServer]:
    """A redis-server of its own on a free port (never the machine's shared one), removed at exit."""
    with tempfile.TemporaryDirectory(prefix="batchd-bench-") as tmp:
        server = RedisServer(Path(tmp), extra_args=("--save", "", "--appendonly", "no", *extra_args))
        server.start()
        try:
            yield server
        finally:
            server.stop()


@dataclass
class Emulator:
    """An emulator child process (``batchd emulator``): its own process, so its memory is its own."""

    url: str
    pid: int

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(f"{self.url}/_emulator/stats", timeout=30) as r:
            data: dict[str, int] = json.loads(r.read())
            return data


@contextlib.contextmanager
def emulator_process(*args: str) -> Iterator[Emulator]:
    """``batchd emulator`` on a free port with extra CLI flags; waits until it answers."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchd.cli", "emulator", "--port", str(port), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    emu = Emulator(f"http://127.0.0.1:{port}", proc.pid)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"emulator exited with {proc.returncode}")
            try:
                emu.stats()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield emu
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def run_child(module: str, *args: str, timeout: float = 600) -> dict[str, Any]:
    """``python -m benchmarks.<module> --child ...`` in a fresh process (its memory its own); its last stdout
    line is its JSON answer."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        f"benchmarks.{module}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} child failed ({proc.returncode}):\n{stderr.decode()[-3000:]}")
    result: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
    return result


def child_answer(data: dict[str, Any]) -> None:
    print(json.dumps(data), flush=True)


@contextlib.asynccontextmanager
async def running_daemon(settings: Settings, consumer: str = "bench") -> AsyncIterator[Any]:
    """A real Daemon in this process, stopped at exit."""
    from batchd.daemon import Daemon

    daemon = Daemon(settings, consumer=consumer)
    task = asyncio.create_task(daemon.run(install_signal_handlers=False))
    ready = asyncio.create_task(daemon.wait_ready())
    done, _ = await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ready.cancel()
        await task
        raise RuntimeError("daemon stopped at start")
    try:
        yield daemon
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 60)


@contextlib.contextmanager
def timed(into: list[float]) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        into.append(time.perf_counter() - started)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentiles(values: Sequence[float], points: Sequence[float] = (50, 95, 99)) -> dict[str, float]:
    """Nearest-rank percentiles plus max."""
    ordered = sorted(values)
    result = {}
    for p in points:
        rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
        result[f"p{p:g}"] = ordered[rank]
    result["max"] = ordered[-1]
    return result


def _status_field(pid: int | str, field: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size now (Linux)."""
    return _status_field(pid, "VmRSS")


def peak_rss_bytes(pid: int | str = "self") -> int:
    """Peak resident set size (VmHWM) of a process (Linux)."""
    return _status_field(pid, "VmHWM")


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs); False where not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def read_bytes(pid: int | str) -> int:
    """Bytes a process has read through read(2)-like calls, sockets included (/proc/<pid>/io rchar)."""
    with open(f"/proc/{pid}/io", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("rchar not in /proc/<pid>/io")


def describe_machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    redis_version = "?"
    with contextlib.suppress(Exception):
        redis_version = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, check=False
        ).stdout.split()[2]
    return (
        f"{platform.node()}: {os.cpu_count()} CPUs ({cpu}), {mem / 1e9:.0f} GB, Python "
        f"{platform.python_version()}, {platform.system()} {platform.release()}, "
        f"redis-server {redis_version}, {time.strftime('%Y-%m-%d %H:%M %Z')}"
    )


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A compact fixed-width table."""
    cells = [[str(c) for c in header], *[[fmt(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [title] if title else []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def out(text: str = "") -> None:
    print(text, flush=True, file=sys.stdout)


def dumps(data: object) -> bytes:
    return orjson.dumps(data)


async def prepare_flush(store: Any, n: int, *, text_bytes: int = 120, fid: str = "bench-flush") -> list[str]:
    """Queue ``n`` requests straight through the enqueue script (setup, not timed) and move them all into
    one sealed flush ``fid``, as the accumulator leaves it. Returns the request ids, in order."""
    from batchd.store import NewRequest, Trigger, now_ms
    from batchd.validation import new_request_id

    await store.intake.ensure_group()
    rids = [new_request_id() for _ in range(n)]
    step = 1000 if text_bytes < 4000 else 200
    for start in range(0, n, step):
        chunk = [
            NewRequest(rid, orjson.dumps(params(i, text_bytes)))
            for i, rid in enumerate(rids[start : start + step], start)
        ]
        await store.scripts.enqueue(chunk, now_ms=now_ms(), max_requests=10**9, max_bytes=10**13)
        entries = await store.intake.read_new("bench-setup", count=len(chunk), block_ms=None)
        await store.scripts.commit_flush(
            fid, [e.entry_id for e in entries], [e.rid for e in entries], now_ms=now_ms()
        )
    await store.scripts.seal_flush(fid, Trigger.COUNT, now_ms=now_ms())
    return rids
