"""Shared by the benchmarks: a private redis-server, timing and percentile helpers, RSS, a compact table."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from batchd.localredis import RedisServer

__all__ = [
    "describe_machine",
    "median",
    "peak_rss_bytes",
    "percentiles",
    "private_redis",
    "rss_bytes",
    "table",
    "timed",
]

MODELS = ("claude-haiku-4-5", "claude-sonnet-4-5", "claude-opus-4-5")


def params(n: int, text_bytes: int = 120) -> dict[str, Any]:
    """A typical small request: ~200 bytes of JSON."""
    text = f"request {n}: " + "x" * max(0, text_bytes - 12)
    return {"model": MODELS[n % 3], "max_tokens": 64, "messages": [{"role": "user", "content": text}]}


@contextlib.contextmanager
def private_redis(*extra_args: str) -> Iterator[RedisServer]:
    """A redis-server of its own on a free port (never the machine's shared one), removed at exit."""
    with tempfile.TemporaryDirectory(prefix="batchd-bench-") as tmp:
        server = RedisServer(Path(tmp), extra_args=extra_args)
        server.start()
        try:
            yield server
        finally:
            server.stop()


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
    out = {}
    for p in points:
        rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
        out[f"p{p:g}"] = ordered[rank]
    out["max"] = ordered[-1]
    return out


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


def describe_machine() -> str:
    return (
        f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}, {time.strftime('%Y-%m-%d %H:%M')}"
    )


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A compact fixed-width table."""
    cells = [[str(c) for c in header], *[[_fmt(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [title]
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: object) -> str:
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
