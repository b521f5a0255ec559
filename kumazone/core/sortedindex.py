"""Values by key, kept in key order: what listings page through. Pure.

A change of one key costs a dictionary update and one C{bisect} into a list of
the keys (a C{memmove} of the list's tail: about a millisecond at a million
keys); a page is a slice.  So a table of a million services is listed a page at a
time without ever sorting or walking it on the reactor.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice, repeat
from typing import Any, Generic, Protocol, Self, TypeVar, cast, overload

__all__ = ["SortedIndex", "sorted_keys"]


class _Ordered(Protocol):
    def __lt__(self, other: Any, /) -> bool: ...


K = TypeVar("K", bound=_Ordered)
V = TypeVar("V")

#: Beyond this many keys changed at once, the key list is sorted anew instead.
_BULK = 64
_last = operator.itemgetter(-1)
_first = operator.itemgetter(0)
_second = operator.itemgetter(1)


def _appends(changed: list[tuple[Any, Any]]) -> bool:
    """Whether C{changed} sets values only (none is None), its keys strictly in order."""
    keys = list(map(_first, changed))
    return all(map(operator.is_not, map(_second, changed), repeat(None))) and all(
        map(operator.lt, keys, islice(keys, 1, None))
    )


T = TypeVar("T")


def sorted_keys(keys: Iterable[T]) -> list[T]:
    """C{sorted(keys)}, faster for tuples of strings that differ in their last field only.

    Service keys of one mesh, resource keys of one type and mesh (the usual
    case): those sort on their last field alone, strings compared as strings,
    which costs a third of comparing the (named) tuples.
    """
    result: list[Any] = list(keys)
    if len(result) > 1 and isinstance(result[0], tuple):
        first = result[0]
        kind, prefix = type(first), first[:-1]
        if type(first[-1]) is str and all(
            type(key) is kind and key[:-1] == prefix for key in result
        ):
            result.sort(key=_last)
            return result
    result.sort()
    return result


class SortedIndex(Sequence[V], Generic[K, V]):
    """A mapping from keys to values that is also the sequence of its values in key order.

    C{index[i]} and C{index[i:j]} are positions; L{get} and L{key_at} go by key.
    """

    def __init__(self, items: Iterable[tuple[K, V]] = ()) -> None:
        self._values: dict[K, V] = dict(items)
        self._keys: list[K] = sorted_keys(self._values)

    @classmethod
    def copy_of(cls, other: SortedIndex[K, V]) -> Self:
        """An independent copy (for tests and from-scratch comparisons)."""
        copy = cls()
        copy._values = dict(other._values)
        copy._keys = list(other._keys)
        return copy

    # -- reading ----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._keys)

    @overload
    def __getitem__(self, position: int) -> V: ...

    @overload
    def __getitem__(self, position: slice) -> list[V]: ...

    def __getitem__(self, position: int | slice) -> V | list[V]:
        values = self._values
        if isinstance(position, slice):
            return [values[key] for key in self._keys[position]]
        return values[self._keys[position]]

    def __iter__(self) -> Iterator[V]:
        # (A map, not a generator: the DNS authority's first build walks 100,000.)
        return map(self._values.__getitem__, self._keys)

    def __contains__(self, value: object) -> bool:
        """Whether C{value} is a key (not a value: that would walk the index)."""
        return value in self._values

    def get(self, key: K, default: V | None = None) -> V | None:
        """The value of C{key}, or C{default}."""
        return self._values.get(key, default)

    def keys(self) -> Sequence[K]:
        """The keys, sorted (the index's own list: do not change it)."""
        return self._keys

    def position(self, key: K) -> int:
        """Where C{key} is, or would be inserted, in key order."""
        return bisect.bisect_left(self._keys, key)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SortedIndex):
            return self._keys == other._keys and self._values == other._values
        if isinstance(other, Sequence):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SortedIndex({len(self)} items)"

    # -- changing ---------------------------------------------------------------

    def set(self, key: K, value: V) -> None:
        """Add C{key} or replace its value."""
        values = self._values
        if key not in values:
            keys = self._keys
            if keys and key < keys[-1]:
                bisect.insort(keys, key)
            else:
                keys.append(key)  # (a table's rows come in key order: no search)
        values[key] = value

    def pop(self, key: K) -> V | None:
        """Remove C{key}; its value, or None if it was not there."""
        value = self._values.pop(key, None)
        if value is not None:
            position = bisect.bisect_left(self._keys, key)
            del self._keys[position]
        return value

    def update(self, changed: Iterable[tuple[K, V | None]]) -> None:
        """Set each C{(key, value)}, removing the keys whose value is None."""
        changed = list(changed)
        values, keys = self._values, self._keys
        if changed and (not keys or keys[-1] < changed[0][0]) and _appends(changed):
            # New keys only, in order, after every key held (a table's rows in key
            # order, a slice at a time): appended, whatever the index's size.
            values.update(cast("list[tuple[K, V]]", changed))  # (none is None)
            keys.extend(map(_first, changed))
            return
        # One insort is a memmove of the list: sorting anew pays only when the
        # change is a good share of the index.
        if len(changed) <= _BULK or len(changed) * 32 < len(self._keys):
            for key, value in changed:
                if value is None:
                    self.pop(key)
                else:
                    self.set(key, value)
            return
        for key, value in changed:
            if value is None:
                values.pop(key, None)
            else:
                values[key] = value
        self._keys = sorted_keys(values)
