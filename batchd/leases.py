"""Leases a replica holds while it works, renewed by its heartbeat: they lapse ``LEASE_S`` after the replica
stops (a crash, a hang, a lost Redis), so another replica takes the work over within seconds, while a live
holder is never overtaken however long its work takes.

``Leases`` holds the locks batchd itself takes (the create lock); the arq job leases are renewed by
``jobs.JobLeases`` on the same heartbeat.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from .store import Store

__all__ = ["LEASE_S", "Leases"]

log = logging.getLogger(__name__)

# How long a lease outlives its last renewal. The heartbeat renews every 2 s, so this tolerates a
# stalled event loop (a 256 MB body being joined) of well over ten seconds.
LEASE_S = 15.0


class Leases:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._held: dict[str, str] = {}  # key -> the value this replica holds it with

    @contextlib.asynccontextmanager
    async def hold(self, key: str, value: str) -> AsyncIterator[bool]:
        """Take ``key`` (False inside the block if another holder has it), renew it while the block runs,
        release it after (only if still ours)."""
        taken = await self._store.take_lock(key, value, ms=int(LEASE_S * 1000))
        if not taken:
            yield False
            return
        self._held[key] = value
        try:
            yield True
        finally:
            self._held.pop(key, None)
            await self._store.release_lock(key, value)

    async def renew(self) -> None:
        """Called by the heartbeat: extend every lease held; warn about one that was lost meanwhile."""
        for key, value in list(self._held.items()):
            if not await self._store.scripts.lease(key, value, ms=int(LEASE_S * 1000)):
                log.warning(
                    "lost the lease %s to another holder (this replica stalled for %gs?)", key, LEASE_S
                )
