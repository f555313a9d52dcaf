"""The HTTP front: an Anthropic-compatible base URL, so any client in any language gets batch prices.

``POST /v1/messages`` is checked (a 400 in the API's envelope before anything is queued), handed to the
Backend, and the connection is held until the answer: the Message JSON, the error envelope with the
status the API would use, or, for ``"stream": true``, an SSE stream whose headers go out at once and which
carries a ``ping`` every ``ping_seconds`` until the answer is known. ``Prefer: respond-async`` answers 202
with the id at once; ``GET /v1/batchd/requests/{id}[?wait=S]`` collects it later. ``GET /v1/models[/{id}]``
and ``POST /v1/messages/count_tokens`` are forwarded to the API with batchd's own key; anything else is a
404 in the API's error shape. docs/front.md has every header and status.

Paying once: ``Idempotency-Key`` is the request id, so a retry reattaches. The official SDKs send no key
but mark their retries (``x-stainless-retry-count``); a retry without a key reattaches to the identical
request (same caller token, same params and batch headers) this process received in the last hour. A
caller that disconnects does not cancel its request: it can be collected later by id.

Memory per held connection is small and fixed: the body is read, translated and queued, then dropped;
only the id and the waiting task stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import math
import signal
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx2
import orjson
from aiohttp import web
from pydantic import SecretStr

from . import sse
from .backend import Backend
from .errors import ConfigError, InvalidRequestId
from .httpserver import Site, serve_app
from .settings import Settings
from .translate import (
    MAX_BODY_BYTES,
    Answer,
    ApiError,
    Validator,
    answer_from_line,
    api_error_for,
    parse_request,
)
from .validation import validate_request_id

__all__ = [
    "DEFAULT_PORT",
    "Front",
    "FrontConfig",
    "Upstream",
    "check_exposure",
    "front_from_settings",
    "load_tokens",
    "run_front",
    "serve_front",
]

# The caller's token digest, for the scope of its retries (set by the auth middleware).
_CALLER = web.RequestKey("batchd_caller", bytes)

log = logging.getLogger("batchd.front")

DEFAULT_PORT = 8787
MAX_COLLECT_WAIT = 600.0
# A retry without Idempotency-Key reattaches to an identical request seen within this window.
RECENT_SECONDS = 3600.0
RECENT_MAX = 10_000
_FORWARDED_REQUEST_HEADERS = ("anthropic-version", "anthropic-beta", "content-type", "anthropic-workspace-id")
_FORWARDED_RESPONSE_HEADERS = ("content-type", "request-id", "retry-after", "x-should-retry")


@dataclass(frozen=True, slots=True)
class FrontConfig:
    """``tokens`` empty means no authentication (check_exposure allows that on loopback only)."""

    tokens: tuple[SecretStr, ...] = ()
    ping_seconds: float = 15.0
    validate: Validator | None = None
    max_body_bytes: int = MAX_BODY_BYTES


def load_tokens(settings: Settings) -> tuple[SecretStr, ...]:
    """BATCHD_HTTP_TOKENS (comma-separated) plus BATCHD_HTTP_TOKEN_FILE (one per line, # comments)."""
    raw: list[str] = []
    if settings.http_tokens is not None:
        raw += settings.http_tokens.get_secret_value().split(",")
    if settings.http_token_file is not None:
        try:
            text = settings.http_token_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"BATCHD_HTTP_TOKEN_FILE: cannot read {settings.http_token_file}: {exc}"
            ) from None
        raw += [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    tokens = [token.strip() for token in raw if token.strip()]
    for token in tokens:
        if len(token) < 16 or not token.isascii() or not token.isprintable():
            raise ConfigError(
                "BATCHD_HTTP_TOKENS: every token must be at least 16 printable ASCII characters"
            )
    return tuple(SecretStr(token) for token in dict.fromkeys(tokens))


def check_exposure(host: str, tokens: tuple[SecretStr, ...]) -> None:
    """A front without tokens would let anyone who can reach it spend the API key: loopback only."""
    if tokens or _is_loopback(host):
        return
    raise ConfigError(
        f"BATCHD_HTTP_HOST={host!r} is not a loopback address and no tokens are configured: set "
        "BATCHD_HTTP_TOKENS or BATCHD_HTTP_TOKEN_FILE (or listen on 127.0.0.1)"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Upstream:
    """Forwards the side endpoints frameworks call to the API with batchd's key, through the SDK."""

    def __init__(self, api_key: SecretStr | None, base_url: str | None = None) -> None:
        self._client = (
            None
            if api_key is None
            else anthropic.AsyncAnthropic(
                api_key=api_key.get_secret_value(), base_url=base_url, max_retries=0
            )
        )

    async def forward(
        self, method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        if self._client is None:
            error = ApiError(
                500,
                "api_error",
                "this batchd front has no API key to forward with (BATCHD_ANTHROPIC_API_KEY)",
                headers={"x-should-retry": "false"},
            )
            return error.status, {"content-type": "application/json", **error.headers}, error.body(None)
        options: Any = {
            "headers": {name: headers[name] for name in _FORWARDED_REQUEST_HEADERS if name in headers},
            "params": dict(query),
        }
        try:
            if method == "GET":
                response = await self._client.get(path, cast_to=httpx2.Response, options=options)
            else:
                response = await self._client.post(
                    path, content=body, cast_to=httpx2.Response, options=options
                )
        except anthropic.APIStatusError as exc:
            response = exc.response
        except anthropic.APITimeoutError:
            error = ApiError(504, "timeout_error", "the API did not answer in time")
            return error.status, {"content-type": "application/json"}, error.body(None)
        except anthropic.APIConnectionError:
            error = ApiError(502, "api_error", "batchd could not reach the API")
            return error.status, {"content-type": "application/json"}, error.body(None)
        kept = {
            name: response.headers[name] for name in _FORWARDED_RESPONSE_HEADERS if name in response.headers
        }
        return response.status_code, kept, response.content

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()


class _Recent:
    """fingerprint -> request id of requests without Idempotency-Key, bounded in size and age."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def get(self, key: str) -> str | None:
        item = self._items.get(key)
        if item is None or time.monotonic() - item[1] > RECENT_SECONDS:
            return None
        return item[0]

    def put(self, key: str, rid: str) -> None:
        self._items[key] = (rid, time.monotonic())
        self._items.move_to_end(key)
        while len(self._items) > RECENT_MAX:
            self._items.popitem(last=False)


def _json(status: int, body: bytes, rid: str | None, extra: Mapping[str, str] | None = None) -> web.Response:
    headers = {"content-type": "application/json", **(extra or {})}
    if rid is not None:
        headers.update({"request-id": rid, "batchd-request-id": rid})
    return web.Response(status=status, body=body, headers=headers)


def _error(error: ApiError, rid: str | None) -> web.Response:
    return _json(error.status, error.body(rid), rid, error.headers)


def _answer(answer: Answer, rid: str) -> web.Response:
    return _json(answer.status, answer.body, rid, answer.headers)


def _pending(rid: str) -> web.Response:
    body = orjson.dumps({"type": "batchd_request", "id": rid, "status": "pending"})
    return _json(202, body, rid, {"location": f"/v1/batchd/requests/{rid}"})


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


class Front:
    """The aiohttp application of the front, over one Backend."""

    def __init__(self, backend: Backend, config: FrontConfig, upstream: Upstream | None = None) -> None:
        self.backend = backend
        self.config = config
        self.upstream = upstream if upstream is not None else Upstream(None)
        self._recent = _Recent()
        # sha256 of each token: compared in constant time, and the scope of a caller's retries.
        self._token_digests = tuple(
            hashlib.sha256(t.get_secret_value().encode()).digest() for t in config.tokens
        )

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_get("/v1/batchd/requests/{rid}", self._collect)
        app.router.add_get("/v1/models", self._forward)
        app.router.add_get("/v1/models/{model}", self._forward)
        app.router.add_post("/v1/messages/count_tokens", self._forward)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    # --- auth --------------------------------------------------------------------------------------------
    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not self._token_digests:
            request[_CALLER] = b""
            return await handler(request)
        presented = request.headers.get("x-api-key") or None
        if presented is None:
            scheme, _, value = request.headers.get("authorization", "").partition(" ")
            presented = value.strip() if scheme.lower() == "bearer" else None
        if not presented:
            return _error(ApiError(401, "authentication_error", "x-api-key header is required"), None)
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        # Every token is compared, so the time taken says nothing about which one nearly matched.
        matched = [hmac.compare_digest(digest, known) for known in self._token_digests]
        if not any(matched):
            return _error(ApiError(401, "authentication_error", "invalid x-api-key"), None)
        request[_CALLER] = digest
        return await handler(request)

    # --- POST /v1/messages -------------------------------------------------------------------------------
    async def _messages(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._read_body(request)
            parsed = parse_request(
                "POST", request.path_qs, request.headers.items(), body, validate=self.config.validate
            )
        except ApiError as exc:
            return _error(exc, None)
        del body  # the request's bytes now live in `parsed`, and only until it is queued
        rid = parsed.request_id
        recent_key = None
        if rid is None:
            recent_key = hashlib.sha256(request[_CALLER] + parsed.fingerprint().encode()).hexdigest()
            if _retry_count(request) > 0:
                rid = self._recent.get(recent_key)
        try:
            rid = await self.backend.submit(parsed, rid)
        except Exception as exc:
            return self._failed(exc, rid)
        if recent_key is not None:
            self._recent.put(recent_key, rid)
        stream, respond_async = parsed.stream, parsed.respond_async
        del parsed
        log.debug("request %s queued (stream=%s, async=%s)", rid, stream, respond_async)
        if respond_async:
            return _pending(rid)
        if stream:
            return await self._stream(request, rid)
        return await self._hold(request, rid)

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(413, "request_too_large", f"request body is over the limit of {limit} bytes")
        body = bytearray()
        while chunk := await request.content.readany():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, "request_too_large", f"request body is over the limit of {limit} bytes")
        return bytes(body)

    def _failed(self, exc: BaseException, rid: str | None) -> web.Response:
        error = api_error_for(exc)
        if error.status >= 500 and not isinstance(exc, ApiError):
            log.error("request %s: the backend failed", rid, exc_info=exc)
        return _error(error, rid)

    async def _wait(
        self, request: web.Request, rid: str, on_idle: Callable[[], Awaitable[None]] | None = None
    ) -> bytes | None:
        """Wait for the answer; None if the caller went away first (the request goes on)."""
        waiter = asyncio.ensure_future(self.backend.wait(rid, None))
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=self.config.ping_seconds)
                if done:
                    return waiter.result()
                if _gone(request):
                    log.debug("request %s: caller disconnected; it can collect the answer later", rid)
                    return None
                if on_idle is not None:
                    await on_idle()
        finally:
            if not waiter.done():
                waiter.cancel()

    async def _hold(self, request: web.Request, rid: str) -> web.StreamResponse:
        try:
            line = await self._wait(request, rid)
        except Exception as exc:
            return self._failed(exc, rid)
        if line is None:
            return web.Response(status=499)  # nobody is listening; aiohttp drops it
        return _answer(answer_from_line(line, rid), rid)

    async def _stream(self, request: web.Request, rid: str) -> web.StreamResponse:
        try:
            line = await self.backend.peek(rid)
        except Exception as exc:
            return self._failed(exc, rid)
        if line is not None:
            answer = answer_from_line(line, rid)
            if answer.message is None:  # known before the stream starts: the status says it, as the API does
                return _answer(answer, rid)
        response = web.StreamResponse(
            status=200,
            headers={
                "content-type": sse.CONTENT_TYPE,
                "cache-control": "no-cache",
                "x-accel-buffering": "no",  # nginx: pass the pings through at once
                "request-id": rid,
                "batchd-request-id": rid,
            },
        )
        try:
            await response.prepare(request)
            if line is None:
                line = await self._wait(request, rid, on_idle=lambda: response.write(sse.PING))
                if line is None:
                    return response
            answer = answer_from_line(line, rid)
            if answer.message is not None:
                await response.write(sse.render(answer.message))
            else:
                assert answer.error is not None
                await response.write(sse.error_event(answer.error.envelope(rid)))
            await response.write_eof()
        except ConnectionError:
            log.debug("request %s: caller disconnected mid-stream", rid)
        except Exception as exc:
            # Headers are out: the API reports a failure inside the stream.
            error = api_error_for(exc)
            log.error("request %s: the backend failed", rid, exc_info=exc)
            with contextlib.suppress(ConnectionError):
                await response.write(sse.error_event(error.envelope(rid)))
        return response

    # --- collect -----------------------------------------------------------------------------------------
    async def _collect(self, request: web.Request) -> web.StreamResponse:
        rid = request.match_info["rid"]
        try:
            validate_request_id(rid)
        except InvalidRequestId:
            return _error(ApiError(404, "not_found_error", f"no request {rid[:80]!r}"), None)
        try:
            wait = float(request.query.get("wait", "0"))
        except ValueError:
            wait = math.nan
        if not 0 <= wait <= MAX_COLLECT_WAIT:
            return _error(
                ApiError(400, "invalid_request_error", f"wait: 0 to {MAX_COLLECT_WAIT:g} seconds"), rid
            )
        try:
            line = await (self.backend.wait(rid, wait) if wait > 0 else self.backend.peek(rid))
        except Exception as exc:
            return self._failed(exc, rid)
        if line is None:
            return _pending(rid)
        return _answer(answer_from_line(line, rid), rid)

    # --- the rest ----------------------------------------------------------------------------------------
    async def _forward(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_body(request) if request.method == "POST" else b""
        status, headers, content = await self.upstream.forward(
            request.method, request.path, request.query, request.headers, body
        )
        return web.Response(status=status, body=content, headers=headers)

    async def _not_found(self, request: web.Request) -> web.StreamResponse:
        error = ApiError(
            404, "not_found_error", f"{request.method} {request.path}: no such endpoint on batchd"
        )
        return _json(error.status, error.body(None), None)


def _retry_count(request: web.Request) -> int:
    try:
        return int(request.headers.get("x-stainless-retry-count", "0"))
    except ValueError:
        return 0


async def serve_front(
    backend: Backend,
    config: FrontConfig,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    upstream: Upstream | None = None,
) -> Site:
    """Start the front on ``host:port`` (0: any free port); ``close()`` the result to stop it."""
    check_exposure(host, config.tokens)
    front = Front(backend, config, upstream)
    return await serve_app(front.app(), host, port)


@contextlib.asynccontextmanager
async def front_from_settings(
    settings: Settings, *, host: str | None = None, port: int | None = None
) -> AsyncIterator[Site]:
    """The front over batchd's queue, configured by ``settings`` (BATCHD_HTTP_*), with its own client:
    what ``batchd front`` runs, and ``batchd run`` too when BATCHD_HTTP_PORT is set."""
    from .backend import ClientBackend
    from .client import AsyncClient

    tokens = load_tokens(settings)
    host = host or settings.http_host
    port = (
        port if port is not None else (settings.http_port if settings.http_port is not None else DEFAULT_PORT)
    )
    check_exposure(host, tokens)
    config = FrontConfig(tokens=tokens, ping_seconds=settings.http_ping_seconds)
    upstream = Upstream(settings.anthropic_api_key, settings.anthropic_base_url)
    try:
        async with AsyncClient(settings=settings) as client:
            await client.ping()
            site = await serve_front(ClientBackend(client), config, host, port, upstream=upstream)
            log.info(
                "batchd front listening on %s (%s)",
                site.url,
                f"{len(tokens)} token(s)" if tokens else "no auth: loopback only",
            )
            try:
                yield site
            finally:
                await site.close()
    finally:
        await upstream.aclose()


async def run_front(settings: Settings, *, host: str | None = None, port: int | None = None) -> int:
    """``batchd front``: serve over batchd's queue until SIGTERM or SIGINT."""
    async with front_from_settings(settings, host=host, port=port):
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    return 0
