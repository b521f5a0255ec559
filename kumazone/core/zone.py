"""The zone's inventory and VIP table, kept consistent with the store. Pure.

Resources come from two sources: files in the resources directory and the HTTP
API.  A resource is defined by one source only: the first file (in path order)
that defines it, otherwise the API.  A change follows through the merged
inventory, the wanted services, the VIP table, the entries and names, the store
(one transaction) and the listeners (a L{ZoneChange}), each at a cost of what
changed.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar, cast

from kumazone.core.bulk import bulk_load
from kumazone.core.config import DnsServerConfig
from kumazone.core.messages import TableUpdate
from kumazone.core.names import Assignment, NameIndex, ServiceNames, service_names
from kumazone.core.resources import DATAPLANE, MESH, Resource, ResourceKey
from kumazone.core.sortedindex import SortedIndex
from kumazone.core.storage import Store, StoreChanges, StoredState, StoreError
from kumazone.core.view import FederatedView
from kumazone.core.vips import (
    PROVISIONAL_CLAIM,
    Served,
    ServiceKey,
    TableDelta,
    VipAllocator,
    VipRange,
)

__all__ = [
    "DEFAULT_MESH",
    "ConflictError",
    "VipEntry",
    "Zone",
    "ZoneChange",
    "ZoneSnapshot",
    "publish",
]

DEFAULT_MESH = "default"
#: Distinct warnings remembered (so as to be given once) before the memory is reset.
_WARNED_KEPT = 10_000
#: Services whose candidate DNS names are kept worked out.
_NAMES_CACHED = 4096
#: Rows of a table update from the global from which its write runs on another
#: thread, where the service gives one (L{Zone.write_in_background}).
BACKGROUND_ROWS = 1000
#: A change of more services than this, and of a quarter of the table or more (a
#: first load), builds every entry anew in one pass instead of one at a time.
_REBUILD_AT = 1024


class ConflictError(Exception):
    """A resource is defined by another source and cannot be changed here."""


class VipEntry:
    """One service with its VIPs and DNS names. Immutable.

    C{VipEntry(key, vip, vip6, names, problems, provisional, zones, offset)} holds
    the VIPs as given.  A zone's own entries (L{VipEntry.at}) hold only the VIPs'
    offset, are of a class of the zone's range (L{_of_range}: one for each range,
    which holds it), and spell the addresses out when asked (the API, the
    authority path): a zone holds an entry per service, and the two texts were a
    third of it, the range a slot of its own.  Likewise an entry of one name
    (nearly all) keeps that name, and gives the tuple of its names when asked.
    """

    __slots__ = ("_names", "key", "offset", "problems", "provisional", "zones")

    key: ServiceKey
    #: The names: the one name itself, or a tuple of none or several.
    _names: str | tuple[str, ...]
    problems: tuple[str, ...]
    provisional: bool
    zones: tuple[str, ...]
    #: The VIPs' offset in the zone's range (-1: not told; see L{offset_in}).
    offset: int
    #: The range of an entry made at an offset (its class's), else None.
    _range: VipRange | None = None
    #: The VIPs given as texts (an entry made with them: L{_Given}), else None.
    _texts: tuple[str, str] | None = None

    def __new__(cls, *args: object, **kwargs: object) -> VipEntry:
        # An entry given its VIPs' texts holds them in a slot of its own.
        return _new_object(_Given if cls is VipEntry else cls)

    def __init__(
        self,
        key: ServiceKey,
        vip: str,
        vip6: str,
        names: tuple[str, ...],
        problems: tuple[str, ...] = (),
        provisional: bool = False,
        zones: tuple[str, ...] = (),
        offset: int = -1,
    ) -> None:
        one = names[0] if len(names) == 1 else names
        for slot, value in zip(
            _ENTRY_SLOTS, (key, one, problems, provisional, zones, offset), strict=True
        ):
            slot(self, value)
        _set_texts(self, (vip, vip6))

    @classmethod
    def at(
        cls,
        key: ServiceKey,
        vip_range: VipRange,
        offset: int,
        names: tuple[str, ...],
        problems: tuple[str, ...],
        provisional: bool,
        zones: tuple[str, ...],
    ) -> VipEntry:
        """The entry of the VIPs at C{offset} of C{vip_range} (which must hold it)."""
        of_range = _of_range.get(id(vip_range))
        if of_range is None or of_range._range is not vip_range:
            of_range = _range_class(vip_range)
        entry = _new_object(of_range)
        (
            set_key,
            set_names,
            set_problems,
            set_provisional,
            set_zones,
            set_offset,
        ) = _ENTRY_SLOTS
        set_key(entry, key)
        set_names(entry, names[0] if len(names) == 1 else names)
        set_problems(entry, problems)
        set_provisional(entry, provisional)
        set_zones(entry, zones)
        set_offset(entry, offset)
        return entry

    @property
    def names(self) -> tuple[str, ...]:
        """The DNS names the service holds, underscore form first (as assigned)."""
        names = self._names
        return (names,) if names.__class__ is str else names  # type: ignore[return-value]

    @property
    def vip(self) -> str:
        """The IPv4 VIP, as text."""
        return self._text(0)

    @property
    def vip6(self) -> str:
        """The IPv6 VIP, as text (RFC 5952)."""
        return self._text(1)

    def _text(self, family: int) -> str:
        """The VIP given (0: IPv4, 1: IPv6), else spelled out from the offset."""
        if self._texts is not None:
            return self._texts[family]
        assert self._range is not None
        spell = self._range.ipv6_text if family else self._range.ipv4_text
        return spell(self.offset)

    def offset_in(self, vip_range: VipRange) -> int | None:
        """The VIPs' offset in C{vip_range}: the one the entry carries, else (an
        entry made without it) worked out from C{vip}; None if not of that range."""
        if 0 <= self.offset < vip_range.size:
            return self.offset
        return vip_range.offset_of_ipv4_text(self.vip)

    def replace(self, **changes: object) -> VipEntry:
        """This entry with C{changes} (by field name, C{vip} and C{vip6} too); new
        VIP texts and no C{offset} leave the offset untold (-1)."""
        fields = dict(zip(_ENTRY_FIELDS, self._fields(), strict=True))
        unknown = changes.keys() - fields.keys()
        if unknown:
            raise TypeError(f"VipEntry has no field {', '.join(sorted(unknown))}")
        texts = "vip" in changes or "vip6" in changes
        if texts and "offset" not in changes:
            fields["offset"] = -1
        fields.update(changes)
        if self._range is not None and not texts:
            # An entry of a range stays one: its texts are those of its (new) offset.
            key, _vip, _vip6, names, problems, provisional, zones, offset = fields.values()
            return VipEntry.at(key, self._range, offset, names, problems, provisional, zones)  # type: ignore[arg-type]
        return VipEntry(**fields)  # type: ignore[arg-type]

    def _fields(self) -> tuple[object, ...]:
        return (
            self.key,
            self.vip,
            self.vip6,
            self.names,
            self.problems,
            self.provisional,
            self.zones,
            self.offset,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VipEntry):
            return NotImplemented
        vip_range = self._range
        if vip_range is not None and (vip_range is other._range or vip_range == other._range):
            # One range: the same offset is the same VIPs (no texts spelled out).
            return (
                self.key == other.key
                and self.offset == other.offset
                and self._names == other._names
                and self.problems == other.problems
                and self.provisional == other.provisional
                and self.zones == other.zones
            )
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        # Without the VIP texts (equal entries have the same offset).
        fields = (self.key, self._names, self.problems, self.provisional, self.zones, self.offset)
        return hash(fields)

    def __repr__(self) -> str:
        key, vip, vip6, names, problems, provisional, zones, offset = self._fields()
        return (
            f"VipEntry(key={key!r}, vip={vip!r}, vip6={vip6!r}, names={names!r}, "
            f"problems={problems!r}, provisional={provisional!r}, zones={zones!r}, "
            f"offset={offset!r})"
        )

    def __setattr__(self, name: str, value: object) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")

    def __reduce__(self) -> tuple[object, ...]:
        return (VipEntry, self._fields())


class _Given(VipEntry):
    """An entry given its VIPs as texts (L{VipEntry}'s constructor makes these)."""

    __slots__ = ("_texts",)

    _texts: tuple[str, str] | None


#: The class of the entries at offsets of each range (L{VipEntry.at}), by the
#: range's id (the class holds the range: the id is not another's meanwhile).
_of_range: dict[int, type[VipEntry]] = {}


def _range_class(vip_range: VipRange) -> type[VipEntry]:
    """The class of the entries of C{vip_range}: it holds the range, not each entry."""
    of_range: type[VipEntry] = type(
        "VipEntry", (VipEntry,), {"__slots__": (), "_range": vip_range, "__module__": __name__}
    )
    if len(_of_range) >= _RANGES_KEPT:
        _of_range.clear()  # (a process serves a range or two; tests make many)
    _of_range[id(vip_range)] = of_range
    return of_range


#: Ranges whose entry class is kept for the next entry made at one of their offsets.
_RANGES_KEPT = 64
#: The fields, as the constructor and L{VipEntry._fields} give them.
_ENTRY_FIELDS = ("key", "vip", "vip6", "names", "problems", "provisional", "zones", "offset")
#: The slots' own setters (past the frozen C{__setattr__}), in the order L{VipEntry.at} sets them.
_ENTRY_SLOTS = tuple(
    VipEntry.__dict__[name].__set__
    for name in ("key", "_names", "problems", "provisional", "zones", "offset")
)
_set_texts = _Given.__dict__["_texts"].__set__


_new_object = object.__new__
_new_entry = VipEntry.at
#: C{_new_tuple(ServiceKey, (mesh, service))}: C{ServiceKey(mesh, service)} without
#: the named tuple's argument handling.
_new_tuple = tuple.__new__


@dataclass(frozen=True)
class ZoneSnapshot:
    """What the DNS server and the API serve.

    C{entries} (in the zone: a L{SortedIndex} by service key) and
    C{mesh_of_address} are the zone's live structures, changed in place at the
    next change: read them on the reactor, at once.  A listener may keep them
    only to read them as of the last change it was told of: the zone changes
    them, then tells every listener at once (L{publish}), before anything else
    runs on the reactor.
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
    C{snapshot}.  The first build is the zone's C{snapshot} when the listener
    is added; a change that changes nothing is not told at all.
    """

    snapshot: ZoneSnapshot
    #: Entries gone or replaced, as they were.
    removed: tuple[VipEntry, ...] = ()
    #: Entries new or replaced, as they are now.
    added: tuple[VipEntry, ...] = ()
    #: Dataplane addresses whose mesh may have changed.
    addresses: frozenset[str] = frozenset()
    #: The inventory's services (L{Zone.wanted}) that came and went (in a full
    #: change too: since the inventory before it).
    services_added: frozenset[ServiceKey] = frozenset()
    services_removed: frozenset[ServiceKey] = frozenset()
    #: Anything may have changed (the first build, a recovery, a new table).
    full: bool = False


def publish(
    listeners: Iterable[Callable[[ZoneChange], object]],
    change: ZoneChange,
    warn: Callable[[str], None],
) -> None:
    """Tell every listener of a table C{change}; one that fails is warned of, and the
    others are told all the same (the DNS authority, the hot path's cache)."""
    for listener in list(listeners):
        try:
            listener(change)
        except Exception as e:
            warn(f"a listener of the table failed: {type(e).__name__}: {e}")


class _Inventory(NamedTuple):
    """What one change of the inventory changed (see L{Zone._refresh})."""

    changed: bool
    services_added: frozenset[ServiceKey]
    services_removed: frozenset[ServiceKey]
    addresses: frozenset[str]
    meshes_changed: bool


_NOTHING = _Inventory(False, frozenset(), frozenset(), frozenset(), False)


class ReloadPlan(NamedTuple):
    """What a follower's reload changes (L{Zone.difference}): the API's resources
    that differ (None: gone), the rows and hold-downs, the stored version."""

    resources: dict[ResourceKey, Resource | None]
    delta: TableDelta
    table_version: int
    table_id: str


class Zone:
    """A zone's resources and VIP table; C{now} is always passed in.

    Everything is kept incrementally: a change of k resources costs O(k) (plus
    what the table's change costs), and a change that changes nothing touches
    nothing (no write, no version, no listener).
    """

    #: A change of more services than this (and of a quarter of the table or
    #: more) builds the entries anew in one pass (tests set it low).
    rebuild_at = _REBUILD_AT

    _following = False

    @property
    def following(self) -> bool:
        """A replica that follows its leader (L{follow}): it never allocates, expires
        hold-downs or writes; its table is the leader's, change by change (and, synced
        with a global, its provisional VIPs placed from the leader's rows)."""
        return self._following

    @following.setter
    def following(self, following: bool) -> None:
        was, self._following = self._following, following
        table = getattr(self, "table", None)
        if isinstance(table, FederatedView):
            table.following = following
        if following and not was:
            self._mismatch = None
            if isinstance(table, VipAllocator):
                # A leader's table holds what it wants, but the exhausted; else (a
                # table not yet reconciled: a start, a failed write) compared whole.
                self._mismatch = self._all_mismatched() if self._stale else set(table.exhausted)

    #: While following (standalone): the services whose row the inventory
    #: disagrees with (wanted without a row, a row not wanted, or exhausted), kept
    #: change by change, so that taking the lead places just those (L{lead}).
    _mismatch: set[ServiceKey] | None = None

    def _all_mismatched(self) -> set[ServiceKey]:
        """L{_mismatch} from scratch: O(table)."""
        table = self.table
        assert isinstance(table, VipAllocator)
        allocated = table.allocations.keys()
        return set(self._wanted.keys() ^ allocated) | table.exhausted

    def _recheck(self, keys: Iterable[ServiceKey]) -> None:
        """Keep L{_mismatch} for C{keys} (whose rows or inventory changed)."""
        mismatch, table = self._mismatch, self.table
        if mismatch is None or not isinstance(table, VipAllocator):
            return
        wanted, allocated, exhausted = self._wanted, table.allocations, table.exhausted
        for key in keys:
            if (key in wanted) != (key in allocated) or key in exhausted:
                mismatch.add(key)
            else:
                mismatch.discard(key)

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
        self._federated = federated
        self._range_id = f"{config.cidr} {config.cidr6}"
        self._zones = (name,)
        self._names_uncached: Callable[[str], ServiceNames] = lambda service: service_names(
            service, config.domain
        )
        self._names_of = functools.lru_cache(maxsize=_NAMES_CACHED)(self._names_uncached)
        self.table: VipAllocator | FederatedView
        #: '' when this zone allocates; the global's table id once it has synced.
        self.table_id: str = ""
        self._reset_table = False
        #: After a failed write: the table may lag the inventory, reconcile it whole.
        self._stale = False
        #: Writes each change, told whether it is big (a table update from the
        #: global of L{BACKGROUND_ROWS} rows or more): those on another thread,
        #: where the service has one (a SQLite store: L{BackgroundWrites.write}),
        #: and every other change behind them while one is on its way.  Raises
        #: L{StoreError} if the store refuses at once; a failure later is the
        #: service's to handle (it calls L{recover}); it acknowledges an update to
        #: the global, and answers an API write, only once written.
        self.write_in_background: Callable[[StoreChanges, bool], None] | None = None
        #: Resources given through the API, and what each file defines.
        self.api: dict[ResourceKey, Resource] = {}
        self.files: dict[str, dict[ResourceKey, Resource]] = {}
        with bulk_load():  # a restart loads every stored resource and row
            state = store.load()
            for key, problem in state.bad_resources:
                warn(f"stored {key} no longer validates and is not served: {problem}")
            self._load_table(state, warn)
            self._start_inventory(state.resources)
            del state
            # The stored table need not hold what the stored inventory wants (a new VIP
            # range, a table from a global): the first change or tick reconciles whole.
            self._stale = True
            self._build_entries()
        self.snapshot = self._make_snapshot()

    def _start_inventory(self, api: Iterable[Resource]) -> None:
        """Every derived structure of the inventory, from scratch (files kept)."""
        self.api = {r.key: r for r in api}
        #: The file defining each file-defined key, and later files waiting with a copy.
        self._owner: dict[ResourceKey, str] = {}
        self._waiting: dict[ResourceKey, list[str]] = {}
        for path in sorted(self.files):
            for key in self.files[path]:
                self._add_copy(key, path)
        #: The merged inventory, as its listings by (type, mesh), and read whole.
        self._listings: dict[tuple[str, str], _Listing] = {}
        self._merged = _Merged(self._listings)
        #: Each wanted service's key, to itself: the one key object of the service
        #: here (a federated table's rows of local services take it: L{FederatedView.
        #: share_local}, which reads this map instead of keeping a copy).
        self._wanted: dict[ServiceKey, ServiceKey] = {}
        #: Dataplanes providing a wanted service, where more than one does.
        self._providers: dict[ServiceKey, int] = {}
        #: Each Dataplane address's meshes: mesh (one Dataplane), (mesh, count) or
        #: {mesh: count}.
        self._address_uses: dict[str, str | tuple[str, int] | dict[str, int]] = {}
        #: Each address's one mesh, read from those counts (not a map of its own).
        self._mesh_of_address = _MeshOfAddress(self._address_uses)
        #: Resources naming each mesh.
        self._mesh_uses: dict[str, int] = {}
        self._meshes: tuple[str, ...] = (DEFAULT_MESH,)
        self._meshes_moved = False
        if isinstance(self.table, FederatedView):
            self.table.share_local(self._wanted)
        self._refresh(self.api.keys() | self._owner.keys())

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
                # The global's version (an empty table too: the serial never goes back).
                state.table_version if state.table_id and not self._reset_table else 0,
                config.hold_down,
                holds,
            )
            self.table.following = self._following
        else:
            if state.table_id != "":
                warn("this zone's table came from a global; allocating standalone from now")
                allocations, holds = [], []
                self._reset_table = True
                self.table_id = ""
            self.table = VipAllocator(
                vip_range, config.hold_down, allocations, holds, state.table_version
            )

    def recover(self) -> None:
        """After a failed write (here, or on another thread: L{write_in_background}):
        memory goes back to what the store holds.

        The files stay as read; the table is reconciled with them whole at the
        next change or tick.  Listeners are told to rebuild.
        """
        state = self.store.load()
        wanted = self._wanted
        self._load_table(state, lambda message: None)
        self._start_inventory(state.resources)
        self._stale = True
        self._build_entries()
        self._publish(self._rebuilt(wanted))

    def _rebuilt(self, wanted: Mapping[ServiceKey, object]) -> ZoneChange:
        """The change that tells listeners to rebuild, with the services that came
        and went since the inventory wanted C{wanted} (zone sync sends just those:
        O(n) here, not the whole inventory to the global)."""
        now = self._wanted
        return ZoneChange(
            self._make_snapshot(),
            services_added=frozenset([key for key in now if key not in wanted]),
            services_removed=frozenset([key for key in wanted if key not in now]),
            full=True,
        )

    # -- sources ---------------------------------------------------------------

    def owner_of(self, key: ResourceKey) -> str | None:
        """The file that defines C{key}, 'api', or None."""
        path = self._owner.get(key)
        if path is not None:
            return path
        return "api" if key in self.api else None

    def resources(self) -> Mapping[ResourceKey, Resource]:
        """The merged inventory: files first (in path order), then the API.

        The zone's own mapping, kept up to date (read it at once, do not change it).
        """
        return self._merged

    def listing(self, type: str, mesh: str) -> SortedIndex[ResourceKey, Resource]:
        """The resources of C{type} in C{mesh} ('' for Meshes), sorted by name: live."""
        listing = self._listings.get((type, mesh))
        return listing if listing is not None else SortedIndex()

    def _add_copy(self, key: ResourceKey, path: str) -> None:
        owner = self._owner.get(key)
        if owner is None:
            self._owner[key] = path
            return
        waiting = self._waiting.setdefault(key, [])
        if path < owner:
            self._owner[key] = path
            path = owner
        bisect.insort(waiting, path)

    def _drop_copy(self, key: ResourceKey, path: str) -> None:
        waiting = self._waiting.get(key)
        if self._owner.get(key) == path:
            if waiting:
                self._owner[key] = waiting.pop(0)
            else:
                del self._owner[key]
        elif waiting is not None and path in waiting:
            waiting.remove(path)
        if waiting is not None and not waiting:
            del self._waiting[key]

    def set_file(self, path: str, resources: Iterable[Resource], now: float) -> None:
        """Replace what file C{path} defines (an empty list removes the file)."""
        self.set_files({path: resources}, now)

    def set_files(self, files: Mapping[str, Iterable[Resource]], now: float) -> None:
        """Replace what several files define, then reconcile once.

        Every file keeps all it defines; where two files define one resource, the
        first path wins and the other copy waits, so that it takes over if the
        first file drops it.  A file read again with the same resources changes
        nothing.
        """
        #: Each key touched, with its resource as served before (its listing reads
        #: the sources: the copy served before is taken before they change).
        touched: dict[ResourceKey, Resource | None] = {}
        source_of = self._source_of
        for path, resources in files.items():
            mine: dict[ResourceKey, Resource] = {}
            for resource in resources:
                if resource.key in mine:
                    self._warn(f"{path}: {resource.key} is defined twice; the first one counts")
                    continue
                mine[resource.key] = resource
            old = self.files.get(path, {})
            if mine == old:
                continue
            for key in old.keys() - mine.keys():
                if key not in touched:
                    touched[key] = source_of(key)
                self._drop_copy(key, path)
            for key, resource in mine.items():
                before = old.get(key)
                if before is None or before != resource:
                    if key not in touched:
                        touched[key] = source_of(key)
                    if before is None:
                        self._add_copy(key, path)
            if mine:
                self.files[path] = mine
            else:
                self.files.pop(path, None)
            for key in mine:
                owner = self._owner[key]
                if owner != path:
                    self._warn(f"{path}: {key} is defined already in {owner}; this copy waits")
        if touched:
            self._change(now, touched, before=touched)

    def put(self, resource: Resource, now: float) -> bool:
        """Create or replace a resource given through the API; True if it is new.

        The same resource again changes nothing (and is not written).
        """
        owner = self.owner_of(resource.key)
        if owner not in (None, "api"):
            raise ConflictError(f"{resource.key} is defined in {owner}; change it there")
        before = self.api.get(resource.key)
        if before == resource:
            return False
        self.api[resource.key] = resource
        self._change(now, (resource.key,), puts=[resource], before={resource.key: before})
        return before is None

    def delete(self, key: ResourceKey, now: float) -> bool:
        """Delete a resource given through the API; False if there is none."""
        owner = self.owner_of(key)
        if owner not in (None, "api"):
            raise ConflictError(f"{key} is defined in {owner}; remove it there")
        before = self.api.pop(key, None)
        if before is None:
            return False
        self._change(now, (key,), deletes=[key], before={key: before})
        return True

    # -- the inventory, kept ---------------------------------------------------

    def wanted(self) -> AbstractSet[ServiceKey]:
        """The services the inventory defines (Dataplanes only, never ExternalServices).

        The zone's own live view (set-like), changed in place by the next change.
        """
        return self._wanted.keys()

    def _source_of(self, key: ResourceKey) -> Resource | None:
        path = self._owner.get(key)
        if path is not None:
            return self.files[path][key]
        return self.api.get(key)

    def _refresh(
        self,
        keys: Iterable[ResourceKey],
        before: Mapping[ResourceKey, Resource | None] | None = None,
    ) -> _Inventory:
        """Bring the merged inventory up to date for C{keys}: O(len(keys)).

        C{before}: each key's resource as it was before its sources changed (the
        listings read the sources: a key's old resource is not kept there); None
        for a first load, which had none.
        """
        listings = self._listings
        if not isinstance(keys, AbstractSet | dict):
            keys = dict.fromkeys(keys)  # (each once: a key is counted out and in once)
        was = before.get if before is not None else _nothing
        services: dict[ServiceKey, bool] = {}
        addresses: dict[str, str | None] = {}
        #: Keys that came to and went from each listing.
        came: dict[tuple[str, str], list[ResourceKey]] = {}
        went: dict[tuple[str, str], list[ResourceKey]] = {}
        changed = False
        # _source_of, inline (a first load refreshes every key of the inventory).
        owner_of, files, api = self._owner.get, self.files, self.api
        count = self._count
        for key in keys:
            path = owner_of(key)
            new = files[path][key] if path is not None else api.get(key)
            old = was(key)
            if old is new or (old is not None and old == new):
                continue
            changed = True
            if old is not None:
                count(old, -1, services, addresses)
            if new is not None:
                count(new, 1, services, addresses)
            if old is None or new is None:
                where = (key[0], key[1])  # (type, mesh)
                moving = came if old is None else went
                keys_there = moving.get(where)
                if keys_there is None:
                    keys_there = moving[where] = []
                keys_there.append(key)
        if not changed:
            return _NOTHING
        for where in came.keys() | went.keys():
            listing = listings.get(where)
            if listing is None:
                listing = listings[where] = _Listing(where, self._source_of)
            listing.move(came.get(where, ()), went.get(where, ()))
        wanted = self._wanted
        added = frozenset([k for k, was in services.items() if not was and k in wanted])
        removed = frozenset([k for k, was in services.items() if was and k not in wanted])
        moved = frozenset(self._settle_addresses(addresses))
        meshes_changed = False
        if self._meshes_moved:
            self._meshes_moved = False
            meshes = tuple(sorted({DEFAULT_MESH, *self._mesh_uses}))
            meshes_changed, self._meshes = meshes != self._meshes, meshes
        return _Inventory(True, added, removed, moved, meshes_changed)

    def _count(
        self,
        resource: Resource,
        sign: int,
        services: dict[ServiceKey, bool],
        addresses: dict[str, str | None],
    ) -> None:
        """Count C{resource} in (C{sign} 1) or out (-1) of the wanted services,
        addresses and meshes; note the services and addresses touched as they were."""
        kind, mesh, name = resource.key
        counted = name if kind == MESH else mesh
        mesh_uses = self._mesh_uses
        uses = mesh_uses.get(counted, 0) + sign
        if uses:
            mesh_uses[counted] = uses
        else:
            del mesh_uses[counted]
        if uses == 0 or (uses == 1 and sign == 1):
            self._meshes_moved = True
        if kind != DATAPLANE:
            return
        wanted, providers = self._wanted, self._providers
        for service in resource.services:
            service_key = _new_tuple(ServiceKey, (mesh, service))
            if service_key in wanted:
                count = providers.get(service_key, 1)
            else:
                count = 0
            if service_key not in services:
                services[service_key] = count > 0
            count += sign
            if count > 1:
                providers[service_key] = count
            elif count == 1:
                providers.pop(service_key, None)
                if service_key not in wanted:
                    wanted[service_key] = service_key
            else:
                del wanted[service_key]
        address = resource.address
        if address is not None:
            if address not in addresses:
                addresses[address] = self._mesh_of_address.get(address)
            _add_use(self._address_uses, address, mesh, sign)

    def _settle_addresses(self, addresses: Mapping[str, str | None]) -> list[str]:
        """The addresses touched whose one mesh (none if several) moved."""
        moved = []
        mesh_of = self._mesh_of_address.get
        for address, before in addresses.items():
            mesh = mesh_of(address)
            if isinstance(self._address_uses.get(address), dict):
                self._warn_once(
                    f"address {address} is a Dataplane in several meshes; it gets mesh default"
                )
            if mesh != before:
                moved.append(address)
        return moved

    # -- the table -------------------------------------------------------------

    def _change(
        self,
        now: float,
        keys: Iterable[ResourceKey],
        puts: Sequence[Resource] = (),
        deletes: Sequence[ResourceKey] = (),
        before: Mapping[ResourceKey, Resource | None] | None = None,
    ) -> None:
        """The inventory changed at C{keys} (C{before}: what each key's resource was,
        as for L{_refresh}): follow it in the table, store and listeners."""
        inventory = self._refresh(keys, before)
        if self.following:
            # The leader places what the inventory wants; this replica serves it when
            # the leader's change comes (L{follow}), but for provisional VIPs.
            if inventory.changed:
                self._recheck(inventory.services_added | inventory.services_removed)
                self._followed(self._provisional(inventory, now), inventory)
            return
        if not inventory.changed and not puts and not deletes and not self._stale:
            return
        try:
            if self._stale:
                delta = self.table.reconcile(self.wanted(), now)
                self._stale = False
            else:
                delta = self.table.change(inventory.services_added, inventory.services_removed, now)
            if delta.anything or puts or deletes or self._reset_table:
                self._commit(puts=puts, deletes=deletes, delta=delta)
        except StoreError:
            # Nothing is served that is not stored: back to the stored state.
            self.recover()
            raise
        self._followed(delta, inventory)

    def update(self, now: float) -> TableDelta:
        """Reconcile the whole table with the inventory, persist, and tell listeners.

        O(table): for start-up (and tests); every change of the inventory goes
        through the incremental path.  A replica that follows only tells listeners.
        """
        if self.following:
            delta = TableDelta()
            if isinstance(self.table, FederatedView):
                delta = self.table.reconcile(self.wanted(), now)  # provisional VIPs only
            self._followed(delta, _NOTHING)
            return delta
        return self._placed(lambda: self.table.reconcile(self.wanted(), now))

    def _placed(self, place: Callable[[], TableDelta]) -> TableDelta:
        """C{place} changes the table: store what it changed, then tell the listeners
        (after a failed write, back to the stored state)."""
        try:
            delta = place()
            self._stale = False
            if delta.anything or self._reset_table:
                self._commit(delta=delta)
        except StoreError:
            self.recover()
            raise
        self._followed(delta, _NOTHING)
        return delta

    def tick(self, now: float) -> None:
        """Periodic work: expire hold-downs, retry a full range (only when due)."""
        if self.following:
            return  # the leader's work
        if self._stale:
            self.update(now)
            return
        if not self.table.due(now):
            return
        try:
            delta = self.table.change((), (), now)
            if delta.anything:
                self._commit(delta=delta)
        except StoreError:
            self.recover()
            raise
        self._followed(delta, _NOTHING)

    def apply_global(
        self, message: TableUpdate, table_id: str, now: float, limit: int | None = None
    ) -> bool:
        """Apply one part of the global's table; True once a whole update is applied.

        The whole update is stored at once; the entries (and DNS) follow the
        services it changed now if they are at most C{limit} (or C{limit} is
        None), else through L{follow_global}, C{limit} at a time.  Raises
        ValueError if the message is a change from a version not held.
        """
        table = self.table
        assert isinstance(table, FederatedView)
        new_table = table_id != self.table_id
        if new_table and not message.full:
            raise ValueError(f"a change for table {table_id}, holding {self.table_id!r}")
        try:
            delta = table.apply(message, now)
            if delta is None:
                return False
            if self._stale:
                held = table.reconcile(self.wanted(), now)
                delta.holds_added += held.holds_added
                delta.holds_dropped += held.holds_dropped
                delta.exhausted = held.exhausted
                self._stale = False
            # A new table replaces every stored row, once it has come whole.  A big
            # one is written on another thread (DNS is answered meanwhile).
            self._commit(delta=delta, table_id=table_id, reset=new_table, background=True)
        except StoreError:
            self.recover()
            raise
        self.table_id = table_id
        # A new table too is followed by the services it changed (the view
        # touched every row that differs): no rebuild of everything at once.
        # More than C{limit} wait for follow_global; fewer are followed now.
        if limit is not None:
            table.defer_touched(limit)
        self._followed(delta, _NOTHING)
        return True

    def follow_global(self, limit: int) -> int:
        """Follow up to C{limit} more services of a table update applied in slices
        (L{apply_global}); how many still wait.  O(C{limit})."""
        table = self.table
        if not isinstance(table, FederatedView) or not table.held_back:
            return 0
        remaining = table.release(limit)
        self._followed(TableDelta(exhausted=sorted(table.exhausted)), _NOTHING)
        return remaining

    # -- replicas --------------------------------------------------------------

    def follow(self, changes: StoreChanges, now: float, limit: int | None = None) -> None:
        """Apply a change another replica stored (L{following}): O(change).

        Its resources are the API's (put or deleted), its table rows and version
        the leader's.  A change that resets the table is applied by L{reload}.
        Synced with a global, the entries (and DNS) follow more than C{limit}
        services of it through L{follow_global}, C{limit} at a time, as the
        leader does (L{apply_global}).
        """
        assert self.following, "only a replica that follows applies another's changes"
        keys: list[ResourceKey] = []
        before: dict[ResourceKey, Resource | None] = {}
        for resource in changes.puts:
            if self.api.get(resource.key) != resource:
                before.setdefault(resource.key, self._source_of(resource.key))
                self.api[resource.key] = resource
                keys.append(resource.key)
        for key in changes.deletes:
            if key in self.api:
                before.setdefault(key, self._source_of(key))
                del self.api[key]
                keys.append(key)
        delta = changes.delta or TableDelta()
        if changes.table_id is not None:
            self.table_id = changes.table_id
        exhausted_before = set(getattr(self.table, "exhausted", ()))
        if delta.anything or changes.table_version is not None:
            version = self.table.version if changes.table_version is None else changes.table_version
            self.table.follow(delta, version, now)
        inventory = self._refresh(keys, before)
        self._recheck_change(delta, inventory, exhausted_before)
        if isinstance(self.table, FederatedView):
            delta = self._provisional(inventory, now)
            if limit is not None:
                self.table.defer_touched(limit)
        self._followed(delta, inventory)

    def _recheck_change(
        self, delta: TableDelta, inventory: _Inventory, exhausted_before: set[ServiceKey]
    ) -> None:
        if self._mismatch is None or not isinstance(self.table, VipAllocator):
            return
        self._recheck([a.key for a in delta.added])
        self._recheck([a.key for a in delta.removed])
        self._recheck(inventory.services_added | inventory.services_removed)
        self._recheck(exhausted_before ^ self.table.exhausted)

    def _provisional(self, inventory: _Inventory, now: float) -> TableDelta:
        """What a follower's table says after its inventory changed: synced with a
        global, its provisional VIPs follow the inventory (the leader's hold-downs
        come with the leader's change); standalone, nothing but the exhausted."""
        table = self.table
        if not isinstance(table, FederatedView):
            return TableDelta(exhausted=sorted(table.exhausted))
        if not (inventory.services_added or inventory.services_removed):
            return TableDelta(exhausted=sorted(table.exhausted))
        return table.change(inventory.services_added, inventory.services_removed, now)

    def reload(
        self,
        state: StoredState,
        following: bool,
        plan: ReloadPlan | None = None,
        limit: int | None = None,
    ) -> None:
        """Everything from C{state} (a replica catching up whole, or stepping down
        with changes it could not store).

        A replica that follows from now, over the same VIP range and table, takes
        only what differs from what it holds: a comparison of the rows and the
        API's resources (O(table), but a lookup each), then the change of what
        differs, as a change from its leader is followed (O(difference): the
        entries, DNS and the listeners see an ordinary change).  Else the whole
        state is built anew (O(table)) and the listeners rebuild.  C{plan}: the
        comparison made already (L{difference}, on another thread); C{limit}: as
        for L{follow}.
        """
        if following:
            difference = plan if plan is not None else self.difference(state)
            if difference is not None:
                self._reload_difference(difference, limit)
                return
        # (Not the property: the table made next takes the flag, and the services
        # to place when leading are counted once it is built, below.)
        self._following = following
        wanted = self._wanted
        self._load_table(state, lambda message: None)
        self._start_inventory(state.resources)
        self._stale = not following
        if following and isinstance(self.table, FederatedView):
            self.table.reconcile(self.wanted(), 0.0)  # provisional VIPs (no hold-downs)
        following_here = following and isinstance(self.table, VipAllocator)
        self._mismatch = self._all_mismatched() if following_here else None
        self._build_entries()
        self._publish(self._rebuilt(wanted))

    def _same_table(self, state: StoredState) -> bool:
        """Whether C{state}'s rows can be compared with this zone's: the same VIP
        range, and standalone the same (local) table; synced with a global, rows of
        the global (a new table of the global's too: its rows are mostly the
        same, as after the global's failover)."""
        if state.vip_range and state.vip_range != self._range_id:
            return False
        if self._reset_table:
            return False
        if self._federated:
            return bool(state.table_id)  # else rows allocated standalone (see _load_table)
        return state.table_id == self.table_id

    def difference(self, state: StoredState) -> ReloadPlan | None:
        """What differs between C{state} and what this zone holds, or None if its
        rows are of another table (another VIP range, or the global's new table).

        O(table) lookups and no change: another thread may make it (a replica's,
        on its store's thread) while nothing changes the zone's rows, hold-downs
        and API resources meanwhile, as while a replica reloads: it follows, and
        applies nothing from its log.
        """
        if not self._same_table(state):
            return None
        stored_api = {r.key: r for r in state.resources}
        api = dict(self.api)
        keys = [key for key, resource in stored_api.items() if api.get(key) != resource]
        keys += [key for key in api if key not in stored_api]
        table = self.table
        current = table.global_rows if isinstance(table, FederatedView) else table.allocations
        stored_rows = {a.key: a for a in state.allocations}
        delta = TableDelta(
            added=[a for a in state.allocations if current.get(a.key) != a],
            removed=[a for key, a in current.items() if stored_rows.get(key) != a],
            holds_added=[h for h in state.holds if table.holds.get(h.offset) != h],
        )
        stored_holds = {h.offset: h for h in state.holds}
        delta.holds_dropped = [h for o, h in table.holds.items() if stored_holds.get(o) != h]
        return ReloadPlan(
            {key: stored_api.get(key) for key in keys},
            delta,
            state.table_version,
            state.table_id,
        )

    def _reload_difference(self, plan: ReloadPlan, limit: int | None) -> None:
        """L{reload} of a follower by the difference (see there): O(difference)."""
        self.following = True
        self._stale = False
        self.table_id = plan.table_id
        before = {key: self._source_of(key) for key in plan.resources}
        for key, resource in plan.resources.items():
            if resource is None:
                self.api.pop(key, None)
            else:
                self.api[key] = resource
        table, delta = self.table, plan.delta
        exhausted_before = set(getattr(table, "exhausted", ()))
        inventory = self._refresh(plan.resources, before)
        if isinstance(table, FederatedView):
            table.follow(delta, plan.table_version, 0.0)
            # The provisional VIPs as from scratch, over the stored rows and hold-downs
            # (those this replica placed as a leader may have leant on some not stored).
            delta = table.reconcile(self.wanted(), 0.0)
            if limit is not None:
                table.defer_touched(limit)  # a big difference: followed in slices
        else:
            delta.exhausted = sorted(table.exhausted)
            table.follow(delta, plan.table_version)
            # A service placed meanwhile (a change this replica missed) is no longer
            # waiting for room; the leader's next change says what is.
            table.exhausted -= table.allocations.keys()
            delta.exhausted = sorted(table.exhausted)
            self._recheck_change(delta, inventory, exhausted_before)
        self._followed(delta, inventory)

    def lead(self, now: float) -> None:
        """This replica leads from now: it places what the inventory wants that the
        last leader left unplaced, expires hold-downs, and writes.

        Standalone, that is the services L{_mismatch} kept while following
        (O(those)); else the whole table is reconciled (O(table), once).
        """
        mismatch, self._mismatch = self._mismatch, None
        self.following = False
        if mismatch is None or not isinstance(self.table, VipAllocator):
            self._stale = True
            self.update(now)
            return
        # (Kept since following began, from scratch if the table was not reconciled
        # then: nothing else is stale.)
        table, wanted = self.table, self._wanted
        self._placed(
            lambda: table.change(
                [k for k in mismatch if k in wanted], [k for k in mismatch if k not in wanted], now
            )
        )

    def _commit(
        self,
        puts: Iterable[Resource] = (),
        deletes: Iterable[ResourceKey] = (),
        delta: TableDelta | None = None,
        table_id: str | None = None,
        reset: bool = False,
        background: bool = False,
    ) -> None:
        reset = reset or self._reset_table
        if reset and isinstance(self.table, FederatedView):
            # A new table replaces every stored row (and the zone's hold-downs stay).
            # A change that added as many rows as the table holds added all of them
            # (a fresh zone's first table: no second list of 100,000 rows; the list
            # is the change's own, so neither may be changed in place from here).
            table_rows = self.table.global_rows
            delta = TableDelta(
                added=(
                    delta.added
                    if delta is not None and len(delta.added) == len(table_rows)
                    else list(table_rows.values())
                ),
                holds_added=list(self.table.holds.values()),
            )
        changes = StoreChanges(
            puts=tuple(puts),
            deletes=tuple(deletes),
            delta=delta,
            table_version=self.table.version,
            vip_range=self._range_id,
            reset_table=reset,
            table_id=table_id if table_id is not None else self.table_id,
        )
        rows = 0 if delta is None else len(delta.added) + len(delta.removed)
        if self.write_in_background is not None:
            # A big table update from the global goes to the store's thread; any
            # other write too while one is on its way there (else it is made now):
            # the reactor never waits for a big write.
            self.write_in_background(changes, background and rows >= BACKGROUND_ROWS)
        else:
            self.store.commit(changes)
        self._reset_table = False

    # -- entries and listeners -------------------------------------------------

    def _touched(self, delta: TableDelta) -> Collection[ServiceKey]:
        """The services whose row the last change of the table may have changed."""
        if isinstance(self.table, FederatedView):
            return self.table.take_touched()
        return {a.key for a in delta.added} | {a.key for a in delta.removed}

    def _followed(self, delta: TableDelta, inventory: _Inventory, full: bool = False) -> None:
        """The table changed by C{delta}: entries follow, then the listeners are told."""
        before = self.snapshot
        exhausted = tuple(delta.exhausted)
        newly = set(exhausted) - set(before.exhausted)
        if newly:
            self._warn(
                f"VIP range {self.config.cidr} is exhausted: {len(exhausted)} "
                f"service(s) without a VIP, e.g. {min(newly)}"
            )
        self._exhausted = exhausted
        touched = self._touched(delta)
        removed: list[VipEntry] = []
        added: list[VipEntry] = []
        if full:
            self._build_entries()
        else:
            self._update_entries(touched, removed, added)
        for key in inventory.services_added:
            entry = self._entries.get(key)
            if entry is not None:
                self._warn_problems(entry)
        snapshot = self._make_snapshot()
        if not (
            full
            or removed
            or added
            or inventory.addresses
            or inventory.services_added
            or inventory.services_removed
            or inventory.meshes_changed
            or snapshot.version != before.version
            or snapshot.exhausted != before.exhausted
        ):
            return
        self._publish(
            ZoneChange(
                snapshot,
                removed=tuple(removed),
                added=tuple(added),
                addresses=inventory.addresses,
                services_added=inventory.services_added,
                services_removed=inventory.services_removed,
                full=full,
            )
        )

    def _publish(self, change: ZoneChange) -> None:
        self.snapshot = change.snapshot
        publish(self.listeners, change, self._warn)

    def _make_snapshot(self) -> ZoneSnapshot:
        """The view the DNS server and the API serve: the live structures, O(1)."""
        return ZoneSnapshot(
            version=self.table.version,
            entries=self._entries,
            mesh_of_address=self._mesh_of_address,
            exhausted=self._exhausted,
            range_size=self.table.range.size,
            range_used=len(self._entries),
            meshes=self._meshes,
            zone=self.name,
        )

    def _build_entries(self, previous: SortedIndex[ServiceKey, VipEntry] | None = None) -> None:
        """Every entry and name from the table, from scratch (start-up, recovery).

        An entry of C{previous} that is still the same is kept (the same object);
        without C{previous}, the problems of every entry are warned of.
        """
        self._exhausted = tuple(sorted(self.table.exhausted))
        self._names = NameIndex(self._names_of, self._claim)
        served = list(self.table.served())
        # One pass for every name (the claims), then each entry with what it owns;
        # each service's names worked out once (not through the small cache).
        domain = self.config.domain
        assignments = self._names.fill(
            [(row[0][0], row[0][1], row.claim) for row in served],
            lambda service: service_names(service, domain),
        )
        entries = []
        entry_of = self._entry
        if previous:
            for row, assignment in zip(served, assignments, strict=True):
                entries.append((row[0], entry_of(row, previous.get(row[0]), assignment)))
        else:
            for row, assignment in zip(served, assignments, strict=True):
                entries.append((row[0], entry_of(row, None, assignment)))
        if previous is None:
            for _key, entry in entries:
                if entry.problems:
                    self._warn_problems(entry)
        self._entries: SortedIndex[ServiceKey, VipEntry] = SortedIndex(entries)

    def _claim(self, mesh: str, service: str) -> int:
        """A service's claim to its names, as the table holds it (the name index's)."""
        row = self.table.row(_new_tuple(ServiceKey, (mesh, service)))
        return PROVISIONAL_CLAIM if row is None else row.claim

    def _rebuild_entries(self, removed: list[VipEntry], added: list[VipEntry]) -> None:
        """L{_update_entries} for a change of much of the table (a first load): every
        entry built anew in one pass, those unchanged kept, the difference told."""
        before, exhausted = self._entries, self._exhausted
        self._build_entries(before)
        self._exhausted = exhausted
        after = self._entries
        if not before:
            added.extend(after)
        else:
            for key, entry in zip(before.keys(), before, strict=True):
                if after.get(key) is not entry:
                    removed.append(entry)
            for key, entry in zip(after.keys(), after, strict=True):
                if before.get(key) is not entry:
                    added.append(entry)
        for entry in added:
            if entry.problems:
                self._warn_problems(entry)

    def _update_entries(
        self, keys: Collection[ServiceKey], removed: list[VipEntry], added: list[VipEntry]
    ) -> None:
        """The entries of C{keys} (and of services their names moved to) built again."""
        if (
            len(keys) > self.rebuild_at
            and len(keys) * 4 > len(self._entries)
            and isinstance(self.table, VipAllocator)
        ):
            # (A federated zone follows a big table in slices: see apply_global.)
            self._rebuild_entries(removed, added)
            return
        table, names = self.table, self._names
        rows: dict[ServiceKey, Served | None] = {}
        claimants: set[tuple[str, str]] = set()
        #: What a new service whose names are no one's gets (the usual case).
        alone: dict[ServiceKey, Assignment] = {}
        claim_new, row_of, names_of = names.claim_new, table.row, self._names_uncached
        for key in keys:
            row = rows[key] = row_of(key)
            if row is None:
                claimants |= names.remove(key.mesh, key.service)
                continue
            assignment = claim_new(key.mesh, key.service, row.claim, names_of)
            if assignment is None:
                claimants |= names.put(key.mesh, key.service, row.claim)
            else:
                alone[key] = assignment
        for mesh, service in claimants:
            key = ServiceKey(mesh, service)
            alone.pop(key, None)  # a name of it came to another since
            if key not in rows:
                rows[key] = row_of(key)
        changes: list[tuple[ServiceKey, VipEntry | None]] = []
        entries = self._entries
        entry_of = self._entry
        for key, row in rows.items():
            old = entries.get(key)
            new = None if row is None else entry_of(row, old, alone.get(key))
            if new is old:
                continue
            if old is not None:
                removed.append(old)
            if new is not None:
                added.append(new)
                self._warn_problems(new)
            changes.append((row.key if row is not None else key, new))
        entries.update(changes)

    def _warn_problems(self, entry: VipEntry) -> None:
        if entry.problems and entry.key in self._wanted:
            # Only this zone's own services: another zone's bad names are its to report.
            for problem in entry.problems:
                self._warn_once(f"service {entry.key}: {problem}")

    def _entry(
        self, row: Served, old: VipEntry | None = None, assignment: Assignment | None = None
    ) -> VipEntry:
        """The entry of C{row}: C{old} itself if nothing about it changed.

        C{assignment}: what the row's service owns, when the caller has it already.
        """
        if assignment is None:
            assignment = self._names.assigned(row.key.mesh, row.key.service)
        owned, problems = assignment
        zones = row.zones or self._zones
        vip_range = self.table.range
        if old is not None and (
            old._range,
            old.offset,
            old.names,
            old.problems,
            old.provisional,
            old.zones,
        ) == (vip_range, row.offset, owned, problems, row.provisional, zones):
            return old
        return _new_entry(row.key, vip_range, row.offset, owned, problems, row.provisional, zones)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            if len(self._warned) >= _WARNED_KEPT:
                self._warned.clear()  # bounded memory; a warning may come again
            self._warned.add(message)
            self._warn(message)


_K = TypeVar("_K")
_V = TypeVar("_V")


class _ReadThrough(Mapping[_K, _V]):
    """A mapping read through other structures (no map of its own): its C{get} says
    what a key gives, None for none."""

    __slots__ = ()

    def get(self, key: Any, default: Any = None) -> Any:
        raise NotImplementedError

    def __getitem__(self, key: _K) -> _V:
        found: _V | None = self.get(key)
        if found is None:
            raise KeyError(key)
        return found

    def __contains__(self, key: object) -> bool:
        try:
            return self.get(key) is not None
        except (TypeError, IndexError):  # (not a key of this kind)
            return False


def _nothing(key: object) -> None:
    return None


class _Sources(_ReadThrough[ResourceKey, Resource]):
    """The resources of one listing: its keys, each read from the zone's sources
    (the listing's mapping, for L{SortedIndex}'s reading; see L{_Listing})."""

    __slots__ = ("_keys", "_read", "_where")

    def __init__(
        self,
        where: tuple[str, str],
        read: Callable[[ResourceKey], Resource | None],
        keys: list[ResourceKey],
    ) -> None:
        self._where, self._read, self._keys = where, read, keys

    def get(self, key: ResourceKey, default: Any = None) -> Any:
        if (key[0], key[1]) != self._where:
            return default
        found = self._read(key)
        return default if found is None else found

    def __iter__(self) -> Iterator[ResourceKey]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class _Listing(SortedIndex[ResourceKey, Resource]):
    """The resources of one type in one mesh, sorted by key: the keys, over the
    zone's sources (each resource is read from the file or the API that defines
    it, not kept here beside them: a map of half a million Dataplanes less).
    Changed by L{move} only, told which keys came and went."""

    def __init__(
        self, where: tuple[str, str], read: Callable[[ResourceKey], Resource | None]
    ) -> None:
        self._keys = []  # (changed in place only: its mapping reads it too)
        self._values = _Sources(where, read, self._keys)  # type: ignore[assignment]

    def move(self, came: Collection[ResourceKey], went: Collection[ResourceKey]) -> None:
        """Keys C{came} and C{went} (a key already here, or not here, is left so)."""
        keys = self._keys
        if went:
            if len(went) <= _MOVED_ONE_BY_ONE or len(went) * 32 < len(keys):
                for key in went:
                    at = bisect.bisect_left(keys, key)
                    if at < len(keys) and keys[at] == key:
                        del keys[at]
            else:
                gone = set(went)
                keys[:] = [key for key in keys if key not in gone]
        if not came:
            return
        ordered = sorted(came)  # (each once: L{_refresh} takes each key once)
        if not keys or keys[-1] < ordered[0]:
            keys.extend(ordered)  # (a first load, names in order: no search)
        elif len(ordered) <= _MOVED_ONE_BY_ONE or len(ordered) * 32 < len(keys):
            for key in ordered:
                at = bisect.bisect_left(keys, key)
                if at == len(keys) or keys[at] != key:
                    keys.insert(at, key)
        else:
            keys[:] = sorted(set(keys).union(ordered))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SortedIndex):
            return self._keys == list(other.keys()) and list(self) == list(other)
        return super().__eq__(other)

    def set(self, key: ResourceKey, value: Resource) -> None:
        raise TypeError("a listing reads the zone's sources: move its keys")

    def pop(self, key: ResourceKey) -> Resource | None:
        raise TypeError("a listing reads the zone's sources: move its keys")

    def update(self, changed: Iterable[tuple[ResourceKey, Resource | None]]) -> None:
        raise TypeError("a listing reads the zone's sources: move its keys")


#: Keys a listing inserts or removes one by one (a memmove each) before it sorts anew.
_MOVED_ONE_BY_ONE = 64


class _Merged(_ReadThrough[ResourceKey, Resource]):
    """The merged inventory, read through its listings by (type, mesh) (a few) rather
    than kept in a map of its own beside them."""

    __slots__ = ("_listings",)

    def __init__(self, listings: Mapping[tuple[str, str], _Listing]):
        self._listings = listings

    def get(self, key: ResourceKey, default: Any = None) -> Any:
        listing = self._listings.get((key[0], key[1]))
        found = listing.get(key) if listing is not None else None
        return default if found is None else found

    def __iter__(self) -> Iterator[ResourceKey]:
        for listing in list(self._listings.values()):
            yield from listing.keys()

    def __len__(self) -> int:
        return sum(len(listing) for listing in self._listings.values())


class _MeshOfAddress(_ReadThrough[str, str]):
    """Each Dataplane address's one mesh, read from the zone's count of its uses
    (L{_add_use}) rather than kept beside it: an address of Dataplanes in several
    meshes has none (its clients get the default mesh)."""

    __slots__ = ("_uses",)

    def __init__(self, uses: Mapping[str, str | tuple[str, int] | dict[str, int]]) -> None:
        self._uses = uses

    def get(self, address: str, default: Any = None) -> Any:
        uses = self._uses.get(address)
        if uses.__class__ is str:
            return uses
        if uses.__class__ is tuple:
            return cast("tuple[str, int]", uses)[0]
        return default

    def __iter__(self) -> Iterator[str]:
        return (address for address, uses in self._uses.items() if not isinstance(uses, dict))

    def __len__(self) -> int:
        """O(addresses): for tests and tools, not the serving path."""
        return sum(1 for _ in self)


def _add_use(
    uses: dict[str, str | tuple[str, int] | dict[str, int]], address: str, mesh: str, sign: int
) -> None:
    """Count one Dataplane of C{mesh} at C{address} in (1) or out (-1).

    One Dataplane (the usual case) is its mesh; one mesh, a (mesh, count) pair;
    several, a dict.
    """
    current = uses.get(address)
    if current is None:
        uses[address] = mesh
        return
    if isinstance(current, str):
        counts = {current: 1}
    elif isinstance(current, tuple):
        counts = {current[0]: current[1]}
    else:
        counts = current
    count = counts.get(mesh, 0) + sign
    if count:
        counts[mesh] = count
    else:
        counts.pop(mesh, None)
    if not counts:
        del uses[address]
    elif len(counts) == 1:
        ((only, n),) = counts.items()
        uses[address] = only if n == 1 else (only, n)
    else:
        uses[address] = counts
