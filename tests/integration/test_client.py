"""AsyncClient and Client against a real (private) redis-server.

The daemon's half of the protocol is played by hand with the same Lua scripts the daemon runs: read the
intake stream as the consumer group, commit_flush + seal_flush, then deliver a results line. That keeps
these tests about the client: what it writes, how it waits, and what it raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import anthropic
import anthropic.types
import orjson
import pytest
import redis
import redis.asyncio as aioredis
from anthropic.types.messages import (
    MessageBatchCanceledResult,
    MessageBatchErroredResult,
    MessageBatchSucceededResult,
)

from batchd import (
    AsyncClient,
    Client,
    ClientClosed,
    InvalidParams,
    InvalidRequest,
    InvalidRequestId,
    RequestCanceled,
    RequestConflict,
    RequestErrored,
    RequestExpired,
    RequestNotFound,
    RequestTooLarge,
    ResultTimeout,
)
from batchd import client as client_module
from batchd.settings import Settings
from batchd.store import (
    DeliverOutcome,
    Delivery,
    IntakeEntry,
    Keys,
    RequestState,
    Store,
    Trigger,
    custom_id_for,
    now_ms,
)
from tests.eventually import eventually

K = Keys()
T = TypeVar("T")
TTL = 3600
# Above this the waiter's periodic sweep (5 s) could be what answered, not the pub/sub wake-up.
WAKE_UP_BOUND = 2.0

Result = dict[str, Any]
Responder = Callable[[dict[str, Any]], Result]


def params(text: str = "hello") -> dict[str, Any]:
    return {"model": "claude-x", "max_tokens": 16, "messages": [{"role": "user", "content": text}]}


def succeeded(text: str = "hi there") -> Result:
    return {
        "type": "succeeded",
        "message": {
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": "claude-x",
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 3, "output_tokens": 2},
        },
    }


def errored(error_type: str = "invalid_request_error", message: str = "max_tokens: too large") -> Result:
    return {"type": "errored", "error": {"type": "error", "error": {"type": error_type, "message": message}}}


def echo(request: dict[str, Any]) -> Result:
    """A responder that proves the answer belongs to the request: it echoes the user's text."""
    return succeeded("echo: " + request["messages"][0]["content"])


# --- the daemon's side, by hand --------------------------------------------------------------------------
class DaemonDouble:
    """Flush and deliver with the real Lua scripts, through the storage layer the daemon uses."""

    def __init__(self, r: aioredis.Redis) -> None:
        self.store = Store(r, K)
        self._flushes = 0

    async def flush(self, block_ms: int | None = None) -> list[str]:
        """Move every new intake entry into one sealed flush; returns the rids moved (in order)."""
        return (await self._flush(block_ms))[1]

    async def _flush(self, block_ms: int | None = None) -> tuple[str, list[str]]:
        await self.store.intake.ensure_group()
        entries = await self.store.intake.read_new("double", count=100_000, block_ms=block_ms)
        if not entries:
            return "", []
        self._flushes += 1
        fid = f"f{self._flushes}"
        for start in range(0, len(entries), 5000):
            chunk = entries[start : start + 5000]
            await self.store.scripts.commit_flush(
                fid, [e.entry_id for e in chunk], [e.rid for e in chunk], now_ms=now_ms()
            )
        await self.store.scripts.seal_flush(fid, Trigger.COUNT, now_ms=now_ms())
        return fid, [e.rid for e in entries]

    async def deliver(self, rid: str, result: Result, attempt: int = 1) -> DeliverOutcome:
        line = orjson.dumps({"custom_id": custom_id_for(rid, attempt), "result": result})
        [reply] = await self.store.scripts.deliver(
            [Delivery(rid, attempt, line, retry=False)], max_attempts=3, ttl_seconds=TTL
        )
        return reply.outcome

    async def answer_next(self, respond: Responder, within: float = 10.0) -> list[str]:
        """Wait for submitted requests, flush them, and answer each with ``respond(params)``."""
        async with asyncio.timeout(within):
            rids: list[str] = []
            while not rids:
                fid, rids = await self._flush(block_ms=100)
        for item in await self.store.flush_items(fid):
            assert await self.deliver(item.rid, respond(orjson.loads(item.body))) is DeliverOutcome.DELIVERED
        return rids


class SyncDaemonDouble:
    """The same, for tests of the sync Client: each call runs the async double on a connection of its own
    (in the test thread or a helper thread)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _run(self, call: Callable[[DaemonDouble], Awaitable[T]]) -> T:
        async def main() -> T:
            async with aioredis.Redis.from_url(self.url) as r:
                return await call(DaemonDouble(r))

        return asyncio.run(main())

    def pending(self) -> int:
        return self._run(lambda d: d.store.snapshot(dead_after_ms=10_000)).pending_requests

    def flush(self) -> list[str]:
        return self._run(lambda d: d.flush())

    def deliver(self, rid: str, result: Result) -> DeliverOutcome:
        return self._run(lambda d: d.deliver(rid, result))

    def answer_next(self, respond: Responder) -> None:
        self._run(lambda d: d.answer_next(respond))


@pytest.fixture
def daemon(aredis: aioredis.Redis) -> DaemonDouble:
    return DaemonDouble(aredis)


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(result_ttl_seconds=TTL)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(settings=settings) as c:
        yield c


@pytest.fixture
def sync_client(settings: Settings) -> Iterator[Client]:
    with Client(settings=settings) as c:
        yield c


def listener_subscribed(r: aioredis.Redis) -> Callable[[], Awaitable[bool]]:
    """True once some client's result listener is subscribed to the delivered channel."""

    async def check() -> bool:
        reply = await r.pubsub_numsub(K.delivered_channel)
        return int(reply[0][1]) > 0

    return check


async def stream(store: Store) -> list[IntakeEntry]:
    """The intake stream as it stands, without reading it as a consumer."""
    raw = await store.redis.xrange(K.intake)
    return [e for i, f in raw if (e := IntakeEntry.from_stream(i, f)) is not None]


async def bodies(store: Store, daemon: DaemonDouble) -> dict[str, Any]:
    """Flush everything queued and return each request's stored params, by request id."""
    fid, _ = await daemon._flush()
    return {item.rid: orjson.loads(item.body) for item in await store.flush_items(fid)}


# --- submit ----------------------------------------------------------------------------------------------
async def test_submit_writes_the_request_and_one_stream_entry(
    client: AsyncClient, store: Store, daemon: DaemonDouble
) -> None:
    p = params()
    rid = await client.submit(p)

    record = await store.request(rid)
    assert record is not None and (record.state, record.attempts) == (RequestState.QUEUED, 1)
    [entry] = await stream(store)
    assert (entry.rid, entry.custom_id, entry.params_bytes) == (rid, f"{rid}-1", record.params_bytes)
    assert (await store.snapshot(dead_after_ms=10_000)).pending_requests == 1
    assert await bodies(store, daemon) == {rid: p}


async def test_submit_many_returns_ids_in_order(
    client: AsyncClient, store: Store, daemon: DaemonDouble
) -> None:
    texts = [f"q{i}" for i in range(1200)]  # more than one enqueue chunk (500)
    rids = await client.submit_many([params(t) for t in texts])

    assert len(rids) == len(set(rids)) == len(texts)
    assert [e.rid for e in await stream(store)] == rids
    stored = await bodies(store, daemon)
    assert [stored[rid] for rid in rids] == [params(t) for t in texts]


async def test_submit_many_with_caller_ids(client: AsyncClient, store: Store) -> None:
    assert await client.submit_many([params("a"), params("b")], ["id-a", "id-b"]) == ["id-a", "id-b"]
    assert await store.request_states(["id-a", "id-b"]) == {
        "id-a": RequestState.QUEUED,
        "id-b": RequestState.QUEUED,
    }


async def test_same_request_id_twice_is_one_request(
    client: AsyncClient, store: Store, daemon: DaemonDouble
) -> None:
    assert await client.submit(params("first"), "order-42") == "order-42"
    assert await client.submit(params("first"), "order-42") == "order-42"

    assert len(await stream(store)) == 1
    assert (await store.snapshot(dead_after_ms=10_000)).pending_requests == 1
    assert await bodies(store, daemon) == {"order-42": params("first")}


async def test_a_known_id_with_other_params_is_a_conflict_and_writes_nothing(
    client: AsyncClient, aredis: aioredis.Redis
) -> None:
    await client.submit(params("first"), "order-7")
    keys = sorted(await aredis.keys("*"))
    with pytest.raises(RequestConflict) as info:
        await client.submit(params("second"), "order-7")
    assert info.value.request_id == "order-7" and "order-7" in str(info.value)
    with pytest.raises(RequestConflict):  # the same id twice in one call, with two bodies
        await client.submit_many([params("x"), params("y")], ["twice", "twice"])
    assert sorted(await aredis.keys("*")) == keys
    assert await client.submit(params("first"), "order-7") == "order-7"  # the same params: idempotent


async def test_concurrent_submits_are_queued_together(
    client: AsyncClient, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    enqueue = store.scripts.enqueue.__func__  # type: ignore[attr-defined]

    async def counted(self: Any, requests: Any, **kwargs: Any) -> Any:
        calls.append(len(requests))
        return await enqueue(self, requests, **kwargs)

    monkeypatch.setattr(type(client._store.scripts), "enqueue", counted)
    rids = await asyncio.gather(*(client.submit(params(f"c{i}")) for i in range(1200)))

    assert len(set(rids)) == 1200 and len(await stream(store)) == 1200
    assert sum(calls) == 1200 and len(calls) <= 4  # chunks of 500, not a call each

    # Cut by bytes too, as submit_many is: Redis buffers a whole call before it runs it.
    calls.clear()
    monkeypatch.setattr(client_module, "_SUBMIT_CHUNK_BYTES", 3 * len(orjson.dumps(params("b0"))))
    await asyncio.gather(*(client.submit(params(f"b{i}")) for i in range(9)))
    assert calls == [3, 3, 3]


async def test_a_conflict_among_concurrent_submits_fails_only_its_own_caller(
    client: AsyncClient, store: Store
) -> None:
    await client.submit(params("first"), "order-9")
    outcomes = await asyncio.gather(
        client.submit(params("a"), "fine-1"),
        client.submit(params("second"), "order-9"),  # known with other params
        client.submit(params("b"), "fine-2"),
        client.submit(params("x"), "twice"),
        client.submit(params("y"), "twice"),  # the same id as another call, other params
        return_exceptions=True,
    )
    assert outcomes[0] == "fine-1" and outcomes[2] == "fine-2"
    assert isinstance(outcomes[1], RequestConflict) and outcomes[1].request_id == "order-9"
    assert sorted(map(type, outcomes[3:]), key=str) == sorted([str, RequestConflict], key=str)
    assert {e.rid for e in await stream(store)} == {"order-9", "fine-1", "fine-2", "twice"}


@pytest.mark.parametrize(
    ("bad", "exc_type"),
    [
        ({"model": "claude-x", "max_tokens": 16}, InvalidParams),
        ({**params(), "stream": True}, InvalidParams),
        ({**params(), "metadata": object()}, InvalidParams),
        ({**params(), "system": "s" * 2_000_000}, RequestTooLarge),
    ],
    ids=["missing-messages", "stream", "not-json", "too-large"],
)
async def test_invalid_params_write_nothing(
    make_settings: Callable[..., Settings], aredis: aioredis.Redis, bad: dict[str, Any], exc_type: type
) -> None:
    async with AsyncClient(settings=make_settings(max_batch_bytes=1_000_000)) as client:
        with pytest.raises(exc_type):
            await client.submit(bad)
        # One bad request in a batch refuses the whole batch before anything is written.
        with pytest.raises(exc_type):
            await client.submit_many([params("ok"), bad, params("ok too")])
    assert await aredis.dbsize() == 0


@pytest.mark.parametrize("rid", ["", "has space", "x" * 61, "dot.ted"])
async def test_invalid_request_id_writes_nothing(
    client: AsyncClient, aredis: aioredis.Redis, rid: str
) -> None:
    with pytest.raises(InvalidRequestId):
        await client.submit(params(), rid)
    with pytest.raises(InvalidRequest):
        await client.submit_many([params(), params()], ["fine", rid])
    assert await aredis.dbsize() == 0


async def test_mismatched_id_count_writes_nothing(client: AsyncClient, aredis: aioredis.Redis) -> None:
    with pytest.raises(InvalidParams, match="1 request ids for 2 requests"):
        await client.submit_many([params(), params()], ["only-one"])
    assert await aredis.dbsize() == 0


# --- results ---------------------------------------------------------------------------------------------
async def test_result_delivered_before_the_wait(client: AsyncClient, daemon: DaemonDouble) -> None:
    rid = await client.submit(params())
    assert await daemon.flush() == [rid]
    assert await daemon.deliver(rid, succeeded("early")) is DeliverOutcome.DELIVERED

    result = await client.result(rid, timeout=5)

    assert isinstance(result, MessageBatchSucceededResult)
    assert result.message.content[0].text == "early"  # type: ignore[union-attr]


async def test_result_delivered_while_waiting(
    client: AsyncClient, daemon: DaemonDouble, aredis: aioredis.Redis
) -> None:
    rid = await client.submit(params())
    await daemon.flush()
    waiting = asyncio.create_task(client.result(rid, timeout=30))
    # The client's listener is subscribed: from here a delivery can only reach it by wake-up or by its GET.
    await eventually(listener_subscribed(aredis), timeout=5, what="the result listener to subscribe")
    assert not waiting.done()

    delivered_at = time.monotonic()
    assert await daemon.deliver(rid, succeeded("late")) is DeliverOutcome.DELIVERED
    result = await waiting

    assert time.monotonic() - delivered_at < WAKE_UP_BOUND
    assert isinstance(result, MessageBatchSucceededResult)
    assert result.message.content[0].text == "late"  # type: ignore[union-attr]


async def test_one_delivery_call_wakes_every_caller_it_answers(
    client: AsyncClient, daemon: DaemonDouble, aredis: aioredis.Redis
) -> None:
    # deliver.lua publishes the rids of a chunk in one message, joined by commas.
    rids = await client.submit_many([params(t) for t in ("one", "two", "three")])
    await daemon.flush()
    waiting = [asyncio.create_task(client.result(rid, timeout=30)) for rid in rids]
    await eventually(listener_subscribed(aredis), timeout=5, what="the result listener to subscribe")
    await asyncio.sleep(0.2)  # every caller's own first read is done: only the wake-up can answer them now
    assert not any(task.done() for task in waiting)

    delivered_at = time.monotonic()
    lines = [
        Delivery(rid, 1, orjson.dumps({"custom_id": custom_id_for(rid, 1), "result": succeeded(rid)}), False)
        for rid in rids
    ]
    replies = await daemon.store.scripts.deliver(lines, max_attempts=3, ttl_seconds=TTL)
    assert {reply.outcome for reply in replies} == {DeliverOutcome.DELIVERED}
    results = await asyncio.gather(*waiting)

    assert time.monotonic() - delivered_at < WAKE_UP_BOUND
    texts = [r.message.content[0].text for r in results]  # type: ignore[union-attr]
    assert texts == rids


async def test_peek_does_not_wait(client: AsyncClient, daemon: DaemonDouble) -> None:
    rid = await client.submit(params())
    assert await client.peek(rid) is None
    await daemon.flush()
    await daemon.deliver(rid, succeeded())
    assert isinstance(await client.peek(rid), MessageBatchSucceededResult)


async def test_result_timeout_carries_the_request_id(client: AsyncClient) -> None:
    rid = await client.submit(params())
    started = time.monotonic()

    with pytest.raises(ResultTimeout) as info:
        await client.result(rid, timeout=0.2)

    assert 0.2 <= time.monotonic() - started < 2.0
    assert info.value.request_id == rid
    assert info.value.timeout == 0.2
    assert rid in str(info.value)


async def test_result_after_a_timeout_still_arrives(client: AsyncClient, daemon: DaemonDouble) -> None:
    # A ResultTimeout leaves the request in flight: the same id can be collected later.
    rid = await client.submit(params())
    with pytest.raises(ResultTimeout):
        await client.result(rid, timeout=0.1)
    await daemon.flush()
    await daemon.deliver(rid, succeeded("later"))
    result = await client.result(rid, timeout=5)
    assert isinstance(result, MessageBatchSucceededResult)


async def test_unknown_request_id_is_not_found(client: AsyncClient) -> None:
    with pytest.raises(RequestNotFound) as info:
        await client.result("never-submitted", timeout=1)
    assert info.value.request_id == "never-submitted"
    with pytest.raises(RequestNotFound):
        await client.peek("never-submitted")
    with pytest.raises(RequestNotFound):
        await client.cancel("never-submitted")


async def test_a_new_client_collects_a_result_delivered_while_no_one_waited(
    settings: Settings, daemon: DaemonDouble
) -> None:
    async with AsyncClient(settings=settings) as first:
        rid = await first.submit(params())
    await daemon.flush()
    await daemon.deliver(rid, succeeded("kept"))

    async with AsyncClient(settings=settings) as second:
        result = await second.result(rid, timeout=5)
    assert isinstance(result, MessageBatchSucceededResult)
    assert result.message.content[0].text == "kept"  # type: ignore[union-attr]


# --- messages.create -------------------------------------------------------------------------------------
async def test_messages_create_returns_the_sdk_message(client: AsyncClient, daemon: DaemonDouble) -> None:
    answering = asyncio.create_task(daemon.answer_next(echo))

    message = await client.messages.create(
        model="claude-x", max_tokens=16, messages=[{"role": "user", "content": "ping"}], timeout=10
    )

    assert isinstance(message, anthropic.types.Message)
    assert message.content[0].text == "echo: ping"  # type: ignore[union-attr]
    assert message.usage.output_tokens == 2
    await answering


async def test_messages_create_raises_the_api_error(client: AsyncClient, daemon: DaemonDouble) -> None:
    answering = asyncio.create_task(
        daemon.answer_next(lambda _: errored("invalid_request_error", "bad model"))
    )

    with pytest.raises(RequestErrored) as info:
        await client.messages.create(model="nope", max_tokens=16, messages=[{"role": "user", "content": "x"}])

    (rid,) = await answering
    assert info.value.error_type == "invalid_request_error"
    assert info.value.api_message == "bad model"
    assert info.value.request_id == rid
    assert info.value.result_type == "errored"


async def test_messages_create_raises_canceled(client: AsyncClient, daemon: DaemonDouble) -> None:
    answering = asyncio.create_task(daemon.answer_next(lambda _: {"type": "canceled"}))
    with pytest.raises(RequestCanceled):
        await client.messages.create(
            model="claude-x", max_tokens=16, messages=[{"role": "user", "content": "x"}]
        )
    await answering


async def test_messages_create_raises_expired(client: AsyncClient, daemon: DaemonDouble) -> None:
    answering = asyncio.create_task(daemon.answer_next(lambda _: {"type": "expired"}))
    with pytest.raises(RequestExpired):
        await client.messages.create(
            model="claude-x", max_tokens=16, messages=[{"role": "user", "content": "x"}]
        )
    await answering


async def test_messages_create_timeout_names_the_request(client: AsyncClient, store: Store) -> None:
    with pytest.raises(ResultTimeout) as info:
        await client.messages.create(
            model="claude-x", max_tokens=16, messages=[{"role": "user", "content": "x"}], timeout=0.2
        )
    # The id in the error is the queued request: the caller can collect it later.
    assert await store.request(info.value.request_id) is not None


# --- cancel ----------------------------------------------------------------------------------------------
async def test_cancel_queued_request(client: AsyncClient, store: Store) -> None:
    rid = await client.submit(params())

    assert await client.cancel(rid) is True

    assert isinstance(await client.result(rid, timeout=1), MessageBatchCanceledResult)
    assert (await store.snapshot(dead_after_ms=10_000)).pending_requests == 0


async def test_cancel_wakes_a_waiter(client: AsyncClient, aredis: aioredis.Redis) -> None:
    rid = await client.submit(params())
    waiting = asyncio.create_task(client.result(rid, timeout=30))
    await eventually(listener_subscribed(aredis), timeout=5, what="the result listener to subscribe")

    assert await client.cancel(rid) is True
    assert isinstance(await waiting, MessageBatchCanceledResult)


async def test_cancel_flushed_request_answers_canceled(client: AsyncClient, daemon: DaemonDouble) -> None:
    rid = await client.submit(params())
    await daemon.flush()

    assert await client.cancel(rid) is False

    assert isinstance(await client.result(rid, timeout=1), MessageBatchCanceledResult)
    # The batch's own late answer is then dropped.
    assert await daemon.deliver(rid, succeeded()) is DeliverOutcome.DUPLICATE


async def test_cancel_answered_request_keeps_its_answer(client: AsyncClient, daemon: DaemonDouble) -> None:
    rid = await client.submit(params())
    await daemon.flush()
    await daemon.deliver(rid, errored())

    assert await client.cancel(rid) is False
    assert isinstance(await client.result(rid, timeout=1), MessageBatchErroredResult)


# --- many waiters, few connections -----------------------------------------------------------------------
class ConnectionSampler:
    """Samples CLIENT LIST in the background and keeps the peak number of connections not its own."""

    def __init__(self, r: aioredis.Redis, own_name: str) -> None:
        self._r = r
        self._own = own_name
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    async def count(self) -> int:
        return sum(1 for c in await self._r.client_list() if c.get("name") != self._own)

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, await self.count())
            await asyncio.sleep(0.005)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def test_thousands_of_waiters_share_a_handful_of_connections(
    client: AsyncClient, redis_url: str
) -> None:
    n = 2000
    # The double and the sampler use their own named connections, left out of the count.
    async with (
        aioredis.Redis.from_url(redis_url, client_name="double") as r,
        aioredis.Redis.from_url(redis_url, client_name="double") as sampler_redis,
    ):
        daemon = DaemonDouble(r)
        sampler = ConnectionSampler(sampler_redis, own_name="double")
        rids = await client.submit_many([params(f"q{i}") for i in range(n)])
        assert len(await daemon.flush()) == n

        sampler.start()
        waiters = [asyncio.create_task(client.result(rid, timeout=60)) for rid in rids]
        # Every caller registered with the shared listener (a private attribute, read only here: nothing
        # public says "N callers are waiting").
        await eventually(_all_waiting(client, n), timeout=30, what=f"{n} waiters")
        for i, rid in enumerate(rids):
            await daemon.deliver(rid, succeeded(f"a{i}"))
        results = await asyncio.gather(*waiters)
        await sampler.stop()

    texts = [res.message.content[0].text for res in results]  # type: ignore[union-attr]
    assert texts == [f"a{i}" for i in range(n)]
    # One connection per waiter (BLPOP each) would be ~2000; a shared listener needs a handful.
    assert sampler.peak < 10, f"the client opened {sampler.peak} connections for {n} waiters"


def _all_waiting(client: AsyncClient, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return client._waiter.waiting >= n

    return check


# --- the sync Client -------------------------------------------------------------------------------------
def test_sync_submit_and_result(sync_client: Client, redis_url: str) -> None:
    double = SyncDaemonDouble(redis_url)
    rid = sync_client.submit(params(), "sync-1")
    rids = sync_client.submit_many([params("a"), params("b")])
    assert rid == "sync-1"
    assert len(rids) == 2
    assert double.pending() == 3
    assert sync_client.peek(rid) is None

    assert set(double.flush()) == {rid, *rids}
    assert double.deliver(rid, succeeded("sync")) is DeliverOutcome.DELIVERED

    result = sync_client.result(rid, timeout=5)
    assert isinstance(result, MessageBatchSucceededResult)
    assert result.message.content[0].text == "sync"  # type: ignore[union-attr]
    with pytest.raises(ResultTimeout):
        sync_client.result(rids[0], timeout=0.2)


def test_sync_messages_create(sync_client: Client, redis_url: str) -> None:
    double = SyncDaemonDouble(redis_url)
    answering = threading.Thread(target=double.answer_next, args=(echo,))
    answering.start()
    try:
        message = sync_client.messages.create(
            model="claude-x", max_tokens=16, messages=[{"role": "user", "content": "sync ping"}], timeout=10
        )
    finally:
        answering.join(timeout=15)
    assert isinstance(message, anthropic.types.Message)
    assert message.content[0].text == "echo: sync ping"  # type: ignore[union-attr]


def test_sync_cancel_and_errors(sync_client: Client) -> None:
    rid = sync_client.submit(params())
    assert sync_client.cancel(rid) is True
    assert isinstance(sync_client.result(rid, timeout=1), MessageBatchCanceledResult)
    with pytest.raises(RequestNotFound):
        sync_client.result("no-such-id", timeout=1)
    with pytest.raises(InvalidParams):
        sync_client.submit({"model": "x"})


def test_sync_client_is_shared_by_threads(sync_client: Client) -> None:
    out: list[str] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        rid = sync_client.submit(params(f"t{i}"))
        with lock:
            out.append(rid)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(set(out)) == 16


# --- the shared fixtures' contract (conftest.py) ---------------------------------------------------------
def test_make_settings_defaults_point_at_the_private_redis(
    make_settings: Callable[..., Settings], redis_url: str
) -> None:
    settings = make_settings(max_attempts=5)
    assert settings.redis_url == redis_url
    assert not redis_url.startswith("redis://127.0.0.1:6379/")  # never the machine's shared instance
    assert settings.anthropic_api_key is not None
    assert settings.anthropic_api_key.get_secret_value() == "test-key"
    assert (settings.max_batch_age_seconds, settings.poll_interval_seconds, settings.api_tier) == (
        0.5,
        0.1,
        4,
    )
    assert settings.metrics_port == 0
    assert settings.max_attempts == 5
    assert settings.anthropic_base_url is None  # the emulator only starts when asked for


def test_make_settings_with_the_emulator(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(emulator=True)
    assert settings.anthropic_base_url is not None
    assert settings.anthropic_api_key is not None
    with anthropic.Anthropic(
        base_url=settings.anthropic_base_url,
        api_key=settings.anthropic_api_key.get_secret_value(),
        max_retries=0,
    ) as sdk:
        message = sdk.messages.create(
            model="claude-haiku-4-5", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        )
    assert message.type == "message"


def test_redis_url_starts_each_test_empty(redis_url: str, sync_redis: redis.Redis) -> None:
    # Left behind on purpose: the next test using redis_url must not see it (checked by every
    # `dbsize() == 0` assertion above, whatever the order).
    sync_redis.set("left-behind", 1)
    assert sync_redis.config_get("maxmemory")["maxmemory"] == "0"


# --- after close -----------------------------------------------------------------------------------------
async def test_a_closed_client_refuses_every_call_at_once(settings: Settings) -> None:
    client = AsyncClient(settings=settings)
    rid = await client.submit(params())
    await client.close()
    await client.close()  # closing twice is harmless
    started = time.monotonic()
    for call in (
        lambda: client.submit(params()),
        lambda: client.submit_many([params()]),
        lambda: client.result(rid, timeout=30),
        lambda: client.peek(rid),
        lambda: client.cancel(rid),
        lambda: client.ping(),
        lambda: client.messages.create(model="claude-x", max_tokens=8, messages=[], timeout=30),
    ):
        with pytest.raises(ClientClosed):
            await call()
    assert time.monotonic() - started < 1.0, "a closed client must fail at once, not wait out its timeout"


async def test_closing_a_client_wakes_its_waiters_with_client_closed(
    settings: Settings, aredis: aioredis.Redis
) -> None:
    client = AsyncClient(settings=settings)
    rid = await client.submit(params())
    waiting = [asyncio.create_task(client.result(rid, timeout=60)) for _ in range(3)]
    await eventually(listener_subscribed(aredis), timeout=5, what="the result listener to subscribe")
    await client.close()
    async with asyncio.timeout(2):
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(o, ClientClosed) for o in outcomes), outcomes


def test_a_closed_sync_client_refuses_calls(settings: Settings) -> None:
    client = Client(settings=settings)
    rid = client.submit(params())
    client.close()
    client.close()
    with pytest.raises(ClientClosed):
        client.result(rid, timeout=30)
    with pytest.raises(ClientClosed):
        client.submit(params())


# --- capacity and vanished requests ----------------------------------------------------------------------
@pytest.mark.timeout(180)
async def test_one_client_serves_100000_concurrent_result_calls(
    client: AsyncClient, aredis: aioredis.Redis
) -> None:
    """Every call waits for its turn on the client's few connections; none fails for want of one."""
    n = 100_000
    rids = await client.submit_many([params(f"q{i}") for i in range(n)])
    # Answer them all the way deliver.lua does, minus the bookkeeping (this test is about the waiters).
    for start in range(0, n, 5000):
        async with aredis.pipeline(transaction=False) as pipe:
            for i, rid in enumerate(rids[start : start + 5000], start):
                line = orjson.dumps({"custom_id": custom_id_for(rid, 1), "result": succeeded(f"a{i}")})
                pipe.set(K.result(rid), line)
            await pipe.execute()
    results = await asyncio.gather(*(client.result(rid, timeout=120) for rid in rids))
    assert [r.message.content[0].text for r in results] == [f"a{i}" for i in range(n)]  # type: ignore[union-attr]


async def test_a_waiter_whose_request_vanishes_gets_request_not_found(
    client: AsyncClient, aredis: aioredis.Redis
) -> None:
    """Evicted, expired, or lost with a Redis that restarted empty: the wait ends, it does not hang."""
    rid = await client.submit(params())
    waiting = asyncio.create_task(client.result(rid, timeout=None))
    await eventually(listener_subscribed(aredis), timeout=5, what="the result listener to subscribe")
    await aredis.delete(K.request(rid))
    async with asyncio.timeout(15):  # the listener's sweep runs every 5 s
        with pytest.raises(RequestNotFound):
            await waiting


async def test_a_block_type_the_installed_sdk_does_not_know_still_reaches_the_caller(
    client: AsyncClient, daemon: DaemonDouble
) -> None:
    """Read as the SDK's own decoder reads it (leniently): a paid answer is never dropped for a new block."""

    def with_new_block(_: dict[str, Any]) -> Result:
        result = succeeded("after the new block")
        result["message"]["content"].insert(0, {"type": "mcp_tool_use", "id": "mcptoolu_1", "name": "x"})
        result["message"]["content"].insert(0, {"type": "hologram", "frames": 3})
        return result

    answering = asyncio.create_task(daemon.answer_next(with_new_block))
    message = await client.messages.create(
        model="claude-x", max_tokens=16, messages=[{"role": "user", "content": "x"}], timeout=10
    )
    await answering
    assert [getattr(b, "type", None) for b in message.content] == ["hologram", "mcp_tool_use", "text"]
    assert message.content[2].text == "after the new block"  # type: ignore[union-attr]
