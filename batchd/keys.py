"""Every Redis key batchd uses, in one place (the schema; see docs/design.md).

Control keys share the ``{prefix}`` hash tag so the Lua scripts that touch several of them stay in one slot;
reply keys are tagged by request id. batchd (like arq) does not support Redis Cluster; the tags keep the
layout honest should that change.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CONSUMER_GROUP", "Keys", "custom_id_for", "split_custom_id"]

CONSUMER_GROUP = "acc"


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "batchd"

    @property
    def tag(self) -> str:
        return "{" + self.prefix + "}"

    # --- intake -------------------------------------------------------------------------------------------
    @property
    def intake(self) -> str:
        """Stream of queued requests: fields rid, cid (custom id of this attempt), n (params bytes)."""
        return f"{self.tag}:intake"

    @property
    def queue_stats(self) -> str:
        """Hash: n, bytes of requests queued and not yet flushed (backpressure and status read it)."""
        return f"{self.tag}:queued"

    def request(self, rid: str) -> str:
        """Hash: body, n, state, attempts, enq (ms), fid, batch, cancel."""
        return f"{self.tag}:req:{rid}"

    # --- flushes and batches ------------------------------------------------------------------------------
    def flush(self, fid: str) -> str:
        """Hash: state (building|sealed|submitting|submitted|failed), n, bytes, trigger, created, batch."""
        return f"{self.tag}:flush:{fid}"

    def flush_rids(self, fid: str) -> str:
        """List of the flush's request ids, in order."""
        return f"{self.tag}:flush:{fid}:rids"

    @property
    def flushes(self) -> str:
        """Zset fid -> created (ms): every flush not yet submitted or failed; the reconciler walks it."""
        return f"{self.tag}:flushes"

    @property
    def recent_flushes(self) -> str:
        """Capped list of JSON summaries of recent flushes (for ``batchd status``)."""
        return f"{self.tag}:flushes:recent"

    @property
    def open_batches(self) -> str:
        """Zset batch id -> created (ms) of batches not yet fanned out."""
        return f"{self.tag}:batches:open"

    def batch(self, batch_id: str) -> str:
        """Hash: fid, n, created, cursor (fan-out checkpoint: lines delivered), status."""
        return f"{self.tag}:batch:{batch_id}"

    @property
    def known_batches(self) -> str:
        """Zset batch id -> created (ms) of every batch batchd recorded or adopted (orphan detection)."""
        return f"{self.tag}:batches:known"

    # --- replies ------------------------------------------------------------------------------------------
    def result(self, rid: str) -> str:
        """String: one results line as JSON ({"custom_id":..., "result":...}), with the result TTL."""
        return f"{self.prefix}:res:{{{rid}}}"

    @property
    def delivered_channel(self) -> str:
        """Pub/sub channel: every delivered request id, so one subscriber per process wakes its waiters."""
        return f"{self.tag}:delivered"

    # --- daemon bookkeeping -------------------------------------------------------------------------------
    @property
    def replicas(self) -> str:
        """Zset consumer name -> last heartbeat (ms)."""
        return f"{self.tag}:replicas"

    @property
    def metrics_leader(self) -> str:
        """Lease: the one replica that exports the queue gauges read from Redis (no double counting)."""
        return f"{self.tag}:lease:metrics"

    @property
    def create_lock(self) -> str:
        """Held around each batches.create: at most one create in flight, so an orphan is attributable."""
        return f"{self.tag}:lock:create"

    @property
    def create_inflight(self) -> str:
        """The flush whose create may have reached the API without being recorded (set before the POST,
        cleared once its outcome is known). Creates are serialised, so there is at most one."""
        return f"{self.tag}:create:inflight"

    @property
    def reconcile_lock(self) -> str:
        return f"{self.tag}:lock:reconcile"

    @property
    def arq_queue(self) -> str:
        """arq's queue name; arq derives its own job keys from it."""
        return f"{self.tag}:arq"


def custom_id_for(rid: str, attempt: int) -> str:
    """The custom_id of one attempt: a fresh one per attempt, so no custom_id is ever sent twice."""
    return f"{rid}-{attempt}"


def split_custom_id(custom_id: str) -> tuple[str, int]:
    """Inverse of custom_id_for. Raises ValueError on anything batchd did not make."""
    rid, sep, attempt = custom_id.rpartition("-")
    if not sep or not rid or not (attempt.isascii() and attempt.isdigit()):
        raise ValueError(f"not a batchd custom_id: {custom_id!r}")
    return rid, int(attempt)
