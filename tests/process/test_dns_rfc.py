"""The RFC behaviours of the DNS server, asked with dnspython of a real zone process.

NOTIMP for every opcode but QUERY (RFC 1035 4.1.1), CD copied and AD clear (RFC 6840
5.7, 5.9: nothing here is DNSSEC-validated), NOTAUTH with TSIG error BADKEY for a
query signed with a key the server does not know (RFC 8945 5.2.1, as NSD answers),
unknown EDNS options ignored and not echoed (RFC 6891 6.1.2), FORMERR for a question
count other than one, and silence for a response (QR=1).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.tsig
import dns.tsigkeyring
import pytest

from tests.kzprocess import ZoneProcess, sample_zone

TRANSPORTS = pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
QUESTION = b"\x05redis\x04mesh\x00\x00\x01\x00\x01"
#: mesh SOA: a question that is also a well-formed UPDATE zone section.
APEX_SOA = b"\x04mesh\x00\x00\x06\x00\x01"
WAIT = 2.0


@pytest.fixture(scope="module")
def zone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZoneProcess]:
    with sample_zone(tmp_path_factory.mktemp("rfc")) as process:
        yield process


def exchange(zone: ZoneProcess, packet: bytes, tcp: bool, wait: float = WAIT) -> bytes | None:
    """Send one raw packet; the answer, or None when none came in C{wait} seconds."""
    address = ("127.0.0.1", zone.ports["dns"])
    if tcp:
        with socket.create_connection(address, timeout=wait) as sock:
            sock.sendall(struct.pack("!H", len(packet)) + packet)
            try:
                prefix = sock.recv(2, socket.MSG_WAITALL)
                if len(prefix) < 2:
                    return None
                return sock.recv(struct.unpack("!H", prefix)[0], socket.MSG_WAITALL)
            except TimeoutError:
                return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(wait)
        sock.sendto(packet, address)
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None


def ask(zone: ZoneProcess, query: dns.message.Message, tcp: bool) -> dns.message.Message:
    send = dns.query.tcp if tcp else dns.query.udp
    return send(query, "127.0.0.1", port=zone.ports["dns"], timeout=WAIT)


@TRANSPORTS
@pytest.mark.parametrize("opcode", [1, 2, 3, 4, 5, 6, 7, 15])
def test_every_opcode_but_query_is_notimp_with_the_question(zone, tcp: bool, opcode: int) -> None:
    # IQUERY, STATUS, (unassigned), NOTIFY, UPDATE, DSO, and the rest.
    packet = struct.pack("!HHHHHH", 0x4242, opcode << 11 | 0x0100, 1, 0, 0, 0) + APEX_SOA
    answer = exchange(zone, packet, tcp)
    assert answer is not None
    message = dns.message.from_wire(answer)
    assert message.id == 0x4242
    assert message.flags & dns.flags.QR
    assert message.opcode() == opcode
    assert message.rcode() == dns.rcode.NOTIMP
    assert message.flags & dns.flags.RD, "RD copied"
    assert answer[4:12] == b"\x00\x01\x00\x00\x00\x00\x00\x00"
    assert answer[12:] == APEX_SOA


@TRANSPORTS
@pytest.mark.parametrize("name", ["redis.mesh", "nope.mesh", "mesh", "example.com"])
def test_cd_is_copied_and_ad_cleared(zone, tcp: bool, name: str) -> None:
    for flags, expected_cd in ((dns.flags.CD, True), (dns.flags.AD, False), (0, False)):
        # Twice: the second answer over UDP comes from the hot path.
        for _ in range(2):
            query = dns.message.make_query(name, "A", use_edns=0)
            query.flags |= flags
            response = ask(zone, query, tcp)
            assert bool(response.flags & dns.flags.CD) == expected_cd, (name, flags)
            assert not response.flags & dns.flags.AD, (name, flags)


@TRANSPORTS
def test_tsig_with_an_unknown_key_is_notauth_badkey(zone, tcp: bool) -> None:
    keyring = dns.tsigkeyring.from_text({"unknown-key.": "c2VjcmV0c2VjcmV0c2VjcmV0"})
    query = dns.message.make_query("redis.mesh", "A")
    query.use_tsig(keyring, keyname="unknown-key.")
    with pytest.raises(dns.tsig.PeerBadKey):
        ask(zone, query, tcp)
    # The same answer read without validating it: NOTAUTH, the TSIG echoed with BADKEY.
    answer = exchange(zone, query.to_wire(), tcp)
    assert answer is not None
    assert answer[3] & 0x0F == dns.rcode.NOTAUTH
    assert struct.unpack("!HHHH", answer[4:12]) == (1, 0, 0, 1)
    assert answer[12 : 12 + len(QUESTION)] == QUESTION
    assert b"\x0bunknown-key\x00\x00\xfa\x00\xff" in answer
    assert struct.pack("!HHHH", 0, query.id, 17, 0) == answer[-8:], "no MAC, BADKEY, no other"


@TRANSPORTS
def test_unknown_edns_options_are_ignored_and_not_echoed(zone, tcp: bool) -> None:
    options = [dns.edns.GenericOption(65001, b"\x01\x02\x03"), dns.edns.GenericOption(10, b"c" * 8)]
    for _ in range(2):
        query = dns.message.make_query("redis.mesh", "A", use_edns=0, options=options)
        response = ask(zone, query, tcp)
        assert response.rcode() == dns.rcode.NOERROR
        assert response.answer
        assert response.edns == 0
        assert response.options == ()


@TRANSPORTS
@pytest.mark.parametrize("questions", [0, 2, 3])
def test_a_question_count_other_than_one_is_formerr(zone, tcp: bool, questions: int) -> None:
    packet = struct.pack("!HHHHHH", 0x1111, 0, questions, 0, 0, 0) + QUESTION * questions
    answer = exchange(zone, packet, tcp)
    assert answer is not None
    message = dns.message.from_wire(answer)
    assert message.id == 0x1111
    assert message.rcode() == dns.rcode.FORMERR


@TRANSPORTS
@pytest.mark.parametrize("opcode", [0, 4, 5])
def test_a_response_is_never_answered(zone, tcp: bool, opcode: int) -> None:
    packet = struct.pack("!HHHHHH", 0x2222, 0x8400 | opcode << 11, 1, 0, 0, 0) + QUESTION
    assert exchange(zone, packet, tcp, wait=0.5) is None
    assert zone.query("redis.mesh", tcp=tcp).rcode() == dns.rcode.NOERROR
