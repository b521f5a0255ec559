"""Tests for kumazone.core.federation: the merged table, a zone's view of it, the Federation."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kumazone.core.config import DnsServerConfig
from kumazone.core.federation import (
    CHANGE_LOG_VERSIONS,
    FederatedView,
    Federation,
    MergedTable,
    ZoneRecord,
)
from kumazone.core.limits import ZoneLimits
from kumazone.core.messages import (
    FrameDecoder,
    Inventory,
    Row,
    TableUpdate,
    encode,
    inventory_messages,
    table_messages,
)
from kumazone.core.names import assign_names, service_names
from kumazone.core.storage import StoreError
from kumazone.core.vips import Allocation, ServiceKey, TableDelta, VipRange
from kumazone.store.sqlite import SQLiteStore

HOLD_DOWN = 3600.0
BIG = VipRange(IPv4Network("240.0.0.0/4"), IPv6Network("fd00:fd00::/64"))
TINY = VipRange(IPv4Network("10.0.0.0/29"), IPv6Network("fd00::/125"))  # 6 offsets
SMALL = VipRange(IPv4Network("10.0.0.0/28"), IPv6Network("fd00::/124"))  # 14 offsets

Pair = tuple[str, str]


#: For the properties that let one zone fill a range: no share of it kept for others.
WHOLE_RANGE = ZoneLimits(max_range_share=1.0)


def key(service: str, mesh: str = "default") -> ServiceKey:
    return ServiceKey(mesh, service)


def pairs(keys: Iterable[ServiceKey]) -> list[Pair]:
    return sorted((k.mesh, k.service) for k in keys)


def full(*keys: ServiceKey) -> Inventory:
    return Inventory(True, 0, True, tuple(pairs(keys)), ())


def change(add: Iterable[ServiceKey] = (), remove: Iterable[ServiceKey] = ()) -> Inventory:
    return Inventory(False, 0, True, tuple(pairs(add)), tuple(pairs(remove)))


def candidate(vip_range: VipRange, k: ServiceKey) -> int:
    """The candidate offset, from the design's words (not from the code)."""
    digest = hashlib.sha256(f"{k.mesh}/{k.service}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % vip_range.size


def keys_with_candidate(vip_range: VipRange, offset: int, count: int) -> list[ServiceKey]:
    found: list[ServiceKey] = []
    index = 0
    while len(found) < count:
        k = key(f"svc-{index}")
        if candidate(vip_range, k) == offset:
            found.append(k)
        index += 1
    return found


def offsets(table: MergedTable) -> dict[ServiceKey, int]:
    return {key(r.service, r.mesh): r.offset for r in table.rows()}


def by_key(rows: Iterable[Row]) -> dict[Pair, Row]:
    return {(r.mesh, r.service): r for r in rows}


def apply_changes(old: Iterable[Row], changes: tuple[list[Row], list[Pair]]) -> dict[Pair, Row]:
    rows = by_key(old)
    upsert, remove = changes
    for pair in remove:
        rows.pop(pair, None)
    for row in upsert:
        rows[(row.mesh, row.service)] = row
    return rows


def as_allocations(rows: Iterable[Row]) -> dict[ServiceKey, Allocation]:
    return {
        key(r.service, r.mesh): Allocation(key(r.service, r.mesh), r.offset, r.zones, r.claim)
        for r in rows
    }


# -- MergedTable: merging --------------------------------------------------------


def test_two_zones_inventories_merge() -> None:
    table = MergedTable(BIG, HOLD_DOWN)
    redis, web, db = key("redis"), key("web"), key("db", mesh="other")
    table.receive_inventory("zone-1", full(redis, web), 1.0)
    web_offset = offsets(table)[web]
    table.receive_inventory("zone-2", full(web, db), 2.0)
    rows = by_key(table.rows())
    assert set(rows) == {("default", "redis"), ("default", "web"), ("other", "db")}
    assert rows[("default", "web")].zones == ("zone-1", "zone-2")
    assert rows[("default", "redis")].zones == ("zone-1",)
    assert rows[("other", "db")].zones == ("zone-2",)
    # One VIP for the service in two zones, the one it had before the second zone came.
    assert rows[("default", "web")].offset == web_offset == candidate(BIG, web)
    assert len({r.offset for r in rows.values()}) == 3
    assert table.zones_of(web) == ("zone-1", "zone-2")
    assert table.zones["zone-1"].services == {redis, web}
    assert table.zones["zone-2"].last_contact == 2.0


def test_rows_are_sorted_by_mesh_and_service() -> None:
    table = MergedTable(BIG, HOLD_DOWN)
    table.receive_inventory("z", full(key("b", "m2"), key("a", "m2"), key("z", "m1")), 0.0)
    assert [(r.mesh, r.service) for r in table.rows()] == [("m1", "z"), ("m2", "a"), ("m2", "b")]


def test_a_service_in_two_zones_keeps_its_vip_when_one_zone_drops_it() -> None:
    table = MergedTable(BIG, HOLD_DOWN)
    web = key("web")
    table.receive_inventory("zone-1", full(web), 0.0)
    table.receive_inventory("zone-2", full(web), 0.0)
    before = offsets(table)[web]
    delta = table.receive_inventory("zone-1", full(), 1.0)
    assert delta is not None and not delta.removed and not delta.added
    assert offsets(table)[web] == before
    assert by_key(table.rows())[("default", "web")].zones == ("zone-2",)


def test_a_full_inventory_replaces_the_previous_one() -> None:
    table = MergedTable(BIG, HOLD_DOWN)
    a, b, c = key("a"), key("b"), key("c")
    table.receive_inventory("zone-1", full(a, b), 10.0)
    a_offset = offsets(table)[a]
    delta = table.receive_inventory("zone-1", full(b, c), 20.0)
    assert delta is not None
    assert set(offsets(table)) == {b, c}
    assert [x.key for x in delta.removed] == [a]
    assert [x.key for x in delta.added] == [c]
    # The dropped service's VIP is held back for the hold-down period.
    assert [(h.key, h.offset, h.until) for h in delta.holds_added] == [
        (a, a_offset, 20.0 + HOLD_DOWN)
    ]
    assert table.allocator.holds[a_offset].key == a
    assert table.zones["zone-1"].services == {b, c}


def test_a_dropped_service_vip_is_held_down_then_freed() -> None:
    table = MergedTable(TINY, HOLD_DOWN)
    first, second = keys_with_candidate(TINY, 3, 2)
    table.receive_inventory("zone-1", full(first), 0.0)
    assert offsets(table)[first] == 3
    table.receive_inventory("zone-1", full(), 10.0)
    # Another service asking for the same offset during the hold-down does not get it.
    table.receive_inventory("zone-2", full(second), 20.0)
    assert offsets(table)[second] != 3
    # The service that held it gets it back.
    table.receive_inventory("zone-1", full(first), 30.0)
    assert offsets(table)[first] == 3


def test_a_held_vip_is_free_again_after_the_hold_down() -> None:
    table = MergedTable(TINY, HOLD_DOWN)
    first, second = keys_with_candidate(TINY, 4, 2)
    table.receive_inventory("zone-1", full(first), 0.0)
    table.receive_inventory("zone-1", full(), 10.0)
    table.receive_inventory("zone-2", full(second), 10.0 + HOLD_DOWN)
    assert offsets(table)[second] == 4


def test_partial_full_inventories_apply_at_the_last_part() -> None:
    table = MergedTable(BIG, HOLD_DOWN)
    old = [key(f"old-{i}") for i in range(3)]
    table.receive_inventory("zone-1", full(*old), 0.0)
    version = table.version
    rows = table.rows()
    new = [key(f"new-{i}") for i in range(5)]
    parts = inventory_messages(pairs(new), size=2)
    assert len(parts) == 3
    for part in parts[:-1]:
        assert table.receive_inventory("zone-1", part, 1.0) is None
        assert table.rows() == rows
        assert table.version == version
        assert table.zones["zone-1"].services == set(old)
    delta = table.receive_inventory("zone-1", parts[-1], 1.0)
    assert delta is not None
    assert set(offsets(table)) == set(new)
    assert table.version == version + 1
    assert table.zones["zone-1"].pending is None


def test_a_full_inventory_started_again_forgets_the_unfinished_one() -> None:
    table = MergedTable(BIG, HOLD_DOWN)
    first = inventory_messages(pairs([key("x"), key("y"), key("z")]), size=1)
    table.receive_inventory("zone-1", first[0], 0.0)
    table.receive_inventory("zone-1", first[1], 0.0)
    # The connection dropped; the zone sends a new full inventory from part 0.
    for part in inventory_messages(pairs([key("q"), key("r")]), size=1):
        table.receive_inventory("zone-1", part, 1.0)
    assert set(offsets(table)) == {key("q"), key("r")}


def test_parts_of_two_zones_do_not_mix() -> None:
    table = MergedTable(BIG, HOLD_DOWN)
    one = inventory_messages(pairs([key("a"), key("b")]), size=1)
    two = inventory_messages(pairs([key("c"), key("d")]), size=1)
    for message_one, message_two in zip(one, two, strict=True):
        table.receive_inventory("zone-1", message_one, 0.0)
        table.receive_inventory("zone-2", message_two, 0.0)
    assert table.zones["zone-1"].services == {key("a"), key("b")}
    assert table.zones["zone-2"].services == {key("c"), key("d")}


def test_changes_add_and_remove() -> None:
    table = MergedTable(BIG, HOLD_DOWN)
    a, b, c = key("a"), key("b"), key("c")
    table.receive_inventory("zone-1", full(a, b), 0.0)
    delta = table.receive_inventory("zone-1", change(add=[c], remove=[a]), 1.0)
    assert delta is not None
    assert set(offsets(table)) == {b, c}
    assert table.receive_inventory("zone-1", change(remove=[key("never-there")]), 2.0) is None


def test_an_unchanged_inventory_changes_nothing() -> None:
    table = MergedTable(BIG, HOLD_DOWN)
    table.receive_inventory("zone-1", full(key("a")), 0.0)
    version, rows = table.version, table.rows()
    assert table.receive_inventory("zone-1", full(key("a")), 5.0) is None
    assert table.receive_inventory("zone-1", change(add=[key("a")]), 6.0) is None
    assert (table.version, table.rows()) == (version, rows)
    assert table.zones["zone-1"].last_contact == 6.0


def test_delete_zone_removes_its_services() -> None:
    table = MergedTable(BIG, HOLD_DOWN)
    mine, shared, other = key("mine"), key("shared"), key("other")
    table.receive_inventory("zone-1", full(mine, shared), 0.0)
    table.receive_inventory("zone-2", full(shared, other), 0.0)
    shared_offset = offsets(table)[shared]
    version = table.version
    delta = table.delete_zone("zone-1", 5.0)
    assert delta is not None
    assert [x.key for x in delta.removed] == [mine]
    assert [h.key for h in delta.holds_added] == [mine]
    assert "zone-1" not in table.zones
    rows = by_key(table.rows())
    assert set(rows) == {("default", "shared"), ("default", "other")}
    assert rows[("default", "shared")].zones == ("zone-2",)
    assert rows[("default", "shared")].offset == shared_offset
    assert table.version == version + 1


def test_delete_of_an_unknown_zone_is_none() -> None:
    table = MergedTable(BIG, HOLD_DOWN)
    table.receive_inventory("zone-1", full(key("a")), 0.0)
    version = table.version
    assert table.delete_zone("zone-9", 1.0) is None
    assert table.version == version


def test_a_zone_without_services_deleted_bumps_nothing() -> None:
    table = MergedTable(BIG, HOLD_DOWN)
    table.zone("empty")
    version = table.version
    delta = table.delete_zone("empty", 1.0)
    assert delta is not None and not delta.changed
    assert table.version == version
    assert "empty" not in table.zones


def test_acknowledge_records_the_version_held() -> None:
    table = MergedTable(BIG, HOLD_DOWN)
    table.receive_inventory("zone-1", full(key("a")), 0.0)
    assert table.zones["zone-1"].behind_since == 0.0
    table.acknowledge("zone-1", table.version, 3.0)
    record = table.zones["zone-1"]
    assert (record.acked, record.last_contact, record.behind_since) == (table.version, 3.0, None)


# -- MergedTable: versions and the change log ------------------------------------


def test_version_grows_by_one_per_change() -> None:
    table = MergedTable(BIG, HOLD_DOWN)
    assert table.version == 0
    steps = [
        ("zone-1", full(key("a"), key("b"))),  # two added in one change
        ("zone-1", change(add=[key("c")])),
        ("zone-2", full(key("d"))),
        ("zone-1", change(remove=[key("a")])),
        ("zone-1", full(key("x"), key("y"), key("z"))),  # several added and removed
    ]
    for expected, (zone, message) in enumerate(steps, start=1):
        table.receive_inventory(zone, message, float(expected))
        assert table.version == expected
    table.delete_zone("zone-2", 10.0)
    assert table.version == len(steps) + 1


def test_a_zones_only_change_bumps_the_version() -> None:
    table = MergedTable(BIG, HOLD_DOWN)
    web = key("web")
    table.receive_inventory("zone-1", full(web), 0.0)
    version, before = table.version, offsets(table)
    base_rows = table.rows()
    delta = table.receive_inventory("zone-2", full(web), 1.0)
    assert delta is not None and not delta.changed  # no VIP moved
    assert offsets(table) == before
    assert table.version == version + 1
    # ... and the zones change is in the change log.
    changes = table.changes_since(version)
    assert changes == ([Row("default", "web", before[web], ("zone-1", "zone-2"), 1)], [])
    assert apply_changes(base_rows, changes) == by_key(table.rows())
    table.receive_inventory("zone-2", full(), 2.0)
    assert table.version == version + 2
    assert by_key(table.rows())[("default", "web")].zones == ("zone-1",)


def test_changes_since_gives_exactly_the_difference() -> None:
    table = MergedTable(BIG, HOLD_DOWN)
    history: dict[int, list[Row]] = {0: table.rows()}
    steps = [
        ("zone-1", full(key("a"), key("b"), key("c"))),
        ("zone-2", full(key("b"), key("d", "m2"))),
        ("zone-1", change(remove=[key("a")])),
        ("zone-1", change(add=[key("a")])),  # back within hold-down
        ("zone-2", full()),
        ("zone-3", full(key("e"))),
    ]
    for now, (zone, message) in enumerate(steps):
        table.receive_inventory(zone, message, float(now))
        history[table.version] = table.rows()
    table.delete_zone("zone-3", 99.0)
    history[table.version] = table.rows()
    assert table.version == len(history) - 1
    for base, old_rows in history.items():
        changes = table.changes_since(base)
        assert changes is not None
        assert apply_changes(old_rows, changes) == by_key(table.rows())
        upsert, remove = changes
        # Nothing is both upserted and removed, and nothing removed is still there.
        assert not {(r.mesh, r.service) for r in upsert} & set(remove)
        assert not set(remove) & set(by_key(table.rows()))
    assert table.changes_since(table.version) == ([], [])


def test_changes_since_the_future_is_none() -> None:
    table = MergedTable(BIG, HOLD_DOWN)
    table.receive_inventory("zone-1", full(key("a")), 0.0)
    assert table.changes_since(table.version + 1) is None
    assert table.changes_since(10**9) is None


def test_changes_since_before_a_restart_is_none() -> None:
    # A table restored at version 10 has no log of how it got there.
    restored = MergedTable(BIG, HOLD_DOWN, [Allocation(key("a"), 5)], version=10)
    assert restored.changes_since(10) == ([], [])
    assert restored.changes_since(9) is None
    assert restored.changes_since(0) is None
    restored.receive_inventory("zone-1", full(key("a"), key("b")), 0.0)
    assert restored.version == 11
    assert restored.changes_since(10) is not None
    assert restored.changes_since(9) is None


def test_changes_since_older_than_the_log_is_none() -> None:
    table = MergedTable(BIG, HOLD_DOWN)
    history: dict[int, list[Row]] = {0: []}
    for i in range(CHANGE_LOG_VERSIONS + 10):
        table.receive_inventory("zone-1", full(key(f"s-{i % 50}"), key("stay")), float(i))
        history[table.version] = table.rows()
    top = table.version
    assert top == CHANGE_LOG_VERSIONS + 10
    oldest = top - CHANGE_LOG_VERSIONS  # the log holds versions oldest+1 .. top
    changes = table.changes_since(oldest)
    assert changes is not None
    assert apply_changes(history[oldest], changes) == by_key(table.rows())
    assert table.changes_since(oldest - 1) is None
    assert table.changes_since(0) is None


# -- FederatedView --------------------------------------------------------------


def global_allocations(table: MergedTable) -> list[Allocation]:
    return list(as_allocations(table.rows()).values())


def test_provisional_vips_for_local_services_not_in_the_global_rows() -> None:
    glob = MergedTable(BIG, HOLD_DOWN)
    glob.receive_inventory("zone-2", full(key("remote"), key("shared")), 0.0)
    zone = FederatedView(BIG, global_allocations(glob), glob.version)
    local = {key("shared"), key("new-1"), key("new-2", "m2")}
    zone.reconcile(local, 1.0)
    assert set(zone.provisional) == {key("new-1"), key("new-2", "m2")}
    assert zone.changed
    # What a MergedTable allocates for them once the zone's inventory arrives.
    glob.receive_inventory("zone-1", full(*local), 2.0)
    for k, offset in zone.provisional.items():
        assert offsets(glob)[k] == offset == candidate(BIG, k)
    served = {k: (offset, provisional) for k, offset, _z, provisional, _c in zone.served()}
    assert served[key("shared")] == (offsets(glob)[key("shared")], False)
    assert served[key("remote")][1] is False
    assert served[key("new-1")] == (offsets(glob)[key("new-1")], True)


def test_reconciling_the_same_services_again_changes_nothing() -> None:
    zone = FederatedView(BIG)
    zone.reconcile({key("a")}, 0.0)
    assert zone.changed
    zone.reconcile({key("a")}, 1.0)
    assert not zone.changed
    zone.reconcile(set(), 2.0)
    assert zone.changed and zone.provisional == {}


def test_provisional_vips_avoid_every_global_offset() -> None:
    # The global holds offsets 0..3 of six; four local services ask for them.
    taken = {k: o for o in range(4) for k in keys_with_candidate(TINY, o, 1)}
    zone = FederatedView(TINY, [Allocation(k, o) for k, o in taken.items()], 4)
    local = keys_with_candidate(TINY, 0, 3)[1:] + keys_with_candidate(TINY, 3, 2)[1:]
    zone.reconcile(local, 0.0)
    assert len(zone.provisional) == 2
    assert set(zone.provisional.values()) == {4, 5}
    assert zone.exhausted == set(local) - set(zone.provisional)
    assert not set(zone.provisional.values()) & set(taken.values())


def test_provisional_vips_equal_the_global_allocation() -> None:
    glob = MergedTable(SMALL, HOLD_DOWN)
    glob.receive_inventory("zone-2", full(*[key(f"r{i}") for i in range(6)]), 0.0)
    zone = FederatedView(SMALL, global_allocations(glob), glob.version)
    local = [key(f"l{i}") for i in range(6)]
    zone.reconcile(local, 0.0)
    glob.receive_inventory("zone-1", full(*local), 0.0)
    assert zone.provisional == {k: offsets(glob)[k] for k in local}


def test_full_table_in_parts_applies_at_the_last_part() -> None:
    zone = FederatedView(BIG, [Allocation(key("old"), 1)], 3)
    rows = [Row("default", f"s{i}", 100 + i, ("zone-2",)) for i in range(5)]
    parts = table_messages(9, 0, True, rows, size=2)
    assert len(parts) == 3
    for part in parts[:-1]:
        assert zone.apply(part) is None
        assert zone.version == 3
        assert zone.global_rows == {key("old"): Allocation(key("old"), 1)}
    delta = zone.apply(parts[-1])
    assert delta is not None
    assert zone.version == 9
    assert zone.global_rows == as_allocations(rows)
    assert {a.key for a in delta.added} == {key(f"s{i}") for i in range(5)}
    assert [a.key for a in delta.removed] == [key("old")]


def test_a_full_table_restarted_forgets_the_unfinished_one() -> None:
    zone = FederatedView(BIG)
    first = table_messages(5, 0, True, [Row("m", f"a{i}", i) for i in range(4)], size=2)
    zone.apply(first[0])
    second = table_messages(6, 0, True, [Row("m", "b", 7)], size=2)
    zone.apply(second[0])
    assert zone.global_rows == {ServiceKey("m", "b"): Allocation(ServiceKey("m", "b"), 7)}
    assert zone.version == 6


def test_a_delta_with_the_right_base_applies() -> None:
    glob = MergedTable(BIG, HOLD_DOWN)
    glob.receive_inventory("zone-1", full(key("a"), key("b"), key("c")), 0.0)
    zone = FederatedView(BIG, global_allocations(glob), glob.version)
    base = glob.version
    glob.receive_inventory("zone-1", full(key("b"), key("c"), key("d")), 1.0)
    glob.receive_inventory("zone-2", full(key("c")), 2.0)
    changes = glob.changes_since(base)
    assert changes is not None
    upsert, remove = changes
    parts = table_messages(glob.version, base, False, upsert, remove, size=1)
    assert len(parts) > 1
    before = dict(zone.global_rows)
    for part in parts[:-1]:
        # Parts are gathered: nothing changes until the last one.
        assert zone.apply(part) is None
        assert zone.version == base
        assert zone.global_rows == before
    assert zone.apply(parts[-1]) is not None
    assert zone.version == glob.version
    assert zone.global_rows == as_allocations(glob.rows())


def test_a_delta_with_the_wrong_base_raises() -> None:
    zone = FederatedView(BIG, [Allocation(key("a"), 1)], 4)
    for base in (3, 5, 0):
        with pytest.raises(ValueError):
            zone.apply(TableUpdate(6, base, False, 0, True, (Row("default", "b", 2),), ()))
    assert zone.version == 4
    assert zone.global_rows == {key("a"): Allocation(key("a"), 1)}


def test_after_apply_a_local_service_in_the_global_rows_is_not_provisional() -> None:
    zone = FederatedView(TINY)
    mine, other = keys_with_candidate(TINY, 2, 2)
    zone.reconcile({mine}, 0.0)
    assert zone.provisional == {mine: 2}
    # The global gave offset 2 to another service first and moved this one on.
    glob = MergedTable(TINY, HOLD_DOWN)
    glob.receive_inventory("zone-2", full(other), 0.0)
    glob.receive_inventory("zone-1", full(mine), 0.0)
    assert offsets(glob) == {other: 2, mine: 3}
    for part in table_messages(glob.version, 0, True, glob.rows()):
        zone.apply(part)
    # The provisional VIPs follow the global's rows at once.
    assert zone.provisional == {}
    assert zone.changed
    zone.reconcile({mine}, 1.0)
    assert not zone.changed
    served = {
        k: (offset, zones, provisional) for k, offset, zones, provisional, _c in zone.served()
    }
    assert served == {other: (2, ("zone-2",), False), mine: (3, ("zone-1",), False)}
    assert zone.allocations[mine] == Allocation(mine, 3, ("zone-1",), claim=2)


def wire(message: TableUpdate) -> TableUpdate:
    """C{message} as a zone reads it off the wire."""
    (read,) = FrameDecoder().feed(encode(message))
    assert isinstance(read, TableUpdate)
    return read


@pytest.mark.parametrize("whole", [True, False])
def test_a_confirmed_provisional_vip_keeps_its_offset_object(whole: bool) -> None:
    # A zone holds a million rows: the global's row for a provisional VIP it
    # confirms takes the very int the provisional VIP had (the zone's maps by
    # offset keep it as their key), and rows decoded from the wire share their
    # claims, one int per table version.
    zone = FederatedView(BIG)
    mine, theirs, also = key("mine"), key("theirs"), key("also")
    zone.reconcile({mine}, 0.0)
    placed = zone.provisional[mine]
    assert placed > 256  # not one of the interpreter's shared small ints
    rows = [
        Row("default", "also", candidate(BIG, also), ("zone-2",), 7),
        Row("default", "mine", placed, ("zone-1",), 7),
        Row("default", "theirs", candidate(BIG, theirs), ("zone-2",), 7),
    ]
    if not whole:
        for part in table_messages(1, 0, True, rows[:1]):
            zone.apply(wire(part))
    for part in table_messages(2, 0 if whole else 1, whole, rows if whole else rows[1:]):
        zone.apply(wire(part))
    assert zone.provisional == {}
    assert zone.global_rows[mine].offset == placed
    assert zone.global_rows[mine].offset is placed
    claims = {id(zone.global_rows[k].claim) for k in (mine, theirs)}
    assert len(claims) == 1


def test_a_service_removed_from_the_global_rows_becomes_provisional_again() -> None:
    a = key("a")
    zone = FederatedView(BIG, [Allocation(a, 77)], 1)
    zone.reconcile({a}, 0.0)
    assert zone.provisional == {}
    zone.apply(TableUpdate(2, 1, False, 0, True, (), (("default", "a"),)), 1.0)
    zone.reconcile({a}, 1.0)
    # At the VIP it had: the zone holds it back for it, as the global does.
    assert zone.provisional == {a: 77}


# -- properties ------------------------------------------------------------------

POOL = [ServiceKey(m, f"s{i}") for m in ("default", "m2") for i in range(8)]
ZONES = ["zone-1", "zone-2", "zone-3"]

key_sets = st.sets(st.sampled_from(POOL), max_size=10)
zone_names = st.sampled_from(ZONES)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("full"), zone_names, key_sets, st.integers(1, 4)),
        st.tuples(st.just("change"), zone_names, key_sets, key_sets),
        st.tuples(st.just("delete"), zone_names),
        st.tuples(st.just("wait"), st.sampled_from([1.0, HOLD_DOWN / 2, HOLD_DOWN])),
        st.tuples(st.just("sync"), zone_names),
        st.tuples(st.just("reconnect"), zone_names),
    ),
    max_size=40,
)


class ZoneView:
    """A zone's table as GlobalSession.push keeps it (a full table, then deltas)."""

    def __init__(self) -> None:
        self.table = FederatedView(SMALL)
        self.sent = -1

    def sync(self, glob: MergedTable) -> None:
        if self.sent == glob.version:
            return
        changes = glob.changes_since(self.sent) if self.sent >= 0 else None
        if changes is None:
            messages = table_messages(glob.version, 0, True, glob.rows(), size=3)
        else:
            messages = table_messages(glob.version, self.sent, False, *changes, size=3)
        for message in messages:
            self.table.apply(message)
        self.sent = glob.version


@settings(max_examples=200, deadline=None)
@given(operations)
def test_global_table_never_gives_one_offset_to_two_keys(ops) -> None:
    glob = MergedTable(SMALL, HOLD_DOWN)
    views = {name: ZoneView() for name in ZONES}
    model: dict[str, set[ServiceKey]] = {}
    released: dict[int, tuple[ServiceKey, float]] = {}
    now = 0.0
    for op in ops:
        before = offsets(glob)
        if op[0] == "full":
            _, zone, services, size = op
            for message in inventory_messages(pairs(services), size=size):
                glob.receive_inventory(zone, message, now, WHOLE_RANGE)
            model[zone] = set(services)
        elif op[0] == "change":
            _, zone, add, remove = op
            glob.receive_inventory(zone, change(add, remove), now, WHOLE_RANGE)
            model[zone] = (model.get(zone, set()) | add) - remove
        elif op[0] == "delete":
            glob.delete_zone(op[1], now)
            model.pop(op[1], None)
        elif op[0] == "wait":
            now += op[1]
            glob.reconcile(now)
        elif op[0] == "sync":
            views[op[1]].sync(glob)
        else:
            views[op[1]] = ZoneView()
        after = offsets(glob)
        # One offset, one key.
        assert len(set(after.values())) == len(after)
        assert not set(after.values()) & set(glob.allocator.holds)
        # A freed offset goes to no other key during the hold-down.
        for k, offset in before.items():
            if after.get(k) != offset:
                released[offset] = (k, now)
        for k, offset in after.items():
            if before.get(k) != offset and offset in released:
                owner, when = released[offset]
                assert owner == k or now >= when + HOLD_DOWN
        # The rows are the union of what the zones have, with their zones.
        wanted: dict[ServiceKey, list[str]] = {}
        for zone in sorted(model):
            for k in model[zone]:
                wanted.setdefault(k, []).append(zone)
        assert set(after) == set(wanted) - glob.allocator.exhausted
        for row in glob.rows():
            assert row.zones == tuple(wanted[key(row.service, row.mesh)])
    for view in views.values():
        view.sync(glob)
        assert view.table.version == glob.version
        assert view.table.global_rows == as_allocations(glob.rows())


@settings(max_examples=200, deadline=None)
@given(key_sets, key_sets, st.sets(st.sampled_from(ZONES[1:]), max_size=2))
def test_provisional_vips_are_what_the_global_allocates(remote, local, others) -> None:
    glob = MergedTable(SMALL, HOLD_DOWN)
    glob.receive_inventory("zone-2", full(*remote), 0.0, WHOLE_RANGE)
    zone = FederatedView(SMALL, global_allocations(glob), glob.version)
    zone.reconcile(local, 0.0)
    taken = {r.offset for r in glob.rows()}
    assert set(zone.provisional) | zone.exhausted == set(local) - set(offsets(glob))
    assert not set(zone.provisional.values()) & taken
    assert len(set(zone.provisional.values())) == len(zone.provisional)
    glob.receive_inventory("zone-1", full(*local), 1.0, WHOLE_RANGE)
    allocated = offsets(glob)
    assert zone.provisional == {k: allocated[k] for k in zone.provisional}


# -- the incremental table equals a from-scratch one ------------------------------------

#: Services whose names collide (a_b and a.b, Redis and redis) so that names change owner.
NAMED_POOL = [
    ServiceKey(m, s) for m in ("default", "m2") for s in ("a_b", "a.b", "Redis", "redis", "x", "y")
]
named_sets = st.sets(st.sampled_from(NAMED_POOL), max_size=8)
incremental_operations = st.lists(
    st.one_of(
        st.tuples(st.just("full"), zone_names, named_sets, st.integers(1, 3)),
        st.tuples(st.just("change"), zone_names, named_sets, named_sets, st.integers(1, 3)),
        st.tuples(st.just("delete"), zone_names),
        st.tuples(st.just("wait"), st.sampled_from([1.0, HOLD_DOWN / 2, HOLD_DOWN])),
    ),
    max_size=30,
)


def _from_scratch(table: MergedTable, now: float) -> MergedTable:
    """A fresh table over the same zones, allocations and hold-downs, reconciled whole."""
    zones = [ZoneRecord(z.name, set(z.services)) for z in table.zones.values()]
    fresh = MergedTable(
        table.allocator.range,
        HOLD_DOWN,
        table.allocator.allocations.values(),
        table.allocator.holds.values(),
        table.version,
        zones,
        domain="mesh",
    )
    fresh.allocator.exhausted = set(table.allocator.exhausted)
    delta = fresh.reconcile(now)
    assert not delta.changed, "the incremental table holds exactly what the zones want"
    return fresh


@settings(max_examples=150, deadline=None)
@given(incremental_operations, st.sampled_from([TINY, SMALL]))
def test_the_incremental_table_equals_one_computed_from_scratch(ops, vip_range) -> None:
    table = MergedTable(vip_range, HOLD_DOWN, domain="mesh")
    stored: dict[str, set[ServiceKey]] = {}
    rows_at: dict[int, dict[Pair, Row]] = {table.version: {}}
    now = 0.0
    for op in ops:
        if op[0] == "full":
            _, zone, services, size = op
            for message in inventory_messages(pairs(services), size=size):
                table.receive_inventory(zone, message, now, WHOLE_RANGE)
        elif op[0] == "change":
            _, zone, add, remove, size = op
            for message in inventory_messages(pairs(add), pairs(remove), full=False, size=size):
                table.receive_inventory(zone, message, now, WHOLE_RANGE)
        elif op[0] == "delete":
            table.delete_zone(op[1], now)
            stored.pop(op[1], None)
        else:
            now += op[1]
        table.expire(now)  # the tick: every table is looked at as settled at `now`
        added, removed = table.take_unstored()
        for zone, k in added:
            stored.setdefault(zone, set()).add(k)
        for zone, k in removed:
            stored[zone].discard(k)
        rows_at[table.version] = by_key(table.listing)

        fresh = _from_scratch(table, now)
        assert table.allocator.allocations == fresh.allocator.allocations
        assert table.allocator.holds == fresh.allocator.holds
        assert table.allocator.exhausted == fresh.allocator.exhausted
        assert {k: table.zones_of(k) for k in NAMED_POOL} == {
            k: fresh.zones_of(k) for k in NAMED_POOL
        }
        assert list(table.listing) == list(fresh.listing) == fresh.rows()
        assert list(table.listing.keys()) == sorted(table.allocator.allocations)
        names = assign_names(
            ((r.mesh, r.service, r.claim) for r in table.listing),
            lambda service: service_names(service, "mesh"),
        )
        assert {
            (r.mesh, r.service): table.names_of(key(r.service, r.mesh)) for r in table.listing
        } == names
        assert table.names("mesh") == names
        # What the store was given is each zone's services.
        assert {z: s for z, s in stored.items() if s} == {
            name: record.services for name, record in table.zones.items() if record.services
        }
        # From any version still logged, the changes lead to the rows now.
        for base, rows in rows_at.items():
            changes = table.changes_since(base)
            if changes is not None:
                assert apply_changes(rows.values(), changes) == by_key(table.listing)
            # ... and so do capped steps, each the table exactly as it was then.
            for limit in (1, 2):
                at, current = base, rows
                while at != table.version:
                    step = table.changes_from(at, limit)
                    if step is None:
                        break
                    at, upsert, remove = step
                    current = apply_changes(current.values(), (upsert, remove))
                    assert current == rows_at.get(at, current)
                else:
                    assert current == by_key(table.listing)


def test_a_change_of_one_service_costs_one_service() -> None:
    """Only the service named is logged and re-listed, whatever the table's size."""
    table = MergedTable(BIG, HOLD_DOWN)
    table.receive_inventory("zone-1", full(*[key(f"s{i}") for i in range(500)]), 0.0)
    table.take_unstored()
    version = table.version
    table.receive_inventory("zone-2", change([key("s7"), key("new")]), 1.0)
    assert table.version == version + 1
    assert table.changes_since(version) == (
        [table.row(key("new")), table.row(key("s7"))],
        [],
    )
    assert table.row(key("s7")).zones == ("zone-1", "zone-2")
    added, removed = table.take_unstored()
    assert sorted(added) == [("zone-2", key("new")), ("zone-2", key("s7"))] and removed == []
    assert table.names_of(key("new")) == (("new.mesh",), ())


# -- Federation: the merged table kept equal to its store --------------------------------


def _federation(path: str, config: DnsServerConfig | None = None) -> Federation:
    return Federation(config or DnsServerConfig(), SQLiteStore(path), table_id="t-1")


Picture = tuple[dict[ServiceKey, int], int, dict[str, set[ServiceKey]]]


def _merged_from_store(path: str) -> Picture:
    store = SQLiteStore(path)
    try:
        state = store.load()
    finally:
        store.close()
    return (
        {a.key: a.offset for a in state.allocations},
        state.table_version,
        {z.name: z.services for z in state.zones},
    )


def _memory(
    federation: Federation,
) -> tuple[dict[ServiceKey, int], int, dict[str, set[ServiceKey]]]:
    merged = federation.merged
    return (
        offsets(merged),
        merged.version,
        {name: record.services for name, record in merged.zones.items()},
    )


def _receive(federation: Federation, zone: str, *keys: ServiceKey, now: float = 0.0) -> None:
    delta = federation.merged.receive_inventory(zone, full(*keys), now)
    federation.persist(delta, [zone], [])


def test_federation_restores_table_and_zones_from_the_store(tmp_path) -> None:
    path = str(tmp_path / "global.sqlite3")
    first = _federation(path)
    _receive(first, "zone-1", key("redis"), key("web"))
    before = _memory(first)
    first.store.close()
    again = _federation(path)
    assert _memory(again) == before
    assert not any(record.connected for record in again.merged.zones.values())
    assert again.store.load().table_id == "t-1"


def test_federation_allocates_anew_when_the_range_changes(tmp_path) -> None:
    path = str(tmp_path / "global.sqlite3")
    first = _federation(path)
    _receive(first, "zone-1", key("redis"))
    first.store.close()
    warnings: list[str] = []
    other = DnsServerConfig(cidr=IPv4Network("241.0.0.0/8"))
    again = Federation(other, SQLiteStore(path), table_id="t-2", warn=warnings.append)
    assert offsets(again.merged) == {}
    assert warnings and "VIP range changed" in warnings[0]
    assert again.store.load().allocations == []


def test_a_failed_write_puts_memory_back_to_the_store(tmp_path) -> None:
    path = str(tmp_path / "global.sqlite3")
    federation = _federation(path)
    _receive(federation, "zone-1", key("redis"))
    # Another process holds the write lock: BEGIN IMMEDIATE fails ("database is locked").
    other = sqlite3.connect(path, timeout=0.1)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError):
            _receive(federation, "zone-1", key("redis"), key("web"), now=1.0)
    finally:
        other.rollback()
        other.close()
    assert _memory(federation) == _merged_from_store(path)
    assert key("web") not in offsets(federation.merged)


def test_tick_expires_a_hold_down_only_when_due(tmp_path) -> None:
    path = str(tmp_path / "global.sqlite3")
    federation = _federation(path)
    _receive(federation, "zone-1", key("redis"))
    _receive(federation, "zone-1", now=10.0)
    hold_down = DnsServerConfig().hold_down
    assert federation.tick(10.0 + hold_down - 1) is None
    delta = federation.tick(10.0 + hold_down)
    assert delta is not None and [h.key for h in delta.holds_dropped] == [key("redis")]


def test_a_returning_service_gets_its_vip_back_but_not_the_name_that_passed_on() -> None:
    """redis holds redis.mesh; Redis (later) waits.  redis goes (from every zone) and
    the name passes to Redis; redis comes back within its hold-down: its VIP is its
    own again, but its claim is new, so Redis keeps the name (names never move back)."""
    from kumazone.core.names import assign_names, service_names

    def names(table: MergedTable) -> dict[str, tuple[str, ...]]:
        claims = [(r.mesh, r.service, r.claim) for r in table.listing]
        return {
            service: found[0]
            for (_m, service), found in assign_names(
                claims, lambda s: service_names(s, "mesh")
            ).items()
        }

    table = MergedTable(BIG, HOLD_DOWN)
    redis, big_redis = key("redis"), key("Redis")
    table.receive_inventory("zone-1", full(redis), 0.0)
    table.receive_inventory("zone-2", full(big_redis), 1.0)
    assert names(table) == {"redis": ("redis.mesh",), "Redis": ()}
    held = offsets(table)[redis]
    table.receive_inventory("zone-1", full(), 2.0)
    assert names(table) == {"Redis": ("redis.mesh",)}
    table.receive_inventory("zone-1", full(redis), 3.0)  # back within the hold-down
    assert offsets(table)[redis] == held
    assert names(table) == {"redis": (), "Redis": ("redis.mesh",)}


# -- a zone far behind: capped steps ---------------------------------------------------


def test_changes_from_steps_through_the_versions_a_limit_at_a_time() -> None:
    table = MergedTable(BIG, HOLD_DOWN)
    history: dict[int, dict[Pair, Row]] = {0: {}}
    for i in range(10):  # ten versions of three services each (one moved away, two new)
        add = [key(f"s-{i}-{j}") for j in range(3)]
        remove = [key(f"s-{i - 1}-0")] if i else []
        table.receive_inventory("zone-1", change(add, remove), float(i))
        history[table.version] = by_key(table.rows())
    assert table.version == 10
    base, rows, sizes = 0, history[0], []
    while base != table.version:
        step = table.changes_from(base, 7)
        assert step is not None
        version, upsert, remove = step
        assert version > base
        sizes.append(len(upsert) + len(remove))
        rows = apply_changes(rows.values(), (upsert, remove))
        assert rows == history[version]  # exactly the table at that version
        base = version
    assert rows == by_key(table.rows())
    assert len(sizes) > 1 and max(sizes) <= 7
    # Uncapped: one step to now, the same as changes_since.
    whole = table.changes_from(0)
    assert whole is not None and whole[0] == table.version
    assert (whole[1], whole[2]) == table.changes_since(0)


def test_changes_from_sends_a_version_bigger_than_the_limit_whole() -> None:
    table = MergedTable(BIG, HOLD_DOWN)
    table.receive_inventory("zone-1", full(*[key(f"s{i}") for i in range(20)]), 0.0)
    table.receive_inventory("zone-1", change([key("one")]), 1.0)
    step = table.changes_from(0, 5)
    assert step is not None
    version, upsert, remove = step
    assert version == 1 and len(upsert) == 20 and remove == []
    assert table.changes_from(1, 5) == (2, [table.row(key("one"))], [])
    assert table.changes_from(2, 5) == (2, [], [])
    assert table.changes_from(3, 5) is None


def test_a_zone_far_behind_converges_through_capped_pushes() -> None:
    """A zone that applies each capped push holds the global's table, step by step."""
    glob = MergedTable(BIG, HOLD_DOWN)
    for i in range(40):
        glob.receive_inventory(
            f"zone-{i % 3}",
            change([key(f"x{i}-{j}") for j in range(5)], [key(f"x{i - 3}-1")] if i >= 3 else []),
            float(i),
        )
    zone = FederatedView(BIG)
    zone.reconcile({key("x1-1"), key("mine")}, 0.0)
    pushes = 0
    while zone.version != glob.version:
        step = glob.changes_from(zone.version, 12)
        assert step is not None
        version, upsert, remove = step
        for message in table_messages(version, zone.version, False, upsert, remove, size=4):
            zone.apply(message, 50.0)
        assert zone.version == version
        pushes += 1
    assert pushes > 1
    assert zone.global_rows == as_allocations(glob.rows())
    # x1-1 went from the global's rows (its zone dropped it): the zone's own again.
    assert set(zone.provisional) == {key("mine"), key("x1-1")}


def test_a_global_row_on_a_provisional_vip_moves_only_that_service() -> None:
    """The global gives a remote service the VIP a local service held provisionally:
    that service alone is placed again, as a placement from scratch places it."""
    [mine, theirs] = keys_with_candidate(SMALL, 3, 2)
    others = [k for k in (key(f"o{i}") for i in range(40)) if candidate(SMALL, k) not in (3, 4)]
    local = {mine, *others[:4]}
    zone = FederatedView(SMALL)
    zone.reconcile(local, 0.0)
    assert zone.provisional[mine] == 3
    before = dict(zone.provisional)
    zone.take_touched()
    row = Row(theirs.mesh, theirs.service, 3, ("z2",), 1)
    zone.apply(TableUpdate(1, 0, False, 0, True, (row,)))
    assert zone.global_rows[theirs].offset == 3
    assert zone.provisional[mine] != 3
    assert {k: o for k, o in zone.provisional.items() if k != mine} == {
        k: o for k, o in before.items() if k != mine
    }
    assert zone.take_touched() == {theirs, mine}
    fresh = FederatedView(SMALL, zone.global_rows.values(), zone.version)
    fresh.reconcile(local, 0.0)
    assert fresh.provisional == zone.provisional


class CountingView(FederatedView):
    """A view that counts its placements of every provisional VIP from scratch."""

    placed_all = 0

    def _place_all(self, now: float, delta: TableDelta) -> None:
        self.placed_all += 1
        super()._place_all(now, delta)


def test_a_displaced_service_takes_a_later_ones_vip_and_that_one_moves_on() -> None:
    """Its probe meets a later service's provisional VIP: it takes it (as from
    scratch, where it comes first), and the later one is placed again, with no
    placement of everything."""
    theirs, first, second = keys_with_candidate(SMALL, 3, 3)
    first, second = sorted((first, second))
    zone = CountingView(SMALL)
    zone.reconcile({first, second}, 0.0)
    assert (zone.provisional[first], zone.provisional[second]) == (3, 4)
    placed = zone.placed_all
    row = Row(theirs.mesh, theirs.service, 3, ("z2",), 1)
    zone.apply(TableUpdate(1, 0, False, 0, True, (row,)))
    assert (zone.provisional[first], zone.provisional[second]) == (4, 5)
    assert zone.placed_all == placed
    fresh = FederatedView(SMALL, zone.global_rows.values(), zone.version)
    fresh.reconcile({first, second}, 0.0)
    assert fresh.provisional == zone.provisional


def test_held_back_keys_are_handed_out_once_each_in_the_order_they_came() -> None:
    """Two big updates over the same keys wait as one backlog: each key followed
    once, in the order the rows came (a table's rows come in key order)."""
    zone = FederatedView(BIG)
    first = [Row("default", f"s{i:02d}", i, ("z2",), 1) for i in range(6)]
    zone.apply(TableUpdate(1, 0, True, 0, True, tuple(first)))
    assert zone.defer_touched(2)
    # The next version moves four of them (and one that was not there): still held back.
    moved = [Row("default", f"s{i:02d}", 10 + i, ("z2",), 1) for i in (1, 3, 5, 7)]
    zone.apply(TableUpdate(2, 1, False, 0, True, tuple(moved)))
    assert zone.defer_touched(2)
    assert zone.held_back == 7
    handed: list[ServiceKey] = []
    while zone.release(3):
        handed.extend(zone.take_touched())
    handed.extend(zone.take_touched())
    assert handed == [key(f"s{i:02d}") for i in (0, 1, 2, 3, 4, 5, 7)]
    assert zone.held_back == 0
