"""Tests for L{kumazone.sync.dataplane_side}: the zone's dataplane port, in memory.

A real L{Zone} over SQLite in memory; dataplane connections are L{SyncProtocol}s
over L{StringTransport}s driven by hand, or (TLS) L{twisted.test.iosim} pumps with
real certificates from L{make_certs}.  Time is a L{Clock}.  No sockets.
"""

from __future__ import annotations

import bisect
import json
import time
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.base import DelayedCall
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient
from twisted.web.server import Site

from kumazone.core.config import DnsServerConfig, load_config
from kumazone.core.messages import (
    DpAck,
    DpHello,
    DpRow,
    DpTable,
    DpWelcome,
    Error,
    FrameDecoder,
    Hello,
    Message,
    Ping,
    encode,
)
from kumazone.core.names import names_from_forms
from kumazone.core.resources import Resource
from kumazone.core.vips import VipRange
from kumazone.core.zone import Zone, ZoneChange
from kumazone.metrics import Metrics
from kumazone.store.sqlite import SQLiteStore
from kumazone.sync.certs import make_certs
from kumazone.sync.dataplane_side import (
    DataplaneHub,
    DataplaneLimits,
    DataplaneMetrics,
    DataplaneSession,
)
from kumazone.sync.metrics import SyncMetrics
from kumazone.sync.protocol import (
    DATAPLANE_HEARTBEAT as HEARTBEAT,
)
from kumazone.sync.protocol import (
    DATAPLANE_SILENCE as SILENCE,
)
from kumazone.sync.protocol import (
    SyncFactory,
    SyncProtocol,
)
from kumazone.sync.tls import TLSFiles, client_options, server_options
from kumazone.web.api import ApiResource
from tests.builders import dataplane_resource

CONFIG = load_config(None, {})
NAMESERVERS = ("192.0.2.53",)
FILE = "/resources/services.yaml"


# -- helpers ----------------------------------------------------------------------


class Services:
    """A zone's resources file, one Dataplane per (mesh, service), changed at will."""

    def __init__(self, zone: Zone, clock: Clock) -> None:
        self.zone = zone
        self.clock = clock
        self.services: dict[tuple[str, str], Resource] = {}

    def set(
        self,
        *keys: tuple[str, str],
        remove: tuple[tuple[str, str], ...] = (),
        advance: bool = True,
    ) -> None:
        """Add C{keys}, remove C{remove}; C{advance}: one second passes first (and
        with it, every reactor turn that was due)."""
        for mesh, service in keys:
            self.services[(mesh, service)] = dataplane_resource(
                f"{mesh}-{service}-dp".replace("_", "-"), service, mesh=mesh
            )
        for key in remove:
            del self.services[key]
        if advance:
            self.clock.advance(1)
        self.zone.set_file(FILE, list(self.services.values()), self.clock.seconds())


class Zoned:
    """A zone, its hub, and what the hub's metrics say."""

    def __init__(
        self,
        *services: tuple[str, str],
        limits: DataplaneLimits | None = None,
        require_certificates: bool = False,
        federated: bool = False,
        config: DnsServerConfig = CONFIG,
        clock: Clock | None = None,
    ) -> None:
        self.clock = clock or Clock()
        self.zone = Zone("zone-1", config, SQLiteStore(":memory:"), federated=federated)
        self.files = Services(self.zone, self.clock)
        if services:
            self.files.set(*services)
        self.registry = CollectorRegistry()
        self.sync_metrics = SyncMetrics(self.registry)
        self.hub = DataplaneHub(
            self.zone,
            self.clock,
            DataplaneMetrics(self.registry),
            self.sync_metrics,
            config,
            NAMESERVERS,
            require_certificates=require_certificates,
            limits=limits,
        )

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def refused(self, reason: str) -> float:
        return self.metric("kumazone_dataplane_refused_total", reason=reason)

    def connect(self, mesh: str = "default", name: str = "dp-1", **hello: Any) -> Dataplane:
        dataplane = Dataplane(self)
        if mesh is not None:
            dataplane.hello(mesh, name, **hello)
        return dataplane


class Dataplane:
    """One dataplane connection over a StringTransport; reads what the zone sent."""

    def __init__(self, zoned: Zoned) -> None:
        self.zoned = zoned
        self.proto = zoned.hub.factory().buildProtocol(None)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.decoder = FrameDecoder()

    @property
    def session(self) -> DataplaneSession:
        handler = self.proto.handler
        assert isinstance(handler, DataplaneSession)
        return handler

    def hello(self, mesh: str, name: str, have: int = 0, table_id: str = "") -> None:
        self.send(DpHello(mesh, name, have, table_id))

    def send(self, message: Message) -> None:
        self.proto.dataReceived(encode(message))

    def octets(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def read(self) -> list[Message]:
        return list(self.decoder.feed(self.octets()))

    def tables(self) -> list[DpTable]:
        messages = self.read()
        assert all(isinstance(m, DpTable) for m in messages), messages
        return messages  # type: ignore[return-value]

    def lose(self) -> None:
        self.proto.connectionLost(Failure(ConnectionDone()))


def welcome_and_table(dataplane: Dataplane) -> tuple[DpWelcome, list[DpTable]]:
    messages = dataplane.read()
    welcome, *tables = messages
    assert isinstance(welcome, DpWelcome), messages
    assert all(isinstance(t, DpTable) for t in tables), messages
    return welcome, tables  # type: ignore[return-value]


def rows_of(zone: Zone, mesh: str) -> dict[str, DpRow]:
    """The rows a dataplane of C{mesh} must hold, from the zone's entries."""
    vip_range = VipRange(CONFIG.cidr, CONFIG.cidr6)
    rows = {}
    for entry in zone.snapshot.entries:
        if entry.key.mesh != mesh:
            continue
        # Offsets count from the address after the network's (a /4: never /31 or /32).
        offset = int(IPv4Address(entry.vip)) - int(CONFIG.cidr.network_address) - 1
        assert vip_range.ipv4_text(offset) == entry.vip
        from kumazone.core.names import name_forms

        forms = name_forms(entry.key.service, CONFIG.domain, entry.names)
        rows[entry.key.service] = DpRow(entry.key.service, offset, forms, entry.provisional)
    return rows


def held(tables: list[DpTable], start: dict[str, DpRow] | None = None) -> dict[str, DpRow]:
    """What a dataplane holds after applying C{tables} to C{start}."""
    rows = dict(start or {})
    for table in tables:
        if table.full and table.part == 0:
            rows = {}
        for service in table.remove:
            rows.pop(service, None)
        for row in table.upsert:
            rows[row.service] = row
    return rows


# -- hello, welcome, table -----------------------------------------------------------


def test_hello_gets_the_welcome_and_its_mesh_table_only() -> None:
    zoned = Zoned(("default", "redis"), ("default", "echo_server_svc"), ("payments", "ledger"))
    dataplane = zoned.connect("default", "web-1")
    welcome, tables = welcome_and_table(dataplane)
    version = zoned.zone.snapshot.version
    assert welcome == DpWelcome(
        "default",
        "web-1",
        version,
        zoned.hub.table_id,
        "mesh",
        "240.0.0.0/4",
        "fd00:fd00::/64",
        60,
        NAMESERVERS,
    )
    (table,) = tables
    assert table.full and table.last and table.version == version
    assert held(tables) == rows_of(zoned.zone, "default")
    assert {row.service for row in table.upsert} == {"redis", "echo_server_svc"}
    # The forms give the zone's names back, the offset its VIPs.
    vip_range = VipRange(CONFIG.cidr, CONFIG.cidr6)
    for entry in zoned.zone.snapshot.entries:
        if entry.key.mesh == "default":
            row = held(tables)[entry.key.service]
            assert names_from_forms(row.service, "mesh", row.forms) == entry.names
            assert vip_range.ipv4_text(row.offset) == entry.vip
            assert vip_range.ipv6_text(row.offset) == entry.vip6
    assert zoned.hub.sessions.keys() == {("default", "web-1")}
    assert zoned.metric("kumazone_dataplanes_connected", mesh="default") == 1
    assert zoned.metric("kumazone_dataplane_tables_total", how="full") == 1
    assert dataplane.session.sent_version == version


def test_a_dataplane_of_a_mesh_without_services_gets_an_empty_table() -> None:
    zoned = Zoned(("default", "redis"))
    _welcome, tables = welcome_and_table(zoned.connect("empty-mesh", "dp"))
    assert tables == [DpTable(zoned.zone.snapshot.version, 0, True)]


def test_a_service_added_is_one_small_table_and_other_meshes_get_the_version() -> None:
    zoned = Zoned(("default", "redis"), ("payments", "ledger"))
    mine = zoned.connect("default", "web-1")
    other = zoned.connect("payments", "pay-1")
    mine.read(), other.read()
    before = zoned.zone.snapshot.version
    zoned.files.set(("default", "web"))
    after = zoned.zone.snapshot.version
    assert after > before
    octets = mine.octets()
    assert len(octets) < 200, len(octets)
    (table,) = FrameDecoder().feed(octets)
    assert isinstance(table, DpTable)
    assert (table.version, table.base, table.full, table.remove) == (after, before, False, ())
    assert table.upsert == (rows_of(zoned.zone, "default")["web"],)
    # A change in another mesh: only the SOA serial moved.
    assert other.tables() == [DpTable(after, before, False)]
    assert mine.session.sent_version == other.session.sent_version == after
    assert zoned.metric("kumazone_sync_bytes_total", zone="dataplane", direction="out") > 0


def test_a_service_removed_is_a_removal() -> None:
    zoned = Zoned(("default", "redis"), ("default", "web"))
    dataplane = zoned.connect()
    start = held(welcome_and_table(dataplane)[1])
    zoned.files.set(remove=(("default", "web"),))
    (table,) = dataplane.tables()
    assert table.remove == ("web",) and table.upsert == ()
    assert held([table], start) == rows_of(zoned.zone, "default")


def test_every_dataplane_of_a_mesh_gets_the_same_octets() -> None:
    zoned = Zoned(("default", "redis"))
    dataplanes = [zoned.connect("default", f"dp-{i}") for i in range(5)]
    for dataplane in dataplanes:
        dataplane.read()
    zoned.files.set(("default", "web"))
    sent = {dataplane.octets() for dataplane in dataplanes}
    assert len(sent) == 1 and sent != {b""}


def test_a_change_that_changes_no_row_sends_nothing() -> None:
    zoned = Zoned(("default", "redis"))
    dataplane = zoned.connect()
    dataplane.read()
    # Another Dataplane of the same service: the inventory changed, the table did not.
    zoned.files.services[("default", "redis-2")] = dataplane_resource("redis-2", "redis")
    zoned.files.set()
    assert dataplane.read() == []


def test_a_change_of_only_the_zones_a_service_is_in_sends_no_row() -> None:
    # (In a federated zone: the global's row says another zone has the service too.
    # The hub keeps no rows: it tells the two apart from the entries themselves.)
    zoned = Zoned(("default", "redis"))
    dataplane = zoned.connect()
    dataplane.read()
    (entry,) = zoned.zone.snapshot.entries
    snapshot = zoned.zone.snapshot
    zoned.hub.apply(
        ZoneChange(snapshot, removed=(entry,), added=(entry.replace(zones=("zone-1", "zone-2")),))
    )
    assert dataplane.read() == []
    zoned.hub.apply(
        ZoneChange(snapshot, removed=(entry,), added=(entry.replace(provisional=True),))
    )
    (table,) = dataplane.tables()
    assert [(r.service, r.provisional) for r in table.upsert] == [("redis", True)]


# -- acks ----------------------------------------------------------------------------


def test_an_ack_records_the_version_held() -> None:
    zoned = Zoned(("default", "redis"))
    dataplane = zoned.connect()
    dataplane.read()
    version = zoned.zone.snapshot.version
    dataplane.send(DpAck(version))
    assert dataplane.session.acked == version
    dataplane.send(DpAck(version + 5))
    (error,) = dataplane.read()
    assert isinstance(error, Error) and "never sent" in error.message
    assert zoned.refused("bad-ack") == 1 and dataplane.proto.closed


# -- reconnecting: only what changed ---------------------------------------------------


def reconnect(zoned: Zoned, have: int, table_id: str, mesh: str = "default") -> list[DpTable]:
    dataplane = zoned.connect(mesh, "dp-again", have=have, table_id=table_id)
    return welcome_and_table(dataplane)[1]


def test_a_dataplane_that_reconnects_gets_only_what_changed_since_its_version() -> None:
    steady = [("default", f"steady-{i}") for i in range(5)]
    zoned = Zoned(("default", "redis"), ("default", "old"), ("payments", "ledger"), *steady)
    first = zoned.connect()
    start = held(welcome_and_table(first)[1])
    have, table_id = zoned.zone.snapshot.version, zoned.hub.table_id
    first.lose()
    zoned.files.set(("default", "web"))
    zoned.files.set(("default", "db"), remove=(("default", "old"),))
    zoned.files.set(("payments", "more"))  # another mesh: nothing to send
    zoned.files.set(("default", "tmp"))
    zoned.files.set(remove=(("default", "tmp"), ("default", "db")))
    tables = reconnect(zoned, have, table_id)
    (table,) = tables
    assert not table.full and table.base == have and table.version == zoned.zone.snapshot.version
    # Collapsed: each service touched once, as it is now.
    assert [row.service for row in table.upsert] == ["web"]
    assert sorted(table.remove) == ["db", "old", "tmp"]
    assert held(tables, start) == rows_of(zoned.zone, "default")
    assert zoned.metric("kumazone_dataplane_tables_total", how="changes") == 1


def test_a_dataplane_holding_the_current_version_gets_nothing_new() -> None:
    zoned = Zoned(("default", "redis"))
    zoned.connect().lose()
    version = zoned.zone.snapshot.version
    zoned.files.set(("payments", "ledger"))  # moves the version, not this mesh
    assert reconnect(zoned, version, zoned.hub.table_id) == [
        DpTable(zoned.zone.snapshot.version, version, False)
    ]
    current = zoned.zone.snapshot.version
    assert reconnect(zoned, current, zoned.hub.table_id) == [DpTable(current, current, False)]
    assert zoned.metric("kumazone_dataplane_tables_total", how="current") == 1


@pytest.mark.parametrize(
    "hello",
    [
        {"table_id": "another table"},
        {"table_id": ""},
        {"have": 10_000},  # ahead of the zone: from another table
    ],
)
def test_a_dataplane_of_another_table_gets_its_mesh_whole(hello: dict[str, Any]) -> None:
    zoned = Zoned(("default", "redis"), ("default", "web"))
    fields = {"have": zoned.zone.snapshot.version, "table_id": zoned.hub.table_id, **hello}
    tables = reconnect(zoned, fields["have"], fields["table_id"])
    assert tables[0].full and held(tables) == rows_of(zoned.zone, "default")


def test_a_dataplane_behind_the_change_log_gets_its_mesh_whole() -> None:
    zoned = Zoned(("default", "redis"), limits=DataplaneLimits(log_touches=3))
    zoned.connect().lose()
    old, table_id = zoned.zone.snapshot.version, zoned.hub.table_id
    for service in ("a", "b", "c"):
        zoned.files.set(("default", service))
    middle = zoned.zone.snapshot.version
    zoned.files.set(("default", "d"))
    # The log holds the last three touches (b, c, d): from before b, it is whole.
    tables = reconnect(zoned, old, table_id)
    assert tables[0].full and held(tables) == rows_of(zoned.zone, "default")
    assert len(tables[0].upsert) == 5
    tables = reconnect(zoned, middle - 1, table_id)
    assert not tables[0].full and [r.service for r in tables[0].upsert] == ["c", "d"]


def test_resumed_tables_are_encoded_once_per_version_held() -> None:
    zoned = Zoned(("default", "redis"))
    zoned.connect().lose()
    have, table_id = zoned.zone.snapshot.version, zoned.hub.table_id
    zoned.files.set(("default", "web"))
    first, how = zoned.hub.table_for("default", have, table_id)
    again, _how = zoned.hub.table_for("default", have, table_id)
    assert how == "changes"
    assert first is again  # one encoding for a reconnect storm
    zoned.files.set(("default", "db"))
    assert zoned.hub.table_for("default", have, table_id)[0] is not first


def test_provisional_changes_at_one_version_reach_a_dataplane_that_reconnects() -> None:
    """Federated, the version is the global's: a provisional VIP does not move it."""
    zoned = Zoned(("default", "redis"), federated=True)
    first = zoned.connect()
    start = held(welcome_and_table(first)[1])
    assert start["redis"].provisional
    have, table_id = zoned.zone.snapshot.version, zoned.hub.table_id
    zoned.files.set(("default", "web"))
    assert zoned.zone.snapshot.version == have  # same version, one row more
    (table,) = first.tables()
    assert (table.version, table.base) == (have, have)
    assert [r.service for r in table.upsert] == ["web"] and table.upsert[0].provisional
    first.lose()
    tables = reconnect(zoned, have, table_id)
    assert held(tables, start) == rows_of(zoned.zone, "default")


# -- the whole table again -------------------------------------------------------------


def test_a_full_change_sends_every_dataplane_its_mesh_whole() -> None:
    zoned = Zoned(("default", "redis"), ("payments", "ledger"))
    one, two = zoned.connect("default", "a"), zoned.connect("payments", "b")
    one.read(), two.read()
    table_id = zoned.hub.table_id
    zoned.hub.apply(ZoneChange(zoned.zone.snapshot, full=True))
    assert held(one.tables()) == rows_of(zoned.zone, "default")
    assert held(two.tables()) == rows_of(zoned.zone, "payments")
    # The same versions again under this id could be another table's: a new id.
    assert zoned.hub.table_id != table_id
    tables = reconnect(zoned, zoned.zone.snapshot.version, table_id)
    assert tables[0].full


# -- fan-out over reactor turns ----------------------------------------------------------


def test_a_fan_out_is_spread_over_reactor_turns_in_order() -> None:
    zoned = Zoned(("default", "redis"), limits=DataplaneLimits(fanout_batch=3))
    dataplanes = [zoned.connect("default", f"dp-{i}") for i in range(8)]
    for dataplane in dataplanes:
        dataplane.read()
    first_version = zoned.zone.snapshot.version
    zoned.files.set(("default", "a"), advance=False)
    zoned.files.set(("default", "b"), advance=False)
    got = [len(dataplane.tables()) for dataplane in dataplanes]
    assert got == [1, 1, 1, 0, 0, 0, 0, 0]  # the first batch at once
    assert zoned.hub.backlog == 5 + 8
    received: list[list[DpTable]] = [[] for _ in dataplanes]
    for _turn in range(10):
        zoned.clock.advance(0)
        for index, dataplane in enumerate(dataplanes):
            received[index] += dataplane.tables()
    assert zoned.hub.backlog == 0
    for index, tables in enumerate(received):
        versions = [(t.base, t.version) for t in tables]
        if index < 3:
            assert versions == [(first_version + 1, first_version + 2)]
        else:
            assert versions == [
                (first_version, first_version + 1),
                (first_version + 1, first_version + 2),
            ]


def test_a_dataplane_connecting_during_a_fan_out_gets_the_table_as_it_is() -> None:
    zoned = Zoned(("default", "redis"), limits=DataplaneLimits(fanout_batch=1))
    early = [zoned.connect("default", f"dp-{i}") for i in range(3)]
    for dataplane in early:
        dataplane.read()
    zoned.files.set(("default", "a"), advance=False)
    late = zoned.connect("default", "late")
    welcome, tables = welcome_and_table(late)
    assert welcome.version == zoned.zone.snapshot.version
    assert held(tables) == rows_of(zoned.zone, "default")
    zoned.clock.advance(0)
    zoned.clock.advance(0)
    assert late.read() == []  # not in the queued change
    assert all(d.session.sent_version == zoned.zone.snapshot.version for d in early)


def turn(clock: Clock) -> None:
    """One reactor turn: the calls due now, not those they schedule for now."""
    due = [call for call in clock.calls if call.getTime() <= clock.seconds()]
    for call in due:
        clock.calls.remove(call)
        call.called = True
        call.func(*call.args, **call.kw)


class SortedClock(Clock):
    """A Clock that keeps its calls sorted as they come (Clock sorts them all at each
    call, which at 10,000 heartbeats is the cost of the test, not of the hub).

    A call reset or delayed is not moved: the tests using it do neither.
    """

    def callLater(self, delay: float, callable: Any, *args: Any, **kw: Any) -> Any:
        call = DelayedCall(
            self.seconds() + delay, callable, args, kw, self.calls.remove, lambda c: None,
            self.seconds,
        )  # fmt: skip
        bisect.insort(self.calls, call, key=lambda c: c.getTime())
        return call

    def _sortCalls(self) -> None:
        pass


def test_ten_thousand_dataplanes_cost_a_few_milliseconds_per_turn() -> None:
    zoned = Zoned(("default", "redis"), ("payments", "ledger"), clock=SortedClock())
    dataplanes = [
        zoned.connect("default" if i % 2 else "payments", f"dp-{i}") for i in range(10_000)
    ]
    for dataplane in dataplanes:
        dataplane.transport.clear()
    started = time.perf_counter()
    zoned.files.set(("default", "web"), advance=False)
    turns = [time.perf_counter() - started]
    while zoned.hub.backlog:
        started = time.perf_counter()
        turn(zoned.clock)
        turns.append(time.perf_counter() - started)
    assert len(turns) == 20  # 500 sessions a turn
    # Generous for a loaded machine: about 2 ms a turn where nothing else runs.
    assert max(turns) < 0.05, turns
    assert all(len(d.transport.value()) > 0 for d in dataplanes)
    sizes = {len(d.transport.value()) for d in dataplanes}
    assert len(sizes) == 2  # one message for each mesh


# -- identity without TLS ------------------------------------------------------------


@pytest.mark.parametrize(
    ("mesh", "name"),
    [("", "dp"), ("default", ""), ("bad mesh", "dp"), ("default", "a/b"), ("m" * 64, "dp")],
)
def test_without_tls_a_hello_must_name_a_dataplane(mesh: str, name: str) -> None:
    zoned = Zoned(("default", "redis"))
    dataplane = zoned.connect(mesh, name)
    (error,) = dataplane.read()
    assert isinstance(error, Error) and "not a dataplane's mesh and name" in error.message
    assert dataplane.proto.closed and zoned.hub.sessions == {}
    assert zoned.refused("bad-name") == 1
    dataplane.lose()
    assert zoned.refused("before-hello") == 0  # counted once, as refused


def test_a_hub_that_requires_certificates_refuses_a_connection_without_tls() -> None:
    zoned = Zoned(("default", "redis"), require_certificates=True)
    dataplane = zoned.connect()
    (error,) = dataplane.read()
    assert isinstance(error, Error) and "certificate" in error.message
    assert zoned.refused("no-certificate") == 1


def test_anything_before_hello_is_refused() -> None:
    zoned = Zoned()
    dataplane = Dataplane(zoned)
    dataplane.send(Hello("zone-1"))
    (error,) = dataplane.read()
    assert isinstance(error, Error) and "expected dphello" in error.message
    dataplane.lose()
    assert zoned.refused("before-hello") == 1


def test_a_second_hello_is_refused() -> None:
    zoned = Zoned()
    dataplane = zoned.connect()
    dataplane.read()
    dataplane.hello("default", "dp-1")
    (error,) = dataplane.read()
    assert isinstance(error, Error) and "unexpected dphello" in error.message


def test_a_new_connection_of_a_dataplane_replaces_the_old() -> None:
    zoned = Zoned(("default", "redis"))
    old = zoned.connect("default", "dp-1")
    new = zoned.connect("default", "dp-1")
    assert old.proto.closed and not new.proto.closed
    assert zoned.hub.sessions[("default", "dp-1")] is new.session
    old.lose()
    assert zoned.hub.sessions[("default", "dp-1")] is new.session
    assert zoned.metric("kumazone_dataplanes_connected", mesh="default") == 1
    new.lose()
    assert zoned.hub.sessions == {} and len(zoned.hub.listing) == 0
    assert (
        zoned.registry.get_sample_value("kumazone_dataplanes_connected", {"mesh": "default"})
        is None
    )


def test_past_the_most_sessions_a_dataplane_is_refused() -> None:
    zoned = Zoned(limits=DataplaneLimits(max_sessions=2))
    zoned.connect("default", "a"), zoned.connect("default", "b")
    third = zoned.connect("default", "c")
    assert isinstance(third.read()[0], Error) and zoned.refused("too-many") == 1
    again = zoned.connect("default", "a")  # a dataplane reconnecting still may
    assert isinstance(again.read()[0], DpWelcome)


def test_pings_past_the_rate_are_refused() -> None:
    zoned = Zoned(limits=DataplaneLimits(max_messages_per_second=2))
    dataplane = zoned.connect()
    dataplane.read()
    for _ in range(5):
        dataplane.send(Ping())
    assert isinstance(dataplane.read()[-1], Error) and zoned.refused("rate") == 1


# -- heartbeats and slow readers --------------------------------------------------------


def test_heartbeats_and_a_silent_dataplane_is_dropped() -> None:
    zoned = Zoned()
    dataplane = zoned.connect()
    dataplane.read()
    zoned.clock.advance(HEARTBEAT)
    assert dataplane.read() == [Ping()]
    for _ in range(int(SILENCE / HEARTBEAT) + 1):
        zoned.clock.advance(HEARTBEAT)
    assert dataplane.transport.disconnecting or dataplane.proto.closed
    dataplane.lose()
    assert zoned.refused("silent") == 1 and zoned.hub.sessions == {}


def test_a_dataplane_that_does_not_read_is_dropped_past_its_bound() -> None:
    zoned = Zoned(("default", "redis"), limits=DataplaneLimits(max_pending_octets=2000))
    slow, fine = zoned.connect("default", "slow"), zoned.connect("default", "fine")
    slow.read(), fine.read()
    slow.proto.pauseProducing()  # what the transport does when the peer does not read
    for index in range(40):
        zoned.files.set(("default", f"service-{index}"), advance=False)
        zoned.clock.advance(0.2)  # 8 s in all: within the silence timeout, the rate
        fine.read()
        slow.send(Ping())  # it still talks, it only does not read
        fine.send(Ping())
    assert slow.proto.closed and not fine.proto.closed
    assert zoned.refused("slow-reader") == 1
    assert slow.transport.value()  # what it was sent before the bound
    slow.lose()
    assert zoned.hub.sessions.keys() == {("default", "fine")}


# -- TLS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    make_certs(
        out,
        ["global.example"],
        ["zone-1"],
        zone_hosts=["127.0.0.1", "zone-1.example"],
        dataplanes=["default/web-1", "payments/pay-1"],
    )
    make_certs(out / "other", [], ["zone-1"], dataplanes=["default/web-1"])
    return out


def files(certs: Path, stem: str) -> TLSFiles:
    return TLSFiles(
        str(certs / f"{stem}.pem"), str(certs / f"{stem}-key.pem"), str(certs / "ca.pem")
    )


class Recorder:
    """A dataplane's side, minimal: says hello on connect, records what comes."""

    peer_role = "the zone"
    awaiting = None

    def __init__(self, hello: DpHello) -> None:
        self.hello = hello
        self.messages: list[Message] = []
        self.lost: list[Failure] = []

    def connected(self, proto: SyncProtocol) -> None:
        proto.send(self.hello)

    def disconnected(self, proto: SyncProtocol, reason: Failure) -> None:
        self.lost.append(reason)

    def __getattr__(self, name: str) -> Any:
        if name.endswith("_received"):
            return lambda proto, message: self.messages.append(message)
        raise AttributeError(name)


def connect_tls(
    zoned: Zoned, certs: Path, client: TLSFiles, hello: DpHello, hostname: str = "127.0.0.1"
) -> tuple[Recorder, IOPump]:
    """A dataplane's TLS connection to the zone (certificate zone-1.pem) in memory."""
    server_files = files(certs, "zone-1")
    server = TLSMemoryBIOFactory(
        server_options(server_files), False, zoned.hub.factory(), clock=zoned.clock
    )
    recorder = Recorder(hello)
    client_factory = SyncFactory(lambda: recorder, zoned.clock, SyncMetrics(CollectorRegistry()))
    client_tls = TLSMemoryBIOFactory(
        client_options(client, hostname), True, client_factory, clock=zoned.clock
    )
    _c, _s, pump = connectedServerAndClient(
        lambda: server.buildProtocol(None),
        lambda: client_tls.buildProtocol(None),
        clock=zoned.clock,
    )
    pump.flush()
    return recorder, pump


def test_tls_the_mesh_and_name_come_from_the_certificate(certs: Path) -> None:
    zoned = Zoned(("default", "redis"), ("payments", "ledger"), require_certificates=True)
    recorder, _pump = connect_tls(zoned, certs, files(certs, "dp-default-web-1"), DpHello())
    welcome, *tables = recorder.messages
    assert isinstance(welcome, DpWelcome) and (welcome.mesh, welcome.name) == ("default", "web-1")
    assert held(tables) == rows_of(zoned.zone, "default")  # type: ignore[arg-type]
    assert zoned.hub.sessions.keys() == {("default", "web-1")}
    # The same, naming itself in the hello.
    recorder, _pump = connect_tls(
        zoned, certs, files(certs, "dp-payments-pay-1"), DpHello("payments", "pay-1")
    )
    assert isinstance(recorder.messages[0], DpWelcome)
    assert held(recorder.messages[1:]) == rows_of(zoned.zone, "payments")  # type: ignore[arg-type]


def test_tls_the_zone_is_checked_by_its_host(certs: Path) -> None:
    zoned = Zoned(require_certificates=True)
    recorder, _pump = connect_tls(
        zoned, certs, files(certs, "dp-default-web-1"), DpHello(), hostname="zone-1.example"
    )
    assert isinstance(recorder.messages[0], DpWelcome)
    recorder, _pump = connect_tls(
        zoned, certs, files(certs, "dp-default-web-1"), DpHello(), hostname="elsewhere.example"
    )
    assert recorder.messages == [] and recorder.lost


def test_tls_a_hello_naming_another_dataplane_is_refused(certs: Path) -> None:
    zoned = Zoned(("default", "redis"), require_certificates=True)
    recorder, _pump = connect_tls(
        zoned, certs, files(certs, "dp-default-web-1"), DpHello("payments", "web-1")
    )
    (error,) = recorder.messages
    assert isinstance(error, Error) and "default/web-1" in error.message
    assert zoned.refused("wrong-identity") == 1 and zoned.hub.sessions == {}


def test_tls_a_zone_certificate_is_no_dataplane(certs: Path) -> None:
    zoned = Zoned(("default", "redis"), require_certificates=True)
    recorder, _pump = connect_tls(
        zoned, certs, files(certs, "zone-1"), DpHello("default", "zone-1")
    )
    (error,) = recorder.messages
    assert isinstance(error, Error) and "names no dataplane" in error.message
    assert zoned.refused("no-identity") == 1 and zoned.hub.sessions == {}


def test_tls_a_certificate_of_another_ca_fails_the_handshake(certs: Path) -> None:
    zoned = Zoned(("default", "redis"), require_certificates=True)
    other = TLSFiles(
        str(certs / "other" / "dp-default-web-1.pem"),
        str(certs / "other" / "dp-default-web-1-key.pem"),
        str(certs / "ca.pem"),  # it trusts the zone; the zone does not trust it
    )
    recorder, pump = connect_tls(zoned, certs, other, DpHello())
    pump.flush()
    assert recorder.messages == [] and zoned.hub.sessions == {}
    assert zoned.refused("tls") == 1


def test_a_dataplane_certificate_cannot_pass_as_a_zone_at_the_global(certs: Path) -> None:
    from kumazone.core.federation import MergedTable
    from kumazone.sync.global_side import GlobalHub

    clock = Clock()
    registry = CollectorRegistry()
    metrics = SyncMetrics(registry)
    hub = GlobalHub(
        MergedTable(VipRange(CONFIG.cidr, CONFIG.cidr6), 3600.0),
        "table",
        (str(CONFIG.cidr), str(CONFIG.cidr6)),
        lambda *args: None,
        clock,
        metrics,
        require_certificates=True,
    )
    server = TLSMemoryBIOFactory(
        server_options(files(certs, "global")),
        False,
        SyncFactory(hub.session, clock, metrics),
        clock=clock,
    )
    for zone in ("default", "web-1", "default/web-1"):
        recorder = Recorder(Hello(zone, cidr=str(CONFIG.cidr), cidr6=str(CONFIG.cidr6)))  # type: ignore[arg-type]
        client_tls = TLSMemoryBIOFactory(
            client_options(files(certs, "dp-default-web-1"), "global.example"),
            True,
            SyncFactory(lambda r=recorder: r, clock, SyncMetrics(CollectorRegistry())),  # type: ignore[misc]
            clock=clock,
        )
        _c, _s, pump = connectedServerAndClient(
            lambda: server.buildProtocol(None),
            lambda c=client_tls: c.buildProtocol(None),  # type: ignore[misc]
            clock=clock,
        )
        pump.flush()
        (error,) = recorder.messages
        assert isinstance(error, Error), recorder.messages
        assert hub.sessions == {}
    assert (
        registry.get_sample_value("kumazone_sync_refused_total", {"reason": "wrong-zone"}) or 0
    ) + (registry.get_sample_value("kumazone_sync_refused_total", {"reason": "bad-name"}) or 0) == 3


# -- the API ----------------------------------------------------------------------------


def get(site: Site, path: str) -> tuple[int, Any]:
    channel = site.buildProtocol(None)
    assert channel is not None
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(
        f"GET {path} HTTP/1.1\r\nHost: kumazone\r\nConnection: close\r\n\r\n".encode()
    )
    channel.connectionLost(Failure(ConnectionDone()))
    head, _, body = transport.value().partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_the_api_lists_the_dataplanes_connected_a_page_at_a_time() -> None:
    zoned = Zoned(("default", "redis"), ("payments", "ledger"))
    zoned.clock.advance(1_700_000_000)
    dataplanes = [zoned.connect("default", f"dp-{i}") for i in range(3)]
    dataplanes.append(zoned.connect("payments", "pay-1"))
    version = zoned.zone.snapshot.version
    dataplanes[0].send(DpAck(version))
    site = Site(ApiResource(zoned.zone, Metrics("zone-1"), zoned.clock, dataplanes=zoned.hub))
    status, document = get(site, "/dataplanes/connected?size=2")
    assert status == 200
    assert document["total"] == 4 and document["listening"] is True
    assert document["next"] == "http://kumazone/dataplanes/connected?size=2&offset=2"
    assert document["items"] == [
        {
            "mesh": "default",
            "name": "dp-0",
            "address": "192.168.1.1",
            "version": version,
            "sentVersion": version,
            "connectedSince": "2023-11-14T22:13:21+00:00",
        },
        {
            "mesh": "default",
            "name": "dp-1",
            "address": "192.168.1.1",
            "version": None,
            "sentVersion": version,
            "connectedSince": "2023-11-14T22:13:21+00:00",
        },
    ]
    _status, document = get(site, "/dataplanes/connected?mesh=payments")
    assert [(i["mesh"], i["name"]) for i in document["items"]] == [("payments", "pay-1")]
    assert document["total"] == 1 and document["next"] is None
    dataplanes[3].lose()
    assert get(site, "/dataplanes/connected?mesh=payments")[1]["total"] == 0
    assert get(site, "/dataplanes/connected?size=0")[0] == 400


def test_the_api_says_when_the_dataplane_port_is_off() -> None:
    zoned = Zoned()
    site = Site(ApiResource(zoned.zone, Metrics("zone-1"), zoned.clock))
    assert get(site, "/dataplanes/connected") == (
        200,
        {"total": 0, "items": [], "next": None, "listening": False},
    )
