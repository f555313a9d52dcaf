"""Shared by the tests of the ways in (drop-in SDK client, HTTP front): backends that answer through the
emulator or with canned messages, a gate that holds answers back, and request builders."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

import anthropic

from batchd.front import FrontConfig, Upstream, serve_front
from batchd.httpserver import Site
from batchd.membackend import MemoryBackend, Responder, batch_responder, message_responder
from batchd.translate import ApiRequest

_T = TypeVar("_T")

MODEL = "claude-haiku-4-5"
WEATHER_TOOL: dict[str, Any] = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def kwargs(text: str = "hello", **extra: Any) -> dict[str, Any]:
    """messages.create keyword arguments for a small valid request."""
    return {"model": MODEL, "max_tokens": 32, "messages": [{"role": "user", "content": text}], **extra}


def emulator_backend(base_url: str) -> MemoryBackend:
    """Each request becomes a one-request batch on the emulator; the answer is its raw results line."""
    client = anthropic.AsyncAnthropic(base_url=base_url, api_key="test-key", max_retries=0)
    return MemoryBackend(batch_responder(client, poll=0.02))


def _last_user_blocks(params: Mapping[str, Any]) -> list[Any]:
    content = params["messages"][-1]["content"]
    return content if isinstance(content, list) else [{"type": "text", "text": content}]


def tool_message(request: ApiRequest) -> dict[str, Any]:
    """A canned answer for tool loops: call the first tool until a tool_result comes back, then say so.

    Stands in for the emulator's tool_use cue (being added); swap this responder for emulator_backend's when
    it lands.
    """
    params = request.params
    blocks = _last_user_blocks(params)
    results = [b for b in blocks if isinstance(b, dict) and b.get("type") == "tool_result"]
    turn = sum(1 for m in params["messages"] if m["role"] == "assistant")
    base: dict[str, Any] = {
        "id": f"msg_tool_{turn}",
        "type": "message",
        "role": "assistant",
        "model": params["model"],
        "stop_sequence": None,
        "usage": {"input_tokens": 20, "output_tokens": 10, "service_tier": "batch"},
    }
    tools = params.get("tools") or []
    if tools and not results:
        tool = tools[0]
        return base | {
            "content": [
                {"type": "text", "text": "Let me look that up."},
                {"type": "tool_use", "id": f"toolu_{turn}", "name": tool["name"], "input": {"city": "Paris"}},
            ],
            "stop_reason": "tool_use",
        }
    outcome = " ".join(_text(r.get("content")) for r in results) or "no tools"
    return base | {"content": [{"type": "text", "text": f"Done: {outcome}"}], "stop_reason": "end_turn"}


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return str(content)


def tool_backend() -> MemoryBackend:
    return MemoryBackend(message_responder(tool_message))


class Gate:
    """Holds answers back until ``open()``; usable from any thread and any event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._opened = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def open(self) -> None:
        with self._lock:
            self._opened = True
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            loop.call_soon_threadsafe(lambda f=future: f.done() or f.set_result(None))

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._opened:
                return
            future: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, future))
        await future


def gated(gate: Gate, responder: Responder) -> Responder:
    async def respond(request_id: str, request: ApiRequest) -> bytes:
        await gate.wait()
        return await responder(request_id, request)

    return respond


async def eventually(predicate: Callable[[], bool], within: float = 10.0) -> None:
    """Poll ``predicate`` until it holds; TimeoutError after ``within`` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"condition still false after {within} s")
        await asyncio.sleep(0.01)


class FrontThread:
    """The HTTP front on its own event loop in a daemon thread, over ``make_backend()`` (called there)."""

    def __init__(
        self,
        make_backend: Callable[[], MemoryBackend],
        config: FrontConfig,
        upstream: Callable[[], Upstream] | None = None,
    ) -> None:
        self._make_backend = make_backend
        self._make_upstream = upstream
        self.config = config
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="front", daemon=True)
        self._site: Site | None = None
        self.backend: MemoryBackend | None = None
        self.url = ""

    def call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def __enter__(self) -> FrontThread:
        self._thread.start()

        async def start() -> None:
            self.backend = self._make_backend()
            upstream = self._make_upstream() if self._make_upstream is not None else None
            self._site = await serve_front(self.backend, self.config, "127.0.0.1", 0, upstream=upstream)
            self.url = self._site.url

        self.call(start())
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self._site is not None:
                await self._site.close()
            if self.backend is not None:
                await self.backend.aclose()

        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
