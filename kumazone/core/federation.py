"""Federation logic, pure: the global's merged table and a zone's view of it.

L{Federation} is the global's core object: the merged table kept equal to its
store.  L{MergedTable} merges every zone's inventory, allocates with the same rules as a
standalone zone (L{VipAllocator}), keeps a bounded change log so that a zone that
comes back gets only what changed since the version it holds, and records each
zone's state.  L{FederatedView} is a zone's table: the global's rows plus
provisional VIPs for local services the global has not allocated yet.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from kumazone.core.limits import ZoneLimits, ZoneRefused, check_service_keys
from kumazone.core.messages import Inventory, ProtocolError, Row
from kumazone.core.names import assign_names, service_names
from kumazone.core.storage import Store, StoreChanges, StoreError
from kumazone.core.view import FederatedView, check_part
from kumazone.core.vips import (
    Allocation,
    Hold,
    ServiceKey,
    TableDelta,
    VipAllocator,
    VipRange,
)

if TYPE_CHECKING:
    from kumazone.core.config import DnsServerConfig

__all__ = ["FederatedView", "Federation", "MergedTable", "ZoneRecord"]


#: Versions kept in the change log; a zone further behind gets the whole table.
CHANGE_LOG_VERSIONS = 1024


class _Change(NamedTuple):
    """One entry of the change log: the services a version changed."""

    version: int
    keys: frozenset[ServiceKey]


@dataclass
class ZoneRecord:
    """What the global knows of one zone."""

    name: str
    services: set[ServiceKey] = field(default_factory=set)
    connected: bool = False
    last_contact: float = 0.0
    acked: int = 0
    #: An inventory (full or a change) being received in parts, applied at its last.
    pending: set[ServiceKey] | None = None
    pending_part: int | None = None
    #: When the zone's acked version fell behind, for the sync-lag metric.
    behind_since: float | None = None


class MergedTable:
    """The one VIP table of the federation."""

    def __init__(
        self,
        vip_range: VipRange,
        hold_down: float,
        allocations: Iterable[Allocation] = (),
        holds: Iterable[Hold] = (),
        version: int = 0,
        zones: Iterable[ZoneRecord] = (),
    ) -> None:
        self.allocator = VipAllocator(vip_range, hold_down, allocations, holds, version)
        self.zones: dict[str, ZoneRecord] = {z.name: z for z in zones}
        self._zones_of: dict[ServiceKey, tuple[str, ...]] = self._compute_zones_of()
        #: (version, keys changed in that version), oldest first.
        self._log: list[_Change] = []

    @property
    def version(self) -> int:
        """The table's version (the SOA serial zones serve)."""
        return self.allocator.version

    def restore(
        self,
        allocations: Iterable[Allocation],
        holds: Iterable[Hold],
        version: int,
        zones: Iterable[ZoneRecord],
    ) -> None:
        """Go back to what the store holds (after a write to it failed)."""
        connected = {name for name, record in self.zones.items() if record.connected}
        self.allocator = VipAllocator(
            self.allocator.range, self.allocator.hold_down, allocations, holds, version
        )
        self.zones = {z.name: z for z in zones}
        for name in connected & set(self.zones):
            self.zones[name].connected = True
        self._zones_of = self._compute_zones_of()
        self._log.clear()

    def _compute_zones_of(self) -> dict[ServiceKey, tuple[str, ...]]:
        zones_of: dict[ServiceKey, list[str]] = {}
        for name in sorted(self.zones):
            for key in self.zones[name].services:
                zones_of.setdefault(key, []).append(name)
        return {key: tuple(names) for key, names in zones_of.items()}

    # -- zones ------------------------------------------------------------------

    def zone(self, name: str) -> ZoneRecord:
        """The record of zone C{name}, created on first sight."""
        record = self.zones.get(name)
        if record is None:
            record = self.zones[name] = ZoneRecord(name)
        return record

    def receive_inventory(
        self, name: str, message: Inventory, now: float, limits: ZoneLimits | None = None
    ) -> TableDelta | None:
        """Apply one inventory part; a delta when the merged set changed, else None.

        Raises L{ZoneRefused} (dropping the whole inventory being received, and
        keeping the zone's services as they were) for a part that breaks the
        rules or C{limits}.
        """
        record = self.zone(name)
        record.last_contact = now
        try:
            pending = self._gather(record, message, limits or ZoneLimits())
        except ZoneRefused:
            record.pending, record.pending_part = None, None
            raise
        if not message.last:
            record.pending, record.pending_part = pending, message.part
            return None
        record.pending, record.pending_part = None, None
        if pending == record.services:
            return None
        record.services = pending
        return self.reconcile(now)

    def _gather(
        self, record: ZoneRecord, message: Inventory, limits: ZoneLimits
    ) -> set[ServiceKey]:
        """The zone's services once C{message} is added to the parts received so far."""
        try:
            check_part(message.part, record.pending_part)
        except ProtocolError as e:
            raise ZoneRefused("bad-part", str(e)) from None
        if message.part >= limits.max_parts:
            raise ZoneRefused(
                "too-many-parts",
                f"inventory of more than {limits.max_parts} parts (the limit)",
            )
        check_service_keys(message.add, "add")
        check_service_keys(message.remove, "remove")
        pending = record.pending
        if message.part == 0 or pending is None:
            # A change is applied whole, like a full inventory: one version for it.
            pending = set() if message.full else set(record.services)
        pending = pending | {ServiceKey(m, s) for m, s in message.add}
        if not message.full:
            pending -= {ServiceKey(m, s) for m, s in message.remove}
        if len(pending) > limits.max_services:
            raise ZoneRefused(
                "too-many-services",
                f"zone {record.name} would have {len(pending)} services, "
                f"more than its limit of {limits.max_services}",
            )
        return pending

    def delete_zone(self, name: str, now: float) -> TableDelta | None:
        """Forget a zone and its services; None if there was no such zone."""
        if name not in self.zones:
            return None
        del self.zones[name]
        return self.reconcile(now)

    def acknowledge(self, name: str, version: int, now: float) -> None:
        """A zone says it holds table C{version}; L{ZoneRefused} for one never made."""
        if version > self.version:
            raise ZoneRefused(
                "bad-ack", f"ack of table version {version}, the table is at {self.version}"
            )
        record = self.zone(name)
        record.acked = version
        record.last_contact = now
        record.behind_since = None if version >= self.version else record.behind_since

    # -- the table --------------------------------------------------------------

    def reconcile(self, now: float) -> TableDelta:
        """Allocate for the union of every zone's services; log what changed."""
        zones_of = self._compute_zones_of()
        delta = self.allocator.reconcile(zones_of.keys(), now)
        changed = {a.key for a in delta.added} | {a.key for a in delta.removed}
        changed |= {k for k, z in zones_of.items() if self._zones_of.get(k) != z}
        self._zones_of = zones_of
        if changed and not delta.changed:
            self.allocator.version += 1  # only the zones of some services changed
        if changed:
            self._log.append(_Change(self.version, frozenset(changed)))
            del self._log[:-CHANGE_LOG_VERSIONS]
            for record in self.zones.values():
                if record.behind_since is None:
                    record.behind_since = now
        return delta

    def row(self, key: ServiceKey) -> Row:
        """The row of service C{key}, as sent to zones."""
        allocation = self.allocator.allocations[key]
        return Row(
            key.mesh, key.service, allocation.offset, self._zones_of.get(key, ()), allocation.claim
        )

    def rows(self) -> list[Row]:
        """The whole table, sorted by mesh and service."""
        return [self.row(key) for key in sorted(self.allocator.allocations)]

    def names(self, domain: str) -> dict[tuple[str, str], tuple[tuple[str, ...], tuple[str, ...]]]:
        """Each row's DNS names and problems, owned as every zone computes them."""
        return assign_names(
            (
                (key.mesh, key.service, allocation.claim)
                for key, allocation in self.allocator.allocations.items()
            ),
            functools.lru_cache(maxsize=None)(lambda service: service_names(service, domain)),
        )

    def zones_of(self, key: ServiceKey) -> tuple[str, ...]:
        """The zones that have service C{key}."""
        return self._zones_of.get(key, ())

    def changes_since(self, base: int) -> tuple[list[Row], list[tuple[str, str]]] | None:
        """Rows to upsert and keys to remove to go from C{base} to now; None if too old."""
        if base == self.version:
            return [], []
        if base > self.version or not self._log or self._log[0].version > base + 1:
            return None
        keys: set[ServiceKey] = set()
        for version, changed in self._log:
            if version > base:
                keys |= changed
        upsert = [self.row(k) for k in sorted(keys) if k in self.allocator.allocations]
        remove = [(k.mesh, k.service) for k in sorted(keys) if k not in self.allocator.allocations]
        return upsert, remove


class Federation:
    """The global's core: the merged table kept equal to its store.

    It restores the table from the store at start-up (allocating anew when the
    VIP range changed), persists every change, and after a failed write puts the
    table back to what the store holds, so that nothing unstored is pushed.
    """

    def __init__(
        self,
        config: DnsServerConfig,
        store: Store,
        table_id: str,
        warn: Callable[[str], None] = lambda message: None,
    ) -> None:
        """
        @param table_id: this process's table id, new at every start, so that a
            zone takes the whole table rather than changes from a version this
            process may never have had.
        """
        self.store = store
        self.table_id = table_id
        self._range_id = f"{config.cidr} {config.cidr6}"
        state = store.load()
        allocations, holds, reset = state.allocations, state.holds, False
        if state.vip_range and state.vip_range != self._range_id:
            warn(
                f"VIP range changed from {state.vip_range} to {self._range_id}: "
                "every VIP is allocated anew"
            )
            allocations, holds, reset = [], [], True
        self.merged = MergedTable(
            VipRange(config.cidr, config.cidr6),
            config.hold_down,
            allocations,
            holds,
            state.table_version,
            state.zones,
        )
        for record in self.merged.zones.values():
            record.connected = False
        #: Zones whose stored services did not all validate (dropped; store them again).
        self.cleaned_zones = self._drop_invalid_services(warn)
        store.commit(StoreChanges(table_id=table_id, vip_range=self._range_id, reset_table=reset))

    def _drop_invalid_services(self, warn: Callable[[str], None]) -> list[str]:
        """Drop stored services that break the rules (stored by an older kumazone)."""
        cleaned = []
        for name, record in sorted(self.merged.zones.items()):
            bad = set()
            for key in record.services:
                try:
                    check_service_keys([(key.mesh, key.service)], "service")
                except ZoneRefused:
                    bad.add(key)
            if bad:
                record.services -= bad
                cleaned.append(name)
                warn(f"zone {name}: {len(bad)} stored service(s) are not valid names: dropped")
        return cleaned

    def persist(
        self, delta: TableDelta | None, zones: Iterable[str], deleted: Iterable[str]
    ) -> None:
        """Store a change: the table delta, the records of C{zones}, C{deleted} zones.

        Raises L{StoreError} after putting the table back to what the store holds.
        """
        merged = self.merged
        try:
            self.store.commit(
                StoreChanges(
                    delta=delta,
                    table_version=merged.version,
                    zones_put=tuple(merged.zones[z] for z in zones if z in merged.zones),
                    zones_deleted=tuple(deleted),
                )
            )
        except StoreError:
            self._recover()
            raise

    def _recover(self) -> None:
        """After a failed write: memory goes back to what the store holds."""
        stored = self.store.load()
        self.merged.restore(stored.allocations, stored.holds, stored.table_version, stored.zones)

    def tick(self, now: float) -> TableDelta | None:
        """Periodic work: expire hold-downs and retry a full range when due; the change, if any."""
        if not self.merged.allocator.due(now):
            return None
        delta = self.merged.reconcile(now)
        return delta if delta.anything else None
