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

import dataclasses
import random
from collections.abc import Callable

import dns.edns
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import pytest
from hypothesis import given, settings

from kumazone.core.config import load_config
from kumazone.core.resources import ResourceKey
from kumazone.core.zone import VipEntry, Zone, ZoneChange
from kumazone.dns import hotpath
from kumazone.dns.authority import MeshAuthority
from kumazone.dns.server import KumaDNSDatagramProtocol, KumaDNSServerFactory
from kumazone.metrics import Metrics
from kumazone.store.sqlite import SQLiteStore
from kumazone.zone_service import mesh_lookup
from tests.builders import dataplane_resource
from tests.unit.test_authority import POOL_NAMES, as_entries, diff, states

SEED = 20261127
CONFIG = load_config(None, {})
# Client addresses: one per mesh, and one the inventory does not know.
CLIENTS = {"default": "192.0.2.1", "payments": "192.0.2.2", "unknown": "192.0.2.200"}
TYPES = ["A", "AAAA", "PTR", "SOA", "NS", "ANY", "TXT", "MX", "SRV", "CNAME", "HTTPS", "CAA"]
LONG_LABEL = "a" * 63
SERVICES = [
    ("redis", "default"),
    ("backend", "default"),
    ("redis", "payments"),
    ("ledger", "payments"),
    ("echo-server_echo-example_svc_1010", "default"),
    (LONG_LABEL, "default"),
    ("a_b", "default"),
    ("a.b", "default"),
]


class PreciseChanges:
    """A zone listener that hands on each change as precise as the zone may give it.

    Until the zone sends precise changes, its full ones are made precise here
    by comparing the tables before and after: the entries gone or replaced (old
    form), new or replaced (new form), and the addresses whose mesh changed.
    A change that is precise already is handed on as it is.
    """

    def __init__(self, zone: Zone, *listeners: Callable[[ZoneChange], None]) -> None:
        self.listeners = listeners
        self.entries = {entry.key: entry for entry in zone.snapshot.entries}
        self.meshes = dict(zone.snapshot.mesh_of_address)

    def __call__(self, change: ZoneChange) -> None:
        entries = {entry.key: entry for entry in change.snapshot.entries}
        meshes = dict(change.snapshot.mesh_of_address)
        if change.full:
            old = self.entries
            change = dataclasses.replace(
                change,
                full=False,
                removed=tuple(e for key, e in old.items() if entries.get(key) != e),
                added=tuple(e for key, e in entries.items() if old.get(key) != e),
                addresses=frozenset(
                    address
                    for address in {*self.meshes, *meshes}
                    if self.meshes.get(address) != meshes.get(address)
                ),
            )
        self.entries, self.meshes = entries, meshes
        for listener in self.listeners:
            listener(change)


def inventory(services: list[tuple[str, str]], payments_client: str = "payments") -> list:
    """Dataplanes for C{services} and for one client of each mesh."""
    resources = [
        dataplane_resource(f"dp-{s}-{m}", s, mesh=m, address=f"10.1.0.{i + 1}", port=80)
        for i, (s, m) in enumerate(services)
    ]
    resources += [
        dataplane_resource("client-default", "client", address=CLIENTS["default"], port=80),
        dataplane_resource(
            "client-payments", "client", mesh=payments_client, address=CLIENTS["payments"], port=80
        ),
    ]
    return resources


def wire(zone: Zone) -> tuple[KumaDNSServerFactory, KumaDNSDatagramProtocol, Capture]:
    """A DNS factory following C{zone} as the zone service wires it, and its UDP protocol."""
    authority = MeshAuthority(CONFIG, ["127.0.0.1", "::1"])
    authority.update(zone.snapshot)
    factory = KumaDNSServerFactory(authority, mesh_lookup(lambda: zone.snapshot), Metrics("z"))
    # The authority first, then the cache.
    zone.listeners.append(PreciseChanges(zone, authority.apply, factory.hot.apply))
    proto = KumaDNSDatagramProtocol(factory)
    capture = Capture()
    proto._sendto = capture
    return factory, proto, capture


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
    zone.set_file("/inventory.yaml", inventory(SERVICES), 0.0)
    return (zone, *wire(zone))


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
                # And twice more, exactly as asked: the shortcut for known octets
                # (a negative answer is kept by its octets from its second ask).
                proto.datagramReceived(query, (host, 5353))
                again = capture.sent.pop()
                proto.datagramReceived(query, (host, 5353))
                assert capture.sent.pop() == reference, (name, rdtype, "third")
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


# -- changes: only what they touch goes ----------------------------------------------

#: Types asked in the corpus before and after changes.
CHANGE_TYPES = ["A", "AAAA", "ANY", "TXT", "MX", "SOA", "NS", "PTR"]
#: The table after each change: added, removed, renamed (a.b.mesh changes owner),
#: an empty non-terminal appearing (v1.mesh in payments) and going, a client moving mesh.
STEPS: list[tuple[str, list[tuple[str, str]], str]] = [
    ("add", [*SERVICES, ("cache", "default")], "payments"),
    ("remove", [s for s in SERVICES if s != ("backend", "default")], "payments"),
    ("rename", [s for s in SERVICES if s != ("a.b", "default")] + [("a.c", "default")], "payments"),
    ("non-terminal appears", [*SERVICES, ("api_v1", "payments")], "payments"),
    ("non-terminal goes", SERVICES, "payments"),
    ("client moves", SERVICES, "default"),
]
#: Names asked whatever the table: ones the changes make and unmake, odd ones.
CHANGE_NAMES = [
    "cache.mesh",
    "backend.mesh",
    "a.b.mesh",
    "a.c.mesh",
    "a_c.mesh",
    "api_v1.mesh",
    "api.v1.mesh",
    "v1.mesh",
    "x.v1.mesh",
    "x.dns.mesh",
    "hostmaster.mesh",
    "x.hostmaster.mesh",
    "example.com",
]


def scratch_server(zone: Zone) -> Callable[[bytes, str], bytes]:
    """What a DNS server built afresh on the zone's table says: its authority path alone."""
    authority = MeshAuthority(CONFIG, ["127.0.0.1", "::1"])
    authority.update(zone.snapshot)
    factory = KumaDNSServerFactory(authority, mesh_lookup(lambda: zone.snapshot), Metrics("z"))
    proto = KumaDNSDatagramProtocol(factory)
    capture = Capture()
    proto._sendto = capture

    def answer(query: bytes, host: str) -> bytes:
        factory.packetReceived(query, proto, (host, 5353), None)
        return capture.sent.pop()

    return answer


def change_corpus(zone: Zone, rng: random.Random) -> list[tuple[bytes, str]]:
    """Every name in every mesh, each type, in random case and EDNS state; random names too."""
    names = corpus_names(zone) + CHANGE_NAMES
    # Random names, several of one length: their negative answers share a tail.
    names += [f"r{rng.randrange(10**6, 10**7)}.mesh" for _ in range(4)]
    names += [f"r{rng.randrange(10**6, 10**7)}.redis.mesh" for _ in range(2)]
    queries = []
    for name in names:
        for rdtype in CHANGE_TYPES:
            for host in CLIENTS.values():
                edns = rng.randrange(3)
                query = make_query(
                    random_case(rng, name), rdtype, edns, rng.random() < 0.5, "IN", rng
                )
                queries.append((query, host))
    return queries


def test_hot_answers_equal_a_fresh_server_before_and_after_changes(served) -> None:
    zone, factory, proto, capture = served
    rng = random.Random(SEED)
    for step, (what, services, payments_client) in enumerate(
        [("start", SERVICES, "payments"), *STEPS]
    ):
        if step:
            zone.set_file("/inventory.yaml", inventory(services, payments_client), float(step))
        rcodes = set()
        hot = factory.stats.hot_answers
        queries = change_corpus(zone, rng)
        scratch = scratch_server(zone)
        for query, host in queries:
            reference = scratch(query, host)
            rcodes.add(reference[3] & 0x0F)
            for again in range(3):  # authority path or hot, hot, then by its octets
                proto.datagramReceived(query, (host, 5353))
                assert capture.sent.pop() == reference, (what, again, dns.message.from_wire(query))
        assert {dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.REFUSED} <= rcodes
        # Nearly all of the asks come from the hot path (the cache was warm).
        assert factory.stats.hot_answers - hot > 1.5 * len(queries), what


def test_a_change_keeps_the_answers_of_names_it_does_not_touch(served) -> None:
    zone, factory, proto, capture = served
    host = CLIENTS["default"]
    kept = [dns.message.make_query(name, "A").to_wire() for name in ("redis.mesh", "a_b.mesh")]
    kept.append(dns.message.make_query("mesh", "NS").to_wire())
    gone = dns.message.make_query("backend.mesh", "A").to_wire()
    for query in [*kept, gone]:
        proto.datagramReceived(query, (host, 5353))
    templates = len(factory.hot.templates)
    zone.set_file("/inventory.yaml", inventory([s for s in SERVICES if s[0] != "backend"]), 1.0)
    assert len(factory.hot.templates) == templates - 1
    hot = factory.stats.hot_answers
    for query in kept:
        proto.datagramReceived(query, (host, 5353))
    assert factory.stats.hot_answers == hot + len(kept)
    proto.datagramReceived(gone, (host, 5353))
    assert dns.message.from_wire(capture.sent.pop()).rcode() == dns.rcode.NXDOMAIN


def test_negative_answers_carry_the_serial_of_the_table(served) -> None:
    zone, _factory, proto, capture = served
    host = CLIENTS["default"]
    for version in range(3):
        if version:
            services = [*SERVICES, (f"new{version}", "default")]
            zone.set_file("/inventory.yaml", inventory(services), float(version))
        for name, rdtype, rcode in [
            ("nope.mesh", "A", dns.rcode.NXDOMAIN),
            ("redis.mesh", "TXT", dns.rcode.NOERROR),
            ("mesh", "SOA", dns.rcode.NOERROR),
        ]:
            for _ in range(3):
                query = dns.message.make_query(random_case(random.Random(version), name), rdtype)
                proto.datagramReceived(query.to_wire(), (host, 5353))
                answer = dns.message.from_wire(capture.sent.pop())
                assert answer.rcode() == rcode
                (soa,) = answer.authority or answer.answer
                assert soa[0].serial == zone.snapshot.version


def test_a_flood_of_random_names_is_answered_hot_and_evicts_nothing(served) -> None:
    _zone, factory, proto, capture = served
    rng = random.Random(SEED)
    host = CLIENTS["payments"]
    known = [dns.message.make_query(name, "A").to_wire() for name in ("redis.mesh", "ledger.mesh")]
    for query in known * 2:
        proto.datagramReceived(query, (host, 5353))
    hot = factory.hot
    before = (dict(hot.templates), {mesh: dict(known) for mesh, known in hot.exact.items()})
    answered = factory.stats.hot_answers
    flood = 2000
    for _ in range(flood):
        # Random names of a few lengths, in the domain, below a service, and outside it.
        name = rng.choice(["{}.mesh", "{}.redis.mesh", "{}.example.com"]).format(
            "".join(
                rng.choice("abcdefghijklmnopqrstuvwxyz0123456789")
                for _ in range(rng.randrange(8, 12))
            )
        )
        query = make_query(
            random_case(rng, name), rng.choice(["A", "AAAA"]), rng.randrange(3), True, "IN", rng
        )
        proto.datagramReceived(query, (host, 5353))
        expected = dns.rcode.REFUSED if name.endswith("example.com") else dns.rcode.NXDOMAIN
        assert dns.message.from_wire(capture.sent.pop()).rcode() == expected
    assert (hot.templates, hot.exact) == before
    # One authority-path answer per kind of tail (rcode, length, EDNS state): a few dozen.
    assert factory.stats.hot_answers - answered > flood - 100
    assert len(hot.tails) < 100
    answered = factory.stats.hot_answers
    for query in known:
        proto.datagramReceived(query, (host, 5353))
    assert factory.stats.hot_answers == answered + len(known)


def test_a_negative_answer_is_kept_by_its_octets_from_its_second_ask_until_a_change(
    served, monkeypatch
) -> None:
    """Asked again, a negative answer comes by its octets; a change of the table drops it."""
    zone, factory, proto, capture = served
    host = CLIENTS["default"]
    hot = factory.hot
    query = dns.message.make_query("new.mesh", "A").to_wire()
    answers = []
    for _ in range(3):
        proto.datagramReceived(query, (host, 5353))
        answers.append(capture.sent.pop())
    assert [dns.message.from_wire(a).rcode() for a in answers] == [dns.rcode.NXDOMAIN] * 3
    assert list(hot.negatives["default"]) == [query[4:]]  # from the second ask
    assert hot.negatives.get("payments", {}) == {}
    # Answered by its octets now: the hot key is not even worked out.
    monkeypatch.setattr("kumazone.dns.server.hot_key", None)
    proto.datagramReceived(query, (host, 5353))
    assert capture.sent.pop() == answers[0]
    monkeypatch.undo()

    context = hot.negative_context()
    zone.set_file("/inventory.yaml", inventory([*SERVICES, ("new", "default")]), 1.0)
    assert hot.negatives["default"] == {}
    # What the C loop reads is made anew after a change, from the authority's maps now.
    assert hot.negative_context() is not context
    assert hot.negative_context()[:2] == factory.authority.forward_maps()
    factory.authority.update(zone.snapshot)  # a full build: new maps, and the cache told
    hot.clear()
    assert hot.negative_context()[0] is factory.authority.forward_maps()[0]
    proto.datagramReceived(query, (host, 5353))
    answer = dns.message.from_wire(capture.sent.pop())
    assert answer.rcode() == dns.rcode.NOERROR and answer.answer


def test_a_flood_of_random_names_keeps_few_negative_answers(served, monkeypatch) -> None:
    """Names asked once are never kept; those asked twice, at most MAX_NEGATIVE_ENTRIES."""
    _zone, factory, proto, capture = served
    monkeypatch.setattr(hotpath, "MAX_NEGATIVE_ENTRIES", 40)
    host = CLIENTS["default"]
    hot = factory.hot
    names = [f"flood-{i}.mesh" for i in range(300)]
    for name in names:
        proto.datagramReceived(dns.message.make_query(name, "A").to_wire(), (host, 5353))
        capture.sent.pop()
    assert hot._negative_entries == 0 and not any(hot.negatives.values())
    assert len(hot._negative_once) <= 40
    for name in [name for name in names for _ in range(2)]:  # each twice in a row
        proto.datagramReceived(dns.message.make_query(name, "A").to_wire(), (host, 5353))
        assert dns.message.from_wire(capture.sent.pop()).rcode() == dns.rcode.NXDOMAIN
    kept = sum(len(known) for known in hot.negatives.values())
    assert 0 < kept == hot._negative_entries <= 40


def test_a_flood_of_one_real_name_in_random_forms_evicts_no_other_name(served) -> None:
    """Random case of a real name makes new octet forms; few are kept, others stay hot."""
    _zone, factory, proto, capture = served
    rng = random.Random(SEED)
    host = CLIENTS["payments"]
    known = dns.message.make_query("ledger.mesh", "A").to_wire()
    for _ in range(2):
        proto.datagramReceived(known, (host, 5353))
    hot = factory.hot
    hot.max_entries = 50  # a small cache, so that the flood would fill it many times
    templates_before = dict(hot.templates)
    for _ in range(2000):
        query = make_query(random_case(rng, "redis.mesh"), "A", 0, True, "IN", rng)
        proto.datagramReceived(query, (host, 5353))
        assert dns.message.from_wire(capture.sent.pop()).rcode() == dns.rcode.NOERROR
    # Every template kept before is still there (the flood's own name added one).
    assert templates_before.items() <= hot.templates.items()
    assert hot._exact_entries <= hot.max_entries
    answered = factory.stats.hot_answers
    proto.datagramReceived(known, (host, 5353))
    assert factory.stats.hot_answers == answered + 1


@settings(max_examples=20, deadline=None)
@given(states)
def test_any_sequence_of_changes_answers_as_a_fresh_server(sequence) -> None:
    """Authority and cache kept by ZoneChanges answer as a fresh server with no cache."""
    meshes = {"192.0.2.1": "default", "192.0.2.2": "payments", "192.0.2.200": "default"}
    authority = MeshAuthority(CONFIG, ["127.0.0.1"])
    factory = KumaDNSServerFactory(authority, meshes.__getitem__, Metrics("z"))
    proto = KumaDNSDatagramProtocol(factory)
    capture = Capture()
    proto._sendto = capture
    before: tuple[VipEntry, ...] = ()
    for version, state in enumerate(sequence, 1):
        after = as_entries(state)
        change = diff(before, after, version)
        authority.apply(change)
        factory.hot.apply(change)
        fresh = MeshAuthority(CONFIG, ["127.0.0.1"])
        fresh.update(change.snapshot)
        reference = KumaDNSServerFactory(fresh, meshes.__getitem__, Metrics("z"))
        rng = random.Random(version)
        for name in POOL_NAMES:
            text = random_case(rng, name.decode())
            for rdtype in rng.sample(["A", "AAAA", "PTR", "TXT", "SOA", "ANY"], 2):
                host = rng.choice(list(meshes))
                query = make_query(text, rdtype, rng.randrange(3), True, "IN", rng)
                reference.packetReceived(query, proto, (host, 5353), None)
                expected = capture.sent.pop()
                for _ in range(3):  # the third by its octets, negative answers too
                    proto.datagramReceived(query, (host, 5353))
                    assert capture.sent.pop() == expected, (version, text, rdtype, host)
        before = after
