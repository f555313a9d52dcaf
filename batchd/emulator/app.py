"""aiohttp routes: Message Batches, Messages (and count_tokens), Models, and the /_emulator endpoints."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import mmap
import random
from collections.abc import Callable

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from .. import apispec
from .answers import Answer, ParamError, answer, message_json, prompt_tokens
from .cache import CacheUsage
from .config import EmulatorConfig
from .errors import ApiError, envelope, not_found
from .ids import message_id, request_id
from .results import iter_chunks
from .state import EmulatorState
from .store import BatchMeta
from .table import RequestTable, compile_batch

__all__ = ["BATCH_BODY_LIMIT", "MESSAGES_BODY_LIMIT", "STATE", "create_app"]

log = logging.getLogger(__name__)

BATCH_BODY_LIMIT = 256 * 1024 * 1024  # 268435456 bytes, the documented batch size limit
# Sized create bodies from this size up are read into anonymous pages (see _read_batch_body).
_MAPPED_BODY_BYTES = 1024 * 1024
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
    app.router.add_post("/v1/messages/count_tokens", _count_tokens)
    app.router.add_get("/v1/models", _list_models)
    app.router.add_get("/v1/models/{model_id}", _retrieve_model)
    app.router.add_get("/_emulator/config", _get_config)
    app.router.add_post("/_emulator/config", _set_config)
    app.router.add_get("/_emulator/stats", _get_stats)
    app.router.add_post("/_emulator/reset", _reset)
    app.router.add_get("/_emulator/batches/{batch_id}", _inspect_batch)
    app.router.add_delete("/_emulator/batches/{batch_id}", _forget_batch)
    app.router.add_get("/_emulator/responses", _get_responses)
    app.router.add_post("/_emulator/responses", _set_responses)
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


def _api_key(request: web.Request) -> str | None:
    """The caller's API key: `x-api-key`, else an `Authorization: Bearer` token (what SDK 2.x sends)."""
    key = request.headers.get("x-api-key", "").strip()
    if key:
        return key
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _is_batch_endpoint(path: str) -> bool:
    return path == "/v1/messages/batches" or path.startswith("/v1/messages/batches/")


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
    """Auth, version header, the batch RPM limit, then the rate-limit fault (the API's order)."""
    state = request.app[STATE]
    config, stats = state.config, state.store.stats
    key = _api_key(request)
    if key is None:
        stats.auth_failures += 1
        raise ApiError(
            401, "authentication_error", "invalid x-api-key: send x-api-key or Authorization: Bearer <key>"
        )
    if config.valid_api_keys and key not in config.valid_api_keys:
        stats.auth_failures += 1
        raise ApiError(401, "authentication_error", "invalid x-api-key")
    if not request.headers.get("anthropic-version", "").strip():
        raise ApiError(400, "invalid_request_error", "anthropic-version: header is required")
    if _is_batch_endpoint(request.path):
        stats.api_calls += 1
        wait = state.rpm.admit(key, state.store.clock(), config.rpm_limit)
        if wait is not None:
            stats.rate_limited_rpm += 1
            raise ApiError(
                429,
                "rate_limit_error",
                f"Number of requests has exceeded your per-minute rate limit ({config.rpm_limit} requests "
                "per minute across the Message Batches endpoints).",
                {"retry-after": str(wait)},
            )
    if config.rate_limit_rate and state.rng.random() < config.rate_limit_rate:
        stats.faults_rate_limit += 1
        pause = float(config.retry_after_seconds)
        raise ApiError(
            429,
            "rate_limit_error",
            "Number of requests has exceeded your rate limit (injected by the batchd emulator).",
            {"retry-after": str(int(pause)) if pause.is_integer() else str(pause)},
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
    await _fill(request, body, length)
    return body


async def _read_batch_body(request: web.Request, limit: int) -> bytearray | mmap.mmap:
    """As _read_body, but a sized body goes into anonymous memory pages, which compile_batch gives back to
    the system as it compiles the requests in them (so a 256 MB create peaks near the body plus its table,
    not twice the body)."""
    length = request.content_length
    if length is None or length < _MAPPED_BODY_BYTES:
        return await _read_body(request, limit)
    if length > limit:
        raise _too_large(limit)
    body = mmap.mmap(-1, length)
    try:
        await _fill(request, body, length)
    except BaseException:
        body.close()
        raise
    return body


async def _fill(request: web.Request, body: bytearray | mmap.mmap, length: int) -> None:
    with memoryview(body) as view:
        filled = 0
        while filled < length and (chunk := await request.content.readany()):
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
    if filled < length:
        raise ApiError(400, "invalid_request_error", "Request body ended before its Content-Length")


def _limit(request: web.Request) -> int:
    """A list endpoint's `limit`: 1 to 1000, default 20."""
    raw_limit = request.query.get("limit", "20")
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
    return limit


def _base_url(request: web.Request) -> str:
    # results_url must lead back here: the SDK follows it verbatim (a production URL would leak the key).
    return f"{request.scheme}://{request.host}"


# --- Message Batches ------------------------------------------------------------------------------


def _batch_meta(request: web.Request) -> BatchMeta:
    """The create call's key and headers: they apply to every request of the batch."""
    return BatchMeta(
        api_key=_api_key(request) or "",
        betas=apispec.parse_betas(request.headers.getall("anthropic-beta", [])),
        anthropic_version=request.headers.get("anthropic-version"),
        workspace_id=request.headers.get("anthropic-workspace-id") or None,
    )


async def _create_batch(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    config, stats = state.config, state.store.stats
    meta = _batch_meta(request)
    try:
        body = await _read_batch_body(request, BATCH_BODY_LIMIT)
        # Its own generator, seeded from the shared one, keeps draws reproducible although the work
        # runs in a thread (so a 256 MB parse does not stall every other connection).
        batch_rng = random.Random(state.rng.getrandbits(64))
        table = await asyncio.to_thread(
            compile_batch,
            body,
            errored_rate=config.errored_rate,
            expired_rate=config.expired_rate,
            rng=batch_rng,
            betas=meta.betas,
            canned=state.canned,
        )
    except ApiError:
        stats.batches_rejected += 1
        raise
    del body  # the last reference but the compile thread's (a mapped body is unmapped with it)

    # Once the API has the whole body, the create no longer depends on the connection: the rest runs as
    # its own task, which a cancelled handler (a client that hung up) does not cancel.
    task = asyncio.ensure_future(_finish_create(state, table, meta, _base_url(request)))
    state.pending.add(task)
    task.add_done_callback(_forget_pending(state))
    return await asyncio.shield(task)


def _forget_pending(state: EmulatorState) -> Callable[[asyncio.Task[web.Response]], None]:
    def done(task: asyncio.Task[web.Response]) -> None:
        state.pending.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved, so an error nobody awaited any more is not logged as lost

    return done


async def _finish_create(
    state: EmulatorState, table: RequestTable, meta: BatchMeta, base_url: str
) -> web.Response:
    config, stats = state.config, state.store.stats
    if config.create_delay_seconds:
        await asyncio.sleep(config.create_delay_seconds)
    if config.queue_limit:
        queued, soonest = state.store.queued_requests(meta.api_key)
        if queued + len(table) > config.queue_limit:
            stats.rate_limited_queue += 1
            now = state.store.clock()
            wait = max(1, math.ceil(soonest - now)) if soonest is not None else 60
            raise ApiError(
                429,
                "rate_limit_error",
                f"Number of requests in the processing queue would exceed your limit: {queued} queued + "
                f"{len(table)} in this batch > {config.queue_limit}. Retry once some batches have ended.",
                {"retry-after": str(wait)},
            )
    if config.create_error_rate and state.rng.random() < config.create_error_rate:
        stats.faults_create_error += 1
        if state.rng.random() < 0.5:
            raise ApiError(500, "api_error", "Internal server error")
        raise ApiError(529, "overloaded_error", "Overloaded")
    batch = state.store.add(table, config, meta)
    if config.create_lost_response_rate and state.rng.random() < config.create_lost_response_rate:
        stats.faults_create_lost_response += 1
        raise ApiError(500, "api_error", "Internal server error")
    return _json(batch.to_json(state.store.clock(), base_url))


async def _list_batches(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    query = request.query
    limit = _limit(request)
    after_id, before_id = query.get("after_id"), query.get("before_id")
    if after_id is not None and before_id is not None:
        raise ApiError(400, "invalid_request_error", "Only one of after_id and before_id may be given")
    page, has_more = state.store.page(limit, after_id, before_id)
    state.store.stats.list_calls += 1
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
    state.store.stats.retrieve_calls += 1
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


async def _json_object(request: web.Request, limit: int) -> dict[str, object]:
    body = await _read_body(request, limit)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_request_error", f"Request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request_error", "Request body should be a JSON object")
    return data


def _betas(request: web.Request) -> tuple[str, ...]:
    return apispec.parse_betas(request.headers.getall("anthropic-beta", []))


async def _create_message(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    params = await _json_object(request, MESSAGES_BODY_LIMIT)
    state.store.stats.realtime_requests += 1
    try:
        ans = answer(params, betas=_betas(request), in_batch=False, canned=state.canned)
    except ParamError as exc:
        raise ApiError(400, "invalid_request_error", str(exc)) from None
    if params.get("stream") is True:
        raise ApiError(
            400, "invalid_request_error", "stream: streaming is not emulated by the batchd emulator"
        )
    usage = _realtime_cache(request, ans)
    msg_id = message_id(_REQUEST_ID.get() or request_id(), 0)
    return _json(
        message_json(
            msg_id,
            ans.model,
            ans.text,
            ans.input_tokens - usage.tokens,
            ans.output_tokens,
            "standard",
            content=ans.content,
            stop_reason=ans.stop_reason,
            cache_write_5m=usage.write_5m,
            cache_write_1h=usage.write_1h,
            cache_read=usage.read,
        )
    )


def _realtime_cache(request: web.Request, ans: Answer) -> CacheUsage:
    """A real-time call reads any write of its key; its own write is never read by batch requests."""
    if ans.cache is None:
        return CacheUsage()
    state = request.app[STATE]
    now = state.store.clock()
    usage = state.store.cache.use(
        _api_key(request) or "",
        ans.cache,
        at=now,
        visible_at=now + state.config.cache_visibility_seconds,
        from_batch=False,
        min_tokens=state.config.cache_min_tokens,
        now=now,
    )
    if usage is None:
        return CacheUsage()
    state.store.stats.note_cache(usage.read > 0)
    return usage


async def _count_tokens(request: web.Request) -> web.StreamResponse:
    params = await _json_object(request, MESSAGES_BODY_LIMIT)
    try:
        apispec.check_count_tokens_params(params, betas=_betas(request))
    except ParamError as exc:
        raise ApiError(400, "invalid_request_error", str(exc)) from None
    total, _ = prompt_tokens(params)
    return _json({"input_tokens": total})


# --- Models ---------------------------------------------------------------------------------------------


def _model_json(spec: apispec.ModelSpec) -> dict[str, object]:
    return {
        "type": "model",
        "id": spec.id,
        "display_name": spec.display_name,
        "created_at": spec.created_at,
        "lifecycle": "active",
        "max_tokens": spec.max_tokens,
    }


async def _list_models(request: web.Request) -> web.StreamResponse:
    specs = list(apispec.models())
    limit = _limit(request)
    ids = [spec.id for spec in specs]
    after_id, before_id = request.query.get("after_id"), request.query.get("before_id")
    if after_id is not None and before_id is not None:
        raise ApiError(400, "invalid_request_error", "Only one of after_id and before_id may be given")
    for name, cursor in (("after_id", after_id), ("before_id", before_id)):
        if cursor is not None and cursor not in ids:
            raise ApiError(400, "invalid_request_error", f"{name}: no model with id {cursor!r}")
    if before_id is not None:
        newer = specs[: ids.index(before_id)]
        page, has_more = newer[max(0, len(newer) - limit) :], len(newer) > limit
    else:
        rest = specs[ids.index(after_id) + 1 :] if after_id is not None else specs
        page, has_more = rest[:limit], len(rest) > limit
    return _json(
        {
            "data": [_model_json(spec) for spec in page],
            "has_more": has_more,
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
        }
    )


async def _retrieve_model(request: web.Request) -> web.StreamResponse:
    name = request.match_info["model_id"]
    spec = apispec.model_spec(name)
    if spec is None:
        raise not_found(f"model: {name}")
    return _json(_model_json(spec))


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


async def _inspect_batch(request: web.Request) -> web.StreamResponse:
    """What a batch was created with (no transient 404: this is the harness's view, not the API's)."""
    ident = request.match_info["batch_id"]
    info = request.app[STATE].batch_info(ident)
    if info is None:
        raise not_found(f"No message batch with id {ident!r}.")
    return _json(info)


async def _forget_batch(request: web.Request) -> web.StreamResponse:
    """Forget a batch in any state, as an API that restarted and lost it would: 404 everywhere after."""
    ident = request.match_info["batch_id"]
    if request.app[STATE].store.forget(ident) is None:
        raise not_found(f"No message batch with id {ident!r}.")
    return _json({"id": ident, "type": "message_batch_forgotten"})


async def _get_responses(request: web.Request) -> web.StreamResponse:
    return _json(request.app[STATE].responses())


async def _set_responses(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_request_error", f"Request body is not valid JSON: {exc}") from None
    try:
        return _json(state.set_responses(data))
    except ValueError as exc:
        raise ApiError(400, "invalid_request_error", str(exc)) from None
