"""The job worker looks at its queue at full speed only while jobs are about (jobs.JobWorker), and the
heartbeat's JobLeases writes nothing while no job runs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from arq.worker import Worker

from batchd import jobs
from batchd.store import Keys


@pytest.fixture
def looks(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The loop times at which the worker really looked at its queue (arq's own poll iteration)."""
    seen: list[float] = []

    async def looked(self: Worker) -> None:
        seen.append(asyncio.get_running_loop().time())

    monkeypatch.setattr(Worker, "_poll_iteration", looked)
    return seen


def worker() -> jobs.JobWorker:
    async def noop(ctx: dict[str, Any]) -> None:
        return None

    return jobs.JobWorker([noop], redis_pool=object(), handle_signals=False)


async def test_an_idle_worker_sleeps_until_woken(looks: list[float]) -> None:
    w = worker()
    looking = asyncio.create_task(w._poll_iteration())
    for _ in range(20):
        await asyncio.sleep(0)
    assert looks == [] and not looking.done()  # no tick of arq's 50 ms poll makes it look
    started = asyncio.get_running_loop().time()
    w.wake()  # this process enqueued a job
    await asyncio.wait_for(looking, 0.5)
    assert len(looks) == 1 and looks[0] - started < 0.1


async def test_an_idle_worker_looks_anyway_after_the_idle_interval(looks: list[float]) -> None:
    """A job enqueued by another replica, or a retry falling due, is seen within _IDLE_POLL_S."""
    w = worker()
    started = asyncio.get_running_loop().time()
    await w._poll_iteration()
    assert len(looks) == 1
    assert jobs._IDLE_POLL_S - 0.05 <= looks[0] - started < jobs._IDLE_POLL_S + 0.5


async def test_a_worker_running_a_job_looks_at_every_tick_and_for_a_while_after(looks: list[float]) -> None:
    w = worker()
    w.wake()
    await w._poll_iteration()
    w.tasks["submit:f1"] = asyncio.get_running_loop().create_future()  # a job running
    for _ in range(5):
        await asyncio.wait_for(w._poll_iteration(), 0.1)  # no idle wait
    assert len(looks) == 6
    w.tasks.clear()
    for _ in range(5):  # within the busy window: still no wait (short retries fall due then)
        await asyncio.wait_for(w._poll_iteration(), 0.1)
    assert len(looks) == 11


class Pipe:
    def __init__(self, log: list[list[tuple[Any, ...]]]) -> None:
        self.log = log
        self.calls: list[tuple[Any, ...]] = []

    async def __aenter__(self) -> Pipe:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kw: self.calls.append((name, *args))

    async def execute(self) -> None:
        self.log.append(self.calls)


class Pool:
    def __init__(self) -> None:
        self.executed: list[list[tuple[Any, ...]]] = []

    def pipeline(self, transaction: bool = True) -> Pipe:
        return Pipe(self.executed)


async def test_job_leases_write_nothing_while_no_job_runs_or_ran() -> None:
    pool = Pool()
    leases = jobs.JobLeases(pool, Keys(), "r1", lease_s=15)  # type: ignore[arg-type]
    w = worker()
    await leases.renew(w)
    assert pool.executed == []  # idle: no command at all

    w.tasks["submit:f1"] = asyncio.get_running_loop().create_future()
    w.job_runs += 1
    await leases.renew(w)
    names = [c[0] for c in pool.executed[-1]]
    assert names == ["pexpire", "delete", "sadd", "pexpire"]

    w.tasks.clear()  # it ended: the registry is cleared once
    await leases.renew(w)
    assert [c[0] for c in pool.executed[-1]] == ["delete"]
    await leases.renew(w)
    assert len(pool.executed) == 2

    w.job_runs += 1  # a job started and ended between two beats: its note (made by the job) is cleared
    await leases.renew(w)
    assert len(pool.executed) == 3 and [c[0] for c in pool.executed[-1]] == ["delete"]
