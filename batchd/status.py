"""``batchd status``: what the shared queue and the replicas look like right now, read from Redis."""

from __future__ import annotations

import time
from typing import Any

from .store import Store

__all__ = ["collect_status", "format_status"]

_MAX_OPEN_SHOWN = 100
_RECENT_SHOWN = 20


async def collect_status(store: Store, *, queue_limit: int, dead_after_s: float = 10.0) -> dict[str, Any]:
    snap = await store.snapshot(dead_after_ms=int(dead_after_s * 1000))
    now_ms = snap.at_ms
    open_batches = []
    for batch_id in await store.open_batch_ids(limit=_MAX_OPEN_SHOWN):
        record = await store.batch(batch_id)
        if record is None:
            continue
        open_batches.append(
            {
                "batch_id": batch_id,
                "requests": record.requests,
                "age_seconds": round((now_ms - record.created_ms) / 1000, 1),
                "polls": record.polls,
                "lines_delivered": record.cursor,
            }
        )
    replicas = []
    statuses = await store.replica_statuses(list(snap.replicas))
    for name, beat in snap.replicas.items():
        age = (now_ms - beat) / 1000
        entry: dict[str, Any] = {
            "name": name,
            "last_seen_seconds": round(age, 1),
            "alive": age < dead_after_s,
        }
        said = statuses.get(name)
        if said is not None:
            entry["api"] = {
                "healthy": said.get("api_healthy") == "1",
                "failing_seconds": int(said.get("api_failing_s") or 0),
                "last_error": said.get("api_error", ""),
            }
        replicas.append(entry)
    policy = await store.maxmemory_policy()
    oldest = snap.oldest_age_seconds
    return {
        "queue": {
            "requests": snap.pending_requests,
            "bytes": snap.pending_bytes,
            "oldest_age_seconds": None if oldest is None else round(oldest, 3),
            "read_not_flushed": snap.read_not_flushed,
        },
        "flushes_waiting_for_submit": snap.flushes_waiting,
        # Routed requests (realtime, or auto with a deadline) the real-time sender has not answered yet.
        "routed_requests": snap.routed_requests,
        # Why flushes may wait: the API's processing queue (its cap per tier) is full of batchd's requests.
        "api_queue": {
            "requests": snap.open_requests,
            "limit": queue_limit,
            "held_by_queue_cap": snap.held_by_queue_cap,
        },
        "open_batches": {"count": snap.open_batches, "batches": open_batches},
        "recent_flushes": [f.as_dict() for f in await store.recent_flushes(_RECENT_SHOWN)],
        "replicas": replicas,
        # An evicting policy drops queued work silently: the daemon refuses it unless told otherwise.
        "redis": {"maxmemory_policy": policy, "evicting": policy != "noeviction"},
    }


def format_status(status: dict[str, Any]) -> str:
    q = status["queue"]
    api = status["api_queue"]
    oldest = "-" if q["oldest_age_seconds"] is None else f"{q['oldest_age_seconds']:.1f}s"
    lines = [
        f"queue:         {q['requests']} requests, {q['bytes']} bytes, oldest {oldest} "
        f"({q['read_not_flushed']} read by a replica, not yet flushed)",
        f"flushes:       {status['flushes_waiting_for_submit']} waiting to be submitted",
        f"routed:        {status['routed_requests']} requests waiting for real time or their deadline",
        f"api queue:     {api['requests']} of {api['limit']} requests"
        + ("  HELD: flushes wait for room in the API's queue" if api["held_by_queue_cap"] else ""),
        f"open batches:  {status['open_batches']['count']}",
    ]
    for b in status["open_batches"]["batches"]:
        lines.append(
            f"  {b['batch_id']}  {b['requests']} requests  age {b['age_seconds']}s  polls {b['polls']}"
        )
    lines.append(f"recent flushes ({len(status['recent_flushes'])}):")
    for f in status["recent_flushes"]:
        at = time.strftime("%H:%M:%S", time.localtime(f["at"] / 1000))
        lines.append(
            f"  {at}  {f['batch']}  {f['requests']} requests  {f['bytes']} bytes  trigger={f['trigger']}"
        )
    lines.append(f"replicas ({sum(r['alive'] for r in status['replicas'])} alive):")
    for r in status["replicas"]:
        state = "alive" if r["alive"] else "stopped"
        api = r.get("api")
        if api is not None and not api["healthy"]:
            state += f"; ANTHROPIC API FAILING for {api['failing_seconds']}s ({api['last_error']})"
        lines.append(f"  {r['name']}  {state}, last seen {r['last_seen_seconds']}s ago")
    redis = status["redis"]
    warning = "  WARNING: evicting, queued work can be lost" if redis["evicting"] else ""
    lines.append(f"redis:         maxmemory-policy {redis['maxmemory_policy']}{warning}")
    return "\n".join(lines)
