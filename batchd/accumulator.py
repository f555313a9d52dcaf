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
from .store import IntakeEntry, Store, Trigger, now_ms

__all__ = ["Accumulator", "Entry"]

log = logging.getLogger(__name__)

# Entries a commit_flush call moves. Lua's unpack() fails near 8000 arguments, but the bound that matters is
# smaller: a chunk holds Redis ~3 us an entry, and the reader's next XREADGROUP waits behind it, so chunks of
# 1,000 interleave with reads (the client parses one read while Redis commits one chunk).
FLUSH_CHUNK = 1000
_READ_COUNT = 1000
# Longest XREADGROUP block: bounds how late a claim check (every _CLAIM_EVERY_S) or a stop is noticed; an
# idle accumulator makes two commands per block (the read and the queue-cap check).
_MAX_BLOCK_S = 2.0
_CLAIM_EVERY_S = 2.0
# How late Redis may wake a blocked XREADGROUP (its timeouts are checked every 1/hz s; hz defaults to 10).
_REDIS_TIMER_SLACK_MS = 100
# A consumer that has not touched the stream for this long (and has no fresh heartbeat) is gone.
_CONSUMER_IDLE_MS = 3000
# While flushes are held by the API's queue cap, how often the accumulator looks whether it may go on.
_HELD_PAUSE_S = 1.0
# How often held prefixes are checked for warmth (each step checks at once when a new prefix appears).
_PRIME_CHECK_S = 0.25
_WARM, _PRIMING = "w", "p"
# Flushes handed to the committer and not yet taken. Reading goes on while a flush is committed, but the
# buffer never runs more than this many flushes ahead of the commits.
_COMMIT_BACKLOG = 1

# A buffered intake entry: (stream entry id, rid, the bytes it adds to the create body without the separating
# comma). A plain tuple, not a class: a tuple of strings and ints leaves the collector's lists at its first
# collection, while a class instance (a NamedTuple too) stays tracked. The buffer holds a flush's 10,000 and
# more; as objects they were promoted to the oldest generation and drove ~4 full collections a 100,000-entry
# drain, 0.1 s each (docs/performance.md, drain_*).
Entry = tuple[str, str, int]
_Flush = tuple[list[Entry], Trigger, str]  # entries, trigger, group


def _entry(intake: IntakeEntry) -> Entry:
    return (intake.entry_id, intake.rid, item_size(len(intake.custom_id), intake.params_bytes))


def _ms(entry: Entry) -> int:
    """When the entry was queued: a stream id starts with its creation time in milliseconds."""
    return int(entry[0].partition("-")[0])


@dataclass
class _Buffer:
    """The entries of one group (requests that may share a batch: the same BatchHeaders).

    Within it, entries are kept per prompt-cache prefix (one run per prefix id; "" for requests without a
    breakpoint, and for every request when grouping is off), each run oldest first. A flush takes whole runs
    in the order of their oldest entry, so requests sharing a prefix land in one batch, next to each other,
    and the oldest entry still goes first. Runs held for priming are left out of every trigger.
    """

    groups: dict[str, deque[Entry]] = field(default_factory=dict)
    held: dict[str, float] = field(default_factory=dict)  # prefix -> monotonic time held since
    released: set[str] = field(default_factory=set)  # prefixes whose wait for a primer ran out
    active_n: int = 0  # entries not held
    active_size: int = 0  # their sizes (without separators)

    @property
    def body_bytes(self) -> int:
        return EMPTY_BODY_SIZE + self.active_size + max(self.active_n - 1, 0)

    def __len__(self) -> int:
        return sum(len(entries) for entries in self.groups.values())

    def add(self, key: str, entry: Entry) -> None:
        entries = self.groups.get(key)
        if entries is None:
            entries = self.groups[key] = deque()
        entries.append(entry)
        if key not in self.held:
            self.active_n += 1
            self.active_size += entry[2]

    def hold(self, key: str, since: float) -> None:
        if key in self.held or key not in self.groups:
            return
        self.held[key] = since
        entries = self.groups[key]
        self.active_n -= len(entries)
        self.active_size -= sum(e[2] for e in entries)

    def unhold(self, key: str) -> None:
        if self.held.pop(key, None) is None:
            return
        entries = self.groups.get(key, ())
        self.active_n += len(entries)
        self.active_size += sum(e[2] for e in entries)

    def pop_oldest(self, key: str) -> Entry:
        """Take the oldest entry of one run (a primer); the run must not be held."""
        entries = self.groups[key]
        entry = entries.popleft()
        if key not in self.held:
            self.active_n -= 1
            self.active_size -= entry[2]
        if not entries:
            self._drop(key)
        return entry

    def _drop(self, key: str) -> None:
        del self.groups[key]
        self.held.pop(key, None)
        self.released.discard(key)

    def _order(self) -> list[str]:
        """The runs not held, by their oldest entry."""
        return sorted((k for k in self.groups if k not in self.held), key=lambda k: _ms(self.groups[k][0]))

    def oldest_ms(self) -> int | None:
        """When the oldest entry not held was queued."""
        heads = [_ms(entries[0]) for k, entries in self.groups.items() if k not in self.held]
        return min(heads) if heads else None

    def take(self, count: int) -> list[Entry]:
        taken: list[Entry] = []
        for key in self._order():
            entries = self.groups[key]
            while entries and len(taken) < count:
                taken.append(entries.popleft())
            if not entries:
                self._drop(key)
            if len(taken) >= count:
                break
        self.active_n -= len(taken)
        self.active_size -= sum(e[2] for e in taken)
        return taken

    def due(self, max_requests: int, max_bytes: int, max_age_ms: int) -> tuple[int, Trigger] | None:
        """How many entries to flush now, and why; None if no threshold is reached."""
        if not self.active_n:
            return None
        if self.active_n >= max_requests or self.body_bytes > max_bytes:
            # Walk the flush order: the first prefix that reaches the count or would pass the byte limit.
            size, i = EMPTY_BODY_SIZE, 0
            for key in self._order():
                for entry in self.groups[key]:
                    added = entry[2] + (1 if i else 0)
                    if size + added > max_bytes:
                        return (max(i, 1), Trigger.BYTES)
                    size += added
                    i += 1
                    if i >= max_requests:
                        return (i, Trigger.COUNT)
        oldest = self.oldest_ms()
        if oldest is not None and now_ms() >= oldest + max_age_ms:
            return (self.active_n, Trigger.AGE)
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
        grouping: bool = True,
        priming: bool = False,
        prime_min_requests: int = 4,
        prime_wait_s: float = 900.0,
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
        # Prompt-cache-aware batching (docs/spend.md): runs per prefix, and priming new prefixes.
        self.grouping = grouping or priming
        self.priming = priming
        self.prime_min_requests = prime_min_requests
        self.prime_wait_s = prime_wait_s
        self._prime_checked = 0.0
        self._prime_seen: set[str] = set()
        # One buffer per group: requests with different batch headers (betas, version) never share a batch.
        self._buffers: dict[str, _Buffer] = {}
        self._held: set[str] = set()  # entry ids buffered: a re-read or claimed entry is not added twice
        self._last_claim = 0.0
        # While run() runs: where due flushes go, to be committed by its committer task. Otherwise (step()
        # called on its own) a due flush is committed before step() returns.
        self._handoff: asyncio.Queue[_Flush | None] | None = None

    # --- the loop ------------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        # A fresh start (also after a failure mid-flush): forget the buffer and re-read this consumer's
        # pending entries, which hold everything read and not yet moved into a flush.
        self._buffers = {}
        self._held.clear()
        await self.store.intake.ensure_group()
        await self._read_own_pending()
        # Two tasks: this one reads and decides, the committer moves due flushes into Redis. A commit is
        # Redis's work and a read is mostly the client's (parsing), so side by side they overlap; one task
        # doing both would leave one side idle at a time. A crash anywhere loses nothing: entries stay
        # pending in the stream until their chunk is committed.
        handoff: asyncio.Queue[_Flush | None] = asyncio.Queue(maxsize=_COMMIT_BACKLOG)
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._commit_handed(handoff))
                self._handoff = handoff
                try:
                    while not stop.is_set():
                        await self.step()
                finally:
                    self._handoff = None
                await handoff.put(None)  # the committer ends once what it was handed is committed
        except BaseExceptionGroup as failed:
            # One task failed and the other was cancelled: raise the failure itself (the supervisor tells a
            # lost Redis by the exception's type).
            raise failed.exceptions[0] from None

    async def _commit_handed(self, handoff: asyncio.Queue[_Flush | None]) -> None:
        while (flush := await handoff.get()) is not None:
            await self.flush(*flush)

    async def step(self) -> None:
        """One round: flush what is due, read for at most the time left to the next deadline, flush again.
        (Under run(), "flush" is handing the flush to the committer task.)"""
        self.beat()
        if self.held is not None and await self.held():
            # Flushes already wait for room in the API's queue: more would only pile up in Redis. Reading
            # stops, so intake fills up to its caps and pushes back on the producers (QueueFull).
            await asyncio.sleep(_HELD_PAUSE_S)
            return
        await self._flush_due()
        if time.monotonic() - self._last_claim >= _CLAIM_EVERY_S:
            self._last_claim = time.monotonic()
            await self.claim_from_dead()
        block_ms: int | None = int(_MAX_BLOCK_S * 1000)
        oldest = min((ms for b in self._buffers.values() if (ms := b.oldest_ms()) is not None), default=None)
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
        others = [info for info in await self.store.intake.consumers() if info.name != self.consumer]
        if not others:
            return 0
        heartbeats = await self.store.heartbeats()
        now = now_ms()
        claimed = 0
        for info in others:
            last = heartbeats.get(info.name)
            if last is not None and now - last < self.dead_after_ms:
                continue
            # No (fresh) heartbeat. A live consumer also touches the stream at least every block (2 s), so
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
        held, buffers = self._held, self._buffers
        for intake in entries:
            if intake.entry_id in held:
                continue
            entry = _entry(intake)
            held.add(intake.entry_id)
            # custom_id_for writes the attempt without leading zeros: "<rid>-1" is a first attempt (a check
            # cheaper than parsing the custom id, made for every entry read).
            cid = intake.custom_id
            first_attempts += len(cid) > 2 and cid.endswith("-1")
            buffer = buffers.get(intake.group)
            if buffer is None:
                buffer = buffers[intake.group] = _Buffer()
            buffer.add(intake.prefix if self.grouping else "", entry)
        return first_attempts

    def due(self) -> tuple[str, int, Trigger] | None:
        """The group to flush now, how many of its entries, and why; None if no threshold is reached."""
        for group, buffer in self._buffers.items():
            decision = buffer.due(self.max_requests, self.max_bytes, self.max_age_ms)
            if decision is not None:
                return (group, *decision)
        return None

    async def _flush_due(self) -> None:
        if self.priming:
            await self._prime()
        while (decision := self.due()) is not None:
            group, count, trigger = decision
            buffer = self._buffers[group]
            entries = buffer.take(count)
            if not buffer.groups:
                del self._buffers[group]
            await self._commit(entries, trigger, group)

    async def _commit(self, entries: list[Entry], trigger: Trigger, group: str) -> None:
        if self._handoff is None:
            await self.flush(entries, trigger, group)
        else:
            await self._handoff.put((entries, trigger, group))  # waits while the backlog is full

    # --- priming -------------------------------------------------------------------------------------------
    async def _prime(self) -> None:
        """Prime new prompt-cache prefixes: when ``prime_min_requests`` of a prefix nobody has cached are
        waiting, flush one (the oldest) ahead in a small batch and hold the rest until its answer makes the
        prefix warm (deliver.lua), or until ``prime_wait_s`` has passed. The state is shared in Redis, so a
        prefix another replica primes is held here too."""
        candidates = {
            key
            for buffer in self._buffers.values()
            for key, entries in buffer.groups.items()
            if key
            and key not in buffer.released
            and (key in buffer.held or len(entries) >= self.prime_min_requests)
        }
        now = time.monotonic()
        if not candidates or (candidates <= self._prime_seen and now - self._prime_checked < _PRIME_CHECK_S):
            return
        self._prime_checked, self._prime_seen = now, candidates
        states = await self.store.prefix_states(sorted(candidates))
        wait_ms = int(self.prime_wait_s * 1000)
        for group, buffer in list(self._buffers.items()):
            primers: list[Entry] = []
            for key in [k for k in buffer.groups if k in candidates]:
                state = states.get(key)
                if state == _WARM:
                    buffer.unhold(key)
                    continue
                since = buffer.held.get(key)
                if since is not None and now - since >= self.prime_wait_s:
                    buffer.unhold(key)  # waited long enough: sent as they are
                    buffer.released.add(key)
                    continue
                if state is None and len(buffer.groups[key]) >= self.prime_min_requests:
                    if await self.store.start_priming(key, ms=wait_ms):
                        buffer.unhold(key)
                        primers.append(buffer.pop_oldest(key))
                        since = now if since is None else since
                    state = _PRIMING
                if state == _PRIMING and key in buffer.groups:
                    buffer.hold(key, now if since is None else since)
                elif state is None:
                    buffer.unhold(key)  # its primer failed and too few are left to prime again
            if not buffer.groups:
                del self._buffers[group]
            if primers:
                log_event(log, "cache.priming", prefixes=len(primers))
                await self._commit(primers, Trigger.PRIME, group)

    async def flush(self, entries: list[Entry], trigger: Trigger, group: str = "") -> str | None:
        """Move entries (all of ``group``) into a new flush record, chunk by chunk, then seal it. Returns the
        flush id."""
        fid = f"{now_ms()}-{uuid.uuid4().hex[:12]}"
        moved = moved_bytes = 0
        for start in range(0, len(entries), FLUSH_CHUNK):
            chunk = entries[start : start + FLUSH_CHUNK]
            n, nbytes = await self.store.scripts.commit_flush(
                fid, [e[0] for e in chunk], [e[1] for e in chunk], now_ms=now_ms(), group=group
            )
            moved += n
            moved_bytes += nbytes
        for e in entries:
            self._held.discard(e[0])
        if not await self.store.scripts.seal_flush(fid, trigger, now_ms=now_ms()):
            return None
        log_event(log, "flush.sealed", flush=fid, requests=moved, params_bytes=moved_bytes, trigger=trigger)
        await self.on_flush(fid, trigger, moved, moved_bytes)
        return fid
