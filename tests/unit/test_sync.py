"""Tests for L{kumazone.sync}: zone <-> global sync protocols, in memory (no sockets).

The global (L{GlobalHub} over a L{MergedTable}) and zones (L{ZoneSync} over a
federated L{Zone}) talk through L{twisted.test.iosim} pumps, or one side is driven
directly over a L{StringTransport}.  Time is a L{Clock}.
"""

from __future__ import annotations

import gc
import struct
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient

from kumazone.core.bulk import CollectorPause
from kumazone.core.config import DnsServerConfig, load_config
from kumazone.core.federation import FederatedView, MergedTable
from kumazone.core.messages import (
    CHUNK_ITEMS,
    MAX_FRAME,
    Ack,
    Error,
    FrameDecoder,
    Hello,
    Inventory,
    Message,
    Ping,
    Row,
    TableUpdate,
    Welcome,
    encode,
    inventory_messages,
    table_messages,
)
from kumazone.core.storage import StoreChanges
from kumazone.core.vips import ServiceKey, TableDelta, VipRange
from kumazone.core.zone import Zone
from kumazone.store.sqlite import SQLiteStore
from kumazone.sync.certs import make_certs
from kumazone.sync.global_side import GlobalHub, ZoneConnected
from kumazone.sync.metrics import SyncMetrics
from kumazone.sync.protocol import HEARTBEAT, SILENCE, SyncFactory, SyncProtocol
from kumazone.sync.tls import TLSFiles, client_options, server_options
from kumazone.sync.zone_side import ZoneSync
from tests.builders import dataplane_resource

CONFIG = load_config(None, {})
CIDRS = (str(CONFIG.cidr), str(CONFIG.cidr6))
TABLE_ID = "table-of-the-global"
HOLD_DOWN = 3600.0


# -- helpers ----------------------------------------------------------------------


def make_zone(name: str, *services: str, config: DnsServerConfig = CONFIG) -> Zone:
    zone = Zone(name, config, SQLiteStore(":memory:"), federated=True)
    if services:
        set_services(zone, *services, now=0.0)
    return zone


def set_services(zone: Zone, *services: str, now: float = 1.0) -> None:
    resources = [dataplane_resource(f"{zone.name}-dp", *services)] if services else []
    zone.set_file("/resources/services.yaml", resources, now)


class Persisted:
    """The hub's persist callback: records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[TableDelta | None, list[str], list[str]]] = []

    def __call__(self, delta: TableDelta | None, zones: list[str], deleted: list[str]) -> None:
        self.calls.append((delta, list(zones), list(deleted)))

    def replay(self) -> dict[ServiceKey, int]:
        """The allocations a store fed these deltas would hold."""
        rows: dict[ServiceKey, int] = {}
        for delta, _zones, _deleted in self.calls:
            if delta is None:
                continue
            for allocation in delta.removed:
                rows.pop(allocation.key, None)
            for allocation in delta.added:
                rows[allocation.key] = allocation.offset
        return rows


class Recording:
    """A sync handler in front of another: records each message, then hands it on.

    It has the per-kind methods its inner handler has, and no others, so that the
    protocol refuses the same kinds with it in front.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.messages: list[Message] = []
        self.protos: list[SyncProtocol] = []
        self.lost: list[Failure] = []

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)  # peer_role, awaiting, <kind>_received
        if not name.endswith("_received"):
            return attribute

        def received(proto: SyncProtocol, message: Message) -> None:
            self.messages.append(message)
            attribute(proto, message)

        return received

    def connected(self, proto: SyncProtocol) -> None:
        self.protos.append(proto)
        self.inner.connected(proto)

    def disconnected(self, proto: SyncProtocol, reason: Failure) -> None:
        self.lost.append(reason)
        self.inner.disconnected(proto, reason)

    def of(self, kind: type) -> list[Any]:
        return [m for m in self.messages if isinstance(m, kind)]

    def clear(self) -> None:
        self.messages.clear()


class Global:
    """A hub over a fresh MergedTable, its persist record and metrics."""

    def __init__(
        self,
        clock: Clock,
        require_certificates: bool = False,
        table_id: str = TABLE_ID,
        table: MergedTable | None = None,
    ) -> None:
        self.clock = clock
        self.table = table or MergedTable(VipRange(CONFIG.cidr, CONFIG.cidr6), HOLD_DOWN)
        self.persisted = Persisted()
        self.registry = CollectorRegistry()
        self.metrics = SyncMetrics(self.registry)
        self.hub = GlobalHub(
            self.table,
            table_id,
            CIDRS,
            self.persisted,
            clock,
            self.metrics,
            require_certificates=require_certificates,
        )
        #: Every session's recorder, in connection order.
        self.sessions: list[Recording] = []

    def make_session(self) -> Recording:
        recording = Recording(self.hub.session())
        self.sessions.append(recording)
        return recording

    def factory(self) -> SyncFactory:
        return SyncFactory(self.make_session, self.clock, self.metrics)

    def refused(self, reason: str) -> float:
        return (
            self.registry.get_sample_value("kumazone_sync_refused_total", {"reason": reason}) or 0
        )

    def server(self) -> tuple[SyncProtocol, StringTransport]:
        """A zone connection driven by hand over a StringTransport."""
        proto = self.factory().buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport


class ZoneEnd:
    """A zone with its ZoneSync, recording what the global sends it."""

    def __init__(self, clock: Clock, zone: Zone) -> None:
        self.clock = clock
        self.zone = zone
        self.registry = CollectorRegistry()
        self.metrics = SyncMetrics(self.registry)
        self.sync = ZoneSync(zone, clock, self.metrics)
        self.recording = Recording(self.sync)

    def factory(self) -> SyncFactory:
        return SyncFactory(lambda: self.recording, self.clock, self.metrics)


def connect(glob: Global, zone: ZoneEnd) -> tuple[SyncProtocol, SyncProtocol, IOPump]:
    """Connect a zone to the global in memory; returns (zone side, global side, pump)."""
    server_factory, client_factory = glob.factory(), zone.factory()
    client, server, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
        clock=glob.clock,
    )
    return client, server, pump


def sent(transport: StringTransport) -> list[Message]:
    return list(FrameDecoder().feed(transport.value()))


def hello(zone: str = "zone-1", **kwargs: Any) -> bytes:
    fields: dict[str, Any] = {"cidr": CIDRS[0], "cidr6": CIDRS[1], **kwargs}
    return encode(Hello(zone, **fields))


def served(zone: Zone) -> dict[str, tuple[str, tuple[str, ...], bool]]:
    return {e.key.service: (e.vip, e.zones, e.provisional) for e in zone.snapshot.entries}


def disconnect(proto: SyncProtocol, pump: IOPump) -> None:
    proto.transport.loseConnection()
    pump.flush()


# -- hello, welcome, table, ack ---------------------------------------------------


def test_hello_welcome_full_table_ack() -> None:
    clock = Clock()
    glob = Global(clock)
    glob.table.receive_inventory("zone-2", Inventory(True, 0, True, (("default", "db"),)), 0.0)
    version_before = glob.table.version
    rows_before = glob.table.rows()
    zone = ZoneEnd(clock, make_zone("zone-1", "redis", "web"))
    client, server, _pump = connect(glob, zone)

    # What the zone said, in order.
    from_zone = glob.sessions[0].messages
    assert from_zone[0] == Hello("zone-1", 0, "", CIDRS[0], CIDRS[1])
    assert from_zone[1] == Inventory(True, 0, True, (("default", "redis"), ("default", "web")), ())
    assert all(isinstance(m, Ack) for m in from_zone[2:])

    # What the global said, in order: welcome, the whole table, then the change.
    to_zone = zone.recording.messages
    assert to_zone[0] == Welcome(version_before, TABLE_ID)
    assert isinstance(to_zone[1], TableUpdate)
    assert to_zone[1].full and to_zone[1].last and to_zone[1].version == version_before
    assert list(to_zone[1].upsert) == rows_before
    assert isinstance(to_zone[2], TableUpdate) and not to_zone[2].full
    assert to_zone[2].base == version_before
    assert to_zone[2].version == glob.table.version == version_before + 1

    # The zone acknowledged what it holds, and the global knows it.
    assert [m.version for m in from_zone[2:]] == [version_before, glob.table.version]
    record = glob.table.zones["zone-1"]
    assert record.connected and record.acked == glob.table.version
    assert glob.hub.sessions.keys() == {"zone-1"}
    assert (
        glob.registry.get_sample_value("kumazone_sync_table_version", {"zone": "zone-1"})
        == glob.table.version
    )

    # The zone serves the global's table: its own services no longer provisional.
    assert zone.zone.table_id == TABLE_ID
    assert zone.zone.table.version == glob.table.version
    rows = {r.service: r for r in glob.table.rows()}
    entries = served(zone.zone)
    assert set(entries) == {"db", "redis", "web"}
    for service, (vip, zones, provisional) in entries.items():
        assert not provisional
        assert vip == str(CONFIG.cidr[1 + rows[service].offset])
        assert zones == rows[service].zones
    assert entries["db"][1] == ("zone-2",)
    assert zone.sync.global_table_id == TABLE_ID
    assert zone.sync.connected_since is not None
    assert zone.registry.get_sample_value("kumazone_sync_connected", {"zone": "zone-1"}) == 1
    assert not client.closed and not server.closed


def test_the_global_persists_hello_and_inventory() -> None:
    clock = Clock()
    glob = Global(clock)
    zone = ZoneEnd(clock, make_zone("zone-1", "redis"))
    connect(glob, zone)
    zones_written = [zones for _d, zones, _deleted in glob.persisted.calls]
    assert zones_written and all(zones == ["zone-1"] for zones in zones_written)
    deltas = [d for d, _z, _deleted in glob.persisted.calls if d is not None]
    assert [a.key for d in deltas for a in d.added] == [ServiceKey("default", "redis")]
    assert glob.persisted.replay() == {
        ServiceKey(r.mesh, r.service): r.offset for r in glob.table.rows()
    }


def test_a_zone_without_services_still_gets_the_table() -> None:
    clock = Clock()
    glob = Global(clock)
    glob.table.receive_inventory("zone-2", Inventory(True, 0, True, (("default", "db"),)), 0.0)
    zone = ZoneEnd(clock, make_zone("zone-1"))
    connect(glob, zone)
    assert glob.sessions[0].messages[1] == Inventory(True, 0, True, (), ())
    assert served(zone.zone)["db"][2] is False
    assert zone.zone.table.version == glob.table.version


def test_provisional_vips_are_served_before_the_table_arrives() -> None:
    zone = make_zone("zone-1", "redis")
    ((_key, offset, _zones, provisional, _claim),) = zone.table.served()
    assert provisional
    clock = Clock()
    glob = Global(clock)
    connect(glob, ZoneEnd(clock, zone))
    ((_key, global_offset, zones, provisional, _claim),) = zone.table.served()
    assert not provisional
    assert global_offset == offset  # the global confirms the zone's own candidate
    assert zones == ("zone-1",)


# -- changes flow both ways -------------------------------------------------------


def test_an_inventory_change_reaches_the_global_and_every_zone() -> None:
    clock = Clock()
    glob = Global(clock)
    one = ZoneEnd(clock, make_zone("zone-1", "redis"))
    two = ZoneEnd(clock, make_zone("zone-2", "web"))
    _c1, _s1, pump_one = connect(glob, one)
    _c2, _s2, pump_two = connect(glob, two)
    pump_one.flush()
    assert set(served(one.zone)) == set(served(two.zone)) == {"redis", "web"}
    version = glob.table.version

    set_services(one.zone, "redis", "payments")
    assert one.recording.of(TableUpdate)[-1].version == version  # nothing sent to it yet
    pump_one.flush()
    assert ServiceKey("default", "payments") in glob.table.zones["zone-1"].services
    assert glob.table.version == version + 1
    pump_two.flush()
    for end in (one, two):
        last = end.recording.of(TableUpdate)[-1]
        assert (last.full, last.base, last.version) == (False, version, version + 1)
        assert [(r.service, r.zones) for r in last.upsert] == [("payments", ("zone-1",))]
        assert end.zone.table.version == glob.table.version
        assert glob.table.zones[end.zone.name].acked == glob.table.version
    assert served(one.zone)["payments"] == served(two.zone)["payments"]
    assert served(two.zone)["payments"][2] is False

    # A removal travels the same way.
    set_services(one.zone, "payments")
    pump_one.flush()
    pump_two.flush()
    assert set(served(two.zone)) == {"payments", "web"}
    assert set(served(one.zone)) == {"payments", "web"}
    assert one.recording.of(TableUpdate)[-1].remove == (("default", "redis"),)


def test_changes_made_while_the_whole_inventory_is_on_its_way_reach_the_global() -> None:
    # 9,000 services: five parts, over two turns of the zone's reactor.  Changes
    # come before the welcome, while parts are still to go, and after a change
    # that may have changed anything (the whole inventory goes again).
    clock = Clock()
    glob = Global(clock)
    services = [f"s-{i}" for i in range(9_000)]
    zone = ZoneEnd(clock, make_zone("zone-1", *services))
    server_factory, client_factory = glob.factory(), zone.factory()
    _client, _server, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
        greet=False,
        clock=clock,
    )
    assert zone.sync.global_table_id is None  # nothing read yet
    services = [*services[1:], "late-1"]
    set_services(zone.zone, *services)  # before the welcome, parts still to go
    pump.pump()
    set_services(zone.zone, *services[1:], "late-2")  # parts still to go
    services = [*services[1:], "late-2"]
    pump.flush(advanceClock=True)
    wanted = {ServiceKey("default", s) for s in services}
    assert glob.table.zones["zone-1"].services == wanted
    inventories = glob.sessions[0].of(Inventory)
    assert [m.full for m in inventories].count(True) == 5  # one whole inventory

    # A recovery (the store holds what another replica wrote meanwhile): the
    # services that came and went since the inventory before it, not the whole one.
    api = dataplane_resource("from-api", "api-1")
    zone.zone.put(api, 2.0)
    pump.flush(advanceClock=True)
    assert ServiceKey("default", "api-1") in glob.table.zones["zone-1"].services
    zone.zone.store.commit(
        StoreChanges(puts=[dataplane_resource("other", "api-2")], deletes=[api.key])
    )
    sent_before = len(glob.sessions[0].of(Inventory))
    zone.zone.recover()
    services = services[:-1]
    set_services(zone.zone, *services)  # and a change on its heels
    pump.flush(advanceClock=True)
    wanted = {ServiceKey("default", s) for s in [*services, "api-2"]}
    assert glob.table.zones["zone-1"].services == wanted == set(zone.zone.wanted())
    inventories = glob.sessions[0].of(Inventory)
    assert [m.full for m in inventories].count(True) == 5  # still the one
    assert len(inventories) - sent_before == 2
    assert set(served(zone.zone)) == {*services, "api-2"}


def test_a_service_in_two_zones_has_one_vip_everywhere() -> None:
    clock = Clock()
    glob = Global(clock)
    one = ZoneEnd(clock, make_zone("zone-1", "web"))
    two = ZoneEnd(clock, make_zone("zone-2", "web"))
    _c1, _s1, pump_one = connect(glob, one)
    connect(glob, two)
    pump_one.flush()
    assert served(one.zone)["web"] == served(two.zone)["web"]
    assert served(one.zone)["web"][1] == ("zone-1", "zone-2")


def test_a_large_inventory_change_is_persisted_whole() -> None:
    # More added services than fit one part message: every allocation must reach
    # the store, or a restarted global loses VIPs that zones serve.
    clock = Clock()
    glob = Global(clock)
    zone = ZoneEnd(clock, make_zone("zone-1", "first"))
    _client, _server, pump = connect(glob, zone)
    many = [f"svc-{i:05d}" for i in range(CHUNK_ITEMS + 500)]
    set_services(zone.zone, "first", *many)
    pump.flush()
    inventories = [m for m in glob.sessions[0].messages if isinstance(m, Inventory)]
    assert len(inventories) == 3  # the full one at connection, then a change in 2 parts
    assert len(glob.table.rows()) == len(many) + 1
    table = {ServiceKey(r.mesh, r.service): r.offset for r in glob.table.rows()}
    stored = glob.persisted.replay()
    missing = sorted(set(table) - set(stored))
    assert missing == [], f"{len(missing)} allocation(s) never persisted, e.g. {missing[:2]}"
    assert stored == table


def test_an_operator_deleting_a_zone_closes_it_and_tells_the_others() -> None:
    clock = Clock()
    glob = Global(clock)
    one = ZoneEnd(clock, make_zone("zone-1", "redis"))
    two = ZoneEnd(clock, make_zone("zone-2", "web"))
    client_one, _s1, pump_one = connect(glob, one)
    _c2, _s2, pump_two = connect(glob, two)
    pump_one.flush()
    # A connected zone would come straight back: the operator stops it first.
    with pytest.raises(ZoneConnected):
        glob.hub.delete_zone("zone-1")
    assert "zone-1" in glob.table.zones
    disconnect(client_one, pump_one)
    assert glob.hub.delete_zone("zone-1")
    assert glob.persisted.calls[-1][2] == ["zone-1"]
    pump_two.flush()
    assert set(served(two.zone)) == {"web"}
    assert "zone-1" not in glob.table.zones
    assert not glob.hub.delete_zone("zone-1")


# -- reconnection -----------------------------------------------------------------


def test_a_reconnecting_zone_gets_only_the_changes() -> None:
    clock = Clock()
    glob = Global(clock)
    one = ZoneEnd(clock, make_zone("zone-1", "redis"))
    client, _server, pump = connect(glob, one)
    held = one.zone.table.version
    assert held == glob.table.version > 0
    disconnect(client, pump)
    assert one.recording.lost and one.sync.proto is None and one.sync.global_table_id is None
    assert not glob.table.zones["zone-1"].connected
    assert glob.hub.sessions == {}
    assert one.registry.get_sample_value("kumazone_sync_connected", {"zone": "zone-1"}) == 0
    # Meanwhile another zone changes the table.
    two = ZoneEnd(clock, make_zone("zone-2", "web", "redis"))
    connect(glob, two)
    assert glob.table.version == held + 1
    one.recording.clear()
    client, _server, pump = connect(glob, one)

    assert glob.sessions[-1].messages[0] == Hello("zone-1", held, TABLE_ID, *CIDRS)
    tables = one.recording.of(TableUpdate)
    assert len(tables) == 1
    (table,) = tables
    assert (table.full, table.base, table.version) == (False, held, glob.table.version)
    assert {(r.service, r.zones) for r in table.upsert} == {
        ("web", ("zone-2",)),
        ("redis", ("zone-1", "zone-2")),
    }
    assert one.zone.table.version == glob.table.version
    assert served(one.zone)["web"][2] is False
    assert glob.table.zones["zone-1"].connected


def test_a_zone_far_behind_is_sent_bounded_steps_and_converges() -> None:
    """Versions it missed come as several changes of at most push_rows rows each
    (one version each, the table as it was then), not one change of them all."""
    clock = Clock()
    glob = Global(clock)
    glob.hub.push_rows = 3
    one = ZoneEnd(clock, make_zone("zone-1", "redis"))
    client, _server, pump = connect(glob, one)
    held = one.zone.table.version
    disconnect(client, pump)
    # Meanwhile another zone's services come, a version per slice of two.
    glob.hub.step_keys = 2
    two = ZoneEnd(clock, make_zone("zone-2", *[f"web-{i}" for i in range(9)]))
    _client2, _server2, pump2 = connect(glob, two)
    for _ in range(10):
        clock.advance(0)
        pump2.flush()
    assert glob.table.version >= held + 5
    one.recording.clear()
    client, _server, pump = connect(glob, one)
    for _ in range(10):
        clock.advance(0)
        pump.flush()
    tables = one.recording.of(TableUpdate)
    versions = [t.version for t in tables if t.last]
    assert len(versions) > 1 and versions == sorted(versions)
    assert all(not t.full and len(t.upsert) + len(t.remove) <= 3 for t in tables)
    assert tables[0].base == held
    assert one.zone.table.version == glob.table.version
    table = one.zone.table
    assert isinstance(table, FederatedView)
    assert {k: a.offset for k, a in table.global_rows.items()} == {
        ServiceKey(r.mesh, r.service): r.offset for r in glob.table.rows()
    }
    assert {e.key.service for e in one.zone.snapshot.entries} == {
        "redis",
        *[f"web-{i}" for i in range(9)],
    }
    assert glob.table.zones["zone-1"].acked == glob.table.version


def test_a_reconnecting_zone_that_is_up_to_date_gets_no_table() -> None:
    clock = Clock()
    glob = Global(clock)
    one = ZoneEnd(clock, make_zone("zone-1", "redis"))
    client, _server, pump = connect(glob, one)
    disconnect(client, pump)
    one.recording.clear()
    connect(glob, one)
    assert one.recording.of(Welcome) == [Welcome(glob.table.version, TABLE_ID)]
    assert one.recording.of(TableUpdate) == []


@pytest.mark.parametrize("have", [5, 12], ids=["older-than-the-log", "from-the-future"])
def test_a_zone_the_log_cannot_serve_gets_a_full_table(have: int) -> None:
    # A global restored at version 10 has no change log from before.
    table = MergedTable(VipRange(CONFIG.cidr, CONFIG.cidr6), HOLD_DOWN, version=10)
    glob = Global(Clock(), table=table)
    glob.table.receive_inventory("zone-2", Inventory(True, 0, True, (("default", "db"),)), 0.0)
    proto, transport = glob.server()
    proto.dataReceived(hello(have=have, table_id=TABLE_ID))
    tables = [m for m in sent(transport) if isinstance(m, TableUpdate)]
    assert len(tables) == 1
    assert tables[0].full and tables[0].version == 11
    assert list(tables[0].upsert) == glob.table.rows()


def frames(data: bytes) -> list[bytes]:
    """Split a byte stream into its frames (length prefix kept)."""
    out = []
    while data:
        (length,) = struct.unpack("!I", data[:4])
        out.append(data[: 4 + length])
        data = data[4 + length :]
    return out


def test_a_zone_cut_off_in_the_middle_of_a_change_catches_up() -> None:
    # A change in two part messages; the connection drops after the first part.
    clock = Clock()
    glob = Global(clock)
    zone = ZoneEnd(clock, make_zone("zone-1", "redis"))
    server, server_transport = glob.server()
    client = zone.factory().buildProtocol(None)
    client_transport = StringTransport()
    client.makeConnection(client_transport)
    while client_transport.value() or server_transport.value():
        to_global, to_zone = client_transport.value(), server_transport.value()
        client_transport.clear()
        server_transport.clear()
        server.dataReceived(to_global)
        client.dataReceived(to_zone)
    assert zone.zone.table.version == glob.table.version == 1

    other, _other_transport = glob.server()
    many = [("default", f"svc-{i:05d}") for i in range(CHUNK_ITEMS + 500)]
    glob.hub.step_keys = len(many)  # one version, applied at once
    other.dataReceived(
        hello("zone-2") + b"".join(encode(m) for m in inventory_messages(many, size=1000))
    )
    pushed = frames(server_transport.value())
    assert len(pushed) == 2  # the change, in two parts
    client.dataReceived(pushed[0])
    server_transport.clear()
    server.dataReceived(client_transport.value())  # the zone's ack of what it got
    client.connectionLost(Failure(ConnectionDone()))
    server.connectionLost(Failure(ConnectionDone()))

    connect(glob, zone)
    assert zone.zone.table.version == glob.table.version
    served_count = len(zone.zone.snapshot.entries)
    assert len(glob.table.rows()) == len(many) + 1
    assert served_count == len(many) + 1, f"the zone serves {served_count} of {len(many) + 1}"
    assert not any(e.provisional for e in zone.zone.snapshot.entries)


def test_a_zone_holding_another_global_table_gets_a_full_table() -> None:
    clock = Clock()
    old = Global(clock, table_id="old-table")
    one = ZoneEnd(clock, make_zone("zone-1", "redis"))
    client, _server, pump = connect(old, one)
    disconnect(client, pump)
    new = Global(clock, table_id="new-table")
    new.table.receive_inventory("zone-2", Inventory(True, 0, True, (("default", "db"),)), 0.0)
    one.recording.clear()
    connect(new, one)
    assert new.sessions[0].messages[0].table_id == "old-table"
    first = one.recording.of(TableUpdate)[0]
    assert first.full
    assert one.zone.table_id == "new-table"
    assert set(served(one.zone)) == {"db", "redis"}
    assert one.zone.table.version == new.table.version


def test_a_change_the_zone_cannot_apply_makes_it_ask_for_a_full_table() -> None:
    clock = Clock()
    zone = ZoneEnd(clock, make_zone("zone-1", "redis"))
    proto = zone.factory().buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    assert sent(transport)[0] == Hello("zone-1", 0, "", *CIDRS)
    proto.dataReceived(encode(Welcome(5, TABLE_ID)) + encode(TableUpdate(5, 0, True)))
    assert zone.zone.table.version == 5
    transport.clear()
    proto.dataReceived(encode(TableUpdate(7, 6, False, 0, True, (), ())))  # base 6, holds 5
    (error,) = sent(transport)
    assert isinstance(error, Error)
    assert transport.disconnecting
    assert zone.zone.table.version == 5
    proto.connectionLost(Failure(ConnectionDone()))
    second = zone.factory().buildProtocol(None)
    transport = StringTransport()
    second.makeConnection(transport)
    # It claims no table at all, so that the global sends the whole one.
    assert sent(transport)[0] == Hello("zone-1", 0, "", *CIDRS)


def test_a_table_before_welcome_closes_the_zone_side() -> None:
    clock = Clock()
    zone = ZoneEnd(clock, make_zone("zone-1", "redis"))
    proto = zone.factory().buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    transport.clear()
    proto.dataReceived(encode(TableUpdate(5, 0, True)))
    assert [type(m) for m in sent(transport)] == [Error]
    assert transport.disconnecting
    assert zone.zone.table.version == 0


# -- heartbeats and silence -------------------------------------------------------


def test_both_sides_send_heartbeats_and_stay_connected() -> None:
    clock = Clock()
    glob = Global(clock)
    zone = ZoneEnd(clock, make_zone("zone-1", "redis"))
    client, server, pump = connect(glob, zone)
    pings_before = len(zone.recording.of(Ping)), len(glob.sessions[0].of(Ping))
    assert pings_before == (0, 0)
    clock.advance(HEARTBEAT - 0.5)
    pump.flush()
    assert len(zone.recording.of(Ping)) == 0
    clock.advance(0.5)
    pump.flush()
    assert len(zone.recording.of(Ping)) == 1
    assert len(glob.sessions[0].of(Ping)) == 1
    for _ in range(20):
        clock.advance(HEARTBEAT)
        pump.flush()
    assert len(zone.recording.of(Ping)) == 21
    assert len(glob.sessions[0].of(Ping)) == 21
    assert not client.closed and not server.closed
    assert not client.transport.disconnecting and not server.transport.disconnecting
    assert glob.hub.sessions.keys() == {"zone-1"}


def test_heartbeats_stop_when_the_connection_is_lost() -> None:
    clock = Clock()
    glob = Global(clock)
    zone = ZoneEnd(clock, make_zone("zone-1", "redis"))
    client, _server, pump = connect(glob, zone)
    disconnect(client, pump)
    assert clock.getDelayedCalls() == []


class Silent(Protocol):
    """A peer that says hello, then nothing."""

    def __init__(self, greeting: bytes) -> None:
        self.greeting = greeting
        self.received = b""

    def connectionMade(self) -> None:
        self.transport.write(self.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.received += data


def test_the_global_drops_a_silent_zone() -> None:
    clock = Clock()
    glob = Global(clock)
    factory = glob.factory()
    peer, server, pump = connectedServerAndClient(
        lambda: factory.buildProtocol(None), lambda: Silent(hello()), clock=clock
    )
    assert glob.hub.sessions.keys() == {"zone-1"}
    for _ in range(int(SILENCE / HEARTBEAT)):
        clock.advance(HEARTBEAT)
        pump.flush()
    # Silent for exactly SILENCE seconds: still there, and pinged all along.
    assert not server.transport.disconnecting
    pings = [m for m in FrameDecoder().feed(peer.received) if isinstance(m, Ping)]
    assert len(pings) == int(SILENCE / HEARTBEAT)
    clock.advance(HEARTBEAT)
    pump.flush()
    assert server.closed
    assert glob.hub.sessions == {}
    assert not glob.table.zones["zone-1"].connected
    assert glob.table.zones["zone-1"].last_contact == clock.seconds()


def test_a_zone_drops_a_silent_global() -> None:
    clock = Clock()
    zone = ZoneEnd(clock, make_zone("zone-1", "redis"))
    proto = zone.factory().buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(encode(Welcome(0, TABLE_ID)))
    clock.advance(SILENCE)
    assert not transport.disconnecting
    clock.advance(HEARTBEAT)
    assert transport.disconnecting
    assert proto.closed


def test_a_busy_global_does_not_drop_a_zone_whose_heartbeat_it_has_not_read_yet() -> None:
    """The global's reactor held for longer than the silence (a long piece of work):
    the first beat after it runs before the sockets are read, and must not judge."""
    clock = MemoryReactorClock()
    glob = Global(clock)
    proto, transport = glob.server()
    proto.dataReceived(hello())
    clock.advance(HEARTBEAT)
    clock.advance(SILENCE * 2)  # held: the zone's pings wait in the socket, unread
    assert not transport.disconnecting
    proto.dataReceived(encode(Ping()))  # read once the reactor runs again
    clock.advance(HEARTBEAT)
    assert not transport.disconnecting
    # A zone that really is silent is still dropped, a beat later than otherwise.
    for _ in range(int(SILENCE / HEARTBEAT) + 1):
        clock.advance(HEARTBEAT)
    assert transport.disconnecting


def test_anything_heard_resets_the_silence() -> None:
    clock = MemoryReactorClock()
    glob = Global(clock)
    proto, transport = glob.server()
    proto.dataReceived(hello())
    for _ in range(10):
        clock.advance(SILENCE - 1)
        proto.dataReceived(encode(Ping()))
        assert not transport.disconnecting
    heard = clock.seconds()
    while not transport.disconnecting:
        clock.advance(HEARTBEAT)
    assert SILENCE < clock.seconds() - heard <= SILENCE + HEARTBEAT


# -- refusals ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        Inventory(True, 0, True, (("default", "redis"),)),
        Ack(1),
        Ping(),
        Welcome(1, "x"),
        TableUpdate(1, 0, True),
        Error("x"),
    ],
    ids=lambda message: message.kind,
)
def test_a_message_before_hello_closes_with_an_error(message: Message) -> None:
    glob = Global(Clock())
    proto, transport = glob.server()
    proto.dataReceived(encode(message) + hello())  # the hello after it is not looked at
    messages = sent(transport)
    assert len(messages) == 1 and isinstance(messages[0], Error)
    assert messages[0].message == f"expected hello, got {message.kind}"
    assert transport.disconnecting
    assert glob.hub.sessions == {}
    assert "zone-1" not in glob.table.zones
    proto.connectionLost(Failure(ConnectionDone()))
    assert glob.refused("before-hello") == 1


@pytest.mark.parametrize(
    "message",
    [Hello("zone-1", 0, "", *CIDRS), Welcome(1, "x"), TableUpdate(1, 0, True)],
    ids=lambda message: message.kind,
)
def test_a_kind_the_global_does_not_take_from_a_zone_closes_it(message: Message) -> None:
    glob = Global(Clock())
    proto, transport = glob.server()
    proto.dataReceived(hello())
    transport.clear()
    proto.dataReceived(encode(message))
    assert sent(transport) == [Error(f"unexpected {message.kind} from a zone")]
    assert transport.disconnecting
    proto.connectionLost(Failure(ConnectionDone()))
    assert glob.hub.sessions == {}
    assert not glob.table.zones["zone-1"].connected


@pytest.mark.parametrize(
    "message",
    [Hello("zone-1"), Inventory(True), Ack(1)],
    ids=lambda message: message.kind,
)
def test_a_kind_a_zone_does_not_take_from_the_global_closes_it(message: Message) -> None:
    zone = ZoneEnd(Clock(), make_zone("zone-1", "redis"))
    proto = zone.factory().buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(encode(Welcome(0, TABLE_ID)))
    transport.clear()
    proto.dataReceived(encode(message))
    assert sent(transport) == [Error(f"unexpected {message.kind} from the global")]
    assert transport.disconnecting
    assert zone.recording.messages == [Welcome(0, TABLE_ID)]


def test_messages_are_counted_by_kind_capitalized() -> None:
    zone = ZoneEnd(Clock(), make_zone("zone-1", "redis"))
    proto = zone.factory().buildProtocol(None)
    proto.makeConnection(StringTransport())  # sends a hello and an inventory
    for message in (Ack(1), Ping(), Welcome(1), TableUpdate(1, 0, True), Error("x")):
        proto.send(message)
    proto.dataReceived(encode(Welcome(0, TABLE_ID)) + encode(Ping()))
    (family,) = [m for m in zone.registry.collect() if m.name == "kumazone_sync_messages"]
    counted = {
        (sample.labels["direction"], sample.labels["type"]): sample.value
        for sample in family.samples
        if sample.name == "kumazone_sync_messages_total" and sample.labels["zone"] == "zone-1"
    }
    out = ["Hello", "Inventory", "Ack", "Ping", "Welcome", "Table", "Error"]
    assert counted == {
        **{("out", kind): 1.0 for kind in out},
        ("in", "Welcome"): 1.0,
        ("in", "Ping"): 1.0,
    }


@pytest.mark.parametrize(
    "data",
    [
        struct.pack("!I", MAX_FRAME + 1),
        b"\xff\xff\xff\xff",
        struct.pack("!I", 9) + b"{not json",
        struct.pack("!I", 3) + b"\xff\xfe\xfd",
        struct.pack("!I", 13) + b'{"v":2,"t":1}',
        struct.pack("!I", 15) + b'{"v":1,"t":"x"}',
    ],
    ids=["too-large", "huge", "bad-json", "not-utf8", "version", "unknown-type"],
)
def test_a_bad_frame_closes_with_an_error(data: bytes) -> None:
    glob = Global(Clock())
    proto, transport = glob.server()
    proto.dataReceived(data)
    messages = sent(transport)
    assert len(messages) == 1 and isinstance(messages[0], Error)
    assert "protocol error" in messages[0].message
    assert transport.disconnecting
    assert glob.refused("protocol") == 1


def test_a_bad_frame_after_hello_closes_with_an_error() -> None:
    glob = Global(Clock())
    proto, transport = glob.server()
    proto.dataReceived(hello())
    transport.clear()
    proto.dataReceived(struct.pack("!I", 5) + b"{bad}")
    assert [type(m) for m in sent(transport)] == [Error]
    assert transport.disconnecting
    proto.connectionLost(Failure(ConnectionDone()))
    assert glob.hub.sessions == {}
    assert not glob.table.zones["zone-1"].connected


def test_nothing_is_sent_or_handled_after_closing() -> None:
    glob = Global(Clock())
    proto, transport = glob.server()
    proto.dataReceived(encode(Ping()))
    transport.clear()
    proto.dataReceived(hello())
    proto.send(Ping())
    assert transport.value() == b""
    assert glob.hub.sessions == {}


def test_a_table_from_a_zone_is_refused() -> None:
    glob = Global(Clock())
    proto, transport = glob.server()
    proto.dataReceived(hello())
    transport.clear()
    proto.dataReceived(encode(TableUpdate(1, 0, True)))
    assert [type(m) for m in sent(transport)] == [Error]
    assert transport.disconnecting


def test_certificates_required_refuses_a_plain_transport() -> None:
    glob = Global(Clock(), require_certificates=True)
    proto, transport = glob.server()
    assert not hasattr(transport, "getPeerCertificate")
    proto.dataReceived(hello())
    messages = sent(transport)
    assert len(messages) == 1 and isinstance(messages[0], Error)
    assert "certificate" in messages[0].message
    assert transport.disconnecting
    assert glob.hub.sessions == {}
    assert "zone-1" not in glob.table.zones
    assert glob.persisted.calls == []
    assert glob.refused("no-certificate") == 1


def test_certificates_required_refuses_a_real_zone_over_plain_tcp() -> None:
    clock = Clock()
    glob = Global(clock, require_certificates=True)
    zone = ZoneEnd(clock, make_zone("zone-1", "redis"))
    client, _server, _pump = connect(glob, zone)
    assert [type(m) for m in zone.recording.messages] == [Error]
    assert client.closed
    assert zone.zone.table_id == ""
    assert served(zone.zone)["redis"][2] is True  # still served, provisionally


@pytest.mark.parametrize(
    ("cidr", "cidr6"),
    [("10.0.0.0/8", CIDRS[1]), (CIDRS[0], "fd00::/64"), ("", ""), ("10.0.0.0/8", "fd00::/64")],
)
def test_a_hello_whose_cidrs_differ_is_refused(cidr: str, cidr6: str) -> None:
    glob = Global(Clock())
    proto, transport = glob.server()
    proto.dataReceived(encode(Hello("zone-1", 0, "", cidr, cidr6)))
    messages = sent(transport)
    assert len(messages) == 1 and isinstance(messages[0], Error)
    assert "VIP ranges differ" in messages[0].message
    assert transport.disconnecting
    assert glob.hub.sessions == {}
    assert glob.refused("cidr") == 1


def test_a_zone_configured_with_another_range_is_refused() -> None:
    clock = Clock()
    glob = Global(clock)
    other = load_config(None, {"KUMA_DNS_SERVER_CIDR": "10.0.0.0/8"})
    zone = ZoneEnd(clock, make_zone("zone-1", "redis", config=other))
    client, _server, _pump = connect(glob, zone)
    (error,) = zone.recording.messages
    assert isinstance(error, Error)
    assert "10.0.0.0/8" in error.message and CIDRS[0] in error.message
    assert client.closed
    assert glob.hub.sessions == {}
    assert zone.zone.table_id == ""


def test_a_second_connection_from_the_same_zone_replaces_the_first() -> None:
    glob = Global(Clock())
    first, first_transport = glob.server()
    first.dataReceived(hello() + encode(Inventory(True, 0, True, (("default", "a"),))))
    second, second_transport = glob.server()
    first_transport.clear()
    second.dataReceived(hello() + encode(Inventory(True, 0, True, (("default", "b"),))))
    (error,) = sent(first_transport)
    assert isinstance(error, Error) and "replaced" in error.message
    assert first_transport.disconnecting
    assert not second_transport.disconnecting
    assert glob.hub.sessions["zone-1"].proto is second
    # The old connection going away later does not mark the zone disconnected.
    first.connectionLost(Failure(ConnectionDone()))
    assert glob.hub.sessions["zone-1"].proto is second
    assert glob.table.zones["zone-1"].connected
    assert glob.table.zones["zone-1"].services == {ServiceKey("default", "b")}
    # The new one still works.
    second_transport.clear()
    second.dataReceived(encode(Inventory(False, 0, True, (("default", "c"),), ())))
    tables = [m for m in sent(second_transport) if isinstance(m, TableUpdate)]
    assert [r.service for r in tables[-1].upsert] == ["c"]


def test_a_restarted_zone_replaces_its_old_connection() -> None:
    # The zone restarted; the global has not noticed its old connection is gone.
    clock = Clock()
    glob = Global(clock)
    old = ZoneEnd(clock, make_zone("zone-1", "redis"))
    client_old, _server_old, pump_old = connect(glob, old)
    new = ZoneEnd(clock, make_zone("zone-1", "redis", "web"))
    client_new, server_new, pump_new = connect(glob, new)
    pump_old.flush()
    assert isinstance(old.recording.messages[-1], Error)
    assert "replaced" in old.recording.messages[-1].message
    assert client_old.closed and old.recording.lost
    assert not client_new.closed and not new.recording.lost
    assert glob.hub.sessions["zone-1"].proto is server_new
    assert glob.table.zones["zone-1"].connected
    pump_new.flush()
    assert set(served(new.zone)) == {"redis", "web"}
    assert not any(provisional for _vip, _zones, provisional in served(new.zone).values())
    assert glob.table.zones["zone-1"].acked == glob.table.version


# -- TLS, in memory ---------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    make_certs(out, ["localhost", "127.0.0.1"], ["zone-1", "zone-2"])
    return out


def files(certs: Path, stem: str) -> TLSFiles:
    return TLSFiles(
        str(certs / f"{stem}.pem"), str(certs / f"{stem}-key.pem"), str(certs / "ca.pem")
    )


def connect_tls(glob: Global, zone: ZoneEnd, certs: Path, certificate: str) -> IOPump:
    server_tls = TLSMemoryBIOFactory(
        server_options(files(certs, "global")), False, glob.factory(), clock=glob.clock
    )
    client_tls = TLSMemoryBIOFactory(
        client_options(files(certs, certificate), "localhost"),
        True,
        zone.factory(),
        clock=glob.clock,
    )
    _client, _server, pump = connectedServerAndClient(
        lambda: server_tls.buildProtocol(None),
        lambda: client_tls.buildProtocol(None),
        clock=glob.clock,
    )
    return pump


def test_tls_zone_with_its_own_certificate_is_welcome(certs: Path) -> None:
    clock = Clock()
    glob = Global(clock, require_certificates=True)
    zone = ZoneEnd(clock, make_zone("zone-1", "redis"))
    connect_tls(glob, zone, certs, "zone-1")
    assert isinstance(zone.recording.messages[0], Welcome)
    assert glob.hub.sessions.keys() == {"zone-1"}
    assert zone.zone.table.version == glob.table.version > 0
    assert served(zone.zone)["redis"][2] is False


def test_tls_zone_claiming_another_zone_is_refused(certs: Path) -> None:
    clock = Clock()
    glob = Global(clock, require_certificates=True)
    zone = ZoneEnd(clock, make_zone("zone-2", "redis"))
    connect_tls(glob, zone, certs, "zone-1")
    (error,) = zone.recording.messages
    assert isinstance(error, Error)
    assert "zone-2" in error.message and "certificate" in error.message
    (client,) = zone.recording.protos
    assert client.closed and zone.recording.lost
    assert glob.hub.sessions == {}
    assert "zone-2" not in glob.table.zones
    assert glob.refused("wrong-zone") == 1
    assert zone.zone.table_id == ""


# -- provisional VIPs: short TTL, the zone's own hold-downs ---------------------------


def test_a_provisional_vip_is_served_with_a_short_ttl_until_the_global_confirms_it() -> None:
    from twisted.names import dns

    from kumazone.dns.authority import PROVISIONAL_TTL, MeshAuthority

    clock = Clock()
    zone = make_zone("zone-1", "redis")
    authority = MeshAuthority(CONFIG)
    authority.update(zone.snapshot)
    (answer,), _authority, _additional = authority.resolve(b"redis.mesh", dns.A, dns.IN)
    assert answer.ttl == PROVISIONAL_TTL == 5
    glob = Global(clock)
    connect(glob, ZoneEnd(clock, zone))
    authority.update(zone.snapshot)
    (answer,), _authority, _additional = authority.resolve(b"redis.mesh", dns.A, dns.IN)
    assert answer.ttl == CONFIG.ttl


def test_a_dropped_provisional_vip_is_held_back_from_other_services() -> None:
    from kumazone.core.federation import FederatedView

    vip_range = VipRange(CONFIG.cidr, CONFIG.cidr6)
    view = FederatedView(vip_range, hold_down=HOLD_DOWN)
    first = ServiceKey("default", "first")
    view.reconcile({first}, 0.0)
    offset = view.provisional[first]
    view.reconcile(set(), 1.0)
    assert view.holds[offset].key == first
    # Another service whose candidate is that VIP moves on; the same one gets it back.
    assert view._place(ServiceKey("default", "other"), set()) != offset
    view.reconcile({first}, 2.0)
    assert view.provisional[first] == offset
    view.reconcile(set(), 3.0)
    view.reconcile(set(), 3.0 + HOLD_DOWN + 1)
    assert view.holds == {}


# -- after a refusal, a zone waits ------------------------------------------------------


def test_a_refused_zone_waits_longer_each_time_and_as_long_as_the_global_asks() -> None:
    clock = Clock()
    zone = ZoneEnd(clock, make_zone("zone-1", "web"))
    sync = zone.sync
    assert sync.retry_delay(0.5) == 0.5
    waits = []
    for _ in range(8):
        sync.error_received(cast(Any, None), Error("refused: no"))
        waits.append(sync.retry_delay(0.5))
    assert waits == [5, 10, 20, 40, 80, 160, 300, 300]
    sync.refusals = 0
    sync.error_received(cast(Any, None), Error("refused: lately: retry in 120 s"))
    assert sync.retry_delay(0.5) == 120
    clock.advance(100)
    assert sync.retry_delay(0.5) == 20
    clock.advance(30)
    assert sync.retry_delay(0.5) == 0.5


def test_a_zone_refused_after_hello_is_refused_at_once_while_it_cools_down() -> None:
    clock = Clock()
    glob = Global(clock)
    proto, transport = glob.server()
    proto.dataReceived(hello() + encode(Inventory(True, 0, True, (("default", "no spaces"),))))
    assert "retry in 5 s" in next(m for m in sent(transport) if isinstance(m, Error)).message
    proto, transport = glob.server()
    proto.dataReceived(hello())
    assert [type(m) for m in sent(transport)] == [Error]  # no welcome, no table
    assert glob.refused("cooling-down") == 1
    clock.advance(5)
    proto, transport = glob.server()
    proto.dataReceived(hello() + encode(Inventory(True, 0, True, (("default", "web"),))))
    assert sent(transport)[0].kind == "welcome" and not any(
        isinstance(m, Error) for m in sent(transport)
    )


def test_a_side_that_sent_within_half_a_beat_sends_no_ping() -> None:
    clock = Clock()
    glob = Global(clock)
    zone = ZoneEnd(clock, make_zone("zone-1", "redis"))
    _client, server, pump = connect(glob, zone)
    clock.advance(HEARTBEAT - 1)
    pump.flush()
    server.send(Ping())  # anything the global sends, a second before its beat
    pump.flush()
    before = len(zone.recording.of(Ping))
    clock.advance(1)
    pump.flush()
    assert len(zone.recording.of(Ping)) == before  # the beat sent nothing more
    clock.advance(HEARTBEAT)
    pump.flush()
    assert len(zone.recording.of(Ping)) == before + 1  # an idle beat: a ping


def test_an_error_that_is_not_a_refusal_costs_no_wait() -> None:
    clock = Clock()
    sync = ZoneEnd(clock, make_zone("zone-1", "web")).sync
    for message in (
        "refused: the global cannot store it (disk full)",
        "the global cannot send its table: boom",
        "replaced by a new connection from the same zone",
    ):
        sync.error_received(cast(Any, None), Error(message))
        assert sync.retry_delay(0.5) == 0.5 and sync.refusals == 0


# -- the collector while a big table or inventory is applied in slices -------------------


class RecordedPause(CollectorPause):
    """A CollectorPause that records, at each call, whether the collector was on after it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, bool]] = []

    def pause(self) -> None:
        super().pause()
        self.calls.append(("pause", gc.isenabled()))

    def resume(self, freeze: bool = True) -> None:
        super().resume(freeze)
        self.calls.append(("resume", gc.isenabled()))


def test_the_collector_is_off_while_a_big_table_is_followed_and_frozen_after() -> None:
    """A full collection walks every object made so far: none while the zone
    follows a big update (more than FOLLOW_KEYS rows), and what it made is
    frozen once it serves it whole."""
    clock = Clock()
    glob = Global(clock)
    connect(glob, ZoneEnd(clock, make_zone("zone-2", *[f"web-{i}" for i in range(600)])))
    one = ZoneEnd(clock, make_zone("zone-1", "redis"))
    recorded = one.sync._collector = RecordedPause()
    frozen = gc.get_freeze_count()
    try:
        connect(glob, one)
        for _ in range(5):
            clock.advance(0)
        assert one.zone.table.version == glob.table.version
        assert glob.table.zones["zone-1"].acked == glob.table.version
        assert recorded.calls[0] == ("pause", False)
        assert recorded.calls[-1] == ("resume", True)
        assert gc.isenabled() and gc.get_freeze_count() > frozen
    finally:
        gc.enable()
        gc.unfreeze()


def test_the_collector_waits_while_a_whole_table_comes_in_parts_until_the_connection_goes() -> None:
    """Between the parts of a whole table the collector is off (their rows are
    long-lived); a connection lost before the last part turns it back on."""
    clock = Clock()
    glob = Global(clock)
    one = ZoneEnd(clock, make_zone("zone-1", "redis"))
    recorded = one.sync._collector = RecordedPause()
    try:
        client, _server, pump = connect(glob, one)
        clock.advance(0)
        assert gc.isenabled()
        rows = [Row("default", f"svc-{i:02d}", 100 + i, ("zone-2",), 1) for i in range(30)]
        first, *_rest = table_messages(glob.table.version + 1, 0, True, rows, size=10)
        one.sync.table_received(client, first)
        assert not gc.isenabled()
        disconnect(client, pump)
        assert gc.isenabled()
        assert recorded.calls[-2:] == [("pause", False), ("resume", True)]
    finally:
        gc.enable()


def test_the_collector_is_off_while_the_global_steps_an_inventory() -> None:
    clock = Clock()
    glob = Global(clock)
    glob.hub.step_keys = 2
    recorded = glob.hub._collector = RecordedPause()
    try:
        connect(glob, ZoneEnd(clock, make_zone("zone-2", *[f"web-{i}" for i in range(5)])))
        for _ in range(5):
            clock.advance(0)
        assert glob.table.stepping() == []
        assert len(glob.table.zones["zone-2"].services) == 5
        assert recorded.calls[0] == ("pause", False)
        assert recorded.calls[-1] == ("resume", True)
        assert gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()


def test_a_collector_already_off_is_left_off() -> None:
    pause = CollectorPause()
    gc.disable()
    try:
        pause.pause()
        assert not pause.paused
        pause.resume()
        assert not gc.isenabled()
    finally:
        gc.enable()


# -- a zone's replicas: acknowledged once stored, and the leader's connections -------


class Durable:
    """A replica's C{when_durable}: each call waits until the test says it is stored."""

    def __init__(self) -> None:
        self.waiting: list[Any] = []

    def __call__(self) -> Any:
        from twisted.internet.defer import Deferred

        waiter: Deferred[None] = Deferred()
        self.waiting.append(waiter)
        return waiter

    def store(self) -> None:
        waiting, self.waiting = self.waiting, []
        for waiter in waiting:
            waiter.callback(None)

    def fail(self) -> None:
        from kumazone.core.storage import StoreError

        waiting, self.waiting = self.waiting, []
        for waiter in waiting:
            waiter.errback(Failure(StoreError("the change was not stored")))


def replica_end(clock: Clock, zone: Zone, durable: Durable) -> ZoneEnd:
    end = ZoneEnd(clock, zone)
    end.sync = ZoneSync(zone, clock, end.metrics, durable=durable)
    end.recording = Recording(end.sync)
    return end


def test_a_replica_acknowledges_a_version_only_once_it_is_stored() -> None:
    clock = Clock()
    glob = Global(clock)
    durable = Durable()
    zone = replica_end(clock, make_zone("zone-1", "web"), durable)
    _client, _server, pump = connect(glob, zone)
    acks = lambda: [m for m in glob.sessions[0].messages if isinstance(m, Ack)]  # noqa: E731
    assert durable.waiting and not acks()  # applied, not yet stored: not acknowledged
    assert glob.table.zones["zone-1"].acked != glob.table.version
    durable.store()
    pump.flush()
    assert [m.version for m in acks()][-1] == zone.zone.table.version
    # A change the replica could not store is never acknowledged.
    glob.table.receive_inventory("zone-2", Inventory(True, 0, True, (("default", "db"),)), 0.0)
    glob.hub.changed(glob.table.reconcile(0.0), ["zone-2"], [])
    pump.flush()
    before = len(acks())
    assert durable.waiting
    durable.fail()
    pump.flush()
    assert len(acks()) == before


def test_a_late_close_of_an_old_connection_leaves_the_new_one_alone() -> None:
    clock = Clock()
    glob = Global(clock)
    zone = ZoneEnd(clock, make_zone("zone-1", "web"))
    old, _server, _pump = connect(glob, zone)
    new, _server2, _pump2 = connect(glob, zone)  # e.g. the replica led again at once
    assert zone.sync.proto is new and zone.sync.global_table_id is not None
    zone.sync.disconnected(old, Failure(ConnectionDone()))  # the old one's close comes late
    assert zone.sync.proto is new
    assert zone.sync.global_table_id is not None
    assert zone.sync.connected_since is not None
    assert zone.registry.get_sample_value("kumazone_sync_connected", {"zone": "zone-1"}) == 1


def test_a_zone_that_follows_its_leader_applies_no_table_from_the_global() -> None:
    clock = Clock()
    glob = Global(clock)
    zone = ZoneEnd(clock, make_zone("zone-1", "web"))
    client, _server, pump = connect(glob, zone)
    version = zone.zone.table.version
    zone.zone.following = True  # stepped down; this connection's close is on its way
    glob.table.receive_inventory("zone-2", Inventory(True, 0, True, (("default", "db"),)), 0.0)
    glob.hub.changed(glob.table.reconcile(0.0), ["zone-2"], [])
    pump.flush()
    assert zone.zone.table.version == version
    assert client.closed
