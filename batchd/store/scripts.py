"""The Lua scripts (``batchd/store/lua/*.lua``): one typed method per script.

Each method lays out its script's KEYS and ARGV exactly as the script's header documents and turns the
reply into a typed result, so no caller (tests included) ever builds a KEYS/ARGV list. redis-py's Script
objects run EVALSHA and fall back to EVAL on NOSCRIPT, so a Redis restart that empties the script cache
costs one extra round trip, not an error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from functools import cache
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from .keys import CONSUMER_GROUP, Keys, custom_id_for
from .records import BatchHeaders, IntakeEntry, Trigger

__all__ = [
    "SCRIPT_NAMES",
    "CancelOutcome",
    "DeliverOutcome",
    "DeliverReply",
    "Delivery",
    "EnqueueConflict",
    "EnqueueRefused",
    "NewRequest",
    "Scripts",
    "script_source",
]

SCRIPT_NAMES = (
    "enqueue",
    "commit_flush",
    "seal_flush",
    "deliver",
    "cancel",
    "lease",
    "release_lock",
    "rate_slot",
)


@cache
def script_source(name: str) -> str:
    return resources.files("batchd.store").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class NewRequest:
    """One request to queue: its id and its params JSON (the custom id of its first attempt and the digest
    that tells a repeated submit from a conflicting one follow from them)."""

    rid: str
    body: bytes
    headers: BatchHeaders = field(default_factory=BatchHeaders)

    @property
    def custom_id(self) -> str:
        return custom_id_for(self.rid, 1)

    @property
    def digest(self) -> str:
        """Tells a repeated submit (same params, same headers) from a conflicting one."""
        return hashlib.blake2b(self.body + b"\0" + self.headers.key.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class EnqueueConflict:
    """A request reused a known request id with other params (nothing was written)."""

    index: int  # in the list given to enqueue


@dataclass(frozen=True, slots=True)
class EnqueueRefused:
    """The queue's size that refused a submit (nothing was written)."""

    queued_requests: int
    queued_bytes: int


class DeliverOutcome(IntEnum):
    DELIVERED = 1  # answered: the result key is set and the rid published
    REQUEUED = 2  # a transient result: sent back to intake for another attempt
    DUPLICATE = 0  # the request already had its answer
    STALE = -1  # a line for another attempt than the current one, or an unknown request


@dataclass(frozen=True, slots=True)
class Delivery:
    """One results line for deliver.lua: the request and attempt it answers, and whether it may retry."""

    rid: str
    attempt: int
    line: bytes
    retry: bool


@dataclass(frozen=True, slots=True)
class DeliverReply:
    outcome: DeliverOutcome
    enqueued_ms: int
    attempts: int


class CancelOutcome(IntEnum):
    REMOVED = 1  # still queued: it will never reach the API
    ANSWERED = 2  # already in a flush: its caller is answered 'canceled' now
    ALREADY_ANSWERED = 0
    UNKNOWN = -1


class Scripts:
    """The scripts, registered on one async Redis client (redis.asyncio.Redis or fakeredis's)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._s: dict[str, AsyncScript] = {
            name: redis.register_script(script_source(name)) for name in SCRIPT_NAMES
        }

    async def _call(self, name: str, keys: Sequence[str], args: Sequence[Any], client: Any = None) -> Any:
        return await self._s[name](keys=list(keys), args=list(args), client=client or self._redis)

    async def enqueue(
        self, requests: Sequence[NewRequest], *, now_ms: int, max_requests: int, max_bytes: int
    ) -> list[bool] | EnqueueRefused | EnqueueConflict:
        """Queue the requests atomically. Per request True (new) or False (its id exists with the same
        params: idempotent); EnqueueRefused when the caps would be passed, EnqueueConflict when an id is
        known with other params: nothing is written in either case."""
        k = self._keys
        keys = [k.intake, k.queue_stats, k.groups]
        groups = {r.headers.key: r.headers for r in requests if r.headers.key}
        args: list[Any] = [now_ms, max_requests, max_bytes, len(groups)]
        for key, headers in groups.items():
            args += [key, headers.to_json()]
        for req in requests:
            keys += [k.request(req.rid), k.result(req.rid)]
            args += [req.rid, req.custom_id, req.body, req.digest, req.headers.key]
        reply = await self._call("enqueue", keys, args)
        # A success reply holds only 1s and 0s.
        if reply and int(reply[0]) == -1:
            return EnqueueRefused(int(reply[1]), int(reply[2]))
        if reply and int(reply[0]) == -2:
            return EnqueueConflict(int(reply[1]) - 1)
        return [int(x) == 1 for x in reply]

    async def commit_flush(
        self, fid: str, entries: Sequence[IntakeEntry], *, now_ms: int, group: str = ""
    ) -> tuple[int, int]:
        """Move one chunk (<= 5000) of intake entries, all of one ``group``, into flush ``fid``; returns
        (moved, params bytes)."""
        k = self._keys
        keys = [k.intake, k.queue_stats, k.flush(fid), k.flush_rids(fid), k.flushes]
        keys += [k.request(e.rid) for e in entries]
        args: list[Any] = [CONSUMER_GROUP, fid, now_ms, group]
        for e in entries:
            args += [e.entry_id, e.rid]
        moved, nbytes = await self._call("commit_flush", keys, args)
        return int(moved), int(nbytes)

    async def seal_flush(self, fid: str, trigger: Trigger, *, now_ms: int) -> int | None:
        """Seal a building flush: its request count, 0 if it was empty (removed), None if it was not
        building (sealed already, or no such flush)."""
        k = self._keys
        n = int(
            await self._call(
                "seal_flush", [k.flush(fid), k.flushes, k.flush_rids(fid)], [fid, trigger, now_ms]
            )
        )
        return None if n < 0 else n

    async def deliver(
        self, deliveries: Sequence[Delivery], *, max_attempts: int, ttl_seconds: int
    ) -> list[DeliverReply]:
        """Deliver (or requeue) each line, pipelined in one round trip."""
        if not deliveries:
            return []
        k = self._keys
        async with self._redis.pipeline(transaction=False) as pipe:
            for d in deliveries:
                await self._call(
                    "deliver",
                    [k.request(d.rid), k.result(d.rid), k.intake, k.queue_stats],
                    [
                        d.attempt,
                        d.line,
                        "1" if d.retry else "0",
                        max_attempts,
                        ttl_seconds,
                        k.delivered_channel,
                        d.rid,
                        custom_id_for(d.rid, d.attempt + 1),
                    ],
                    client=pipe,
                )
            replies = await pipe.execute()
        return [
            DeliverReply(DeliverOutcome(int(code)), int(enq or 0), int(attempts or 0))
            for code, enq, attempts in replies
        ]

    async def cancel(self, rid: str, *, line: bytes, ttl_seconds: int) -> CancelOutcome:
        k = self._keys
        code = await self._call(
            "cancel",
            [k.request(rid), k.result(rid), k.queue_stats],
            [line, ttl_seconds, k.delivered_channel, rid],
        )
        return CancelOutcome(int(code))

    async def lease(self, key: str, holder: str, *, ms: int) -> bool:
        """Take or renew the lease ``key`` for ``holder``; False if another holds it."""
        return bool(await self._call("lease", [key], [holder, ms]))

    async def rate_slot(self, *, now_ms: int, limit: int, window_ms: int, token: str) -> int:
        """Take a slot of the API call budget: 0 if taken, else the ms until one frees."""
        return int(await self._call("rate_slot", [self._keys.api_window], [now_ms, limit, window_ms, token]))

    async def release_lock(self, key: str, holder: str) -> bool:
        """Release ``key`` only if ``holder`` still holds it."""
        return bool(await self._call("release_lock", [key], [holder]))
