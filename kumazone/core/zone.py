"""The zone's inventory and VIP table, kept consistent with the store. Pure.

Resources come from two sources: files in the resources directory and the HTTP
API.  A resource is defined by one source only: the first file (in path order)
that defines it, otherwise the API.  Every change recomputes the wanted services,
reconciles the VIP table, persists both in one transaction and tells listeners.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from kumazone.core.config import DnsServerConfig
from kumazone.core.messages import TableUpdate
from kumazone.core.names import ServiceNames, assign_names, service_names
from kumazone.core.resources import DATAPLANE, MESH, Resource, ResourceKey
from kumazone.core.storage import Store, StoreChanges, StoredState, StoreError
from kumazone.core.view import FederatedView
from kumazone.core.vips import Served, ServiceKey, TableDelta, VipAllocator, VipRange

__all__ = [
    "DEFAULT_MESH",
    "ConflictError",
    "VipEntry",
    "Zone",
    "ZoneChange",
    "ZoneSnapshot",
]

DEFAULT_MESH = "default"
#: Distinct warnings remembered (so as to be given once) before the memory is reset.
_WARNED_KEPT = 10_000


class ConflictError(Exception):
    """A resource is defined by another source and cannot be changed here."""


@dataclass(frozen=True)
class VipEntry:
    """One service with its VIPs and DNS names."""

    key: ServiceKey
    vip: str
    vip6: str
    names: tuple[str, ...]
    problems: tuple[str, ...] = ()
    provisional: bool = False
    zones: tuple[str, ...] = ()


class _BuiltEntry(NamedTuple):
    """An entry of the last snapshot and the offset it was built for."""

    offset: int
    entry: VipEntry


@dataclass(frozen=True)
class ZoneSnapshot:
    """What the DNS server and the API serve.

    C{entries} (in the zone: a L{SortedIndex} by service key) and
    C{mesh_of_address} are the zone's live structures, changed in place at the
    next change: read them on the reactor, at once, never keep them.
    """

    version: int
    entries: Sequence[VipEntry]
    mesh_of_address: Mapping[str, str]
    exhausted: tuple[ServiceKey, ...] = ()
    range_size: int = 0
    range_used: int = 0
    meshes: tuple[str, ...] = (DEFAULT_MESH,)
    zone: str = ""


@dataclass(frozen=True)
class ZoneChange:
    """What one change of the zone's table did: what listeners are given.

    A listener that keeps state of its own (the DNS authority, the hot path's
    cache, zone sync) applies C{removed} then C{added}, at a cost of what
    changed; with C{full}, anything may have changed and it rebuilds from
    C{snapshot}.
    """

    snapshot: ZoneSnapshot
    #: Entries gone or replaced, as they were.
    removed: tuple[VipEntry, ...] = ()
    #: Entries new or replaced, as they are now.
    added: tuple[VipEntry, ...] = ()
    #: Dataplane addresses whose mesh may have changed.
    addresses: frozenset[str] = frozenset()
    #: The inventory's services (L{Zone.wanted}) that came and went.
    services_added: frozenset[ServiceKey] = frozenset()
    services_removed: frozenset[ServiceKey] = frozenset()
    #: Anything may have changed (the first build, a recovery, a new table).
    full: bool = False


class Zone:
    """A zone's resources and VIP table; C{now} is always passed in."""

    def __init__(
        self,
        name: str,
        config: DnsServerConfig,
        store: Store,
        warn: Callable[[str], None] = lambda message: None,
        federated: bool = False,
    ) -> None:
        self.name = name
        self.config = config
        self.store = store
        self._warn = warn
        self._warned: set[str] = set()
        self.listeners: list[Callable[[ZoneChange], None]] = []
        state = store.load()
        for key, problem in state.bad_resources:
            warn(f"stored {key} no longer validates and is not served: {problem}")
        self.api: dict[ResourceKey, Resource] = {r.key: r for r in state.resources}
        self.files: dict[str, dict[ResourceKey, Resource]] = {}
        self._federated = federated
        #: The inventory's services, until the inventory changes (see wanted()).
        self._wanted: frozenset[ServiceKey] | None = None
        #: Built entries of the last snapshot and names per service: a change of
        #: one service rebuilds one entry, not all of them.
        self._entries: dict[ServiceKey, _BuiltEntry] = {}
        self._names: dict[str, ServiceNames] = {}
        self._range_id = f"{config.cidr} {config.cidr6}"
        self.table: VipAllocator | FederatedView
        #: '' when this zone allocates; the global's table id once it has synced.
        self.table_id: str = ""
        self._reset_table = False
        self._load_table(state, warn)
        self.snapshot = self._build_snapshot()

    def _load_table(self, state: StoredState, warn: Callable[[str], None]) -> None:
        """Build the in-memory table from what the store holds."""
        config = self.config
        vip_range = VipRange(config.cidr, config.cidr6)
        allocations, holds = state.allocations, state.holds
        self._reset_table = False
        if state.vip_range and state.vip_range != self._range_id:
            warn(
                f"VIP range changed from {state.vip_range} to {self._range_id}: "
                "every VIP is allocated anew"
            )
            allocations, holds = [], []
            self._reset_table = True
        self.table_id = state.table_id
        if self._federated:
            if state.table_id == "":
                allocations = []  # rows allocated standalone are not the global's
            self.table = FederatedView(
                vip_range,
                allocations,
                state.table_version if allocations else 0,
                config.hold_down,
                holds,
            )
        else:
            if state.table_id != "":
                warn("this zone's table came from a global; allocating standalone from now")
                allocations, holds = [], []
                self._reset_table = True
                self.table_id = ""
            self.table = VipAllocator(
                vip_range, config.hold_down, allocations, holds, state.table_version
            )

    def _recover(self) -> None:
        """After a failed write: memory goes back to what the store holds."""
        state = self.store.load()
        self.api = {r.key: r for r in state.resources}
        self._wanted = None
        self._load_table(state, lambda message: None)

    # -- sources ---------------------------------------------------------------

    def owner_of(self, key: ResourceKey) -> str | None:
        """The file that defines C{key}, 'api', or None."""
        for path in sorted(self.files):
            if key in self.files[path]:
                return path
        return "api" if key in self.api else None

    def resources(self) -> dict[ResourceKey, Resource]:
        """The merged inventory: files first (in path order), then the API."""
        merged: dict[ResourceKey, Resource] = {}
        for path in sorted(self.files):
            for key, resource in self.files[path].items():
                merged.setdefault(key, resource)
        for key, resource in self.api.items():
            merged.setdefault(key, resource)
        return merged

    def set_file(self, path: str, resources: Iterable[Resource], now: float) -> None:
        """Replace what file C{path} defines (an empty list removes the file)."""
        self.set_files({path: resources}, now)

    def set_files(self, files: Mapping[str, Iterable[Resource]], now: float) -> None:
        """Replace what several files define, then reconcile once.

        Every file keeps all it defines; where two files define one resource, the
        first path wins and the other copy waits, so that it takes over if the
        first file drops it.
        """
        self._wanted = None
        for path, resources in files.items():
            mine: dict[ResourceKey, Resource] = {}
            for resource in resources:
                if resource.key in mine:
                    self._warn(f"{path}: {resource.key} is defined twice; the first one counts")
                    continue
                mine[resource.key] = resource
            if mine:
                self.files[path] = mine
            else:
                self.files.pop(path, None)
        for path in files:
            for key in self.files.get(path, {}):
                owner = self.owner_of(key)
                if owner != path:
                    self._warn(f"{path}: {key} is defined already in {owner}; this copy waits")
        self.update(now)

    def put(self, resource: Resource, now: float) -> bool:
        """Create or replace a resource given through the API; True if it is new."""
        owner = self.owner_of(resource.key)
        if owner not in (None, "api"):
            raise ConflictError(f"{resource.key} is defined in {owner}; change it there")
        created = resource.key not in self.api
        self.api[resource.key] = resource
        self._wanted = None
        self.update(now, puts=[resource])
        return created

    def delete(self, key: ResourceKey, now: float) -> bool:
        """Delete a resource given through the API; False if there is none."""
        owner = self.owner_of(key)
        if owner not in (None, "api"):
            raise ConflictError(f"{key} is defined in {owner}; remove it there")
        if key not in self.api:
            return False
        del self.api[key]
        self._wanted = None
        self.update(now, deletes=[key])
        return True

    # -- the table -------------------------------------------------------------

    def wanted(self) -> frozenset[ServiceKey]:
        """The services the inventory defines (Dataplanes only, never ExternalServices).

        Kept until the inventory changes: the table, the snapshot and zone sync
        all ask for it after every change.
        """
        if self._wanted is None:
            self._wanted = frozenset(
                ServiceKey(resource.mesh, service)
                for resource in self.resources().values()
                if resource.type == DATAPLANE
                for service in resource.services
            )
        return self._wanted

    def update(
        self,
        now: float,
        puts: Iterable[Resource] = (),
        deletes: Iterable[ResourceKey] = (),
        inventory_changed: bool = True,
    ) -> TableDelta:
        """Reconcile the table with the inventory, persist, and tell listeners.

        C{inventory_changed=False} is the periodic tick: it only expires
        hold-downs and retries services the range had no room for.
        """
        puts, deletes = list(puts), list(deletes)
        before = self.table.exhausted
        try:
            delta = self.table.reconcile(self.wanted(), now)
            if delta.anything or puts or deletes or self._reset_table:
                self._commit(puts=puts, deletes=deletes, delta=delta)
        except StoreError:
            # Nothing is served that is not stored: back to the stored state.
            self._recover()
            raise
        newly_exhausted = set(delta.exhausted) - before
        if newly_exhausted:
            self._warn(
                f"VIP range {self.config.cidr} is exhausted: {len(self.table.exhausted)} "
                f"service(s) without a VIP, e.g. {sorted(newly_exhausted)[0]}"
            )
        if inventory_changed or delta.changed:
            self._publish()
        return delta

    def tick(self, now: float) -> None:
        """Periodic work: expire hold-downs, retry a full range (only when due)."""
        if self.table.due(now):
            self.update(now, inventory_changed=False)

    def apply_global(self, message: TableUpdate, table_id: str, now: float) -> bool:
        """Apply one part of the global's table; True once a whole update is applied.

        Raises ValueError if the message is a change from a version not held.
        """
        assert isinstance(self.table, FederatedView)
        if table_id != self.table_id:
            self._reset_table = True
            if not message.full:
                raise ValueError(f"a change for table {table_id}, holding {self.table_id!r}")
        try:
            delta = self.table.apply(message, now)
            if delta is None:
                return False
            held = self.table.reconcile(self.wanted(), now)
            delta.holds_added += held.holds_added
            delta.holds_dropped += held.holds_dropped
            self._commit(delta=delta, table_id=table_id)
        except StoreError:
            self._recover()
            raise
        self.table_id = table_id
        self._publish()
        return True

    def _commit(
        self,
        puts: Iterable[Resource] = (),
        deletes: Iterable[ResourceKey] = (),
        delta: TableDelta | None = None,
        table_id: str | None = None,
    ) -> None:
        if self._reset_table and isinstance(self.table, FederatedView):
            # A new table replaces every stored row (and the zone's hold-downs stay).
            delta = TableDelta(
                added=list(self.table.global_rows.values()),
                holds_added=list(self.table.holds.values()),
            )
        self.store.commit(
            StoreChanges(
                puts=tuple(puts),
                deletes=tuple(deletes),
                delta=delta,
                table_version=self.table.version,
                vip_range=self._range_id,
                reset_table=self._reset_table,
                table_id=table_id if table_id is not None else self.table_id,
            )
        )
        self._reset_table = False

    def _publish(self) -> None:
        self.snapshot = self._build_snapshot()
        change = ZoneChange(self.snapshot, full=True)
        for listener in list(self.listeners):
            # One failing listener must not keep the others (the DNS authority,
            # the hot path's cache) on the old table.
            try:
                listener(change)
            except Exception as e:
                self._warn(f"a listener of the table failed: {type(e).__name__}: {e}")

    def _build_snapshot(self) -> ZoneSnapshot:
        """The view the DNS server and the API serve, from the table and the inventory."""
        entries = self._build_entries()
        resources = self.resources()
        vip_range = self.table.range
        return ZoneSnapshot(
            version=self.table.version,
            entries=tuple(entries),
            mesh_of_address=self._mesh_of_address(resources),
            exhausted=tuple(sorted(self.table.exhausted)),
            range_size=vip_range.size,
            range_used=len(entries),
            meshes=_meshes(resources),
            zone=self.name,
        )

    def _build_entries(self) -> list[VipEntry]:
        """One entry per served service, sorted; an unchanged service keeps its entry."""
        if len(self._names) > 2 * len(self._entries) + 1024:
            self._names.clear()
        previous, self._entries = self._entries, {}
        served = list(self.table.served())
        assigned = assign_names(
            ((row.key.mesh, row.key.service, row.claim) for row in served), self._names_of
        )
        local = self.wanted()
        entries = []
        for row in served:
            owned, problems = assigned[(row.key.mesh, row.key.service)]
            if row.key in local:
                # Only this zone's own services: another zone's bad names are its to report.
                for problem in problems:
                    self._warn_once(f"service {row.key}: {problem}")
            entry = self._entry(previous.get(row.key), row, owned, problems)
            self._entries[row.key] = _BuiltEntry(row.offset, entry)
            entries.append(entry)
        return entries

    def _names_of(self, service: str) -> ServiceNames:
        names = self._names.get(service)
        if names is None:
            names = self._names[service] = service_names(service, self.config.domain)
        return names

    def _entry(
        self,
        cached: _BuiltEntry | None,
        row: Served,
        owned: tuple[str, ...],
        problems: tuple[str, ...],
    ) -> VipEntry:
        """The entry of C{row}: the last snapshot's if nothing about it changed."""
        zones = row.zones or (self.name,)
        entry = cached.entry if cached is not None and cached.offset == row.offset else None
        if entry is not None and (entry.names, entry.problems, entry.provisional, entry.zones) == (
            owned,
            problems,
            row.provisional,
            zones,
        ):
            return entry
        return VipEntry(
            row.key,
            str(self.table.range.ipv4(row.offset)),
            str(self.table.range.ipv6(row.offset)),
            owned,
            problems,
            row.provisional,
            zones,
        )

    def _mesh_of_address(self, resources: Mapping[ResourceKey, Resource]) -> dict[str, str]:
        """Each Dataplane address to its mesh; an address in several meshes gets none."""
        mesh_of_address: dict[str, str] = {}
        ambiguous: set[str] = set()
        for resource in resources.values():
            if resource.type == DATAPLANE and resource.address is not None:
                first = mesh_of_address.setdefault(resource.address, resource.mesh)
                if first != resource.mesh:
                    ambiguous.add(resource.address)
        for address in sorted(ambiguous):
            self._warn_once(
                f"address {address} is a Dataplane in several meshes; it gets mesh default"
            )
            del mesh_of_address[address]
        return mesh_of_address

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            if len(self._warned) >= _WARNED_KEPT:
                self._warned.clear()  # bounded memory; a warning may come again
            self._warned.add(message)
            self._warn(message)


def _meshes(resources: Mapping[ResourceKey, Resource]) -> tuple[str, ...]:
    """Every mesh the inventory names (and the default mesh), sorted."""
    meshes = {DEFAULT_MESH} | {r.mesh for r in resources.values() if r.type != MESH}
    meshes |= {r.name for r in resources.values() if r.type == MESH}
    return tuple(sorted(meshes))
