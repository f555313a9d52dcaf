"""Everything one emulator instance holds: knobs, batches, stats, limits, canned answers, fault dice."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping

from .answers import CannedResponse, parse_canned
from .config import EmulatorConfig, KnobValue
from .ids import rfc3339
from .limits import RpmLimiter
from .store import BatchStore

__all__ = ["EmulatorState"]


class EmulatorState:
    def __init__(self, config: EmulatorConfig | None = None, clock: Callable[[], float] = time.time) -> None:
        self.config = config if config is not None else EmulatorConfig()
        self.store = BatchStore(clock)
        self.rpm = RpmLimiter()
        self.canned: tuple[CannedResponse, ...] = ()
        # Creates that outlive their request (create_delay_seconds): held so they are not garbage collected.
        self.pending: set[asyncio.Task[object]] = set()
        # One generator for every fault draw, so a seed reproduces a run's faults (given the same calls).
        self.rng = random.Random(self.config.seed)

    def configure(self, data: Mapping[str, object]) -> dict[str, KnobValue]:
        """Apply knobs (all or none, ValueError on a bad one) and return the resulting config."""
        self.config.update(data)
        if "seed" in data:
            self.rng.seed(self.config.seed)
        return self.config.as_dict()

    def set_responses(self, data: object) -> list[dict[str, object]]:
        """Replace the canned responses (ValueError if malformed); returns them as stored."""
        self.canned = parse_canned(data)
        return self.responses()

    def responses(self) -> list[dict[str, object]]:
        return [
            {"match": c.match, "content": list(c.content), "stop_reason": c.stop_reason} for c in self.canned
        ]

    def batch_info(self, batch_id: str) -> dict[str, object] | None:
        """What a batch was created with, in any state (GET /_emulator/batches/{id}); None if unknown."""
        batch = self.store.find(batch_id)
        if batch is None:
            return None
        meta = batch.meta
        return {
            "id": batch.id,
            "betas": list(meta.betas),
            "anthropic_version": meta.anthropic_version,
            "workspace_id": meta.workspace_id,
            "requests": len(batch),
            "processing_status": batch.status(self.store.clock()),
            "created_at": rfc3339(batch.created),
        }

    def stats(self) -> dict[str, int]:
        counters = self.store.stats.counters()
        counters["batches_open"] = self.store.open_batches()
        # Creates whose body the emulator holds and whose batch is not made yet (create_delay_seconds).
        counters["creates_in_flight"] = len(self.pending)
        return counters

    def reset(self) -> None:
        """Forget every batch, cache entry, rate-limit window and canned response, and zero the stats.

        The knobs stay as they are.
        """
        self.store.reset()
        self.rpm.clear()
        self.canned = ()
        self.rng.seed(self.config.seed)
