"""Paging, filters and entity tags for the API's listings (pure: no Twisted).

Every listing pages as Kuma's API does: C{?size=} (default L{PAGE_SIZE}, at most
L{MAX_PAGE_SIZE}) and C{?offset=} (a position in the listing), and the answer
carries C{total} (the items that match) and C{next} (the URL of the next page, the
same query at the next offset, or null).  C{GET /vips} also filters:

    mesh=NAME       the services of one mesh (exact)
    service=TEXT    a service whose name contains TEXT (case ignored); TEXT that is
                    an IP address finds the service whose VIP or IPv6 VIP it is

A page costs what it holds, never what the table holds: listings are sequences
sorted by key (L{kumazone.core.sortedindex.SortedIndex}, or any sequence sorted
by key), so an offset is a slice and a mesh is the range between two bisections
(L{key_range}).  Only C{service=TEXT} must look at every name: L{KeyScan} does it
a bounded slice at a time, resuming by key, so that the API can spread it over
reactor turns.

Every JSON answer carries an C{ETag} (a hash of its body): a client that sends it
back in C{If-None-Match} gets C{304 Not Modified} and no body while nothing changed.
"""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import urlencode

__all__ = [
    "MAX_PAGE_SIZE",
    "PAGE_SIZE",
    "KeyScan",
    "MeshQuery",
    "PageQuery",
    "QueryError",
    "VipQuery",
    "entity_tag",
    "find",
    "key_range",
    "keys_between",
    "matches_entity_tag",
    "next_url",
    "position",
]

PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

T = TypeVar("T")
K = TypeVar("K")


class QueryError(ValueError):
    """A query parameter that does not parse: the parameter and why."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter
        self.message = message


def _integer(args: Mapping[str, Sequence[str]], name: str, default: int, top: int | None) -> int:
    values = args.get(name)
    if not values:
        return default
    text = values[-1].strip()
    if not text.isdigit() or not text.isascii():
        raise QueryError(name, f"must be a whole number, is {text!r}")
    if len(text) > 18:
        raise QueryError(name, f"must be a whole number below 10**18, is {text[:20]!r}...")
    value = int(text)
    if top is not None and not 1 <= value <= top:
        raise QueryError(name, f"must be in the range [1, {top}], is {value}")
    return value


def _text(args: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = args.get(name)
    if not values or not values[-1].strip():
        return None
    return values[-1].strip()


@dataclass(frozen=True)
class PageQuery:
    """One page of a listing: C{?size=&offset=}."""

    size: int = PAGE_SIZE
    offset: int = 0

    @classmethod
    def parse(cls, args: Mapping[str, Sequence[str]]) -> PageQuery:
        """The page a request's arguments (name -> values) ask for; L{QueryError} if bad."""
        return cls(
            size=_integer(args, "size", PAGE_SIZE, MAX_PAGE_SIZE),
            offset=_integer(args, "offset", 0, None),
        )

    def filters(self) -> list[tuple[str, str | int]]:
        """The query's other parameters, as they go in a C{next} URL."""
        return []

    def parameters(self, offset: int) -> str:
        """The query string of this query at another offset."""
        pairs: list[tuple[str, str | int]] = [("size", self.size), ("offset", offset)]
        return urlencode(pairs + self.filters())

    def bounds(self, total: int) -> tuple[int, int]:
        """The positions C{[start, stop)} of this page in a listing of C{total} items."""
        start = min(self.offset, total)
        return start, min(total, start + self.size)


@dataclass(frozen=True)
class MeshQuery(PageQuery):
    """A page of a listing by (mesh, name) that may keep to one mesh: C{?mesh=}."""

    mesh: str | None = None

    @classmethod
    def parse(cls, args: Mapping[str, Sequence[str]]) -> MeshQuery:
        """The query of a request's arguments (name -> values); L{QueryError} if bad."""
        page = PageQuery.parse(args)
        return cls(size=page.size, offset=page.offset, mesh=_text(args, "mesh"))

    def filters(self) -> list[tuple[str, str | int]]:
        return [("mesh", self.mesh)] if self.mesh else []


@dataclass(frozen=True)
class VipQuery(PageQuery):
    """What a C{GET /vips} asked for: one page of the items that match its filters."""

    mesh: str | None = None
    service: str | None = None

    @classmethod
    def parse(cls, args: Mapping[str, Sequence[str]]) -> VipQuery:
        """The query of a request's arguments (name -> values); L{QueryError} if bad."""
        page = PageQuery.parse(args)
        return cls(
            size=page.size,
            offset=page.offset,
            mesh=_text(args, "mesh"),
            service=_text(args, "service"),
        )

    def filters(self) -> list[tuple[str, str | int]]:
        return [(k, v) for k, v in (("mesh", self.mesh), ("service", self.service)) if v]

    @property
    def address(self) -> str | None:
        """The VIP asked for (canonical form), when C{service=} is an IP address."""
        return _address(self.service) if self.service is not None else None

    @property
    def text(self) -> str | None:
        """What a service's name must contain (lower case), when C{service=} is a name."""
        if self.service is None or self.address is not None:
            return None
        return self.service.lower()


def _address(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def next_url(base_url: str, query: PageQuery, total: int) -> str | None:
    """The URL of the page after C{query}'s in a listing of C{total}, or None."""
    following = query.offset + query.size
    return f"{base_url}?{query.parameters(following)}" if following < total else None


# -- sorted sequences ---------------------------------------------------------------


def position(items: Sequence[T], key: Any, key_of: Callable[[T], Any]) -> int:
    """Where C{key} is, or would go, in C{items} (sorted by C{key_of}): O(log n).

    A L{SortedIndex} bisects its own key list (C{position}); any other sequence
    is bisected through C{key_of}.
    """
    found = getattr(items, "position", None)
    if found is not None:
        return int(found(key))
    return bisect.bisect_left(items, key, key=key_of)


def find(items: Sequence[T], key: Any, key_of: Callable[[T], Any]) -> T | None:
    """The item of C{key} in C{items} (sorted by C{key_of}), or None: O(log n) or O(1)."""
    get = getattr(items, "get", None)
    if get is not None:
        value: T | None = get(key)
        return value
    at = bisect.bisect_left(items, key, key=key_of)
    if at < len(items) and key_of(items[at]) == key:
        return items[at]
    return None


def key_range(
    items: Sequence[T], low: Any, high: Any | None, key_of: Callable[[T], Any]
) -> tuple[int, int]:
    """The positions C{[start, stop)} of the keys in C{[low, high)} (C{high} None: to the end)."""
    start = position(items, low, key_of)
    stop = len(items) if high is None else position(items, high, key_of)
    return start, max(start, stop)


def keys_between(items: Sequence[T], start: int, stop: int, key_of: Callable[[T], K]) -> list[K]:
    """The keys at positions C{[start, stop)}: the index's own list when it has one."""
    keys = getattr(items, "keys", None)
    if keys is not None:
        return list(keys()[start:stop])
    return [key_of(item) for item in items[start:stop]]


class KeyScan(Generic[T, K]):
    """The keys of a sorted sequence that pass C{test}, found a slice at a time.

    Each L{step} looks at no more than C{budget} keys and remembers the next key
    to look at (not a position), so the sequence may change between steps: a key
    present throughout is looked at exactly once; one added or removed meanwhile
    may be missed.  Whoever drives the scan decides whether that is good enough
    (the API starts again when the table changed, see L{kumazone.web.api}).
    """

    def __init__(
        self,
        key_of: Callable[[T], K],
        test: Callable[[K], bool],
        low: K,
        high: K | None = None,
    ) -> None:
        self._key_of = key_of
        self._test = test
        self._next: K = low
        self._high = high
        self.matched: list[K] = []
        self.done = False
        self.steps = 0

    def step(self, items: Sequence[T], budget: int) -> bool:
        """Look at up to C{budget} more keys of C{items}; True once the scan is done."""
        if self.done:
            return True
        self.steps += 1
        start, stop = key_range(items, self._next, self._high, self._key_of)
        end = min(stop, start + budget)
        keys = keys_between(items, start, end, self._key_of)
        test = self._test
        self.matched += [key for key in keys if test(key)]
        if end >= stop:
            self.done = True
        else:
            self._next = self._key_of(items[end])
        return self.done


def entity_tag(body: bytes) -> str:
    """A strong entity tag for a response body."""
    return '"' + hashlib.sha256(body).hexdigest()[:20] + '"'


def matches_entity_tag(if_none_match: str | None, tag: str) -> bool:
    """Whether an C{If-None-Match} header names C{tag} (or is C{*})."""
    if not if_none_match:
        return False
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == tag:
            return True
    return False
