"""Helpers for test suites that drive the SDK against the emulator: wait for a batch, with a deadline."""

from __future__ import annotations

import asyncio
import time

import anthropic
from anthropic.types.messages import MessageBatch

__all__ = ["async_wait_for_batch", "wait_for_batch"]


def wait_for_batch(
    client: anthropic.Anthropic,
    batch_id: str,
    *,
    status: str = "ended",
    within: float = 10.0,
    poll: float = 0.01,
) -> MessageBatch:
    """Poll until the batch reaches `status`; TimeoutError (with the last state seen) after `within` s."""
    deadline = time.monotonic() + within
    while True:
        batch = client.messages.batches.retrieve(batch_id)
        if batch.processing_status == status:
            return batch
        if time.monotonic() >= deadline:
            raise TimeoutError(f"batch {batch_id} still {batch.processing_status!r} after {within} s")
        time.sleep(poll)


async def async_wait_for_batch(
    client: anthropic.AsyncAnthropic,
    batch_id: str,
    *,
    status: str = "ended",
    within: float = 10.0,
    poll: float = 0.01,
) -> MessageBatch:
    """The asyncio twin of wait_for_batch."""
    deadline = time.monotonic() + within
    while True:
        batch = await client.messages.batches.retrieve(batch_id)
        if batch.processing_status == status:
            return batch
        if time.monotonic() >= deadline:
            raise TimeoutError(f"batch {batch_id} still {batch.processing_status!r} after {within} s")
        await asyncio.sleep(poll)
