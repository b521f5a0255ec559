"""The dataplane's resolver without sockets: resolv.conf, the wire checks, the SERVFAIL it makes,
which queries are forwarded and which answered from the table.

The factory is driven through its real UDP protocol, its socket's C{sendto}
captured, and a forwarder that records what it is handed (the real one, over
real sockets, is in tests/process/test_dp_forwarder.py).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, cast

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest
from prometheus_client import CollectorRegistry
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.names import dns as tdns

from kumazone.core.config import DnsServerConfig
from kumazone.core.vips import ServiceKey
from kumazone.core.zone import VipEntry, ZoneChange, ZoneSnapshot
from kumazone.dataplane.forwarder import (
    FALLBACK_NAMESERVER,
    Forwarder,
    ResolvConf,
    answer_matches,
    attempt_timeouts,
    parse_resolv_conf,
    question_end,
    servfail_answer,
    with_id,
)
from kumazone.dataplane.metrics import MAX_UPSTREAM_LABELS, DataplaneMetrics
from kumazone.dataplane.resolver import DataplaneAuthority, DataplaneDNSFactory
from kumazone.dns.authority import MeshAuthority
from kumazone.dns.server import KumaDNSDatagramProtocol, KumaDNSProtocol
from kumazone.metrics import Metrics

CONFIG = DnsServerConfig()  # mesh, 240.0.0.0/4, fd00:fd00::/64
REDIS = VipEntry(ServiceKey("default", "redis"), "240.0.0.10", "fd00:fd00::a", ("redis.mesh",))
LEDGER = VipEntry(ServiceKey("payments", "ledger"), "240.0.0.30", "fd00:fd00::1e", ("ledger.mesh",))
SNAPSHOT = ZoneSnapshot(version=7, entries=(REDIS, LEDGER), mesh_of_address={})


def query(name: str, rdtype: str = "A", **kwargs: Any) -> bytes:
    """A query's octets, as dnspython makes them."""
    message = dns.message.make_query(name, rdtype, **kwargs)
    return cast(bytes, message.to_wire())


# -- resolv.conf --------------------------------------------------------------------


def test_resolv_conf_nameservers_in_order() -> None:
    text = (
        "# generated\n"
        "; also a comment\n"
        "search example.com svc.cluster.local\n"
        "options ndots:5 timeout:1\n"
        "nameserver 10.96.0.10\n"
        "nameserver\t2001:db8::53   # the second\n"
        "nameserver fe80::1%lo;comment\n"
    )
    assert parse_resolv_conf(text) == ResolvConf(("10.96.0.10", "2001:db8::53", "fe80::1%lo"))


def test_resolv_conf_scopes_are_kept_for_link_local_addresses_only() -> None:
    text = "nameserver ::1%lo\nnameserver ff02::fb%2\nnameserver 2001:db8::1%eth0\n"
    assert parse_resolv_conf(text).nameservers == ("::1", "ff02::fb%2", "2001:db8::1")


def test_resolv_conf_problems_are_reported_and_skipped() -> None:
    text = (
        "nameserver 10.0.0.1\n"
        "nameserver not-an-address\n"
        "nameserver 010.0.0.2\n"  # glibc's inet_pton refuses leading zeros too
        "nameserver10.0.0.3\n"  # a keyword must be followed by a blank
        "  nameserver 10.0.0.4\n"  # glibc reads keywords at a line's very start
        "garbage here\n"
        "nameserver 10.0.0.5\r\n"
        "nameserver 10.0.0.6\n"
        "nameserver 10.0.0.7\n"  # a fourth: glibc uses three
    )
    parsed = parse_resolv_conf(text)
    assert parsed.nameservers == ("10.0.0.1", "10.0.0.5", "10.0.0.6")
    assert len(parsed.problems) == 6
    assert "line 2" in parsed.problems[0] and "not-an-address" in parsed.problems[0]
    assert "line 9" in parsed.problems[-1] and "first 3" in parsed.problems[-1]


def test_resolv_conf_without_nameservers() -> None:
    assert parse_resolv_conf("") == ResolvConf(())
    assert parse_resolv_conf("search example.com\n").nameservers == ()


def test_attempt_timeouts_fill_the_budget() -> None:
    for upstreams in (1, 2, 3):
        first, second = attempt_timeouts(2.0, upstreams)
        assert second == 2 * first
        assert upstreams * (first + second) == pytest.approx(2.0)
    assert attempt_timeouts(1.5, 0) == attempt_timeouts(1.5, 1)


class ResolvConfFile:
    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "resolv.conf"
        self.generation = 0

    def write(self, text: str) -> None:
        # As resolvconf and kubelet do: a new file renamed into place.
        self.generation += 1
        new = self.path.with_suffix(f".{self.generation}")
        new.write_text(text)
        os.replace(new, self.path)


def forwarder(path: Path, clock: Clock, **kwargs: Any) -> Forwarder:
    return Forwarder(str(path), clock, DataplaneMetrics(CollectorRegistry()), **kwargs)


def test_forwarder_rereads_resolv_conf_when_it_changes(tmp_path: Path) -> None:
    conf = ResolvConfFile(tmp_path)
    conf.write("nameserver 10.0.0.1\nnameserver ::1\n")
    clock = Clock()
    clock.advance(100)
    forwarding = forwarder(conf.path, clock)
    assert forwarding.nameservers == ("10.0.0.1", "::1")
    conf.write("nameserver 10.0.0.2\n")
    forwarding.check()
    assert forwarding.nameservers == ("10.0.0.1", "::1"), "looked at once a second at most"
    clock.advance(1.0)
    forwarding.check()
    assert forwarding.nameservers == ("10.0.0.2",)
    # Gone: the last list stays.
    conf.path.unlink()
    clock.advance(1.0)
    forwarding.check()
    assert forwarding.nameservers == ("10.0.0.2",)
    # Back, with no nameserver: glibc's fallback.
    conf.write("search example.com\n")
    clock.advance(1.0)
    forwarding.check()
    assert forwarding.nameservers == (FALLBACK_NAMESERVER,)


def test_forwarder_without_resolv_conf_falls_back(tmp_path: Path) -> None:
    forwarding = forwarder(tmp_path / "missing", Clock())
    assert forwarding.nameservers == (FALLBACK_NAMESERVER,)


def test_forwarder_drops_a_scope_that_does_not_exist(tmp_path: Path) -> None:
    conf = ResolvConfFile(tmp_path)
    conf.write("nameserver fe80::1%no-such-interface0\nnameserver fe80::1%lo\n")
    assert forwarder(conf.path, Clock()).nameservers == ("fe80::1%lo",)


def test_forwarder_over_its_limit_answers_servfail_at_once(tmp_path: Path) -> None:
    conf = ResolvConfFile(tmp_path)
    conf.write("nameserver 192.0.2.1\n")
    registry = CollectorRegistry()
    forwarding = Forwarder(str(conf.path), Clock(), DataplaneMetrics(registry), max_outstanding=0)
    sent = query("example.com")
    result: list[bytes] = []
    forwarding.forward(sent, False, 512).addCallback(result.append)
    assert result == [servfail_answer(sent)]
    overload = registry.get_sample_value(
        "kumazone_dataplane_upstream_failures_total", {"reason": "overload"}
    )
    assert overload == 1


# -- wire ---------------------------------------------------------------------------


def test_question_end() -> None:
    sent = query("Example.COM", "AAAA")
    assert question_end(sent) == 12 + len(b"\x07Example\x03COM\x00") + 4
    assert question_end(sent + b"\x00" * 11) == question_end(sent)  # records after it
    assert question_end(sent[:-1]) is None  # cut off
    response = bytearray(sent)
    response[2] |= 0x80
    assert question_end(bytes(response)) is None
    two = bytearray(sent)
    two[5] = 2
    assert question_end(bytes(two)) is None
    compressed = sent[:12] + b"\xc0\x0c" + sent[-4:]
    assert question_end(compressed) is None


def test_answers_match_by_id_and_question() -> None:
    sent = query("Example.COM", "A")
    end = question_end(sent)
    assert end is not None
    response = dns.message.from_wire(sent)
    answer = dns.message.make_response(response).to_wire()
    assert answer_matches(answer, sent, end)
    # The question's case does not matter (an upstream may use 0x20 itself).
    assert answer_matches(answer.replace(b"Example", b"eXAMPLE"), sent, end)
    assert not answer_matches(with_id(answer, b"\x00\x00"), with_id(sent, b"\x00\x01"), end)
    assert not answer_matches(answer.replace(b"Example", b"Exbmple"), sent, end)
    other_type = answer[: end - 4] + struct.pack("!HH", 28, 1) + answer[end:]
    assert not answer_matches(other_type, sent, end)
    other_class = answer[: end - 4] + struct.pack("!HH", 1, 3) + answer[end:]
    assert not answer_matches(other_class, sent, end)
    assert not answer_matches(sent, sent, end), "a query is no answer"
    no_question = answer[:4] + b"\x00\x00" + answer[6:12]
    assert not answer_matches(no_question, sent, end)
    assert not answer_matches(answer[:5], sent, end)


def test_with_id() -> None:
    assert with_id(b"\x12\x34rest", b"\xab\xcd") == b"\xab\xcdrest"


@pytest.mark.parametrize(
    ("kwargs", "edns", "do"),
    [
        ({"use_edns": False}, False, False),
        ({"use_edns": 0, "payload": 4096}, True, False),
        ({"use_edns": 0, "want_dnssec": True, "payload": 1400}, True, True),
        (
            {
                "use_edns": 0,
                "options": [dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"\x01" * 8)],
            },
            True,
            False,
        ),
    ],
)
def test_servfail_from_the_query(kwargs: dict[str, Any], edns: bool, do: bool) -> None:
    sent = dns.message.make_query("Outside.Example", "MX", **kwargs)
    sent.flags |= dns.flags.CD
    answer = dns.message.from_wire(servfail_answer(sent.to_wire()))
    assert answer.id == sent.id
    assert answer.rcode() == dns.rcode.SERVFAIL
    assert answer.flags & dns.flags.QR and answer.flags & dns.flags.RA
    assert answer.flags & dns.flags.RD and answer.flags & dns.flags.CD
    assert not answer.flags & (dns.flags.AA | dns.flags.TC)
    assert answer.question == sent.question
    assert str(answer.question[0].name) == "Outside.Example."
    assert not answer.answer and not answer.authority
    assert (answer.edns >= 0) == edns
    if edns:
        assert answer.edns == 0 and answer.payload == 1232 and not answer.options
        assert bool(answer.ednsflags & dns.flags.DO) == do


def test_servfail_from_odd_packets() -> None:
    sent = query("example.com")
    assert servfail_answer(sent[:11]) == b""
    response = bytearray(sent)
    response[2] |= 0x80
    assert servfail_answer(bytes(response)) == b"", "never an answer to an answer"
    # A question that cannot be read: the header alone.
    compressed = sent[:12] + b"\xc0\x0c" + sent[-4:]
    header = servfail_answer(compressed)
    assert header[:2] == sent[:2] and len(header) == 12
    assert header[3] & 0x0F == 2 and header[4:] == b"\x00" * 8
    # Opcode (NOTIFY) and RD clear are kept.
    notify = dns.message.make_query("example.com", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    notify.flags &= ~dns.flags.RD
    answer = dns.message.from_wire(servfail_answer(notify.to_wire()))
    assert answer.opcode() == dns.opcode.NOTIFY and not answer.flags & dns.flags.RD


# -- the authority ------------------------------------------------------------------


def authority(kind: type[MeshAuthority] = DataplaneAuthority) -> MeshAuthority:
    made = kind(CONFIG)
    made.update(SNAPSHOT)
    return made


@pytest.mark.parametrize(
    ("name", "qtype", "qclass"),
    [
        (b"example.com", tdns.A, tdns.IN),
        (b"version.bind", tdns.TXT, tdns.CH),
        (b"meshy", tdns.A, tdns.IN),
        (b"redis.mesh.example.com", tdns.A, tdns.IN),
        (b"in-addr.arpa", tdns.PTR, tdns.IN),
        (b"1.0.0.127.in-addr.arpa", tdns.PTR, tdns.IN),
        (b"example.com", tdns.AXFR, tdns.IN),
        (b"", tdns.NS, tdns.IN),
    ],
)
def test_negative_says_nothing_of_names_outside(name: bytes, qtype: int, qclass: int) -> None:
    ours = authority()
    assert isinstance(ours, DataplaneAuthority) and not ours.ours(name)
    assert ours.negative(name, qtype, qclass, "default") is None
    # The zone's says REFUSED: what the hot path would have answered.
    assert authority(MeshAuthority).negative(name, qtype, qclass, "default") == (
        tdns.EREFUSED,
        None,
    )


@pytest.mark.parametrize(
    ("name", "qtype", "qclass"),
    [
        (b"mesh", tdns.A, tdns.IN),
        (b"redis.mesh", tdns.TXT, tdns.IN),
        (b"redis.mesh", tdns.A, tdns.IN),
        (b"nope.mesh", tdns.A, tdns.IN),
        (b"ledger.mesh", tdns.A, tdns.IN),
        (b"redis.mesh", tdns.AXFR, tdns.IN),
        (b"redis.mesh", tdns.TXT, tdns.CH),
        (b"10.0.0.240.in-addr.arpa", tdns.PTR, tdns.IN),
        (b"11.0.0.240.in-addr.arpa", tdns.PTR, tdns.IN),
        (b"240.in-addr.arpa", tdns.SOA, tdns.IN),
    ],
)
def test_negative_inside_is_the_zones(name: bytes, qtype: int, qclass: int) -> None:
    ours = authority()
    assert isinstance(ours, DataplaneAuthority) and ours.ours(name)
    zone = authority(MeshAuthority)
    assert ours.negative(name, qtype, qclass, "default") == zone.negative(
        name, qtype, qclass, "default"
    )


# -- the factory --------------------------------------------------------------------


class RecordingForwarder:
    """Stands in for the L{Forwarder}: keeps what it is handed, answers when told."""

    def __init__(self) -> None:
        self.forwarded: list[tuple[bytes, bool, int | None, defer.Deferred[bytes]]] = []

    def forward(self, query: bytes, tcp: bool, max_udp: int | None) -> defer.Deferred[bytes]:
        answer: defer.Deferred[bytes] = defer.Deferred()
        self.forwarded.append((query, tcp, max_udp, answer))
        return answer


class Capture:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def __call__(self, data: bytes, address: tuple[str, int]) -> int:
        self.sent.append((data, address))
        return len(data)


class Served:
    def __init__(self, mesh: str = "default") -> None:
        self.metrics = Metrics("z")
        self.dp_metrics = DataplaneMetrics(self.metrics.registry)
        self.forwarder = RecordingForwarder()
        self.authority = cast(DataplaneAuthority, authority())
        self.factory = DataplaneDNSFactory(
            self.authority,
            mesh,
            self.metrics,
            self.dp_metrics,
            cast(Forwarder, self.forwarder),
            Clock(),
        )
        self.udp = KumaDNSDatagramProtocol(self.factory)
        self.capture = Capture()
        self.udp._sendto = self.capture

    def ask(self, data: bytes, client: tuple[str, int] = ("127.0.0.1", 5353)) -> bytes | None:
        """Send C{data} over UDP; the answer sent at once, if any."""
        before = len(self.capture.sent)
        self.udp.datagramReceived(data, client)
        if len(self.capture.sent) == before:
            return None
        assert len(self.capture.sent) == before + 1
        return self.capture.sent[-1][0]

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels or {})


def test_mesh_names_are_answered_from_the_table() -> None:
    served = Served()
    answer = served.ask(query("REDIS.mesh"))
    assert answer is not None
    message = dns.message.from_wire(answer)
    assert message.rcode() == dns.rcode.NOERROR and message.flags & dns.flags.AA
    assert [rr.address for rr in message.answer[0]] == ["240.0.0.10"]
    # Another mesh's name, an unknown name: NXDOMAIN with the SOA, never forwarded.
    for name in ("ledger.mesh", "nope.mesh", "a.b.c.mesh"):
        for _ in range(3):  # the second and third from the hot path's negative answers
            negative = served.ask(query(name))
            assert negative is not None
            message = dns.message.from_wire(negative)
            assert message.rcode() == dns.rcode.NXDOMAIN, name
            assert message.authority[0].rdtype == dns.rdatatype.SOA
    # Inside the domain, what is not ours to answer stays REFUSED.
    refused = served.ask(query("redis.mesh", "TXT", rdclass=dns.rdataclass.CH))
    assert refused is not None and dns.message.from_wire(refused).rcode() == dns.rcode.REFUSED
    assert served.forwarder.forwarded == []
    assert served.sample("kumazone_dataplane_queries_total", {"source": "local"}) == 11
    assert served.sample("kumazone_dataplane_queries_total", {"source": "upstream"}) == 0


def test_other_names_are_forwarded_as_they_came() -> None:
    served = Served()
    client = ("127.0.0.1", 40000)
    sent = query("example.com", "A", use_edns=0, payload=4096)
    assert served.ask(sent, client) is None
    assert len(served.forwarder.forwarded) == 1
    forwarded, tcp, max_udp, answer = served.forwarder.forwarded[0]
    assert (forwarded, tcp, max_udp) == (sent, False, 4096)
    answer.callback(b"\x00\x01the answer")
    assert served.capture.sent[-1] == (b"\x00\x01the answer", client)
    # Without EDNS the client takes 512 octets; an empty answer is not sent.
    before = len(served.capture.sent)
    served.ask(query("example.com", "A", use_edns=False), client)
    assert served.forwarder.forwarded[1][2] == 512
    served.forwarder.forwarded[1][3].callback(b"")
    assert len(served.capture.sent) == before
    assert served.sample("kumazone_dataplane_queries_total", {"source": "upstream"}) == 2
    assert served.sample("kumazone_dataplane_queries_total", {"source": "local"}) == 0


def test_forwarded_names_never_take_the_hot_path() -> None:
    """A REFUSED learnt for the domain (a CH query) makes no answer for a name outside."""
    served = Served()
    # "redis.mesh" and "abcde.test": names of the same length, so the same tail key.
    for _ in range(3):
        refused = served.ask(query("redis.mesh", "A", rdclass=dns.rdataclass.CH))
        assert refused is not None
    assert served.factory.hot.tails, "the REFUSED's tail was learnt"
    for _ in range(3):
        assert served.ask(query("abcde.test", "A")) is None
        assert served.ask(query("abcde.test", "A", rdclass=dns.rdataclass.CH)) is None
    assert len(served.forwarder.forwarded) == 6
    for _sent, _tcp, _limit, answer in served.forwarder.forwarded:
        answer.callback(b"\x00\x00upstream")
    # The forwarded answers were not kept: the next is forwarded too.
    assert served.ask(query("abcde.test", "A")) is None
    assert len(served.forwarder.forwarded) == 7
    assert not any(b"abcde" in key[0] for key in served.factory.hot.templates)


def test_queries_outside_the_forwarder_stay_local() -> None:
    """Malformed queries, other opcodes: answered as the zone answers them."""
    served = Served()
    sent = query("example.com")
    notify = dns.message.make_query("example.com", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    answer = served.ask(notify.to_wire())
    assert answer is not None and dns.message.from_wire(answer).rcode() == dns.rcode.NOTIMP
    formerr = served.ask(sent[:-2])
    assert formerr is not None and formerr[3] & 0x0F == dns.rcode.FORMERR
    assert served.forwarder.forwarded == []


def test_forwarded_over_tcp() -> None:
    served = Served()
    transport = StringTransport()
    protocol = served.factory.buildProtocol(None)
    assert isinstance(protocol, KumaDNSProtocol)
    protocol.makeConnection(transport)
    sent = query("example.com", "TXT")
    protocol.dataReceived(struct.pack("!H", len(sent)) + sent)
    assert [(q, tcp, limit) for q, tcp, limit, _ in served.forwarder.forwarded] == [
        (sent, True, None)
    ]
    served.forwarder.forwarded[0][3].callback(b"\x00\x02big answer")
    assert transport.value() == struct.pack("!H", 12) + b"\x00\x02big answer"
    # A connection gone before the answer: nothing written, nothing raised.
    protocol.dataReceived(struct.pack("!H", len(sent)) + sent)
    protocol.connectionLost(cast(Any, None))
    transport.clear()
    served.forwarder.forwarded[1][3].callback(b"\x00\x03late")
    assert transport.value() == b""


def test_a_failing_forwarder_still_answers() -> None:
    served = Served()
    client = ("127.0.0.1", 40001)
    sent = query("example.com")
    served.ask(sent, client)
    served.forwarder.forwarded[0][3].errback(RuntimeError("a bug"))
    assert served.capture.sent[-1] == (servfail_answer(sent), client)


def test_set_authority_swaps_table_and_cache() -> None:
    served = Served()
    served.ask(query("redis.mesh"))
    assert served.factory.hot.templates
    old_cache = served.factory.hot
    moved = VipEntry(REDIS.key, "240.0.0.11", "fd00:fd00::b", REDIS.names)
    fresh = DataplaneAuthority(DnsServerConfig(domain="mesh"))
    fresh.update(ZoneSnapshot(version=8, entries=(moved,), mesh_of_address={}))
    served.factory.set_authority(fresh)
    assert served.factory.hot is not old_cache and not served.factory.hot.templates
    assert served.factory.resolver.resolvers == [fresh]
    for _ in range(2):
        answer = served.ask(query("redis.mesh"))
        assert answer is not None
        assert [rr.address for rr in dns.message.from_wire(answer).answer[0]] == ["240.0.0.11"]
    # A change goes to the authority, then drops the answers it touched.
    again = VipEntry(REDIS.key, "240.0.0.12", "fd00:fd00::c", REDIS.names)
    change = ZoneChange(
        snapshot=ZoneSnapshot(version=9, entries=(again,), mesh_of_address={}),
        removed=(moved,),
        added=(again,),
    )
    served.factory.apply(change)
    answer = served.ask(query("redis.mesh"))
    assert answer is not None
    assert [rr.address for rr in dns.message.from_wire(answer).answer[0]] == ["240.0.0.12"]


# -- metrics ------------------------------------------------------------------------


def test_upstream_labels_are_bounded() -> None:
    metrics = DataplaneMetrics(CollectorRegistry())
    labels = [metrics.upstream_label(f"10.0.0.{i}") for i in range(MAX_UPSTREAM_LABELS + 3)]
    assert labels[:MAX_UPSTREAM_LABELS] == [f"10.0.0.{i}" for i in range(MAX_UPSTREAM_LABELS)]
    assert labels[MAX_UPSTREAM_LABELS:] == ["other"] * 3
    assert metrics.upstream_label("10.0.0.0") == "10.0.0.0"


def test_dataplane_gauges_and_failures_are_exported() -> None:
    registry = CollectorRegistry()
    metrics = DataplaneMetrics(registry)
    metrics.table_version.set(12)
    metrics.connected.set(1)
    metrics.failed("timeout")
    assert registry.get_sample_value("kumazone_dataplane_table_version") == 12
    assert registry.get_sample_value("kumazone_dataplane_connected") == 1
    for reason in ("timeout", "servfail", "refused", "network", "spoofed", "overload"):
        value = registry.get_sample_value(
            "kumazone_dataplane_upstream_failures_total", {"reason": reason}
        )
        assert value == (1 if reason == "timeout" else 0)
