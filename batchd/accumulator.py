"""Intake -> flush: read the intake stream as one consumer of the group and flush by count, bytes or age.

Entries read but not yet flushed stay in this consumer's pending list, so a crash loses nothing: a
restarted replica re-reads its own pending entries, and live replicas claim the pending entries of a
replica whose heartbeat stopped (never those of a live one).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from .batchbody import EMPTY_BODY_SIZE, item_size
from .logs import log_event
from .store import IntakeEntry, Store, Trigger, now_ms, split_custom_id

__all__ = ["Accumulator", "Entry"]

log = logging.getLogger(__name__)

# Lua's unpack() fails near 8000 arguments; commit_flush unpacks the entry ids of one chunk.
FLUSH_CHUNK = 5000
_READ_COUNT = 1000
# Longest XREADGROUP block: bounds how late a stop request or a claim check is noticed.
_MAX_BLOCK_S = 1.0
# How late Redis may wake a blocked XREADGROUP (its timeouts are checked every 1/hz s; hz defaults to 10).
_REDIS_TIMER_SLACK_MS = 100
# A consumer that has not touched the stream for this long (and has no fresh heartbeat) is gone.
_CONSUMER_IDLE_MS = 3000
# While flushes are held by the API's queue cap, how often the accumulator looks whether it may go on.
_HELD_PAUSE_S = 1.0


@dataclass(slots=True)
class Entry:
    """A buffered intake entry and the bytes it adds to the create body (without the separating comma)."""

    intake: IntakeEntry
    size: int
    first_attempt: bool

    @property
    def ms(self) -> int:
        return self.intake.ms

    @classmethod
    def of(cls, intake: IntakeEntry) -> Entry:
        try:
            first = split_custom_id(intake.custom_id)[1] == 1
        except ValueError:
            first = False
        return cls(intake, item_size(len(intake.custom_id), intake.params_bytes), first)


@dataclass
class _Buffer:
    """The entries of one group (requests that may share a batch: the same BatchHeaders), oldest first."""

    entries: deque[Entry] = field(default_factory=deque)
    body_bytes: int = EMPTY_BODY_SIZE

    def size_with(self, entry: Entry) -> int:
        return self.body_bytes + entry.size + (1 if self.entries else 0)

    def add(self, entry: Entry) -> None:
        self.body_bytes = self.size_with(entry)
        self.entries.append(entry)

    def take(self, count: int) -> list[Entry]:
        taken = [self.entries.popleft() for _ in range(min(count, len(self.entries)))]
        self.body_bytes = EMPTY_BODY_SIZE + sum(e.size for e in self.entries) + max(len(self.entries) - 1, 0)
        return taken

    def due(self, max_requests: int, max_bytes: int, max_age_ms: int) -> tuple[int, Trigger] | None:
        """How many entries to flush now, and why; None if no threshold is reached."""
        entries = self.entries
        if not entries:
            return None
        if len(entries) >= max_requests or self.body_bytes > max_bytes:
            # Walk from the oldest: the first prefix that reaches the count or would pass the byte limit.
            size = EMPTY_BODY_SIZE
            for i, entry in enumerate(entries):
                added = entry.size + (1 if i else 0)
                if size + added > max_bytes:
                    return (max(i, 1), Trigger.BYTES)
                size += added
                if i + 1 >= max_requests:
                    return (i + 1, Trigger.COUNT)
        if now_ms() >= entries[0].ms + max_age_ms:
            return (len(entries), Trigger.AGE)
        return None


class Accumulator:
    def __init__(
        self,
        store: Store,
        *,
        consumer: str,
        max_requests: int,
        max_bytes: int,
        max_age_s: float,
        on_flush: Callable[[str, Trigger, int, int], Awaitable[None]],
        on_read: Callable[[int], None] = lambda first_attempts: None,
        beat: Callable[[], None] = lambda: None,
        dead_after_s: float = 10.0,
        held: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.store = store
        self.consumer = consumer
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.max_age_ms = int(max_age_s * 1000)
        self.on_flush = on_flush
        self.on_read = on_read
        self.beat = beat
        self.dead_after_ms = int(dead_after_s * 1000)
        self.held = held
        # One buffer per group: requests with different batch headers (betas, version) never share a batch.
        self._buffers: dict[str, _Buffer] = {}
        self._held: set[str] = set()  # entry ids buffered: a re-read or claimed entry is not added twice
        self._last_claim = 0.0

    # --- the loop ------------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        # A fresh start (also after a failure mid-flush): forget the buffer and re-read this consumer's
        # pending entries, which hold everything read and not yet moved into a flush.
        self._buffers = {}
        self._held.clear()
        await self.store.intake.ensure_group()
        await self._read_own_pending()
        while not stop.is_set():
            await self.step()

    async def step(self) -> None:
        """One round: flush what is due, read for at most the time left to the next deadline, flush again."""
        self.beat()
        if self.held is not None and await self.held():
            # Flushes already wait for room in the API's queue: more would only pile up in Redis. Reading
            # stops, so intake fills up to its caps and pushes back on the producers (QueueFull).
            await asyncio.sleep(_HELD_PAUSE_S)
            return
        await self._flush_due()
        if time.monotonic() - self._last_claim >= 2.0:
            self._last_claim = time.monotonic()
            await self.claim_from_dead()
        block_ms: int | None = int(_MAX_BLOCK_S * 1000)
        oldest = min((b.entries[0].ms for b in self._buffers.values() if b.entries), default=None)
        if oldest is not None:
            remaining = oldest + self.max_age_ms - now_ms()
            if remaining <= _REDIS_TIMER_SLACK_MS:
                # Redis checks BLOCK timeouts only every 1/hz s (100 ms at the default hz 10), so the last
                # stretch to the age deadline is timed here, then whatever arrived meanwhile is read.
                await asyncio.sleep(max(0, remaining) / 1000)
                block_ms = None
            else:
                block_ms = min(int(_MAX_BLOCK_S * 1000), remaining - _REDIS_TIMER_SLACK_MS)
        entries = await self.store.intake.read_new(self.consumer, count=_READ_COUNT, block_ms=block_ms)
        first = self._add(entries)
        if first:
            self.on_read(first)
        await self._flush_due()

    async def _read_own_pending(self) -> None:
        """After a restart under the same consumer name, pick up what was read but never flushed."""
        after = "0"
        while entries := await self.store.intake.read_pending(self.consumer, after=after, count=_READ_COUNT):
            self._add(entries)
            after = entries[-1].entry_id
            await self._flush_due()

    async def claim_from_dead(self) -> int:
        """Claim the pending entries of consumers whose heartbeat stopped. Live consumers are never robbed."""
        heartbeats = await self.store.heartbeats()
        now = now_ms()
        claimed = 0
        for info in await self.store.intake.consumers():
            if info.name == self.consumer:
                continue
            last = heartbeats.get(info.name)
            if last is not None and now - last < self.dead_after_ms:
                continue
            # No (fresh) heartbeat. A live consumer also touches the stream at least every block (1 s), so
            # require it to be idle too: a replica that started reading before its first heartbeat is safe.
            if info.idle_ms < _CONSUMER_IDLE_MS:
                continue
            if info.pending == 0:
                if last is None or now - last > 10 * self.dead_after_ms:
                    await self.store.intake.delete_consumer(info.name)
                    await self.store.forget_replica(info.name)
                continue
            ids = await self.store.intake.pending_ids(info.name, count=_READ_COUNT)
            if not ids:
                continue
            # min_idle: if another replica claimed these a moment ago, this claim takes nothing.
            got = await self.store.intake.claim(self.consumer, ids, min_idle_ms=self.dead_after_ms // 2)
            self._add(got)
            claimed += len(got)
        if claimed:
            log.warning("claimed %d queued requests from stopped replicas", claimed)
        return claimed

    # --- triggers ------------------------------------------------------------------------------------------
    def _add(self, entries: Sequence[IntakeEntry]) -> int:
        first_attempts = 0
        for intake in entries:
            if intake.entry_id in self._held:
                continue
            entry = Entry.of(intake)
            self._held.add(intake.entry_id)
            first_attempts += entry.first_attempt
            self._buffers.setdefault(intake.group, _Buffer()).add(entry)
        return first_attempts

    def due(self) -> tuple[str, int, Trigger] | None:
        """The group to flush now, how many of its entries, and why; None if no threshold is reached."""
        for group, buffer in self._buffers.items():
            decision = buffer.due(self.max_requests, self.max_bytes, self.max_age_ms)
            if decision is not None:
                return (group, *decision)
        return None

    async def _flush_due(self) -> None:
        while (decision := self.due()) is not None:
            group, count, trigger = decision
            buffer = self._buffers[group]
            entries = buffer.take(count)
            if not buffer.entries:
                del self._buffers[group]
            await self.flush(entries, trigger, group)

    async def flush(self, entries: list[Entry], trigger: Trigger, group: str = "") -> str | None:
        """Move entries (all of ``group``) into a new flush record, chunk by chunk, then seal it. Returns the
        flush id."""
        fid = f"{now_ms()}-{uuid.uuid4().hex[:12]}"
        moved = moved_bytes = 0
        for start in range(0, len(entries), FLUSH_CHUNK):
            chunk = [e.intake for e in entries[start : start + FLUSH_CHUNK]]
            n, nbytes = await self.store.scripts.commit_flush(fid, chunk, now_ms=now_ms(), group=group)
            moved += n
            moved_bytes += nbytes
        for e in entries:
            self._held.discard(e.intake.entry_id)
        if not await self.store.scripts.seal_flush(fid, trigger, now_ms=now_ms()):
            return None
        log_event(log, "flush.sealed", flush=fid, requests=moved, params_bytes=moved_bytes, trigger=trigger)
        await self.on_flush(fid, trigger, moved, moved_bytes)
        return fid
