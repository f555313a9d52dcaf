"""Scale: 100,000 requests through the SDK; a full 256 MB batch against `python -m batchd.emulator`."""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx2
import pytest

import batchd.emulator
from batchd.emulator import EmulatorConfig, EmulatorThread
from batchd.emulator.testing import wait_for_batch

N = 100_000
LIMIT = 268_435_456  # 256 MB, the documented batch size limit
HEADERS = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
REPO_ROOT = Path(batchd.emulator.__file__).resolve().parents[2]


def test_100k_requests_through_the_sdk() -> None:
    requests = [
        {
            "custom_id": f"req-{i}",
            "params": {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": f"q{i}"}]},
        }
        for i in range(N)
    ]
    with (
        EmulatorThread(EmulatorConfig(processing_seconds=0.1)) as emu,
        anthropic.Anthropic(base_url=emu.base_url, api_key="k", max_retries=0) as client,
    ):
        batch = client.messages.batches.create(requests=requests)
        del requests
        ended = wait_for_batch(client, batch.id, within=30)
        assert ended.request_counts.succeeded == N

        seen = set()
        decoder = client.messages.batches.results(batch.id)
        for line in decoder:
            assert line.result.type == "succeeded"
            assert line.result.message.content[0].text == "echo: q" + line.custom_id[4:]
            seen.add(line.custom_id)
        assert len(seen) == N
        assert emu.stats()["requests_received"] == N


# --- the full-size batch, in a subprocess so its memory can be measured on its own ----------------

_PREFIX = (
    b'{"custom_id":"r%06d","params":{"model":"claude-haiku-4-5","max_tokens":16,'
    b'"messages":[{"role":"user","content":"q%06d '
)
_SUFFIX = b'"}]}}'
_HEAD, _TAIL = b'{"requests":[', b"]}"


def _body_of_exactly(size: int) -> Iterator[bytes]:
    """N requests padded to `size` bytes, generated on the fly (the test never holds the body)."""
    fixed = len(_PREFIX % (0, 0)) + len(_SUFFIX)
    text = (size - len(_HEAD) - len(_TAIL) - (N - 1)) // N - fixed
    pad = size - len(_HEAD) - len(_TAIL) - (N - 1) - N * (fixed + text)
    filler = b"x" * text
    yield _HEAD
    chunk: list[bytes] = []
    for i in range(N):
        chunk.append((b"," if i else b"") + _PREFIX % (i, i) + filler + _SUFFIX)
        if len(chunk) == 500:
            yield b"".join(chunk)
            chunk.clear()
    yield b"".join(chunk)
    yield b" " * pad + _TAIL


@pytest.fixture
def emulator_process() -> Iterator[tuple[subprocess.Popen[str], str]]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchd.emulator", "--port", "0", "--processing-seconds", "0.1"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        yield proc, _wait_for_url(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def _wait_for_url(proc: subprocess.Popen[str]) -> str:
    assert proc.stderr is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if selector.select(timeout=0.5):
                line = proc.stderr.readline()
                if found := re.search(r"listening on (http://\S+)", line):
                    return found.group(1)
                if not line:
                    break
    raise AssertionError("emulator did not report its URL")


def _peak_rss_mb(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(found.group(1)) / 1024 if found else None


def test_256mb_batch_is_accepted_and_answered(emulator_process: tuple[subprocess.Popen[str], str]) -> None:
    proc, url = emulator_process
    port = int(url.rsplit(":", 1)[1])

    # One byte over the limit: refused from the Content-Length alone.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/messages/batches HTTP/1.1\r\nHost: x\r\nx-api-key: k\r\n"
            b"anthropic-version: 2023-06-01\r\nContent-Length: %d\r\n\r\n" % (LIMIT + 1)
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 413")

    with httpx2.Client(base_url=url, headers=HEADERS, timeout=120) as http:
        response = http.post(
            "/v1/messages/batches",
            content=_body_of_exactly(LIMIT),
            headers={"content-length": str(LIMIT), "content-type": "application/json"},
        )
        assert response.status_code == 200, response.text
        batch_id = response.json()["id"]

        deadline = time.monotonic() + 30
        while http.get(f"/v1/messages/batches/{batch_id}").json()["processing_status"] != "ended":
            assert time.monotonic() < deadline
            time.sleep(0.05)

        lines = 0
        with http.stream("GET", f"/v1/messages/batches/{batch_id}/results") as results:
            assert results.status_code == 200
            for chunk in results.iter_bytes():
                lines += chunk.count(b"\n")
        assert lines == N

    peak = _peak_rss_mb(proc.pid)
    if peak is not None:
        # Measured ~960 MB: the body, orjson's working copy and the parsed tree at the moment of parsing.
        assert peak < 1500, f"emulator peak RSS {peak:.0f} MB for a 256 MB batch"

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
