"""Two deployments on one Redis, told apart only by BATCHD_KEY_PREFIX, plus ``batchd demo --redis-url`` on the
same Redis: each answers all of its own requests, and every key in Redis belongs to exactly one of them
(arq's queue, job, in-progress, retry and cron keys included)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from batchd import AsyncClient
from batchd.settings import Settings
from batchd.store import Keys
from tests.daemon_harness import running_daemon
from tests.integration.test_cli import batchd_cli, clean_env


def params(text: str) -> dict[str, Any]:
    return {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": text}]}


async def ask(settings: Settings, label: str, n: int) -> list[str]:
    async with AsyncClient(settings=settings) as client:
        rids = await client.submit_many([params(f"{label} {i}") for i in range(n)])
        results = await asyncio.gather(*(client.result(rid, timeout=60) for rid in rids))
    return [r.message.content[0].text for r in results if r.type == "succeeded"]  # type: ignore[union-attr]


async def test_two_prefixes_and_the_demo_share_one_redis_without_meeting(
    make_settings: Callable[..., Settings], emulator: Any, redis_url: str, aredis: aioredis.Redis
) -> None:
    alpha = make_settings(emulator=True, key_prefix="alpha", max_batch_age_seconds=0.2)
    beta = make_settings(emulator=True, key_prefix="beta", max_batch_age_seconds=0.2)
    async with running_daemon(alpha, consumer="alpha-1"), running_daemon(beta, consumer="beta-1"):
        demo, answers_alpha, answers_beta = await asyncio.gather(
            batchd_cli("demo", "--requests", "60", "--redis-url", redis_url, env=clean_env(), timeout=120),
            ask(alpha, "alpha", 40),
            ask(beta, "beta", 40),
        )
        # Once more, after the demo's daemon has gone: the two deployments still run their own crons.
        again = await ask(alpha, "alpha again", 5)
        keys = [k.decode() async for k in aredis.scan_iter(count=1000)]
    assert demo.code == 0, demo.err
    assert "every caller got its own answer: yes" in demo.out
    assert answers_alpha == [f"echo: alpha {i}" for i in range(40)]
    assert answers_beta == [f"echo: beta {i}" for i in range(40)]
    assert again == [f"echo: alpha again {i}" for i in range(5)]

    demo_tags = {m.group(1) for k in keys if (m := re.match(r"\{(batchd-demo-[0-9a-f]+)\}:", k))}
    assert len(demo_tags) == 1, demo_tags
    owners = [Keys("alpha"), Keys("beta"), Keys(demo_tags.pop())]
    for owner in owners:
        assert any(owner.owns(k) for k in keys), f"no key of {owner.prefix}"
    for running in owners[:2]:
        assert any(k.startswith(running.arq_namespace) for k in keys), f"no arq key under {running.prefix}"
    stray = [k for k in keys if sum(owner.owns(k) for owner in owners) != 1]
    assert not stray, f"keys that belong to no deployment, or to several: {sorted(stray)[:10]}"
