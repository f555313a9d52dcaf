"""(d) Waiter memory and connections: 10,000 concurrent ``result()`` waiters in one process.

Each variant runs in a fresh child process so its RSS is its own:

* batchd: one ``AsyncClient``; 10,000 queued requests; 10,000 tasks each awaiting ``client.result(rid)``.
  Measured once every waiter is registered: the process's Redis connections (CLIENT LIST) and its RSS
  growth; then every result is delivered the way the deliver script does it (SET + PUBLISH), and the time
  until the last waiter returns is taken.
* reference: 10,000 tasks each awaiting a bare ``asyncio`` future, then the same wake-up of all of them.

    python -m benchmarks.bench_waiters [--waiters 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import time
from typing import Any

import orjson
import redis.asyncio as aioredis

from ._common import describe_machine, out, params, private_redis, rss_bytes, table

ADMIN = "bench-admin"


def _line(rid: str) -> bytes:
    return orjson.dumps(
        {
            "custom_id": f"{rid}-1",
            "result": {
                "type": "succeeded",
                "message": {
                    "id": "msg_0",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-haiku-4-5",
                    "content": [{"type": "text", "text": "ok"}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": {"input_tokens": 1, "output_tokens": 1},
                },
            },
        }
    )


async def _connections(admin: aioredis.Redis) -> int:
    return sum(1 for c in await admin.client_list() if c.get("name") != ADMIN)


async def child_batchd(url: str, n: int) -> dict[str, float]:
    from batchd import AsyncClient
    from batchd.settings import load_settings

    async with aioredis.Redis.from_url(url, client_name=ADMIN) as admin:
        await admin.flushall()
        client = AsyncClient(settings=load_settings(redis_url=url))
        rids = await client.submit_many([params(i) for i in range(n)])
        gc.collect()
        before_rss = rss_bytes()
        before_conns = await _connections(admin)
        started = time.perf_counter()
        tasks = [asyncio.create_task(client.result(rid, timeout=600)) for rid in rids]
        peak_conns = before_conns
        deadline = time.monotonic() + 120
        while client._waiter.waiting < n:  # sample the connection count while the waiters pile up
            if time.monotonic() > deadline:
                raise TimeoutError("waiters did not all register")
            peak_conns = max(peak_conns, await _connections(admin))
            await asyncio.sleep(0.01)
        registered = time.perf_counter() - started
        gc.collect()
        rss = rss_bytes() - before_rss
        conns = await _connections(admin)
        peak_conns = max(peak_conns, conns)
        started = time.perf_counter()
        keys = client.keys
        for start in range(0, n, 1000):
            async with admin.pipeline(transaction=False) as pipe:
                for rid in rids[start : start + 1000]:
                    pipe.set(keys.result(rid), _line(rid), ex=3600)
                    pipe.publish(keys.delivered_channel, rid)
                await pipe.execute()
        results = await asyncio.gather(*tasks)
        woken = time.perf_counter() - started
        assert all(r.type == "succeeded" for r in results)
        await client.close()
    return {
        "rss": rss,
        "conns": conns,
        "peak_conns": peak_conns,
        "conns_before": before_conns,
        "register_s": registered,
        "wake_s": woken,
    }


async def child_futures(n: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    gc.collect()
    before_rss = rss_bytes()
    started = time.perf_counter()
    futures = [loop.create_future() for _ in range(n)]

    async def wait(f: asyncio.Future[bytes]) -> bytes:
        return await f

    tasks = [asyncio.create_task(wait(f)) for f in futures]
    await asyncio.sleep(0)  # every task runs up to its await
    registered = time.perf_counter() - started
    gc.collect()
    rss = rss_bytes() - before_rss
    started = time.perf_counter()
    for f in futures:
        f.set_result(b"ok")
    await asyncio.gather(*tasks)
    woken = time.perf_counter() - started
    return {
        "rss": rss,
        "conns": 0,
        "peak_conns": 0,
        "conns_before": 0,
        "register_s": registered,
        "wake_s": woken,
    }


def run_child(variant: str, url: str, n: int) -> dict[str, float]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench_waiters",
            "--child",
            variant,
            "--url",
            url,
            "--waiters",
            str(n),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} child failed:\n{proc.stderr}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main(n: int) -> None:
    with private_redis() as server:
        b = run_child("batchd", server.url, n)
        f = run_child("futures", server.url, n)
    out(describe_machine())
    out(f"{n:,} concurrent waiters in one process (each variant in a fresh child process)")
    rows: list[list[Any]] = [
        ["Redis connections while waiting", int(b["conns"]), "-", "-"],
        ["Redis connections, peak sampled", int(b["peak_conns"]), "-", "-"],
        ["RSS growth, MB", b["rss"] / 1e6, f["rss"] / 1e6, b["rss"] / max(f["rss"], 1)],
        ["RSS per waiter, bytes", b["rss"] / n, f["rss"] / n, b["rss"] / max(f["rss"], 1)],
        [
            "time to register all, ms",
            b["register_s"] * 1000,
            f["register_s"] * 1000,
            b["register_s"] / f["register_s"],
        ],
        ["time to wake all, ms", b["wake_s"] * 1000, f["wake_s"] * 1000, b["wake_s"] / f["wake_s"]],
    ]
    out(table("waiters: batchd result() vs bare futures", ["measure", "batchd", "futures", "ratio"], rows))
    out(
        f"(connections before the waiters started: {int(b['conns_before'])}; "
        "batchd's wake-up includes SET+PUBLISH of every result and parsing each into the SDK's type)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--waiters", type=int, default=10_000)
    parser.add_argument("--child", choices=("batchd", "futures"), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child == "batchd":
        print(json.dumps(asyncio.run(child_batchd(a.url, a.waiters))))
    elif a.child == "futures":
        print(json.dumps(asyncio.run(child_futures(a.waiters))))
    else:
        main(a.waiters)
