"""A zone's view of the global's table: the global's rows plus provisional VIPs. Pure.

L{FederatedView} is the table a federated zone serves: the rows the global sent
(applied whole versions at a time) and, for local services the global has not
allocated yet, provisional VIPs at the offsets the global will most likely give.

The provisional VIPs are always those a placement from scratch gives (local
services not in the global's rows, in sorted order: a service's own hold-down
first, else its candidate probing upwards past every taken or held offset), so a
restart over the same stored rows and hold-downs serves the same VIPs.  A change
keeps that at a cost of what it changes: a service placed, or given up, moves
no other service unless probes meet (a collision, rare in a large range), and
then the provisional VIPs are placed again from scratch (O(provisional VIPs)).
"""

from __future__ import annotations

import heapq
import operator
from collections import deque
from collections.abc import Iterable, Iterator, KeysView, Mapping
from dataclasses import dataclass, field

from kumazone.core.messages import ProtocolError, TableUpdate
from kumazone.core.vips import (
    PROVISIONAL_CLAIM,
    Allocation,
    Hold,
    Served,
    ServiceKey,
    TableDelta,
    VipRange,
)

__all__ = ["FederatedView", "check_part"]

_new_tuple = tuple.__new__
#: An allocation's key and offset (its first two fields), for passes made in C.
_key_of = operator.itemgetter(0)
_offset_of = operator.itemgetter(1)


@dataclass(slots=True, eq=False)
class _FullTable:
    """A full table being gathered, part by part (L{take}): O(rows in each part),
    so that its last part costs what it brings, not the table."""

    #: The keys held when it began (a copy of a dict keeps its hashes: 7 ms at
    #: 100,000 rows); those it gives are taken out, the rest are its removals.
    unseen: dict[ServiceKey, object]
    #: Its rows by key, and their keys by offset.
    rows: dict[ServiceKey, Allocation] = field(default_factory=dict)
    at: dict[int, ServiceKey] = field(default_factory=dict)
    #: Offsets two of its rows were given, with those keys: the whole table may
    #: still leave one key there (L{settle}).
    clashes: dict[int, list[ServiceKey]] = field(default_factory=dict)
    #: Its rows that differed from the rows held when they came.
    changed: list[Allocation] = field(default_factory=list)

    def take(
        self,
        message: TableUpdate,
        held: Mapping[ServiceKey, Allocation],
        size: int,
        local: Mapping[ServiceKey, ServiceKey],
        provisional: Mapping[ServiceKey, int],
    ) -> None:
        """One part: each row's offset claimed, the row compared with C{held}'s; a
        row of a local service keyed by the local key (C{local}: each to itself),
        and the offset of a provisional VIP it confirms as the very int held."""
        rows, at, unseen, own = self.rows, self.at, self.unseen, local.get
        placed = provisional.get
        for mesh, service in message.remove:
            key = ServiceKey(mesh, service)
            gone = rows.pop(key, None)
            if gone is not None:
                if at.get(gone.offset) == key:
                    del at[gone.offset]
                if key in held:
                    unseen[key] = None
        # (Tuples made without the named tuples' argument handling: a fresh zone
        # takes 100,000 rows.)
        new, get, claim_offset, seen = tuple.__new__, rows.get, at.setdefault, unseen.pop
        for mesh, service, offset, zones, claim in message.upsert:
            if offset >= size:
                raise ProtocolError(f"offset {offset} is outside the VIP range")
            key = new(ServiceKey, (mesh, service))
            key = own(key, key)
            was = placed(key)
            if was is not None and was == offset:
                offset = was
            allocation = new(Allocation, (key, offset, zones, claim))
            before = get(key)
            if before is not None and at.get(before.offset) == key:
                del at[before.offset]  # given again, elsewhere
            owner = claim_offset(offset, key)
            if owner != key:
                self.clashes.setdefault(offset, [owner]).append(key)
            rows[key] = allocation
            if held:
                if held.get(key) != allocation:
                    self.changed.append(allocation)
                seen(key, None)

    def settle(self) -> None:
        """The whole table: one key at most at each offset (else ProtocolError),
        and L{at} says which.  O(clashes)."""
        rows, at = self.rows, self.at
        for offset, keys in self.clashes.items():
            held = at.get(offset)
            there = {
                key
                for key in (*keys, *(() if held is None else (held,)))
                if (row := rows.get(key)) is not None and row.offset == offset
            }
            if len(there) > 1:
                raise ProtocolError("the table gives one VIP to two services")
            if there:
                at[offset] = there.pop()
            else:
                at.pop(offset, None)


def check_part(part: int, previous: int | None) -> None:
    """Parts come in order: 0 starts a message, each next one follows the last."""
    expected = 0 if previous is None else previous + 1
    if part != 0 and part != expected:  # part 0 always starts a message afresh
        raise ProtocolError(f"part {part} where part {expected} was due")


#: Keys one change places, a later key's VIP taken at a time, before it places
#: every provisional VIP again instead.
_STEAL_STEPS = 4096


class _Collision(Exception):
    """A change moves other provisional VIPs: they are placed again from scratch."""


class FederatedView:
    """A zone's table: the global's rows, plus provisional VIPs for local services.

    The zone keeps hold-downs of its own: a VIP the global's table dropped, and a
    provisional VIP the zone dropped, are kept from other services' provisional
    VIPs for the hold-down period, as the global keeps them from allocation.
    """

    def __init__(
        self,
        vip_range: VipRange,
        rows: Iterable[Allocation] = (),
        version: int = 0,
        hold_down: float = 3600.0,
        holds: Iterable[Hold] = (),
    ) -> None:
        self.range = vip_range
        self.version = version
        self.hold_down = hold_down
        self.global_rows: dict[ServiceKey, Allocation] = {}
        #: The global's rows by offset.
        self._global_at: dict[int, ServiceKey] = {}
        for row in rows:
            self.global_rows[row.key] = row
            self._global_at[row.offset] = row.key
        self.holds: dict[int, Hold] = {}
        self._holds_of: dict[ServiceKey, set[int]] = {}
        #: (until, offset) of every hold-down, soonest first (stale ones skipped).
        self._expiry: list[tuple[float, int]] = []
        for hold in holds:
            self._add_hold(hold)
        self.provisional: dict[ServiceKey, int] = {}
        self._provisional_at: dict[int, ServiceKey] = {}
        self.exhausted: set[ServiceKey] = set()
        #: The local services, each key to itself: a row of the global's for one
        #: of them takes the zone's own key object (and its strings), not a copy.
        #: The view's own, kept by L{reconcile} and L{change}; or the zone's
        #: (L{share_local}), which it keeps itself.
        self._local: dict[ServiceKey, ServiceKey] = {}
        self._local_shared = False
        #: Whether the last reconcile or change changed the provisional VIPs.
        self.changed = False
        #: Keys whose served row may have changed since L{take_touched}, in the
        #: order they were touched (a table's rows come in key order: the entries
        #: and listings that follow then insert at their end, not in their middle).
        #: (Only the keys count: a fresh table's are a copy of its rows.)
        self._touched: dict[ServiceKey, object] = {}
        #: Touched keys held back from L{take_touched}, handed out by L{release}
        #: in the order they were touched; each once (C{_held}'s keys say which:
        #: a whole table's touched keys are taken as they are, values and all).
        self._backlog: deque[ServiceKey] = deque()
        self._held: dict[ServiceKey, object] = {}
        #: Provisional VIPs given, moved or dropped so far (for L{changed}).
        self._moves = 0
        #: A full table being gathered, or a change's upserts and removals.
        self._pending_full: _FullTable | None = None
        self._pending_upsert: dict[ServiceKey, Allocation] | None = None
        self._pending_remove: set[ServiceKey] | None = None
        self._pending_part: int | None = None
        #: A zone replica that follows its leader (L{follow}): its hold-downs are
        #: the leader's, as stored; it places provisional VIPs for what its own
        #: inventory wants the same way, but never holds or expires one itself.
        self.following = False

    # -- reading -----------------------------------------------------------------

    @property
    def allocations(self) -> Mapping[ServiceKey, Allocation]:
        """The global's rows and the provisional VIPs, merged (a copy: O(table))."""
        merged = dict(self.global_rows)
        for key, offset in self.provisional.items():
            merged[key] = Allocation(key, offset, claim=PROVISIONAL_CLAIM)
        return merged

    def row(self, key: ServiceKey) -> Served | None:
        """C{key}'s row as served, or None."""
        allocation = self.global_rows.get(key)
        if allocation is not None:
            # (Without the named tuple's argument handling: one per row followed.)
            _key, offset, zones, claim = allocation
            return _new_tuple(Served, (key, offset, zones, False, claim))
        provisional = self.provisional.get(key)
        if provisional is not None:
            return Served(key, provisional, (), True, PROVISIONAL_CLAIM)
        return None

    def served(self) -> Iterator[Served]:
        """Every row served, sorted by key; provisional ones claim after all others."""
        for key in sorted(self.global_rows.keys() | self.provisional.keys()):
            row = self.row(key)
            assert row is not None
            yield row

    def take_touched(self) -> KeysView[ServiceKey]:
        """The keys whose served row may have changed since the last call, in the
        order they were touched."""
        touched, self._touched = self._touched, {}
        return touched.keys()

    def defer_touched(self, limit: int) -> bool:
        """Hold the touched keys back if more than C{limit}; whether they were.

        L{release} then hands them to L{take_touched} C{limit} at a time, so that
        whoever follows the table (the entries, DNS) does it in bounded slices.
        """
        if len(self._touched) <= limit:
            return False
        held = self._held
        if held:
            # A key still held back from an update before keeps its place.
            fresh: dict[ServiceKey, object] = {
                key: None for key in self._touched if key not in held
            }
            held.update(fresh)
        else:
            fresh = self._held = self._touched  # (no pass in Python over a whole table)
        self._backlog.extend(fresh)
        self._touched = {}
        return True

    def release(self, limit: int) -> int:
        """Hand up to C{limit} keys held back to L{take_touched}; how many remain held.

        A key touched again meanwhile is in both: it is followed twice, which
        changes nothing the second time.
        """
        backlog, touched = self._backlog, self._touched
        if len(backlog) <= limit:
            touched.update(dict.fromkeys(backlog))
            backlog.clear()
            self._held.clear()
            return 0
        pop, unhold = backlog.popleft, self._held.pop
        for _ in range(limit):
            key = pop()
            unhold(key, None)
            touched[key] = None
        return len(backlog)

    @property
    def held_back(self) -> int:
        """How many touched keys wait for L{release}."""
        return len(self._backlog)

    def owner(self, offset: int) -> ServiceKey | None:
        """The key served at C{offset}, or None."""
        return self._global_at.get(offset) or self._provisional_at.get(offset)

    # -- hold-downs --------------------------------------------------------------

    def _add_hold(self, hold: Hold) -> None:
        self.holds[hold.offset] = hold
        self._holds_of.setdefault(hold.key, set()).add(hold.offset)
        heapq.heappush(self._expiry, (hold.until, hold.offset))
        if len(self._expiry) > 2 * len(self.holds) + 64:
            self._expiry = [(h.until, h.offset) for h in self.holds.values()]
            heapq.heapify(self._expiry)

    def _drop_hold(self, offset: int, delta: TableDelta) -> Hold:
        hold = self.holds.pop(offset)
        offsets = self._holds_of.get(hold.key)
        if offsets is not None:
            offsets.discard(offset)
            if not offsets:
                del self._holds_of[hold.key]
        delta.holds_dropped.append(hold)
        return hold

    def _hold(self, key: ServiceKey, offset: int, now: float, delta: TableDelta) -> None:
        """Hold C{offset} back for C{key}, unless it is taken or held already."""
        if self.following:
            return  # the leader's hold-down comes with its change (L{follow})
        if offset in self._global_at or offset in self._provisional_at or offset in self.holds:
            return
        hold = Hold(key, offset, now + self.hold_down)
        self._add_hold(hold)
        delta.holds_added.append(hold)

    def _next_expiry(self) -> float:
        expiry = self._expiry
        while expiry:
            until, offset = expiry[0]
            hold = self.holds.get(offset)
            if hold is not None and hold.until == until:
                return until
            heapq.heappop(expiry)
        return float("inf")

    def due(self, now: float) -> bool:
        """Whether a reconciliation at C{now} would expire a hold-down."""
        return self._next_expiry() <= now

    def _expire(self, now: float, delta: TableDelta) -> bool:
        """Drop the hold-downs run out; whether that may move provisional VIPs."""
        if self.following:
            return False  # the leader's, told in its change (L{follow})
        moves = False
        while self._next_expiry() <= now:
            _until, offset = heapq.heappop(self._expiry)
            self._drop_hold(offset, delta)
            if offset in self._provisional_at:
                moves = True  # placed at its own hold-down, which is gone
            elif self.provisional and self._occupied(self.range.next_offset(offset)):
                moves = True  # a probe may have passed the offset now free
        return moves

    # -- placing -----------------------------------------------------------------

    def _occupied(self, offset: int) -> bool:
        return offset in self._global_at or offset in self._provisional_at or offset in self.holds

    def _used(self) -> int:
        return len(self._global_at) + len(self._provisional_at) + len(self.holds)

    def _place(self, key: ServiceKey, check: bool) -> int | None:
        """A provisional offset for C{key}: its own hold-down, else the free candidate.

        With C{check}, raises L{_Collision} if a placement from scratch would
        have given C{key} an offset a later key holds (C{key} sorts first).
        """
        own = self._holds_of.get(key)
        if own:
            free = [o for o in own if o not in self._global_at and o not in self._provisional_at]
            if free:
                return min(free)
        if self._used() >= self.range.size:
            return None
        offset = self.range.candidate(key)
        while self._occupied(offset):
            if check:
                other = self._provisional_at.get(offset)
                if other is not None and other > key and offset not in self.holds:
                    raise _Collision
            offset = self.range.next_offset(offset)
        return offset

    def _put_provisional(self, key: ServiceKey, offset: int) -> None:
        self.provisional[key] = offset
        self._provisional_at[offset] = key
        self._touched[key] = None
        self._moves += 1

    def _drop_provisional(self, key: ServiceKey, now: float, delta: TableDelta) -> None:
        """C{key} has no provisional VIP any longer; its VIP is held if the key is gone."""
        offset = self.provisional.pop(key)
        del self._provisional_at[offset]
        if not self.provisional:
            # Dicts never shrink: the maps a fresh zone's services filled (all of
            # them provisional until the global's table came) would keep their size.
            self.provisional, self._provisional_at = {}, {}
        self._touched[key] = None
        self._moves += 1
        if key not in self._local or key in self.global_rows:
            self._hold(key, offset, now, delta)

    def _place_all(self, now: float, delta: TableDelta) -> None:
        """Every provisional VIP placed from scratch: O(provisional VIPs)."""
        for _attempt in range(4):
            before = self.provisional
            self.provisional, self._provisional_at = {}, {}
            self.exhausted = set()
            for key in sorted(self._local.keys() - self.global_rows.keys()):
                offset = self._place(key, check=False)
                if offset is None:
                    self.exhausted.add(key)
                    continue
                self.provisional[key] = offset
                self._provisional_at[offset] = key
            held = len(delta.holds_added)
            for key, offset in before.items():
                if self.provisional.get(key) != offset:
                    self._touched[key] = None
                    self._moves += 1
                    if key not in self.provisional and (
                        key not in self._local or key in self.global_rows
                    ):
                        self._hold(key, offset, now, delta)
            came = [k for k in self.provisional if k not in before]
            self._touched.update(dict.fromkeys(came))
            self._moves += len(came)
            if len(delta.holds_added) == held or not self.exhausted:
                # New hold-downs only count against a full range: placing again
                # gives the same VIPs unless some service is waiting for room.
                return

    def _settle(self, place: Iterable[ServiceKey], now: float, delta: TableDelta) -> None:
        """Place C{place} (local keys without a VIP), or everything again on a collision."""
        keys = sorted(
            k
            for k in set(place)
            if k in self._local and k not in self.global_rows and k not in self.provisional
        )
        if self.exhausted or self._used() + len(keys) + 1 >= self.range.size:
            raise _Collision  # a full range: who gets room depends on every key
        # Smallest first, as a placement from scratch goes.  A key whose probe meets
        # a later key's provisional VIP takes it (from scratch it comes first), and
        # that key is placed again in turn: keys only grow along such a chain, so it
        # ends, and no offset is left free that a probe passed (L{_steal}).
        heapq.heapify(keys)
        for _step in range(_STEAL_STEPS):
            if not keys:
                return
            key = heapq.heappop(keys)
            offset, later = self._steal(key)
            if later is not None:
                del self.provisional[later]  # its offset is the key's now
                self._touched[later] = None
                self._moves += 1
                heapq.heappush(keys, later)
            self._put_provisional(key, offset)
        raise _Collision  # a long chain: placed again from scratch

    def _steal(self, key: ServiceKey) -> tuple[int, ServiceKey | None]:
        """Where a placement from scratch puts C{key} now, and the later key there, if any.

        As L{_place}, but a provisional VIP of a later key (not held) is taken
        rather than passed.  There is room (the caller checked).
        """
        own = self._holds_of.get(key)
        if own:
            free = [o for o in own if o not in self._global_at and o not in self._provisional_at]
            if free:
                return min(free), None
        offset = self.range.candidate(key)
        while True:
            if offset not in self._global_at and offset not in self.holds:
                other = self._provisional_at.get(offset)
                if other is None:
                    return offset, None
                if other > key:
                    return offset, other
            offset = self.range.next_offset(offset)

    def _finish(self, delta: TableDelta, moves: int) -> TableDelta:
        delta.exhausted = sorted(self.exhausted)
        self.changed = self._moves != moves
        return delta

    # -- changes -----------------------------------------------------------------

    def share_local(self, local: dict[ServiceKey, ServiceKey]) -> None:
        """Read the local services from C{local} (each key to itself), kept by the
        caller, instead of a copy of its own: a zone's inventory holds them
        already (a map of half a million keys less in a zone that holds a
        million).  The caller changes C{local} before it calls L{reconcile} or
        L{change} with what it holds, and never otherwise."""
        self._local, self._local_shared = local, True

    def reconcile(self, wanted: Iterable[ServiceKey], now: float) -> TableDelta:
        """Give every local service the global has not allocated a provisional VIP.

        O(table): the full form (start-up).  The candidate is the one the global
        will compute, avoiding every VIP the table holds and every hold-down of
        another service, so the global almost always confirms it.  The delta
        carries only hold-downs (provisional VIPs are never stored: they are
        recomputed at start-up).
        """
        if not self._local_shared:
            self._local = {key: key for key in wanted}
        moves = self._moves
        delta = TableDelta()
        self._expire(now, delta)
        for offset in [o for o in self.holds if o in self._global_at]:
            self._drop_hold(offset, delta)
        self._place_all(now, delta)
        return self._finish(delta, moves)

    def change(
        self, added: Iterable[ServiceKey], removed: Iterable[ServiceKey], now: float
    ) -> TableDelta:
        """Local services came and went: O(keys given), unless VIPs collide."""
        moves = self._moves
        delta = TableDelta()
        gone = set(removed)
        new = {k for k in added if k not in gone}
        local = self._local
        if not self._local_shared:
            for key in gone:
                local.pop(key, None)
            for key in new:
                local.setdefault(key, key)
        try:
            if self._expire(now, delta):
                raise _Collision
            for key in sorted(k for k in gone if k in self.provisional):
                self._drop_provisional(key, now, delta)
            self.exhausted -= gone
            self._settle(new, now, delta)
        except _Collision:
            self._place_all(now, delta)
        return self._finish(delta, moves)

    def follow(self, delta: TableDelta, version: int, now: float) -> None:
        """Apply a change the zone's leader stored (a replica that follows): O(delta).

        The global's rows and the hold-downs are the leader's as it stored them;
        the provisional VIPs (never stored) follow here as they did on the
        leader, from the same rows and hold-downs.
        """
        assert self.following, "only a replica that follows applies its leader's change"
        moves = self._moves
        scratch = TableDelta()
        # A hold-down gone may let a probe stop earlier, and one that came may sit
        # under a provisional VIP this replica placed before the leader's change
        # came (its inventory changed first): then every one is placed again.
        again = False
        for hold in delta.holds_dropped:
            if hold.offset in self.holds:
                self._drop_hold(hold.offset, scratch)
                # As the leader's expiry has it (L{_expire}): a provisional VIP at
                # the hold-down's offset, or one whose probe may have passed it.
                offset = hold.offset
                again = again or (
                    offset in self._provisional_at
                    or (bool(self.provisional) and self._occupied(self.range.next_offset(offset)))
                )
        for hold in delta.holds_added:
            if hold.offset in self.holds:
                self._drop_hold(hold.offset, scratch)
            self._add_hold(hold)
            if self._provisional_at.get(hold.offset, hold.key) != hold.key:
                again = True
        self.version = version
        if delta.added or delta.removed:
            self._apply_rows(TableDelta(added=delta.added, removed=delta.removed), now)
        if again:
            self._place_all(now, scratch)
        self._finish(scratch, moves)

    def forget_partial(self) -> None:
        """A new connection: whatever arrived of an unfinished message is void."""
        self._pending_full = self._pending_upsert = self._pending_remove = None
        self._pending_part = None

    def apply(self, message: TableUpdate, now: float = 0.0) -> TableDelta | None:
        """Apply one table part; returns the change to persist once complete, else None.

        The provisional VIPs follow at once (as L{change} does).  A change
        costs O(rows in it); a full table, O(rows).  Raises ValueError if a
        change does not start from the version held.
        """
        check_part(message.part, self._pending_part)
        self._pending_part = None if message.last else message.part
        if message.part == 0:
            if not message.full and message.base != self.version:
                raise ValueError(f"change from version {message.base}, table is {self.version}")
            # Parts are gathered and applied at the last one: the zone stores and
            # acknowledges whole versions only.
            if message.full:
                self._pending_full = _FullTable(dict(self.global_rows))
                self._pending_upsert = self._pending_remove = None
            else:
                self._pending_full, self._pending_upsert, self._pending_remove = None, {}, set()
        full = self._pending_full
        if full is not None:
            full.take(message, self.global_rows, self.range.size, self._local, self.provisional)
        else:
            upsert, remove = self._pending_upsert, self._pending_remove
            assert upsert is not None and remove is not None
            for mesh, service in message.remove:
                key = ServiceKey(mesh, service)
                upsert.pop(key, None)
                remove.add(key)
            # (Tuples made without the named tuples' argument handling.)
            new, size, own = tuple.__new__, self.range.size, self._local.get
            placed = self.provisional.get
            for mesh, service, offset, zones, claim in message.upsert:
                if offset >= size:
                    raise ProtocolError(f"offset {offset} is outside the VIP range")
                key = new(ServiceKey, (mesh, service))
                key = own(key, key)
                was = placed(key)
                if was is not None and was == offset:
                    # The very int of the provisional VIP confirmed: the zone's
                    # maps by offset keep it as their key (a million services).
                    offset = was
                upsert[key] = new(Allocation, (key, offset, zones, claim))
                remove.discard(key)  # a row given again is not removed
        if not message.last:
            return None
        pending_upsert, pending_remove = self._pending_upsert, self._pending_remove
        self.forget_partial()
        rows = self.global_rows
        if full is not None:
            full.settle()
        if full is not None and not rows:
            # A fresh zone's first table: its gathered maps become the view's.
            delta = TableDelta(added=list(full.rows.values()))
            self.version = message.version
            self._apply_rows(delta, now, whole=(full.rows, full.at))
            return delta
        if full is not None:
            # Only the rows that differed when they came, and are still the table's.
            added = [a for a in full.changed if full.rows.get(a.key) is a]
            removed_keys: set[ServiceKey] = set(full.unseen)
        else:
            assert pending_upsert is not None and pending_remove is not None
            removed_keys = {k for k in pending_remove if k in rows}
            self._check_offsets(pending_upsert, removed_keys)
            added = [a for k, a in pending_upsert.items() if rows.get(k) != a]
        delta = TableDelta(added=added, removed=[rows[k] for k in removed_keys])
        # A row replaced is removed then added (as the store writes it).
        delta.removed += [old for a in delta.added if (old := rows.get(a.key)) is not None]
        self.version = message.version
        self._apply_rows(delta, now)
        return delta

    def _check_offsets(
        self, upsert: Mapping[ServiceKey, Allocation], removed: set[ServiceKey]
    ) -> None:
        """Refuse a change that leaves one offset to two keys: O(rows in the change)."""
        claimed: dict[int, ServiceKey] = {}
        for key, allocation in upsert.items():
            offset = allocation.offset
            if claimed.setdefault(offset, key) != key:
                raise ProtocolError("the table gives one VIP to two services")
            owner = self._global_at.get(offset)
            if owner is None or owner == key or owner in removed:
                continue
            moved = upsert.get(owner)
            if moved is None or moved.offset == offset:
                raise ProtocolError("the table gives one VIP to two services")

    def _apply_rows(
        self,
        delta: TableDelta,
        now: float,
        whole: tuple[dict[ServiceKey, Allocation], dict[int, ServiceKey]] | None = None,
    ) -> None:
        """Take the global's rows changed in C{delta}; the provisional VIPs follow.

        C{whole}: a fresh zone's first table (C{delta} adds every row of it), by
        key and by offset, taken as the view's own maps.
        """
        moves = self._moves
        gone = set(map(_key_of, delta.removed))
        if gone:
            gone -= set(map(_key_of, delta.added))
        for allocation in delta.removed:
            if self._global_at.get(allocation.offset) == allocation.key:
                del self._global_at[allocation.offset]
            if allocation.key in gone:
                del self.global_rows[allocation.key]
            self._touched[allocation.key] = None
        collision = False
        #: Keys whose provisional VIP the global gave another key: placed again.
        displaced: list[ServiceKey] = []
        # One pass per map (a fresh zone's first table is 100,000 rows at once).
        added = delta.added
        keys: Iterable[ServiceKey]
        if whole is not None:
            # Maps made part by part: no pass over the table here (100,000 rows).
            assert not self.global_rows and not gone
            self.global_rows, self._global_at = whole
            keys = self.global_rows.keys()
            if self._touched:
                self._touched.update(self.global_rows)
            else:
                self._touched = dict(self.global_rows)  # (a copy keeps the hashes)
        else:
            keys = list(map(_key_of, added))
            self.global_rows.update(zip(keys, added, strict=True))
            self._global_at.update(zip(map(_offset_of, added), keys, strict=True))
            self._touched.update(dict.fromkeys(keys))

        def added_at(offsets: Mapping[int, object]) -> Iterable[tuple[ServiceKey, int]]:
            """The rows added at C{offsets}, as (key, offset): for a whole table, the
            few C{offsets} looked up rather than every row walked."""
            if whole is not None and len(offsets) < len(added):
                at = self._global_at
                return [(at[o], o) for o in sorted(offsets) if o in at]
            return [
                (k, o) for k, o in zip(keys, map(_offset_of, added), strict=True) if o in offsets
            ]

        if self.holds:
            for key, offset in added_at(self.holds):
                hold = self._drop_hold(offset, delta)
                if hold.key in self.provisional and hold.key != key:
                    collision = True
        if self._provisional_at:
            for key, offset in added_at(self._provisional_at):
                other = self._provisional_at.get(offset)
                if other is not None and other != key:
                    # The global gave another key's provisional VIP.  A placement
                    # from scratch gives every other key what it has (no key before
                    # it reached that offset, and for every key after it the offset
                    # is still taken): only that key is placed again, unless its
                    # probe meets a later key (L{_place}), which places everything
                    # again.
                    displaced.append(other)
        for allocation in delta.removed:
            if allocation.offset not in self._global_at:
                # The global holds it too: kept from provisional VIPs.
                self._hold(allocation.key, allocation.offset, now, delta)
        try:
            # Hold-downs run out first, as a from-scratch reconcile would drop them.
            expired = self._expire(now, delta)
            if collision or expired:
                raise _Collision
            if self.provisional:
                if whole is not None and len(self.provisional) < len(added):
                    keys = [key for key in self.provisional if key in self.global_rows]
                for key in keys:
                    if key in self.provisional:
                        self._drop_provisional(key, now, delta)
            for key in displaced:
                if key in self.provisional:
                    self._drop_provisional(key, now, delta)
            self._settle([*gone, *displaced], now, delta)
        except _Collision:
            self._place_all(now, delta)
        self._finish(delta, moves)
