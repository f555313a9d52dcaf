"""Emulator knobs: timing and fault injection, settable at start and at run time."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["KNOB_HELP", "EmulatorConfig"]

# Knobs whose value is a probability; every other float knob is a non-negative duration.
_RATES = frozenset(
    {
        "create_error_rate",
        "create_lost_response_rate",
        "rate_limit_rate",
        "errored_rate",
        "expired_rate",
        "results_cut_rate",
    }
)


def _knob(default: Any, help_text: str) -> Any:
    # The help text lives next to the field so the CLI flags and docs cannot drift from it.
    return field(default=default, metadata={"help": help_text})


@dataclass
class EmulatorConfig:
    """Timing and fault knobs. Rates are probabilities in [0, 1]; durations are seconds >= 0."""

    processing_seconds: float = _knob(
        0.5, "each batch ends this long after it is created (value in force at create time)"
    )
    expiry_seconds: float = _knob(
        86400.0,
        "a batch still unfinished this long after create ends with its unprocessed requests 'expired' "
        "(expires_at always stays created_at + 24 h)",
    )
    cancel_seconds: float = _knob(
        0.05,
        "a cancel ends the batch this long after it was initiated; unprocessed requests become 'canceled'",
    )
    create_error_rate: float = _knob(
        0.0,
        "fraction of batch creates answered 500 api_error or 529 overloaded_error; the batch is NOT created",
    )
    create_lost_response_rate: float = _knob(
        0.0,
        "fraction of batch creates where the batch IS created but the reply is 500 api_error "
        "(a lost response: the SDK's retry then creates a duplicate batch)",
    )
    rate_limit_rate: float = _knob(
        0.0, "fraction of authenticated /v1 calls answered 429 rate_limit_error with a retry-after header"
    )
    retry_after_seconds: float = _knob(
        0.0,
        "value of the retry-after header on injected 429s (the SDK really sleeps this long; "
        "0 makes it use its own backoff of 0.5 s x 2^n)",
    )
    transient_404_seconds: float = _knob(
        0.0,
        "a new batch answers 404 not_found_error to retrieve/cancel/delete/results this long after create",
    )
    errored_rate: float = _knob(
        0.0, "fraction of valid requests ending errored with api_error or overloaded_error"
    )
    expired_rate: float = _knob(0.0, "fraction of valid requests ending expired")
    results_cut_rate: float = _knob(
        0.0, "fraction of results downloads that break off mid-stream (connection closed after some bytes)"
    )
    seed: int | None = _knob(None, "seed for the fault draws, for reproducible runs (default: random)")

    def __post_init__(self) -> None:
        # Constructor values get the same checks (and int -> float) as runtime updates.
        self.update(self.as_dict())

    def update(self, data: Mapping[str, object]) -> None:
        """Set several knobs at once, all or none; raises ValueError naming the first bad key."""
        known = {f.name for f in fields(self)}
        clean: dict[str, float | int | None] = {}
        for key, value in data.items():
            if key not in known:
                raise ValueError(f"unknown knob {key!r}; known knobs: {', '.join(sorted(known))}")
            clean[key] = _check(key, value)
        for key, value in clean.items():
            setattr(self, key, value)

    def as_dict(self) -> dict[str, float | int | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _check(key: str, value: object) -> float | int | None:
    if key == "seed":
        # bool is an int subclass; True as a seed is almost certainly a mistake.
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise ValueError(f"{key}: expected an integer or null, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key}: expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{key}: expected a finite number, got {value!r}")
    if key in _RATES:
        if not 0.0 <= number <= 1.0:
            raise ValueError(f"{key}: a rate must be between 0 and 1, got {value!r}")
    elif number < 0.0:
        raise ValueError(f"{key}: a duration must be >= 0 seconds, got {value!r}")
    return number


KNOB_HELP: dict[str, str] = {f.name: str(f.metadata["help"]) for f in fields(EmulatorConfig)}
