"""Prompt caching, modelled per API key so grouping and priming strategies show their effect.

A request's cache prefix is everything up to its last `cache_control` breakpoint (tools, then system, then
messages: the API's order), identified by a digest of that content and the model. When a request is
processed at time t:

- if a write of the same prefix by the same key is readable at t (visible, not expired), the prefix is a
  **read**, and the read extends that entry's life to t + TTL;
- otherwise it is a **write**, readable from `visible_at` (t + cache_visibility_seconds, and for a batch
  request at the latest when its batch ends) until t + TTL.

Writes by real-time `/v1/messages` calls are never read by batch requests (users report exactly this);
real-time calls read writes of either kind. See docs/emulator.md, "Prompt caching".
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CacheKey", "CacheUsage", "PromptCache", "ttl_seconds"]

_TTLS = {"5m": 300.0, "1h": 3600.0}


def ttl_seconds(cache_control: object) -> float:
    """The TTL a `cache_control` object asks for: "1h", else the default 5 minutes."""
    ttl = cache_control.get("ttl") if isinstance(cache_control, dict) else None
    return _TTLS.get(ttl, 300.0) if isinstance(ttl, str) else 300.0


@dataclass(frozen=True, slots=True)
class CacheKey:
    """One request's cacheable prefix: what it is (digest) and how long it is (estimated tokens)."""

    digest: bytes
    tokens: int
    ttl: float  # seconds, 300 or 3600


@dataclass(frozen=True, slots=True)
class CacheUsage:
    """The usage fields a cache lookup decides (the rest of the prompt stays `input_tokens`)."""

    write_5m: int = 0
    write_1h: int = 0
    read: int = 0

    @property
    def tokens(self) -> int:
        return self.write_5m + self.write_1h + self.read


class _Entry:
    __slots__ = ("expires_at", "from_batch", "visible_at")

    def __init__(self, visible_at: float, expires_at: float, from_batch: bool) -> None:
        self.visible_at = visible_at
        self.expires_at = expires_at
        self.from_batch = from_batch


class PromptCache:
    """Every key's cached prefixes. Lookups may be for future times (a batch's requests are decided when it
    is created, each at its own processing time), so entries are only pruned once expired before `now`."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, bytes], list[_Entry]] = {}

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._entries.values())

    def clear(self) -> None:
        self._entries.clear()

    def use(
        self,
        api_key: str,
        key: CacheKey,
        *,
        at: float,
        visible_at: float,
        from_batch: bool,
        min_tokens: int,
        now: float,
    ) -> CacheUsage | None:
        """Read or write `key` for a request processed at `at`; None when the prefix is too short to cache."""
        if key.tokens < min_tokens or key.tokens <= 0:
            return None
        slot = (api_key, key.digest)
        entries = [e for e in self._entries.get(slot, ()) if e.expires_at > now]
        for entry in entries:
            # A batch never reads what a real-time call wrote.
            if entry.visible_at <= at < entry.expires_at and (entry.from_batch or not from_batch):
                entry.expires_at = max(entry.expires_at, at + key.ttl)
                self._entries[slot] = entries
                return CacheUsage(read=key.tokens)
        entries.append(_Entry(min(visible_at, at + key.ttl), at + key.ttl, from_batch))
        self._entries[slot] = entries
        if key.ttl > 300.0:
            return CacheUsage(write_1h=key.tokens)
        return CacheUsage(write_5m=key.tokens)
