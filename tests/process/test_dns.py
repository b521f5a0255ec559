"""The DNS server of a real zone process, as its clients see it.

One `twistd -n kumazone` serves the sample zone (zones/zone-1) plus one loopback
Dataplane in mesh payments at 127.0.0.2, so that a client asking from 127.0.0.2 is
in mesh payments and a client asking from 127.0.0.1 (unknown) is in mesh default.
Queries go over UDP and TCP with dnspython, and with dig and kdig where a second,
independent client adds something.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import socket
import struct
from collections.abc import Iterator
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from tests.builders import as_yaml, dataplane
from tests.kzprocess import REPO, ZoneProcess

DEFAULT_CLIENT = "127.0.0.1"
PAYMENTS_CLIENT = "127.0.0.2"
CLIENT_OF_MESH = {"default": DEFAULT_CLIENT, "payments": PAYMENTS_CLIENT}
TTL = 60
ECHO_SERVICE = "echo-server_echo-example_svc_1010"

# A Dataplane of mesh payments on a loopback address: queries from it are payments'.
LOOPBACK_CLIENTS = as_yaml(
    dataplane("ledger-loopback", "ledger", mesh="payments", address=PAYMENTS_CLIENT, port=9000)
)

TRANSPORTS = pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
TOOLS = pytest.mark.parametrize("tool", ["dig", "kdig"])


@pytest.fixture(scope="module")
def zone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZoneProcess]:
    workdir = tmp_path_factory.mktemp("dns")
    resources = workdir / "resources"
    shutil.copytree(REPO / "zones" / "zone-1", resources)
    (resources / "loopback-clients.yaml").write_text(LOOPBACK_CLIENTS)
    process = ZoneProcess(workdir, resources)
    try:
        yield process.start()
    finally:
        process.stop()


@pytest.fixture(scope="module")
def vips(zone: ZoneProcess) -> dict[str, Any]:
    status, document = zone.api("GET", "/vips")
    assert status == 200, document
    return document


def vip_item(vips: dict[str, Any], mesh: str, service: str) -> dict[str, Any]:
    found = [i for i in vips["items"] if i["mesh"] == mesh and i["service"] == service]
    assert len(found) == 1, (mesh, service, vips)
    return found[0]


# -- clients ---------------------------------------------------------------------------


def exchange(
    zone: ZoneProcess,
    message: dns.message.Message,
    tcp: bool = False,
    source: str | None = None,
) -> dns.message.Message:
    """Send a prepared dnspython message; dnspython checks it is the reply."""
    kwargs: dict[str, Any] = {"timeout": 5.0, "port": zone.ports["dns"]}
    if source is not None:
        kwargs["source"] = source
    send = dns.query.tcp if tcp else dns.query.udp
    return send(message, "127.0.0.1", **kwargs)


def raw_exchange(zone: ZoneProcess, wire: bytes, tcp: bool = False) -> bytes:
    """Send raw octets and return the raw reply (TCP with its 2-octet length)."""
    port = zone.ports["dns"]
    if tcp:
        with socket.create_connection(("127.0.0.1", port), timeout=5.0) as connection:
            connection.sendall(struct.pack("!H", len(wire)) + wire)
            (length,) = struct.unpack("!H", read_exactly(connection, 2))
            return read_exactly(connection, length)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(5.0)
        udp.sendto(wire, ("127.0.0.1", port))
        return udp.recv(65535)


def read_exactly(connection: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = connection.recv(count - len(data))
        assert chunk, f"connection closed after {len(data)} of {count} octets"
        data += chunk
    return data


def answer_values(response: dns.message.Message, rdtype: str) -> list[str]:
    wanted = dns.rdatatype.from_text(rdtype)
    return sorted(
        rdata.to_text() for rrset in response.answer if rrset.rdtype == wanted for rdata in rrset
    )


def only_rrset(section: list[dns.rrset.RRset]) -> dns.rrset.RRset:
    assert len(section) == 1, section
    return section[0]


def assert_aa(response: dns.message.Message) -> None:
    assert response.flags & dns.flags.QR
    assert response.flags & dns.flags.AA, dns.flags.to_text(response.flags)


def assert_soa_in_authority(response: dns.message.Message, version: int) -> None:
    soa = only_rrset(response.authority)
    assert soa.rdtype == dns.rdatatype.SOA
    assert soa.name == dns.name.from_text("mesh")
    assert soa.ttl == TTL
    assert soa[0].serial == version
    assert soa[0].minimum == TTL


def reverse_name(address: str) -> str:
    return ipaddress.ip_address(address).reverse_pointer + "."


def dns_compliant(service: str) -> str:
    return service.replace("_", ".") + ".mesh."


# -- A and AAAA -----------------------------------------------------------------------


@TRANSPORTS
@pytest.mark.parametrize(("rdtype", "field"), [("A", "vip"), ("AAAA", "vip6")])
def test_address_with_ttl_60_and_aa(zone, vips, tcp: bool, rdtype: str, field: str) -> None:
    response = zone.query("redis.mesh", rdtype, tcp=tcp)
    assert response.rcode() == dns.rcode.NOERROR
    assert_aa(response)
    assert not response.flags & dns.flags.TC
    assert not response.flags & dns.flags.RA  # no recursion here
    answer = only_rrset(response.answer)
    assert answer.rdtype == dns.rdatatype.from_text(rdtype)
    assert answer.ttl == TTL
    assert [r.to_text() for r in answer] == [vip_item(vips, "default", "redis")[field]]
    assert response.authority == []


@TRANSPORTS
def test_every_name_in_vips_resolves_for_its_mesh(zone, vips, tcp: bool) -> None:
    assert {i["mesh"] for i in vips["items"]} == {"default", "payments"}
    for item in vips["items"]:
        source = CLIENT_OF_MESH[item["mesh"]]
        for name in item["names"]:
            for rdtype, field in (("A", "vip"), ("AAAA", "vip6")):
                response = zone.query(name, rdtype, tcp=tcp, source=source)
                assert answer_values(response, rdtype) == [item[field]], (name, item["mesh"])


@TRANSPORTS
@pytest.mark.parametrize(("rdtype", "field"), [("A", "vip"), ("AAAA", "vip6")])
def test_underscore_and_dotted_forms_give_the_same_vip(
    zone, vips, tcp: bool, rdtype: str, field: str
) -> None:
    expected = [vip_item(vips, "default", ECHO_SERVICE)[field]]
    underscore = zone.query(f"{ECHO_SERVICE}.mesh", rdtype, tcp=tcp)
    dotted = zone.query("echo-server.echo-example.svc.1010.mesh", rdtype, tcp=tcp)
    assert answer_values(underscore, rdtype) == expected
    assert answer_values(dotted, rdtype) == expected
    assert_aa(dotted)


@TRANSPORTS
@pytest.mark.parametrize(
    ("asked", "service"),
    [("ReDiS.MeSh", "redis"), ("Echo-Server.ECHO-example.Svc.1010.MESH", ECHO_SERVICE)],
)
@pytest.mark.parametrize(("rdtype", "field"), [("A", "vip"), ("AAAA", "vip6")])
def test_mixed_case_is_answered_and_echoed_exactly(
    zone, vips, tcp: bool, asked: str, service: str, rdtype: str, field: str
) -> None:
    response = zone.query(asked, rdtype, tcp=tcp)
    assert response.rcode() == dns.rcode.NOERROR
    # dnspython compares names case-insensitively; the text keeps the case.
    assert [q.name.to_text() for q in response.question] == [asked + "."]
    answer = only_rrset(response.answer)
    assert answer.name.to_text() == asked + "."
    assert [r.to_text() for r in answer] == [vip_item(vips, "default", service)[field]]


@TRANSPORTS
def test_any_returns_both_a_and_aaaa(zone, vips, tcp: bool) -> None:
    item = vip_item(vips, "default", "redis")
    response = zone.query("redis.mesh", "ANY", tcp=tcp)
    assert response.rcode() == dns.rcode.NOERROR
    assert_aa(response)
    assert answer_values(response, "A") == [item["vip"]]
    assert answer_values(response, "AAAA") == [item["vip6"]]


# -- meshes ------------------------------------------------------------------------------


@TRANSPORTS
def test_each_mesh_gets_its_own_redis(zone, vips, tcp: bool) -> None:
    default = vip_item(vips, "default", "redis")["vip"]
    payments = vip_item(vips, "payments", "redis")["vip"]
    assert default != payments
    asked_by_default = zone.query("redis.mesh", tcp=tcp, source=DEFAULT_CLIENT)
    asked_by_payments = zone.query("redis.mesh", tcp=tcp, source=PAYMENTS_CLIENT)
    assert answer_values(asked_by_default, "A") == [default]
    assert answer_values(asked_by_payments, "A") == [payments]


@TRANSPORTS
@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("ledger.mesh", DEFAULT_CLIENT),  # only in payments
        ("frontend.mesh", PAYMENTS_CLIENT),  # only in default
        ("svc.1010.mesh", PAYMENTS_CLIENT),  # default's empty non-terminal
    ],
)
def test_name_of_another_mesh_is_nxdomain(zone, vips, tcp: bool, name: str, source: str) -> None:
    response = zone.query(name, tcp=tcp, source=source)
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.answer == []
    assert_soa_in_authority(response, vips["version"])


# -- negative answers --------------------------------------------------------------------


@TRANSPORTS
@pytest.mark.parametrize(
    "name", ["nosuch.mesh", "NoSuch.MeSh", "x.redis.mesh", "redis.x.mesh", "echo-server.mesh"]
)
def test_unknown_name_is_nxdomain_with_soa_and_aa(zone, vips, tcp: bool, name: str) -> None:
    response = zone.query(name, "A", tcp=tcp)
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert_aa(response)
    assert response.answer == []
    assert_soa_in_authority(response, vips["version"])


@TRANSPORTS
@pytest.mark.parametrize("rdtype", ["A", "AAAA"])
def test_external_service_does_not_resolve(zone, vips, tcp: bool, rdtype: str) -> None:
    assert all(item["service"] != "httpbin" for item in vips["items"])
    response = zone.query("httpbin.mesh", rdtype, tcp=tcp)
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.answer == []
    assert_soa_in_authority(response, vips["version"])


@TRANSPORTS
@pytest.mark.parametrize(
    ("name", "rdtype"),
    [
        ("redis.mesh", "TXT"),
        ("redis.mesh", "MX"),
        ("redis.mesh", "SRV"),
        (f"{ECHO_SERVICE}.mesh", "TXT"),
        ("svc.1010.mesh", "A"),
        ("svc.1010.mesh", "AAAA"),
        ("echo-example.svc.1010.mesh", "A"),
        ("1010.mesh", "TXT"),
    ],
)
def test_nodata_is_noerror_empty_answer_soa_in_authority(
    zone, vips, tcp: bool, name: str, rdtype: str
) -> None:
    response = zone.query(name, rdtype, tcp=tcp)
    assert response.rcode() == dns.rcode.NOERROR
    assert_aa(response)
    assert response.answer == []
    assert_soa_in_authority(response, vips["version"])


# -- the apex ----------------------------------------------------------------------------


@TRANSPORTS
def test_soa_at_the_apex_has_the_vips_version_as_serial(zone, tcp: bool) -> None:
    before = zone.vips()["version"]
    response = zone.query("mesh", "SOA", tcp=tcp)
    after = zone.vips()["version"]
    assert before == after, "the table changed during the test"
    assert response.rcode() == dns.rcode.NOERROR
    assert_aa(response)
    soa = only_rrset(response.answer)
    assert soa.ttl == TTL
    assert soa[0].serial == before
    assert soa[0].mname == dns.name.from_text("ns.dns.mesh")
    assert soa[0].rname == dns.name.from_text("hostmaster.mesh")
    assert soa[0].minimum == TTL


@TRANSPORTS
def test_ns_at_the_apex_and_its_address(zone, tcp: bool) -> None:
    response = zone.query("mesh", "NS", tcp=tcp)
    assert response.rcode() == dns.rcode.NOERROR
    assert_aa(response)
    assert answer_values(response, "NS") == ["ns.dns.mesh."]
    # The server listens on 127.0.0.1 only, so that is its nameserver's address.
    address = zone.query("ns.dns.mesh", "A", tcp=tcp)
    assert answer_values(address, "A") == ["127.0.0.1"]


# -- PTR -----------------------------------------------------------------------------------


@TRANSPORTS
def test_ptr_for_every_vip_names_the_dns_compliant_form(zone, vips, tcp: bool) -> None:
    assert len(vips["items"]) >= 6
    for item in vips["items"]:
        source = CLIENT_OF_MESH[item["mesh"]]
        for address in (item["vip"], item["vip6"]):
            response = zone.query(reverse_name(address), "PTR", tcp=tcp, source=source)
            assert response.rcode() == dns.rcode.NOERROR, address
            assert_aa(response)
            answer = only_rrset(response.answer)
            assert answer.ttl == TTL
            assert [r.to_text() for r in answer] == [dns_compliant(item["service"])], address


@TRANSPORTS
def test_ptr_of_another_meshs_vip_is_nxdomain(zone, vips, tcp: bool) -> None:
    for item in vips["items"]:
        other_mesh = "default" if item["mesh"] == "payments" else "payments"
        for address in (item["vip"], item["vip6"]):
            response = zone.query(
                reverse_name(address), "PTR", tcp=tcp, source=CLIENT_OF_MESH[other_mesh]
            )
            assert response.rcode() == dns.rcode.NXDOMAIN, (address, other_mesh)
            assert response.answer == []


# -- outside the domain --------------------------------------------------------------------


@TRANSPORTS
@pytest.mark.parametrize(
    ("name", "rdtype", "rdclass"),
    [
        ("example.com", "A", "IN"),
        ("mesh.example.com", "A", "IN"),
        ("com", "SOA", "IN"),
        ("version.bind", "TXT", "CH"),
        ("redis.mesh", "A", "CH"),
        ("1.0.0.127.in-addr.arpa", "PTR", "IN"),
    ],
)
def test_outside_the_domain_is_refused_without_aa(
    zone, tcp: bool, name: str, rdtype: str, rdclass: str
) -> None:
    query = dns.message.make_query(name, rdtype, rdclass)
    response = exchange(zone, query, tcp=tcp)
    assert response.rcode() == dns.rcode.REFUSED
    assert not response.flags & dns.flags.AA
    assert response.answer == []


# -- EDNS0 -------------------------------------------------------------------------------------

EDNS_CASES = [
    ("redis.mesh", "A", "IN"),  # NOERROR
    ("redis.mesh", "TXT", "IN"),  # NODATA
    ("nosuch.mesh", "A", "IN"),  # NXDOMAIN
    ("example.com", "A", "IN"),  # REFUSED
]


@TRANSPORTS
@pytest.mark.parametrize(("name", "rdtype", "rdclass"), EDNS_CASES)
def test_query_with_edns_gets_an_opt_record_of_version_0(
    zone, tcp: bool, name: str, rdtype: str, rdclass: str
) -> None:
    query = dns.message.make_query(name, rdtype, rdclass, use_edns=0, payload=1232)
    response = exchange(zone, query, tcp=tcp)
    assert response.opt is not None
    assert response.edns == 0
    assert response.payload >= 512


@TRANSPORTS
@pytest.mark.parametrize(("name", "rdtype", "rdclass"), EDNS_CASES)
def test_query_without_edns_gets_no_opt_record(
    zone, tcp: bool, name: str, rdtype: str, rdclass: str
) -> None:
    query = dns.message.make_query(name, rdtype, rdclass, use_edns=False)
    response = exchange(zone, query, tcp=tcp)
    assert response.opt is None
    assert response.edns == -1
    assert all(rrset.rdtype != dns.rdatatype.OPT for rrset in response.additional)


@TRANSPORTS
def test_edns_version_1_gets_badvers(zone, tcp: bool) -> None:
    response = zone.query("redis.mesh", "A", tcp=tcp, use_edns=1)
    assert response.rcode() == dns.rcode.BADVERS
    assert response.edns == 0  # the highest version we speak
    assert response.answer == []


LONG_NAME = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 56, "mesh"])  # 255 octets on the wire


def padded_query(name: str, payload: int, size: int) -> dns.message.Message:
    """An EDNS0 query of exactly C{size} octets (RFC 7830 padding)."""
    query = dns.message.make_query(name, "A", use_edns=0, payload=payload)
    padding = size - len(query.to_wire()) - 4
    assert padding >= 0
    query.use_edns(
        0,
        payload=payload,
        options=[dns.edns.GenericOption(dns.edns.OptionType.PADDING, b"\x00" * padding)],
    )
    assert len(query.to_wire()) == size
    return query


@pytest.mark.parametrize(
    "query",
    [
        pytest.param(lambda: padded_query(LONG_NAME, 512, 512), id="edns-512"),
        pytest.param(lambda: padded_query(LONG_NAME, 100, 512), id="edns-below-512"),
        pytest.param(lambda: padded_query("redis.mesh", 512, 512), id="edns-512-short-name"),
        pytest.param(lambda: dns.message.make_query(LONG_NAME, "ANY"), id="no-edns"),
    ],
)
def test_udp_response_to_a_query_at_the_512_limit_stays_within_512(zone, query) -> None:
    message = query()
    assert len(dns.name.from_text(LONG_NAME).to_wire()) == 255
    data = raw_exchange(zone, message.to_wire())
    assert len(data) <= 512
    response = dns.message.from_wire(data)
    assert message.is_response(response)
    assert response.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)
    assert response.question[0].name.to_text() == message.question[0].name.to_text()


# -- FORMERR ------------------------------------------------------------------------------------


@TRANSPORTS
@pytest.mark.parametrize("use_edns", [False, 0])
def test_two_questions_get_formerr(zone, tcp: bool, use_edns) -> None:
    query = dns.message.make_query("redis.mesh", "A", use_edns=use_edns)
    query.find_rrset(
        query.question,
        dns.name.from_text("backend.mesh"),
        dns.rdataclass.IN,
        dns.rdatatype.A,
        create=True,
        force_unique=True,
    )
    assert len(query.question) == 2
    response = dns.message.from_wire(raw_exchange(zone, query.to_wire(), tcp=tcp))
    assert response.id == query.id
    assert response.flags & dns.flags.QR
    assert response.rcode() == dns.rcode.FORMERR
    assert response.answer == []


@TRANSPORTS
@pytest.mark.parametrize("use_edns", [False, 0])
def test_zero_questions_get_formerr(zone, tcp: bool, use_edns) -> None:
    query = dns.message.Message(id=0x5EED)
    query.use_edns(use_edns)
    response = dns.message.from_wire(raw_exchange(zone, query.to_wire(), tcp=tcp))
    assert response.id == 0x5EED
    assert response.flags & dns.flags.QR
    assert response.rcode() == dns.rcode.FORMERR
    assert response.answer == []


# -- TCP ------------------------------------------------------------------------------------------


def test_several_queries_on_one_tcp_connection(zone, vips) -> None:
    """RFC 7766: a client may send its next query before the first answer is read."""
    names = ["redis.mesh", "backend.mesh", "frontend.mesh", "nosuch.mesh"]
    queries = [dns.message.make_query(name, "A") for name in names]
    with socket.create_connection(("127.0.0.1", zone.ports["dns"]), timeout=5.0) as connection:
        connection.sendall(
            b"".join(struct.pack("!H", len(w)) + w for w in (q.to_wire() for q in queries))
        )
        responses = {}
        for _ in queries:
            (length,) = struct.unpack("!H", read_exactly(connection, 2))
            response = dns.message.from_wire(read_exactly(connection, length))
            responses[response.id] = response
    for name, query in zip(names, queries, strict=True):
        response = responses[query.id]
        assert query.is_response(response)
        if name == "nosuch.mesh":
            assert response.rcode() == dns.rcode.NXDOMAIN
        else:
            service = name.split(".")[0]
            assert answer_values(response, "A") == [vip_item(vips, "default", service)["vip"]]


# -- dig and kdig ---------------------------------------------------------------------------------


class ToolOutput:
    """The parts of dig's or kdig's text output that the tests read."""

    def __init__(self, text: str) -> None:
        self.text = text
        status = re.search(r"status: ([A-Z]+)", text)
        flags = re.search(r";; [Ff]lags: ([a-z ]*);", text)
        assert status and flags, text
        self.status = status.group(1)
        self.flags = set(flags.group(1).split())
        self.sections: dict[str, list[list[str]]] = {}
        current = None
        for line in text.splitlines():
            heading = re.match(r";; ([A-Z]+) (?:PSEUDO)?SECTION:", line)
            if heading:
                current = self.sections.setdefault(heading.group(1), [])
            elif line.strip() == "":
                current = None
            elif current is not None and not line.startswith(";"):
                current.append(line.split())
        self.edns = re.search(r"EDNS: version: (\d+)|Version: (\d+);", text)

    def records(self, section: str) -> list[list[str]]:
        return self.sections.get(section, [])


def run_tool(zone: ZoneProcess, tool: str, tcp: bool, *args: str) -> ToolOutput:
    return ToolOutput(zone.dig(*(["+tcp"] if tcp else []), "+norec", *args, tool=tool))


@TOOLS
@TRANSPORTS
@pytest.mark.parametrize(("rdtype", "field"), [("A", "vip"), ("AAAA", "vip6")])
def test_tool_gets_address_with_ttl_and_aa(
    zone, vips, tool: str, tcp: bool, rdtype: str, field: str
) -> None:
    output = run_tool(zone, tool, tcp, "-t", rdtype, "redis.mesh")
    assert output.status == "NOERROR"
    assert "aa" in output.flags
    expected = vip_item(vips, "default", "redis")[field]
    assert output.records("ANSWER") == [["redis.mesh.", "60", "IN", rdtype, expected]]


@TOOLS
@TRANSPORTS
def test_tool_sees_each_mesh(zone, vips, tool: str, tcp: bool) -> None:
    output = run_tool(zone, tool, tcp, "-b", PAYMENTS_CLIENT, "redis.mesh")
    expected = vip_item(vips, "payments", "redis")["vip"]
    assert output.records("ANSWER") == [["redis.mesh.", "60", "IN", "A", expected]]


@TOOLS
@TRANSPORTS
def test_tool_gets_nxdomain_with_soa(zone, vips, tool: str, tcp: bool) -> None:
    output = run_tool(zone, tool, tcp, "nosuch.mesh")
    assert output.status == "NXDOMAIN"
    assert "aa" in output.flags
    assert output.records("ANSWER") == []
    [soa] = output.records("AUTHORITY")
    assert soa[:4] == ["mesh.", "60", "IN", "SOA"]
    assert soa[4:7] == ["ns.dns.mesh.", "hostmaster.mesh.", str(vips["version"])]


@TOOLS
@TRANSPORTS
def test_tool_reads_the_serial(zone, tool: str, tcp: bool) -> None:
    version = zone.vips()["version"]
    output = run_tool(zone, tool, tcp, "-t", "SOA", "mesh")
    [soa] = output.records("ANSWER")
    assert soa[3] == "SOA" and soa[6] == str(version)
    assert soa[10] == "60"  # the negative-caching TTL


@TOOLS
@TRANSPORTS
@pytest.mark.parametrize("field", ["vip", "vip6"])
def test_tool_reverse_lookup(zone, vips, tool: str, tcp: bool, field: str) -> None:
    output = run_tool(zone, tool, tcp, "-x", vip_item(vips, "default", ECHO_SERVICE)[field])
    assert output.status == "NOERROR"
    assert "aa" in output.flags
    [ptr] = output.records("ANSWER")
    assert ptr[1:] == ["60", "IN", "PTR", "echo-server.echo-example.svc.1010.mesh."]


@TOOLS
@TRANSPORTS
def test_tool_is_refused_outside_the_domain(zone, tool: str, tcp: bool) -> None:
    for args in (["example.com"], ["-c", "CH", "-t", "TXT", "version.bind"]):
        output = run_tool(zone, tool, tcp, *args)
        assert output.status == "REFUSED", output.text
        assert "aa" not in output.flags


@TRANSPORTS
def test_dig_mixed_case_is_echoed(zone, vips, tcp: bool) -> None:
    output = run_tool(zone, "dig", tcp, "ReDiS.MeSh")
    expected = vip_item(vips, "default", "redis")["vip"]
    assert ";ReDiS.MeSh.\t" in output.text
    assert output.records("ANSWER") == [["ReDiS.MeSh.", "60", "IN", "A", expected]]


@TOOLS
@TRANSPORTS
def test_tool_edns(zone, tool: str, tcp: bool) -> None:
    with_edns = run_tool(zone, tool, tcp, "+edns=0", "redis.mesh")
    without = run_tool(zone, tool, tcp, "+noedns", "redis.mesh")
    assert with_edns.edns is not None and "0" in with_edns.edns.groups()
    assert without.edns is None
    badvers = run_tool(
        zone,
        tool,
        tcp,
        "+edns=1",
        *(["+noednsnegotiation"] if tool == "dig" else []),
        "redis.mesh",
    )
    assert badvers.status == "BADVERS"


# -- TCP flow control ---------------------------------------------------------------------------


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _pipeline_without_reading(port: int, queries: int) -> tuple[socket.socket, int]:
    """Send up to C{queries} queries on one connection and read nothing; the socket, and
    how many went before the server stopped taking them (two seconds without progress)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    one = dns.message.make_query("redis.mesh", "A").to_wire()
    chunk = (struct.pack("!H", len(one)) + one) * 1000
    sock.settimeout(2.0)
    sent = 0
    try:
        while sent < queries * len(one):
            sent += sock.send(chunk)
    except TimeoutError:
        pass
    return sock, sent // (len(one) + 2)


def test_a_tcp_client_that_does_not_read_stops_being_read(zone) -> None:
    """Back-pressure: the server stops reading a client that does not read its answers.

    Without it, the 400,000 answers of 400,000 pipelined queries wait in the server's
    memory (30 MB, issue 11); with it, they wait in the client's unread queries.
    """
    pid = zone.process.pid
    before = _rss_kib(pid)
    sock, taken = _pipeline_without_reading(zone.ports["dns"], 400_000)
    try:
        # The server took what fits in the socket buffers and one write buffer, not all.
        assert taken < 400_000, taken
        grown = _rss_kib(pid) - before
        assert grown < 8 * 1024, f"the server grew by {grown} KiB for one connection"
        # Other clients are answered meanwhile, over both transports.
        for tcp in (False, True):
            assert zone.query("redis.mesh", tcp=tcp).rcode() == dns.rcode.NOERROR
    finally:
        sock.close()
    # And the connection's buffers are gone with it: the server still answers.
    assert zone.query("redis.mesh", tcp=True).rcode() == dns.rcode.NOERROR


# -- the nameserver's addresses -----------------------------------------------------------------


def _addresses(response: dns.message.Message, section: str) -> list[str]:
    return sorted(r.address for rrset in getattr(response, section) for r in rrset)


def test_ns_and_mname_resolve_to_the_dns_interface_by_default(zone) -> None:
    soa = zone.query("mesh", "SOA").answer[0][0]
    assert soa.mname.to_text() == "ns.dns.mesh."
    assert _addresses(zone.query("ns.dns.mesh", "A"), "answer") == ["127.0.0.1"]
    response = zone.query("mesh", "NS", use_edns=0)
    assert [r.target.to_text() for r in response.answer[0]] == ["ns.dns.mesh."]
    assert _addresses(response, "additional") == ["127.0.0.1"]


def test_nameserver_addresses_flag(zone_process) -> None:
    zone = zone_process(args=["--nameserver-addresses=192.0.2.53,2001:db8::53"])
    assert _addresses(zone.query("ns.dns.mesh", "A"), "answer") == ["192.0.2.53"]
    assert _addresses(zone.query("ns.dns.mesh", "AAAA"), "answer") == ["2001:db8::53"]
    response = zone.query("mesh", "NS", use_edns=0)
    assert _addresses(response, "additional") == ["192.0.2.53", "2001:db8::53"]
