"""VIP allocation: pure, deterministic, time passed in.

A VIP belongs to a (mesh, service) key.  The candidate offset is a hash of
C{mesh/service} (SHA-256, first 8 bytes, big-endian) modulo the range size; on a
collision the next free offset upwards wins, wrapping.  A released VIP is held for
the hold-down period before another key may take it; the key that held it gets it
back if it returns first.  The IPv6 VIP sits at the same offset in the v6 range.
"""

from __future__ import annotations

import hashlib
import heapq
import socket
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import NamedTuple

from kumazone.core.sortedindex import sorted_keys

__all__ = [
    "PROVISIONAL_CLAIM",
    "Allocation",
    "Hold",
    "Served",
    "ServiceKey",
    "TableDelta",
    "VipAllocator",
    "VipRange",
]


_sha256 = hashlib.sha256
#: C{_new_tuple(Served, (...))}: C{Served(...)} without the named tuple's argument
#: handling (likewise for L{Allocation}).
_new_tuple = tuple.__new__
_inet_ntop, _AF_INET, _AF_INET6 = socket.inet_ntop, socket.AF_INET, socket.AF_INET6


class ServiceKey(NamedTuple):
    """A service: a C{kuma.io/service} tag value within one mesh.

    A named tuple: hashed, compared and sorted in C (a zone holds a million).
    """

    mesh: str
    service: str

    def __str__(self) -> str:
        return f"{self.mesh}/{self.service}"


class VipRange:
    """The usable offsets of an IPv4 CIDR and the matching IPv6 addresses.

    Offsets run from 0 to size - 1 and map to the addresses after the network
    address: the network address and, for prefixes shorter than /31, the
    broadcast address are never handed out.
    """

    def __init__(self, cidr: IPv4Network, cidr6: IPv6Network) -> None:
        if cidr6.num_addresses < cidr.num_addresses:
            raise ValueError(f"IPv6 range {cidr6} is smaller than IPv4 range {cidr}")
        self.cidr = cidr
        self.cidr6 = cidr6
        self.size = cidr.num_addresses - 2 if cidr.prefixlen < 31 else cidr.num_addresses
        self._first = 1 if cidr.prefixlen < 31 else 0
        if self.size < 1:
            raise ValueError(f"IPv4 range {cidr} has no usable address")
        self._base4 = int(cidr.network_address)
        self._base6 = int(cidr6.network_address)
        #: The addresses at offset 0.
        self._start4 = self._base4 + self._first
        self._start6 = self._base6 + self._first

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VipRange):
            return NotImplemented
        return self.cidr == other.cidr and self.cidr6 == other.cidr6

    def __hash__(self) -> int:
        return hash((self.cidr, self.cidr6))

    def candidate(self, key: ServiceKey) -> int:
        """The offset this key asks for first."""
        digest = _sha256(f"{key[0]}/{key[1]}".encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.size

    def next_offset(self, offset: int) -> int:
        """The offset probed after C{offset}, wrapping."""
        return (offset + 1) % self.size

    def ipv4(self, offset: int) -> IPv4Address:
        """The IPv4 VIP at C{offset}."""
        return IPv4Address(self._base4 + self._first + offset)

    def ipv6(self, offset: int) -> IPv6Address:
        """The IPv6 VIP at C{offset}."""
        return IPv6Address(self._base6 + self._first + offset)

    def ipv4_text(self, offset: int) -> str:
        """C{str(self.ipv4(offset))}, without building an address object."""
        return _inet_ntop(_AF_INET, (self._start4 + offset).to_bytes(4, "big"))

    def ipv6_text(self, offset: int) -> str:
        """C{str(self.ipv6(offset))} (RFC 5952 text), without building an address object."""
        value = self._start6 + offset
        text = _inet_ntop(_AF_INET6, value.to_bytes(16, "big"))
        # The C library writes ::a.b.c.d forms for v4-compatible and v4-mapped addresses.
        return text if "." not in text else str(IPv6Address(value))

    def offset_of_ipv4_text(self, text: str) -> int | None:
        """C{self.offset_of(IPv4Address(text))}: the offset of an IPv4 VIP given as text.

        Raises ValueError (C{AddressValueError}) if C{text} is not an IPv4 address.
        """
        try:
            packed = socket.inet_pton(socket.AF_INET, text)
        except (OSError, TypeError):
            packed = None
        if packed is None or socket.inet_ntop(socket.AF_INET, packed) != text:
            # Not in canonical form (or not an address): as ipaddress reads it.
            return self.offset_of(IPv4Address(text))
        offset = int.from_bytes(packed, "big") - self._base4 - self._first
        return offset if 0 <= offset < self.size else None

    def offset_of(self, address: IPv4Address | IPv6Address) -> int | None:
        """The offset of a VIP of this range, or None if it is not one."""
        if isinstance(address, IPv4Address):
            offset = int(address) - self._base4 - self._first
        else:
            offset = int(address) - self._base6 - self._first
        return offset if 0 <= offset < self.size else None


class Allocation(NamedTuple):
    """One row of the VIP table (C{zones}: where the service is, when federated).

    @ivar claim: the table version at which the row was first allocated: the
        order in which services with one DNS name hold it (lowest first).
    """

    key: ServiceKey
    offset: int
    zones: tuple[str, ...] = ()
    claim: int = 0


class Served(NamedTuple):
    """One row as a zone serves it."""

    key: ServiceKey
    offset: int
    zones: tuple[str, ...]
    provisional: bool
    claim: int


#: The claim of a provisional VIP: after every row of the table.
PROVISIONAL_CLAIM = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class Hold:
    """A released offset, unavailable to other keys until C{until}."""

    key: ServiceKey
    offset: int
    until: float


@dataclass
class TableDelta:
    """What one reconciliation changed, for the store and the listeners."""

    added: list[Allocation] = field(default_factory=list)
    removed: list[Allocation] = field(default_factory=list)
    holds_added: list[Hold] = field(default_factory=list)
    holds_dropped: list[Hold] = field(default_factory=list)
    exhausted: list[ServiceKey] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """Whether the table itself (not only holds) changed."""
        return bool(self.added or self.removed)

    @property
    def anything(self) -> bool:
        """Whether there is anything to persist."""
        return bool(self.added or self.removed or self.holds_added or self.holds_dropped)


class VipAllocator:
    """The VIP table: allocations, hold-downs and a version that grows on change."""

    def __init__(
        self,
        vip_range: VipRange,
        hold_down: float,
        allocations: Iterable[Allocation] = (),
        holds: Iterable[Hold] = (),
        version: int = 0,
    ) -> None:
        self.range = vip_range
        self.hold_down = hold_down
        self.version = version
        self.allocations: dict[ServiceKey, Allocation] = {}
        self._owner: dict[int, ServiceKey] = {}
        self.holds: dict[int, Hold] = {}
        self._held_by: dict[ServiceKey, Hold] = {}
        #: Keys wanted but without a VIP because the range is full.
        self.exhausted: set[ServiceKey] = set()
        for allocation in allocations:
            if allocation.offset in self._owner:
                raise ValueError(f"offset {allocation.offset} allocated twice")
            self.allocations[allocation.key] = allocation
            self._owner[allocation.offset] = allocation.key
        #: (until, offset) of every hold-down, soonest first; an entry whose hold
        #: is gone or was replaced is skipped when it comes up (see L{_expire}).
        self._expiry: list[tuple[float, int]] = []
        for hold in holds:
            self._add_hold(hold)

    def _add_hold(self, hold: Hold) -> None:
        self.holds[hold.offset] = hold
        self._held_by[hold.key] = hold
        heapq.heappush(self._expiry, (hold.until, hold.offset))
        if len(self._expiry) > 2 * len(self.holds) + 64:
            # Entries of holds dropped early (their key came back) pile up: start over.
            self._expiry = [(h.until, h.offset) for h in self.holds.values()]
            heapq.heapify(self._expiry)

    def _drop_hold(self, hold: Hold) -> None:
        del self.holds[hold.offset]
        if self._held_by.get(hold.key) is hold:
            del self._held_by[hold.key]

    def vip(self, key: ServiceKey) -> tuple[IPv4Address, IPv6Address] | None:
        """The (IPv4, IPv6) VIP of C{key}, or None."""
        allocation = self.allocations.get(key)
        if allocation is None:
            return None
        return self.range.ipv4(allocation.offset), self.range.ipv6(allocation.offset)

    def owner(self, offset: int) -> ServiceKey | None:
        """The key holding C{offset}, or None."""
        return self._owner.get(offset)

    def due(self, now: float) -> bool:
        """Whether a reconciliation at C{now} could change anything by itself:
        a hold-down has run out, or services wait for room in a full range."""
        return bool(self.exhausted) or self._next_expiry() <= now

    def _next_expiry(self) -> float:
        """When the soonest hold-down runs out (infinity without any)."""
        expiry = self._expiry
        while expiry:
            until, offset = expiry[0]
            hold = self.holds.get(offset)
            if hold is not None and hold.until == until:
                return until
            heapq.heappop(expiry)  # that hold is gone or was replaced
        return float("inf")

    def _expire(self, now: float, delta: TableDelta) -> None:
        """Drop the hold-downs that have run out by C{now}: O(those dropped)."""
        while self._next_expiry() <= now:
            _until, offset = heapq.heappop(self._expiry)
            hold = self.holds[offset]
            self._drop_hold(hold)
            delta.holds_dropped.append(hold)

    @property
    def used(self) -> int:
        """How many offsets are taken or held."""
        return len(self._owner) + len(self.holds)

    def reconcile(self, wanted: Iterable[ServiceKey], now: float) -> TableDelta:
        """Make the table hold exactly C{wanted}; return what changed.

        O(table): for a start-up or a whole new set.  A change of a few keys is
        L{change}, which costs what it changes.
        """
        # A set-like view (the zone's wanted services) is read as it is, not copied.
        wanted_set = wanted if isinstance(wanted, AbstractSet) else set(wanted)
        allocations = self.allocations
        removed = [k for k in allocations if k not in wanted_set]
        removed += [k for k in self.exhausted if k not in wanted_set]
        added = [k for k in wanted_set if k not in allocations]
        return self.change(added, removed, now)

    def change(
        self, added: Iterable[ServiceKey], removed: Iterable[ServiceKey], now: float
    ) -> TableDelta:
        """Add the keys C{added} and release the keys C{removed}; return what changed.

        Costs O(keys given + hold-downs expired + services waiting for room).
        Hold-downs run out first, then released VIPs are held, then the new keys
        (and those the full range left without a VIP) are placed in sorted
        order, so two tables fed the same changes place them the same way.  A
        key both added and removed is removed.
        """
        delta = TableDelta()
        gone = set(removed)
        self._expire(now, delta)
        for key in sorted(k for k in gone if k in self.allocations):
            allocation = self.allocations.pop(key)
            del self._owner[allocation.offset]
            delta.removed.append(allocation)
            hold = Hold(key, allocation.offset, now + self.hold_down)
            previous = self._held_by.get(key)
            if previous is not None:
                self._drop_hold(previous)
                delta.holds_dropped.append(previous)
            self._add_hold(hold)
            delta.holds_added.append(hold)
        waiting = {k for k in self.exhausted - gone if k not in self.allocations} | {
            k for k in added if k not in gone and k not in self.allocations
        }
        self.exhausted = set()
        # Claimed at the version this change makes.
        claim = self.version + 1
        allocations, owners, added_rows = self.allocations, self._owner, delta.added
        for key in sorted_keys(waiting):
            offset = self._place(key, delta)
            if offset is None:
                self.exhausted.add(key)
                delta.exhausted.append(key)
                continue
            allocation = _new_tuple(Allocation, (key, offset, (), claim))
            allocations[key] = allocation
            owners[offset] = key
            added_rows.append(allocation)
        if delta.changed:
            self.version += 1
        return delta

    def _place(self, key: ServiceKey, delta: TableDelta) -> int | None:
        if self._held_by:
            own_hold = self._held_by.get(key)
            if own_hold is not None:
                self._drop_hold(own_hold)
                delta.holds_dropped.append(own_hold)
                return own_hold.offset
        owners, holds, size = self._owner, self.holds, self.range.size
        if len(owners) + len(holds) >= size:
            return None
        # VipRange.candidate and next_offset, inline (a first load places 100,000 keys).
        digest = _sha256(f"{key[0]}/{key[1]}".encode()).digest()
        offset = int.from_bytes(digest[:8], "big") % size
        while offset in owners or offset in holds:
            offset = (offset + 1) % size
        return offset

    def follow(self, delta: TableDelta, version: int, now: float = 0.0) -> None:
        """Apply what another table's change did (a replica's leader): O(delta).

        A replica that follows never places a key itself; it takes the leader's
        rows, hold-downs and version as they were stored.
        """
        allocations, owners = self.allocations, self._owner
        for gone in delta.removed:
            allocation = allocations.pop(gone.key, None)
            if allocation is not None and owners.get(allocation.offset) == gone.key:
                del owners[allocation.offset]
        for hold in delta.holds_dropped:
            held = self.holds.get(hold.offset)
            if held is not None:
                self._drop_hold(held)
        for hold in delta.holds_added:
            held = self.holds.get(hold.offset)
            if held is not None:
                self._drop_hold(held)
            self._add_hold(hold)
        for allocation in delta.added:
            before = allocations.get(allocation.key)
            if before is not None and owners.get(before.offset) == allocation.key:
                del owners[before.offset]
            allocations[allocation.key] = allocation
            owners[allocation.offset] = allocation.key
        self.exhausted = set(delta.exhausted)  # the leader's, worked out at each change
        self.version = version

    def row(self, key: ServiceKey) -> Served | None:
        """C{key}'s row as served, or None."""
        allocation = self.allocations.get(key)
        if allocation is None:
            return None
        return Served(key, allocation.offset, (), False, allocation.claim)

    def served(self) -> Iterator[Served]:
        """Every allocation as served, sorted by key."""
        allocations = self.allocations
        for key in sorted_keys(allocations):
            allocation = allocations[key]
            yield _new_tuple(Served, (key, allocation[1], (), False, allocation[3]))
