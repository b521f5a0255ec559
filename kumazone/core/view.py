"""A zone's view of the global's table: the global's rows plus provisional VIPs. Pure.

L{FederatedView} is the table a federated zone serves: the rows the global sent
(applied whole versions at a time) and, for local services the global has not
allocated yet, provisional VIPs at the offsets the global will most likely give.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

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


def check_part(part: int, previous: int | None) -> None:
    """Parts come in order: 0 starts a message, each next one follows the last."""
    expected = 0 if previous is None else previous + 1
    if part != 0 and part != expected:  # part 0 always starts a message afresh
        raise ProtocolError(f"part {part} where part {expected} was due")


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
        self.global_rows: dict[ServiceKey, Allocation] = {a.key: a for a in rows}
        self.holds: dict[int, Hold] = {h.offset: h for h in holds}
        self.provisional: dict[ServiceKey, int] = {}
        self.exhausted: set[ServiceKey] = set()
        self._local: set[ServiceKey] = set()
        #: Whether the last reconcile changed the provisional VIPs.
        self.changed = False
        self._pending: dict[ServiceKey, Allocation] | None = None
        self._pending_part: int | None = None
        #: Hold-downs the last applied table made, for the next reconcile's delta.
        self._new_holds: list[Hold] = []

    @property
    def allocations(self) -> Mapping[ServiceKey, Allocation]:
        """The global's rows and the provisional VIPs, merged."""
        merged = dict(self.global_rows)
        for key, offset in self.provisional.items():
            merged[key] = Allocation(key, offset, claim=PROVISIONAL_CLAIM)
        return merged

    def due(self, now: float) -> bool:
        """Whether a reconciliation at C{now} would expire a hold-down."""
        return any(h.until <= now for h in self.holds.values())

    def reconcile(self, wanted: Iterable[ServiceKey], now: float) -> TableDelta:
        """Give every local service the global has not allocated a provisional VIP.

        The candidate is the one the global will compute, avoiding every VIP the
        table holds and every hold-down of another service, so the global almost
        always confirms it.  The delta carries only hold-downs (provisional VIPs
        are never stored: they are recomputed at start-up).
        """
        self._local = set(wanted)
        before = self.provisional
        delta = TableDelta(holds_added=self._new_holds)
        self._new_holds = []
        taken = {a.offset for a in self.global_rows.values()}
        self._expire_holds(taken, now, delta)
        self.provisional = {}
        self.exhausted = set()
        for key in sorted(self._local - self.global_rows.keys()):
            offset = self._place(key, taken)
            if offset is None:
                self.exhausted.add(key)
                continue
            taken.add(offset)
            self.provisional[key] = offset
        self._hold_dropped(before, now, delta)
        delta.exhausted = sorted(self.exhausted)
        self.changed = before != self.provisional
        return delta

    def _place(self, key: ServiceKey, taken: set[int]) -> int | None:
        """A provisional offset for C{key}: its own hold-down, else the free candidate."""
        for hold in self.holds.values():
            if hold.key == key and hold.offset not in taken:
                return hold.offset
        if len(taken) + len(self.holds) >= self.range.size:
            return None
        offset = self.range.candidate(key)
        while offset in taken or offset in self.holds:
            offset = self.range.next_offset(offset)
        return offset

    def _expire_holds(self, taken: set[int], now: float, delta: TableDelta) -> None:
        """Drop hold-downs run out, and those of VIPs the global's table now uses."""
        for hold in list(self.holds.values()):
            if hold.until <= now or hold.offset in taken:
                del self.holds[hold.offset]
                delta.holds_dropped.append(hold)

    def _hold_dropped(
        self, before: Mapping[ServiceKey, int], now: float, delta: TableDelta
    ) -> None:
        """Hold back the provisional VIPs given up that the global's table does not use."""
        used = {a.offset for a in self.global_rows.values()} | set(self.provisional.values())
        for key, offset in before.items():
            if self.provisional.get(key) == offset or offset in used or offset in self.holds:
                continue
            hold = Hold(key, offset, now + self.hold_down)
            self.holds[offset] = hold
            delta.holds_added.append(hold)

    def forget_partial(self) -> None:
        """A new connection: whatever arrived of an unfinished message is void."""
        self._pending, self._pending_part = None, None

    def apply(self, message: TableUpdate, now: float = 0.0) -> TableDelta | None:
        """Apply one table part; returns the change to persist once complete, else None.

        Raises ValueError if a change does not start from the version held.
        """
        check_part(message.part, self._pending_part)
        self._pending_part = None if message.last else message.part
        if message.part == 0:
            if not message.full and message.base != self.version:
                raise ValueError(f"change from version {message.base}, table is {self.version}")
            # Parts are gathered and applied at the last one: the zone stores and
            # acknowledges whole versions only.
            self._pending = {} if message.full else dict(self.global_rows)
        pending = self._pending
        assert pending is not None
        for mesh, service in message.remove:
            pending.pop(ServiceKey(mesh, service), None)
        for row in message.upsert:
            if row.offset >= self.range.size:
                raise ProtocolError(f"offset {row.offset} is outside the VIP range")
            key = ServiceKey(row.mesh, row.service)
            pending[key] = Allocation(key, row.offset, row.zones, row.claim)
        if not message.last:
            return None
        new_rows, self._pending = pending, None
        if len({a.offset for a in new_rows.values()}) != len(new_rows):
            raise ProtocolError("the table gives one VIP to two services")
        delta = TableDelta(
            added=[a for k, a in new_rows.items() if self.global_rows.get(k) != a],
            removed=[a for k, a in self.global_rows.items() if new_rows.get(k) != a],
        )
        self._hold_released(delta.removed, new_rows, now)
        self.global_rows = new_rows
        self.version = message.version
        return delta

    def _hold_released(
        self, removed: Iterable[Allocation], new_rows: Mapping[ServiceKey, Allocation], now: float
    ) -> None:
        """Hold back the VIPs the global's table gave up (the global holds them too)."""
        used = {a.offset for a in new_rows.values()}
        for allocation in removed:
            if allocation.offset in used or allocation.offset in self.holds:
                continue
            hold = Hold(allocation.key, allocation.offset, now + self.hold_down)
            self.holds[hold.offset] = hold
            self._new_holds.append(hold)

    def served(self) -> Iterator[Served]:
        """Every row served, sorted by key; provisional ones claim after all others."""
        merged = self.allocations
        for key in sorted(merged):
            allocation = merged[key]
            if key in self.provisional:
                yield Served(key, allocation.offset, allocation.zones, True, PROVISIONAL_CLAIM)
            else:
                yield Served(key, allocation.offset, allocation.zones, False, allocation.claim)
