"""Request tags: a small bounded set of ``key=value`` labels a request carries into the cost ledger and the
budgets (``tags={"team": "search"}`` on the clients, ``batchd-tags: team=search`` on the front).

Bounded on purpose: at most ``MAX_TAGS`` tags, keys of 1-32 and values of 1-64 characters from a small
charset, so a tag set is always a short, safe string (``TagSet.canonical``) and the ledger never meets an
unbounded label. The one definition of the limits; the front's header parser uses them too.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import InvalidParams

__all__ = ["MAX_TAGS", "TAG_KEY", "TAG_RULES", "TAG_VALUE", "TagSet", "parse_tags"]

MAX_TAGS = 8
TAG_KEY = re.compile(r"[A-Za-z0-9_.-]{1,32}")
TAG_VALUE = re.compile(r"[A-Za-z0-9_.:@/+-]{1,64}")
TAG_RULES = "key: 1-32 of A-Z a-z 0-9 _ . -; value: 1-64 of those and : @ / +"


@dataclass(frozen=True, slots=True)
class TagSet:
    """A validated tag set, sorted by key. The empty set is "untagged"."""

    items: tuple[tuple[str, str], ...] = ()

    @property
    def canonical(self) -> str:
        """``k=v,k2=v2`` (sorted by key): what the ledger and the budgets store. "" when untagged."""
        return ",".join(f"{k}={v}" for k, v in self.items)

    @property
    def id(self) -> str:
        """A short id of the set ("" when untagged): what each request record carries."""
        if not self.items:
            return ""
        return hashlib.blake2b(self.canonical.encode(), digest_size=8).hexdigest()

    @property
    def scopes(self) -> tuple[str, ...]:
        """Each tag as ``key=value``: the names budgets are set on."""
        return tuple(f"{k}={v}" for k, v in self.items)

    def as_dict(self) -> dict[str, str]:
        return dict(self.items)

    @classmethod
    def from_canonical(cls, text: str) -> TagSet:
        """Inverse of ``canonical`` (for what batchd stored itself)."""
        if not text:
            return cls()
        return cls(tuple((k, v) for k, _, v in (item.partition("=") for item in text.split(","))))


def parse_tags(tags: Mapping[str, str] | TagSet | None, *, source: str = "tags") -> TagSet:
    """Check a ``{key: value}`` mapping and return its TagSet; InvalidParams naming what is wrong."""
    if tags is None:
        return TagSet()
    if isinstance(tags, TagSet):
        return tags
    if not isinstance(tags, Mapping):
        raise InvalidParams(f"{source}: must be a mapping of tag names to values, like {{'team': 'search'}}")
    if len(tags) > MAX_TAGS:
        raise InvalidParams(f"{source}: {len(tags)} tags; at most {MAX_TAGS}")
    items: list[tuple[str, str]] = []
    for key, value in tags.items():
        if not isinstance(key, str) or not TAG_KEY.fullmatch(key):
            raise InvalidParams(f"{source}: tag name {str(key)[:40]!r} is not allowed ({TAG_RULES})")
        if not isinstance(value, str):
            raise InvalidParams(f"{source}: {key}: a tag value must be a string, not {type(value).__name__}")
        if not TAG_VALUE.fullmatch(value):
            raise InvalidParams(f"{source}: {key}={str(value)[:70]!r} is not allowed ({TAG_RULES})")
        items.append((key, value))
    return TagSet(tuple(sorted(items)))
