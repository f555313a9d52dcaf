"""submit_*: ``AsyncClient.submit_many`` against raw redis-py pipelines of the same bodies; single
``submit``'s round trips.

Two raw references, each pipelined in chunks of 500 (the client's own chunk size, so every side makes the
same number of round trips), alternating with batchd's side, best of N:

* the writes a submit must make, without batchd: per request an ``EXISTS`` of its record and result keys
  (a retried submit must not queue it twice), an ``HSET`` of the request record batchd keeps (the same
  fields: the body, its size, digest, state, attempts, time, estimate, its day) and an ``XADD`` of the same
  intake entry (rid, custom id, size). ``submit_many_rate`` is measured against this;
* the least an application could do to queue the same bytes: ``orjson.dumps`` the params and ``XADD`` them
  with a random id (``submit_many_vs_xadd``, informational: a submit that keeps no record of its request
  cannot answer it, and the record's 8-field ``HSET`` alone costs Redis about twice a 2-field ``XADD``).

batchd's side validates every request as the API would, and its one Lua call per chunk checks the caps,
idempotency and budgets, and writes the request record, the stream entry and the totals.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection

from batchd import AsyncClient

from ._common import Env, Row, at_least, at_most, params, percentiles

CHUNK = 500


@contextmanager
def counting_round_trips() -> Iterator[list[int]]:
    """Count what this process sends to Redis: one ``send_packed_command`` is one round trip (a pipeline
    sends all its commands at once)."""
    count = [0]
    original = AbstractConnection.send_packed_command

    async def counted(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        count[0] += 1
        await original(self, command, check_health)

    AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
    try:
        yield count
    finally:
        AbstractConnection.send_packed_command = original  # type: ignore[method-assign]


async def _batchd_many(env: Env, bodies: list[dict[str, Any]]) -> float:
    async with aioredis.Redis.from_url(env.redis_url) as admin, AsyncClient(settings=env.settings()) as c:
        await admin.flushall()
        await c.ping()
        started = time.perf_counter()
        await c.submit_many(bodies)
        return time.perf_counter() - started


async def _raw_many(env: Env, bodies: list[dict[str, Any]]) -> float:
    async with aioredis.Redis.from_url(env.redis_url) as r:
        await r.flushall()
        await r.ping()
        started = time.perf_counter()
        for start in range(0, len(bodies), CHUNK):
            async with r.pipeline(transaction=False) as pipe:
                for p in bodies[start : start + CHUNK]:
                    pipe.xadd("ref:intake", {"rid": secrets.token_urlsafe(16), "body": orjson.dumps(p)})
                await pipe.execute()
        return time.perf_counter() - started


async def _writes_many(env: Env, bodies: list[dict[str, Any]]) -> float:
    """The writes a submit must make, raw (see the module's docstring): what batchd's Lua does per request."""
    async with aioredis.Redis.from_url(env.redis_url) as r:
        await r.flushall()
        await r.ping()
        started = time.perf_counter()
        now = str(int(time.time() * 1000))
        for start in range(0, len(bodies), CHUNK):
            async with r.pipeline(transaction=False) as pipe:
                for p in bodies[start : start + CHUNK]:
                    rid = secrets.token_urlsafe(16)
                    body = orjson.dumps(p)
                    req, res = f"ref:req:{{{rid}}}", f"ref:res:{{{rid}}}"
                    pipe.exists(req, res)
                    pipe.hset(
                        req,
                        mapping={
                            "body": body,
                            "bytes": len(body),
                            "digest": hashlib.blake2b(body, digest_size=16).hexdigest(),
                            "state": "queued",
                            "attempts": 1,
                            "enq": now,
                            "est": 1234567,
                            "bday": "2026-11-30",
                        },
                    )
                    pipe.xadd("ref:intake", {"rid": rid, "cid": f"{rid}-1", "bytes": len(body)})
                await pipe.execute()
        return time.perf_counter() - started


async def _single(env: Env, bodies: list[dict[str, Any]]) -> tuple[list[float], list[float], float]:
    """Sequential single submits and raw XADDs; and the round trips per submit."""
    async with aioredis.Redis.from_url(env.redis_url) as r, AsyncClient(settings=env.settings()) as c:
        await r.flushall()
        await c.submit(bodies[0])  # load the script, open the connection
        await r.ping()
        batchd_times, raw_times = [], []
        with counting_round_trips() as trips:
            for p in bodies:
                started = time.perf_counter()
                await c.submit(p)
                batchd_times.append(time.perf_counter() - started)
            per_submit = trips[0] / len(bodies)
        for p in bodies:
            started = time.perf_counter()
            await r.xadd("ref:intake", {"rid": secrets.token_urlsafe(16), "body": orjson.dumps(p)})
            raw_times.append(time.perf_counter() - started)
    return batchd_times, raw_times, per_submit


async def run(env: Env) -> list[Row]:
    n, single, reps = (20_000, 1_000, 3) if env.quick else (100_000, 5_000, 5)
    bodies = [params(i) for i in range(n)]
    many_b, many_w, many_r = [], [], []
    for _ in range(reps):  # alternate, so drift on a noisy machine hits every side alike
        many_b.append(await _batchd_many(env, bodies))
        many_w.append(await _writes_many(env, bodies))
        many_r.append(await _raw_many(env, bodies))
    one_b, one_r, trips = await _single(env, bodies[:single])
    pb, pr = percentiles(one_b), percentiles(one_r)
    return [
        at_least("submit_many_rate", n / min(many_b), "req/s", reference=n / min(many_w), min_ratio=0.7),
        at_least("submit_many_vs_xadd", n / min(many_b), "req/s", reference=n / min(many_r), min_ratio=None),
        at_most("submit_single_round_trips", trips, "trips", limit=1.0),
        at_most("submit_single_p50", pb["p50"] * 1e6, "us", limit=None, reference=pr["p50"] * 1e6),
        at_most("submit_single_p99", pb["p99"] * 1e6, "us", limit=None, reference=pr["p99"] * 1e6),
    ]
