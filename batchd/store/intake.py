"""The intake stream and its consumer group: what the accumulators read, acknowledge and claim.

Entries read but not yet moved into a flush stay in the reading consumer's pending list, so a replica that
dies holding some loses nothing: it re-reads them when it restarts under the same name, or a live replica
claims them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from .keys import CONSUMER_GROUP, Keys
from .records import IntakeEntry, text

__all__ = ["ConsumerInfo", "Intake"]


@dataclass(frozen=True, slots=True)
class ConsumerInfo:
    name: str
    pending: int  # entries read and not yet acknowledged
    idle_ms: int  # since it last touched the stream


class Intake:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def ensure_group(self) -> None:
        try:
            # id 0: entries queued before the very first daemon started are read too.
            await self._redis.xgroup_create(self._keys.intake, CONSUMER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read_new(self, consumer: str, *, count: int, block_ms: int | None) -> list[IntakeEntry]:
        """Entries never delivered to any consumer, waiting up to ``block_ms`` (None: do not block)."""
        reply = await self._redis.xreadgroup(
            CONSUMER_GROUP, consumer, {self._keys.intake: ">"}, count=count, block=block_ms
        )
        return _entries(reply)

    async def read_pending(self, consumer: str, *, after: str = "0", count: int) -> list[IntakeEntry]:
        """This consumer's own pending entries after id ``after`` (what it read and never flushed)."""
        reply = await self._redis.xreadgroup(
            CONSUMER_GROUP, consumer, {self._keys.intake: after}, count=count
        )
        return _entries(reply)

    async def consumers(self) -> list[ConsumerInfo]:
        try:
            infos = await self._redis.xinfo_consumers(self._keys.intake, CONSUMER_GROUP)
        except ResponseError:  # no stream or no group yet
            return []
        return [ConsumerInfo(text(i["name"]), int(i.get("pending", 0)), int(i.get("idle", 0))) for i in infos]

    async def pending_ids(self, consumer: str, *, count: int) -> list[str]:
        pending = await self._redis.xpending_range(
            self._keys.intake, CONSUMER_GROUP, min="-", max="+", count=count, consumername=consumer
        )
        return [text(p["message_id"]) for p in pending]

    async def claim(self, consumer: str, ids: Sequence[str], *, min_idle_ms: int) -> list[IntakeEntry]:
        """Take over entries idle for at least ``min_idle_ms`` (another claimer a moment ago wins)."""
        reply = await self._redis.xclaim(
            self._keys.intake, CONSUMER_GROUP, consumer, min_idle_time=min_idle_ms, message_ids=list(ids)
        )
        return _entries([[self._keys.intake, reply]])

    async def delete_consumer(self, name: str) -> None:
        await self._redis.xgroup_delconsumer(self._keys.intake, CONSUMER_GROUP, name)

    async def group_pending(self) -> int:
        """Entries read by some consumer and not yet flushed."""
        try:
            groups = await self._redis.xinfo_groups(self._keys.intake)
        except ResponseError:
            return 0
        return sum(int(g.get("pending", 0)) for g in groups if text(g.get("name")) == CONSUMER_GROUP)


def _entries(reply: Any) -> list[IntakeEntry]:
    """Flatten an XREADGROUP/XCLAIM reply. Deleted entries come back with no fields and are skipped."""
    out: list[IntakeEntry] = []
    for _stream, messages in reply or []:
        for entry_id, fields in messages:
            if fields is None:
                continue
            entry = IntakeEntry.from_stream(entry_id, fields)
            if entry is not None:
                out.append(entry)
    return out
