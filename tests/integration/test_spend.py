"""Spend, end to end on the private redis-server, real daemons and the emulator: the ledger against the
emulator's own usage priced by hand (faults, re-downloads and a late cancel included), budgets with two
replicas and two clients racing, the front's 429, and dedupe across a killed and rerun script."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest
from pydantic import SecretStr

from batchd import AsyncClient, BudgetExceeded
from batchd.backend import ClientBackend
from batchd.front import FrontConfig, serve_front
from batchd.ledger import estimate
from batchd.promptcache import cache_prefix
from batchd.settings import Settings
from batchd.store import RequestState, Store, now_ms, utc_day
from tests.daemon_harness import running_daemon
from tests.eventually import eventually
from tests.integration.test_cli import batchd_cli, clean_env

MODEL = "claude-haiku-4-5"
# Haiku 4.5 at batch prices, USD per token: the reference's table, by hand.
INPUT, OUTPUT = 0.50 / 1e6, 2.50 / 1e6
TOKEN = "tok-spend-test-0123456789"


def params(text: str, max_tokens: int = 32) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]}


async def costs(redis_url: str, *args: str) -> dict[str, Any]:
    """What ``batchd costs --json ARGS`` prints, run as the command it is."""
    ran = await batchd_cli("costs", "--json", *args, env=clean_env(BATCHD_REDIS_URL=redis_url))
    assert ran.code == 0, ran.err
    report: dict[str, Any] = json.loads(ran.out)
    return report


def emulator_usage(emulator: Any) -> list[dict[str, Any]]:
    """The usage of every succeeded line of every batch on the emulator: what the API billed."""
    usages = []
    with anthropic.Anthropic(base_url=emulator.base_url, api_key="test-key") as api:
        for batch in api.messages.batches.list(limit=1000):
            for line in api.messages.batches.results(batch.id):
                if line.result.type == "succeeded":
                    usages.append(line.result.message.usage.model_dump())
    return usages


async def test_costs_match_the_emulators_usage_priced_by_hand(
    make_settings: Callable[..., Settings],
    emulator: Any,
    store: Store,
) -> None:
    # Retried requests (errored and expired lines) and cut downloads (lines delivered again) must not count
    # twice; a request canceled after its flush is billed by the API and must count once, as undelivered.
    emulator.configure(processing_seconds=1.0)
    settings = make_settings(emulator=True, max_batch_age_seconds=0.3)
    async with running_daemon(settings), AsyncClient(settings=settings) as client:
        late = await client.submit(params("canceled once in a batch"), "late", tags={"team": "ads"})
        await eventually(lambda: _created(emulator), what="its batch to be created")
        assert await _flushed(store, late)
        assert not await client.cancel(late)  # answered canceled now; the API answers it all the same
        emulator.configure(errored_rate=0.15, expired_rate=0.1, results_cut_rate=0.3, seed=7)
        calls = [
            client.messages.create(
                **params(f"question {i} " + "x" * i), tags={"team": "search" if i % 2 else "ads"}
            )
            for i in range(60)
        ]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        # The canceled request's own line is billed too: wait until the ledger has every billed line.
        emulator.configure(results_cut_rate=0.0)
        billed = emulator_usage(emulator)
        await eventually(
            lambda: _ledger_requests(settings.redis_url, len(billed)),
            what="every billed line in the ledger",
            timeout=60,
        )

    delivered = [a for a in answers if not isinstance(a, BaseException)]
    assert len(delivered) >= 40  # a few may end errored after their attempts
    assert len(billed) == len(delivered) + 1  # the API billed the canceled request as well
    by_hand = {
        "input": sum(u["input_tokens"] for u in billed),
        "output": sum(u["output_tokens"] for u in billed),
    }
    cost = by_hand["input"] * INPUT + by_hand["output"] * OUTPUT

    report = await costs(settings.redis_url)
    total = report["total"]
    assert total["requests"] == len(billed)
    assert total["undelivered_requests"] == 1
    assert (total["tokens"]["input"], total["tokens"]["output"]) == (by_hand["input"], by_hand["output"])
    assert total["cost_usd"] == pytest.approx(cost, rel=1e-12)
    assert total["savings_usd"] == total["cost_usd"]  # pure batch traffic, no caching: exactly half saved
    assert total["standard_usd"] == pytest.approx(2 * cost, rel=1e-12)
    assert total["cache_hit_rate"] is None
    assert report["prices"]["date"] == "2026-11-30"

    by_tag = {row["tag"]: row for row in (await costs(settings.redis_url, "--by", "tag"))["rows"]}
    assert set(by_tag) == {"team=ads", "team=search"}
    assert by_tag["team=ads"]["requests"] + by_tag["team=search"]["requests"] == len(billed)
    assert by_tag["team=ads"]["undelivered_requests"] == 1
    [model_row] = (await costs(settings.redis_url, "--by", "model"))["rows"]
    assert model_row["model"] == MODEL
    days = (await costs(settings.redis_url, "--by", "day"))["rows"]
    assert sum(day["requests"] for day in days) == len(billed)
    assert utc_day(now_ms()) in {day["day"] for day in days}
    assert (await costs(settings.redis_url, "--since", "2000-01-01", "--until", "2000-01-02"))["total"][
        "requests"
    ] == 0


async def _created(emulator: Any) -> bool:
    return bool(emulator.stats()["batches_created"] >= 1)


async def _flushed(store: Store, rid: str) -> bool:
    record = await store.request(rid)
    return record is not None and record.state is RequestState.FLUSHED


async def _ledger_requests(redis_url: str, n: int) -> bool:
    return bool((await costs(redis_url))["total"]["requests"] == n)


async def test_budgets_hold_with_two_replicas_and_two_clients_racing(
    make_settings: Callable[..., Settings], emulator: Any, store: Store
) -> None:
    one = params("how much?", max_tokens=1000)
    each = estimate(one, len(orjson.dumps(one)), cache_prefix(one))
    # Room for exactly 10 estimates today.
    settings = make_settings(emulator=True, daily_budget_usd=each * 10.5 / 1e12, max_batch_age_seconds=0.3)
    async with (
        running_daemon(settings, consumer="replica-1"),
        running_daemon(settings, consumer="replica-2"),
        AsyncClient(settings=settings) as first,
        AsyncClient(settings=settings) as second,
    ):
        # 2 x 12 submits interleaved across two clients (two connection pools, as two processes have).
        submits = [
            client.submit(one, f"{name}-{i}")
            for i in range(12)
            for name, client in (("a", first), ("b", second))
        ]
        outcomes = await asyncio.gather(*submits, return_exceptions=True)
        accepted = [o for o in outcomes if isinstance(o, str)]
        refused = [o for o in outcomes if isinstance(o, BudgetExceeded)]
        assert (len(accepted), len(refused)) == (10, 14)
        assert all(e.scope == "*" and e.limit_usd == pytest.approx(each * 10.5 / 1e12) for e in refused)
        day = refused[0].day
        assert (await store.budget_spent(day))["*"] == 10 * each

        # Once answered, the estimates are settled with the real costs (far below max_tokens' worth)...
        results = await asyncio.gather(*(first.result(rid, timeout=60) for rid in accepted))
        assert all(r.type == "succeeded" for r in results)
        spent = (await store.budget_spent(day))["*"]
        ledger = sum(row.cost for row in await store.ledger_rows([day]))
        assert spent == ledger < each

    # ... and the state outlives every client and replica: a new one sees the same day.
    async with AsyncClient(settings=settings) as later:
        assert await later.submit(one, "later")
        assert (await store.budget_spent(day))["*"] == ledger + each


async def test_the_front_refuses_over_budget_with_a_429_and_carries_tags_to_the_ledger(
    make_settings: Callable[..., Settings], emulator: Any, store: Store
) -> None:
    settings = make_settings(emulator=True, tag_budgets_usd={"team=capped": 1e-9}, max_batch_age_seconds=0.3)
    async with running_daemon(settings), AsyncClient(settings=settings) as queue:
        site = await serve_front(
            ClientBackend(queue), FrontConfig(tokens=(SecretStr(TOKEN),)), "127.0.0.1", 0
        )
        try:
            async with anthropic.AsyncAnthropic(base_url=site.url, api_key=TOKEN, max_retries=2) as client:
                with pytest.raises(anthropic.RateLimitError) as info:
                    await client.messages.create(
                        **params("over"), extra_headers={"batchd-tags": "team=capped"}
                    )
                tagged = await client.messages.create(
                    **params("tagged"), extra_headers={"batchd-tags": "team=search,env=test"}
                )
        finally:
            await site.close()
    error = info.value
    assert error.status_code == 429
    assert error.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert "the daily budget of tag team=capped would be exceeded" in error.message
    assert error.response.headers["x-should-retry"] == "false"
    assert tagged.content[0].text == "echo: tagged"  # type: ignore[union-attr]
    tag_sets = set((await store.tag_sets()).values())
    assert "env=test,team=search" in tag_sets


DEDUPE_SCRIPT = """
import asyncio, sys
from batchd import AsyncClient

async def main() -> None:
    async with AsyncClient(redis_url=sys.argv[1], dedupe=True) as client:
        calls = [
            client.messages.create(
                model="claude-haiku-4-5", max_tokens=16, messages=[{"role": "user", "content": f"item {i}"}]
            )
            for i in range(500)
        ]
        answers = await asyncio.gather(*calls)
    print(sum(a.content[0].text == f"echo: item {i}" for i, a in enumerate(answers)))

asyncio.run(main())
"""


ROOT = Path(__file__).resolve().parents[2]


async def run_script(script: Path, redis_url: str) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHD_", "ANTHROPIC_"))}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        redis_url,
        env=env,
        cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_a_deduped_script_killed_after_its_batch_was_created_pays_once_when_run_again(
    make_settings: Callable[..., Settings],
    emulator: Any,
    store: Store,
    tmp_path: Path,
) -> None:
    emulator.configure(processing_seconds=4.0)
    settings = make_settings(emulator=True, max_batch_age_seconds=0.5)
    script = tmp_path / "evaluate.py"
    script.write_text(DEDUPE_SCRIPT)
    async with running_daemon(settings):
        first = await run_script(script, settings.redis_url)
        try:

            async def all_in_batches() -> bool:
                snapshot = await store.snapshot(dead_after_ms=10_000)
                sent = emulator.stats()["requests_received"]
                return sent == 500 and snapshot.pending_requests == 0 and snapshot.flushes_waiting == 0

            await eventually(all_in_batches, what="the first run's 500 requests in created batches")
        finally:
            first.send_signal(signal.SIGKILL)
            await first.wait()
        assert emulator.stats()["batches_open"] > 0  # killed while its batch was still processing

        second = await run_script(script, settings.redis_url)
        out, err = await asyncio.wait_for(second.communicate(), 90)
        assert second.returncode == 0, err.decode()
        assert out.decode().strip() == "500"
        assert emulator.stats()["requests_received"] == 500  # paid once

        # And run a third time: every answer is stored, nothing is sent at all.
        third = await run_script(script, settings.redis_url)
        out, err = await asyncio.wait_for(third.communicate(), 90)
        assert third.returncode == 0, err.decode()
        assert out.decode().strip() == "500"
        assert emulator.stats()["requests_received"] == 500

    total = (await costs(settings.redis_url))["total"]
    assert (total["requests"], total["reused_requests"]) == (500, 1000)
    # The reused answers saved their whole standard price: twice the batch cost of each, twice over.
    assert total["savings_usd"] == pytest.approx(total["cost_usd"] + 2 * 2 * total["cost_usd"], rel=1e-9)
