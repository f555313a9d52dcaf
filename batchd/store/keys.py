"""Every Redis key batchd uses, in one place (the key table in docs/design.md mirrors it).

Control keys share the ``{prefix}`` hash tag so the Lua scripts that touch several of them stay in one slot;
reply keys are tagged by request id. batchd (like arq) does not support Redis Cluster; the tags keep the
layout honest should that change. arq's own keys live under ``{prefix}:arq:`` (see ``batchd/jobs.py``), so
every key of a deployment starts with ``{prefix}:`` or ``prefix:res:`` and two deployments with different
prefixes share one Redis without meeting.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CONSUMER_GROUP", "SCHEMA_VERSION", "Keys", "custom_id_for", "split_custom_id"]

CONSUMER_GROUP = "acc"
# The layout of the keys and records below. Bumped when a field or key changes meaning, so a daemon never
# reads another version's data as its own (see Store.check_schema).
SCHEMA_VERSION = 3


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "batchd"

    @property
    def tag(self) -> str:
        return "{" + self.prefix + "}"

    def owns(self, key: str) -> bool:
        """Whether ``key`` belongs to this deployment."""
        return key.startswith(self.tag + ":") or key.startswith(self.prefix + ":res:")

    @property
    def schema(self) -> str:
        """String: SCHEMA_VERSION of the data under this prefix."""
        return f"{self.tag}:schema"

    # --- intake -------------------------------------------------------------------------------------------
    @property
    def intake(self) -> str:
        """Stream of queued requests: fields rid, cid (custom id of this attempt), bytes (params bytes)."""
        return f"{self.tag}:intake"

    @property
    def queue_stats(self) -> str:
        """Hash: requests, bytes queued and not yet flushed (backpressure and status read it)."""
        return f"{self.tag}:queued"

    @property
    def groups(self) -> str:
        """Hash: BatchHeaders.key -> BatchHeaders JSON, for every group of headers requests were sent with."""
        return f"{self.tag}:groups"

    def request(self, rid: str) -> str:
        """Hash: a RequestRecord plus ``body`` (the params JSON, until answered)."""
        return f"{self.tag}:req:{rid}"

    def request_field(self, field: str) -> str:
        """``SORT ... GET`` pattern of a field of the request hash named by each element (a request id): the
        prefix cannot hold ``*`` or ``->`` (see Settings.key_prefix)."""
        return f"{self.tag}:req:*->{field}"

    @property
    def tag_sets(self) -> str:
        """Hash: TagSet.id -> TagSet.canonical, for every tag set requests were sent with."""
        return f"{self.tag}:tagsets"

    def dedupe(self, digest: str) -> str:
        """Hash: the request answering every deduped request with this digest (``rid``, its ``req`` and
        ``res`` keys), the callers following it (``f:<rid>``), and once it succeeded ``ok``, ``std``
        (pico-USD) and ``model``, kept for the dedupe window."""
        return f"{self.tag}:dedupe:{digest}"

    def prefix_state(self, prefix: str) -> str:
        """String: "p" while a primer of this prompt-cache prefix is in flight, "w" (warm) for the prefix's
        TTL after one of its requests was answered."""
        return f"{self.tag}:prefix:{prefix}"

    # --- spend --------------------------------------------------------------------------------------------
    def ledger(self, day: str) -> str:
        """Hash: one UTC day's costs, ``<model>|<tag set id>|<metric>`` -> integer (tokens, pico-USD)."""
        return f"{self.tag}:ledger:{day}"

    @property
    def ledger_days(self) -> str:
        """Zset day -> YYYYMMDD of every day the ledger has."""
        return f"{self.tag}:ledger:days"

    def budget(self, day: str) -> str:
        """Hash: what one UTC day has spent or reserved (pico-USD), per scope: "*" and each ``key=value``."""
        return f"{self.tag}:budget:{day}"

    def billed(self, batch_id: str) -> str:
        """Set: the custom ids of this batch already charged to the ledger (deleted once it is fanned out)."""
        return f"{self.tag}:batch:{batch_id}:billed"

    # --- routing -----------------------------------------------------------------------------------------
    @property
    def deadlines(self) -> str:
        """Zset: rid -> when (ms) the daemon sends it through the real-time API (see records.Route); a
        claimed one is pushed back by a lease's length, so a replica that dies mid-call is taken over."""
        return f"{self.tag}:deadlines"

    def realtime_lease(self, rid: str) -> str:
        """Held by the replica making a request's real-time call, renewed by its heartbeat."""
        return f"{self.tag}:lease:rt:{rid}"

    # --- flushes and batches ------------------------------------------------------------------------------
    def flush(self, fid: str) -> str:
        """Hash: a FlushRecord."""
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
        """Capped list of FlushSummary JSON, newest first (for ``batchd status`` and the demo)."""
        return f"{self.tag}:flushes:recent"

    @property
    def open_batches(self) -> str:
        """Zset batch id -> created (ms) of batches not yet fanned out."""
        return f"{self.tag}:batches:open"

    def batch(self, batch_id: str) -> str:
        """Hash: a BatchRecord."""
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
    def result_parts(self) -> tuple[str, str]:
        """What comes before and after the rid in a result key: scripts that build a chunk's result keys
        from its rids take these once a call."""
        head, _, tail = self.result("\0").partition("\0")
        return head, tail

    @property
    def replication_barrier(self) -> str:
        """Pub/sub channel of the barrier a submit sends before WAIT (redis_min_replicas_ack): it brings the
        connection's replication offset to the primary's current one (see connection.require_replicas)."""
        return f"{self.tag}:replication-barrier"

    @property
    def delivered_channel(self) -> str:
        """Pub/sub channel: every delivered request id, so one subscriber per process wakes its waiters."""
        return f"{self.tag}:delivered"

    @property
    def realtime_wake(self) -> str:
        """Pub/sub channel: a request was listed (or listed again) in the deadlines zset, so each replica's
        real-time sender looks at once rather than at its next safety look."""
        return f"{self.tag}:realtime-wake"

    # --- the API's limits ----------------------------------------------------------------------------------
    @property
    def api_window(self) -> str:
        """Zset: the API calls of the last minute (the shared requests-per-minute budget)."""
        return f"{self.tag}:api:window"

    @property
    def open_requests(self) -> str:
        """Counter: requests in batches created and not yet fanned out (against the API's queue cap)."""
        return f"{self.tag}:batches:open_requests"

    @property
    def held_by_queue_cap(self) -> str:
        """String (expiring): set while creates wait for room in the API's queue, for status."""
        return f"{self.tag}:held:queue_cap"

    @property
    def poller_lease(self) -> str:
        """Lease: the one replica that polls the open batches."""
        return f"{self.tag}:lease:poller"

    # --- daemon bookkeeping -------------------------------------------------------------------------------
    @property
    def replicas(self) -> str:
        """Zset consumer name -> last heartbeat (ms)."""
        return f"{self.tag}:replicas"

    def replica_owner(self, name: str) -> str:
        """Lease: which process runs as replica ``name`` (boot id, pid, token), so two never share a name."""
        return f"{self.tag}:replica:{name}"

    def replica_status(self, name: str) -> str:
        """Hash: what replica ``name`` last said of itself (the API's health as it sees it), for status."""
        return f"{self.tag}:replica:{name}:status"

    def replica_jobs(self, name: str) -> str:
        """Set of the arq job ids replica ``name`` is running (renewed with its job leases)."""
        return f"{self.tag}:replica:{name}:jobs"

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

    # --- arq ----------------------------------------------------------------------------------------------
    @property
    def arq_namespace(self) -> str:
        """What replaces arq's hard-coded ``arq:`` key prefix (job, in-progress, retry, result keys)."""
        return f"{self.tag}:arq:"

    @property
    def arq_queue(self) -> str:
        """arq's queue (a zset of job ids); its health-check key is derived from it."""
        return f"{self.tag}:arq:queue"


def custom_id_for(rid: str, attempt: int) -> str:
    """The custom_id of one attempt: a fresh one per attempt, so no custom_id is ever sent twice."""
    return f"{rid}-{attempt}"


def split_custom_id(custom_id: str) -> tuple[str, int]:
    """Inverse of custom_id_for. Raises ValueError on anything batchd did not make."""
    rid, sep, attempt = custom_id.rpartition("-")
    if not sep or not rid or not (attempt.isascii() and attempt.isdigit()):
        raise ValueError(f"not a batchd custom_id: {custom_id!r}")
    return rid, int(attempt)
