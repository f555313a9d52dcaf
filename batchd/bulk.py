"""``batchd submit FILE.jsonl``: bulk work in the Batches request shape, answered in the results shape.

Each input line is ``{"custom_id": "...", "params": {...}}``; the custom_id becomes the request id, so
running the same file again is idempotent: it queues nothing new and collects the same answers. The file is
read twice, never held whole: once to check every line (so an error names its line and nothing is
written), once to queue it in chunks; with ``--wait`` a bounded number of answers are awaited at a time, so
a 100,000-line file is collected in bounded memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import sys
import time
from array import array
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from .client import AsyncClient
from .errors import InvalidRequest, RequestConflict, ResultTimeout
from .validation import encode_params, validate_request_id

__all__ = ["read_requests", "submit_file"]

# Requests queued per submit_many call while streaming the file.
_SUBMIT_CHUNK = 1000
# Answers awaited at once with --wait: enough to keep the client's shared reads full, few enough that a
# 100,000-line file costs no more memory than a thousand lines.
_WAIT_WINDOW = 2000


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
            custom_id = obj["custom_id"]
            if not isinstance(custom_id, str):
                raise InvalidRequest(
                    f"{path}:{lineno}: custom_id must be a string, not {type(custom_id).__name__}"
                )
            yield lineno, custom_id, obj["params"]


def check_file(path: Path, client: AsyncClient) -> int:
    """Check every line before anything is written; returns the number of requests.

    Repeated ids are found from an 8-byte digest per line in one flat array, not a Python object per line:
    long-lived small objects made while parsing a large file would pin the allocator's arenas, and the
    command's memory would grow with the file. A digest repeat is confirmed by reading the file again."""
    cfg = client.settings
    digests = array("Q")
    for lineno, cid, params in read_requests(path):
        try:
            validate_request_id(cid)
            encode_params(params, max_batch_bytes=cfg.max_batch_bytes, max_attempts=cfg.max_attempts)
        except InvalidRequest as exc:
            raise InvalidRequest(f"{path}:{lineno}: {exc}") from None
        digests.append(_digest(cid))
    ordered = sorted(digests)
    repeated = {a for a, b in itertools.pairwise(ordered) if a == b}
    del ordered
    if repeated:
        _raise_on_repeat(path, repeated)
    return len(digests)


def _digest(custom_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(custom_id.encode(), digest_size=8).digest(), "little")


def _raise_on_repeat(path: Path, digests: set[int]) -> None:
    """The first line whose custom_id repeats an earlier line's (only ids with a repeated digest are kept)."""
    first: dict[str, int] = {}
    for lineno, cid, _ in read_requests(path):
        if _digest(cid) in digests:
            seen = first.setdefault(cid, lineno)
            if seen != lineno:
                raise InvalidRequest(f"{path}:{lineno}: custom_id {cid!r} repeats line {seen}")


def _line_of(path: Path, custom_id: str) -> int:
    return next((lineno for lineno, cid, _ in read_requests(path) if cid == custom_id), 0)


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
    total = check_file(path, client)
    queued = 0
    for chunk in _chunks(read_requests(path)):
        try:
            await client.submit_many([params for _, _, params in chunk], [cid for _, cid, _ in chunk])
        except RequestConflict as exc:
            queued += len(exc.accepted)
            lineno = _line_of(path, exc.request_id)
            raise InvalidRequest(
                f"{path}:{lineno}: custom_id {exc.request_id!r} was submitted before with other params: "
                f"use another id for new params ({queued} lines before it were queued)"
            ) from None
        queued += len(chunk)
    if not wait:
        print(
            f"queued {total} requests from {path}; run again with --wait to collect the results",
            file=progress,
        )
        return 0
    sink = out if out is not None else sys.stdout.buffer
    counts: dict[str, int] = {}
    done = 0
    last_draw = 0.0
    _bar(progress, done, total, counts)
    try:
        async for cid, result in _answers(client, (cid for _, cid, _ in read_requests(path)), timeout):
            # exclude_unset: the fields the API sent, not the SDK model's defaults.
            line = {"custom_id": cid, "result": result.model_dump(mode="json", exclude_unset=True)}
            sink.write(orjson.dumps(line) + b"\n")
            done += 1
            counts[result.type] = counts.get(result.type, 0) + 1
            # Redraw at most ten times a second: 100,000 answers must not mean 100,000 terminal writes.
            now = time.monotonic()
            if now - last_draw >= 0.1 or done == total:
                last_draw = now
                _bar(progress, done, total, counts)
    except ResultTimeout as exc:
        print(file=progress)
        raise ResultTimeout(exc.request_id, exc.timeout) from None
    sink.flush()
    print(file=progress)
    return 0 if counts.get("succeeded", 0) == total else 1


async def _answers(
    client: AsyncClient, ids: Iterator[str], timeout: float | None
) -> AsyncIterator[tuple[str, Any]]:
    """Each id's result as it arrives, with at most _WAIT_WINDOW waits outstanding."""
    waiting: dict[asyncio.Task[Any], str] = {}
    exhausted = False
    try:
        while waiting or not exhausted:
            while not exhausted and len(waiting) < _WAIT_WINDOW:
                cid = next(ids, None)
                if cid is None:
                    exhausted = True
                    break
                waiting[asyncio.create_task(client.result(cid, timeout=timeout))] = cid
            if not waiting:
                break
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                cid = waiting.pop(task)
                yield cid, task.result()
    finally:
        for task in waiting:
            task.cancel()


def _chunks(
    rows: Iterator[tuple[int, str, dict[str, Any]]],
) -> Iterator[list[tuple[int, str, dict[str, Any]]]]:
    chunk: list[tuple[int, str, dict[str, Any]]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= _SUBMIT_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _bar(stream: IO[str], done: int, total: int, counts: dict[str, int]) -> None:
    width = 30
    filled = width * done // total if total else width
    detail = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {detail}")
    stream.flush()
