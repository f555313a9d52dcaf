"""The Lua scripts, one behaviour per test, on fakeredis (Lua 5.1 through lupa).

The helpers below lay out KEYS/ARGV exactly as each script's header comment documents; a change of layout
in a script must show up here as a failure, not as silently wrong data in production.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import fakeredis
import orjson
import pytest
from redis.exceptions import ResponseError

from batchd.keys import CONSUMER_GROUP, Keys, custom_id_for
from batchd.scripts import SCRIPT_NAMES, Scripts, script_source

K = Keys()
NOW = 1_700_000_000_000
TTL = 3600
BIG = 10**12


def params(text: str = "hi") -> bytes:
    return orjson.dumps(
        {"model": "claude-x", "max_tokens": 16, "messages": [{"role": "user", "content": text}]}
    )


def line_for(rid: str, attempt: int, result: dict[str, Any]) -> bytes:
    return orjson.dumps({"custom_id": custom_id_for(rid, attempt), "result": result})


SUCCEEDED = {"type": "succeeded", "message": {"id": "msg_1"}}
EXPIRED = {"type": "expired"}


@pytest.fixture
def r(fake_redis: fakeredis.FakeRedis) -> fakeredis.FakeRedis:
    # The daemon creates the group before it reads; entries must be in its pending list to be acked.
    fake_redis.xgroup_create(K.intake, CONSUMER_GROUP, id="0", mkstream=True)
    return fake_redis


@pytest.fixture
def scripts(r: fakeredis.FakeRedis) -> Scripts:
    return Scripts.register(r)


# --- script calls, laid out as the .lua headers say ------------------------------------------------------
def enqueue(
    scripts: Scripts,
    requests: list[tuple[str, bytes]],
    *,
    max_n: int = BIG,
    max_bytes: int = BIG,
    now: int = NOW,
) -> list[int]:
    keys = [K.intake, K.queue_stats]
    args: list[Any] = [now, max_n, max_bytes]
    for rid, body in requests:
        keys += [K.request(rid), K.result(rid)]
        args += [rid, custom_id_for(rid, 1), body]
    return [int(x) for x in scripts.enqueue(keys=keys, args=args)]


def read_entries(r: fakeredis.FakeRedis, consumer: str = "c1") -> list[tuple[str, str]]:
    """(stream id, rid) of every new intake entry, read into the group's pending list like the daemon."""
    reply = r.xreadgroup(CONSUMER_GROUP, consumer, {K.intake: ">"})
    if not reply:
        return []
    return [(entry_id.decode(), fields[b"rid"].decode()) for entry_id, fields in reply[0][1]]


def commit(scripts: Scripts, fid: str, entries: list[tuple[str, str]], now: int = NOW) -> list[int]:
    keys = [K.intake, K.queue_stats, K.flush(fid), K.flush_rids(fid), K.flushes]
    keys += [K.request(rid) for _, rid in entries]
    args: list[Any] = [CONSUMER_GROUP, fid, now]
    for entry_id, rid in entries:
        args += [entry_id, rid]
    return [int(x) for x in scripts.commit_flush(keys=keys, args=args)]


def seal(scripts: Scripts, fid: str, trigger: str = "count", now: int = NOW + 5) -> int:
    return int(
        scripts.seal_flush(keys=[K.flush(fid), K.flushes, K.flush_rids(fid)], args=[fid, trigger, now])
    )


def deliver(
    scripts: Scripts,
    rid: str,
    attempt: int,
    line: bytes,
    *,
    retry: bool = False,
    max_attempts: int = 3,
    ttl: int = TTL,
) -> list[int]:
    reply = scripts.deliver(
        keys=[K.request(rid), K.result(rid), K.intake, K.queue_stats],
        args=[attempt, line, "1" if retry else "0", max_attempts, ttl, K.delivered_channel, rid],
    )
    return [int(x) for x in reply]


def cancel(scripts: Scripts, rid: str, ttl: int = TTL) -> int:
    line = orjson.dumps({"custom_id": rid, "result": {"type": "canceled"}})
    return int(
        scripts.cancel(
            keys=[K.request(rid), K.result(rid), K.queue_stats], args=[line, ttl, K.delivered_channel, rid]
        )
    )


def stats(r: fakeredis.FakeRedis) -> tuple[int, int]:
    n, size = r.hmget(K.queue_stats, "n", "bytes")
    return int(n or 0), int(size or 0)


def req(r: fakeredis.FakeRedis, rid: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in r.hgetall(K.request(rid)).items()}


def snapshot(r: fakeredis.FakeRedis) -> dict[bytes, Any]:
    """Every key with its value: compare two snapshots to prove a call wrote nothing."""
    out: dict[bytes, Any] = {}
    for key in r.keys("*"):
        kind = r.type(key)
        if kind == b"hash":
            out[key] = r.hgetall(key)
        elif kind == b"string":
            out[key] = r.get(key)
        elif kind == b"stream":
            out[key] = r.xrange(key)
        elif kind == b"list":
            out[key] = r.lrange(key, 0, -1)
        elif kind == b"zset":
            out[key] = r.zrange(key, 0, -1, withscores=True)
        else:
            out[key] = kind
    return out


def queue_and_flush(r: fakeredis.FakeRedis, scripts: Scripts, *rids: str, fid: str = "f1") -> None:
    """Bring requests to where the daemon delivers them: enqueued, read, committed into a sealed flush."""
    enqueue(scripts, [(rid, params(rid)) for rid in rids])
    entries = read_entries(r)
    assert {rid for _, rid in entries} >= set(rids)
    commit(scripts, fid, entries)
    seal(scripts, fid)


class Published:
    """Request ids published on the delivered channel (what wakes the waiters)."""

    def __init__(self, r: fakeredis.FakeRedis) -> None:
        # Not ignore_subscribe_messages: that makes get_message() return None for the subscribe reply,
        # which would end a drain before the real messages behind it.
        self._pubsub = r.pubsub()
        self._pubsub.subscribe(K.delivered_channel)

    def drain(self) -> list[str]:
        """Everything published since the last drain (fakeredis delivers synchronously)."""
        out: list[str] = []
        while (message := self._pubsub.get_message(timeout=0.01)) is not None:
            if message["type"] == "message":
                out.append(message["data"].decode())
        return out

    def close(self) -> None:
        self._pubsub.close()


@pytest.fixture
def published(r: fakeredis.FakeRedis) -> Iterator[Published]:
    collector = Published(r)
    yield collector
    collector.close()


# --- the scripts load ------------------------------------------------------------------------------------
def test_every_script_has_a_source_and_registers(fake_redis: fakeredis.FakeRedis) -> None:
    scripts = Scripts.register(fake_redis)
    for name in SCRIPT_NAMES:
        assert script_source(name).strip()
        assert getattr(scripts, name) is not None


# --- enqueue ---------------------------------------------------------------------------------------------
def test_enqueue_new_request_writes_hash_stream_entry_and_stats(
    r: fakeredis.FakeRedis, scripts: Scripts
) -> None:
    body = params()
    assert enqueue(scripts, [("a", body)]) == [1]

    assert req(r, "a") == {
        "body": body.decode(),
        "n": str(len(body)),
        "state": "queued",
        "attempts": "1",
        "enq": str(NOW),
    }
    entries = r.xrange(K.intake)
    assert len(entries) == 1
    assert entries[0][1] == {b"rid": b"a", b"cid": b"a-1", b"n": str(len(body)).encode()}
    assert stats(r) == (1, len(body))


def test_enqueue_duplicate_id_returns_0_and_changes_nothing(r: fakeredis.FakeRedis, scripts: Scripts) -> None:
    enqueue(scripts, [("a", params("first"))])
    before = snapshot(r)

    assert enqueue(scripts, [("a", params("second, different body"))], now=NOW + 1) == [0]
    assert snapshot(r) == before


def test_enqueue_id_whose_result_exists_is_a_duplicate(r: fakeredis.FakeRedis, scripts: Scripts) -> None:
    # The request hash may expire before the result does; the id is still taken.
    r.set(K.result("a"), b"{}")
    assert enqueue(scripts, [("a", params())]) == [0]
    assert not r.exists(K.request("a"))
    assert r.xlen(K.intake) == 0


def test_enqueue_duplicate_within_one_call_keeps_the_first(r: fakeredis.FakeRedis, scripts: Scripts) -> None:
    first, second = params("first"), params("second")
    assert enqueue(scripts, [("a", first), ("b", params()), ("a", second)]) == [1, 1, 0]

    assert req(r, "a")["body"] == first.decode()
    assert [f[b"rid"] for _, f in r.xrange(K.intake)] == [b"a", b"b"]
    assert stats(r) == (2, len(first) + len(params()))


@pytest.mark.parametrize("cap", ["count", "bytes"])
def test_enqueue_over_a_cap_refuses_with_minus_1_and_writes_nothing(
    r: fakeredis.FakeRedis, scripts: Scripts, cap: str
) -> None:
    body = params()
    enqueue(scripts, [("a", body), ("b", body)])
    before = snapshot(r)
    limits = {"max_n": 3} if cap == "count" else {"max_bytes": 3 * len(body)}

    # Two more would pass the cap: the whole call is refused, not just the request that overflows.
    assert enqueue(scripts, [("c", body), ("d", body)], **limits) == [-1, 2, 2 * len(body)]
    assert snapshot(r) == before

    # Exactly up to the cap is allowed.
    assert enqueue(scripts, [("c", body)], **limits) == [1]
    assert stats(r) == (3, 3 * len(body))


def test_enqueue_duplicate_is_not_refused_by_a_full_queue(r: fakeredis.FakeRedis, scripts: Scripts) -> None:
    # A retried submit of an already-queued id must stay idempotent even at the cap.
    enqueue(scripts, [("a", params())], max_n=1)
    assert enqueue(scripts, [("a", params())], max_n=1) == [0]


# --- commit_flush ----------------------------------------------------------------------------------------
def test_commit_flush_moves_queued_requests_and_acks_their_entries(
    r: fakeredis.FakeRedis, scripts: Scripts
) -> None:
    bodies = {rid: params(rid * 3) for rid in ("a", "b", "c")}
    enqueue(scripts, list(bodies.items()))
    entries = read_entries(r)
    total = sum(len(b) for b in bodies.values())

    assert commit(scripts, "f1", entries) == [3, total]

    flush = {k.decode(): v.decode() for k, v in r.hgetall(K.flush("f1")).items()}
    assert flush == {"state": "building", "created": str(NOW), "n": "3", "bytes": str(total)}
    assert r.lrange(K.flush_rids("f1"), 0, -1) == [b"a", b"b", b"c"]
    assert r.zscore(K.flushes, "f1") == NOW
    for rid in bodies:
        assert req(r, rid)["state"] == "flushed"
        assert req(r, rid)["fid"] == "f1"
    # Acked and deleted: nothing pending, nothing left in the stream.
    assert r.xlen(K.intake) == 0
    assert r.xpending(K.intake, CONSUMER_GROUP)["pending"] == 0
    assert stats(r) == (0, 0)


def test_commit_flush_chunks_accumulate(r: fakeredis.FakeRedis, scripts: Scripts) -> None:
    body = params()
    enqueue(scripts, [(f"r{i}", body) for i in range(5)])
    entries = read_entries(r)

    assert commit(scripts, "f1", entries[:2]) == [2, 2 * len(body)]
    assert commit(scripts, "f1", entries[2:]) == [3, 3 * len(body)]

    assert r.hget(K.flush("f1"), "n") == b"5"
    assert r.hget(K.flush("f1"), "bytes") == str(5 * len(body)).encode()
    assert r.lrange(K.flush_rids("f1"), 0, -1) == [f"r{i}".encode() for i in range(5)]


def test_commit_flush_skips_canceled_requests_but_acks_them(r: fakeredis.FakeRedis, scripts: Scripts) -> None:
    body = params()
    enqueue(scripts, [("a", body), ("b", body)])
    entries = read_entries(r)
    assert cancel(scripts, "a") == 1

    assert commit(scripts, "f1", entries) == [1, len(body)]

    assert r.lrange(K.flush_rids("f1"), 0, -1) == [b"b"]
    assert req(r, "a")["state"] == "done"
    assert r.xlen(K.intake) == 0
    assert r.xpending(K.intake, CONSUMER_GROUP)["pending"] == 0
    # cancel already took "a" off the stats; commit must not take it off twice.
    assert stats(r) == (0, 0)


def test_commit_flush_moves_a_request_only_once(r: fakeredis.FakeRedis, scripts: Scripts) -> None:
    # The same entry handed to two flushes (a re-read after a crash, or a claim by another replica).
    enqueue(scripts, [("a", params())])
    entries = read_entries(r)
    commit(scripts, "f1", entries)

    assert commit(scripts, "f2", entries) == [0, 0]

    assert req(r, "a")["fid"] == "f1"
    assert r.lrange(K.flush_rids("f2"), 0, -1) == []
    assert stats(r) == (0, 0)


def test_commit_flush_refuses_a_flush_that_is_not_building(r: fakeredis.FakeRedis, scripts: Scripts) -> None:
    enqueue(scripts, [("a", params())])
    commit(scripts, "f1", read_entries(r))
    seal(scripts, "f1")
    enqueue(scripts, [("b", params())])
    entries = read_entries(r)

    with pytest.raises(ResponseError, match="not building"):
        commit(scripts, "f1", entries)

    assert req(r, "b")["state"] == "queued"
    assert r.xlen(K.intake) == 1
    assert r.lrange(K.flush_rids("f1"), 0, -1) == [b"a"]


# --- seal_flush ------------------------------------------------------------------------------------------
def test_seal_flush_seals_and_returns_its_count(r: fakeredis.FakeRedis, scripts: Scripts) -> None:
    enqueue(scripts, [("a", params()), ("b", params())])
    commit(scripts, "f1", read_entries(r))

    assert seal(scripts, "f1", trigger="age", now=NOW + 7) == 2

    flush = r.hgetall(K.flush("f1"))
    assert flush[b"state"] == b"sealed"
    assert flush[b"trigger"] == b"age"
    assert flush[b"sealed"] == str(NOW + 7).encode()
    assert r.zscore(K.flushes, "f1") == NOW
    # Sealed is final: a second seal is refused.
    assert seal(scripts, "f1") == -1


def test_seal_flush_removes_an_empty_flush(r: fakeredis.FakeRedis, scripts: Scripts) -> None:
    # Every request of the chunk was canceled: the flush exists but holds nothing.
    enqueue(scripts, [("a", params())])
    entries = read_entries(r)
    cancel(scripts, "a")
    assert commit(scripts, "f1", entries) == [0, 0]
    assert r.exists(K.flush("f1"))

    assert seal(scripts, "f1") == 0

    assert not r.exists(K.flush("f1"))
    assert not r.exists(K.flush_rids("f1"))
    assert r.zscore(K.flushes, "f1") is None


def test_seal_flush_of_an_unknown_flush_returns_minus_1(r: fakeredis.FakeRedis, scripts: Scripts) -> None:
    assert seal(scripts, "nope") == -1
    assert not r.exists(K.flush("nope"))


# --- deliver ---------------------------------------------------------------------------------------------
def test_deliver_sets_the_result_once_with_ttl(
    r: fakeredis.FakeRedis, scripts: Scripts, published: Published
) -> None:
    queue_and_flush(r, scripts, "a")
    line = line_for("a", 1, SUCCEEDED)

    assert deliver(scripts, "a", 1, line, ttl=TTL) == [1, NOW, 1]

    assert r.get(K.result("a")) == line
    assert 0 < r.ttl(K.result("a")) <= TTL
    state = req(r, "a")
    assert state["state"] == "done"
    # The body is dropped once answered (it can be 256 MB of batch); the hash lingers with the TTL only.
    assert "body" not in state
    assert 0 < r.ttl(K.request("a")) <= TTL
    assert published.drain() == ["a"]


def test_deliver_twice_is_a_duplicate_and_keeps_the_first_line(
    r: fakeredis.FakeRedis, scripts: Scripts, published: Published
) -> None:
    queue_and_flush(r, scripts, "a")
    first = line_for("a", 1, SUCCEEDED)
    deliver(scripts, "a", 1, first)
    published.drain()

    assert deliver(scripts, "a", 1, line_for("a", 1, EXPIRED))[0] == 0

    assert r.get(K.result("a")) == first
    assert published.drain() == []


def test_deliver_result_key_is_set_nx(r: fakeredis.FakeRedis, scripts: Scripts) -> None:
    # A result that already exists (e.g. written by a cancel racing the fan-out) is never overwritten.
    queue_and_flush(r, scripts, "a")
    r.set(K.result("a"), b"earlier")
    assert deliver(scripts, "a", 1, line_for("a", 1, SUCCEEDED))[0] == 0
    assert r.get(K.result("a")) == b"earlier"


def test_deliver_for_another_attempt_is_stale(r: fakeredis.FakeRedis, scripts: Scripts) -> None:
    queue_and_flush(r, scripts, "a")
    before = snapshot(r)

    assert deliver(scripts, "a", 2, line_for("a", 2, SUCCEEDED))[0] == -1
    assert deliver(scripts, "a", 0, line_for("a", 0, SUCCEEDED))[0] == -1
    assert snapshot(r) == before


def test_deliver_to_a_queued_or_unknown_request_is_stale(r: fakeredis.FakeRedis, scripts: Scripts) -> None:
    enqueue(scripts, [("a", params())])
    before = snapshot(r)

    assert deliver(scripts, "a", 1, line_for("a", 1, SUCCEEDED))[0] == -1
    assert deliver(scripts, "ghost", 1, line_for("ghost", 1, SUCCEEDED))[0] == -1
    assert snapshot(r) == before


def test_deliver_retryable_requeues_with_next_attempt(r: fakeredis.FakeRedis, scripts: Scripts) -> None:
    queue_and_flush(r, scripts, "a")
    body_len = len(params("a"))

    assert deliver(scripts, "a", 1, line_for("a", 1, EXPIRED), retry=True) == [2, NOW, 2]

    state = req(r, "a")
    assert state["state"] == "queued"
    assert state["attempts"] == "2"
    assert "fid" not in state
    assert state["body"] == params("a").decode()  # kept: the next batch needs it
    entries = r.xrange(K.intake)
    assert len(entries) == 1
    assert entries[0][1] == {b"rid": b"a", b"cid": b"a-2", b"n": str(body_len).encode()}
    assert stats(r) == (1, body_len)
    assert r.get(K.result("a")) is None


def test_deliver_retries_up_to_max_attempts_then_delivers(r: fakeredis.FakeRedis, scripts: Scripts) -> None:
    queue_and_flush(r, scripts, "a", fid="f1")
    expired = {n: line_for("a", n, EXPIRED) for n in (1, 2, 3)}

    assert deliver(scripts, "a", 1, expired[1], retry=True, max_attempts=3)[0] == 2
    commit(scripts, "f2", read_entries(r))
    assert deliver(scripts, "a", 2, expired[2], retry=True, max_attempts=3)[0] == 2
    assert [fields[b"cid"] for _, fields in r.xrange(K.intake)] == [b"a-3"]
    commit(scripts, "f3", read_entries(r))

    # The last attempt: the transient result goes to the caller instead of back to intake.
    assert deliver(scripts, "a", 3, expired[3], retry=True, max_attempts=3) == [1, NOW, 3]
    assert r.get(K.result("a")) == expired[3]
    assert r.xlen(K.intake) == 0
    assert stats(r) == (0, 0)


def test_deliver_does_not_requeue_a_canceled_request(r: fakeredis.FakeRedis, scripts: Scripts) -> None:
    queue_and_flush(r, scripts, "a")
    assert cancel(scripts, "a") == 2
    canceled = r.get(K.result("a"))

    assert deliver(scripts, "a", 1, line_for("a", 1, EXPIRED), retry=True)[0] == 0

    assert r.xlen(K.intake) == 0
    assert req(r, "a")["state"] == "done"
    assert r.get(K.result("a")) == canceled


def test_deliver_does_not_requeue_when_cancel_flag_set_on_a_flushed_request(
    r: fakeredis.FakeRedis, scripts: Scripts
) -> None:
    # Defence in depth: a request flagged canceled that is somehow not 'done' is answered, not retried.
    queue_and_flush(r, scripts, "a")
    r.hset(K.request("a"), "cancel", 1)
    line = line_for("a", 1, EXPIRED)

    assert deliver(scripts, "a", 1, line, retry=True)[0] == 1

    assert r.get(K.result("a")) == line
    assert r.xlen(K.intake) == 0


# --- cancel ----------------------------------------------------------------------------------------------
def test_cancel_queued_returns_1_and_takes_it_off_the_stats(
    r: fakeredis.FakeRedis, scripts: Scripts, published: Published
) -> None:
    body = params()
    enqueue(scripts, [("a", body), ("b", body)])

    assert cancel(scripts, "a", ttl=TTL) == 1

    assert stats(r) == (1, len(body))
    state = req(r, "a")
    assert state["state"] == "done"
    assert state["cancel"] == "1"
    assert "body" not in state
    assert orjson.loads(r.get(K.result("a")))["result"] == {"type": "canceled"}
    assert 0 < r.ttl(K.result("a")) <= TTL
    assert 0 < r.ttl(K.request("a")) <= TTL
    assert published.drain() == ["a"]


def test_cancel_flushed_returns_2_and_answers_canceled(r: fakeredis.FakeRedis, scripts: Scripts) -> None:
    queue_and_flush(r, scripts, "a")

    assert cancel(scripts, "a") == 2

    assert stats(r) == (0, 0)  # not double-decremented: commit already took it off
    assert req(r, "a")["state"] == "done"
    assert orjson.loads(r.get(K.result("a")))["result"]["type"] == "canceled"


def test_cancel_done_returns_0_and_keeps_the_answer(r: fakeredis.FakeRedis, scripts: Scripts) -> None:
    queue_and_flush(r, scripts, "a")
    line = line_for("a", 1, SUCCEEDED)
    deliver(scripts, "a", 1, line)
    before = snapshot(r)

    assert cancel(scripts, "a") == 0
    assert snapshot(r) == before


def test_cancel_with_only_the_result_left_returns_0(r: fakeredis.FakeRedis, scripts: Scripts) -> None:
    r.set(K.result("a"), b"line")
    assert cancel(scripts, "a") == 0
    assert r.get(K.result("a")) == b"line"


def test_cancel_unknown_returns_minus_1_and_writes_nothing(r: fakeredis.FakeRedis, scripts: Scripts) -> None:
    before = snapshot(r)
    assert cancel(scripts, "ghost") == -1
    assert snapshot(r) == before
