"""The records batchd keeps in Redis and their states: the one place that knows their field names.

A record is read whole from its hash and becomes a typed, frozen dataclass; writes go through
:class:`batchd.store.Store` (plain commands) or :class:`batchd.store.Scripts` (Lua), never through field
names spelt elsewhere. The ``.lua`` files use the same names (see each script's header).
"""

from __future__ import annotations

import datetime
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

import orjson

__all__ = [
    "BatchHeaders",
    "BatchRecord",
    "BatchState",
    "Charge",
    "FlushRecord",
    "FlushState",
    "FlushSummary",
    "IntakeEntry",
    "LedgerRow",
    "RequestRecord",
    "RequestState",
    "Trigger",
    "now_ms",
    "text",
    "utc_day",
]


class RequestState(StrEnum):
    """A request's place in the flow (``{p}:req:<rid>`` field ``state``)."""

    QUEUED = "queued"  # in intake, not yet in a flush (again after a retryable answer)
    FLUSHED = "flushed"  # in flush ``fid``, waiting for its batch's answer
    DONE = "done"  # answered (or canceled); the result key holds the answer
    FOLLOWING = "following"  # deduped: answered with another request's answer (its ``{p}:dedupe:`` record)
    REALTIME = "realtime"  # routed to the Messages API only: never in intake, never batched


class Route(StrEnum):
    """How a request reaches the API (``{p}:req:<rid>`` field ``route``; absent: BATCH). Every route but
    BATCH has a due time in ``{p}:deadlines``, when the daemon sends it through the real-time Messages API
    (standard prices) unless it has its answer by then."""

    BATCH = "batch"
    REALTIME = "realtime"  # asked for real time: sent at once
    AUTO = (
        "auto"  # batched; sent in real time too if its batch has not answered by its deadline less a margin
    )
    AUTO_NOW = "auto_now"  # auto, but a batch could not meet the deadline: sent in real time at once


class FlushState(StrEnum):
    """A flush's place in the flow (``{p}:flush:<fid>`` field ``state``)."""

    BUILDING = "building"  # chunks are being moved in
    SEALED = "sealed"  # complete; waiting for its create
    SUBMITTING = "submitting"  # the create was attempted; its outcome may be unknown
    SUBMITTED = "submitted"  # the batch exists (``batch``)
    DONE = "done"  # the batch's results were delivered
    FAILED = "failed"  # the API refused the create for good; every caller got the error
    EMPTY = "empty"  # every request was canceled before the create


class BatchState(StrEnum):
    """A batch's place in the flow (``{p}:batch:<id>`` field ``state``)."""

    OPEN = "open"  # created, not yet fanned out
    DONE = "done"  # every results line delivered


class Trigger(StrEnum):
    """What closed a flush: the first limit reached."""

    COUNT = "count"
    BYTES = "bytes"
    AGE = "age"
    PRIME = "prime"  # a primer: the first request of a new prompt-cache prefix, sent ahead of the rest


@dataclass(frozen=True, slots=True)
class BatchHeaders:
    """What a batch's create call carries besides its body, and so what requests must share to share a batch:
    betas (``anthropic-beta``), the API version, the workspace and user profile. Requests with different
    headers never meet in one batch. The default (all empty) is the daemon's own SDK defaults."""

    betas: tuple[str, ...] = ()
    anthropic_version: str | None = None
    workspace_id: str | None = None
    user_profile_id: str | None = None

    @property
    def key(self) -> str:
        """The group id requests, stream entries and flushes carry: "" for the default, else a digest."""
        if self == _DEFAULT_HEADERS:
            return ""
        return hashlib.blake2b(self.to_json(), digest_size=8).hexdigest()

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "betas": list(self.betas),
                "anthropic_version": self.anthropic_version,
                "workspace_id": self.workspace_id,
                "user_profile_id": self.user_profile_id,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> BatchHeaders:
        d = orjson.loads(raw)
        return cls(
            betas=tuple(d.get("betas") or ()),
            anthropic_version=d.get("anthropic_version"),
            workspace_id=d.get("workspace_id"),
            user_profile_id=d.get("user_profile_id"),
        )

    def http_headers(self) -> dict[str, str]:
        """The create call's headers (only those that differ from the SDK's defaults)."""
        headers: dict[str, str] = {}
        if self.betas:
            headers["anthropic-beta"] = ",".join(self.betas)
        if self.anthropic_version:
            headers["anthropic-version"] = self.anthropic_version
        if self.workspace_id:
            headers["anthropic-workspace-id"] = self.workspace_id
        if self.user_profile_id:
            headers["anthropic-user-profile-id"] = self.user_profile_id
        return headers


_DEFAULT_HEADERS = BatchHeaders()


def text(value: object) -> str:
    """A Redis reply (bytes, str or number) as text; None as ""."""
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode()
    return str(value)


def _int(value: object, default: int = 0) -> int:
    return default if value is None or value == b"" else int(text(value))


def _opt_int(value: object) -> int | None:
    return None if value is None else int(text(value))


def _opt_text(value: object) -> str | None:
    return None if value is None else text(value)


def now_ms() -> int:
    """Wall-clock milliseconds: the unit of every timestamp batchd stores."""
    return int(time.time() * 1000)


def utc_day(ms: int) -> str:
    """The UTC day (YYYY-MM-DD) of a timestamp in ms: the ledger's and the budgets' unit of time."""
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).date().isoformat()


def _fields(raw: Mapping[Any, Any]) -> dict[str, Any]:
    return {text(k): v for k, v in raw.items()}


class IntakeEntry(NamedTuple):
    """One entry of the intake stream: a request (one attempt of it) waiting to be flushed. (A NamedTuple:
    built for every entry the accumulator reads, at less than two thirds of a frozen dataclass's cost.)"""

    entry_id: str
    rid: str
    custom_id: str
    params_bytes: int
    group: str = ""  # BatchHeaders.key of the request
    prefix: str = ""  # the request's prompt-cache prefix id ("" without a cache breakpoint)

    @property
    def ms(self) -> int:
        """When the entry was queued: a stream id starts with its creation time in milliseconds."""
        return int(self.entry_id.split("-", 1)[0])

    @classmethod
    def from_stream(cls, entry_id: object, raw: Mapping[Any, Any]) -> IntakeEntry | None:
        rid = raw.get(b"rid")
        if isinstance(rid, bytes) and isinstance(entry_id, bytes):
            # The common case, a bytes reply, read without the generic conversions: the accumulator reads
            # every entry of the intake through here (100,000 a batch).
            get = raw.get
            cid, size, group, pfx = get(b"cid"), get(b"bytes"), get(b"group"), get(b"pfx")
            return cls(
                entry_id.decode(),
                rid.decode(),
                cid.decode() if cid is not None else "",
                int(size) if size else 0,
                group.decode() if group else "",
                pfx.decode() if pfx else "",
            )
        fields = _fields(raw)
        if "rid" not in fields:
            return None
        return cls(
            text(entry_id),
            text(fields["rid"]),
            text(fields.get("cid")),
            _int(fields.get("bytes")),
            text(fields.get("group")),
            text(fields.get("pfx")),
        )


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """``{p}:req:<rid>``: one request while it is in flight (its params are dropped once answered)."""

    rid: str
    state: RequestState
    attempts: int
    enqueued_ms: int
    params_bytes: int
    fid: str | None
    canceled: bool

    @classmethod
    def from_hash(cls, rid: str, raw: Mapping[Any, Any]) -> RequestRecord | None:
        f = _fields(raw)
        if "state" not in f:
            return None
        return cls(
            rid=rid,
            state=RequestState(text(f["state"])),
            attempts=_int(f.get("attempts"), 1),
            enqueued_ms=_int(f.get("enq")),
            params_bytes=_int(f.get("bytes")),
            fid=_opt_text(f.get("fid")),
            canceled=f.get("cancel") is not None,
        )


@dataclass(frozen=True, slots=True)
class FlushRecord:
    """``{p}:flush:<fid>``: a group of requests on their way into one batch."""

    fid: str
    state: FlushState
    group: str  # BatchHeaders.key shared by its requests
    created_ms: int
    requests: int  # moved into the flush
    params_bytes: int
    trigger: Trigger | None
    intent_ms: int | None  # when the create was (last) attempted
    attempt_by: str | None  # the replica that made that attempt
    attempt_ended_ms: int | None  # when that attempt ended without a known outcome (None: not known to)
    attempt_answered: bool  # ... and whether the API had replied to it (with an error)
    sent: int | None  # requests in that create body (canceled ones are left out)
    body_bytes: int | None
    batch_id: str | None
    errors: int  # consecutive create errors (backoff)
    error: str | None  # why the create failed for good
    fell_back: int = 0  # of its requests, answered in real time before its batch (answer_realtime.lua)

    @classmethod
    def from_hash(cls, fid: str, raw: Mapping[Any, Any]) -> FlushRecord | None:
        f = _fields(raw)
        if "state" not in f:
            return None
        trigger = _opt_text(f.get("trigger"))
        return cls(
            fid=fid,
            state=FlushState(text(f["state"])),
            group=text(f.get("group")),
            created_ms=_int(f.get("created")),
            requests=_int(f.get("requests")),
            params_bytes=_int(f.get("bytes")),
            trigger=Trigger(trigger) if trigger else None,
            intent_ms=_opt_int(f.get("intent")),
            attempt_by=_opt_text(f.get("by")),
            attempt_ended_ms=_opt_int(f.get("ended")),
            attempt_answered=_int(f.get("answered")) == 1,
            sent=_opt_int(f.get("sent")),
            body_bytes=_opt_int(f.get("body_bytes")),
            batch_id=_opt_text(f.get("batch")),
            errors=_int(f.get("errors")),
            error=_opt_text(f.get("error")),
            fell_back=_int(f.get("fellback")),
        )


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """``{p}:batch:<id>``: a created batch, from its create to its fan-out."""

    batch_id: str
    fid: str
    group: str  # BatchHeaders.key it was created with (retrieve and results carry the same headers)
    requests: int
    created_ms: int
    state: BatchState
    polls: int
    cursor: int  # results lines delivered so far (the fan-out checkpoint)
    errors: int  # consecutive retrieve errors (backoff)
    download_errors: int  # results downloads that broke off (backoff; not reset by a good retrieve)
    seen: bool  # a retrieve has found it at least once
    missing_since_ms: int | None  # the first of the 404s it answers now (None: found last time)
    lines: int | None  # results lines read, once done

    @classmethod
    def from_hash(cls, batch_id: str, raw: Mapping[Any, Any]) -> BatchRecord | None:
        f = _fields(raw)
        if "state" not in f:
            return None
        return cls(
            batch_id=batch_id,
            fid=text(f.get("fid")),
            group=text(f.get("group")),
            requests=_int(f.get("requests")),
            created_ms=_int(f.get("created")),
            state=BatchState(text(f["state"])),
            polls=_int(f.get("polls")),
            cursor=_int(f.get("cursor")),
            errors=_int(f.get("errors")),
            download_errors=_int(f.get("download_errors")),
            seen=f.get("seen") is not None,
            missing_since_ms=_opt_int(f.get("missing_since")),
            lines=_opt_int(f.get("lines")),
        )


class Charge(NamedTuple):
    """What one billed answer adds to the ledger: its model (a bounded label), token counts and costs in
    pico-USD at the price it was billed (``cost``) and at standard prices (``standard``). ``priced`` is
    False for a model the price table does not know (counted, at no cost). A NamedTuple: one is made per
    results line."""

    model: str
    input: int = 0
    output: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    cache_read: int = 0
    server_tool_uses: int = 0
    cost: int = 0
    standard: int = 0
    priced: bool = True

    def blob(self) -> str:
        """The charge as the scripts read it (``split_charge`` in ``lua/_ledger.lua``): one argument."""
        return "\t".join(map(str, self[:9])) + ("\t1" if self.priced else "\t0")


# The ledger's metrics: hash field suffix -> LedgerRow attribute (lua/_ledger.lua writes the same names).
LEDGER_METRICS = {
    "n": "requests",
    "in": "input",
    "out": "output",
    "w5": "cache_write_5m",
    "w1": "cache_write_1h",
    "cr": "cache_read",
    "st": "server_tool_uses",
    "cost": "cost",
    "std": "standard",
    "unp": "unpriced",
    "nd": "undelivered",
    "ndc": "undelivered_cost",
    "rn": "reused",
    "rs": "reused_standard",
}


@dataclass(slots=True)
class LedgerRow:
    """One ledger bucket: a UTC day, a model and a tag set (its id; "" untagged). Costs in pico-USD."""

    day: str
    model: str
    tag_set: str
    requests: int = 0  # answers billed
    input: int = 0
    output: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    cache_read: int = 0
    server_tool_uses: int = 0
    cost: int = 0  # what the API billed
    standard: int = 0  # what the same usage costs at standard prices
    unpriced: int = 0  # answers of models the price table does not know (no cost counted)
    undelivered: int = 0  # billed but dropped by batchd (stale or duplicate lines), included above
    undelivered_cost: int = 0
    reused: int = 0  # requests answered without being sent (dedupe), not included above
    reused_standard: int = 0  # the standard cost those answers had: saved entirely

    @classmethod
    def from_hash(cls, day: str, raw: Mapping[Any, Any]) -> list[LedgerRow]:
        rows: dict[tuple[str, str], LedgerRow] = {}
        for field_name, value in raw.items():
            model, sep, rest = text(field_name).rpartition("|")
            if not sep:
                continue
            model, sep, tag_set = model.rpartition("|")
            attr = LEDGER_METRICS.get(rest)
            if not sep or attr is None:
                continue
            row = rows.setdefault((model, tag_set), cls(day, model, tag_set))
            setattr(row, attr, int(text(value)))
        return list(rows.values())


@dataclass(frozen=True, slots=True)
class FlushSummary:
    """One entry of ``{p}:flushes:recent``: a batch created (for ``batchd status`` and the demo)."""

    fid: str
    batch_id: str
    requests: int
    params_bytes: int
    trigger: str
    at_ms: int
    adopted: bool

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "fid": self.fid,
                "batch": self.batch_id,
                "requests": self.requests,
                "bytes": self.params_bytes,
                "trigger": self.trigger,
                "at": self.at_ms,
                "adopted": self.adopted,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> FlushSummary:
        d = orjson.loads(raw)
        return cls(
            fid=str(d["fid"]),
            batch_id=str(d["batch"]),
            requests=int(d["requests"]),
            params_bytes=int(d["bytes"]),
            trigger=str(d["trigger"]),
            at_ms=int(d["at"]),
            adopted=bool(d.get("adopted", False)),
        )

    def as_dict(self) -> dict[str, object]:
        """The JSON shape ``batchd status --json`` shows."""
        return dict(orjson.loads(self.to_json()))
