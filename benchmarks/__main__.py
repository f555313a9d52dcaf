"""The suite: ``python -m benchmarks [--quick] [--only NAME[,NAME...]] [--json PATH]``.

Every row family runs against the suite's own private redis-server (flushed between families) and starts
the emulator it needs; every figure is a ratio against a reference measured in the same run, or a resource
bound. The table is printed; ``--json`` writes ``{"results": [{"name", "value", "unit", "reference",
"ratio", "target", "pass"}, ...]}``. Exit status 1 if a row misses its target. docs/performance.md has the
figures and how they were reached.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import orjson

from ._common import Env, Row, describe_machine, fmt, out, private_redis, table

# name -> module (each has ``async def run(env: Env) -> list[Row]``), in the order they run.
FAMILIES: dict[str, str] = {
    "submit": "benchmarks.submit",
    "drain": "benchmarks.drain",
    "full_batch": "benchmarks.full_batch",
    "fanout": "benchmarks.fanout",
    "end_to_end": "benchmarks.end_to_end",
    "age_trigger": "benchmarks.age_trigger",
    "waiters": "benchmarks.waiters",
    "front": "benchmarks.front",
    "api_calls": "benchmarks.api_calls",
    "idle": "benchmarks.idle",
    "cache": "benchmarks.cache_workload",
}


async def _run_family(name: str, env: Env) -> list[Row]:
    module = importlib.import_module(FAMILIES[name])
    rows = await module.run(env) if name != "cache" else _cache_rows(await module.run(env.quick))
    return list(rows)


def _cache_rows(rows: list[dict[str, Any]]) -> list[Row]:
    return [
        Row(r["name"], r["value"], r["unit"], r["reference"], r["ratio"], r["target"], r["pass"])
        for r in rows
    ]


async def _main(names: list[str], quick: bool) -> list[Row]:
    rows: list[Row] = []
    with private_redis() as server:
        env = Env(quick=quick, redis=server)
        for name in names:
            server.client().flushall()
            started = time.monotonic()
            out(f"--- {name} ...")
            try:
                got = await _run_family(name, env)
            except Exception:
                traceback.print_exc()
                got = [Row(f"{name}_failed", 0.0, "", None, None, "runs", False)]
            for row in got:
                out(
                    f"    {row.name:<34} {fmt(row.value):>12} {row.unit:<10} ref {fmt(row.reference):>10}  "
                    f"ratio {fmt(row.ratio):>6}  {row.target:<26} {'ok' if row.passed else 'MISSED'}"
                )
            out(f"    ({time.monotonic() - started:.1f} s)")
            rows.extend(got)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes and windows: under 5 minutes")
    parser.add_argument(
        "--only", help=f"comma-separated row families: {', '.join(FAMILIES)} (default: all)", default=""
    )
    parser.add_argument("--json", type=Path, help='write {"results": [...]} here')
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        parser.error(f"unknown row family: {', '.join(unknown)} (have: {', '.join(FAMILIES)})")
    out(describe_machine())
    started = time.monotonic()
    rows = asyncio.run(_main(names, args.quick))
    out()
    out(
        table(
            f"batchd benchmarks{' (--quick)' if args.quick else ''}: {time.monotonic() - started:.0f} s",
            ["name", "value", "unit", "reference", "ratio", "target", "pass"],
            [[r.name, r.value, r.unit, r.reference, r.ratio, r.target, r.passed] for r in rows],
        )
    )
    if args.json is not None:
        args.json.write_bytes(
            orjson.dumps({"results": [r.as_json() for r in rows]}, option=orjson.OPT_INDENT_2)
        )
    missed = [r.name for r in rows if not r.passed]
    if missed:
        out(f"missed: {', '.join(missed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
