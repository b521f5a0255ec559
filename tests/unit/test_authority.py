"""Tests for kumazone.dns.authority: reverse domains and answers from a hand-built snapshot.

No sockets: L{MeshAuthority.resolve} is called directly, the way the DNS server
calls it for a client of a given mesh.
"""

from __future__ import annotations

import itertools
import socket
import sys
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.names import dns

from kumazone.core.config import DnsServerConfig
from kumazone.core.vips import ServiceKey
from kumazone.core.zone import VipEntry, ZoneChange, ZoneSnapshot
from kumazone.dns.authority import MeshAuthority, NameNotFound, NotOurs, reverse_domains

CONFIG = DnsServerConfig()  # mesh, 240.0.0.0/4, fd00:fd00::/64, TTL 60
VERSION = 42

REDIS = VipEntry(ServiceKey("default", "redis"), "240.0.0.10", "fd00:fd00::a", ("redis.mesh",))
ECHO = VipEntry(
    ServiceKey("default", "echo-server_echo-example_svc_1010"),
    "240.0.0.40",
    "fd00:fd00::28",
    ("echo-server_echo-example_svc_1010.mesh", "echo-server.echo-example.svc.1010.mesh"),
)
PAYMENTS_REDIS = VipEntry(
    ServiceKey("payments", "redis"), "240.0.0.20", "fd00:fd00::14", ("redis.mesh",)
)
LEDGER = VipEntry(ServiceKey("payments", "ledger"), "240.0.0.30", "fd00:fd00::1e", ("ledger.mesh",))
# Only in mesh payments: its dotted form makes v1.mesh an empty non-terminal there.
PAYMENTS_API = VipEntry(
    ServiceKey("payments", "api_v1"), "240.0.0.50", "fd00:fd00::32", ("api_v1.mesh", "api.v1.mesh")
)

ENTRIES = (REDIS, ECHO, LEDGER, PAYMENTS_API, PAYMENTS_REDIS)


def make_authority(
    entries: tuple[VipEntry, ...] = ENTRIES,
    version: int = VERSION,
    config: DnsServerConfig = CONFIG,
    nameservers: tuple[str, ...] = (),
) -> MeshAuthority:
    authority = MeshAuthority(config, nameservers)
    authority.update(ZoneSnapshot(version=version, entries=entries, mesh_of_address={}))
    return authority


def values(records: list[dns.RRHeader]) -> list[str]:
    """The data of A, AAAA and PTR records as text."""
    result = []
    for record in records:
        payload = record.payload
        if record.type == dns.A:
            result.append(payload.dottedQuad())
        elif record.type == dns.AAAA:
            result.append(socket.inet_ntop(socket.AF_INET6, payload.address))
        elif record.type == dns.PTR:
            result.append(payload.name.name.decode())
        else:
            raise AssertionError(f"unexpected record {record}")
    return result


def address_of(authority: MeshAuthority, name: bytes, qtype: int, mesh: str) -> str:
    answers, _, _ = authority.resolve(name, qtype, dns.IN, mesh)
    assert len(answers) == 1, (name, mesh, answers)
    return values(answers)[0]


def reverse(address: str) -> bytes:
    return ip_address(address).reverse_pointer.encode()


def assert_soa(record: dns.RRHeader, owner: bytes, serial: int) -> None:
    assert record.type == dns.SOA
    assert record.name.name == owner
    assert record.auth
    assert record.payload.serial == serial
    assert record.payload.mname.name == b"ns.dns.mesh"
    # The negative-caching TTL is the zone's TTL, never 0 (Consul's complaint).
    assert record.payload.minimum == CONFIG.ttl
    assert record.ttl == CONFIG.ttl


# -- reverse_domains -------------------------------------------------------------

REVERSE_ZONE_CASES = [
    ("240.0.0.0/4", [f"{octet}.in-addr.arpa" for octet in range(240, 256)]),
    ("10.0.0.0/8", ["10.in-addr.arpa"]),
    ("172.16.0.0/12", [f"{octet}.172.in-addr.arpa" for octet in range(16, 32)]),
    ("10.1.2.4/30", [f"{last}.2.1.10.in-addr.arpa" for last in range(4, 8)]),
    ("fd00:fd00::/64", ["0.0.0.0.0.0.0.0.0.0.d.f.0.0.d.f.ip6.arpa"]),
    (
        "fd00:fd00::/62",
        [f"{nibble}.0.0.0.0.0.0.0.0.0.d.f.0.0.d.f.ip6.arpa" for nibble in range(4)],
    ),
]


@pytest.mark.parametrize(("cidr", "expected"), REVERSE_ZONE_CASES)
def test_reverse_zones(cidr: str, expected: list[str]) -> None:
    assert reverse_domains(ip_network(cidr)) == expected


@pytest.mark.parametrize(("cidr", "expected"), REVERSE_ZONE_CASES)
def test_reverse_zones_cover_the_network_and_nothing_outside(
    cidr: str, expected: list[str]
) -> None:
    network = ip_network(cidr)
    zones = reverse_domains(network)

    address_type = type(network.network_address)

    def covered(number: int) -> bool:
        name = address_type(number).reverse_pointer
        return any(name == zone or name.endswith("." + zone) for zone in zones)

    first, last = int(network.network_address), int(network.broadcast_address)
    assert covered(first)
    assert covered(last)
    assert covered((first + last) // 2)
    assert not covered(first - 1)
    if last + 1 < 2**network.max_prefixlen:
        assert not covered(last + 1)


# -- forward answers -----------------------------------------------------------


@pytest.mark.parametrize(("qtype", "expected"), [(dns.A, "240.0.0.10"), (dns.AAAA, "fd00:fd00::a")])
def test_address_answer_with_ttl_and_aa(qtype: int, expected: str) -> None:
    answers, authority_section, additional = make_authority().resolve(b"redis.mesh", qtype, dns.IN)
    assert values(answers) == [expected]
    assert answers[0].ttl == 60
    assert answers[0].auth
    assert answers[0].type == qtype
    assert authority_section == []
    assert additional == []


def test_answer_repeats_the_name_as_asked() -> None:
    answers, _, _ = make_authority().resolve(b"ReDiS.MeSh", dns.A, dns.IN)
    assert values(answers) == ["240.0.0.10"]
    assert answers[0].name.name == b"ReDiS.MeSh"


def test_trailing_dot_is_the_same_name() -> None:
    assert address_of(make_authority(), b"redis.mesh.", dns.A, "default") == "240.0.0.10"


@pytest.mark.parametrize(
    "name",
    [b"echo-server_echo-example_svc_1010.mesh", b"echo-server.echo-example.svc.1010.mesh"],
)
@pytest.mark.parametrize(
    ("qtype", "expected"), [(dns.A, "240.0.0.40"), (dns.AAAA, "fd00:fd00::28")]
)
def test_both_name_forms_give_the_same_vip(name: bytes, qtype: int, expected: str) -> None:
    assert address_of(make_authority(), name, qtype, "default") == expected


def test_any_gives_a_and_aaaa() -> None:
    answers, _, _ = make_authority().resolve(b"redis.mesh", dns.ALL_RECORDS, dns.IN)
    assert sorted(values(answers)) == ["240.0.0.10", "fd00:fd00::a"]


@pytest.mark.parametrize("qtype", [dns.TXT, dns.MX, dns.SRV, dns.CNAME])
def test_known_name_other_type_is_nodata_with_soa(qtype: int) -> None:
    answers, authority_section, additional = make_authority().resolve(b"redis.mesh", qtype, dns.IN)
    assert answers == []
    assert additional == []
    assert len(authority_section) == 1
    assert_soa(authority_section[0], b"mesh", VERSION)


@pytest.mark.parametrize("name", [b"svc.1010.mesh", b"echo-example.svc.1010.mesh", b"1010.mesh"])
def test_empty_non_terminal_is_nodata(name: bytes) -> None:
    answers, authority_section, _ = make_authority().resolve(name, dns.A, dns.IN)
    assert answers == []
    assert_soa(authority_section[0], b"mesh", VERSION)


def test_unknown_name_raises_name_not_found_carrying_the_soa() -> None:
    with pytest.raises(NameNotFound) as caught:
        make_authority().resolve(b"nosuch.mesh", dns.A, dns.IN)
    assert len(caught.value.authority) == 1
    assert_soa(caught.value.authority[0], b"mesh", VERSION)


def test_name_below_a_service_is_not_found() -> None:
    with pytest.raises(NameNotFound):
        make_authority().resolve(b"x.redis.mesh", dns.A, dns.IN)


def test_soa_and_ns_at_the_apex() -> None:
    authority = make_authority()
    answers, authority_section, _ = authority.resolve(b"mesh", dns.SOA, dns.IN)
    assert len(answers) == 1 and authority_section == []
    assert_soa(answers[0], b"mesh", VERSION)
    answers, _, _ = authority.resolve(b"mesh", dns.NS, dns.IN)
    assert [a.type for a in answers] == [dns.NS]
    assert answers[0].payload.name.name == b"ns.dns.mesh"
    assert answers[0].auth


def test_nameserver_name_resolves_to_its_address() -> None:
    authority = make_authority(nameservers=("127.0.0.1",))
    assert address_of(authority, b"ns.dns.mesh", dns.A, "default") == "127.0.0.1"


def test_nameserver_name_has_a_and_aaaa_of_every_address() -> None:
    authority = make_authority(nameservers=("192.0.2.53", "2001:db8::53", "198.51.100.53"))
    answers, _, _ = authority.resolve(b"NS.dns.mesh", dns.A, dns.IN)
    assert [a.payload.dottedQuad() for a in answers] == ["192.0.2.53", "198.51.100.53"]
    assert all(a.name.name == b"NS.dns.mesh" and a.auth for a in answers)
    answers, _, _ = authority.resolve(b"ns.dns.mesh", dns.AAAA, dns.IN)
    assert [a.type for a in answers] == [dns.AAAA]
    answers, authority_section, _ = authority.resolve(b"ns.dns.mesh", dns.TXT, dns.IN)
    assert answers == [] and [a.type for a in authority_section] == [dns.SOA]


@pytest.mark.parametrize("apex", [b"mesh", b"240.in-addr.arpa"])
def test_ns_answer_carries_the_nameserver_addresses(apex: bytes) -> None:
    """The in-bailiwick NS name's addresses go with the NS record, as glue does."""
    authority = make_authority(nameservers=("192.0.2.53", "2001:db8::53"))
    answers, _, additional = authority.resolve(apex, dns.NS, dns.IN)
    assert [a.type for a in answers] == [dns.NS]
    assert [(a.name.name, a.type) for a in additional] == [
        (b"ns.dns.mesh", dns.A),
        (b"ns.dns.mesh", dns.AAAA),
    ]
    _, _, additional = authority.resolve(apex, dns.SOA, dns.IN)
    assert additional == []


def test_soa_serial_follows_the_snapshot_version() -> None:
    authority = make_authority(version=7)
    authority.update(ZoneSnapshot(version=8, entries=ENTRIES, mesh_of_address={}))
    answers, _, _ = authority.resolve(b"mesh", dns.SOA, dns.IN)
    assert answers[0].payload.serial == 8


def test_update_removes_a_deleted_service_forward_and_reverse() -> None:
    authority = make_authority()
    authority.update(ZoneSnapshot(version=VERSION + 1, entries=(ECHO, LEDGER), mesh_of_address={}))
    with pytest.raises(NameNotFound):
        authority.resolve(b"redis.mesh", dns.A, dns.IN)
    with pytest.raises(NameNotFound):
        authority.resolve(reverse(REDIS.vip), dns.PTR, dns.IN)


@pytest.mark.parametrize(
    ("name", "qclass", "qtype"),
    [
        (b"example.com", dns.IN, dns.A),
        (b"mesh.example.com", dns.IN, dns.A),
        (b"xmesh", dns.IN, dns.A),
        (b"version.bind", dns.CH, dns.TXT),
        (b"redis.mesh", dns.CH, dns.A),
        (b"mesh", dns.IN, dns.AXFR),
        (b"10.0.0.10.in-addr.arpa", dns.IN, dns.PTR),
    ],
)
def test_names_classes_and_transfers_that_are_not_ours(
    name: bytes, qclass: int, qtype: int
) -> None:
    with pytest.raises(NotOurs):
        make_authority().resolve(name, qtype, qclass)


# -- meshes -----------------------------------------------------------------------


def test_same_name_in_two_meshes_gives_each_mesh_its_own_vip() -> None:
    authority = make_authority()
    assert address_of(authority, b"redis.mesh", dns.A, "default") == "240.0.0.10"
    assert address_of(authority, b"redis.mesh", dns.A, "payments") == "240.0.0.20"
    assert address_of(authority, b"redis.mesh", dns.AAAA, "default") == "fd00:fd00::a"
    assert address_of(authority, b"redis.mesh", dns.AAAA, "payments") == "fd00:fd00::14"


def test_name_only_in_another_mesh_is_nxdomain() -> None:
    authority = make_authority()
    assert address_of(authority, b"ledger.mesh", dns.A, "payments") == "240.0.0.30"
    with pytest.raises(NameNotFound) as caught:
        authority.resolve(b"ledger.mesh", dns.A, dns.IN, "default")
    assert_soa(caught.value.authority[0], b"mesh", VERSION)


def test_a_name_of_one_mesh_is_nxdomain_for_an_unknown_mesh() -> None:
    with pytest.raises(NameNotFound):
        make_authority().resolve(b"redis.mesh", dns.A, dns.IN, "staging")


def test_empty_non_terminal_of_another_mesh_is_nxdomain() -> None:
    authority = make_authority()
    answers, authority_section, _ = authority.resolve(b"v1.mesh", dns.A, dns.IN, "payments")
    assert answers == [] and authority_section[0].type == dns.SOA
    with pytest.raises(NameNotFound):
        authority.resolve(b"v1.mesh", dns.A, dns.IN, "default")


def test_ptr_of_another_meshs_vip_is_not_answered() -> None:
    authority = make_authority()
    for address in (LEDGER.vip, LEDGER.vip6, PAYMENTS_REDIS.vip, PAYMENTS_REDIS.vip6):
        with pytest.raises(NameNotFound):
            authority.resolve(reverse(address), dns.PTR, dns.IN, "default")
        answers, _, _ = authority.resolve(reverse(address), dns.PTR, dns.IN, "payments")
        assert len(answers) == 1


def test_query_passes_the_mesh_through() -> None:
    """The IResolver entry point the server uses answers per mesh too."""
    authority = make_authority()
    results: list[object] = []
    authority.query(dns.Query(b"redis.mesh", dns.A, dns.IN), mesh="payments").addBoth(
        results.append
    )
    answers, _, _ = results[0]  # type: ignore[misc]
    assert values(answers) == ["240.0.0.20"]
    failures: list[object] = []
    authority.query(dns.Query(b"ledger.mesh", dns.A, dns.IN), mesh="default").addErrback(
        failures.append
    )
    assert len(failures) == 1
    assert failures[0].check(NameNotFound)  # type: ignore[attr-defined]


# -- PTR ----------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: str(e.key))
def test_ptr_for_both_vips_names_the_dns_compliant_form(entry: VipEntry) -> None:
    authority = make_authority()
    compliant = entry.key.service.replace("_", ".") + ".mesh"
    for address in (entry.vip, entry.vip6):
        answers, _, _ = authority.resolve(reverse(address), dns.PTR, dns.IN, entry.key.mesh)
        assert values(answers) == [compliant]
        assert answers[0].ttl == 60 and answers[0].auth


def test_ptr_is_case_insensitive_and_repeats_the_name() -> None:
    asked = reverse(REDIS.vip6).upper()
    answers, _, _ = make_authority().resolve(asked, dns.PTR, dns.IN)
    assert values(answers) == ["redis.mesh"]
    assert answers[0].name.name == asked


def test_unknown_address_in_the_range_is_nxdomain_with_the_reverse_soa() -> None:
    with pytest.raises(NameNotFound) as caught:
        make_authority().resolve(b"99.0.0.240.in-addr.arpa", dns.PTR, dns.IN)
    assert caught.value.authority[0].type == dns.SOA
    assert caught.value.authority[0].name.name == b"240.in-addr.arpa"


def test_service_without_a_dns_name_has_no_ptr() -> None:
    nameless = VipEntry(
        ServiceKey("default", "bad name!"),
        "240.0.0.60",
        "fd00:fd00::3c",
        (),
        ("'bad name!.mesh': character(s) ' !' not allowed in a DNS name",),
    )
    authority = make_authority((*ENTRIES, nameless))
    with pytest.raises(NameNotFound):
        authority.resolve(reverse(nameless.vip), dns.PTR, dns.IN)


def test_ptr_in_a_30_whose_reverse_zones_are_single_addresses() -> None:
    """A /30 is a valid CIDR; each of its reverse zones is one address's name."""
    config = DnsServerConfig(cidr=IPv4Network("10.0.0.0/30"), cidr6=IPv6Network("fd00::/126"))
    entry = VipEntry(ServiceKey("default", "redis"), "10.0.0.1", "fd00::1", ("redis.mesh",))
    authority = make_authority((entry,), config=config)
    for address in (entry.vip, entry.vip6):
        answers, _, _ = authority.resolve(reverse(address), dns.PTR, dns.IN)
        assert values(answers) == ["redis.mesh"], address


# -- name collisions -----------------------------------------------------------------

# Two services of one mesh whose names meet: the snapshot lists entries sorted by
# (mesh, service), and the first one to claim a name keeps it.
DOTTED = VipEntry(ServiceKey("default", "a.b"), "240.0.1.1", "fd00:fd00::101", ("a.b.mesh",))
UNDERSCORED = VipEntry(
    ServiceKey("default", "a_b"), "240.0.1.2", "fd00:fd00::102", ("a_b.mesh", "a.b.mesh")
)
UPPER = VipEntry(ServiceKey("default", "CACHE"), "240.0.1.3", "fd00:fd00::103", ("cache.mesh",))
LOWER = VipEntry(ServiceKey("default", "cache"), "240.0.1.4", "fd00:fd00::104", ("cache.mesh",))


@pytest.mark.parametrize(
    ("first", "second", "shared"),
    [(DOTTED, UNDERSCORED, b"a.b.mesh"), (UPPER, LOWER, b"cache.mesh")],
    ids=["underscore", "case"],
)
def test_first_service_wins_a_name_collision(
    first: VipEntry, second: VipEntry, shared: bytes
) -> None:
    assert sorted([second.key, first.key], key=lambda k: (k.mesh, k.service))[0] == first.key
    authority = make_authority((first, second))
    assert address_of(authority, shared, dns.A, "default") == first.vip
    assert address_of(authority, shared, dns.AAAA, "default") == first.vip6


def test_collision_loser_keeps_its_other_name() -> None:
    authority = make_authority((DOTTED, UNDERSCORED))
    assert address_of(authority, b"a_b.mesh", dns.A, "default") == UNDERSCORED.vip


def test_collision_in_one_mesh_does_not_touch_another_mesh() -> None:
    other = VipEntry(
        ServiceKey("payments", "a_b"), "240.0.1.9", "fd00:fd00::109", ("a_b.mesh", "a.b.mesh")
    )
    authority = make_authority((DOTTED, UNDERSCORED, other))
    assert address_of(authority, b"a.b.mesh", dns.A, "payments") == other.vip


def test_ptr_of_a_collision_loser_names_a_name_that_resolves_back_to_it() -> None:
    """Forward-confirmed reverse DNS: the PTR target must resolve to the same VIP."""
    authority = make_authority((DOTTED, UNDERSCORED))
    for entry in (DOTTED, UNDERSCORED):
        for address, qtype in ((entry.vip, dns.A), (entry.vip6, dns.AAAA)):
            answers, _, _ = authority.resolve(reverse(address), dns.PTR, dns.IN)
            target = values(answers)[0].encode()
            assert address_of(authority, target, qtype, "default") == address, (
                f"PTR {address} -> {target.decode()}, which resolves elsewhere"
            )


@pytest.mark.parametrize(
    "name",
    [
        b"12.240.in-addr.arpa",
        b"0.12.240.in-addr.arpa",
        b"1.0.0.0.0.0.0.0.0.0.0.d.f.0.0.d.f.ip6.arpa",
    ],
)
def test_interior_reverse_names_are_nodata(name: bytes) -> None:
    answers, authority, _ = make_authority().resolve(name, dns.PTR, dns.IN)
    assert answers == [] and authority[0].type == dns.SOA


@pytest.mark.parametrize(
    "name",
    [
        b"foo.240.in-addr.arpa",
        b"012.240.in-addr.arpa",
        b"300.240.in-addr.arpa",
        b"zz.0.0.0.0.0.0.0.0.0.0.d.f.0.0.d.f.ip6.arpa",
    ],
)
def test_reverse_names_that_cannot_exist_are_nxdomain(name: bytes) -> None:
    with pytest.raises(NameNotFound):
        make_authority().resolve(name, dns.PTR, dns.IN)


# -- incremental changes ----------------------------------------------------------------
#
# MeshAuthority.apply(change) must leave the authority answering exactly as one
# built from scratch from the table after the change, for every name.

PAYMENTS_EXTRA = VipEntry(
    ServiceKey("payments", "x_y_z"), "240.0.0.60", "fd00:fd00::3c", ("x_y_z.mesh", "x.y.z.mesh")
)
NAMELESS = VipEntry(ServiceKey("default", "nameless"), "240.0.0.70", "fd00:fd00::46", ())
QTYPES = (dns.A, dns.AAAA, dns.PTR, dns.TXT, dns.ALL_RECORDS, dns.SOA, dns.NS, dns.MX)
MESHES = ("default", "payments", "elsewhere")


def diff(before: tuple[VipEntry, ...], after: tuple[VipEntry, ...], version: int) -> ZoneChange:
    """The change from C{before} to C{after}, as the zone gives it: old and new forms by key."""
    old = {entry.key: entry for entry in before}
    new = {entry.key: entry for entry in after}
    snapshot = ZoneSnapshot(
        version=version, entries=tuple(sorted(after, key=lambda e: e.key)), mesh_of_address={}
    )
    return ZoneChange(
        snapshot=snapshot,
        removed=tuple(entry for key, entry in old.items() if new.get(key) != entry),
        added=tuple(entry for key, entry in new.items() if old.get(key) != entry),
    )


def corpus(entries: tuple[VipEntry, ...]) -> list[bytes]:
    """Names to ask: the entries' names, their parents and children, reverse names, others."""
    names = {b"mesh", b"ns.dns.mesh", b"dns.mesh", b"nope.mesh", b"240.in-addr.arpa"}
    names.add(b"0.0.0.0.0.0.0.0.0.0.d.f.0.0.d.f.ip6.arpa")
    for entry in entries:
        for text in entry.names:
            name = text.encode()
            names.update({name, b"x." + name, name.split(b".", 1)[1]})
            if name.count(b".") > 1:
                names.add(name.split(b".", 2)[2])
        names.update({reverse(entry.vip), reverse(entry.vip6)})
    return sorted(names)


def outcome(authority: MeshAuthority, name: bytes, qtype: int, mesh: str) -> object:
    """What the authority answers, comparable (records compare by value)."""
    try:
        return authority.resolve(name, qtype, dns.IN, mesh)
    except NameNotFound as e:
        return ("NXDOMAIN", e.authority)
    except NotOurs:
        return "REFUSED"


def assert_same_answers(
    incremental: MeshAuthority,
    entries: tuple[VipEntry, ...],
    version: int,
    names: list[bytes],
    qtypes: tuple[int, ...] = QTYPES,
    meshes: tuple[str, ...] = MESHES,
) -> None:
    scratch = make_authority(tuple(sorted(entries, key=lambda e: e.key)), version)
    for name in names:
        for qtype in qtypes:
            for mesh in meshes:
                assert outcome(incremental, name, qtype, mesh) == outcome(
                    scratch, name, qtype, mesh
                ), (name, qtype, mesh)


def test_apply_adds_and_removes_services_as_a_full_build_would() -> None:
    steps: list[tuple[VipEntry, ...]] = [
        ENTRIES,
        (*ENTRIES, PAYMENTS_EXTRA, NAMELESS),  # added: new empty non-terminals in payments
        (REDIS, ECHO, PAYMENTS_EXTRA),  # removed: api.v1.mesh's v1.mesh goes
        # Replaced: a new VIP, and one name form dropped.
        (REDIS.replace(vip="240.0.0.99", vip6="fd00:fd00::63"), ECHO, PAYMENTS_EXTRA),
        (ECHO.replace(names=ECHO.names[:1]), PAYMENTS_EXTRA),
        (),
    ]
    authority = make_authority(steps[0])
    names = [*corpus((*ENTRIES, PAYMENTS_EXTRA, NAMELESS)), reverse("240.0.0.99")]
    for version, (before, after) in enumerate(itertools.pairwise(steps), VERSION + 1):
        authority.apply(diff(before, after, version))
        assert_same_answers(authority, after, version, names)


def test_an_empty_non_terminal_stays_while_any_name_below_it_does() -> None:
    deep = VipEntry(ServiceKey("payments", "b_v1"), "240.0.0.80", "fd00:fd00::50", ("b.v1.mesh",))
    authority = make_authority((PAYMENTS_API,))
    authority.apply(diff((PAYMENTS_API,), (PAYMENTS_API, deep), VERSION + 1))
    authority.apply(diff((PAYMENTS_API, deep), (deep,), VERSION + 2))
    assert authority.resolve(b"v1.mesh", dns.A, dns.IN, "payments")[0] == []  # NODATA
    authority.apply(diff((deep,), (), VERSION + 3))
    with pytest.raises(NameNotFound):
        authority.resolve(b"v1.mesh", dns.A, dns.IN, "payments")


def test_a_contested_name_passes_to_the_next_claimant_with_its_ptr() -> None:
    authority = make_authority((DOTTED, UNDERSCORED))
    authority.apply(diff((DOTTED, UNDERSCORED), (UNDERSCORED,), VERSION + 1))
    assert address_of(authority, b"a.b.mesh", dns.A, "default") == UNDERSCORED.vip
    # The PTR now names the DNS-compliant form, which it owns at last.
    assert values(authority.resolve(reverse(UNDERSCORED.vip), dns.PTR, dns.IN)[0]) == ["a.b.mesh"]
    assert authority.ptr_offset(reverse(UNDERSCORED.vip)) in authority.changed_offsets
    authority.apply(diff((UNDERSCORED,), (DOTTED, UNDERSCORED), VERSION + 2))
    assert address_of(authority, b"a.b.mesh", dns.A, "default") == DOTTED.vip
    assert values(authority.resolve(reverse(UNDERSCORED.vip), dns.PTR, dns.IN)[0]) == ["a_b.mesh"]
    assert_same_answers(
        authority, (DOTTED, UNDERSCORED), VERSION + 2, corpus((DOTTED, UNDERSCORED))
    )


def test_changed_names_are_those_of_the_entries_changed() -> None:
    authority = make_authority()
    authority.apply(diff(ENTRIES, (*ENTRIES, PAYMENTS_EXTRA), VERSION + 1))
    assert authority.changed == {"x_y_z.mesh", "x.y.z.mesh"}
    # Its PTRs, by the VIP's offset: the one both its reverse names stand for.
    [offset] = authority.changed_offsets
    assert authority.ptr_offset(reverse(PAYMENTS_EXTRA.vip)) == offset
    assert authority.ptr_offset(reverse(PAYMENTS_EXTRA.vip6)) == offset
    assert authority.ptr_offset(b"0.240.in-addr.arpa") is None  # not a VIP's own name


def test_changed_names_of_a_new_service_of_one_label() -> None:
    """The usual new service (one name, one label, no one else's): the same account."""
    web = VipEntry(ServiceKey("default", "web"), "240.0.0.93", "fd00:fd00::5d", ("web.mesh",))
    authority = make_authority()
    authority.apply(diff(ENTRIES, (*ENTRIES, web), VERSION + 1))
    assert authority.changed == {"web.mesh"}
    assert authority.changed_offsets == {authority.ptr_offset(reverse(web.vip))}
    assert values(authority.resolve(reverse(web.vip6), dns.PTR, dns.IN)[0]) == ["web.mesh"]


def test_a_full_change_rebuilds_from_the_snapshot() -> None:
    authority = make_authority()
    snapshot = ZoneSnapshot(version=VERSION + 1, entries=(LEDGER,), mesh_of_address={})
    authority.apply(ZoneChange(snapshot=snapshot, full=True))
    assert authority.changed is None
    assert_same_answers(authority, (LEDGER,), VERSION + 1, corpus(ENTRIES))


def test_negative_agrees_with_the_answers() -> None:
    """The hot path's negative answers follow MeshAuthority.negative: the same decisions."""
    authority = make_authority((*ENTRIES, PAYMENTS_EXTRA, NAMELESS), nameservers=("127.0.0.1",))
    names = [*corpus((*ENTRIES, PAYMENTS_EXTRA)), b"example.com", b"", b"in-addr.arpa"]
    for name in names:
        for qtype in (*QTYPES, dns.AXFR):
            for qclass in (dns.IN, dns.ANY, dns.CH):
                for mesh in MESHES:
                    try:
                        answers, authority_section, _ = authority.resolve(name, qtype, qclass, mesh)
                    except NameNotFound as e:
                        expected: object = (dns.ENAME, e.authority[0].name.name)
                    except NotOurs:
                        expected = (dns.EREFUSED, None)
                    else:
                        expected = None if answers else (dns.OK, authority_section[0].name.name)
                    found = authority.negative(name, qtype, qclass, mesh)
                    assert found == expected, (name, qtype, qclass, mesh)


# A pool of entries, in several forms each, for the property test: collisions
# (a.b.mesh), empty non-terminals (v1.mesh, y.z.mesh), two meshes, no names.
POOL = [
    [REDIS, REDIS.replace(vip="240.0.1.10", vip6="fd00:fd00::10a")],
    [ECHO, ECHO.replace(names=ECHO.names[:1]), ECHO.replace(provisional=True)],
    [DOTTED, DOTTED.replace(names=("a.b.mesh", "ab.mesh"))],
    [UNDERSCORED, UNDERSCORED.replace(names=("a_b.mesh",))],
    [PAYMENTS_API, PAYMENTS_API.replace(names=("api_v1.mesh",))],
    [PAYMENTS_EXTRA, PAYMENTS_EXTRA.replace(names=("x.y.z.mesh",))],
    [PAYMENTS_REDIS],
    [NAMELESS],
    [VipEntry(ServiceKey("payments", "a.b"), "240.0.0.90", "fd00:fd00::5a", ("a.b.mesh",))],
    # One label, as most names are (the authority's short way): one that redis.mesh
    # also claims (the least key owns it), and one that is an empty non-terminal
    # of x.y.z.mesh until it comes.
    [VipEntry(ServiceKey("default", "Redis"), "240.0.0.91", "fd00:fd00::5b", ("redis.mesh",))],
    [VipEntry(ServiceKey("payments", "z"), "240.0.0.92", "fd00:fd00::5c", ("z.mesh",))],
]
POOL_NAMES = corpus(tuple(entry for forms in POOL for entry in forms))

# Each state: for each pool entry, absent (None) or one of its forms.
states = st.lists(
    st.tuples(*(st.sampled_from([None, *range(len(forms))]) for forms in POOL)),
    min_size=1,
    max_size=6,
)


def as_entries(state: tuple[int | None, ...]) -> tuple[VipEntry, ...]:
    return tuple(forms[i] for forms, i in zip(POOL, state, strict=True) if i is not None)


@settings(max_examples=40, deadline=None)
@given(states)
def test_any_sequence_of_changes_answers_as_a_full_build(sequence) -> None:
    before: tuple[VipEntry, ...] = ()
    authority = make_authority(before)
    for version, state in enumerate(sequence, VERSION + 1):
        after = as_entries(state)
        authority.apply(diff(before, after, version))
        assert_same_answers(
            authority, after, version, POOL_NAMES, (dns.A, dns.PTR, dns.TXT), MESHES[:2]
        )
        before = after


def test_confirming_provisional_vips_answers_the_same_and_grows_no_map() -> None:
    """The global confirms a zone's provisional VIPs (same names, same VIP): the
    answers follow, PTRs too, and the maps keep their size (a dict does not reuse
    a deleted key's entry: taking each name off and back would grow them)."""
    entries = tuple(
        VipEntry(
            ServiceKey("default", f"s{i}"),
            f"240.0.{i // 250}.{i % 250 + 1}",
            f"fd00:fd00::{i + 1:x}",
            (f"s{i}.mesh",),
            provisional=True,
        )
        for i in range(3000)
    )
    authority = make_authority(entries)
    sizes = (sys.getsizeof(authority._forward["default"]), sys.getsizeof(authority._by_offset))
    before = entries
    version = VERSION
    for provisional in (False, True, False):
        for start in range(0, len(entries), 100):  # in slices, as a zone follows a table
            version += 1
            after = tuple(
                entry.replace(provisional=provisional) if start <= i < start + 100 else entry
                for i, entry in enumerate(before)
            )
            authority.apply(diff(before, after, version))
            before = after
    assert sizes == (
        sys.getsizeof(authority._forward["default"]),
        sys.getsizeof(authority._by_offset),
    )
    assert_same_answers(authority, before[:50], version, corpus(before[:50]), (dns.A, dns.PTR))


def test_an_entry_told_again_without_its_removal_replaces_the_one_held() -> None:
    """A replica that dropped changes its listeners never heard of tells an entry
    again as added only: the one held for that key (same VIP or a name) goes."""
    authority = make_authority((REDIS,))
    again = REDIS.replace(provisional=True)
    snapshot = ZoneSnapshot(version=VERSION + 1, entries=(again,), mesh_of_address={})
    authority.apply(ZoneChange(snapshot, removed=(), added=(again,)))
    assert_same_answers(authority, (again,), VERSION + 1, corpus((REDIS,)), (dns.A, dns.PTR))
    snapshot = ZoneSnapshot(version=VERSION + 2, entries=(), mesh_of_address={})
    authority.apply(ZoneChange(snapshot, removed=(again,), added=()))
    assert_same_answers(authority, (), VERSION + 2, corpus((REDIS,)), (dns.A, dns.PTR))
