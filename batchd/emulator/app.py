"""aiohttp routes: the Message Batches API, POST /v1/messages, and the /_emulator control endpoints."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from .answers import ParamError, answer, message_json
from .config import EmulatorConfig
from .errors import ApiError, envelope
from .ids import message_id, request_id
from .results import iter_chunks
from .state import EmulatorState
from .table import compile_batch

__all__ = ["BATCH_BODY_LIMIT", "MESSAGES_BODY_LIMIT", "STATE", "create_app"]

log = logging.getLogger(__name__)

BATCH_BODY_LIMIT = 256 * 1024 * 1024  # 268435456 bytes, the documented batch size limit
MESSAGES_BODY_LIMIT = 32 * 1024 * 1024  # the Messages API's own limit

STATE = web.AppKey("batchd_emulator_state", EmulatorState)

# The id of the request being handled: set by the middleware, read when headers go out (including for
# streamed results and for answers aiohttp builds itself), so header and error body always agree.
_REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "batchd_emulator_request_id", default=None
)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def create_app(
    config: EmulatorConfig | None = None, *, state: EmulatorState | None = None
) -> web.Application:
    """The emulator as an aiohttp application; `config` is shared, so later changes to it apply.

    Pass `state` instead to serve batches that outlive one app (EmulatorThread restarts keep them).
    """
    # One byte over the batch limit: aiohttp's own check then never fires before ours.
    app = web.Application(middlewares=[_api_middleware], client_max_size=BATCH_BODY_LIMIT + 1)
    app[STATE] = state if state is not None else EmulatorState(config)
    app.on_response_prepare.append(_add_request_id)
    app.router.add_post("/v1/messages/batches", _create_batch)
    app.router.add_get("/v1/messages/batches", _list_batches)
    app.router.add_get("/v1/messages/batches/{batch_id}", _retrieve_batch)
    app.router.add_delete("/v1/messages/batches/{batch_id}", _delete_batch)
    app.router.add_post("/v1/messages/batches/{batch_id}/cancel", _cancel_batch)
    app.router.add_get("/v1/messages/batches/{batch_id}/results", _batch_results)
    app.router.add_post("/v1/messages", _create_message)
    app.router.add_get("/_emulator/config", _get_config)
    app.router.add_post("/_emulator/config", _set_config)
    app.router.add_get("/_emulator/stats", _get_stats)
    app.router.add_post("/_emulator/reset", _reset)
    return app


# --- plumbing -------------------------------------------------------------------------------------


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["request-id"] = _REQUEST_ID.get() or request_id()


def _json(data: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, headers=headers, content_type="application/json"
    )


def _error_response(
    status: int, error_type: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return _json(envelope(error_type, message, _REQUEST_ID.get()), status, headers)


def _authenticated(request: web.Request) -> bool:
    if request.headers.get("x-api-key", "").strip():
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and bool(token.strip())


@web.middleware
async def _api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    _REQUEST_ID.set(request_id())
    try:
        if request.path.startswith("/v1/"):
            _check_api_call(request)
        return await handler(request)
    except ApiError as exc:
        return _error_response(exc.status, exc.error_type, exc.message, exc.headers)
    except ConnectionError:
        # The client went away (e.g. killed mid-upload): aiohttp drops the connection quietly.
        raise
    except web.HTTPException as exc:
        # aiohttp's own 404/405/413...: same envelope as everything else, keeping headers such as Allow.
        if exc.status < 400:
            raise
        error_type = _ERROR_TYPES.get(
            exc.status, "api_error" if exc.status >= 500 else "invalid_request_error"
        )
        headers = {
            k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")
        }
        return _error_response(exc.status, error_type, exc.reason, headers)
    except Exception:
        log.exception("emulator handler failed on %s %s", request.method, request.path)
        return _error_response(500, "api_error", "Internal server error")


def _check_api_call(request: web.Request) -> None:
    """Auth, version header, then the rate-limit fault: the order the real API would apply them."""
    state = request.app[STATE]
    if not _authenticated(request):
        state.store.stats.auth_failures += 1
        raise ApiError(
            401, "authentication_error", "invalid x-api-key: send x-api-key or Authorization: Bearer <key>"
        )
    if not request.headers.get("anthropic-version", "").strip():
        raise ApiError(400, "invalid_request_error", "anthropic-version: header is required")
    if state.config.rate_limit_rate and state.rng.random() < state.config.rate_limit_rate:
        state.store.stats.faults_rate_limit += 1
        wait = float(state.config.retry_after_seconds)
        raise ApiError(
            429,
            "rate_limit_error",
            "Number of requests has exceeded your rate limit (injected by the batchd emulator).",
            {"retry-after": str(int(wait)) if wait.is_integer() else str(wait)},
        )


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413, "request_too_large", f"Request exceeds the maximum allowed number of bytes ({limit})."
    )


async def _read_body(request: web.Request, limit: int) -> bytearray:
    """The body, refused with 413 as soon as it is known to exceed `limit` (before reading, if it says so).

    Read into one preallocated buffer: aiohttp's request.read() would hold the body twice at its peak.
    """
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    if length is None:
        grown = bytearray()
        while chunk := await request.content.readany():
            grown += chunk
            if len(grown) > limit:
                raise _too_large(limit)
        return grown
    body = bytearray(length)
    with memoryview(body) as view:
        filled = 0
        while filled < length and (chunk := await request.content.readany()):
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
    if filled < length:
        raise ApiError(400, "invalid_request_error", "Request body ended before its Content-Length")
    return body


def _base_url(request: web.Request) -> str:
    # results_url must lead back here: the SDK follows it verbatim (a production URL would leak the key).
    return f"{request.scheme}://{request.host}"


# --- Message Batches ------------------------------------------------------------------------------


async def _create_batch(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    config, stats = state.config, state.store.stats
    try:
        body = await _read_body(request, BATCH_BODY_LIMIT)
        # Its own generator, seeded from the shared one, keeps draws reproducible although the work
        # runs in a thread (so a 256 MB parse does not stall every other connection).
        batch_rng = random.Random(state.rng.getrandbits(64))
        table = await asyncio.to_thread(
            compile_batch,
            body,
            errored_rate=config.errored_rate,
            expired_rate=config.expired_rate,
            rng=batch_rng,
        )
    except ApiError:
        stats.batches_rejected += 1
        raise
    del body

    if config.create_error_rate and state.rng.random() < config.create_error_rate:
        stats.faults_create_error += 1
        if state.rng.random() < 0.5:
            raise ApiError(500, "api_error", "Internal server error")
        raise ApiError(529, "overloaded_error", "Overloaded")
    batch = state.store.add(table, config)
    if config.create_lost_response_rate and state.rng.random() < config.create_lost_response_rate:
        stats.faults_create_lost_response += 1
        raise ApiError(500, "api_error", "Internal server error")
    return _json(batch.to_json(state.store.clock(), _base_url(request)))


async def _list_batches(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    query = request.query
    raw_limit = query.get("limit", "20")
    try:
        limit = int(raw_limit)
    except ValueError:
        raise ApiError(
            400, "invalid_request_error", f"limit: Input should be a valid integer, got {raw_limit!r}"
        ) from None
    if not 1 <= limit <= 1000:
        raise ApiError(
            400, "invalid_request_error", f"limit: Input should be between 1 and 1000, got {limit}"
        )
    after_id, before_id = query.get("after_id"), query.get("before_id")
    if after_id is not None and before_id is not None:
        raise ApiError(400, "invalid_request_error", "Only one of after_id and before_id may be given")
    page, has_more = state.store.page(limit, after_id, before_id)
    now, base = state.store.clock(), _base_url(request)
    return _json(
        {
            "data": [b.to_json(now, base) for b in page],
            "has_more": has_more,
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
        }
    )


async def _retrieve_batch(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    batch = state.store.lookup(request.match_info["batch_id"])
    return _json(batch.to_json(state.store.clock(), _base_url(request)))


async def _cancel_batch(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    store = state.store
    batch = store.lookup(request.match_info["batch_id"])
    # Canceling or ended already: answered unchanged, like a repeated cancel (idempotent for retries).
    if batch.cancel(store.clock(), state.config.cancel_seconds):
        store.stats.batches_canceled += 1
    return _json(batch.to_json(store.clock(), _base_url(request)))


async def _delete_batch(request: web.Request) -> web.StreamResponse:
    store = request.app[STATE].store
    batch = store.lookup(request.match_info["batch_id"])
    store.delete(batch)
    return _json({"id": batch.id, "type": "message_batch_deleted"})


async def _batch_results(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    store = state.store
    batch = store.lookup(request.match_info["batch_id"])
    outcome = batch.outcome(store.clock())
    if outcome is None:
        raise ApiError(
            400,
            "invalid_request_error",
            f"Message batch {batch.id} has not ended yet (processing_status: {batch.status(store.clock())}); "
            "results are available once it has ended.",
        )
    store.stats.results_downloads += 1
    cut: tuple[int, float] | None = None
    if state.config.results_cut_rate and state.rng.random() < state.config.results_cut_rate:
        store.stats.results_cut += 1
        cut = (state.rng.randrange(len(batch)), state.rng.random())

    response = web.StreamResponse(headers={"Content-Type": "application/x-jsonl"})
    await response.prepare(request)
    try:
        for chunk in iter_chunks(batch, outcome, cut):
            await response.write(chunk)
        if cut is None:
            await response.write_eof()
            return response
    except ConnectionResetError:
        # The client went away mid-download; nothing to tell it.
        return response
    _drop_connection(request)
    return response


def _drop_connection(request: web.Request) -> None:
    """Close the socket without ending the chunked body, so the client sees a broken download."""
    transport = request.transport
    if transport is not None:
        # close() (not abort()) first flushes what was written, so the client really gets a prefix.
        transport.close()


# --- Messages (real time) -------------------------------------------------------------------------


async def _create_message(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await _read_body(request, MESSAGES_BODY_LIMIT)
    try:
        params = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_request_error", f"Request body is not valid JSON: {exc}") from None
    if not isinstance(params, dict):
        raise ApiError(400, "invalid_request_error", "Request body should be a JSON object")
    state.store.stats.realtime_requests += 1
    try:
        ans = answer(params, streaming_message="stream: streaming is not emulated by the batchd emulator")
    except ParamError as exc:
        raise ApiError(400, "invalid_request_error", str(exc)) from None
    msg_id = message_id(_REQUEST_ID.get() or request_id(), 0)
    return _json(message_json(msg_id, ans.model, ans.text, ans.input_tokens, ans.output_tokens, "standard"))


# --- control endpoints (no auth: they are the test harness's, not the API's) ----------------------


async def _get_config(request: web.Request) -> web.StreamResponse:
    return _json(request.app[STATE].config.as_dict())


async def _set_config(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_request_error", f"Request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request_error", "Request body should be a JSON object of knobs")
    try:
        return _json(state.configure(data))
    except ValueError as exc:
        raise ApiError(400, "invalid_request_error", str(exc)) from None


async def _get_stats(request: web.Request) -> web.StreamResponse:
    return _json(request.app[STATE].stats())


async def _reset(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.reset()
    return _json(state.stats())
