"""The HTTP front over real sockets: the official Python SDK (sync, async, messages.stream), the official
TypeScript SDK under Node, curl; auth, bad bodies, forwarding, disconnect-and-collect, Idempotency-Key and SDK
retries (one request, one answer), respond-async, pings. Answers come from one-request batches on the
emulator (or canned messages), through an in-memory Backend."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import orjson
import pytest
from aiohttp import web
from pydantic import SecretStr

from batchd.emulator import EmulatorThread
from batchd.errors import ConfigError
from batchd.front import FrontConfig, Upstream, check_exposure, load_tokens
from batchd.httpserver import serve_app
from batchd.membackend import MemoryBackend, batch_responder, message_responder
from batchd.settings import load_settings
from tests.front_helpers import FrontThread, Gate, emulator_backend, gated, kwargs, tool_message

TOKEN = "tok-front-test-0123456789"
NODE_DIR = Path(__file__).resolve().parents[1] / "node"


@pytest.fixture
def front(emulator: EmulatorThread) -> Iterator[FrontThread]:
    config = FrontConfig(tokens=(SecretStr(TOKEN),))
    with FrontThread(lambda: emulator_backend(emulator.base_url), config) as thread:
        yield thread


def sdk(front: FrontThread, **options: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=front.url, api_key=TOKEN, **options)


def post(front: FrontThread, body: Any, headers: dict[str, str] | None = None, **kw: Any) -> httpx2.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    base = {"x-api-key": TOKEN, "anthropic-version": "2023-06-01", "content-type": "application/json"}
    return httpx2.post(f"{front.url}/v1/messages", content=content, headers=base | (headers or {}), **kw)


def backend_of(front: FrontThread) -> MemoryBackend:
    assert front.backend is not None
    return front.backend


# --- the official Python SDK --------------------------------------------------------------------------------


def test_python_sdk_sync_create_stream_and_beta(front: FrontThread) -> None:
    with sdk(front) as client:
        raw = client.messages.with_raw_response.create(**kwargs("sync"))
        message = raw.parse()
        with client.messages.stream(**kwargs("streamed")) as stream:
            streamed = stream.get_final_message()
        beta = client.beta.messages.create(betas=["output-300k-2026-03-24"], **kwargs("beta"))
    assert message.content[0].text == "echo: sync"  # type: ignore[union-attr]
    assert message.usage.service_tier == "batch"
    assert raw.headers["batchd-request-id"] == raw.headers["request-id"] == message._request_id
    assert streamed.content[0].text == "echo: streamed"  # type: ignore[union-attr]
    assert beta.content[0].text == "echo: beta"  # type: ignore[union-attr]
    requests = list(backend_of(front).requests.values())
    assert [r.stream for r in requests] == [False, True, False]
    assert requests[2].betas == ("output-300k-2026-03-24",)


async def test_python_sdk_async_create_and_stream(front: FrontThread) -> None:
    async with anthropic.AsyncAnthropic(base_url=front.url, api_key=TOKEN) as client:
        message = await client.messages.create(**kwargs("async"))
        async with client.messages.stream(**kwargs("async stream")) as stream:
            texts = [t async for t in stream.text_stream]
    assert message.content[0].text == "echo: async"  # type: ignore[union-attr]
    assert "".join(texts) == "echo: async stream"


def test_errored_result_is_the_apis_status_and_envelope(front: FrontThread) -> None:
    bad_role = {
        "model": "claude-haiku-4-5",
        "max_tokens": 8,
        "messages": [{"role": "robot", "content": "x"}],
    }
    with sdk(front) as client, pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(**bad_role)
    assert "messages.0.role" in info.value.message
    assert backend_of(front).submit_calls == 1  # x-should-retry: false: the SDK did not retry
    # A stream's headers go out before the answer is known: the error comes as the API's error event.
    streamed = post(front, {**bad_role, "stream": True})
    assert streamed.status_code == 200
    assert b"event: error" in streamed.content and b"invalid_request_error" in streamed.content
    # Reattaching to an answered request: the answer is known before the stream starts, so the status says it.
    rid = info.value.response.headers["batchd-request-id"]
    again = post(front, {**bad_role, "stream": True}, {"Idempotency-Key": rid})
    assert again.status_code == 400
    assert again.json()["error"]["type"] == "invalid_request_error"


# --- auth, bad requests, other endpoints --------------------------------------------------------------------


def test_auth_accepts_a_configured_token_either_way(front: FrontThread) -> None:
    bearer = post(front, kwargs("bearer"), {"x-api-key": "", "authorization": f"Bearer {TOKEN}"})
    assert bearer.status_code == 200
    for headers, message in (({"x-api-key": ""}, "required"), ({"x-api-key": "wrong-token"}, "invalid")):
        response = post(front, kwargs(), headers)
        assert response.status_code == 401
        body = response.json()
        assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
        assert message in body["error"]["message"]
    with (
        anthropic.Anthropic(base_url=front.url, api_key="wrong") as client,
        pytest.raises(anthropic.AuthenticationError),
    ):
        client.messages.create(**kwargs())
    assert len(backend_of(front).requests) == 1


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (b"{oops", {}, 400, "not valid JSON"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}]},
            {},
            400,
            "max_tokens: Field required",
        ),
        (kwargs(), {"anthropic-version": ""}, 400, "anthropic-version"),
        (kwargs(), {"batchd-route": "sometimes"}, 400, "batchd-route"),
        (kwargs(), {"batchd-tags": "no spaces=allowed here"}, 400, "batchd-tags"),
        (b"x" * 2048, {}, 413, "over the limit"),
    ],
)
def test_bad_requests_are_refused_before_anything_is_queued(
    emulator: EmulatorThread, body: Any, headers: dict[str, str], status: int, message: str
) -> None:
    config = FrontConfig(tokens=(SecretStr(TOKEN),), max_body_bytes=1024)
    with FrontThread(lambda: emulator_backend(emulator.base_url), config) as front:
        if headers.get("anthropic-version") == "":
            response = httpx2.post(
                f"{front.url}/v1/messages", content=orjson.dumps(body), headers={"x-api-key": TOKEN}
            )
        else:
            response = post(front, body, headers)
        assert response.status_code == status
        envelope = response.json()
        assert envelope["type"] == "error" and message in envelope["error"]["message"]
        assert backend_of(front).submit_calls == 0


def test_unknown_endpoints_are_404_in_the_apis_shape(front: FrontThread) -> None:
    for method, path in (("GET", "/v1/messages/batches"), ("POST", "/v1/complete"), ("GET", "/")):
        response = httpx2.request(method, front.url + path, headers={"x-api-key": TOKEN})
        assert response.status_code == 404
        assert response.json()["error"]["type"] == "not_found_error"


def test_side_endpoints_are_forwarded_with_batchds_key(emulator: EmulatorThread) -> None:
    seen: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append({"path": request.path_qs, "headers": dict(request.headers), "body": await request.read()})
        status = 200 if request.path != "/v1/models/missing" else 404
        return web.json_response(
            {"data": [], "path": request.path}, status=status, headers={"request-id": "req_up"}
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    holder: dict[str, Any] = {}

    def upstream() -> Upstream:
        return Upstream(SecretStr("sk-ant-batchd-own-key"), holder["url"])

    config = FrontConfig(tokens=(SecretStr(TOKEN),))
    with FrontThread(lambda: emulator_backend(emulator.base_url), config, upstream=None) as probe:
        site = probe.call(serve_app(app, "127.0.0.1", 0))
        holder["url"] = site.url
        try:
            with FrontThread(lambda: emulator_backend(emulator.base_url), config, upstream=upstream) as front:
                with sdk(front) as client:
                    assert client.models.list(limit=5).data == []
                    count = client.messages.with_raw_response.count_tokens(
                        model="claude-haiku-4-5", messages=[{"role": "user", "content": "x"}]
                    )
                    with pytest.raises(anthropic.NotFoundError):
                        client.models.retrieve("missing")
                assert count.status_code == 200 and count.headers["request-id"] == "req_up"
        finally:
            probe.call(site.close())
    assert [s["path"] for s in seen] == [
        "/v1/models?limit=5",
        "/v1/messages/count_tokens",
        "/v1/models/missing",
    ]
    for request in seen:
        assert request["headers"]["Authorization"] == "Bearer sk-ant-batchd-own-key"
        assert TOKEN not in json.dumps(request["headers"])
    assert orjson.loads(seen[1]["body"])["model"] == "claude-haiku-4-5"


def test_forwarding_without_an_api_key_is_a_clear_error(front: FrontThread) -> None:
    response = httpx2.get(f"{front.url}/v1/models", headers={"x-api-key": TOKEN})
    assert response.status_code == 500
    assert "BATCHD_ANTHROPIC_API_KEY" in response.json()["error"]["message"]


# --- paying once, collecting later --------------------------------------------------------------------------


def gated_front(emulator: EmulatorThread, gate: Gate, **config: Any) -> FrontThread:
    def make() -> MemoryBackend:
        client = anthropic.AsyncAnthropic(base_url=emulator.base_url, api_key="k", max_retries=0)
        return MemoryBackend(gated(gate, batch_responder(client)))

    return FrontThread(make, FrontConfig(tokens=(SecretStr(TOKEN),), **config))


def test_idempotency_key_retry_after_a_dropped_connection_is_one_request(emulator: EmulatorThread) -> None:
    gate = Gate()
    with gated_front(emulator, gate) as front:
        key = {"Idempotency-Key": "order-42"}
        with pytest.raises(httpx2.ReadTimeout):
            post(front, kwargs("once"), key, timeout=0.3)  # the client gives up and drops the connection
        gate.open()
        first = post(front, kwargs("once"), key)
        again = post(front, kwargs("once"), key)
        assert first.status_code == again.status_code == 200
        assert first.headers["batchd-request-id"] == again.headers["batchd-request-id"] == "order-42"
        assert first.json() == again.json()
        backend = backend_of(front)
        assert (len(backend.requests), backend.submit_calls) == (1, 3)


def test_sdk_timeout_retries_without_a_key_reattach(emulator: EmulatorThread) -> None:
    gate = Gate()
    with gated_front(emulator, gate) as front:
        # The SDK sends no Idempotency-Key; its retry of a timed-out call is recognised and reattached.
        with sdk(front, timeout=0.3, max_retries=2) as client, pytest.raises(anthropic.APITimeoutError):
            client.messages.create(**kwargs("retried"))
        backend = backend_of(front)
        assert (len(backend.requests), backend.submit_calls) == (1, 3)
        gate.open()
        with sdk(front) as client:
            fresh = client.messages.create(**kwargs("retried"))  # a new call (retry count 0) is a new request
        assert fresh.content[0].text == "echo: retried"  # type: ignore[union-attr]
        assert len(backend.requests) == 2


def test_disconnected_caller_collects_its_answer_later(emulator: EmulatorThread) -> None:
    gate = Gate()
    with gated_front(emulator, gate) as front:
        headers = {"x-api-key": TOKEN, "anthropic-version": "2023-06-01"}
        body = orjson.dumps({**kwargs("later"), "stream": True})
        with httpx2.stream("POST", f"{front.url}/v1/messages", content=body, headers=headers) as response:
            assert response.status_code == 200  # the stream's headers go out at once, with the id
            rid = response.headers["batchd-request-id"]
        # The caller is gone; the request goes on.
        pending = httpx2.get(f"{front.url}/v1/batchd/requests/{rid}", headers=headers)
        assert pending.status_code == 202 and pending.json() == {
            "type": "batchd_request",
            "id": rid,
            "status": "pending",
        }
        gate.open()
        done = httpx2.get(f"{front.url}/v1/batchd/requests/{rid}?wait=10", headers=headers)
        assert done.status_code == 200
        assert done.json()["content"][0]["text"] == "echo: later"
        assert done.headers["batchd-request-id"] == rid
        missing = httpx2.get(f"{front.url}/v1/batchd/requests/nope", headers=headers)
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
        bad_wait = httpx2.get(f"{front.url}/v1/batchd/requests/{rid}?wait=9999", headers=headers)
        assert bad_wait.status_code == 400


def test_respond_async_answers_202_at_once(emulator: EmulatorThread) -> None:
    gate = Gate()
    with gated_front(emulator, gate) as front:
        accepted = post(front, kwargs("async"), {"Prefer": "respond-async"})
        assert accepted.status_code == 202
        rid = accepted.json()["id"]
        assert accepted.headers["batchd-request-id"] == rid
        assert accepted.headers["location"] == f"/v1/batchd/requests/{rid}"
        gate.open()
        done = httpx2.get(front.url + accepted.headers["location"] + "?wait=10", headers={"x-api-key": TOKEN})
        assert done.json()["content"][0]["text"] == "echo: async"


def test_a_waiting_stream_gets_pings(emulator: EmulatorThread) -> None:
    gate = Gate()
    # The ping interval is the behaviour under test; 15 s by default would make this test take 15 s.
    with gated_front(emulator, gate, ping_seconds=0.05) as front:
        body = orjson.dumps({**kwargs("ping"), "stream": True})
        headers = {"x-api-key": TOKEN, "anthropic-version": "2023-06-01"}
        received = b""
        with httpx2.stream("POST", f"{front.url}/v1/messages", content=body, headers=headers) as response:
            chunks = response.iter_bytes()
            while received.count(b"event: ping") < 2:
                received += next(chunks)
            gate.open()
            received += b"".join(chunks)
    assert received.startswith(b'event: ping\ndata: {"type":"ping"}\n\n')
    assert received.index(b"event: message_start") > received.rindex(b"event: ping")
    assert received.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


# --- other clients ------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl(front: FrontThread) -> None:
    base = ["curl", "-sS", "-H", f"x-api-key: {TOKEN}", "-H", "anthropic-version: 2023-06-01"]
    body = json.dumps(kwargs("curl"))
    out = subprocess.run(
        [*base, "-d", body, f"{front.url}/v1/messages"], capture_output=True, check=True, timeout=30
    )
    assert json.loads(out.stdout)["content"][0]["text"] == "echo: curl"
    body = json.dumps({**kwargs("curl stream"), "stream": True})
    out = subprocess.run(
        [*base, "-N", "-d", body, f"{front.url}/v1/messages"], capture_output=True, check=True, timeout=30
    )
    events = [line[7:] for line in out.stdout.decode().splitlines() if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-1] == "message_stop"
    out = subprocess.run(
        ["curl", "-sS", "-d", body, f"{front.url}/v1/messages"], capture_output=True, check=True, timeout=30
    )
    assert json.loads(out.stdout)["error"]["type"] == "authentication_error"


@pytest.mark.skipif(
    shutil.which("node") is None or not (NODE_DIR / "node_modules" / "@anthropic-ai" / "sdk").is_dir(),
    reason="node or tests/node/node_modules is absent (cd tests/node && npm install)",
)
def test_typescript_sdk(front: FrontThread) -> None:
    out = subprocess.run(
        ["node", "front_check.mjs", front.url, TOKEN],
        cwd=NODE_DIR,
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr.decode()
    seen = json.loads(out.stdout)
    assert seen["message"]["content"][0]["text"] == "echo: from node"
    assert seen["streamed"]["content"][0]["text"] == seen["text"] == "echo: node stream"
    assert seen["beta"]["content"][0]["text"] == "echo: from node"
    assert seen["bad"]["status"] == 400 and seen["bad"]["type"] == "invalid_request_error"
    assert [r.betas for r in backend_of(front).requests.values()] == [(), (), ("output-300k-2026-03-24",)]


# --- configuration ------------------------------------------------------------------------------------------


def test_no_tokens_means_loopback_only(tmp_path: Path) -> None:
    check_exposure("127.0.0.1", ())
    check_exposure("::1", ())
    check_exposure("localhost", ())
    with pytest.raises(ConfigError, match="BATCHD_HTTP_TOKENS"):
        check_exposure("0.0.0.0", ())
    check_exposure("0.0.0.0", (SecretStr(TOKEN),))
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# ops team\n{TOKEN}\n\n  second-token-abcdefgh  \n", encoding="utf-8")
    settings = load_settings(http_tokens="third-token-abcdefghij,", http_token_file=token_file)
    tokens = [t.get_secret_value() for t in load_tokens(settings)]
    assert tokens == ["third-token-abcdefghij", TOKEN, "second-token-abcdefgh"]
    assert TOKEN not in repr(settings) and TOKEN not in str(settings.redacted())
    with pytest.raises(ConfigError, match="16"):
        load_tokens(load_settings(http_tokens="short"))


def test_front_command_refuses_an_exposed_front_without_tokens() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "batchd.cli", "front", "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert b"BATCHD_HTTP_TOKENS" in out.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_canned_tool_answers_over_the_front() -> None:
    config = FrontConfig(tokens=(SecretStr(TOKEN),))
    with (
        FrontThread(lambda: MemoryBackend(message_responder(tool_message)), config) as front,
        sdk(front) as client,
    ):
        message = client.messages.create(**kwargs(tools=[{"name": "t", "input_schema": {"type": "object"}}]))
    assert message.stop_reason == "tool_use"
