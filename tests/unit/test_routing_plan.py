"""routing.plan: what a route and a deadline become in the queue, and what is refused before any write."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from batchd.errors import InvalidParams
from batchd.routing import plan
from batchd.settings import Settings, load_settings
from batchd.store import Route

NOW = 1_700_000_000.0


@pytest.fixture
def settings() -> Settings:
    return load_settings()  # the defaults: age 30 s, poll 5 s, margin 30 s


def test_no_route_and_no_deadline_is_a_batch(settings: Settings) -> None:
    assert plan(None, None, settings, now=NOW) == (Route.BATCH, 0)
    assert plan("batch", None, settings, now=NOW) == (Route.BATCH, 0)


def test_realtime_is_due_at_once(settings: Settings) -> None:
    assert plan("realtime", None, settings, now=NOW) == (Route.REALTIME, int(NOW * 1000))


def test_a_deadline_falls_back_its_margin_before_it(settings: Settings) -> None:
    # A deadline alone means auto; seconds from now or an aware datetime.
    expected = (Route.AUTO, int((NOW + 900 - 30) * 1000))
    assert plan(None, 900, settings, now=NOW) == expected
    assert (
        plan("auto", datetime.fromtimestamp(NOW, UTC) + timedelta(seconds=900), settings, now=NOW) == expected
    )


def test_a_deadline_no_batch_could_meet_goes_to_real_time_at_once(settings: Settings) -> None:
    # 30 s margin + 30 s batch age + 5 s poll: a 65 s deadline leaves no time for a batch.
    assert plan("auto", 65, settings, now=NOW) == (Route.AUTO_NOW, int(NOW * 1000))
    assert plan("auto", 65.5, settings, now=NOW)[0] is Route.AUTO


@pytest.mark.parametrize(
    ("route", "deadline", "message"),
    [
        ("later", None, "route: 'later' is not one of batch, realtime, auto"),
        ("auto", None, "route='auto' needs a deadline"),
        ("realtime", 60, "deadline applies to route='auto', not 'realtime'"),
        ("batch", 60, "deadline applies to route='auto', not 'batch'"),
        (None, -1, "deadline: -1 is not a positive number of seconds"),
        (None, float("inf"), "deadline: inf is not a positive number of seconds"),
        (None, "soon", "deadline: 'soon' is neither seconds from now nor a datetime"),
        (None, datetime(2030, 1, 1), "deadline: a datetime needs a time zone"),
        (None, datetime(2020, 1, 1, tzinfo=UTC), "deadline: it has already passed"),
    ],
)
def test_bad_routes_and_deadlines_are_refused(
    settings: Settings, route: str | None, deadline: object, message: str
) -> None:
    with pytest.raises(InvalidParams) as info:
        plan(route, deadline, settings, now=NOW)  # type: ignore[arg-type]
    assert str(info.value) == message
