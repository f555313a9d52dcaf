"""``batchd submit FILE.jsonl``: bulk work in the Batches request shape, answered in the results shape.

Each input line is ``{"custom_id": "...", "params": {...}}``; the custom_id becomes the request id, so
running the same file again is idempotent: it queues nothing new and collects the same answers.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from .client import AsyncClient
from .errors import InvalidRequest, ResultTimeout
from .validation import encode_params, validate_request_id

__all__ = ["read_requests", "submit_file"]


def read_requests(path: Path) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(line number, custom_id, params) per line. A bad line raises InvalidRequest naming its line."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise InvalidRequest(f"{path}:{lineno}: not JSON ({exc})") from None
            if not isinstance(obj, dict) or "custom_id" not in obj or "params" not in obj:
                raise InvalidRequest(f"{path}:{lineno}: expected an object with custom_id and params")
            yield lineno, str(obj["custom_id"]), obj["params"]


async def submit_file(
    client: AsyncClient,
    path: Path,
    *,
    wait: bool,
    out: IO[bytes] | None,
    timeout: float | None = None,
    progress: IO[str] = sys.stderr,
) -> int:
    """Queue every line; with ``wait``, write each result line (custom_id as given) as it arrives."""
    requests = list(read_requests(path))
    cfg = client.settings
    # Check every line first, so an error names its line (submit_many would only name the request).
    for lineno, cid, params in requests:
        try:
            validate_request_id(cid)
            encode_params(params, max_batch_bytes=cfg.max_batch_bytes, max_attempts=cfg.max_attempts)
        except InvalidRequest as exc:
            raise InvalidRequest(f"{path}:{lineno}: {exc}") from None
    ids = [cid for _, cid, _ in requests]
    await client.submit_many([params for _, _, params in requests], ids)
    total = len(ids)
    if not wait:
        print(
            f"queued {total} requests from {path}; run again with --wait to collect the results",
            file=progress,
        )
        return 0
    done = 0
    counts: dict[str, int] = {}
    last_draw = 0.0
    sink = out if out is not None else sys.stdout.buffer
    _bar(progress, done, total, counts)

    async def one(rid: str) -> None:
        nonlocal done, last_draw
        result = await client.result(rid, timeout=timeout)
        # exclude_unset: the fields the API sent, not the SDK model's defaults.
        line = {"custom_id": rid, "result": result.model_dump(mode="json", exclude_unset=True)}
        sink.write(orjson.dumps(line) + b"\n")
        done += 1
        counts[result.type] = counts.get(result.type, 0) + 1
        # Redraw at most ten times a second: 100,000 answers must not mean 100,000 terminal writes.
        now = time.monotonic()
        if now - last_draw >= 0.1 or done == total:
            last_draw = now
            _bar(progress, done, total, counts)

    try:
        await asyncio.gather(*(one(rid) for rid in ids))
    except ResultTimeout as exc:
        print(file=progress)
        raise ResultTimeout(exc.request_id, exc.timeout) from None
    sink.flush()
    print(file=progress)
    return 0 if counts.get("succeeded", 0) == total else 1


def _bar(stream: IO[str], done: int, total: int, counts: dict[str, int]) -> None:
    width = 30
    filled = width * done // total if total else width
    detail = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {detail}")
    stream.flush()
