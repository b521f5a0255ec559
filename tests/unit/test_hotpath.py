"""The hot path answers byte for byte what the authority path answers (ID aside).

A large generated corpus: every name the table serves (both forms) in random
case, unknown names, names at the length limits, the apex and the nameserver,
empty non-terminals, reverse names, names outside the domain; every common
record type and some rare ones; with and without EDNS0 (DO clear and set,
options, several payload sizes); RD set and clear; clients in two meshes and an
unknown one.  For each query the reference is the authority path alone; the hot
path is then primed with a differently-cased variant of the same query and must
give the same bytes.
"""

from __future__ import annotations

import random

import dns.edns
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import pytest

from kumazone.core.config import load_config
from kumazone.core.resources import ResourceKey
from kumazone.core.zone import Zone
from kumazone.dns.authority import MeshAuthority
from kumazone.dns.server import KumaDNSDatagramProtocol, KumaDNSServerFactory
from kumazone.metrics import Metrics
from kumazone.store.sqlite import SQLiteStore
from kumazone.zone_service import mesh_lookup
from tests.builders import dataplane_resource

SEED = 20261127
CONFIG = load_config(None, {})
# Client addresses: one per mesh, and one the inventory does not know.
CLIENTS = {"default": "192.0.2.1", "payments": "192.0.2.2", "unknown": "192.0.2.200"}
TYPES = ["A", "AAAA", "PTR", "SOA", "NS", "ANY", "TXT", "MX", "SRV", "CNAME", "HTTPS", "CAA"]
LONG_LABEL = "a" * 63


class Capture:
    """Stands in for the UDP socket: keeps what is sent."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def __call__(self, data: bytes, address: tuple[str, int]) -> int:
        self.sent.append(data)
        return len(data)


@pytest.fixture
def served() -> tuple[Zone, KumaDNSServerFactory, KumaDNSDatagramProtocol, Capture]:
    zone = Zone("zone-1", CONFIG, SQLiteStore(":memory:"))
    services = [
        ("redis", "default"),
        ("backend", "default"),
        ("redis", "payments"),
        ("ledger", "payments"),
        ("echo-server_echo-example_svc_1010", "default"),
        (LONG_LABEL, "default"),
        ("a_b", "default"),
        ("a.b", "default"),
    ]
    resources = [
        dataplane_resource(f"dp-{i}", s, mesh=m, address=f"10.1.0.{i + 1}", port=80)
        for i, (s, m) in enumerate(services)
    ]
    resources += [
        dataplane_resource("client-default", "client", address=CLIENTS["default"], port=80),
        dataplane_resource(
            "client-payments", "client", mesh="payments", address=CLIENTS["payments"], port=80
        ),
    ]
    zone.set_file("/inventory.yaml", resources, 0.0)
    authority = MeshAuthority(CONFIG, ["127.0.0.1", "::1"])
    authority.update(zone.snapshot)
    zone.listeners.append(lambda change: authority.update(change.snapshot))
    factory = KumaDNSServerFactory(authority, mesh_lookup(lambda: zone.snapshot), Metrics("z"))
    zone.listeners.append(lambda change: factory.hot.clear())
    proto = KumaDNSDatagramProtocol(factory)
    capture = Capture()
    proto._sendto = capture
    return zone, factory, proto, capture


def random_case(rng: random.Random, name: str) -> str:
    return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in name)


def corpus_names(zone: Zone) -> list[str]:
    names: list[str] = [
        "mesh",
        "ns.dns.mesh",
        "dns.mesh",
        "svc.1010.mesh",
        "1010.mesh",
        "nope.mesh",
        "x.redis.mesh",
        "httpbin.mesh",
        "example.com",
        "version.bind",
        "in-addr.arpa",
        "240.in-addr.arpa",
        "12.240.in-addr.arpa",
        "1.0.0.10.in-addr.arpa",
        f"{LONG_LABEL}.{LONG_LABEL}.{LONG_LABEL}.{'b' * 56}.mesh",
        f"{'c' * 63}.mesh",
    ]
    for entry in zone.snapshot.entries:
        names += list(entry.names)
        names.append(dns.reversename.from_address(entry.vip).to_text(omit_final_dot=True))
        names.append(dns.reversename.from_address(entry.vip6).to_text(omit_final_dot=True))
    return names


def make_query(
    name: str,
    rdtype: str,
    edns: int,
    rd: bool,
    rdclass: str,
    rng: random.Random,
) -> bytes:
    options = [dns.edns.GenericOption(10, b"\x01" * 8)] if edns == 3 else None
    message = dns.message.make_query(
        name,
        dns.rdatatype.from_text(rdtype),
        dns.rdataclass.from_text(rdclass),
        use_edns=-1 if edns == 0 else 0,
        want_dnssec=edns == 2,
        payload=rng.choice([512, 1232, 4096]),
        options=options,
    )
    message.id = rng.randrange(65536)
    if not rd:
        message.flags &= ~dns.flags.RD
    # AD and CD as clients send them (dig sets AD): CD is copied, AD never.
    if rng.random() < 0.5:
        message.flags |= dns.flags.AD
    if rng.random() < 0.5:
        message.flags |= dns.flags.CD
    return message.to_wire()


def make_primer(
    rng: random.Random, query: bytes, name: str, rdtype: str, edns: int, rd: bool, rdclass: str
) -> bytes:
    """A query that may fill the cache before C{query} is asked.

    The same question in other cases, with another ID and the other RD flag,
    other AD/CD bits; or one that differs only outside the cache key (payload
    size, EDNS options); or one that must not share its answer (EDNS version 1).
    """
    kind = rng.randrange(3)
    if kind == 0:
        primer = bytearray(query)
        primer[0:2] = bytes((rng.randrange(256), rng.randrange(256)))
        primer[2] ^= 0x01
        primer[3] ^= 0x30  # AD and CD
        for index in range(12, len(primer)):
            if 65 <= primer[index] <= 90 or 97 <= primer[index] <= 122:
                primer[index] ^= 0x20 if rng.random() < 0.5 else 0
        return bytes(primer)
    if kind == 1:
        other = 3 if edns == 1 else (1 if edns == 3 else edns)
        return make_query(random_case(rng, name), rdtype, other, not rd, rdclass, rng)
    message = dns.message.make_query(
        name, dns.rdatatype.from_text(rdtype), dns.rdataclass.from_text(rdclass), use_edns=1
    )
    return message.to_wire()


def authority_answer(
    factory: KumaDNSServerFactory,
    proto: KumaDNSDatagramProtocol,
    capture: Capture,
    query: bytes,
    host: str,
) -> bytes:
    """What the authority path alone says (no template stored or used)."""
    factory.hot.clear()
    factory.packetReceived(query, proto, (host, 5353), None)
    return capture.sent.pop()


def test_hot_path_equals_authority_path(served) -> None:
    zone, factory, proto, capture = served
    rng = random.Random(SEED)
    names = corpus_names(zone)
    compared = hot = 0
    for name in names:
        for rdtype in TYPES:
            for _ in range(10):
                edns, rd = rng.randrange(4), rng.random() < 0.5
                rdclass = "IN" if rng.random() < 0.9 else rng.choice(["CH", "ANY"])
                host = CLIENTS[rng.choice(list(CLIENTS))]
                query = make_query(random_case(rng, name), rdtype, edns, rd, rdclass, rng)
                reference = authority_answer(factory, proto, capture, query, host)
                primer = make_primer(rng, query, name, rdtype, edns, rd, rdclass)
                before = factory.stats.hot_answers
                proto.datagramReceived(bytes(primer), (host, 5353))
                capture.sent.pop()
                proto.datagramReceived(query, (host, 5353))
                answer = capture.sent.pop()
                # And once more, exactly as asked: the shortcut for known octets.
                proto.datagramReceived(query, (host, 5353))
                again = capture.sent.pop()
                hot += factory.stats.hot_answers - before
                assert answer == reference, (name, rdtype, edns, rd, rdclass, host)
                assert answer[3] & 0x10 == query[3] & 0x10, "CD copied (RFC 6840 5.9)"
                assert not answer[3] & 0x20, "AD clear: nothing here is validated"
                assert again == reference, (name, rdtype, edns, rd, rdclass, host, "again")
                compared += 1
    assert compared > 5000
    # Two asks per query; a third of the primers (EDNS version 1) cannot fill the
    # cache; of the rest, nearly all of the corpus qualifies for the hot path.
    assert hot > compared * 1.3, (hot, compared)


def test_mesh_selection_holds_on_the_hot_path(served) -> None:
    zone, factory, proto, capture = served
    answers = {}
    for mesh, host in CLIENTS.items():
        query = dns.message.make_query("redis.mesh", "A").to_wire()
        for _ in range(2):
            proto.datagramReceived(query, (host, 5353))
        answers[mesh] = dns.message.from_wire(capture.sent[-1]).answer[0][0].address
    vips = {e.key.mesh: e.vip for e in zone.snapshot.entries if e.key.service == "redis"}
    assert answers == {
        "default": vips["default"],
        "payments": vips["payments"],
        "unknown": vips["default"],
    }
    # default: 1 of 2; payments: 1 of 2; the unknown client shares default's templates: 2.
    assert factory.stats.hot_answers == 4


def test_a_table_change_is_visible_on_the_hot_path_at_once(served) -> None:
    zone, factory, proto, capture = served
    host = CLIENTS["default"]
    query = dns.message.make_query("cache.mesh", "A").to_wire()
    for _ in range(3):
        proto.datagramReceived(query, (host, 5353))
    assert dns.message.from_wire(capture.sent[-1]).rcode() == dns.rcode.NXDOMAIN
    assert factory.stats.hot_answers == 2
    zone.put(dataplane_resource("cache-1", "cache", address="10.1.1.1", port=80), 1.0)
    proto.datagramReceived(query, (host, 5353))
    answer = dns.message.from_wire(capture.sent[-1])
    assert answer.rcode() == dns.rcode.NOERROR
    vip = next(e.vip for e in zone.snapshot.entries if e.key.service == "cache")
    assert answer.answer[0][0].address == vip
    # The SOA serial follows the table too.
    soa = dns.message.make_query("mesh", "SOA").to_wire()
    proto.datagramReceived(soa, (host, 5353))
    proto.datagramReceived(soa, (host, 5353))
    assert dns.message.from_wire(capture.sent[-1]).answer[0][0].serial == zone.snapshot.version
    assert zone.delete(ResourceKey("Dataplane", "default", "cache-1"), 2.0)
    proto.datagramReceived(query, (host, 5353))
    assert dns.message.from_wire(capture.sent[-1]).rcode() == dns.rcode.NXDOMAIN


def test_an_opt_record_not_owned_by_the_root_is_formerr(served) -> None:
    _zone, factory, proto, capture = served
    good = dns.message.make_query("redis.mesh", "A", use_edns=0).to_wire()
    # The OPT record's owner is the last octet before its type: root (0) -> "x".
    opt = good.rindex(b"\x00\x00\x29")
    bad = good[:opt] + b"\x01x" + good[opt + 1 :]
    for _ in range(2):
        proto.datagramReceived(bad, (CLIENTS["default"], 5353))
        assert dns.message.from_wire(capture.sent.pop()).rcode() == dns.rcode.FORMERR
    assert factory.stats.hot_answers == 0
