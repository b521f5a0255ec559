"""Big inventories and tables applied in bounded slices give what one pass gives."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network

import pytest
from twisted.internet.task import Clock

from kumazone.core.federation import MergedTable
from kumazone.core.limits import ZoneLimits, ZoneRefused
from kumazone.core.messages import Inventory, Row, TableUpdate, table_messages
from kumazone.core.vips import ServiceKey, VipRange
from tests.unit.test_sync import (
    CONFIG,
    Global,
    ZoneEnd,
    connect,
    make_zone,
    served,
    set_services,
)

BIG = VipRange(IPv4Network("240.0.0.0/4"), IPv6Network("fd00:fd00::/64"))
SMALL = VipRange(IPv4Network("10.0.0.0/26"), IPv6Network("fd00::/122"))  # 62 offsets
WHOLE_RANGE = ZoneLimits(max_range_share=1.0)


def keys(count: int, prefix: str = "svc") -> list[tuple[str, str]]:
    return [("default", f"{prefix}-{i:03d}") for i in range(count)]


def full(pairs: list[tuple[str, str]]) -> Inventory:
    return Inventory(True, 0, True, tuple(sorted(pairs)), ())


def snapshot(table: MergedTable) -> list[tuple[str, str, int, tuple[str, ...]]]:
    """Every row but its claim (the version a slice came in, not the one pass's)."""
    return [(r.mesh, r.service, r.offset, r.zones) for r in table.rows()]


def claims_follow_key_order(table: MergedTable, zone: str) -> bool:
    """Of one zone's keys, a later one never claims before an earlier one (as in one
    pass, where ties go to the earlier key): the same DNS name owners."""
    claims = [r.claim for r in table.rows() if r.zones == (zone,)]
    return claims == sorted(claims)


@pytest.mark.parametrize("vip_range", [BIG, SMALL], ids=["big", "small"])
def test_an_inventory_applied_in_slices_gives_the_table_of_one_pass(vip_range: VipRange) -> None:
    whole, sliced = MergedTable(vip_range, 3600.0), MergedTable(vip_range, 3600.0)
    for table in (whole, sliced):
        table.receive_inventory("zone-2", full(keys(9, "other")), 0.0, WHOLE_RANGE)
    inventory = full(keys(50))
    whole.receive_inventory("zone-1", inventory, 1.0, WHOLE_RANGE)
    versions = [sliced.version]
    sliced.receive_inventory("zone-1", inventory, 1.0, WHOLE_RANGE, limit=7)
    versions.append(sliced.version)
    assert sliced.stepping() == ["zone-1"]
    while sliced.stepping():
        assert sliced.step("zone-1", 1.0, 7) is not None
        versions.append(sliced.version)
        # Every slice is a table of its own: each key once, each VIP once.
        offsets = [row.offset for row in sliced.rows()]
        assert len(offsets) == len(set(offsets))
    assert versions == sorted(set(versions))  # one version per slice
    assert len(versions) == 1 + 8  # 50 keys, 7 at a time
    assert snapshot(sliced) == snapshot(whole)
    assert claims_follow_key_order(sliced, "zone-1")
    assert sliced.zones["zone-1"].services == whole.zones["zone-1"].services


def test_a_change_while_slices_wait_is_not_lost() -> None:
    table = MergedTable(BIG, 3600.0)
    table.receive_inventory("zone-1", full(keys(20)), 0.0, limit=5)
    waiting = sorted(table.zones["zone-1"].todo)
    assert len(waiting) == 15
    not_yet, applied = waiting[-1], next(iter(table.zones["zone-1"].services))
    change = Inventory(
        False,
        0,
        True,
        (("default", "new-one"),),
        ((not_yet.mesh, not_yet.service), (applied.mesh, applied.service)),
    )
    table.receive_inventory("zone-1", change, 1.0, limit=5)
    while table.stepping():
        table.step("zone-1", 1.0, 5)
    expected = {ServiceKey(*pair) for pair in keys(20)} - {not_yet, applied}
    expected.add(ServiceKey("default", "new-one"))
    assert table.zones["zone-1"].services == expected
    assert {ServiceKey(r.mesh, r.service) for r in table.rows()} == expected


def test_a_full_inventory_while_slices_wait_replaces_what_waits() -> None:
    table = MergedTable(BIG, 3600.0)
    table.receive_inventory("zone-1", full(keys(20)), 0.0, limit=5)
    table.receive_inventory("zone-1", full(keys(3, "else")), 1.0, limit=5)
    while table.stepping():
        table.step("zone-1", 1.0, 5)
    assert table.zones["zone-1"].services == {ServiceKey(*pair) for pair in keys(3, "else")}


def test_the_service_limit_counts_what_waits() -> None:
    table = MergedTable(BIG, 3600.0)
    limits = ZoneLimits(max_services=10)
    table.receive_inventory("zone-1", full(keys(10)), 0.0, limits, limit=2)
    assert table.stepping()
    more = Inventory(False, 0, True, (("default", "eleventh"),), ())
    with pytest.raises(ZoneRefused, match="would have 11 services"):
        table.receive_inventory("zone-1", more, 1.0, limits, limit=2)


def test_the_hub_applies_a_big_inventory_a_slice_per_turn() -> None:
    clock = Clock()
    glob = Global(clock)
    glob.hub.step_keys = 10
    zone = ZoneEnd(clock, make_zone("zone-1", *(f"svc-{i:03d}" for i in range(45))))
    _client, _server, pump = connect(glob, zone)
    pump.flush()
    assert not glob.table.stepping()
    assert len(glob.table.rows()) == 45
    # 45 keys, 10 a turn: five versions, and the zone holds the last.
    assert glob.table.version == 5
    assert zone.zone.table.version == glob.table.version
    assert not any(e.provisional for e in zone.zone.snapshot.entries)
    whole = MergedTable(VipRange(CONFIG.cidr, CONFIG.cidr6), 3600.0)
    whole.receive_inventory("zone-1", full(keys(45)), 0.0)
    assert snapshot(glob.table) == snapshot(whole)
    assert claims_follow_key_order(glob.table, "zone-1")


def rows_of(table: MergedTable) -> TableUpdate:
    (message,) = table_messages(table.version, 0, True, table.rows())
    return message


def big_table(count: int) -> MergedTable:
    table = MergedTable(VipRange(CONFIG.cidr, CONFIG.cidr6), 3600.0)
    table.receive_inventory("zone-2", full(keys(count, "far")), 0.0)
    return table


def test_a_zone_follows_a_big_table_in_slices_as_in_one_pass() -> None:
    table = big_table(40)
    whole, sliced = make_zone("zone-1", "redis", "web"), make_zone("zone-1", "redis", "web")
    assert whole.apply_global(rows_of(table), "t", 1.0)
    assert sliced.apply_global(rows_of(table), "t", 1.0, limit=6)
    assert sliced.table.version == table.version  # stored whole at once
    assert len(sliced.store.load().allocations) == 40
    turns = 0
    while sliced.follow_global(6):
        turns += 1
    assert turns == 6  # 40 keys touched, 6 a turn
    assert served(sliced) == served(whole)
    assert sliced.snapshot.version == whole.snapshot.version


def test_a_local_change_between_slices_is_served_at_once_and_kept() -> None:
    table = big_table(30)
    zone = make_zone("zone-1", "redis")
    told: list[int] = []
    zone.listeners.append(lambda change: told.append(len(change.added)))
    zone.apply_global(rows_of(table), "t", 1.0, limit=5)
    assert zone.follow_global(5)
    set_services(zone, "redis", "fresh", now=2.0)
    assert "fresh" in served(zone)  # not behind the slices
    while zone.follow_global(5):
        pass
    names = served(zone)
    assert {"redis", "fresh"} <= set(names)
    assert len(names) == 32
    assert max(told) <= 5 + 1


def test_a_zone_acknowledges_a_big_table_once_followed() -> None:
    clock = Clock()
    glob = Global(clock)
    glob.table.receive_inventory("zone-2", full(keys(1200, "far")), 0.0)
    zone = ZoneEnd(clock, make_zone("zone-1", "redis"))
    _client, _server, pump = connect(glob, zone)
    pump.flush()
    # The pump turns the clock: the slices ran, then the ack went.
    assert len(zone.zone.snapshot.entries) == 1201
    assert glob.table.zones["zone-1"].acked == glob.table.version
    assert zone.sync.last_table_at is not None


def test_a_transport_resumed_before_hello_sends_no_table() -> None:
    clock = Clock()
    glob = Global(clock)
    glob.table.receive_inventory("zone-2", full(keys(3, "far")), 0.0)
    server, transport = glob.server()
    server.pauseProducing()
    server.resumeProducing()  # TLS may do this around its handshake
    assert transport.value() == b""


def test_a_table_update_is_written_where_the_zone_is_told_and_told_whether_it_is_big() -> None:
    """Table updates go to write_in_background (a service writes the big ones, of
    BACKGROUND_ROWS rows or more, on another thread), told which are big."""
    from kumazone.core.storage import StoreChanges
    from kumazone.core.zone import BACKGROUND_ROWS

    zone = make_zone("zone-1")
    handed: list[StoreChanges] = []

    def write(changes: StoreChanges, big: bool) -> None:
        if big:
            handed.append(changes)
        else:
            zone.store.commit(changes)

    zone.write_in_background = write
    rows = [Row("default", f"svc-{i:05d}", i, ("zone-2",), 1) for i in range(BACKGROUND_ROWS)]
    for message in table_messages(1, 0, True, rows, size=300):
        zone.apply_global(message, "t-1", 0.0)
    [changes] = handed
    assert changes.reset_table and changes.table_id == "t-1" and changes.table_version == 1
    assert changes.delta is not None and len(changes.delta.added) == BACKGROUND_ROWS
    assert zone.store.load().allocations == []  # not written here: the hook writes it
    zone.store.commit(changes)
    small = [Row("default", "one-more", BACKGROUND_ROWS, ("zone-2",), 2)]
    for message in table_messages(2, 1, False, small, ()):
        zone.apply_global(message, "t-1", 0.0)
    assert len(handed) == 1
    assert len(zone.store.load().allocations) == BACKGROUND_ROWS + 1
