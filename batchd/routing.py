"""Routing a request: through a batch (the default), through the real-time Messages API, or ``auto``: batched,
and sent in real time as well if its batch has not answered by its deadline less a margin.

``plan`` turns what a caller asked for (a route and a deadline) into what the queue stores: a
``store.Route`` and the moment the daemon's real-time sender is due to act. A deadline that no batch could
meet (its margin reached before a batch could even be created and polled once) goes to real time at once.
"""

from __future__ import annotations

import math
import time
from datetime import datetime
from typing import NamedTuple

from .errors import InvalidParams
from .settings import Settings
from .store import Route
from .translate import ROUTES
from .translate import Route as RouteName

__all__ = ["ROUTES", "RouteName", "RoutePlan", "plan"]


class RoutePlan(NamedTuple):
    route: Route
    due_ms: int  # when the real-time sender acts (0 for BATCH)


def plan(
    route: str | None, deadline: float | datetime | None, settings: Settings, *, now: float | None = None
) -> RoutePlan:
    """``route`` one of ROUTES (None: ``auto`` with a deadline, else ``batch``); ``deadline`` seconds from now
    or an aware datetime, for ``auto`` only. Raises InvalidParams for anything else."""
    now = time.time() if now is None else now
    at = _deadline_at(deadline, now)
    if route is None:
        route = "auto" if at is not None else "batch"
    if route not in ROUTES:
        raise InvalidParams(f"route: {route!r} is not one of {', '.join(ROUTES)}")
    if route == "auto" and at is None:
        raise InvalidParams("route='auto' needs a deadline")
    if route != "auto" and at is not None:
        raise InvalidParams(f"deadline applies to route='auto', not {route!r}")
    if route == "batch":
        return RoutePlan(Route.BATCH, 0)
    now_ms = int(now * 1000)
    if route == "realtime" or at is None:
        return RoutePlan(Route.REALTIME, now_ms)
    fallback_at = at - settings.realtime_margin_seconds
    # The soonest a batch could answer: its flush's age limit, then one poll.
    if fallback_at <= now + settings.max_batch_age_seconds + settings.poll_interval_seconds:
        return RoutePlan(Route.AUTO_NOW, now_ms)
    return RoutePlan(Route.AUTO, int(fallback_at * 1000))


def _deadline_at(deadline: float | datetime | None, now: float) -> float | None:
    if deadline is None:
        return None
    if isinstance(deadline, datetime):
        if deadline.tzinfo is None:
            raise InvalidParams("deadline: a datetime needs a time zone")
        at = deadline.timestamp()
    elif isinstance(deadline, int | float) and not isinstance(deadline, bool):
        if not math.isfinite(deadline) or deadline <= 0:
            raise InvalidParams(f"deadline: {deadline!r} is not a positive number of seconds")
        at = now + float(deadline)
    else:
        raise InvalidParams(f"deadline: {deadline!r} is neither seconds from now nor a datetime")
    if at <= now:
        raise InvalidParams("deadline: it has already passed")
    return at
