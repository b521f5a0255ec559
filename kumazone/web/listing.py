"""Paging, filters and entity tags for the API's listings (pure: no Twisted).

C{GET /vips} pages as Kuma's API does: C{?size=} (default L{PAGE_SIZE}, at most
L{MAX_PAGE_SIZE}) and C{?offset=}, and the answer carries C{total} (the items that
match) and C{next} (the URL of the next page, or null).  Filters:

    mesh=NAME       the services of one mesh (exact)
    service=TEXT    a service whose name contains TEXT (case ignored), or whose
                    VIP or IPv6 VIP is TEXT

Every JSON answer carries an C{ETag} (a hash of its body): a client that sends it
back in C{If-None-Match} gets C{304 Not Modified} and no body while nothing changed.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

__all__ = [
    "MAX_PAGE_SIZE",
    "PAGE_SIZE",
    "QueryError",
    "VipQuery",
    "entity_tag",
    "matches_entity_tag",
    "page_items",
]

PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


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
    if not text.isdigit():
        raise QueryError(name, f"must be a whole number, is {text!r}")
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
class VipQuery:
    """What a C{GET /vips} asked for: one page of the items that match its filters."""

    size: int = PAGE_SIZE
    offset: int = 0
    mesh: str | None = None
    service: str | None = None

    @classmethod
    def parse(cls, args: Mapping[str, Sequence[str]]) -> VipQuery:
        """The query of a request's arguments (name -> values); L{QueryError} if bad."""
        return cls(
            size=_integer(args, "size", PAGE_SIZE, MAX_PAGE_SIZE),
            offset=_integer(args, "offset", 0, None),
            mesh=_text(args, "mesh"),
            service=_text(args, "service"),
        )

    def matches(self, item: Mapping[str, Any]) -> bool:
        """Whether a C{/vips} item passes the filters."""
        return self.matcher()(item)

    def matcher(self) -> Callable[[Mapping[str, Any]], bool]:
        """L{matches}, with what the filters ask for worked out once for many items."""
        mesh = self.mesh
        text = self.service.lower() if self.service is not None else None
        # The API writes addresses in their canonical form; so is the one asked for.
        address = _address(self.service) if self.service is not None else None

        def matches(item: Mapping[str, Any]) -> bool:
            if mesh is not None and item["mesh"] != mesh:
                return False
            if text is None or text in str(item["service"]).lower():
                return True
            return address is not None and address in (item["vip"], item["vip6"])

        return matches

    def parameters(self, offset: int) -> str:
        """The query string of this query at another offset."""
        pairs: list[tuple[str, str | int]] = [("size", self.size), ("offset", offset)]
        pairs += [(k, v) for k, v in (("mesh", self.mesh), ("service", self.service)) if v]
        return urlencode(pairs)


def _address(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def page_items(
    items: Sequence[dict[str, Any]], query: VipQuery, base_url: str
) -> tuple[list[dict[str, Any]], int, str | None]:
    """One page of the C{items} that match: (page, total that match, next page's URL)."""
    if query.mesh is None and query.service is None:
        matching: Sequence[dict[str, Any]] = items
    else:
        matches = query.matcher()
        matching = [item for item in items if matches(item)]
    page = list(matching[query.offset : query.offset + query.size])
    following = query.offset + query.size
    next_url = f"{base_url}?{query.parameters(following)}" if following < len(matching) else None
    return page, len(matching), next_url


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
