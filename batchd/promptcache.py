"""A request's prompt-cache prefix, as the API caches it: everything up to its last ``cache_control``
breakpoint, in the API's order (``tools``, then ``system``, then ``messages``; a top-level ``cache_control``
marks the whole prompt).

Requests with the same prefix (same model, same content up to the breakpoint) can read one cache entry, so
the accumulator flushes them together (``cache_grouping``) and can prime the prefix first
(``cache_priming``). The prefix id is a digest computed at submit and carried by the request; the
``cache_control`` markers themselves are left out of it, so a 5-minute and a 1-hour breakpoint on the same
content are one prefix. ``with_ttl_1h`` raises a request's breakpoints to the 1-hour TTL (``cache_ttl_1h``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["TTL_1H", "TTL_5M", "Prefix", "cache_prefix", "with_ttl_1h"]

TTL_5M = 300
TTL_1H = 3600
_ONE_HOUR = {"type": "ephemeral", "ttl": "1h"}


@dataclass(frozen=True, slots=True)
class Prefix:
    """A request's cacheable prefix: its id (hex digest) and the TTL its last breakpoint asks for (s)."""

    id: str
    ttl: int


def _blocks(params: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """The prompt in the API's cache order as (place, block) pairs."""
    tools = params.get("tools")
    if isinstance(tools, list):
        for tool in tools:
            yield "tool", tool
    system = params.get("system")
    if isinstance(system, list):
        for block in system:
            yield "system", block
    elif system is not None:
        yield "system", system
    messages = params.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, Mapping):
                continue
            role, content = str(message.get("role")), message.get("content")
            if isinstance(content, list):
                for block in content:
                    yield role, block
            else:
                yield role, content


def _ttl(control: object) -> int:
    return TTL_1H if isinstance(control, Mapping) and control.get("ttl") == "1h" else TTL_5M


def cache_prefix(params: Mapping[str, Any], body: bytes | None = None) -> Prefix | None:
    """The request's cache prefix, or None when it has no ``cache_control`` breakpoint. ``body``, the
    params' JSON when the caller has it, lets most requests (no breakpoint at all) skip the walk."""
    if body is not None and b'"cache_control"' not in body:
        return None
    blocks = list(_blocks(params))
    last, control = -1, None
    for i, (_, block) in enumerate(blocks):
        if isinstance(block, Mapping) and block.get("cache_control") is not None:
            last, control = i, block["cache_control"]
    top = params.get("cache_control")
    if top is not None and blocks:
        last, control = len(blocks) - 1, top
    if last < 0:
        return None
    digest = hashlib.blake2b(digest_size=12)
    digest.update(str(params.get("model")).encode())
    for place, block in blocks[: last + 1]:
        if isinstance(block, Mapping) and "cache_control" in block:
            block = {k: v for k, v in block.items() if k != "cache_control"}
        digest.update(b"\0" + place.encode() + b"\0")
        digest.update(orjson.dumps(block, option=orjson.OPT_SORT_KEYS))
    return Prefix(digest.hexdigest(), _ttl(control))


def _raised(value: Any) -> Any:
    if isinstance(value, Mapping) and value.get("cache_control") is not None:
        return {**value, "cache_control": dict(_ONE_HOUR)}
    return value


def with_ttl_1h(params: Mapping[str, Any]) -> dict[str, Any]:
    """The params with every ``cache_control`` breakpoint at the 1-hour TTL (a copy; the input is kept).

    Every breakpoint, not only the last: the API refuses a longer TTL after a shorter one."""
    out = dict(params)
    if out.get("cache_control") is not None:
        out["cache_control"] = dict(_ONE_HOUR)
    for name in ("tools", "system"):
        if isinstance(out.get(name), list):
            out[name] = [_raised(block) for block in out[name]]
    if isinstance(out.get("messages"), list):
        messages = []
        for message in out["messages"]:
            if isinstance(message, Mapping) and isinstance(message.get("content"), list):
                message = {**message, "content": [_raised(block) for block in message["content"]]}
            messages.append(message)
        out["messages"] = messages
    return out
