"""Tests for what one zone may ask of the global (L{kumazone.core.limits}) and how the
global's sync refuses the rest, in memory: a bad message costs its zone a refusal
and nothing else; the store and every other zone see nothing of it.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from kumazone.core.config import DnsServerConfig
from kumazone.core.federation import Federation, MergedTable, ZoneRecord
from kumazone.core.limits import ZoneLimits, ZoneRefused
from kumazone.core.messages import MAX_NUMBER, Ack, Error, Inventory, Ping, TableUpdate, encode
from kumazone.core.storage import StoreChanges, StoreError
from kumazone.core.vips import ServiceKey, VipRange
from kumazone.store.sqlite import SQLiteStore
from kumazone.sync.global_side import GlobalHub
from kumazone.sync.protocol import CLOSE_GRACE, SILENCE, SyncFactory, SyncProtocol
from kumazone.tap import Options
from tests.unit.test_sync import CIDRS, CONFIG, HOLD_DOWN, TABLE_ID, Global, hello, sent

HUGE = "s" * 600_000


def inventory(*services: str, full: bool = True, part: int = 0, last: bool = True) -> bytes:
    return encode(Inventory(full, part, last, tuple(("default", s) for s in services)))


def connected(glob: Global, zone: str, *services: str) -> tuple[SyncProtocol, StringTransport]:
    proto, transport = glob.server()
    proto.dataReceived(hello(zone) + inventory(*services))
    assert not transport.disconnecting, sent(transport)
    transport.clear()
    return proto, transport


def errors(transport: StringTransport) -> list[str]:
    return [m.message for m in sent(transport) if isinstance(m, Error)]


def tables(transport: StringTransport) -> list[TableUpdate]:
    return [m for m in sent(transport) if isinstance(m, TableUpdate)]


def limited_global(clock: Clock, **limits: Any) -> Global:
    glob = Global(clock)
    glob.hub.limits = ZoneLimits(**limits)
    return glob


# -- bad items: refused, counted, nothing kept, nobody else affected ---------------


@pytest.mark.parametrize(
    ("mesh", "service", "why"),
    [
        ("default", HUGE, "at most 1024 characters, is 600000"),
        ("default", "é" * 300, "characters outside"),
        ("default", "web service", "characters outside"),
        ("-bad-", "web", "not a valid name"),
        ("m" * 64, "web", "at most 63 characters"),
    ],
)
def test_an_item_a_resource_could_not_name_is_refused_whole(
    mesh: str, service: str, why: str
) -> None:
    clock = Clock()
    glob = Global(clock)
    other, other_transport = connected(glob, "zone-2", "db")
    proto, transport = connected(glob, "zone-1", "redis")
    other_transport.clear()
    rows, version = glob.table.rows(), glob.table.version
    calls = len(glob.persisted.calls)
    add = (("default", "web"), (mesh, service))
    proto.dataReceived(encode(Inventory(False, 0, True, add)))
    (message,) = errors(transport)
    assert message.startswith("refused: add[1].") and why in message
    assert transport.disconnecting
    assert glob.refused("bad-service") == 1
    # Nothing of it kept (not even the good item beside it), stored or pushed.
    assert glob.table.rows() == rows and glob.table.version == version
    assert glob.table.zones["zone-1"].services == {ServiceKey("default", "redis")}
    assert len(glob.persisted.calls) == calls
    assert tables(other_transport) == []
    # The other zone's changes go on as before.
    other.dataReceived(inventory("db", "cache", full=False))
    (update,) = tables(other_transport)
    assert [r.service for r in update.upsert] == ["cache"]


def test_a_closed_session_takes_nothing_more_and_is_cut_after_a_grace() -> None:
    clock = Clock()
    glob = Global(clock)
    proto, transport = connected(glob, "zone-1", "redis")
    proto.dataReceived(inventory(HUGE, full=False))
    assert proto.closed
    proto.dataReceived(inventory("web", full=False) * 50)
    assert glob.table.zones["zone-1"].services == {ServiceKey("default", "redis")}
    assert not transport.disconnected
    clock.advance(CLOSE_GRACE)
    assert transport.disconnected  # aborted: a peer that never reads cannot keep it open


def test_stored_services_that_no_longer_validate_are_dropped_at_start(tmp_path: Any) -> None:
    path = str(tmp_path / "global.sqlite3")
    store = SQLiteStore(path)
    Federation(DnsServerConfig(), store, "t-1")
    bad = {ServiceKey("default", HUGE), ServiceKey("default", "web")}
    store.commit(
        StoreChanges(
            zones_put=(ZoneRecord("zone-1"),),
            zone_services_added=tuple(("zone-1", key) for key in sorted(bad)),
        )
    )
    warnings: list[str] = []
    federation = Federation(DnsServerConfig(), store, "t-2", warn=warnings.append)
    assert federation.merged.zones["zone-1"].services == {ServiceKey("default", "web")}
    assert federation.cleaned_zones == ["zone-1"]
    assert "1 stored service(s) are not valid names" in warnings[0]


# -- numbers -----------------------------------------------------------------------


def test_an_ack_of_a_version_never_sent_is_refused() -> None:
    clock = Clock()
    glob = Global(clock)
    proto, transport = connected(glob, "zone-1", "redis")
    proto.dataReceived(encode(Ack(glob.table.version + 5)))
    assert "ack of table version" in errors(transport)[0]
    assert glob.refused("bad-ack") == 1
    assert glob.table.zones["zone-1"].acked == 0


def test_an_ack_beyond_a_stored_integer_is_a_protocol_error() -> None:
    clock = Clock()
    glob = Global(clock)
    proto, transport = connected(glob, "zone-1", "redis")
    body = b'{"v":3,"t":"ack","version":18446744073709551616}'
    proto.dataReceived(struct.pack("!I", len(body)) + body)
    assert "must be an integer" in errors(transport)[0]
    assert glob.table.zones["zone-1"].acked == 0


def test_merged_table_refuses_an_ack_ahead_of_it() -> None:
    table = MergedTable(VipRange(CONFIG.cidr, CONFIG.cidr6), HOLD_DOWN)
    with pytest.raises(ZoneRefused):
        table.acknowledge("zone-1", MAX_NUMBER, 0.0)


# -- limits ------------------------------------------------------------------------


def test_more_services_than_the_limit_are_refused() -> None:
    clock = Clock()
    glob = limited_global(clock, max_services=3)
    proto, transport = connected(glob, "zone-1", "a", "b")
    proto.dataReceived(inventory("c", "d", full=False))
    assert "would have 4 services, more than its limit of 3" in errors(transport)[0]
    assert glob.refused("too-many-services") == 1
    assert {k.service for k in glob.table.zones["zone-1"].services} == {"a", "b"}


def test_no_zone_may_take_more_than_its_share_of_the_vip_range() -> None:
    from ipaddress import IPv4Network, IPv6Network

    from kumazone.core.federation import MergedTable as Merged

    # A /28 has 14 VIPs: at a share of one half, a zone may have 7 services.
    table = Merged(VipRange(IPv4Network("240.0.0.0/28"), IPv6Network("fd00::/64")), HOLD_DOWN)
    limits = ZoneLimits(max_range_share=0.5)
    keys = tuple(("default", f"s{i}") for i in range(8))
    with pytest.raises(ZoneRefused, match=r"share of the VIP range \(7 of 14 VIPs\)"):
        table.receive_inventory("zone-1", Inventory(True, 0, True, keys), 0.0, limits)
    assert not table.zones.get("zone-1") or not table.zones["zone-1"].services
    table.receive_inventory("zone-1", Inventory(True, 0, True, keys[:7]), 0.0, limits)
    assert len(table.zones["zone-1"].services) == 7
    # Another zone still has room: the other half.
    others = tuple(("default", f"t{i}") for i in range(7))
    table.receive_inventory("zone-2", Inventory(True, 0, True, others), 0.0, limits)
    assert len(table.zones["zone-2"].services) == 7
    with pytest.raises(ValueError, match="max_range_share"):
        ZoneLimits(max_range_share=0)


def test_parts_that_never_end_are_refused_at_the_limit() -> None:
    clock = Clock()
    glob = limited_global(clock, max_parts=4)
    proto, transport = connected(glob, "zone-1", "a")
    proto.dataReceived(b"".join(inventory(f"s{i}", part=i, last=False) for i in range(10)))
    assert "more than 4 parts" in errors(transport)[0]
    record = glob.table.zones["zone-1"]
    assert record.pending is None and {k.service for k in record.services} == {"a"}


def test_parts_out_of_order_are_refused() -> None:
    clock = Clock()
    glob = Global(clock)
    proto, transport = connected(glob, "zone-1", "a")
    proto.dataReceived(inventory("b", part=0, last=False) + inventory("c", part=2))
    assert "part 2 where part 1 was due" in errors(transport)[0]
    assert glob.refused("bad-part") == 1


def test_a_zone_over_its_message_rate_is_refused_and_the_others_are_not() -> None:
    clock = Clock()
    glob = limited_global(clock, max_messages_per_second=5)
    other, other_transport = connected(glob, "zone-2", "db")
    proto, transport = connected(glob, "zone-1", "a")
    proto.dataReceived(encode(Ping()) * 30)
    assert "more than 5 messages per second" in errors(transport)[0]
    assert glob.refused("rate") == 1
    clock.advance(1.0)
    other.dataReceived(encode(Ping()) * 5)
    assert not other_transport.disconnecting


def test_a_zone_that_does_not_read_gets_the_changes_once_it_does() -> None:
    clock = Clock()
    glob = Global(clock)
    slow, slow_transport = connected(glob, "zone-1", "a")
    other, _other_transport = connected(glob, "zone-2", "db")
    slow_transport.clear()
    slow.pauseProducing()
    other.dataReceived(inventory("db", "b", full=False))
    other.dataReceived(inventory("db", "b", "c", full=False))
    assert tables(slow_transport) == []
    slow.resumeProducing()
    (update,) = tables(slow_transport)  # both changes, coalesced
    assert update.version == glob.table.version
    assert {r.service for r in update.upsert} == {"b", "c"}


def test_a_zone_paused_too_long_is_dropped() -> None:
    clock = Clock()
    glob = Global(clock)
    slow, slow_transport = connected(glob, "zone-1", "a")
    slow.pauseProducing()
    for _ in range(int(SILENCE // 5) + 2):
        clock.advance(5.0)
        slow.dataReceived(encode(Ping()))  # it still talks; it does not read
    assert slow_transport.disconnected
    assert glob.refused("slow-reader") == 1


def test_a_zone_with_too_much_queued_is_dropped() -> None:
    clock = Clock()
    glob = Global(clock)
    factory = SyncFactory(glob.make_session, clock, glob.metrics, max_pending=200)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(hello("zone-1") + inventory("a"))
    proto.pauseProducing()
    for _ in range(20):
        proto.send(Error("x" * 20))
    assert transport.disconnected
    assert glob.refused("slow-reader") == 1


def test_one_session_failing_to_push_does_not_stop_the_others() -> None:
    clock = Clock()
    glob = Global(clock)
    _broken, broken_transport = connected(glob, "zone-1", "a")
    _other, other_transport = connected(glob, "zone-3", "c")
    writer, _writer_transport = connected(glob, "zone-2", "b")
    other_transport.clear()

    def fail() -> None:
        raise RuntimeError("cannot encode")

    glob.hub.sessions["zone-1"].push = fail  # type: ignore[method-assign]
    writer.dataReceived(inventory("b", "b2", full=False))
    assert broken_transport.disconnecting
    assert [r.service for u in tables(other_transport) for r in u.upsert] == ["b2"]


# -- store failures ----------------------------------------------------------------


class FailingStore(SQLiteStore):
    """A store whose writes fail while C{failing} is set."""

    failing = False

    def commit(self, changes: StoreChanges) -> None:
        if self.failing:
            raise StoreError("disk full")
        super().commit(changes)


def test_a_store_failure_leaves_memory_as_stored_and_pushes_nothing() -> None:
    clock = Clock()
    store = FailingStore(":memory:")
    federation = Federation(DnsServerConfig(), store, TABLE_ID)
    glob = Global(clock, table=federation.merged)
    glob.hub.persist = federation.persist
    other, other_transport = connected(glob, "zone-2", "db")
    proto, transport = connected(glob, "zone-1", "a")
    other_transport.clear()
    store.failing = True
    proto.dataReceived(inventory("a", "b", full=False))
    assert "the global cannot store it" in errors(transport)[0]
    assert glob.refused("store") == 1
    assert tables(other_transport) == []
    state = store.load()
    assert {(r.mesh, r.service, r.offset) for r in federation.merged.rows()} == {
        (a.key.mesh, a.key.service, a.offset) for a in state.allocations
    }
    assert federation.merged.version == state.table_version
    store.failing = False
    other.dataReceived(inventory("db", "x", full=False))
    assert [r.service for u in tables(other_transport) for r in u.upsert] == ["x"]


def test_a_number_the_database_cannot_hold_is_a_store_error() -> None:
    store = SQLiteStore(":memory:")
    record = ZoneRecord("zone-1", acked=2**64)
    with pytest.raises(StoreError, match="cannot write"):
        store.commit(StoreChanges(zones_put=(record,), table_version=7))
    assert store.load().zones == [] and store.load().table_version == 0


# -- flags -------------------------------------------------------------------------


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_the_limits_have_defaults_and_flags() -> None:
    assert parse("--role=global", "--insecure").limits == ZoneLimits()
    options = parse(
        "--role=global",
        "--insecure",
        "--kds-zone-max-services=5",
        "--kds-zone-max-parts=2",
        "--kds-zone-max-messages-per-second=2.5",
        "--kds-zone-max-pending-bytes=4096",
        "--kds-zone-refusal-cooldown=0.5",
        "--kds-zone-max-range-share=0.25",
    )
    assert options.limits == ZoneLimits(5, 2, 2.5, 4096, 0.5, 0.25)


@pytest.mark.parametrize("value", ["-1", "301", "soon", ""])
def test_a_bad_refusal_cooldown_stops_start_up_with_one_line(value: str) -> None:
    with pytest.raises(SystemExit) as stopped:
        parse("--role=global", "--insecure", f"--kds-zone-refusal-cooldown={value}")
    assert stopped.value.code == (
        f"kumazone: --kds-zone-refusal-cooldown: {value!r} must be a number of seconds in [0, 300]"
    )


@pytest.mark.parametrize("value", ["0", "-1", "many", ""])
def test_a_bad_limit_stops_start_up_with_one_line(value: str) -> None:
    with pytest.raises(SystemExit) as stopped:
        parse("--role=global", "--insecure", f"--kds-zone-max-services={value}")
    assert stopped.value.code == (
        f"kumazone: --kds-zone-max-services: {value!r} must be a positive number"
    )


def test_insecure_zone_sync_listens_on_loopback_unless_told_otherwise() -> None:
    assert parse("--role=global", "--insecure")["kds-interface"] == "127.0.0.1"
    given = parse("--role=global", "--insecure", "--kds-interface=0.0.0.0")
    assert given["kds-interface"] == "0.0.0.0"


def test_hub_limits_default() -> None:
    clock = Clock()
    glob = Global(clock)
    assert isinstance(glob.hub, GlobalHub) and glob.hub.limits == ZoneLimits()
    assert CIDRS == glob.hub.cidrs


# -- cool-downs after a refusal -------------------------------------------------------


def test_a_refused_zone_waits_twice_as_long_each_time_up_to_five_minutes():
    from kumazone.core.limits import Cooldowns

    cooldowns = Cooldowns(5.0)
    assert cooldowns.remaining("zone-1", 0.0) == 0
    waits = [cooldowns.refused("zone-1", float(t)) for t in range(0, 1000, 100)]
    assert waits == [5, 10, 20, 40, 80, 160, 300, 300, 300, 300]
    assert cooldowns.remaining("zone-1", 900.0) == 300
    assert cooldowns.remaining("zone-1", 1199.0) == 1
    assert cooldowns.remaining("zone-2", 900.0) == 0  # others are not affected
    cooldowns.forgive("zone-1")
    assert cooldowns.remaining("zone-1", 900.0) == 0
    assert cooldowns.refused("zone-1", 900.0) == 5  # a new row starts afresh


def test_cool_downs_are_off_at_zero_and_remember_a_bounded_number_of_zones():
    from kumazone.core.limits import Cooldowns

    assert Cooldowns(0.0).refused("zone-1", 0.0) == 0
    cooldowns = Cooldowns(5.0, kept=3)
    for index in range(10):
        cooldowns.refused(f"zone-{index}", 0.0)
    assert [cooldowns.remaining(f"zone-{i}", 0.0) for i in range(10)] == [0] * 7 + [5] * 3


def test_the_refusal_cooldown_limit_is_range_checked():
    from kumazone.core.limits import ZoneLimits

    with pytest.raises(ValueError, match="refusal_cooldown"):
        ZoneLimits(refusal_cooldown=301)
    with pytest.raises(ValueError, match="refusal_cooldown"):
        ZoneLimits(refusal_cooldown=-1)
