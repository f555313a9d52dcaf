"""Identifiers and timestamps in the shapes the real API uses."""

from __future__ import annotations

import functools
import hashlib
import secrets
from datetime import UTC, datetime

__all__ = ["batch_id", "message_id", "request_id", "rfc3339"]

_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Real ids look like "msgbatch_01HkcTjaV5uDC8jWR4ZsDV8d": "01" then 22 base62 chars, 24 in all.
_TAIL = 22


def _random_tail() -> str:
    return "".join(secrets.choice(_BASE62) for _ in range(_TAIL))


def batch_id() -> str:
    # Always random (never from the fault seed): a restarted emulator must not reuse ids a daemon remembers.
    return "msgbatch_01" + _random_tail()


def request_id() -> str:
    return "req_01" + _random_tail()


def message_id(batch: str, index: int) -> str:
    """Deterministic per (batch, request) so every download of a batch carries the same message ids."""
    # A per-batch tag plus the index in 5 base62 digits (62**5 > 100,000): cheap enough for every line.
    digits = []
    for _ in range(5):
        index, digit = divmod(index, 62)
        digits.append(_BASE62[digit])
    return "msg_01" + _batch_tag(batch) + "".join(digits)


@functools.lru_cache(maxsize=64)
def _batch_tag(batch: str) -> str:
    number = int.from_bytes(hashlib.blake2b(batch.encode(), digest_size=13).digest(), "big")
    chars = []
    for _ in range(_TAIL - 5):
        number, digit = divmod(number, 62)
        chars.append(_BASE62[digit])
    return "".join(chars)


def rfc3339(epoch: float) -> str:
    """Microsecond precision with a Z suffix, as in the reference examples."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
