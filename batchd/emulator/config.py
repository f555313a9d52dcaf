"""Emulator knobs: timing, limits, caching and fault injection, settable at start and at run time."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ..apispec import BATCH_TIERS

__all__ = ["INT_KNOBS", "KNOB_HELP", "LIST_KNOBS", "TIERS", "EmulatorConfig", "KnobValue"]

KnobValue = float | int | list[str] | None

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
# Non-negative whole numbers (seed, which may also be null, is checked on its own).
INT_KNOBS = frozenset({"rpm_limit", "queue_limit", "cache_min_tokens"})
LIST_KNOBS = frozenset({"valid_api_keys"})

TIERS: dict[int, dict[str, int]] = {
    # The Message Batches API's published limits per usage tier (one table, apispec's, for batchd too).
    tier: {"rpm_limit": limits.rpm, "queue_limit": limits.queue}
    for tier, limits in BATCH_TIERS.items()
}
"""`tier` (a pseudo-knob of update(), the CLI's --tier) sets both limits from this table."""


def _knob(default: Any, help_text: str) -> Any:
    # The help text lives next to the field so the CLI flags and docs cannot drift from it.
    return field(default=default, metadata={"help": help_text})


@dataclass
class EmulatorConfig:
    """Timing, limit and fault knobs. Rates are probabilities in [0, 1]; durations are seconds >= 0."""

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
    create_delay_seconds: float = _knob(
        0.0,
        "a batch create waits this long after reading and checking the body, then creates the batch "
        "even if the client has gone away meanwhile (a slow create whose reply may be lost)",
    )
    rpm_limit: int = _knob(
        0,
        "requests per minute per API key across every batch endpoint (create, retrieve, list, cancel, "
        "delete, results); more get 429 rate_limit_error with retry-after; 0 = unlimited",
    )
    queue_limit: int = _knob(
        0,
        "requests per API key in batches not yet ended; a create that would pass it gets 429 "
        "rate_limit_error; 0 = unlimited",
    )
    valid_api_keys: list[str] = field(
        default_factory=list,
        metadata={
            "help": "when not empty, only these API keys authenticate (others get 401); comma-separated"
        },
    )
    cache_visibility_seconds: float = _knob(
        0.1,
        "a prompt-cache write made by a batch request becomes readable this long after that request "
        "was processed (at the latest when its batch ends)",
    )
    cache_min_tokens: int = _knob(
        1024, "shortest prompt-cache prefix (in estimated tokens) that is cached at all"
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
        """Set several knobs at once, all or none; raises ValueError naming the first bad key.

        `tier` (1-4) sets rpm_limit and queue_limit from TIERS; explicit values given with it win.
        """
        known = {f.name for f in fields(self)}
        clean: dict[str, KnobValue] = {}
        if "tier" in data:
            clean.update(_tier(data["tier"]))
        for key, value in data.items():
            if key == "tier":
                continue
            if key not in known:
                raise ValueError(f"unknown knob {key!r}; known knobs: {', '.join(sorted(known | {'tier'}))}")
            clean[key] = _check(key, value)
        for key, value in clean.items():
            setattr(self, key, value)

    def as_dict(self) -> dict[str, KnobValue]:
        values: dict[str, KnobValue] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            values[f.name] = list(value) if isinstance(value, list) else value
        return values


def _tier(value: object) -> dict[str, KnobValue]:
    if isinstance(value, bool) or not isinstance(value, int) or value not in TIERS:
        raise ValueError(f"tier: expected one of {sorted(TIERS)}, got {value!r}")
    return dict(TIERS[value])


def _check(key: str, value: object) -> KnobValue:
    if key == "seed":
        # bool is an int subclass; True as a seed is almost certainly a mistake.
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise ValueError(f"{key}: expected an integer or null, got {value!r}")
    if key in LIST_KNOBS:
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v.strip() for v in value):
            raise ValueError(f"{key}: expected a list of non-empty strings, got {value!r}")
        return [str(v) for v in value]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if key in INT_KNOBS:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{key}: expected a whole number, got {value!r}")
        if value < 0:
            raise ValueError(f"{key}: expected a number >= 0, got {value!r}")
        return int(value)
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
