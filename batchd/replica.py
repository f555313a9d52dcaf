"""Who a replica is: its name (the intake consumer, heartbeat and lease holder) and the process behind it.

Names are stable across restarts (default: the host name), so a replica that restarts takes its own
leftovers back at once: the intake entries it had read, the jobs it was running, the create lock it held.
Two live processes must never share a name: the name is itself a lease, whose value says which process
holds it (boot id, pid). A new process may take a name over at once only from a process of this machine
and boot that is dead; otherwise it waits for the lease to lapse and refuses to start if it does not.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import jobs
from .errors import ConfigError
from .leases import LEASE_S
from .store import Store

__all__ = ["claim_name", "default_name", "new_token", "take_back_leftovers", "token_is_dead_here"]

log = logging.getLogger(__name__)


def default_name() -> str:
    return socket.gethostname() or "batchd"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:  # not Linux: the host name stands in (a restart check then relies on the pid alone)
        return socket.gethostname()


def new_token() -> str:
    """This process's claim on a replica name: ``<boot id> <pid> <random>``."""
    return f"{_boot_id()} {os.getpid()} {uuid.uuid4().hex[:12]}"


def token_is_dead_here(token: str) -> bool:
    """True if ``token`` names a process of this machine and boot that no longer runs (or this very
    process: an in-process restart, as the demo and tests do)."""
    parts = token.split()
    if len(parts) != 3 or parts[0] != _boot_id() or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


async def claim_name(store: Store, name: str, token: str, *, give_up: Callable[[], bool]) -> None:
    """Run as replica ``name``: take the name over at once from a dead process of this machine (a restart),
    wait for another holder's lease to lapse, refuse to start beside a live one (ConfigError)."""
    ms = int(LEASE_S * 1000)
    deadline = time.monotonic() + LEASE_S + 5
    while True:
        holder = await store.claim_replica(name, token, ms=ms)
        if holder is None:
            return
        if token_is_dead_here(holder):
            await store.claim_replica(name, token, ms=ms, force=True)
            log.info("replica %s: taking over from its previous process (%s)", name, holder)
            return
        if time.monotonic() > deadline or give_up():
            raise ConfigError(
                f"BATCHD_REPLICA_NAME: replica {name!r} is already running (process {holder}); "
                "give each replica its own name"
            )
        await asyncio.sleep(1.0)


async def take_back_leftovers(store: Store, name: str, arq_pool: Any) -> None:
    """What a previous process under this name held is not held any more: free it now (its jobs' leases,
    the create lock) rather than when the leases lapse."""
    leftovers = await store.running_jobs(name)
    await jobs.release_leftovers(arq_pool, leftovers)
    await store.forget_running_jobs(name)
    holder = await store.lock_holder(store.keys.create_lock)
    released = holder is not None and holder.startswith(name + "|")
    if released and holder is not None:
        await store.release_lock(store.keys.create_lock, holder)
    if leftovers or released:
        log.warning(
            "replica %s: took back %d jobs%s left by its previous process",
            name,
            len(leftovers),
            " and the create lock" if released else "",
        )
