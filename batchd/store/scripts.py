"""The Lua scripts (``batchd/store/lua/*.lua``): one typed method per script.

Each method lays out its script's KEYS and ARGV exactly as the script's header documents and turns the
reply into a typed result, so no caller (tests included) ever builds a KEYS/ARGV list. redis-py's Script
objects run EVALSHA and fall back to EVAL on NOSCRIPT, so a Redis restart that empties the script cache
costs one extra round trip, not an error.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from functools import cache
from importlib import resources
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from ..tags import TagSet
from .keys import CONSUMER_GROUP, Keys, custom_id_for
from .records import BatchHeaders, Charge, RequestState, Route, Trigger, now_ms, utc_day

__all__ = [
    "BUDGET_TTL_S",
    "SCRIPT_NAMES",
    "Beat",
    "BudgetLimits",
    "BudgetRefused",
    "CancelOutcome",
    "DeliverOutcome",
    "DeliverReply",
    "Delivery",
    "EnqueueConflict",
    "EnqueueOutcome",
    "EnqueueRefused",
    "NewRequest",
    "RealtimeAnswer",
    "RealtimeClaim",
    "Scripts",
    "script_source",
]

SCRIPT_NAMES = (
    "enqueue",
    "commit_flush",
    "seal_flush",
    "deliver",
    "cancel",
    "claim_realtime",
    "answer_realtime",
    "lease",
    "beat",
    "release_lock",
    "flush_entries",
    "flush_bodies",
    "rate_slot",
    "unknown_requests",
)
# A day's budget hash outlives the day: a request is settled against the day it was submitted on, and may
# be answered days later (attempts x the API's 24 h).
BUDGET_TTL_S = 40 * 86_400
_INCLUDE = re.compile(r"^--#include (\w+)$", re.MULTILINE)


@cache
def script_source(name: str) -> str:
    """A script's source, with the fragments it includes (``--#include _ledger``) pasted in."""
    source = resources.files("batchd.store").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")
    return _INCLUDE.sub(lambda m: script_source(m.group(1)), source)


_DEFAULT_HEADERS = BatchHeaders()
_UNTAGGED = TagSet()


def text_of(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _after_newest(ids: Sequence[str]) -> str:
    """The stream id just after the newest of the ids (the chunk's bound for XTRIM MINID)."""
    if not ids:
        return "0-0"
    # Both parts are decimals without leading zeros: by length, then as text, is by value (and cheaper).
    parts = [i.partition("-") for i in ids]
    _, ms, _, seq = max([(len(ms), ms, len(seq), seq) for ms, _, seq in parts])
    return f"{ms}-{int(seq) + 1}"


def _day(ms: int) -> tuple[str, str]:
    day = utc_day(ms)
    return day, day.replace("-", "")


class NewRequest(NamedTuple):
    """One request to queue: its id and its params JSON (the custom id of its first attempt and the digest
    that tells a repeated submit from a conflicting one follow from them), and what spend needs of it: its
    tags, its estimated cost (pico-USD), its prompt-cache prefix (id and TTL), whether it may be deduped.
    A NamedTuple: a submit makes one per request."""

    rid: str
    body: bytes
    headers: BatchHeaders = _DEFAULT_HEADERS
    tags: TagSet = _UNTAGGED
    estimate: int = 0
    prefix: str = ""
    prefix_ttl: int = 0
    dedupe: bool = False
    route: Route = Route.BATCH
    due_ms: int = 0  # when a route other than BATCH is sent in real time


def _digest(body: bytes, group: bytes) -> str:
    """Tells a repeated submit (same params, same headers) from a conflicting one."""
    return hashlib.blake2b(body + b"\0" + group, digest_size=16).hexdigest()


class EnqueueOutcome(IntEnum):
    """What enqueue did with one request (truthy: it is new to batchd)."""

    QUEUED = 1  # queued
    KNOWN = 0  # the request id exists with the same params: an idempotent repeat
    FOLLOWING = 2  # deduped onto an identical request in flight: answered with its answer
    REUSED = 3  # answered at once with an identical request's stored answer


_ENQUEUE_OUTCOMES = {int(o): o for o in EnqueueOutcome}


@dataclass(frozen=True, slots=True)
class BudgetLimits:
    """The daily budgets in force (pico-USD): the global one (None: none) and per tag scope."""

    daily: int | None = None
    tags: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BudgetRefused:
    """Request ``index`` of the call would take budget ``scope`` past its limit on ``day`` (nothing was
    written). ``spent`` counts what was spent or reserved before it, all in pico-USD."""

    index: int
    scope: str
    day: str
    spent: int
    limit: int


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


_DELIVER_OUTCOMES = {int(o): o for o in DeliverOutcome}


class Delivery(NamedTuple):
    """One results line for deliver.lua: the request and attempt it answers, and whether it may retry. A
    NamedTuple: a fan-out makes one per line (a frozen dataclass costs ~3x as much to make)."""

    rid: str
    attempt: int
    line: bytes
    retry: bool
    charge: Charge | None = None  # a succeeded line: what the API billed for it


class DeliverReply(NamedTuple):
    """What deliver.lua did with one line. A NamedTuple, as Delivery."""

    outcome: DeliverOutcome
    enqueued_ms: int
    attempts: int
    charged: bool = False  # this call added the line to the ledger (the first time it was seen)
    followers: int = 0  # deduped callers answered with this line


class RealtimeClaim(NamedTuple):
    """A request claimed for its real-time call: its state then, its route, its params JSON, its batch
    headers' group id and its current attempt (the custom id its answer carries)."""

    rid: str
    state: RequestState
    route: Route
    body: bytes
    group: str
    attempt: int


@dataclass(frozen=True, slots=True)
class RealtimeAnswer:
    outcome: DeliverOutcome  # DELIVERED, DUPLICATE (it had its answer) or STALE (unknown request)
    fell_back: int  # requests of its flush answered in real time so far (0: it was in none)
    sent: int  # requests its flush's batch was created with (0: none created yet)
    batch_id: str | None

    @property
    def batch_all_fell_back(self) -> bool:
        """Every request of its batch has its answer from real time: the batch is no use any more."""
        return self.batch_id is not None and self.sent > 0 and self.fell_back >= self.sent


class CancelOutcome(IntEnum):
    REMOVED = 1  # still queued (or deduped onto another request): it will never reach the API for it
    ANSWERED = 2  # already in a flush (or others follow it): its caller is answered 'canceled' now
    ALREADY_ANSWERED = 0
    UNKNOWN = -1


class Beat(NamedTuple):
    """What a heartbeat found: ``owner`` False if another process holds the replica's name (it must stop),
    ``leader`` True if this replica exports the queue gauges."""

    owner: bool
    leader: bool


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
        self,
        requests: Sequence[NewRequest],
        *,
        now_ms: int,
        max_requests: int,
        max_bytes: int,
        budgets: BudgetLimits = BudgetLimits(),
        result_ttl: int = 7 * 86_400,
    ) -> list[EnqueueOutcome] | EnqueueRefused | EnqueueConflict | BudgetRefused:
        """Queue the requests atomically: an EnqueueOutcome per request (truthy: new). EnqueueRefused when
        the caps would be passed, EnqueueConflict when an id is known with other params, BudgetRefused when
        a request's estimate would pass a budget: nothing is written in any of these cases.

        Every request queued reserves its estimate against today's budgets (global and each of its tags);
        deliver.lua settles it with the real cost. ``result_ttl`` is how long a reused answer is kept."""
        k = self._keys
        day, score = _day(now_ms)
        keys = [k.intake, k.queue_stats, k.groups, k.tag_sets, k.budget(day), k.ledger(day), k.ledger_days]
        keys.append(k.deadlines)
        groups: dict[str, BatchHeaders] = {}
        tag_sets: dict[str, str] = {}
        each: list[Any] = []
        # The requests of one call nearly always share their headers and tags: their ids are computed once.
        headers, group, group_bytes = _DEFAULT_HEADERS, "", b""
        tags, tag_id = _UNTAGGED, ""
        for req in requests:
            if req.headers is not headers:
                headers, group = req.headers, req.headers.key
                group_bytes = group.encode()
                if group:
                    groups[group] = headers
            if req.tags is not tags:
                tags, tag_id = req.tags, req.tags.id
                if tag_id:
                    tag_sets[tag_id] = tags.canonical
            route = "" if req.route is Route.BATCH else req.route.value
            each.append(
                f"{req.rid}\t{custom_id_for(req.rid, 1)}\t{_digest(req.body, group_bytes)}\t{group}\t"
                f"{tag_id}\t{req.estimate}\t{req.prefix}\t{req.prefix_ttl}\t{1 if req.dedupe else 0}\t"
                f"{route}\t{req.due_ms}"
            )
            each.append(req.body)
        res_head, res_tail = k.result_parts
        args: list[Any] = [
            now_ms,
            max_requests,
            max_bytes,
            day,
            score,
            BUDGET_TTL_S,
            result_ttl,
            k.dedupe(""),
            k.request(""),
            res_head,
            res_tail,
            k.realtime_wake,
        ]
        args += ["" if budgets.daily is None else budgets.daily, len(budgets.tags)]
        for scope, limit in budgets.tags.items():
            args += [scope, limit]
        args.append(len(groups))
        for key, group_headers in groups.items():
            args += [key, group_headers.to_json()]
        args.append(len(tag_sets))
        for tag_id, canonical in tag_sets.items():
            args += [tag_id, canonical]
        args += each
        reply = await self._call("enqueue", keys, args)
        # A success reply holds only codes >= 0.
        if reply and int(reply[0]) == -1:
            return EnqueueRefused(int(reply[1]), int(reply[2]))
        if reply and int(reply[0]) == -2:
            return EnqueueConflict(int(reply[1]) - 1)
        if reply and int(reply[0]) == -3:
            return BudgetRefused(int(reply[1]) - 1, text_of(reply[2]), day, int(reply[3]), int(reply[4]))
        return [_ENQUEUE_OUTCOMES[int(x)] for x in reply]

    async def commit_flush(
        self, fid: str, ids: Sequence[str], rids: Sequence[str], *, now_ms: int, group: str = ""
    ) -> tuple[int, int]:
        """Move one chunk (<= 5000) of intake entries, given as their stream ids and rids (``rids[i]`` is
        the request of entry ``ids[i]``), all of one ``group``, into flush ``fid``; returns (moved, params
        bytes)."""
        k = self._keys
        keys = [k.intake, k.queue_stats, k.flush(fid), k.flush_rids(fid), k.flushes]
        pairs = " ".join([f"{i} {r}" for i, r in zip(ids, rids, strict=True)])
        args = [CONSUMER_GROUP, fid, now_ms, group, _after_newest(ids), k.request(""), pairs]
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
        self,
        deliveries: Sequence[Delivery],
        *,
        max_attempts: int,
        ttl_seconds: int,
        batch_id: str | None = None,
        dedupe_window: int = 0,
        now: int | None = None,
    ) -> list[DeliverReply]:
        """Deliver (or requeue) each line, in one script call (up to a fan-out chunk of 500). A line with a
        charge (succeeded) is added to today's ledger the first time this batch's ``batch_id`` delivers its
        custom id."""
        if not deliveries:
            return []
        k = self._keys
        day, score = _day(now_ms() if now is None else now)
        billed = k.billed(batch_id if batch_id is not None else "-")
        keys = [k.intake, k.queue_stats, k.ledger(day), k.ledger_days, k.tag_sets, billed]
        res_head, res_tail = k.result_parts  # the script adds each line's rid between
        args: list[Any] = [
            max_attempts,
            ttl_seconds,
            k.delivered_channel,
            day,
            score,
            k.budget(""),
            BUDGET_TTL_S,
            k.prefix_state(""),
            dedupe_window,
            k.request(""),
            res_head,
            res_tail,
        ]
        # Two arguments a line, the small fields joined by tabs: each argument costs redis-py and Redis about
        # a microsecond to pass (rids and custom ids never hold a tab).
        for d in deliveries:
            rid, attempt = d.rid, d.attempt
            charge = d.charge.blob() if d.charge is not None else ""
            args.append(d.line)
            args.append(
                f"{attempt}\t{'1' if d.retry else '0'}\t{rid}\t{custom_id_for(rid, attempt + 1)}"
                f"\t{custom_id_for(rid, attempt)}\t{charge}"
            )
        flat = await self._call("deliver", keys, args)
        outcome = _DELIVER_OUTCOMES  # a dict lookup: the enum's own call costs ~2 us a line
        return [
            DeliverReply(
                outcome[int(flat[i])],
                int(flat[i + 1] or 0),
                int(flat[i + 2] or 0),
                int(flat[i + 3]) == 1,
                int(flat[i + 4]),
            )
            for i in range(0, len(flat), 5)
        ]

    async def cancel(self, rid: str, *, line: bytes, ttl_seconds: int) -> CancelOutcome:
        k = self._keys
        code = await self._call(
            "cancel",
            [k.request(rid), k.result(rid), k.queue_stats, k.tag_sets],
            [line, ttl_seconds, k.delivered_channel, rid, k.budget(""), BUDGET_TTL_S],
        )
        return CancelOutcome(int(code))

    async def claim_realtime(
        self, *, now_ms: int, limit: int, claim_ms: int
    ) -> tuple[list[RealtimeClaim], int | None]:
        """Up to ``limit`` requests due in real time, each pushed back ``claim_ms`` (see
        claim_realtime.lua), and when the next one is due (ms; None: none is listed)."""
        k = self._keys
        args = [now_ms, limit, claim_ms, k.request(""), k.realtime_lease("")]
        flat = await self._call("claim_realtime", [k.deadlines], args)
        claims = [
            RealtimeClaim(
                text_of(flat[i]),
                RequestState(text_of(flat[i + 1])),
                Route(text_of(flat[i + 2])),
                bytes(flat[i + 3]),
                text_of(flat[i + 4]),
                int(flat[i + 5]),
            )
            for i in range(1, len(flat), 6)
        ]
        next_due = int(float(flat[0]))
        return claims, None if next_due < 0 else next_due

    async def answer_realtime(
        self, rid: str, *, line: bytes, charge: Charge | None, ttl_seconds: int, now: int | None = None
    ) -> RealtimeAnswer:
        """Answer ``rid`` with its real-time call's results line, and charge a succeeded one (whether or not
        it is delivered: the call was billed)."""
        k = self._keys
        day, score = _day(now_ms() if now is None else now)
        keys = [k.request(rid), k.result(rid), k.queue_stats, k.deadlines, k.ledger(day), k.ledger_days]
        keys.append(k.tag_sets)
        args: list[Any] = [rid, line, charge.blob() if charge is not None else "", ttl_seconds]
        args += [k.delivered_channel, day, score, k.budget(""), BUDGET_TTL_S, k.flush("")]
        code, fell, sent, batch = await self._call("answer_realtime", keys, args)
        return RealtimeAnswer(DeliverOutcome(int(code)), int(fell), int(sent), text_of(batch) or None)

    async def lease(self, key: str, holder: str, *, ms: int) -> bool:
        """Take or renew the lease ``key`` for ``holder``; False if another holds it."""
        return bool(await self._call("lease", [key], [holder, ms]))

    async def beat(self, replica: str, token: str, *, now_ms: int, name_ms: int, metrics_ms: int) -> Beat:
        """A replica's heartbeat: renew its name's lease, record the beat, take or renew the metrics lease."""
        k = self._keys
        keys = [k.replicas, k.replica_owner(replica), k.metrics_leader]
        owner, leader = await self._call("beat", keys, [replica, token, now_ms, name_ms, metrics_ms])
        return Beat(bool(owner), bool(leader))

    async def rate_slot(self, *, now_ms: int, limit: int, window_ms: int, token: str) -> int:
        """Take a slot of the API call budget: 0 if taken, else the ms until one frees."""
        return int(await self._call("rate_slot", [self._keys.api_window], [now_ms, limit, window_ms, token]))

    async def flush_entries(self, fid: str, rids: Sequence[str]) -> list[tuple[int, int, int]]:
        """Of ``rids`` (a chunk of flush ``fid``'s), those still waiting in it with their params: (position
        in ``rids``, attempt, params bytes)."""
        flat = await self._call("flush_entries", [self._keys.request(rid) for rid in rids], [fid])
        return [(int(flat[i]) - 1, int(flat[i + 1]), int(flat[i + 2])) for i in range(0, len(flat), 3)]

    async def flush_bodies(self, rids: Sequence[str]) -> list[bytes | None]:
        """The params of each request (None where it has none), in order: for a user that may not ``SORT ...
        GET`` (Store._flush_params)."""
        bodies: list[bytes | None] = await self._call(
            "flush_bodies", [self._keys.request(rid) for rid in rids], []
        )
        return bodies

    async def unknown_requests(self, rids: Sequence[str]) -> list[int]:
        """The positions in ``rids`` of the requests with neither a record nor an answer."""
        keys: list[str] = []
        for rid in rids:
            keys += [self._keys.request(rid), self._keys.result(rid)]
        return [int(i) - 1 for i in await self._call("unknown_requests", keys, [])]

    async def release_lock(self, key: str, holder: str) -> bool:
        """Release ``key`` only if ``holder`` still holds it."""
        return bool(await self._call("release_lock", [key], [holder]))
