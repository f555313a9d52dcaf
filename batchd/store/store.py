"""The storage layer: every read and write of batchd's records goes through a Store.

``Store`` owns the Redis client's view of one deployment (its Keys), the Lua scripts (``store.scripts``,
one typed method each) and the intake stream (``store.intake``); the methods below are the plain-command
reads and writes, grouped by record. Callers never spell a key, a field or a state.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Sequence, Set
from dataclasses import dataclass
from typing import TypeVar, cast

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from .intake import Intake
from .keys import SCHEMA_VERSION, Keys
from .records import (
    BatchHeaders,
    BatchRecord,
    BatchState,
    FlushRecord,
    FlushState,
    FlushSummary,
    LedgerRow,
    RequestRecord,
    RequestState,
    now_ms,
    text,
)
from .scripts import Scripts

__all__ = ["FlushChanged", "FlushEntry", "FlushItem", "QueueSnapshot", "SchemaMismatch", "Store"]

_READ_CHUNK = 1000
_T = TypeVar("_T")
_RECENT_FLUSHES = 50


class SchemaMismatch(Exception):
    """The data under this prefix was written by a batchd with another key layout."""


class FlushChanged(Exception):
    """A request's params went missing or changed while its flush's body was being streamed."""


@dataclass(frozen=True, slots=True)
class FlushEntry:
    """A request still in a flush, without its params: its id, its current attempt, its params' size and its
    position in the flush's list of request ids."""

    rid: str
    attempt: int
    size: int
    index: int


@dataclass(frozen=True, slots=True)
class FlushItem:
    """A request still in a flush: its id, its current attempt and its params JSON."""

    rid: str
    attempt: int
    body: bytes


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    """The shared queue as read at one moment: the daemon's gauges, ``batchd status`` and the demo read
    it through :meth:`Store.snapshot`."""

    at_ms: int
    pending_requests: int  # in intake, not yet in a flush
    pending_bytes: int
    oldest_age_seconds: float | None  # age of the oldest pending request; None when none are pending
    read_not_flushed: int  # read by some replica, not yet flushed
    flushes_waiting: int  # sealed (or building) flushes whose batch is not created yet
    open_batches: int  # created and not yet fanned out
    open_requests: int  # the requests in those: what the API's processing queue holds of ours
    held_by_queue_cap: bool  # sealed flushes are waiting for room in that queue
    routed_requests: int  # routed requests waiting for their real-time call (now or at their deadline)
    replicas: dict[str, int]  # replica name -> last heartbeat (ms)
    alive_replicas: int  # of which with a recent heartbeat


class Store:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = Scripts(redis, keys)
        self.intake = Intake(redis, keys)
        # Redis refused this connection's user ``SORT ... GET`` (ACLs): flush bodies are read by the script.
        self._sort_get_denied = False

    # --- schema -------------------------------------------------------------------------------------------
    async def check_schema(self) -> None:
        """Claim this prefix for SCHEMA_VERSION, or raise SchemaMismatch if another layout owns it.

        Data written by batchd 0.1 (before the schema key existed) is not detected: drain it before an
        upgrade (docs/operations.md).
        """
        k = self.keys
        if await self.redis.set(k.schema, SCHEMA_VERSION, nx=True):
            return
        found = text(await self.redis.get(k.schema))
        if found != str(SCHEMA_VERSION):
            raise SchemaMismatch(
                f"prefix {k.prefix!r} holds data of schema {found}; "
                f"this batchd writes schema {SCHEMA_VERSION}"
            )

    # --- requests -----------------------------------------------------------------------------------------
    async def request(self, rid: str) -> RequestRecord | None:
        return RequestRecord.from_hash(rid, await self._hgetall(self.keys.request(rid)))

    async def request_states(self, rids: Sequence[str]) -> dict[str, RequestState | None]:
        out: dict[str, RequestState | None] = {}
        for chunk in _chunks(rids):
            async with self.redis.pipeline(transaction=False) as pipe:
                for rid in chunk:
                    pipe.hget(self.keys.request(rid), "state")
                rows = await pipe.execute()
            for rid, state in zip(chunk, rows, strict=True):
                out[rid] = RequestState(text(state)) if state is not None else None
        return out

    async def result_line(self, rid: str) -> tuple[bytes | None, bool]:
        """(the stored results line or None, whether batchd knows the request at all), in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self.keys.result(rid))
            pipe.exists(self.keys.request(rid))
            line, exists = await pipe.execute()
        return (None if line is None else bytes(line)), bool(line is not None or exists)

    async def result_lines(self, rids: Sequence[str]) -> list[bytes | None]:
        """The stored results lines of many requests (None where not answered yet), one MGET per 1,000."""
        out: list[bytes | None] = []
        for chunk in _chunks(rids):
            values = await self.redis.mget([self.keys.result(rid) for rid in chunk])
            out.extend(None if v is None else bytes(v) for v in values)
        return out

    async def known_requests(self, rids: Sequence[str]) -> set[str]:
        """Which of ``rids`` batchd still has a record of (queued, in flight, or answered within the TTL)."""
        known = set(rids)
        for chunk in _chunks(rids):
            known.difference_update(chunk[i] for i in await self.scripts.unknown_requests(chunk))
        return known

    # --- flushes ------------------------------------------------------------------------------------------
    async def flush(self, fid: str) -> FlushRecord | None:
        return FlushRecord.from_hash(fid, await self._hgetall(self.keys.flush(fid)))

    async def batch_headers(self, group: str) -> BatchHeaders:
        """The headers a flush's create carries (BatchHeaders.key "" is the default)."""
        if not group:
            return BatchHeaders()
        raw = await self.redis.hget(self.keys.groups, group)  # type: ignore[misc]
        if raw is None:
            raise KeyError(f"unknown request group {group!r}")
        return BatchHeaders.from_json(raw)

    async def flush_rids(self, fid: str) -> list[str]:
        return [text(r) for r in await self._lrange(self.keys.flush_rids(fid), 0, -1)]

    async def flush_items(self, fid: str) -> list[FlushItem]:
        """Every request still waiting in this flush with its params (a canceled one is left out)."""
        rids = await self.flush_rids(fid)
        items: list[FlushItem] = []
        for chunk in _chunks(rids):
            async with self.redis.pipeline(transaction=False) as pipe:
                for rid in chunk:
                    pipe.hmget(self.keys.request(rid), ["state", "fid", "attempts", "body"])
                rows = await pipe.execute()
            for rid, (state, owner, attempts, body) in zip(chunk, rows, strict=True):
                if text(state) == RequestState.FLUSHED and text(owner) == fid and body is not None:
                    items.append(FlushItem(rid, int(attempts), bytes(body)))
        return items

    async def flush_entries(self, fid: str) -> list[FlushEntry]:
        """Every request still waiting in this flush (a canceled one is left out), with the size of its
        params but not the params: a 100,000-request flush's body is streamed, never held."""
        rids = await self.flush_rids(fid)
        entries: list[FlushEntry] = []
        for start in range(0, len(rids), _READ_CHUNK):
            chunk = rids[start : start + _READ_CHUNK]
            found = await self.scripts.flush_entries(fid, chunk)
            entries += [FlushEntry(chunk[i], attempt, size, start + i) for i, attempt, size in found]
        return entries

    async def flush_bodies(
        self, fid: str, entries: Sequence[FlushEntry], *, chunk: int = 1000
    ) -> AsyncIterator[list[bytes]]:
        """The params of ``entries`` (flush ``fid``'s, in order), at most ``chunk`` positions of the flush's
        list at a time; the next chunk is read while the last one is used (sent). Raises FlushChanged if one
        is gone or has changed size since ``flush_entries`` (the body's announced length would be wrong)."""
        parts: list[list[FlushEntry]] = []
        for entry in entries:
            if not parts or entry.index >= parts[-1][0].index + chunk:
                parts.append([])
            parts[-1].append(entry)
        ahead: asyncio.Task[list[bytes]] | None = None
        try:
            for i, part in enumerate(parts):
                if ahead is None:
                    ahead = asyncio.create_task(self._flush_params(fid, part))
                bodies = await ahead
                ahead = None
                if i + 1 < len(parts):
                    ahead = asyncio.create_task(self._flush_params(fid, parts[i + 1]))
                yield bodies
        finally:
            if ahead is not None:
                ahead.cancel()

    async def _flush_params(self, fid: str, part: Sequence[FlushEntry]) -> list[bytes]:
        """The params of ``part`` (entries of one stretch of the flush's list), checked against the sizes
        ``flush_entries`` found. One ``SORT_RO <rids> BY nosort LIMIT GET # GET <request>->body`` of that
        stretch: Redis copies each value once into the reply, where a script's ``HGET`` copies it into a Lua
        string and out again (2.3x the CPU in Redis). An ACL user without read access to every key may not
        ``SORT ... GET``: then the script."""
        if not self._sort_get_denied:
            first, count = part[0].index, part[-1].index - part[0].index + 1
            try:
                reply = await cast(
                    "Awaitable[list[bytes | None]]",
                    self.redis.sort_ro(  # typed as the sync client's list
                        self.keys.flush_rids(fid),
                        start=first,
                        num=count,
                        by="nosort",
                        get=["#", self.keys.request_field("body")],
                    ),
                )
            except ResponseError as exc:
                if "ACL" not in str(exc):
                    raise
                self._sort_get_denied = True
            else:
                if len(part) == count:  # no request of this stretch left the flush: the common case
                    rids, bodies = reply[0::2], reply[1::2]
                else:
                    at = [
                        2 * (entry.index - first) for entry in part if 2 * (entry.index - first) < len(reply)
                    ]
                    rids, bodies = [reply[i] for i in at], [reply[i + 1] for i in at]
                # The rids too: params of the right size under another request would make another body.
                if b"\n".join(cast("list[bytes]", rids)) != "\n".join(entry.rid for entry in part).encode():
                    bodies = []
                return _checked_params(fid, part, bodies)
        return _checked_params(fid, part, await self.scripts.flush_bodies([entry.rid for entry in part]))

    async def unanswered(self, fid: str, *, settled: Set[str] = frozenset()) -> list[tuple[str, int]]:
        """(rid, attempt) of requests still waiting on this flush: no results line reached them.
        ``settled``: requests known not to wait any more (a line just answered them), not read again."""
        rids = [rid for rid in await self.flush_rids(fid) if rid not in settled]
        out: list[tuple[str, int]] = []
        for chunk in _chunks(rids):
            async with self.redis.pipeline(transaction=False) as pipe:
                for rid in chunk:
                    pipe.hmget(self.keys.request(rid), ["state", "fid", "attempts"])
                rows = await pipe.execute()
            for rid, (state, owner, attempts) in zip(chunk, rows, strict=True):
                if text(state) == RequestState.FLUSHED and text(owner) == fid:
                    out.append((rid, int(attempts)))
        return out

    async def pending_flushes(self) -> list[tuple[str, FlushState | None, int]]:
        """(fid, state, created ms) of every flush not yet submitted: what the reconciler walks."""
        entries = await self.redis.zrange(self.keys.flushes, 0, -1, withscores=True)
        out: list[tuple[str, FlushState | None, int]] = []
        for chunk in _chunks(entries):
            async with self.redis.pipeline(transaction=False) as pipe:
                for fid, _ in chunk:
                    pipe.hget(self.keys.flush(text(fid)), "state")
                states = await pipe.execute()
            for (fid, created), state in zip(chunk, states, strict=True):
                out.append((text(fid), FlushState(text(state)) if state is not None else None, int(created)))
        return out

    async def forget_flush(self, fid: str) -> None:
        """Drop a flush from the reconciler's list (it is submitted, failed, empty or gone)."""
        await self.redis.zrem(self.keys.flushes, fid)

    async def mark_flush_empty(self, fid: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.flush(fid), "state", FlushState.EMPTY)
            pipe.zrem(self.keys.flushes, fid)
            await pipe.execute()

    async def begin_create(self, fid: str, *, sent: int, body_bytes: int, by: str) -> int:
        """Record the intent to create this flush's batch (by replica ``by``), and name it as the one create
        whose outcome is unknown until it is recorded. Returns the intent time (ms)."""
        intent = now_ms()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                self.keys.flush(fid),
                mapping={
                    "state": FlushState.SUBMITTING,
                    "intent": intent,
                    "by": by,
                    "sent": sent,
                    "body_bytes": body_bytes,
                },
            )
            pipe.hdel(self.keys.flush(fid), "ended", "answered")
            pipe.set(self.keys.create_inflight, fid)
            await pipe.execute()
        return intent

    async def end_create_attempt(self, fid: str, *, answered: bool) -> int:
        """The last create attempt of this flush has ended without a known outcome; returns when (ms).
        ``answered``: the API replied (an error), so it had finished with the body; else it may still be
        working on it (a timeout, a broken connection, a dead replica)."""
        ended = now_ms()
        await self._hset(self.keys.flush(fid), {"ended": ended, "answered": int(answered)})
        return ended

    async def count_flush_error(self, fid: str) -> int:
        """One more consecutive create error; returns the run length (for backoff)."""
        return int(await self._hincrby(self.keys.flush(fid), "errors", 1))

    async def fail_flush(self, fid: str, error: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.flush(fid), mapping={"state": FlushState.FAILED, "error": error})
            pipe.zrem(self.keys.flushes, fid)
            pipe.delete(self.keys.create_inflight)
            await pipe.execute()

    async def inflight_create(self) -> str | None:
        raw = await self.redis.get(self.keys.create_inflight)
        return None if raw is None else text(raw)

    async def clear_inflight_create(self) -> None:
        await self.redis.delete(self.keys.create_inflight)

    async def record_batch(
        self, flush: FlushRecord, batch_id: str, *, created_ms: int, requests: int, adopted: bool
    ) -> FlushSummary:
        """The flush's batch exists: record it, open it for polling, and note it among recent flushes."""
        k = self.keys
        summary = FlushSummary(
            fid=flush.fid,
            batch_id=batch_id,
            requests=requests,
            params_bytes=flush.params_bytes,
            trigger=flush.trigger or "age",
            at_ms=now_ms(),
            adopted=adopted,
        )
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(k.flush(flush.fid), mapping={"state": FlushState.SUBMITTED, "batch": batch_id})
            pipe.delete(k.create_inflight)
            pipe.zrem(k.flushes, flush.fid)
            pipe.zadd(k.known_batches, {batch_id: created_ms})
            pipe.zadd(k.open_batches, {batch_id: created_ms})
            pipe.incrby(k.open_requests, requests)
            pipe.hset(
                k.batch(batch_id),
                mapping={
                    "fid": flush.fid,
                    "group": flush.group,
                    "requests": requests,
                    "created": created_ms,
                    "state": BatchState.OPEN,
                },
            )
            pipe.lpush(k.recent_flushes, summary.to_json())
            pipe.ltrim(k.recent_flushes, 0, _RECENT_FLUSHES - 1)
            await pipe.execute()
        return summary

    async def recent_flushes(self, count: int = _RECENT_FLUSHES) -> list[FlushSummary]:
        """The last batches created, newest first."""
        return [FlushSummary.from_json(r) for r in await self._lrange(self.keys.recent_flushes, 0, count - 1)]

    # --- batches ------------------------------------------------------------------------------------------
    async def batch(self, batch_id: str) -> BatchRecord | None:
        return BatchRecord.from_hash(batch_id, await self._hgetall(self.keys.batch(batch_id)))

    async def is_known_batch(self, batch_id: str) -> bool:
        return await self.redis.zscore(self.keys.known_batches, batch_id) is not None

    async def known_batch_ids(self) -> list[str]:
        return [text(b) for b in await self.redis.zrange(self.keys.known_batches, 0, -1)]

    async def open_batch_ids(self, limit: int | None = None) -> list[str]:
        end = -1 if limit is None else limit - 1
        return [text(b) for b in await self.redis.zrange(self.keys.open_batches, 0, end)]

    async def count_poll(self, batch_id: str) -> int:
        return int(await self._hincrby(self.keys.batch(batch_id), "polls", 1))

    async def count_batch_error(self, batch_id: str) -> int:
        """One more consecutive retrieve/results error; returns the run length (for backoff)."""
        return int(await self._hincrby(self.keys.batch(batch_id), "errors", 1))

    async def note_batch_found(self, batch: BatchRecord) -> None:
        """A retrieve found the batch: it is no longer missing, its error run is over."""
        key = self.keys.batch(batch.batch_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            if batch.errors:
                pipe.hset(key, mapping={"errors": 0})
            if not batch.seen:
                pipe.hset(key, mapping={"seen": 1})
            if batch.missing_since_ms is not None:
                pipe.hdel(key, "missing_since")
            await pipe.execute()

    async def note_batch_missing(self, batch_id: str) -> int:
        """The batch answered 404; returns since when (ms) it has been missing."""
        key = self.keys.batch(batch_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hsetnx(key, "missing_since", str(now_ms()))
            pipe.hget(key, "missing_since")
            _, since = await pipe.execute()
        return int(since)

    async def count_download_error(self, batch_id: str) -> int:
        """One more broken results download of this batch; returns how many so far (for backoff)."""
        return int(await self._hincrby(self.keys.batch(batch_id), "download_errors", 1))

    async def set_cursor(self, batch_id: str, lines: int) -> None:
        """Checkpoint: the first ``lines`` results lines are delivered."""
        await self._hset(self.keys.batch(batch_id), {"cursor": lines})

    async def finish_batch(self, batch: BatchRecord, *, lines: int, ttl_seconds: int) -> None:
        """Every results line is delivered: close the batch and its flush, and let both expire."""
        k = self.keys
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(k.batch(batch.batch_id), mapping={"state": BatchState.DONE, "lines": lines})
            pipe.zrem(k.open_batches, batch.batch_id)
            pipe.decrby(k.open_requests, batch.requests)
            if batch.fid:
                pipe.hset(k.flush(batch.fid), "state", FlushState.DONE)
                pipe.expire(k.flush(batch.fid), ttl_seconds)
                pipe.expire(k.flush_rids(batch.fid), ttl_seconds)
            pipe.expire(k.batch(batch.batch_id), ttl_seconds)
            # Every line is delivered: nothing of this batch can be charged again (poll_batch stops at DONE).
            pipe.delete(k.billed(batch.batch_id))
            await pipe.execute()

    async def open_requests(self) -> int:
        """Requests in batches created and not yet fanned out: what the API's queue holds of ours."""
        return int(await self.redis.get(self.keys.open_requests) or 0)

    async def recount_open_requests(self) -> int:
        """Set the open-requests counter from the open batches themselves (the reconciler heals any drift a
        crash between two writes left)."""
        total = sum(b.requests for b in await self.open_batches())
        await self.redis.set(self.keys.open_requests, total)
        return total

    async def note_held_by_queue_cap(self, *, ms: int) -> None:
        """A flush was held back by the API's queue cap: keep the note (it remembers when holding began)
        for another ``ms``."""
        key = self.keys.held_by_queue_cap
        if not await self.redis.set(key, now_ms(), nx=True, px=ms):
            await self.redis.pexpire(key, ms)

    async def clear_held_by_queue_cap(self) -> None:
        await self.redis.delete(self.keys.held_by_queue_cap)

    async def held_by_queue_cap_since(self) -> int | None:
        raw = await self.redis.get(self.keys.held_by_queue_cap)
        return None if raw is None else int(raw)

    async def open_batches(self) -> list[BatchRecord]:
        """Every batch not yet fanned out, oldest first."""
        out: list[BatchRecord] = []
        for chunk in _chunks(await self.open_batch_ids()):
            async with self.redis.pipeline(transaction=False) as pipe:
                for batch_id in chunk:
                    pipe.hgetall(self.keys.batch(batch_id))
                rows = await pipe.execute()
            out.extend(r for b, raw in zip(chunk, rows, strict=True) if (r := BatchRecord.from_hash(b, raw)))
        return out

    # --- spend: the ledger, the budgets, prompt-cache prefixes --------------------------------------------
    async def ledger_days(self) -> list[str]:
        """Every UTC day the ledger has, oldest first."""
        return [text(d) for d in await self.redis.zrange(self.keys.ledger_days, 0, -1)]

    async def ledger_rows(self, days: Sequence[str]) -> list[LedgerRow]:
        """The ledger's buckets (day x model x tag set) of these days."""
        rows: list[LedgerRow] = []
        async with self.redis.pipeline(transaction=False) as pipe:
            for day in days:
                pipe.hgetall(self.keys.ledger(day))
            hashes = await pipe.execute()
        for day, raw in zip(days, hashes, strict=True):
            rows.extend(LedgerRow.from_hash(day, raw))
        return rows

    async def tag_sets(self) -> dict[str, str]:
        """Tag set id -> canonical ``k=v,...`` of every tag set requests were sent with."""
        raw = await self._hgetall(self.keys.tag_sets)
        return {text(k): text(v) for k, v in raw.items()}

    async def budget_spent(self, day: str) -> dict[str, int]:
        """What one UTC day has spent or reserved, per budget scope ("*", "key=value"), in pico-USD."""
        raw = await self._hgetall(self.keys.budget(day))
        return {text(k): int(text(v)) for k, v in raw.items()}

    async def prefix_states(self, prefixes: Sequence[str]) -> dict[str, str | None]:
        """Prompt-cache prefix id -> "p" (a primer is in flight), "w" (warm) or None (cold)."""
        if not prefixes:
            return {}
        values = await self.redis.mget([self.keys.prefix_state(p) for p in prefixes])
        return {p: (None if v is None else text(v)) for p, v in zip(prefixes, values, strict=True)}

    async def start_priming(self, prefix: str, *, ms: int) -> bool:
        """Claim the priming of a cold prefix for ``ms`` (False: someone primes it or it is warm)."""
        return bool(await self.redis.set(self.keys.prefix_state(prefix), "p", nx=True, px=ms))

    # --- routing -----------------------------------------------------------------------------------------
    async def count_realtime_failure(self, rid: str) -> int:
        """Count a failed real-time call of ``rid``; returns how many have failed (whatever replica made
        them)."""
        return int(await self.redis.hincrby(self.keys.request(rid), "rtfail", 1))  # type: ignore[misc]

    async def reschedule_realtime(self, rid: str, at_ms: int) -> None:
        """List ``rid`` again, due at ``at_ms`` (only while it is listed: an answered one stays dropped), and
        wake the senders."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self.keys.deadlines, {rid: at_ms}, xx=True)
            pipe.publish(self.keys.realtime_wake, rid)
            await pipe.execute()

    async def realtime_pending(self) -> int:
        """Requests listed to go through the real-time API (now or at their deadline)."""
        return int(await self.redis.zcard(self.keys.deadlines))

    # --- locks and leases ---------------------------------------------------------------------------------
    async def take_lock(self, key: str, value: str, *, ms: int) -> bool:
        return bool(await self.redis.set(key, value, nx=True, px=ms))

    async def release_lock(self, key: str, value: str) -> bool:
        """Release ``key`` only if ``value`` still holds it."""
        return await self.scripts.release_lock(key, value)

    async def lock_holder(self, key: str) -> str | None:
        raw = await self.redis.get(key)
        return None if raw is None else text(raw)

    async def take_reconcile_turn(self, *, ms: int) -> bool:
        """At most one reconcile pass per ``ms`` across all replicas."""
        return bool(await self.redis.set(self.keys.reconcile_lock, "1", nx=True, px=ms))

    async def take_poller_lease(self, holder: str, *, ms: int) -> bool:
        return await self.scripts.lease(self.keys.poller_lease, holder, ms=ms)

    # --- replicas -----------------------------------------------------------------------------------------
    async def claim_replica(self, name: str, token: str, *, ms: int, force: bool = False) -> str | None:
        """Run as replica ``name``: None once claimed, else the token of the process holding the name.
        ``force`` takes it over from a holder known to be dead."""
        key = self.keys.replica_owner(name)
        if force:
            await self.redis.set(key, token, px=ms)
            return None
        if await self.redis.set(key, token, nx=True, px=ms):
            return None
        holder = await self.redis.get(key)
        if holder is None:  # lapsed just now
            return await self.claim_replica(name, token, ms=ms)
        return text(holder)

    async def release_replica(self, name: str, token: str) -> None:
        await self.scripts.release_lock(self.keys.replica_owner(name), token)

    async def note_running_job(self, name: str, job_id: str, *, ms: int) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(self.keys.replica_jobs(name), job_id)
            pipe.pexpire(self.keys.replica_jobs(name), ms)
            await pipe.execute()

    async def forget_running_jobs(self, name: str) -> None:
        await self.redis.delete(self.keys.replica_jobs(name))

    async def running_jobs(self, name: str) -> list[str]:
        """The arq job ids replica ``name`` last said it was running."""
        return [text(j) for j in await self.redis.smembers(self.keys.replica_jobs(name))]  # type: ignore[misc]

    async def heartbeat(self, replica: str, at_ms: int) -> None:
        await self.redis.zadd(self.keys.replicas, {replica: at_ms})

    async def forget_replica(self, replica: str) -> None:
        await self.redis.zrem(self.keys.replicas, replica)

    async def heartbeats(self) -> dict[str, int]:
        """Replica name -> last heartbeat (ms)."""
        return {
            text(name): int(score)
            for name, score in await self.redis.zrange(self.keys.replicas, 0, -1, withscores=True)
        }

    async def note_replica_status(
        self, name: str, *, api_healthy: bool, api_failing_s: float, api_error: str, ms: int
    ) -> None:
        key = self.keys.replica_status(name)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                key,
                mapping={
                    "api_healthy": int(api_healthy),
                    "api_failing_s": round(api_failing_s),
                    "api_error": api_error,
                },
            )
            pipe.pexpire(key, ms)
            await pipe.execute()

    async def replica_statuses(self, names: Sequence[str]) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for name in names:
            raw = await self._hgetall(self.keys.replica_status(name))
            if raw:
                out[name] = {text(k): text(v) for k, v in raw.items()}
        return out

    async def maxmemory_policy(self) -> str:
        """Redis's maxmemory-policy (CONFIG GET, or INFO where CONFIG is renamed or forbidden)."""
        try:
            reply = await self.redis.config_get("maxmemory-policy")
            if reply:
                return text(next(iter(reply.values())))
        except ResponseError:
            pass
        info = await self.redis.info("memory")
        return text(info.get("maxmemory_policy", "unknown"))

    # --- the queue at a glance ----------------------------------------------------------------------------
    async def snapshot(self, *, dead_after_ms: int) -> QueueSnapshot:
        k = self.keys
        at = now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(k.queue_stats, ["requests", "bytes"])
            pipe.xrange(k.intake, "-", "+", count=1)
            pipe.zcard(k.open_batches)
            pipe.zcard(k.flushes)
            pipe.zrange(k.replicas, 0, -1, withscores=True)
            pipe.get(k.open_requests)
            pipe.exists(k.held_by_queue_cap)
            pipe.zcard(k.deadlines)
            replies = await pipe.execute()
        (n, nbytes), first, open_batches, flushes, replicas, open_requests, held, routed = replies
        oldest = None
        if first and int(n or 0) > 0:
            oldest = max(0.0, (at - int(text(first[0][0]).split("-", 1)[0])) / 1000)
        beats = {text(name): int(score) for name, score in replicas}
        return QueueSnapshot(
            at_ms=at,
            pending_requests=int(n or 0),
            pending_bytes=int(nbytes or 0),
            oldest_age_seconds=oldest,
            read_not_flushed=await self.intake.group_pending(),
            flushes_waiting=int(flushes),
            open_batches=int(open_batches),
            open_requests=int(open_requests or 0),
            held_by_queue_cap=bool(held),
            routed_requests=int(routed),
            replicas=beats,
            alive_replicas=sum(1 for beat in beats.values() if at - beat < dead_after_ms),
        )

    # redis-py types these replies as "awaitable or not" (one signature for sync and async clients).
    async def _hgetall(self, key: str) -> dict[bytes, bytes]:
        return await cast("Awaitable[dict[bytes, bytes]]", self.redis.hgetall(key))

    async def _hset(self, key: str, mapping: dict[str, int | str]) -> None:
        await cast("Awaitable[int]", self.redis.hset(key, mapping=mapping))

    async def _lrange(self, key: str, start: int, end: int) -> list[bytes]:
        return await cast("Awaitable[list[bytes]]", self.redis.lrange(key, start, end))

    async def _hincrby(self, key: str, field: str, amount: int) -> int:
        return await cast("Awaitable[int]", self.redis.hincrby(key, field, amount))


def _checked_params(fid: str, part: Sequence[FlushEntry], bodies: Sequence[bytes | None]) -> list[bytes]:
    """``bodies``, the params read for ``part``, if each is there with the size ``flush_entries`` found.
    Checked in C (``map``, list equality): per entry in Python it was a third of the client's read time."""
    if None in bodies or list(map(len, cast("Sequence[bytes]", bodies))) != [entry.size for entry in part]:
        raise FlushChanged(f"the params of a request of flush {fid} changed while its batch was being sent")
    return cast("list[bytes]", bodies)


def _chunks(items: Sequence[_T]) -> list[Sequence[_T]]:
    return [items[i : i + _READ_CHUNK] for i in range(0, len(items), _READ_CHUNK)]
