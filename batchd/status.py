"""``batchd status``: what the shared queue and the replicas look like right now, read from Redis."""

from __future__ import annotations

import time
from typing import Any

import orjson

from .keys import CONSUMER_GROUP, Keys

__all__ = ["collect_status", "format_status"]

_MAX_OPEN_SHOWN = 100


async def collect_status(redis: Any, keys: Keys, *, dead_after_s: float = 10.0) -> dict[str, Any]:
    now_ms = int(time.time() * 1000)
    n, nbytes = await redis.hmget(keys.queue_stats, "n", "bytes")
    first = await redis.xrange(keys.intake, "-", "+", count=1)
    oldest = None
    if first and int(n or 0) > 0:
        oldest = round((now_ms - int(_text(first[0][0]).split("-", 1)[0])) / 1000, 3)
    open_ids = [_text(b) for b in await redis.zrange(keys.open_batches, 0, _MAX_OPEN_SHOWN - 1)]
    open_batches = []
    for batch_id in open_ids:
        record = {_text(k): _text(v) for k, v in (await redis.hgetall(keys.batch(batch_id))).items()}
        created = int(record.get("created", now_ms))
        open_batches.append(
            {
                "batch_id": batch_id,
                "requests": int(record.get("n", 0)),
                "age_seconds": round((now_ms - created) / 1000, 1),
                "polls": int(record.get("polls", 0)),
                "lines_delivered": int(record.get("cursor", 0)),
            }
        )
    recent = [orjson.loads(raw) for raw in await redis.lrange(keys.recent_flushes, 0, 19)]
    replicas = []
    for name, score in await redis.zrange(keys.replicas, 0, -1, withscores=True):
        age = (now_ms - int(score)) / 1000
        replicas.append(
            {"name": _text(name), "last_seen_seconds": round(age, 1), "alive": age < dead_after_s}
        )
    pending_flushes = await redis.zcard(keys.flushes)
    group_pending = 0
    try:
        groups = await redis.xinfo_groups(keys.intake)
        group_pending = sum(
            int(g.get("pending", 0)) for g in groups if _text(g.get("name")) == CONSUMER_GROUP
        )
    except Exception:
        group_pending = 0
    return {
        "queue": {
            "requests": int(n or 0),
            "bytes": int(nbytes or 0),
            "oldest_age_seconds": oldest,
            "read_not_flushed": group_pending,
        },
        "flushes_waiting_for_submit": int(pending_flushes),
        "open_batches": {"count": int(await redis.zcard(keys.open_batches)), "batches": open_batches},
        "recent_flushes": recent,
        "replicas": replicas,
    }


def format_status(status: dict[str, Any]) -> str:
    q = status["queue"]
    oldest = "-" if q["oldest_age_seconds"] is None else f"{q['oldest_age_seconds']:.1f}s"
    lines = [
        f"queue:         {q['requests']} requests, {q['bytes']} bytes, oldest {oldest} "
        f"({q['read_not_flushed']} read by a replica, not yet flushed)",
        f"flushes:       {status['flushes_waiting_for_submit']} waiting to be submitted",
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
        lines.append(f"  {r['name']}  {state}, last seen {r['last_seen_seconds']}s ago")
    return "\n".join(lines)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
