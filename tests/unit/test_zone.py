"""Tests for kumazone.core.zone: the inventory and the VIP table, kept with the store."""

from __future__ import annotations

import sqlite3
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest

from kumazone.core.config import DnsServerConfig
from kumazone.core.resources import (
    DATAPLANE,
    EXTERNAL_SERVICE,
    Resource,
    ResourceKey,
    parse_resource,
)
from kumazone.core.storage import StoreError
from kumazone.core.vips import ServiceKey, VipAllocator
from kumazone.core.zone import ConflictError, VipEntry, Zone, ZoneChange, ZoneSnapshot
from kumazone.store.sqlite import SQLiteStore
from tests.builders import dataplane_resource, external_service

TINY = DnsServerConfig(cidr=IPv4Network("10.0.0.0/29"), cidr6=IPv6Network("fd00::/125"))


def mesh(name: str) -> Resource:
    return parse_resource({"type": "Mesh", "name": name})


class Recorder:
    """Collects warnings and snapshots."""

    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.snapshots: list[ZoneSnapshot] = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def snapshot(self, change: ZoneChange) -> None:
        self.snapshots.append(change.snapshot)


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "zone-1" / "kumazone.sqlite")


DEFAULT = DnsServerConfig()


def open_zone(
    db_path: str, config: DnsServerConfig = DEFAULT, recorder: Recorder | None = None
) -> Zone:
    recorder = recorder or Recorder()
    return Zone("zone-1", config, SQLiteStore(db_path), recorder.warn)


def entries(zone: Zone) -> dict[ServiceKey, VipEntry]:
    return {entry.key: entry for entry in zone.snapshot.entries}


def vips(zone: Zone) -> dict[ServiceKey, tuple[str, str]]:
    return {entry.key: (entry.vip, entry.vip6) for entry in zone.snapshot.entries}


def key(service: str, mesh: str = "default") -> ServiceKey:
    return ServiceKey(mesh, service)


# -- merging sources ------------------------------------------------------------------


def test_empty_zone(db_path: str) -> None:
    zone = open_zone(db_path)
    assert zone.snapshot.entries == ()
    assert zone.snapshot.zone == "zone-1"
    assert zone.snapshot.meshes == ("default",)
    assert zone.snapshot.range_size == 2**28 - 2


def test_file_and_api_resources_merge(db_path: str) -> None:
    zone = open_zone(db_path)
    zone.set_file(
        "/r/a.yaml",
        [dataplane_resource("redis-1", "redis"), parse_resource(external_service("httpbin"))],
        now=0.0,
    )
    assert zone.put(dataplane_resource("web-1", "web", address="192.0.2.11"), now=1.0) is True
    assert set(entries(zone)) == {key("redis"), key("web")}
    assert set(zone.resources()) == {
        ResourceKey(DATAPLANE, "default", "redis-1"),
        ResourceKey(EXTERNAL_SERVICE, "default", "httpbin"),
        ResourceKey(DATAPLANE, "default", "web-1"),
    }
    assert zone.owner_of(ResourceKey(DATAPLANE, "default", "redis-1")) == "/r/a.yaml"
    assert zone.owner_of(ResourceKey(DATAPLANE, "default", "web-1")) == "api"
    assert zone.owner_of(ResourceKey(DATAPLANE, "default", "nope")) is None


def test_entries_carry_vips_and_names(db_path: str) -> None:
    zone = open_zone(db_path)
    zone.put(dataplane_resource("echo-1", "echo-server_echo-example_svc_1010"), now=0.0)
    (entry,) = zone.snapshot.entries
    assert entry.names == (
        "echo-server_echo-example_svc_1010.mesh",
        "echo-server.echo-example.svc.1010.mesh",
    )
    assert IPv4Address(entry.vip) in IPv4Network("240.0.0.0/4")
    assert IPv6Address(entry.vip6) in IPv6Network("fd00:fd00::/64")
    vip_range = zone.table.range
    offset = vip_range.offset_of(IPv4Address(entry.vip))
    assert offset is not None
    assert vip_range.ipv6(offset) == IPv6Address(entry.vip6)
    assert entry.provisional is False


def test_service_without_dns_name_still_gets_vip_and_one_warning(db_path: str) -> None:
    recorder = Recorder()
    zone = open_zone(db_path, recorder=recorder)
    service = "s" * 64
    zone.put(dataplane_resource("long-1", service), now=0.0)
    zone.put(dataplane_resource("other-1", "other"), now=1.0)
    entry = entries(zone)[key(service)]
    assert entry.names == ()
    assert entry.problems
    assert entry.vip
    assert len([w for w in recorder.warnings if service in w]) == 1


def test_dataplane_with_several_services(db_path: str) -> None:
    zone = open_zone(db_path)
    zone.put(dataplane_resource("multi-1", "a", "b", "c"), now=0.0)
    assert set(entries(zone)) == {key("a"), key("b"), key("c")}
    assert len({entry.vip for entry in zone.snapshot.entries}) == 3


def test_entries_are_sorted_by_mesh_and_service(db_path: str) -> None:
    zone = open_zone(db_path)
    zone.put(dataplane_resource("z-1", "zeta", mesh="beta"), now=0.0)
    zone.put(dataplane_resource("a-1", "alpha", mesh="beta", address="192.0.2.2"), now=0.0)
    zone.put(dataplane_resource("m-1", "mu", address="192.0.2.3"), now=0.0)
    zone.put(dataplane_resource("b-1", "beta", mesh="alpha", address="192.0.2.4"), now=0.0)
    assert [e.key for e in zone.snapshot.entries] == [
        key("beta", "alpha"),
        key("alpha", "beta"),
        key("zeta", "beta"),
        key("mu", "default"),
    ]


# -- ExternalServices ------------------------------------------------------------------


def test_external_services_never_get_a_vip(db_path: str) -> None:
    zone = open_zone(db_path)
    zone.put(parse_resource(external_service("httpbin")), now=0.0)
    zone.set_file("/r/es.yaml", [parse_resource(external_service("api", "payments"))], now=1.0)
    assert zone.snapshot.entries == ()
    assert zone.wanted() == set()
    assert len(zone.resources()) == 2


def test_external_service_sharing_a_name_with_a_dataplane_service(db_path: str) -> None:
    zone = open_zone(db_path)
    zone.put(dataplane_resource("redis-1", "redis"), now=0.0)
    zone.put(parse_resource(external_service("redis-ext", "redis")), now=1.0)
    zone.put(parse_resource(external_service("other-ext", "other")), now=2.0)
    assert set(entries(zone)) == {key("redis")}
    zone.delete(ResourceKey(DATAPLANE, "default", "redis-1"), now=3.0)
    assert zone.snapshot.entries == ()


# -- persistence --------------------------------------------------------------------------


def test_restart_gives_the_same_vips(db_path: str) -> None:
    zone = open_zone(db_path)
    zone.put(dataplane_resource("web-1", "web"), now=0.0)
    zone.set_file("/r/a.yaml", [dataplane_resource("redis-1", "redis", "cache")], now=1.0)
    before, version = vips(zone), zone.snapshot.version
    zone.store.close()

    restarted = open_zone(db_path)
    # The table is served straight from the store, before any file is read.
    assert vips(restarted) == before
    assert restarted.snapshot.version == version
    assert set(restarted.api) == {ResourceKey(DATAPLANE, "default", "web-1")}
    restarted.set_file("/r/a.yaml", [dataplane_resource("redis-1", "redis", "cache")], now=100.0)
    assert vips(restarted) == before
    assert restarted.snapshot.version == version


def test_restart_keeps_collision_winners_in_place(db_path: str) -> None:
    # On a 6-address range many services collide; the order they arrived in
    # decides who probed upwards.  A restart must not recompute that.
    zone = open_zone(db_path, TINY)
    services = ["s5", "s4", "s3", "s2", "s1"]
    for i, service in enumerate(services):
        zone.put(
            dataplane_resource(f"dp-{service}", service, address=f"192.0.2.{i + 1}"), now=float(i)
        )
    before = vips(zone)
    assert len({vip for vip, _ in before.values()}) == 5
    # Placing all five at once would give another table, so the test can tell.
    fresh = VipAllocator(zone.table.range, TINY.hold_down)
    fresh.reconcile([key(s) for s in services], now=0.0)
    assert {k: a.offset for k, a in fresh.allocations.items()} != {
        k: a.offset for k, a in zone.table.allocations.items()
    }
    zone.store.close()

    restarted = open_zone(db_path, TINY)
    restarted.update(now=10.0)
    assert vips(restarted) == before


def test_restart_during_hold_down_keeps_the_hold(db_path: str) -> None:
    zone = open_zone(db_path, TINY)
    zone.put(dataplane_resource("redis-1", "redis"), now=0.0)
    (vip,) = vips(zone).values()
    zone.delete(ResourceKey(DATAPLANE, "default", "redis-1"), now=10.0)
    assert zone.snapshot.entries == ()
    zone.store.close()

    restarted = open_zone(db_path, TINY)
    for i in range(5):
        restarted.put(
            dataplane_resource(f"o-{i}", f"other{i}", address=f"192.0.2.{i + 20}"), now=20.0
        )
    assert vip not in vips(restarted).values()
    restarted.put(dataplane_resource("redis-1", "redis"), now=30.0)
    assert vips(restarted)[key("redis")] == vip


def test_delete_and_recreate_through_the_api_gives_the_same_vip(db_path: str) -> None:
    zone = open_zone(db_path)
    zone.put(dataplane_resource("redis-1", "redis"), now=0.0)
    vip = vips(zone)[key("redis")]
    assert zone.delete(ResourceKey(DATAPLANE, "default", "redis-1"), now=1.0) is True
    assert zone.delete(ResourceKey(DATAPLANE, "default", "redis-1"), now=2.0) is False
    assert zone.put(dataplane_resource("redis-2", "redis"), now=3.0) is True
    assert vips(zone)[key("redis")] == vip


def test_put_reports_created_or_replaced(db_path: str) -> None:
    zone = open_zone(db_path)
    assert zone.put(dataplane_resource("redis-1", "redis"), now=0.0) is True
    assert zone.put(dataplane_resource("redis-1", "redis", "cache"), now=1.0) is False
    assert set(entries(zone)) == {key("redis"), key("cache")}


# -- conflicts -------------------------------------------------------------------------


def test_api_cannot_change_a_file_defined_resource(db_path: str) -> None:
    zone = open_zone(db_path)
    original = dataplane_resource("redis-1", "redis")
    zone.set_file("/r/a.yaml", [original], now=0.0)
    before = zone.snapshot
    with pytest.raises(ConflictError) as info:
        zone.put(dataplane_resource("redis-1", "hijacked"), now=1.0)
    assert "/r/a.yaml" in str(info.value)
    with pytest.raises(ConflictError):
        zone.delete(original.key, now=2.0)
    assert zone.resources()[original.key] is original
    assert set(entries(zone)) == {key("redis")}
    assert zone.snapshot == before
    assert zone.api == {}
    assert zone.store.load().resources == []


def test_api_may_use_the_same_name_in_another_mesh_or_type(db_path: str) -> None:
    zone = open_zone(db_path)
    zone.set_file("/r/a.yaml", [dataplane_resource("redis-1", "redis")], now=0.0)
    zone.put(dataplane_resource("redis-1", "redis", mesh="other"), now=1.0)
    zone.put(parse_resource(external_service("redis-1")), now=2.0)
    assert len(zone.resources()) == 3


def test_file_removal_drops_its_services(db_path: str) -> None:
    zone = open_zone(db_path)
    zone.set_file("/r/a.yaml", [dataplane_resource("redis-1", "redis")], now=0.0)
    zone.set_file("/r/a.yaml", [], now=1.0)
    assert zone.snapshot.entries == ()
    assert zone.resources() == {}


def test_second_file_defining_a_resource_is_ignored_with_a_warning(db_path: str) -> None:
    recorder = Recorder()
    zone = open_zone(db_path, recorder=recorder)
    zone.set_file("/r/a.yaml", [dataplane_resource("redis-1", "redis")], now=0.0)
    zone.set_file("/r/b.yaml", [dataplane_resource("redis-1", "other")], now=1.0)
    assert set(entries(zone)) == {key("redis")}
    assert any("/r/b.yaml" in w and "/r/a.yaml" in w for w in recorder.warnings)


def test_resource_moved_between_files_is_not_lost(db_path: str) -> None:
    zone = open_zone(db_path)
    zone.set_file("/r/a.yaml", [dataplane_resource("redis-1", "redis")], now=0.0)
    zone.set_file("/r/b.yaml", [dataplane_resource("redis-1", "redis")], now=1.0)
    # The operator removes it from a.yaml; b.yaml still defines it.
    zone.set_file("/r/a.yaml", [], now=2.0)
    assert zone.owner_of(ResourceKey(DATAPLANE, "default", "redis-1")) == "/r/b.yaml"
    assert set(entries(zone)) == {key("redis")}


# -- meshes -----------------------------------------------------------------------------


def test_mesh_of_address(db_path: str) -> None:
    zone = open_zone(db_path)
    zone.put(dataplane_resource("a-1", "a", mesh="m1", address="192.0.2.1"), now=0.0)
    zone.set_file(
        "/r/f.yaml", [dataplane_resource("b-1", "b", mesh="m2", address="2001:db8::2")], now=1.0
    )
    zone.put(dataplane_resource("c-1", "c", address="host.internal"), now=2.0)
    assert dict(zone.snapshot.mesh_of_address) == {"192.0.2.1": "m1", "2001:db8::2": "m2"}


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ("2001:DB8::A", "2001:db8::a"),
        ("2001:db8:0:0:0:0:0:a", "2001:db8::a"),
        ("2001:0db8::000a", "2001:db8::a"),
    ],
)
def test_mesh_of_address_uses_the_canonical_address(
    db_path: str, written: str, canonical: str
) -> None:
    zone = open_zone(db_path)
    zone.put(dataplane_resource("a-1", "a", mesh="m1", address=written), now=0.0)
    assert dict(zone.snapshot.mesh_of_address) == {canonical: "m1"}


def test_address_in_two_meshes_is_dropped_with_a_warning(db_path: str) -> None:
    recorder = Recorder()
    zone = open_zone(db_path, recorder=recorder)
    zone.put(dataplane_resource("a-1", "a", mesh="m1", address="192.0.2.1"), now=0.0)
    zone.put(dataplane_resource("a-2", "a", mesh="m2", address="192.0.2.1"), now=1.0)
    zone.put(dataplane_resource("b-1", "b", mesh="m1", address="192.0.2.2"), now=2.0)
    assert dict(zone.snapshot.mesh_of_address) == {"192.0.2.2": "m1"}
    assert len([w for w in recorder.warnings if "192.0.2.1" in w]) == 1
    # Read as the DNS server reads it (and as a dict answers), the address counted
    # in two meshes included.
    mesh_of = zone.snapshot.mesh_of_address
    assert mesh_of.get("192.0.2.1", "default") == "default"
    assert "192.0.2.1" not in mesh_of and "192.0.2.2" in mesh_of and 7 not in mesh_of
    assert mesh_of["192.0.2.2"] == "m1" and len(mesh_of) == 1
    with pytest.raises(KeyError):
        mesh_of["192.0.2.1"]


def test_the_merged_inventory_reads_as_a_mapping(db_path: str) -> None:
    zone = open_zone(db_path)
    a = dataplane_resource("a-1", "a", mesh="m1", address="192.0.2.1")
    b = dataplane_resource("b-1", "b")
    zone.put(a, now=0.0)
    zone.set_file("/r/f.yaml", [b], now=1.0)
    merged = zone.resources()
    assert merged == {a.key: a, b.key: b} and len(merged) == 2
    assert merged[a.key] is a and merged.get(b.key) is b
    missing = ResourceKey(DATAPLANE, "m1", "nope")
    assert merged.get(missing, "x") == "x" and missing not in merged and a.key in merged
    assert "a-1" not in merged and 7 not in merged and [1] not in merged
    with pytest.raises(KeyError):
        merged[missing]
    zone.delete(a.key, now=2.0)
    assert dict(merged) == {b.key: b}  # (live)


def test_two_dataplanes_same_address_same_mesh(db_path: str) -> None:
    zone = open_zone(db_path)
    zone.put(dataplane_resource("a-1", "a", mesh="m1", address="192.0.2.1"), now=0.0)
    zone.put(dataplane_resource("a-2", "b", mesh="m1", address="192.0.2.1"), now=1.0)
    assert dict(zone.snapshot.mesh_of_address) == {"192.0.2.1": "m1"}


def test_same_service_in_two_meshes_gets_two_vips(db_path: str) -> None:
    zone = open_zone(db_path)
    zone.put(dataplane_resource("redis-1", "redis", mesh="default"), now=0.0)
    zone.put(dataplane_resource("redis-1", "redis", mesh="other", address="192.0.2.11"), now=1.0)
    table = vips(zone)
    assert set(table) == {key("redis", "default"), key("redis", "other")}
    assert table[key("redis", "default")] != table[key("redis", "other")]
    assert table[key("redis", "default")][1] != table[key("redis", "other")][1]
    # Both have the same DNS names: the mesh of the client picks one.
    names = {e.key: e.names for e in zone.snapshot.entries}
    assert names[key("redis", "default")] == names[key("redis", "other")] == ("redis.mesh",)


def test_same_service_in_many_meshes_on_a_tiny_range(db_path: str) -> None:
    zone = open_zone(db_path, TINY)
    for i, mesh_name in enumerate(["m1", "m2", "m3", "m4", "m5", "m6"]):
        zone.put(
            dataplane_resource("redis-1", "redis", mesh=mesh_name, address=f"192.0.2.{i + 1}"),
            now=0.0,
        )
    assert len(set(vips(zone).values())) == 6


def test_meshes_listed(db_path: str) -> None:
    zone = open_zone(db_path)
    zone.set_file("/r/m.yaml", [mesh("prod")], now=0.0)
    zone.put(dataplane_resource("a-1", "a", mesh="dev"), now=1.0)
    assert zone.snapshot.meshes == ("default", "dev", "prod")


# -- range changes and exhaustion ---------------------------------------------------------


def test_cidr_change_resets_the_table_with_a_warning(db_path: str) -> None:
    zone = open_zone(db_path)
    zone.put(dataplane_resource("redis-1", "redis"), now=0.0)
    zone.put(dataplane_resource("web-1", "web", address="192.0.2.11"), now=0.0)
    zone.delete(ResourceKey(DATAPLANE, "default", "web-1"), now=1.0)
    old_version = zone.snapshot.version
    zone.store.close()

    recorder = Recorder()
    changed = open_zone(db_path, TINY, recorder)
    assert any("240.0.0.0/4" in w and "10.0.0.0/29" in w for w in recorder.warnings)
    changed.update(now=2.0)
    (entry,) = changed.snapshot.entries
    assert entry.key == key("redis")
    assert IPv4Address(entry.vip) in IPv4Network("10.0.0.0/29")
    assert IPv6Address(entry.vip6) in IPv6Network("fd00::/125")
    assert changed.table.holds == {}
    # The SOA serial never goes backwards.
    assert changed.snapshot.version > old_version
    new_vip, new_version = entry.vip, changed.snapshot.version
    changed.store.close()

    # The reset was persisted: no second warning, same VIP, no old holds.
    recorder = Recorder()
    again = open_zone(db_path, TINY, recorder)
    assert recorder.warnings == []
    assert [e.vip for e in again.snapshot.entries] == [new_vip]
    assert again.snapshot.version == new_version
    state = again.store.load()
    assert state.holds == []
    assert state.vip_range == "10.0.0.0/29 fd00::/125"


def test_exhaustion_warns_once_and_keeps_serving(db_path: str) -> None:
    recorder = Recorder()
    zone = open_zone(db_path, TINY, recorder)
    for i in range(6):
        zone.put(dataplane_resource(f"dp-{i}", f"s{i}", address=f"192.0.2.{i + 1}"), now=0.0)
    served = vips(zone)
    zone.put(dataplane_resource("dp-6", "s6", address="192.0.2.7"), now=1.0)
    zone.put(dataplane_resource("dp-7", "s7", address="192.0.2.8"), now=2.0)
    assert vips(zone) == served
    assert zone.snapshot.exhausted == (key("s6"), key("s7"))
    assert (zone.snapshot.range_size, zone.snapshot.range_used) == (6, 6)
    exhausted_warnings = [w for w in recorder.warnings if "exhausted" in w]
    assert len(exhausted_warnings) == 2
    assert "10.0.0.0/29" in exhausted_warnings[0]
    zone.update(now=3.0)
    assert len([w for w in recorder.warnings if "exhausted" in w]) == 2


# -- listeners -------------------------------------------------------------------------------


def test_listeners_get_the_new_snapshot(db_path: str) -> None:
    recorder = Recorder()
    zone = open_zone(db_path)
    zone.listeners.append(recorder.snapshot)
    zone.put(dataplane_resource("redis-1", "redis"), now=0.0)
    assert len(recorder.snapshots) == 1
    (snapshot,) = recorder.snapshots
    assert snapshot is zone.snapshot
    assert [e.key for e in snapshot.entries] == [key("redis")]
    assert snapshot.version == 1

    zone.set_file("/r/a.yaml", [dataplane_resource("web-1", "web", address="192.0.2.11")], now=1.0)
    assert recorder.snapshots[-1] is zone.snapshot
    assert {e.key for e in recorder.snapshots[-1].entries} == {key("redis"), key("web")}
    assert recorder.snapshots[-1].version == 2

    zone.delete(ResourceKey(DATAPLANE, "default", "redis-1"), now=2.0)
    assert [e.key for e in recorder.snapshots[-1].entries] == [key("web")]
    assert recorder.snapshots[-1].version == 3
    # Versions are those of each change (the entries are the zone's live ones).
    assert [s.version for s in recorder.snapshots] == [1, 2, 3]


def test_every_listener_is_called(db_path: str) -> None:
    first, second = Recorder(), Recorder()
    zone = open_zone(db_path)
    zone.listeners.extend([first.snapshot, second.snapshot])
    zone.put(dataplane_resource("redis-1", "redis"), now=0.0)
    assert first.snapshots == second.snapshots == [zone.snapshot]


def test_snapshot_version_matches_the_store(db_path: str) -> None:
    zone = open_zone(db_path)
    zone.put(dataplane_resource("redis-1", "redis"), now=0.0)
    zone.put(parse_resource(external_service("httpbin")), now=1.0)
    assert zone.store.load().table_version == zone.snapshot.version == 1


def test_waiting_copy_takes_over_with_its_own_content(db_path: str) -> None:
    zone = open_zone(db_path)
    zone.set_file("/r/a.yaml", [dataplane_resource("redis-1", "from-a")], now=0.0)
    zone.set_file("/r/b.yaml", [dataplane_resource("redis-1", "from-b")], now=1.0)
    assert set(entries(zone)) == {key("from-a")}
    zone.set_file("/r/a.yaml", [], now=2.0)
    assert set(entries(zone)) == {key("from-b")}


# -- failed writes --------------------------------------------------------------------------


def _stored_table(db_path: str) -> tuple[dict[ServiceKey, int], int]:
    store = SQLiteStore(db_path)
    try:
        state = store.load()
    finally:
        store.close()
    return {a.key: a.offset for a in state.allocations}, state.table_version


def test_failed_commit_leaves_memory_and_store_agreeing(db_path: str) -> None:
    zone = open_zone(db_path)
    zone.put(dataplane_resource("web-1", "web"), now=0.0)
    # Another process holds the write lock: BEGIN IMMEDIATE fails ("database is locked").
    other = sqlite3.connect(db_path, timeout=0.1)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises((sqlite3.Error, StoreError)):
            zone.put(dataplane_resource("redis-1", "redis", address="192.0.2.11"), now=1.0)
    finally:
        other.rollback()
        other.close()
    zone.update(now=2.0)
    memory = {k: a.offset for k, a in zone.table.allocations.items()}
    assert _stored_table(db_path) == (memory, zone.table.version)


# -- stable name ownership ------------------------------------------------------------


def names_of(zone: Zone) -> dict[str, tuple[str, ...]]:
    return {entry.key.service: entry.names for entry in zone.snapshot.entries}


def put_services(zone: Zone, now: float, *services: str) -> None:
    resources = [dataplane_resource(f"dp-{s.lower()}-{i}", s) for i, s in enumerate(services)]
    zone.set_file("/resources/services.yaml", resources, now)


def test_a_later_service_does_not_take_a_name_from_the_one_serving_it(db_path: str) -> None:
    recorder = Recorder()
    zone = open_zone(db_path, recorder=recorder)
    put_services(zone, 0.0, "redis", "a_b")
    put_services(zone, 1.0, "redis", "a_b", "Redis", "a.b")
    names = names_of(zone)
    assert names["redis"] == ("redis.mesh",) and names["Redis"] == ()
    assert names["a_b"] == ("a_b.mesh", "a.b.mesh") and names["a.b"] == ()
    assert any("redis.mesh is service redis's name" in w for w in recorder.warnings)


def test_the_name_passes_to_the_next_claimant_and_survives_a_restart(db_path: str) -> None:
    zone = open_zone(db_path)
    put_services(zone, 0.0, "web")
    put_services(zone, 1.0, "web", "WEB")
    put_services(zone, 2.0, "web", "WEB", "Web")
    put_services(zone, 3.0, "WEB", "Web")  # the holder goes: the earliest other claim takes it
    assert names_of(zone) == {"WEB": ("web.mesh",), "Web": ()}
    zone.store.close()
    again = open_zone(db_path)
    put_services(again, 4.0, "WEB", "Web")
    assert names_of(again) == {"WEB": ("web.mesh",), "Web": ()}
    put_services(again, 5.0, "WEB", "Web", "web")  # back, but later than the others
    assert names_of(again)["web"] == ()
