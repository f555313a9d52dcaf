"""ApiHealth: every API call failing is an outage, said loudly once it lasts; an answer about one request
is not."""

from __future__ import annotations

import logging

import pytest

from batchd.apihealth import ALARM_AFTER_S, ApiHealth


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("status", [None, 401, 403, 429, 500, 529])
def test_failures_for_a_minute_are_an_error_then_once_a_minute(
    status: int | None, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    health = ApiHealth(clock)
    health.failed(status, f"create: {status} kind")
    assert not health.state().healthy
    clock.now += ALARM_AFTER_S - 1
    health.failed(status, "retrieve: again")
    health.alarm()
    assert errors(caplog) == []  # not yet: a blip is not an outage
    clock.now += 1
    health.alarm()
    [line] = errors(caplog)
    assert "BATCHD_ANTHROPIC_API_KEY" in line and "retrieve: again" in line
    clock.now += 10
    health.alarm()
    assert len(errors(caplog)) == 1  # once a minute, not once a heartbeat
    clock.now += ALARM_AFTER_S
    health.alarm()
    assert len(errors(caplog)) == 2


def test_one_success_ends_it(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    health = ApiHealth(clock)
    health.failed(None, "create: ConnectError")
    clock.now += ALARM_AFTER_S - 5
    health.succeeded()
    clock.now += 10
    health.alarm()
    assert health.state().healthy and errors(caplog) == []


@pytest.mark.parametrize("status", [400, 404, 413])
def test_an_answer_about_one_request_means_the_api_works(status: int) -> None:
    health = ApiHealth(Clock())
    health.failed(None, "create: ConnectError")
    health.failed(status, "retrieve: 404 not_found")
    assert health.state().healthy
