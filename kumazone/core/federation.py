"""Federation logic, pure: the global's merged table and a zone's view of it.

L{Federation} is the global's core object: the merged table kept equal to its
store.  L{MergedTable} merges every zone's inventory, allocates with the same rules as a
standalone zone (L{VipAllocator}), keeps a bounded change log so that a zone that
comes back gets only what changed since the version it holds, and records each
zone's state.  L{FederatedView} is a zone's table: the global's rows plus
provisional VIPs for local services the global has not allocated yet.
"""

from __future__ import annotations

import bisect
import functools
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from kumazone.core.limits import ZoneLimits, ZoneRefused, check_service_keys
from kumazone.core.messages import Inventory, ProtocolError, Row
from kumazone.core.names import NameIndex, ServiceNames, assign_names, service_names
from kumazone.core.sortedindex import SortedIndex
from kumazone.core.storage import Store, StoreChanges, StoreError
from kumazone.core.view import FederatedView, check_part
from kumazone.core.vips import (
    PROVISIONAL_CLAIM,
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
#: Beyond this share of the listing changed at once (1/N), it is sorted anew.
_BULK_SHARE = 32


class _Change(NamedTuple):
    """One entry of the change log: the services a version changed, and their rows
    then (None for a row gone), so that any version in the log can be rebuilt."""

    version: int
    keys: tuple[ServiceKey, ...]
    rows: tuple[Row | None, ...]


@dataclass(slots=True)
class _Pending:
    """An inventory being received in parts.

    A full one gathers its keys; a change gathers, per key, whether the zone has
    it after the change (a remove after an add of one key wins), and counts the
    services the zone would have, so that a change costs what it names.
    """

    full: bool
    keys: set[ServiceKey] = field(default_factory=set)
    present: dict[ServiceKey, bool] = field(default_factory=dict)
    count: int = 0


@dataclass(slots=True)
class ZoneRecord:
    """What the global knows of one zone."""

    name: str
    services: set[ServiceKey] = field(default_factory=set)
    connected: bool = False
    last_contact: float = 0.0
    acked: int = 0
    #: An inventory (full or a change) being received in parts, applied at its last.
    pending: _Pending | None = None
    pending_part: int | None = None
    #: When the zone's acked version fell behind, for the sync-lag metric.
    behind_since: float | None = None
    #: An inventory accepted but not applied yet, in order: whether the zone has
    #: each key (True) or not (False) once it is (see L{MergedTable.step}).
    todo: dict[ServiceKey, bool] = field(default_factory=dict)
    #: The services the zone has once L{todo} is applied.
    target: int = 0

    def will_have(self, key: ServiceKey) -> bool:
        """Whether the zone has C{key} once its accepted inventory is applied."""
        present = self.todo.get(key)
        return key in self.services if present is None else present

    @property
    def target_count(self) -> int:
        """How many services the zone has once its accepted inventory is applied."""
        return self.target if self.todo else len(self.services)


_cached_service_names = functools.lru_cache(maxsize=1 << 14)(service_names)


class MergedTable:
    """The one VIP table of the federation, kept at the cost of what changes.

    A zone's inventory change of k services updates the zones of those k
    services, allocates or releases only the services that came or went
    everywhere (L{VipAllocator.change}), logs them, and updates, for those
    services only, what the API pages: L{listing} (the rows in key order) and
    the names each row owns (L{names_of}).  L{reconcile} is the from-scratch
    form, for start-up.

    @ivar listing: every row, by service key, in key order (live: changed at the
        next change; read it on the reactor, never keep it).
    @ivar unstored: the zones' services added (True) and removed (False) since
        the store last took them (L{take_unstored}): what a commit writes.
    """

    def __init__(
        self,
        vip_range: VipRange,
        hold_down: float,
        allocations: Iterable[Allocation] = (),
        holds: Iterable[Hold] = (),
        version: int = 0,
        zones: Iterable[ZoneRecord] = (),
        domain: str = "mesh",
    ) -> None:
        self.allocator = VipAllocator(vip_range, hold_down, allocations, holds, version)
        self.zones: dict[str, ZoneRecord] = {z.name: z for z in zones}
        self.domain = domain
        #: One tuple per set of zones, shared by every row in those zones.
        self._zone_sets: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._zones_of: dict[ServiceKey, tuple[str, ...]] = self._compute_zones_of()
        #: (version, keys changed in that version), oldest first.
        self._log: list[_Change] = []
        self.unstored: dict[str, dict[ServiceKey, bool]] = {}
        self.listing: SortedIndex[ServiceKey, Row] = SortedIndex()
        self._names = NameIndex(self._service_names, self._claim)
        self._rebuild_views()

    @property
    def version(self) -> int:
        """The table's version (the SOA serial zones serve)."""
        return self.allocator.version

    def set_domain(self, domain: str) -> None:
        """Name services under C{domain} from now on (O(table): configuration only)."""
        if domain != self.domain:
            self.domain = domain
            self._rebuild_views()

    def restore(
        self,
        allocations: Iterable[Allocation],
        holds: Iterable[Hold],
        version: int,
        zones: Iterable[ZoneRecord],
    ) -> None:
        """Go back to what the store holds (after a write to it failed)."""
        connected = {name for name, record in self.zones.items() if record.connected}
        todos = {name: (r.todo, r.target) for name, r in self.zones.items() if r.todo}
        self.allocator = VipAllocator(
            self.allocator.range, self.allocator.hold_down, allocations, holds, version
        )
        self.zones = {z.name: z for z in zones}
        for name in connected & set(self.zones):
            self.zones[name].connected = True
        for name in todos.keys() & self.zones.keys():
            # Accepted, not applied yet: what the zone has after it is unchanged.
            self.zones[name].todo, self.zones[name].target = todos[name]
        self._zone_sets = {}
        self._zones_of = self._compute_zones_of()
        self._log.clear()
        self.unstored.clear()
        self._rebuild_views()

    def _zone_set(self, names: tuple[str, ...]) -> tuple[str, ...]:
        return self._zone_sets.setdefault(names, names)

    def _compute_zones_of(self) -> dict[ServiceKey, tuple[str, ...]]:
        zones_of: dict[ServiceKey, list[str]] = {}
        for name in sorted(self.zones):
            for key in self.zones[name].services:
                zones_of.setdefault(key, []).append(name)
        return {key: self._zone_set(tuple(names)) for key, names in zones_of.items()}

    def _claim(self, mesh: str, service: str) -> int:
        """A service's claim to its names, as the table holds it (the name index's)."""
        allocation = self.allocator.allocations.get(ServiceKey(mesh, service))
        return PROVISIONAL_CLAIM if allocation is None else allocation.claim

    def _service_names(self, service: str) -> ServiceNames:
        # The name index asks for one service's names a few times per change: a
        # bounded cache (not one entry per service: the global holds a million).
        return _cached_service_names(service, self.domain)

    def _rebuild_views(self) -> None:
        """The listing and the names from scratch (start-up, a recovery, a new domain)."""
        allocations = self.allocator.allocations
        self.listing = SortedIndex((key, self.row(key)) for key in allocations)
        self._names = NameIndex(self._service_names, self._claim)
        for key, allocation in allocations.items():
            self._names.put(key.mesh, key.service, allocation.claim)

    # -- zones ------------------------------------------------------------------

    def zone(self, name: str) -> ZoneRecord:
        """The record of zone C{name}, created on first sight."""
        record = self.zones.get(name)
        if record is None:
            record = self.zones[name] = ZoneRecord(name)
        return record

    def receive_inventory(
        self,
        name: str,
        message: Inventory,
        now: float,
        limits: ZoneLimits | None = None,
        limit: int | None = None,
    ) -> TableDelta | None:
        """Take one inventory part; a delta when the merged set changed, else None.

        At the last part the inventory is accepted whole: it is checked, and what
        it changes becomes the zone's L{ZoneRecord.todo}, of which up to C{limit}
        keys (all if None) are applied at once; L{step} applies the rest, a
        bounded slice at a time, each slice a version of its own (a table every
        zone can take), in key order, so that the VIPs are those the whole
        change gives.  A change costs what it names; a full inventory, what it
        holds.  Raises L{ZoneRefused} (dropping the whole inventory being
        received, and keeping the zone's services and accepted inventory as
        they were) for a part that breaks the rules or C{limits}.
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
        self._accept(record, pending)
        return self.step(name, now, limit)

    def _accept(self, record: ZoneRecord, pending: _Pending) -> None:
        """A whole inventory received: what it changes joins the zone's L{ZoneRecord.todo}."""
        services = record.services
        if pending.full:
            # Removals first, then additions in key order (as one change places them).
            todo = dict.fromkeys(sorted(services - pending.keys), False)
            todo.update(dict.fromkeys(sorted(pending.keys - services), True))
            record.todo = todo
        else:
            todo = record.todo
            for key, present in pending.present.items():
                if (key in services) == present:
                    todo.pop(key, None)
                else:
                    todo.pop(key, None)  # moved to the end: after what came before it
                    todo[key] = present
        record.target = pending.count

    def step(self, name: str, now: float, limit: int | None = None) -> TableDelta | None:
        """Apply up to C{limit} keys (all if None) of zone C{name}'s accepted inventory.

        One version per call that changes something; None if nothing changed.
        O(C{limit}).
        """
        record = self.zones.get(name)
        if record is None or not record.todo:
            return None
        todo = record.todo
        if limit is None or len(todo) <= limit:
            items, record.todo = todo, {}
        else:
            items = {key: todo.pop(key) for key in list(itertools.islice(todo, limit))}
        services = record.services
        added = [key for key, present in items.items() if present and key not in services]
        removed = [key for key, present in items.items() if not present and key in services]
        if not added and not removed:
            return None
        return self.change_zone(name, added, removed, now)

    def stepping(self) -> list[str]:
        """The zones with an accepted inventory not applied yet, by name."""
        return sorted(name for name, record in self.zones.items() if record.todo)

    def drop_todo(self, name: str) -> None:
        """Forget what zone C{name} sent and is not applied yet (it sends it all again)."""
        record = self.zones.get(name)
        if record is not None:
            record.todo = {}

    def _gather(self, record: ZoneRecord, message: Inventory, limits: ZoneLimits) -> _Pending:
        """The inventory being received once C{message} is added to the parts so far."""
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
            pending = _Pending(message.full, count=0 if message.full else record.target_count)
        if pending.full:
            pending.keys.update(ServiceKey(m, s) for m, s in message.add)
            pending.count = len(pending.keys)
        else:
            present, will_have = pending.present, record.will_have
            for keys, now_present in ((message.add, True), (message.remove, False)):
                for mesh, service in keys:
                    key = ServiceKey(mesh, service)
                    before = present.get(key)
                    if before is None:
                        before = will_have(key)
                    if before != now_present:
                        pending.count += 1 if now_present else -1
                    present[key] = now_present
        if pending.count > limits.max_services:
            raise ZoneRefused(
                "too-many-services",
                f"zone {record.name} would have {pending.count} services, "
                f"more than its limit of {limits.max_services}",
            )
        range_size = self.allocator.range.size
        share = max(1, int(range_size * limits.max_range_share))
        if limits.max_range_share < 1 and pending.count > share:
            raise ZoneRefused(
                "too-many-services",
                f"zone {record.name} would have {pending.count} services, more than its "
                f"share of the VIP range ({share} of {range_size} VIPs)",
            )
        return pending

    def change_zone(
        self,
        name: str,
        added: Iterable[ServiceKey],
        removed: Iterable[ServiceKey],
        now: float,
    ) -> TableDelta:
        """Zone C{name} gains C{added} and loses C{removed}: O(those keys)."""
        record = self.zone(name)
        services, zones_of = record.services, self._zones_of
        unstored = self.unstored.setdefault(name, {})
        new: list[ServiceKey] = []
        gone: list[ServiceKey] = []
        touched: set[ServiceKey] = set()
        for key in added:
            if key in services:
                continue
            services.add(key)
            unstored[key] = True
            touched.add(key)
            zones = zones_of.get(key)
            if zones is None:
                zones_of[key] = self._zone_set((name,))
                new.append(key)
            else:
                zones_of[key] = self._zone_set(tuple(sorted((*zones, name))))
        for key in removed:
            if key not in services:
                continue
            services.discard(key)
            unstored[key] = False
            touched.add(key)
            self._leave(key, name, gone)
        return self._changed(touched, new, gone, now)

    def _leave(self, key: ServiceKey, name: str, gone: list[ServiceKey]) -> None:
        """Zone C{name} no longer has C{key}; C{gone} gets it if no zone has."""
        rest = tuple(z for z in self._zones_of[key] if z != name)
        if rest:
            self._zones_of[key] = self._zone_set(rest)
        else:
            del self._zones_of[key]
            gone.append(key)

    def delete_zone(self, name: str, now: float) -> TableDelta | None:
        """Forget a zone and its services (O(its services)); None if there was no such zone."""
        record = self.zones.pop(name, None)
        if record is None:
            return None
        self.unstored.pop(name, None)  # the store deletes the zone's rows with it
        gone: list[ServiceKey] = []
        for key in record.services:
            self._leave(key, name, gone)
        return self._changed(record.services, [], gone, now)

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

    def take_unstored(self) -> tuple[list[tuple[str, ServiceKey]], list[tuple[str, ServiceKey]]]:
        """The zones' services (zone, key) added and removed since last taken; forgotten."""
        added: list[tuple[str, ServiceKey]] = []
        removed: list[tuple[str, ServiceKey]] = []
        for name, keys in self.unstored.items():
            for key, present in keys.items():
                (added if present else removed).append((name, key))
        self.unstored = {}
        return added, removed

    # -- the table --------------------------------------------------------------

    def reconcile(self, now: float) -> TableDelta:
        """Allocate for the union of every zone's services, from scratch: O(table).

        For start-up (the zones and the table as stored); every later change goes
        through L{change_zone}, L{delete_zone} and L{expire}, which cost what changes.
        """
        zones_of = self._compute_zones_of()
        delta = self.allocator.reconcile(zones_of.keys(), now)
        changed = {a.key for a in delta.added} | {a.key for a in delta.removed}
        changed |= {k for k, z in zones_of.items() if self._zones_of.get(k) != z}
        changed |= self._zones_of.keys() - zones_of.keys()
        self._zones_of = zones_of
        self._rebuild_views()
        self._log_change(changed, delta, now)
        return delta

    def expire(self, now: float) -> TableDelta:
        """Expire hold-downs run out and retry services waiting for room: O(those)."""
        return self._changed(set(), [], [], now)

    def _changed(
        self,
        touched: Iterable[ServiceKey],
        new: list[ServiceKey],
        gone: list[ServiceKey],
        now: float,
    ) -> TableDelta:
        """Allocate C{new}, release C{gone}; log and show C{touched} and what that changed."""
        delta = self.allocator.change(new, gone, now)
        changed = set(touched)
        changed.update(a.key for a in delta.added)
        changed.update(a.key for a in delta.removed)
        self._show(changed)
        self._log_change(changed, delta, now)
        return delta

    def _log_change(self, changed: set[ServiceKey], delta: TableDelta, now: float) -> None:
        """Log C{changed} with their rows as L{listing} now shows them."""
        if not changed:
            return
        if not delta.changed:
            self.allocator.version += 1  # only the zones of some services changed
        keys = tuple(changed)
        get = self.listing.get
        self._log.append(_Change(self.version, keys, tuple(get(key) for key in keys)))
        del self._log[:-CHANGE_LOG_VERSIONS]
        for record in self.zones.values():
            if record.behind_since is None:
                record.behind_since = now

    def _show(self, changed: set[ServiceKey]) -> None:
        """Bring the listing and the names up to date for C{changed}."""
        allocations, names = self.allocator.allocations, self._names
        pairs: list[tuple[ServiceKey, Row | None]] = []
        for key in changed:
            allocation = allocations.get(key)
            if allocation is None:
                pairs.append((key, None))
                names.remove(key.mesh, key.service)
            else:
                pairs.append((key, self.row(key)))
                names.put(key.mesh, key.service, allocation.claim)
        if len(pairs) * _BULK_SHARE > len(self.listing):
            self.listing.update(pairs)  # many: sorted anew
            return
        for key, row in pairs:
            if row is None:
                self.listing.pop(key)
            else:
                self.listing.set(key, row)

    def row(self, key: ServiceKey) -> Row:
        """The row of service C{key}, as sent to zones."""
        allocation = self.allocator.allocations[key]
        return Row(
            key.mesh, key.service, allocation.offset, self._zones_of.get(key, ()), allocation.claim
        )

    def rows(self) -> list[Row]:
        """The whole table, sorted by mesh and service (a copy of L{listing}: O(table))."""
        return list(self.listing)

    def names_of(self, key: ServiceKey) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The DNS names row C{key} owns and the problems of the others, as zones compute them.

        Under L{domain}; KeyError for a service without a row.  O(1).
        """
        return self._names.assigned(key.mesh, key.service)

    def names(self, domain: str) -> dict[tuple[str, str], tuple[tuple[str, ...], tuple[str, ...]]]:
        """Each row's DNS names and problems, owned as every zone computes them (O(table))."""
        if domain == self.domain:
            return {(k.mesh, k.service): self.names_of(k) for k in self.listing.keys()}
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
        step = self.changes_from(base)
        return None if step is None else (step[1], step[2])

    def changes_from(
        self, base: int, limit: int | None = None
    ) -> tuple[int, list[Row], list[tuple[str, str]]] | None:
        """A version after C{base} and the changes from C{base} to it; None if too old.

        The version is the newest whose changes from C{base} name at most
        C{limit} services (all of them if None), or C{base + 1}'s, however
        many it names: each step is the table exactly as it was at that
        version, so a zone far behind catches up in bounded steps.  O(what the
        step names).
        """
        if base == self.version:
            return base, [], []
        log = self._log
        if base > self.version or not log or log[0].version > base + 1:
            return None
        first = bisect.bisect_right(log, base, key=lambda change: change.version)
        rows: dict[ServiceKey, Row | None] = {}
        version = self.version  # unless cut short (a version that changes no row is not logged)
        for position in range(first, len(log)):
            change = log[position]
            if limit is not None and rows and len(rows) + len(change.keys) > limit:
                # Its keys may repeat some already named: count them exactly.
                more = sum(1 for key in change.keys if key not in rows)
                if len(rows) + more > limit:
                    version = log[position - 1].version
                    break
            rows.update(zip(change.keys, change.rows, strict=True))
        upsert: list[Row] = []
        remove: list[tuple[str, str]] = []
        for key in sorted(rows):
            row = rows[key]
            if row is None:
                remove.append((key.mesh, key.service))
            else:
                upsert.append(row)
        return version, upsert, remove


class Federation:
    """The global's core: the merged table kept equal to its store.

    It restores the table from the store at start-up (allocating anew when the
    VIP range changed), persists every change (the rows it changed: the table's
    delta, the zones' services that came and went, the records named), and
    after a failed write puts the table back to what the store holds, so that
    nothing unstored is pushed.
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
        #: Zones whose stored services did not all validate (dropped; store them again).
        dropped = _drop_invalid_services(state.zones, warn)
        self.cleaned_zones = sorted(dropped)
        self.merged = MergedTable(
            VipRange(config.cidr, config.cidr6),
            config.hold_down,
            allocations,
            holds,
            state.table_version,
            state.zones,
            domain=config.domain,
        )
        for name, keys in dropped.items():
            self.merged.unstored[name] = dict.fromkeys(keys, False)
        for record in self.merged.zones.values():
            record.connected = False
        store.commit(StoreChanges(table_id=table_id, vip_range=self._range_id, reset_table=reset))

    def persist(
        self, delta: TableDelta | None, zones: Iterable[str], deleted: Iterable[str]
    ) -> None:
        """Store a change: the table delta, the zones' services that changed, the
        records of C{zones}, C{deleted} zones.  Writes only those rows.

        Raises L{StoreError} after putting the table back to what the store holds.
        """
        merged = self.merged
        added, removed = merged.take_unstored()
        try:
            self.store.commit(
                StoreChanges(
                    delta=delta,
                    table_version=merged.version,
                    zones_put=tuple(merged.zones[z] for z in zones if z in merged.zones),
                    zones_deleted=tuple(deleted),
                    zone_services_added=added,
                    zone_services_removed=removed,
                )
            )
        except StoreError:
            self._recover()
            raise

    def _recover(self) -> None:
        """After a failed write: memory goes back to what the store holds (O(table))."""
        stored = self.store.load()
        self.merged.restore(stored.allocations, stored.holds, stored.table_version, stored.zones)

    def tick(self, now: float) -> TableDelta | None:
        """Periodic work: expire hold-downs and retry a full range when due; the change, if any."""
        if not self.merged.allocator.due(now):
            return None
        delta = self.merged.expire(now)
        return delta if delta.anything else None


def _drop_invalid_services(
    zones: Iterable[ZoneRecord], warn: Callable[[str], None]
) -> dict[str, set[ServiceKey]]:
    """Drop stored services that break the rules (stored by an older kumazone); by zone."""
    dropped = {}
    for record in sorted(zones, key=lambda record: record.name):
        bad = set()
        for key in record.services:
            try:
                check_service_keys([(key.mesh, key.service)], "service")
            except ZoneRefused:
                bad.add(key)
        if bad:
            record.services -= bad
            dropped[record.name] = bad
            warn(f"zone {record.name}: {len(bad)} stored service(s) are not valid names: dropped")
    return dropped
