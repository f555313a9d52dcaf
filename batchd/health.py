"""Liveness and readiness of one daemon replica, for ``/healthz``, ``/readyz`` and the systemd watchdog.

Liveness: each long-running loop registers with how long it may stay silent and calls :meth:`Health.beat`
every time round. The replica is alive while every loop beat within its limit; a stuck loop (a hung await,
a deadlock) makes ``/healthz`` answer 503 naming it, and stops the watchdog pings so systemd restarts us.

Readiness: async checks (can we reach Redis? the API?) run on each ``/readyz`` with a short timeout each. A
failed check reports only the exception class and a short, redacted message: never a URL with a password or
a key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .logs import redact

__all__ = ["DEFAULT_CHECK_TIMEOUT", "CheckFn", "Health"]

DEFAULT_CHECK_TIMEOUT = 2.0
_MAX_ERROR_CHARS = 200

# A readiness check: succeeds by returning (anything but False), fails by raising or returning False.
CheckFn = Callable[[], Awaitable[object]]


@dataclass(slots=True)
class _Loop:
    max_silence: float
    last_beat: float


@dataclass(slots=True)
class _Check:
    fn: CheckFn
    timeout: float
    cache_seconds: float
    last: tuple[float, dict[str, Any]] | None = None  # (when, outcome) of the last run


def _describe(exc: BaseException) -> str:
    """Exception class and a short message, with anything secret-looking masked."""
    message = " ".join(str(exc).split())  # one line
    if len(message) > _MAX_ERROR_CHARS:
        message = message[: _MAX_ERROR_CHARS - 3] + "..."
    name = type(exc).__name__
    return redact(f"{name}: {message}" if message else name)


class Health:
    """The replica's loops and readiness checks. ``clock`` is injectable for tests (seconds, monotonic)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._loops: dict[str, _Loop] = {}
        self._checks: dict[str, _Check] = {}

    # --- liveness -------------------------------------------------------------------------------------------
    def register(self, name: str, max_silence: float) -> None:
        """Watch loop ``name``: it must :meth:`beat` at least every ``max_silence`` seconds from now on."""
        if max_silence <= 0:
            raise ValueError("max_silence must be positive")
        # Registration counts as a beat: a loop that never starts goes stale after max_silence, not at once.
        self._loops[name] = _Loop(max_silence=max_silence, last_beat=self._clock())

    def beat(self, name: str) -> None:
        """Loop ``name`` is making progress. Raises KeyError for a name never registered (a typo)."""
        self._loops[name].last_beat = self._clock()

    def stale(self) -> list[str]:
        """Names of loops silent for longer than they are allowed, sorted."""
        now = self._clock()
        return sorted(name for name, loop in self._loops.items() if now - loop.last_beat > loop.max_silence)

    def all_alive(self) -> bool:
        """True when every registered loop beat within its limit (vacuously true with none registered)."""
        return not self.stale()

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """``(alive, body)`` for ``/healthz``: each loop's last beat age and limit, and the stale ones."""
        now = self._clock()
        loops: dict[str, Any] = {}
        stale: list[str] = []
        for name, loop in sorted(self._loops.items()):
            age = now - loop.last_beat
            ok = age <= loop.max_silence
            if not ok:
                stale.append(name)
            loops[name] = {"ok": ok, "age_seconds": round(age, 3), "max_silence_seconds": loop.max_silence}
        body: dict[str, Any] = {"status": "ok" if not stale else "stale", "loops": loops}
        if stale:
            body["stale"] = stale
        return not stale, body

    # --- readiness ------------------------------------------------------------------------------------------
    def add_check(
        self, name: str, check: CheckFn, *, timeout: float = DEFAULT_CHECK_TIMEOUT, cache_seconds: float = 0.0
    ) -> None:
        """Run ``await check()`` on ``/readyz``, ``timeout`` seconds at most (same name: replaced). With
        ``cache_seconds``, a probe within that long of the last run gets the last outcome (a check that costs
        something, such as an authenticated API call, must not run once per unauthenticated probe)."""
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._checks[name] = _Check(fn=check, timeout=timeout, cache_seconds=cache_seconds)

    async def _run(self, check: _Check) -> dict[str, Any]:
        now = self._clock()
        if check.last is not None and now - check.last[0] < check.cache_seconds:
            return check.last[1]
        outcome = await self._run_now(check)
        check.last = (now, outcome)
        return outcome

    async def _run_now(self, check: _Check) -> dict[str, Any]:
        deadline = asyncio.timeout(check.timeout)
        try:
            async with deadline:
                outcome = await check.fn()
        except Exception as exc:
            if isinstance(exc, TimeoutError) and deadline.expired():
                return {"ok": False, "error": f"TimeoutError: no answer within {check.timeout:g}s"}
            return {"ok": False, "error": _describe(exc)}
        if outcome is False:
            return {"ok": False, "error": "check returned False"}
        return {"ok": True}

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """``(ready, body)`` for ``/readyz``: every check run concurrently, each with its own timeout."""
        names = sorted(self._checks)
        started = self._clock()
        results = await asyncio.gather(*(self._run(self._checks[name]) for name in names))
        checks = dict(zip(names, results, strict=True))
        ready = all(result["ok"] for result in results)
        return ready, {
            "status": "ok" if ready else "unavailable",
            "checks": checks,
            "seconds": round(self._clock() - started, 3),
        }
