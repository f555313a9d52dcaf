"""The spend issue's cache workload (benchmarks/cache_workload.py), run small: with the emulator's
prompt-caching model, grouping beats flushing in arrival order, and priming beats grouping, on both the
cache hit rate and the cost that batchd's own ledger reports. The emulator's clock only moves between
waves of batches, so the figures do not depend on this machine's speed."""

from __future__ import annotations

import pytest

from benchmarks.cache_workload import run


async def test_grouping_beats_arrival_order_and_priming_beats_grouping() -> None:
    rows = {row["name"]: row for row in await run(quick=True)}

    for mode in ("grouped", "primed"):
        for what in ("hit_rate", "cost"):
            row = rows[f"cache_{what}_{mode}"]
            assert row["pass"], row
    hit = [rows[f"cache_hit_rate_{mode}"]["value"] for mode in ("off", "grouped", "primed")]
    cost = [rows[f"cache_cost_{mode}"]["value"] for mode in ("off", "grouped", "primed")]
    assert hit[0] < hit[1] < hit[2]
    assert cost[0] > cost[1] > cost[2]
    # 20 prefixes x 20 requests: arrival order writes each prefix once per batch (4 batches: 0.8); grouped,
    # each prefix's run misses its concurrent neighbours (0.9); primed, only the primer writes (0.95).
    assert hit == pytest.approx([0.8, 0.9, 0.95])
    # The latency priming costs: one more batch round trip.
    assert rows["cache_latency_primed"]["value"] == rows["cache_latency_grouped"]["value"] + 1
