"""The Lua scripts (``batchd/lua/*.lua``), loaded once and registered on a Redis client.

redis-py's Script objects run EVALSHA and fall back to EVAL (loading the script) on NOSCRIPT, so a Redis
restart that empties the script cache costs one extra round trip, not an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

__all__ = ["SCRIPT_NAMES", "Scripts", "script_source"]

SCRIPT_NAMES = ("enqueue", "commit_flush", "seal_flush", "deliver", "cancel", "lease", "release_lock")


@cache
def script_source(name: str) -> str:
    return resources.files("batchd").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class Scripts:
    """One registered Script per .lua file. Works with redis.Redis, redis.asyncio.Redis and fakeredis."""

    enqueue: Any
    commit_flush: Any
    seal_flush: Any
    deliver: Any
    cancel: Any
    lease: Any
    release_lock: Any

    @classmethod
    def register(cls, redis: Any) -> Scripts:
        return cls(**{name: redis.register_script(script_source(name)) for name in SCRIPT_NAMES})
