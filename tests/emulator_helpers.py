"""Shared by the emulator's SDK tests: one entry of a Batches create body, and a settable clock."""

from __future__ import annotations

from typing import Any


def req(custom_id: str, text: str = "hello", **params: Any) -> dict[str, Any]:
    """``{"custom_id", "params"}`` for a small valid request; ``params`` overrides or adds fields."""
    body: dict[str, Any] = {
        "model": "claude-haiku-4-5",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": text}],
    }
    body.update(params)
    return {"custom_id": custom_id, "params": body}


class Clock:
    """A settable clock for EmulatorThread(clock=...): time moves only when a test moves it."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
