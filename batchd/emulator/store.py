"""Batches and their lifecycle, computed lazily from timestamps (no timers run in the background)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .cache import PromptCache
from .config import EmulatorConfig
from .errors import ApiError, not_found
from .ids import batch_id, rfc3339
from .stats import Stats
from .table import Kind, RequestTable

__all__ = ["Batch", "BatchMeta", "BatchStore", "Outcome"]

EXPIRES_AFTER = 24 * 3600.0  # expires_at is always created_at + 24 h, whatever expiry_seconds says


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an ended batch ended. Requests [0, processed) keep their own kind; the rest take `tail`."""

    ended_at: float
    processed: int
    tail: Kind | None
    counts: dict[str, int]


@dataclass(frozen=True, slots=True)
class BatchMeta:
    """What a batch was created with: the create call's key and headers (they apply to every request)."""

    api_key: str = ""
    betas: tuple[str, ...] = ()
    anthropic_version: str | None = None
    workspace_id: str | None = None


class Batch:
    """One batch. Request i counts as processed at created + processing_seconds * (i + 1) / n,
    so a cancel or an expiry that lands mid-way leaves a realistic mix of finished and unfinished requests."""

    __slots__ = (
        "_outcome",
        "cancel_initiated",
        "cancel_seconds",
        "created",
        "expiry_seconds",
        "id",
        "meta",
        "processing_seconds",
        "seq",
        "table",
        "visible_from",
    )

    def __init__(
        self,
        ident: str,
        seq: int,
        table: RequestTable,
        created: float,
        config: EmulatorConfig,
        meta: BatchMeta | None = None,
    ) -> None:
        self.id = ident
        self.meta = meta if meta is not None else BatchMeta()
        self.seq = seq
        self.table = table
        self.created = created
        # Knobs are read once: changing them later must not move a running batch's end.
        self.processing_seconds = config.processing_seconds
        self.expiry_seconds = config.expiry_seconds
        self.visible_from = created + config.transient_404_seconds
        self.cancel_initiated: float | None = None
        self.cancel_seconds = 0.0
        self._outcome: Outcome | None = None

    def __len__(self) -> int:
        return len(self.table)

    def end_time(self) -> float:
        """When the batch ends (or ended), with what is known now (a cancel may have moved it earlier)."""
        return self._end()[0]

    def _end(self) -> tuple[float, Kind | None]:
        end, tail = self.created + self.processing_seconds, None
        expiry = self.created + self.expiry_seconds
        if expiry < end:
            end, tail = expiry, Kind.EXPIRED
        if self.cancel_initiated is not None:
            cancel_end = self.cancel_initiated + self.cancel_seconds
            if cancel_end < end:
                end, tail = cancel_end, Kind.CANCELED
        return end, tail

    def outcome(self, now: float) -> Outcome | None:
        """None while the batch runs; computed once, then fixed."""
        if self._outcome is None:
            end, tail = self._end()
            if now < end:
                return None
            n = len(self.table)
            processed = n
            if tail is not None and self.processing_seconds > 0:
                processed = max(0, min(n, int((end - self.created) * n / self.processing_seconds)))
            head = self.table.kinds[:processed]
            rest = n - processed
            counts = {
                "processing": 0,
                "succeeded": head.count(Kind.SUCCEEDED),
                "errored": head.count(Kind.INVALID)
                + head.count(Kind.API_ERROR)
                + head.count(Kind.OVERLOADED),
                "canceled": rest if tail is Kind.CANCELED else 0,
                "expired": head.count(Kind.EXPIRED) + (rest if tail is Kind.EXPIRED else 0),
            }
            self._outcome = Outcome(ended_at=end, processed=processed, tail=tail, counts=counts)
        return self._outcome

    def processed_at(self, index: int) -> float:
        """When request `index` is processed, if the batch runs its course."""
        return self.created + self.processing_seconds * (index + 1) / len(self.table)

    def scheduled_end(self) -> float:
        """When the batch ends unless a cancel comes first."""
        return min(self.created + self.processing_seconds, self.created + self.expiry_seconds)

    def kind(self, index: int, outcome: Outcome) -> Kind:
        if index < outcome.processed or outcome.tail is None:
            return Kind(self.table.kinds[index])
        return outcome.tail

    def status(self, now: float) -> str:
        if self.outcome(now) is not None:
            return "ended"
        return "canceling" if self.cancel_initiated is not None else "in_progress"

    def cancel(self, now: float, cancel_seconds: float) -> bool:
        """Start canceling; False (and nothing changes) if already ended or already canceling."""
        if self.outcome(now) is not None or self.cancel_initiated is not None:
            return False
        self.cancel_initiated = now
        self.cancel_seconds = cancel_seconds
        return True

    def to_json(self, now: float, base_url: str) -> dict[str, object]:
        outcome = self.outcome(now)
        if outcome is None:
            counts = {
                "processing": len(self.table),
                "succeeded": 0,
                "errored": 0,
                "canceled": 0,
                "expired": 0,
            }
            status = "canceling" if self.cancel_initiated is not None else "in_progress"
        else:
            counts, status = outcome.counts, "ended"
        return {
            "id": self.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": counts,
            "ended_at": rfc3339(outcome.ended_at) if outcome else None,
            "created_at": rfc3339(self.created),
            "expires_at": rfc3339(self.created + EXPIRES_AFTER),
            "archived_at": None,
            "cancel_initiated_at": rfc3339(self.cancel_initiated)
            if self.cancel_initiated is not None
            else None,
            "results_url": f"{base_url}/v1/messages/batches/{self.id}/results" if outcome else None,
        }


class BatchStore:
    """All batches, newest last in insertion order; list pages read it newest first."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.stats = Stats()
        self.cache = PromptCache()
        self._batches: dict[str, Batch] = {}
        # Kept for deleted batches too, so a deleted batch still works as a list cursor.
        self._seq: dict[str, int] = {}
        self._next_seq = 0

    def reset(self) -> None:
        self.stats = Stats()
        self.cache.clear()
        self._batches.clear()
        self._seq.clear()

    def add(self, table: RequestTable, config: EmulatorConfig, meta: BatchMeta | None = None) -> Batch:
        ident = batch_id()
        batch = Batch(ident, self._next_seq, table, self.clock(), config, meta)
        self._next_seq += 1
        self._batches[ident] = batch
        self._seq[ident] = batch.seq
        self._use_cache(batch, config)
        stats = self.stats
        stats.batches_created += 1
        stats.requests_received += len(table)
        stats.note_custom_ids(table.custom_ids)
        kinds = table.kinds
        stats.faults_errored += kinds.count(Kind.API_ERROR) + kinds.count(Kind.OVERLOADED)
        stats.faults_expired += kinds.count(Kind.EXPIRED)
        return batch

    def _use_cache(self, batch: Batch, config: EmulatorConfig) -> None:
        """Decide each cacheable request's reads and writes now, at its own processing time.

        Requests are processed in order, spread over processing_seconds; a write is readable
        cache_visibility_seconds after its request was processed, and at the latest when the batch ends.
        """
        table = batch.table
        if not table.cache_keys:
            return
        end, now = batch.scheduled_end(), self.clock()
        for index, key in table.cache_keys.items():
            at = batch.processed_at(index)
            if at > end:
                break  # expired before it was processed: it neither reads nor writes
            usage = self.cache.use(
                batch.meta.api_key,
                key,
                at=at,
                visible_at=min(at + config.cache_visibility_seconds, end),
                from_batch=True,
                min_tokens=config.cache_min_tokens,
                now=now,
            )
            if usage is not None:
                self.stats.note_cache(usage.read > 0)
                table.cache_usage[index] = usage
                table.input_tokens[index] = max(0, table.input_tokens[index] - usage.tokens)
        # The keys served their purpose; the usage is what results need.
        table.cache_keys.clear()

    def find(self, ident: str) -> Batch | None:
        """The batch, whatever its state (no transient 404): for the emulator's own endpoints."""
        return self._batches.get(ident)

    def forget(self, ident: str) -> Batch | None:
        """Drop a batch as if the API had lost it: afterwards it is unknown everywhere, cursors included."""
        batch = self._batches.pop(ident, None)
        if batch is not None:
            self._seq.pop(ident, None)
            self.stats.batches_forgotten += 1
        return batch

    def queued_requests(self, api_key: str) -> tuple[int, float | None]:
        """Requests of `api_key` in batches not yet ended, and when the soonest of those batches ends."""
        now = self.clock()
        queued, soonest = 0, None
        for batch in self._batches.values():
            if batch.meta.api_key != api_key or batch.outcome(now) is not None:
                continue
            queued += len(batch)
            end = batch.end_time()
            soonest = end if soonest is None else min(soonest, end)
        return queued, soonest

    def lookup(self, ident: str) -> Batch:
        """The batch, or 404: unknown, deleted, or still inside its transient-404 window."""
        batch = self._batches.get(ident)
        if batch is None:
            raise not_found(f"No message batch with id {ident!r}.")
        if self.clock() < batch.visible_from:
            self.stats.faults_transient_404 += 1
            raise not_found(f"No message batch with id {ident!r}.")
        return batch

    def delete(self, batch: Batch) -> None:
        if batch.outcome(self.clock()) is None:
            raise ApiError(
                400,
                "invalid_request_error",
                f"Message batch {batch.id} is still {batch.status(self.clock())}; "
                "only a batch that has ended can be deleted (cancel it first).",
            )
        del self._batches[batch.id]
        self.stats.batches_deleted += 1

    def page(self, limit: int, after_id: str | None, before_id: str | None) -> tuple[list[Batch], bool]:
        """One list page in list order (newest first) and whether more lie beyond it."""
        newest_first = list(reversed(self._batches.values()))
        if before_id is not None:
            cursor = self._cursor("before_id", before_id)
            # The `limit` batches immediately preceding the cursor (newer than it), still newest first.
            newer = [b for b in newest_first if b.seq > cursor]
            return newer[max(0, len(newer) - limit) :], len(newer) > limit
        if after_id is not None:
            cursor = self._cursor("after_id", after_id)
            newest_first = [b for b in newest_first if b.seq < cursor]
        return newest_first[:limit], len(newest_first) > limit

    def _cursor(self, name: str, ident: str) -> int:
        seq = self._seq.get(ident)
        if seq is None:
            raise ApiError(400, "invalid_request_error", f"{name}: no message batch with id {ident!r}")
        return seq

    def open_batches(self) -> int:
        now = self.clock()
        return sum(1 for b in self._batches.values() if b.outcome(now) is None)
