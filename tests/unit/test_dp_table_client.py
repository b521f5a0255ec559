"""The dataplane's sync handler over a L{SyncProtocol}: hello, welcome, tables, acks.

The zone is played by hand: its messages are encoded into the protocol, and what
the dataplane sends is decoded from a L{StringTransport}.  Time is a L{Clock}.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from kumazone.core.messages import (
    DpAck,
    DpHello,
    DpRow,
    DpTable,
    DpWelcome,
    Error,
    FrameDecoder,
    Message,
    encode,
)
from kumazone.dataplane.client import ACK_DELAY, DataplaneClient
from kumazone.dataplane.metrics import DataplaneMetrics
from kumazone.dataplane.table import DataplaneTable
from kumazone.sync.metrics import SyncMetrics
from kumazone.sync.protocol import SyncProtocol


def welcome(table_id: str = "t1", domain: str = "mesh", mesh: str = "default") -> DpWelcome:
    return DpWelcome(mesh, "web-1", 3, table_id, domain, "240.0.0.0/4", "fd00:fd00::/64", 60)


class Harness:
    """One dataplane client; each L{connect} is a new connection to the zone."""

    def __init__(self) -> None:
        self.clock = Clock()
        registry = CollectorRegistry()
        self.metrics = DataplaneMetrics(registry)
        self.sync_metrics = SyncMetrics(registry)
        self.table = DataplaneTable("default")
        self.client = DataplaneClient(
            self.table, "web-1", self.clock, self.metrics, "127.0.0.1:5678"
        )

    def connect(self) -> tuple[SyncProtocol, StringTransport]:
        proto = SyncProtocol(self.client, self.clock, self.sync_metrics)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def gauge(self, name: str) -> float:
        return float(getattr(self.metrics, name)._value.get())


def sent(transport: StringTransport) -> list[Message]:
    messages = list(FrameDecoder().feed(transport.value()))
    transport.clear()
    return messages


def zone_says(proto: SyncProtocol, *messages: Message) -> None:
    proto.dataReceived(b"".join(encode(m) for m in messages))


def test_hello_claims_nothing_at_first_then_the_table_held() -> None:
    harness = Harness()
    proto, transport = harness.connect()
    assert sent(transport) == [DpHello("default", "web-1", 0, "")]
    zone_says(proto, welcome(), DpTable(3, 0, True, 0, True, (DpRow("redis", 7),)))
    assert sent(transport) == [DpAck(3)]
    assert harness.table.loaded and harness.table.version == 3
    assert harness.client.connected_since == 0.0
    assert harness.client.last_table_at == 0.0
    assert (harness.gauge("connected"), harness.gauge("table_version")) == (1, 3)
    harness.clock.advance(2)
    zone_says(proto, DpTable(5, 3, False, 0, True, (DpRow("web", 8),)))
    # A change is acknowledged ACK_DELAY later, with the changes that follow it.
    assert sent(transport) == []
    harness.clock.advance(ACK_DELAY / 2)
    zone_says(proto, DpTable(6, 5, False, 0, True, (DpRow("db", 9),)))
    assert sent(transport) == []
    harness.clock.advance(ACK_DELAY / 2)
    assert sent(transport) == [DpAck(6)]
    assert harness.client.last_table_at == 2.0 + ACK_DELAY / 2
    proto.connectionLost(Failure(ConnectionError("gone")))
    assert harness.gauge("connected") == 0
    assert harness.client.connected_since is None
    _proto, transport = harness.connect()
    assert sent(transport) == [DpHello("default", "web-1", 6, "t1")]


def test_parts_are_acknowledged_once_whole() -> None:
    harness = Harness()
    proto, transport = harness.connect()
    sent(transport)
    zone_says(proto, welcome(), DpTable(3, 0, True, 0, False, (DpRow("a", 1),)))
    assert sent(transport) == []
    zone_says(proto, DpTable(3, 0, True, 1, True, (DpRow("b", 2),)))
    assert sent(transport) == [DpAck(3)]
    assert len(harness.table.entries) == 2


def test_a_change_it_cannot_apply_closes_and_the_next_hello_claims_nothing() -> None:
    harness = Harness()
    proto, transport = harness.connect()
    zone_says(proto, welcome(), DpTable(3, 0, True, 0, True, (DpRow("a", 1),)))
    sent(transport)
    zone_says(proto, DpTable(9, 8, False, 0, True))
    (error,) = sent(transport)
    assert isinstance(error, Error)
    assert "from version 8" in error.message and "whole table" in error.message
    assert transport.disconnecting
    proto.connectionLost(Failure(ConnectionError("closed")))
    _proto, transport = harness.connect()
    assert sent(transport) == [DpHello("default", "web-1", 0, "")]
    assert harness.table.version == 3  # still served meanwhile


def test_a_table_before_the_welcome_is_a_protocol_failure() -> None:
    harness = Harness()
    proto, transport = harness.connect()
    sent(transport)
    zone_says(proto, DpTable(3, 0, True))
    (error,) = sent(transport)
    assert isinstance(error, Error) and "before the welcome" in error.message
    assert not harness.table.loaded


def test_a_welcome_of_another_mesh_is_refused() -> None:
    harness = Harness()
    proto, transport = harness.connect()
    sent(transport)
    zone_says(proto, welcome(mesh="other"))
    (error,) = sent(transport)
    assert isinstance(error, Error) and "'other'" in error.message
    assert harness.gauge("connected") == 0


def test_other_settings_reconnect_for_the_whole_table() -> None:
    harness = Harness()
    proto, transport = harness.connect()
    zone_says(proto, welcome(), DpTable(3, 0, True, 0, True, (DpRow("a", 1),)))
    proto.connectionLost(Failure(ConnectionError("gone")))
    proto, transport = harness.connect()
    assert sent(transport) == [DpHello("default", "web-1", 3, "t1")]
    zone_says(proto, welcome(domain="mesh.internal"))
    assert sent(transport) == []  # no error: this side just asks again
    assert transport.disconnecting
    proto.connectionLost(Failure(ConnectionError("closed")))
    proto, transport = harness.connect()
    assert sent(transport) == [DpHello("default", "web-1", 0, "")]
    zone_says(
        proto, welcome(domain="mesh.internal"), DpTable(4, 0, True, 0, True, (DpRow("a", 1),))
    )
    assert sent(transport) == [DpAck(4)]
    assert [e.names for e in harness.table.entries] == [("a.mesh.internal",)]


def test_an_error_from_the_zone_is_logged() -> None:
    harness = Harness()
    lines: list[str] = []
    harness.client._log_failure = lines.append
    proto, _transport = harness.connect()
    zone_says(proto, Error("certificate names another mesh"))
    assert lines == [
        "the zone at 127.0.0.1:5678 refused this dataplane: certificate names another mesh"
    ]
