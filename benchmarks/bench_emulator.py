"""(e) The emulator under a full-size batch: 100,000 requests created, then the results streamed back.

The emulator (``batchd emulator``, a child process) receives one create body of N requests, ends the batch
at once (``--processing-seconds 0``) and serves the results, which the benchmark downloads as a stream.
Measured: the child's RSS at rest, its peak RSS (VmHWM) after the create and after the download, and the
wall time of each step, against the body and results sizes.

The reference, measured in the same run, is the naive server: a minimal aiohttp app that reads the body
with ``request.read()``, keeps the parsed requests, and answers the results download with the whole JSONL
built in memory. Both are driven by the same plain HTTP client.

    python -m benchmarks.bench_emulator [--requests 100000] [--text-bytes 400]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import aiohttp
import orjson

from batchd.batchbody import build_body
from batchd.localredis import free_port

from ._common import describe_machine, out, params, peak_rss_bytes, rss_bytes, table

HEADERS = {"x-api-key": "bench-key", "anthropic-version": "2023-06-01", "content-type": "application/json"}


# --- the naive reference server (runs as a child: python -m benchmarks.bench_emulator --naive PORT) ---------
def naive_server(port: int) -> None:
    from aiohttp import web

    batches: dict[str, list[dict[str, Any]]] = {}

    def batch_json(batch_id: str, base: str) -> dict[str, Any]:
        n = len(batches[batch_id])
        return {
            "id": batch_id,
            "type": "message_batch",
            "processing_status": "ended",
            "request_counts": {"processing": 0, "succeeded": n, "errored": 0, "canceled": 0, "expired": 0},
            "results_url": f"{base}/v1/messages/batches/{batch_id}/results",
        }

    async def create(request: web.Request) -> web.Response:
        body = await request.read()
        batch_id = f"msgbatch_naive{len(batches)}"
        batches[batch_id] = orjson.loads(body)["requests"]
        return web.json_response(batch_json(batch_id, f"http://{request.host}"))

    async def retrieve(request: web.Request) -> web.Response:
        return web.json_response(batch_json(request.match_info["id"], f"http://{request.host}"))

    async def results(request: web.Request) -> web.Response:
        lines = []
        for i, item in enumerate(batches[request.match_info["id"]]):
            text = item["params"]["messages"][0]["content"]
            message = {
                "id": f"msg_{i:024d}",
                "type": "message",
                "role": "assistant",
                "model": item["params"]["model"],
                "content": [{"type": "text", "text": f"echo: {text}"}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": 1, "output_tokens": 1, "service_tier": "batch"},
            }
            lines.append(
                orjson.dumps(
                    {"custom_id": item["custom_id"], "result": {"type": "succeeded", "message": message}}
                )
            )
        return web.Response(body=b"\n".join(lines) + b"\n", content_type="application/binary")

    app = web.Application(client_max_size=256 * 1024 * 1024 + 1)
    app.router.add_post("/v1/messages/batches", create)
    app.router.add_get("/v1/messages/batches/{id}", retrieve)
    app.router.add_get("/v1/messages/batches/{id}/results", results)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


# --- the driver ---------------------------------------------------------------------------------------------
async def _wait_listening(
    session: aiohttp.ClientSession, base: str, proc: asyncio.subprocess.Process
) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            async with session.get(f"{base}/v1/messages/batches/none", headers=HEADERS) as r:
                await r.read()
                return
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.05)
    raise RuntimeError("server did not start listening")


async def drive(command: list[str], port: int, body: bytes, n: int) -> dict[str, float]:
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    try:
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await _wait_listening(session, base, proc)
            rest = rss_bytes(proc.pid)
            started = time.perf_counter()
            async with session.post(f"{base}/v1/messages/batches", data=body, headers=HEADERS) as r:
                assert r.status == 200, await r.text()
                batch = await r.json()
            create_s = time.perf_counter() - started
            peak_create = peak_rss_bytes(proc.pid)
            while batch["processing_status"] != "ended":
                await asyncio.sleep(0.05)
                async with session.get(f"{base}/v1/messages/batches/{batch['id']}", headers=HEADERS) as r:
                    batch = await r.json()
            started = time.perf_counter()
            lines = size = 0
            async with session.get(batch["results_url"], headers=HEADERS) as r:
                assert r.status == 200
                async for chunk in r.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    lines += chunk.count(b"\n")
            results_s = time.perf_counter() - started
            assert lines == n, (lines, n)
            peak_all = peak_rss_bytes(proc.pid)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
    return {
        "rest": rest,
        "peak_create": peak_create,
        "peak_all": peak_all,
        "create_s": create_s,
        "results_s": results_s,
        "results_bytes": size,
    }


def make_body(n: int, text_bytes: int) -> bytes:
    items = ((f"req-{i:06d}-1".encode(), orjson.dumps(params(i, text_bytes))) for i in range(n))
    return build_body(items)


async def main(n: int, text_bytes: int) -> None:
    body = make_body(n, text_bytes)
    port = free_port()
    emu = await drive(
        [sys.executable, "-m", "batchd.cli", "emulator", "--port", str(port), "--processing-seconds", "0"],
        port,
        body,
        n,
    )
    port = free_port()
    naive = await drive(
        [sys.executable, "-m", "benchmarks.bench_emulator", "--naive", str(port)], port, body, n
    )
    mb = 1e6
    out(describe_machine())
    out(
        f"{n:,} requests, create body {len(body) / mb:.1f} MB, results {emu['results_bytes'] / mb:.1f} MB "
        f"(naive: {naive['results_bytes'] / mb:.1f} MB)"
    )
    rows: list[list[Any]] = [
        ["RSS at rest, MB", emu["rest"] / mb, naive["rest"] / mb, emu["rest"] / naive["rest"]],
        [
            "peak RSS after create, MB",
            emu["peak_create"] / mb,
            naive["peak_create"] / mb,
            emu["peak_create"] / naive["peak_create"],
        ],
        [
            "peak RSS after results, MB",
            emu["peak_all"] / mb,
            naive["peak_all"] / mb,
            emu["peak_all"] / naive["peak_all"],
        ],
        [
            "peak growth / body size",
            (emu["peak_all"] - emu["rest"]) / len(body),
            (naive["peak_all"] - naive["rest"]) / len(body),
            (emu["peak_all"] - emu["rest"]) / (naive["peak_all"] - naive["rest"]),
        ],
        ["create, s", emu["create_s"], naive["create_s"], emu["create_s"] / naive["create_s"]],
        ["results download, s", emu["results_s"], naive["results_s"], emu["results_s"] / naive["results_s"]],
        [
            "results, MB/s",
            emu["results_bytes"] / emu["results_s"] / mb,
            naive["results_bytes"] / naive["results_s"] / mb,
            (emu["results_bytes"] / emu["results_s"]) / (naive["results_bytes"] / naive["results_s"]),
        ],
    ]
    out(
        table(
            "emulator vs naive server (ratio: emulator/naive)",
            ["measure", "emulator", "naive", "ratio"],
            rows,
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--text-bytes", type=int, default=400, help="prompt text per request")
    parser.add_argument("--naive", type=int, metavar="PORT", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.naive:
        naive_server(a.naive)
    else:
        asyncio.run(main(a.requests, a.text_bytes))
