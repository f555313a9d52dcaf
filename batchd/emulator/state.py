"""Everything one emulator instance holds: its knobs, its batches and stats, its fault dice."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping

from .config import EmulatorConfig
from .store import BatchStore

__all__ = ["EmulatorState"]


class EmulatorState:
    def __init__(self, config: EmulatorConfig | None = None, clock: Callable[[], float] = time.time) -> None:
        self.config = config if config is not None else EmulatorConfig()
        self.store = BatchStore(clock)
        # One generator for every fault draw, so a seed reproduces a run's faults (given the same calls).
        self.rng = random.Random(self.config.seed)

    def configure(self, data: Mapping[str, object]) -> dict[str, float | int | None]:
        """Apply knobs (all or none, ValueError on a bad one) and return the resulting config."""
        self.config.update(data)
        if "seed" in data:
            self.rng.seed(self.config.seed)
        return self.config.as_dict()

    def stats(self) -> dict[str, int]:
        counters = self.store.stats.counters()
        counters["batches_open"] = self.store.open_batches()
        return counters

    def reset(self) -> None:
        """Forget every batch and zero the stats; the knobs stay as they are."""
        self.store.reset()
        self.rng.seed(self.config.seed)
