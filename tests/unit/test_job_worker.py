"""The job worker looks at its queue at full speed only while jobs are about (jobs.JobWorker)."""

from __future__ import annotations

from typing import Any

import pytest
from arq.worker import Worker

from batchd import jobs


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(jobs.time, "monotonic", clock)
    return clock


@pytest.fixture
def looks(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The times the worker really looked at its queue (arq's own poll iteration)."""
    seen: list[float] = []

    async def looked(self: Worker) -> None:
        seen.append(jobs.time.monotonic())

    async def heart_beat(self: Worker) -> None:
        return None

    monkeypatch.setattr(Worker, "_poll_iteration", looked)
    monkeypatch.setattr(Worker, "heart_beat", heart_beat)
    return seen


def worker() -> jobs.JobWorker:
    async def noop(ctx: dict[str, Any]) -> None:
        return None

    return jobs.JobWorker([noop], redis_pool=object(), handle_signals=False)


async def test_an_idle_worker_looks_once_a_second_and_at_once_when_woken(
    clock: Clock, looks: list[float]
) -> None:
    w = worker()
    for _ in range(40):  # two seconds of 50 ms ticks
        await w._poll_iteration()
        clock.now += 0.05
    assert len(looks) == 2  # not 40

    w.wake()  # this process enqueued a job
    await w._poll_iteration()
    assert len(looks) == 3 and looks[-1] == clock.now


async def test_a_worker_that_ran_a_batch_job_looks_at_every_tick_for_a_while(
    clock: Clock, looks: list[float]
) -> None:
    w = worker()
    await w._poll_iteration()
    w.tasks["submit:f1"] = object()  # a batch job running: look again at every tick
    for _ in range(5):
        clock.now += 0.05
        await w._poll_iteration()
    assert len(looks) == 6
    w.tasks.clear()
    for _ in range(20):  # within the busy window: still every tick (short retries are due then)
        clock.now += 0.05
        await w._poll_iteration()
    assert len(looks) == 26
