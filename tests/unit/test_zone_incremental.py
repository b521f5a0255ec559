"""A zone kept incrementally equals one built from scratch, after any changes.

A zone follows every change at a cost of what changed; these tests replay
random sequences of changes (the API, files, meshes, the global's table, store
failures, time passing hold-downs) and check after each one that the zone holds
what a zone started afresh over the same store and files holds, and that the
changes it told its listeners rebuild its entries exactly.
"""

from __future__ import annotations

import sqlite3
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kumazone.core.config import DnsServerConfig
from kumazone.core.messages import Row, table_messages
from kumazone.core.resources import DATAPLANE, Resource, ResourceKey, parse_resource
from kumazone.core.storage import StoreChanges, StoredState, StoreError
from kumazone.core.vips import ServiceKey
from kumazone.core.zone import ConflictError, VipEntry, Zone, ZoneChange
from kumazone.store.sqlite import SQLiteStore
from tests.builders import dataplane_resource, external_service

#: 14 VIPs for up to 16 services: collisions, hold-downs and a full range all happen.
SMALL = DnsServerConfig(cidr=IPv4Network("10.0.0.0/28"), cidr6=IPv6Network("fd00::/124"))
HOLD_DOWN = SMALL.hold_down
NAMES = [f"dp-{i}" for i in range(6)]
MESHES = ["default", "m2"]
SERVICES = ["a", "b", "c", "A", "a_b", "a.b", "d", "e"]
ADDRESSES = [None, "192.0.2.1", "192.0.2.2", "2001:db8::1"]
PATHS = ["/r/a.yaml", "/r/b.yaml", "/r/c.yaml"]


class FlakyStore:
    """The SQLite store, whose next write can be made to fail (a full disk, a lock)."""

    def __init__(self, path: str) -> None:
        self.real = SQLiteStore(path)
        self.fail_next = False

    def load(self) -> StoredState:
        return self.real.load()

    def commit(self, changes: StoreChanges) -> None:
        if self.fail_next:
            self.fail_next = False
            raise StoreError("the disk is full")
        self.real.commit(changes)

    def close(self) -> None:
        self.real.close()


def copy_of(path: str, to: str) -> str:
    source, target = sqlite3.connect(path), sqlite3.connect(to)
    source.backup(target)
    source.close()
    target.close()
    return to


dataplanes = st.builds(
    lambda name, mesh, services, address: dataplane_resource(
        name, *services, mesh=mesh, address=address or "host.internal"
    ),
    st.sampled_from(NAMES),
    st.sampled_from(MESHES),
    st.lists(st.sampled_from(SERVICES), min_size=1, max_size=3, unique=True),
    st.sampled_from(ADDRESSES),
)
others = st.one_of(
    st.builds(
        lambda name, mesh, service: parse_resource(external_service(name, service, mesh)),
        st.sampled_from(NAMES),
        st.sampled_from(MESHES),
        st.sampled_from(SERVICES),
    ),
    st.builds(
        lambda name: parse_resource({"type": "Mesh", "name": name}), st.sampled_from(["m3", "m2"])
    ),
)
resources = st.one_of(dataplanes, dataplanes, others)
service_keys = st.builds(ServiceKey, st.sampled_from(MESHES), st.sampled_from(SERVICES))

local_ops = st.one_of(
    st.tuples(st.just("put"), resources),
    st.tuples(st.just("put"), resources),
    st.tuples(st.just("delete"), st.sampled_from(NAMES), st.sampled_from(MESHES)),
    st.tuples(st.just("reput")),
    st.tuples(st.just("file"), st.sampled_from(PATHS), st.lists(resources, max_size=4)),
    st.tuples(st.just("file"), st.sampled_from(PATHS), st.just([])),
    st.tuples(st.just("reread")),
    st.tuples(st.just("wait"), st.sampled_from([1.0, HOLD_DOWN / 2, HOLD_DOWN + 1])),
    st.tuples(st.just("fail")),
)
global_ops = st.one_of(
    st.tuples(st.just("g-add"), service_keys, st.integers(0, 13)),
    st.tuples(st.just("g-remove"), service_keys),
    st.tuples(st.just("g-confirm")),
    st.tuples(st.just("g-full")),
)


class Run:
    """One zone under test, the global's model and what the listeners were told."""

    def __init__(self, tmp: Path, federated: bool) -> None:
        self.tmp = tmp
        self.federated = federated
        self.path = str(tmp / "zone.sqlite")
        self.store = FlakyStore(self.path)
        self.zone = Zone("zone-1", SMALL, self.store, federated=federated)
        self.now = 0.0
        self.files: dict[str, list[Resource]] = {}
        self.calls = 0
        self.replayed = {e.key: e for e in self.zone.snapshot.entries}
        self.addresses = dict(self.zone.snapshot.mesh_of_address)
        self.wanted = set(self.zone.wanted())
        self.zone.listeners.append(self.told)
        #: The global's rows: key -> (offset, claim), and its version.
        self.rows: dict[ServiceKey, tuple[int, int]] = {}
        self.global_version = 0
        self.sent_version = -1
        self.copies = 0

    def told(self, change: ZoneChange) -> None:
        self.calls += 1
        snapshot = change.snapshot
        if change.full:
            self.replayed = {e.key: e for e in snapshot.entries}
            self.addresses = dict(snapshot.mesh_of_address)
            self.wanted = set(self.zone.wanted())
            return
        for entry in change.removed:
            del self.replayed[entry.key]
        for entry in change.added:
            assert entry.key not in self.replayed
            self.replayed[entry.key] = entry
        for address in change.addresses:
            mesh = snapshot.mesh_of_address.get(address)
            if mesh is None:
                self.addresses.pop(address, None)
            else:
                self.addresses[address] = mesh
        assert not change.services_added & change.services_removed
        self.wanted |= change.services_added
        self.wanted -= change.services_removed

    # -- doing -------------------------------------------------------------------

    def do(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        zone, now = self.zone, self.now
        try:
            if kind == "put":
                try:
                    zone.put(op[1], now)
                except ConflictError:
                    pass  # a file defines it
            elif kind == "delete":
                try:
                    zone.delete(ResourceKey(DATAPLANE, op[2], op[1]), now)
                except ConflictError:
                    pass
            elif kind == "reput":
                self.reput()
            elif kind == "file":
                self.files[op[1]] = list(op[2])
                if not op[2]:
                    del self.files[op[1]]
                zone.set_file(op[1], op[2], now)
            elif kind == "reread":
                self.reread()
            elif kind == "wait":
                self.now += op[1]
            elif kind == "fail":
                self.store.fail_next = True
            else:
                self.global_op(op)
            zone.tick(self.now)  # as the service does, every second
        except StoreError:
            assert not self.store.fail_next

    def reput(self) -> None:
        """The same resources again: nothing changes, nobody is told."""
        zone = self.zone
        before = (self.calls, zone.snapshot, zone.table.version)
        mine = [r for r in zone.api.values() if zone.owner_of(r.key) == "api"]
        for resource in mine[:3]:
            assert zone.put(resource, self.now) is False
        assert (self.calls, zone.snapshot, zone.table.version) == before

    def reread(self) -> None:
        """Every file read again with equal content (new objects): nothing changes."""
        zone = self.zone
        before = (self.calls, zone.snapshot, zone.table.version)
        again = {
            path: [parse_resource(r.document) for r in resources]
            for path, resources in self.files.items()
        }
        zone.set_files(again, self.now)
        assert (self.calls, zone.snapshot, zone.table.version) == before

    def global_op(self, op: tuple[Any, ...]) -> None:
        if not self.federated:
            return
        taken = {offset: key for key, (offset, _claim) in self.rows.items()}
        if op[0] == "g-add":
            _kind, key, offset = op
            if offset in taken or key in self.rows:
                return
            self.rows[key] = (offset, self.global_version + 1)
        elif op[0] == "g-remove":
            if self.rows.pop(op[1], None) is None:
                return
        elif op[0] == "g-confirm":
            # The global allocates the zone's provisional VIPs where the zone has them.
            table = self.zone.table
            confirmed = False
            for key, offset in sorted(getattr(table, "provisional", {}).items()):
                if offset not in taken and key not in self.rows:
                    self.rows[key] = (offset, self.global_version + 1)
                    taken[offset] = key
                    confirmed = True
            if not confirmed:
                return
        else:
            self.sent_version = -1  # a reconnection: the whole table
        before = dict(self.sent_rows) if self.sent_version >= 0 else None
        self.global_version += 1 if op[0] != "g-full" else 0
        self.send(before)

    sent_rows: dict[ServiceKey, tuple[int, int]] = {}

    def send(self, before: dict[ServiceKey, tuple[int, int]] | None) -> None:
        version = self.global_version
        rows = [
            Row(k.mesh, k.service, offset, ("zone-2",), claim)
            for k, (offset, claim) in sorted(self.rows.items())
        ]
        if before is None:
            messages = table_messages(version, 0, True, rows, size=3)
        else:
            upsert = [
                r for r in rows if before.get(ServiceKey(r.mesh, r.service)) != (r.offset, r.claim)
            ]
            remove = [(k.mesh, k.service) for k in sorted(before) if k not in self.rows]
            messages = table_messages(version, self.sent_version, False, upsert, remove, size=2)
        for message in messages:
            self.zone.apply_global(message, "t-1", self.now)
        self.sent_version = version
        self.sent_rows = dict(self.rows)

    # -- checking ------------------------------------------------------------------

    def check(self) -> None:
        zone = self.zone
        snapshot = zone.snapshot
        entries = list(snapshot.entries)
        assert [e.key for e in entries] == sorted(e.key for e in entries)
        assert self.replayed == {e.key: e for e in entries}
        assert self.addresses == dict(snapshot.mesh_of_address)
        assert self.wanted == set(zone.wanted())
        assert len(snapshot.entries) == snapshot.range_used
        if zone._stale:
            return  # the table catches up with the files at the next change or tick
        self.copies += 1
        fresh_path = copy_of(self.path, str(self.tmp / f"fresh-{self.copies}.sqlite"))
        fresh = Zone("zone-1", SMALL, SQLiteStore(fresh_path), federated=self.federated)
        try:
            fresh.set_files(self.files, self.now)
            fresh.update(self.now)
            assert fresh.snapshot.version == snapshot.version
            assert list(fresh.snapshot.entries) == entries
            assert dict(fresh.snapshot.mesh_of_address) == dict(snapshot.mesh_of_address)
            assert fresh.snapshot.meshes == snapshot.meshes
            assert fresh.snapshot.exhausted == snapshot.exhausted
            assert set(fresh.wanted()) == set(zone.wanted())
            assert dict(fresh.resources()) == dict(zone.resources())
            for key in zone.resources():
                assert fresh.owner_of(key) == zone.owner_of(key)
                listing = zone.listing(key.type, key.mesh)
                assert listing.get(key) == zone.resources()[key]
            assert sum(
                len(zone.listing(t, m)) for t, m in {(k.type, k.mesh) for k in zone.resources()}
            ) == len(zone.resources())
        finally:
            fresh.store.close()


def run(tmp: Path, federated: bool, ops: list[tuple[Any, ...]]) -> None:
    state = Run(tmp, federated)
    try:
        for op in ops:
            state.do(op)
            state.check()
    finally:
        state.store.close()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(local_ops, max_size=20))
def test_a_standalone_zone_equals_one_built_from_scratch(tmp_path_factory, ops) -> None:
    run(tmp_path_factory.mktemp("standalone"), False, ops)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(st.one_of(local_ops, global_ops, global_ops), max_size=20))
def test_a_federated_zone_equals_one_built_from_scratch(tmp_path_factory, ops) -> None:
    run(tmp_path_factory.mktemp("federated"), True, [("g-full",), *ops])


# -- changes that change nothing ------------------------------------------------------


def test_an_identical_put_touches_nothing(tmp_path: Path) -> None:
    zone = Zone("zone-1", DnsServerConfig(), SQLiteStore(str(tmp_path / "z.sqlite")))
    zone.put(dataplane_resource("web-1", "web", address="192.0.2.1"), 0.0)
    changes: list[ZoneChange] = []
    zone.listeners.append(changes.append)
    snapshot, stored = zone.snapshot, zone.store.load()
    assert zone.put(dataplane_resource("web-1", "web", address="192.0.2.1"), 1.0) is False
    assert changes == []
    assert zone.snapshot is snapshot and zone.snapshot.version == 1
    assert zone.store.load() == stored


def test_a_file_read_again_with_the_same_resources_touches_nothing(tmp_path: Path) -> None:
    zone = Zone("zone-1", DnsServerConfig(), SQLiteStore(str(tmp_path / "z.sqlite")))
    zone.set_file("/r/a.yaml", [dataplane_resource("web-1", "web")], 0.0)
    changes: list[ZoneChange] = []
    zone.listeners.append(changes.append)
    snapshot = zone.snapshot
    zone.set_file("/r/a.yaml", [dataplane_resource("web-1", "web")], 1.0)
    assert changes == [] and zone.snapshot is snapshot


def test_a_change_tells_the_listeners_exactly_what_changed(tmp_path: Path) -> None:
    zone = Zone("zone-1", DnsServerConfig(), SQLiteStore(str(tmp_path / "z.sqlite")))
    zone.put(dataplane_resource("web-1", "web", "api", address="192.0.2.1"), 0.0)
    changes: list[ZoneChange] = []
    zone.listeners.append(changes.append)
    zone.put(dataplane_resource("web-1", "web", "db", address="192.0.2.1", mesh="default"), 1.0)
    (change,) = changes
    assert not change.full
    assert {e.key.service for e in change.removed} == {"api"}
    assert {e.key.service for e in change.added} == {"db"}
    assert change.services_added == {ServiceKey("default", "db")}
    assert change.services_removed == {ServiceKey("default", "api")}
    assert change.addresses == frozenset()
    zone.put(dataplane_resource("web-1", "web", "db", address="192.0.2.9"), 2.0)
    assert changes[-1].addresses == {"192.0.2.1", "192.0.2.9"}
    assert changes[-1].added == changes[-1].removed == ()


def test_a_failed_write_tells_listeners_to_rebuild(tmp_path: Path) -> None:
    store = FlakyStore(str(tmp_path / "z.sqlite"))
    zone = Zone("zone-1", DnsServerConfig(), store)
    zone.put(dataplane_resource("web-1", "web"), 0.0)
    changes: list[ZoneChange] = []
    zone.listeners.append(changes.append)
    store.fail_next = True
    try:
        zone.put(dataplane_resource("db-1", "db"), 1.0)
    except StoreError:
        pass
    assert changes[-1].full
    assert [e.key.service for e in zone.snapshot.entries] == ["web"]
    assert set(zone.api) == {ResourceKey(DATAPLANE, "default", "web-1")}


def test_entries_are_value_objects(tmp_path: Path) -> None:
    # Listeners key their own state by entry (the authority keeps built records per entry).
    zone = Zone("zone-1", DnsServerConfig(), SQLiteStore(str(tmp_path / "z.sqlite")))
    zone.put(dataplane_resource("web-1", "web"), 0.0)
    (entry,) = zone.snapshot.entries
    fields = (entry.key, entry.vip, entry.vip6, entry.names, entry.problems)
    again = VipEntry(*fields, entry.provisional, entry.zones, entry.offset)
    assert isinstance(entry, VipEntry) and entry == again and hash(entry) == hash(again)


def test_a_name_taken_by_an_earlier_claim_in_the_same_update_moves_at_once() -> None:
    """One table update, its rows in key order: a.b first takes a.b.mesh (its names are
    no one's yet), then a_b, which claimed it earlier, takes it over."""
    zone = Zone("zone-1", SMALL, SQLiteStore(":memory:"), federated=True)
    rows = [Row("default", "a.b", 3, ("zone-2",), 5), Row("default", "a_b", 4, ("zone-2",), 2)]
    for message in table_messages(1, 0, True, rows):
        zone.apply_global(message, "t-1", 1.0)
    owned = {entry.key.service: entry.names for entry in zone.snapshot.entries}
    assert owned == {"a_b": ("a_b.mesh", "a.b.mesh"), "a.b": ()}
    (problem,) = zone.snapshot.entries.get(ServiceKey("default", "a.b")).problems
    assert "service a_b's name" in problem


def test_a_listing_gives_what_the_sources_define_now(tmp_path: Path) -> None:
    # A listing holds the keys only, and reads each resource from the file (the
    # first path of those defining it) or the API that defines it.
    zone = Zone("zone-1", DnsServerConfig(), SQLiteStore(str(tmp_path / "z.sqlite")))
    key = ResourceKey(DATAPLANE, "default", "web-1")
    in_a, in_b = dataplane_resource("web-1", "web"), dataplane_resource("web-1", "web", "api")
    zone.set_files({"/r/b.yaml": [in_b], "/r/a.yaml": [in_a]}, 0.0)
    listing = zone.listing(DATAPLANE, "default")
    assert list(listing) == [in_a] and listing.get(key) is in_a and key in listing
    zone.set_file("/r/a.yaml", [], 1.0)  # the waiting copy takes over
    assert list(zone.listing(DATAPLANE, "default")) == [in_b]
    assert set(zone.wanted()) == {ServiceKey("default", "web"), ServiceKey("default", "api")}
    others = [dataplane_resource(f"db-{i}", "db") for i in range(100)]
    for resource in others:
        zone.put(resource, 2.0)
    listing = zone.listing(DATAPLANE, "default")
    assert list(listing.keys()) == sorted([key, *(r.key for r in others)])
    assert listing[0:2] == [others[0], others[1]] and listing[-1] is in_b
    zone.set_file("/r/b.yaml", [], 3.0)
    for resource in others[:50]:
        zone.delete(resource.key, 4.0)
    assert list(zone.listing(DATAPLANE, "default")) == sorted(others[50:], key=lambda r: r.key)
    assert listing.get(key) is None and key not in listing
    assert set(zone.wanted()) == {ServiceKey("default", "db")}


def test_a_key_told_twice_in_one_change_is_counted_once(tmp_path: Path) -> None:
    # A replica's change may name one key more than once (put, then put again).
    zone = Zone("zone-1", DnsServerConfig(), SQLiteStore(str(tmp_path / "z.sqlite")))
    web = dataplane_resource("web-1", "web")
    zone.put(web, 0.0)
    before = {web.key: web}
    inventory = zone._refresh([web.key, web.key], before)
    assert not inventory.changed
    zone.api[web.key] = dataplane_resource("web-1", "api")
    inventory = zone._refresh([web.key, web.key], before)
    assert set(zone.wanted()) == {ServiceKey("default", "api")}
    assert list(zone.listing(DATAPLANE, "default")) == [zone.api[web.key]]
