"""Tests for the pure wire helpers of kumazone.dns.wire: encode_response and formerr_for.

No sockets.  Every encoded response is read back with dnspython, an independent
decoder: what a client would see.
"""

from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.tsigkeyring
import pytest
from twisted.names import dns as tdns

from kumazone.dns.wire import (
    MAX_EDNS_OPTIONS,
    MAX_POINTERS_PER_NAME,
    NOTAUTH,
    Screened,
    _Walk,
    encode_response,
    formerr_for,
    screen,
)

NAME = b"redis.mesh"
A_RECORD_OCTETS = 16  # compressed owner (2) + type, class, TTL, rdlength (10) + 4


def a_records(count: int, owner: bytes = NAME) -> list[tdns.RRHeader]:
    return [
        tdns.RRHeader(
            owner, tdns.A, tdns.IN, 60, tdns.Record_A(f"240.0.{i // 256}.{i % 256}", 60), auth=True
        )
        for i in range(count)
    ]


def soa() -> tdns.RRHeader:
    record = tdns.Record_SOA(
        mname=b"ns.dns.mesh", rname=b"hostmaster.mesh", serial=3, minimum=60, ttl=60
    )
    return tdns.RRHeader(b"mesh", tdns.SOA, tdns.IN, 60, record, auth=True)


def response(
    answers: int = 0,
    additional: int = 0,
    authority: list[tdns.RRHeader] | None = None,
    edns: int | None = None,
) -> tdns._EDNSMessage:
    return tdns._EDNSMessage(
        id=4711,
        answer=True,
        auth=True,
        rCode=tdns.OK,
        ednsVersion=edns,
        maxSize=1232,
        queries=[tdns.Query(NAME, tdns.A, tdns.IN)],
        answers=a_records(answers),
        authority=authority or [],
        additional=a_records(additional, b"glue.mesh"),
    )


def decode(data: bytes) -> dns.message.Message:
    """Decode as a client would; fails the test on anything malformed."""
    return dns.message.from_wire(data)


def addresses(message: dns.message.Message, section: str = "answer") -> list[str]:
    return [rdata.address for rrset in getattr(message, section) for rdata in rrset]


def expected_addresses(count: int) -> list[str]:
    return [f"240.0.{i // 256}.{i % 256}" for i in range(count)]


# -- encode_response: what fits -----------------------------------------------------


@pytest.mark.parametrize("limit", [512, 1232, None])
def test_small_response_is_encoded_whole(limit: int | None) -> None:
    data, truncated = encode_response(response(answers=2), limit)
    assert not truncated
    message = decode(data)
    assert message.id == 4711
    assert not message.flags & dns.flags.TC
    assert message.flags & dns.flags.AA
    assert addresses(message) == expected_addresses(2)


@pytest.mark.parametrize("count", [60, 100, 200])
def test_no_limit_means_everything_for_tcp(count: int) -> None:
    """TCP (limit None) carries answers far over 512 octets whole, without TC."""
    data, truncated = encode_response(response(answers=count), None)
    assert not truncated
    assert len(data) > 512
    message = decode(data)
    assert not message.flags & dns.flags.TC
    assert addresses(message) == expected_addresses(count)


def test_response_that_fits_an_edns_limit_is_not_cut_at_512() -> None:
    """An answer of 700 octets fits a client's 1232-octet EDNS0 buffer."""
    data, truncated = encode_response(response(answers=40, edns=0), 1232)
    assert 512 < len(data) <= 1232
    assert not truncated
    message = decode(data)
    assert not message.flags & dns.flags.TC
    assert addresses(message) == expected_addresses(40)


# -- encode_response: truncation -------------------------------------------------------


@pytest.mark.parametrize("edns", [None, 0])
def test_many_answers_trimmed_to_512_by_whole_records_with_tc(edns: int | None) -> None:
    data, truncated = encode_response(response(answers=100, edns=edns), 512)
    assert truncated
    assert len(data) <= 512
    message = decode(data)
    assert message.flags & dns.flags.TC
    assert message.id == 4711
    assert [q.name.to_text() for q in message.question] == ["redis.mesh."]
    kept = addresses(message)
    # Whole records, the first ones, as many as fit: no room is left for another.
    assert 0 < len(kept) < 100
    assert kept == expected_addresses(len(kept))
    assert len(data) + A_RECORD_OCTETS > 512
    # The OPT record is never dropped (RFC 6891 section 7).
    assert message.edns == (-1 if edns is None else 0)


def test_trimmed_to_an_edns_limit() -> None:
    data, truncated = encode_response(response(answers=100, edns=0), 1232)
    assert truncated and len(data) <= 1232
    message = decode(data)
    assert message.flags & dns.flags.TC
    kept = addresses(message)
    assert kept == expected_addresses(len(kept))
    assert len(kept) > 40  # far more than would fit 512


def test_additional_records_go_first_and_without_tc() -> None:
    data, truncated = encode_response(response(answers=3, additional=60), 512)
    assert not truncated
    assert len(data) <= 512
    message = decode(data)
    assert not message.flags & dns.flags.TC
    assert addresses(message) == expected_addresses(3)
    assert len(addresses(message, "additional")) < 60


def test_additional_records_are_dropped_before_any_answer() -> None:
    """With answers that alone overflow, every additional record is gone before TC."""
    data, truncated = encode_response(response(answers=100, additional=5), 512)
    assert truncated and len(data) <= 512
    message = decode(data)
    assert message.additional == []
    kept = addresses(message)
    assert kept == expected_addresses(len(kept)) and kept


def test_rcode_and_authority_survive_when_everything_fits() -> None:
    source = response(authority=[soa()])
    source.rCode = tdns.ENAME
    data, truncated = encode_response(source, 512)
    assert not truncated
    message = decode(data)
    assert message.rcode() == dns.rcode.NXDOMAIN
    assert [rrset.rdtype for rrset in message.authority] == [dns.rdatatype.SOA]


@pytest.mark.parametrize("limit", [512, 600, 1232])
@pytest.mark.parametrize("edns", [None, 0])
def test_never_over_the_limit_and_always_decodable(limit: int, edns: int | None) -> None:
    for count in range(0, 120, 7):
        data, truncated = encode_response(response(answers=count, edns=edns), limit)
        assert len(data) <= limit, (count, len(data))
        message = decode(data)
        kept = addresses(message)
        assert kept == expected_addresses(len(kept)), count
        assert truncated == bool(message.flags & dns.flags.TC), count
        assert truncated == (len(kept) < count), count


# -- formerr_for -------------------------------------------------------------------


def query_header(
    message_id: int = 0xBEEF,
    opcode: int = 0,
    rd: bool = True,
    qr: bool = False,
    counts: tuple[int, int, int, int] = (1, 0, 0, 0),
) -> bytes:
    flags = (0x8000 if qr else 0) | (opcode << 11) | (0x0100 if rd else 0)
    return struct.pack("!HHHHHH", message_id, flags, *counts)


@pytest.mark.parametrize("length", range(12))
def test_formerr_for_shorter_than_a_header_is_silence(length: int) -> None:
    assert formerr_for(query_header()[:length]) is None


def test_formerr_for_a_response_is_silence() -> None:
    assert formerr_for(query_header(qr=True) + b"\xff\xff") is None


@pytest.mark.parametrize("message_id", [0, 1, 0xBEEF, 0xFFFF])
@pytest.mark.parametrize("rd", [True, False])
def test_formerr_for_a_query_header(message_id: int, rd: bool) -> None:
    packet = query_header(message_id, rd=rd, counts=(3, 9, 9, 9)) + b"\xc0\x0c garbage"
    answer = formerr_for(packet)
    assert answer is not None
    assert len(answer) == 12
    message = decode(answer)
    assert message.id == message_id
    assert message.flags & dns.flags.QR
    assert message.rcode() == dns.rcode.FORMERR
    assert bool(message.flags & dns.flags.RD) == rd
    assert not message.flags & (dns.flags.AA | dns.flags.TC | dns.flags.RA)
    assert struct.unpack("!HHHH", answer[4:]) == (0, 0, 0, 0)


@pytest.mark.parametrize("opcode", [dns.opcode.QUERY, dns.opcode.STATUS, dns.opcode.NOTIFY, 15])
def test_formerr_for_echoes_the_opcode(opcode: int) -> None:
    answer = formerr_for(query_header(opcode=opcode))
    assert answer is not None
    flags = struct.unpack("!H", answer[2:4])[0]
    assert (flags >> 11) & 0xF == opcode
    assert flags & 0xF == dns.rcode.FORMERR


def test_formerr_for_exactly_a_header() -> None:
    answer = formerr_for(query_header(message_id=7, counts=(0, 0, 0, 0)))
    assert answer is not None
    assert answer[:2] == b"\x00\x07"


# -- screen: the bounded checks in front of twisted.names ------------------------------------

REDIS_QUESTION = b"\x05redis\x04mesh\x00\x00\x01\x00\x01"
#: mesh SOA: also a well-formed UPDATE zone section.
APEX_SOA = b"\x04mesh\x00\x00\x06\x00\x01"


def _packet(*counts: int, flags: int = 0) -> bytes:
    return struct.pack("!6H", 0x1234, flags, *counts)


def _pointer_chain(records: int) -> bytes:
    """A query whose additional records' owners are each a pointer to the one before."""
    body = bytearray(_packet(1, 0, 0, records) + REDIS_QUESTION)
    previous = 12
    for _ in range(records):
        here = len(body)
        body += struct.pack("!H", 0xC000 | previous) + struct.pack("!HHIH", 1, 1, 0, 0)
        previous = here
    return bytes(body)


def test_screen_passes_a_plain_query_on() -> None:
    screened = screen(_packet(1, 0, 0, 0) + REDIS_QUESTION)
    assert screened.parse == _packet(1, 0, 0, 0) + REDIS_QUESTION
    assert screened.answer is None and screened.problem is None


def test_screen_strips_edns_options() -> None:
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0x8000, 8) + b"\xfd\xe9\x00\x04abcd"
    screened = screen(_packet(1, 0, 0, 1) + REDIS_QUESTION + opt)
    assert screened.parse == (
        _packet(1, 0, 0, 1) + REDIS_QUESTION + b"\x00" + struct.pack("!HHIH", 41, 1232, 0x8000, 0)
    )


@pytest.mark.parametrize("records", [2, 3, 100, 680])
def test_a_chain_of_pointers_is_refused_from_the_header(records: int) -> None:
    screened = screen(_pointer_chain(records))
    if records > 2:
        assert screened.problem is not None and "additional records" in screened.problem
    assert screened.answer is not None and screened.answer[3] & 0x0F == dns.rcode.FORMERR


def test_pointers_per_name_are_capped() -> None:
    # The question's name: a pointer to a pointer to ... to a root label at offset 12.
    hops = MAX_POINTERS_PER_NAME + 1
    header = _packet(1, 0, 0, 0)
    body = bytearray(header + b"\x00")
    previous = 12
    for _ in range(hops):
        here = len(body)
        body += struct.pack("!H", 0xC000 | previous)
        previous = here
    # The question starts at 12 with the root label: make it start at the last pointer.
    packet = bytes(body)
    walk = _Walk(packet)
    with pytest.raises(ValueError, match="too many compression pointers in a name"):
        walk.name_end(previous)
    assert _Walk(packet).name_end(12 + 1 + 2 * (MAX_POINTERS_PER_NAME - 1)) > 0


@pytest.mark.parametrize("opcode", [1, 2, 4, 5, 6, 15])
def test_screen_answers_other_opcodes_notimp_with_the_question(opcode: int) -> None:
    screened = screen(_packet(1, 0, 0, 0, flags=opcode << 11 | 0x0110) + APEX_SOA)
    answer = screened.answer
    assert screened.parse is None and answer is not None
    message = dns.message.from_wire(answer)
    assert message.rcode() == dns.rcode.NOTIMP and message.opcode() == opcode
    assert message.flags & dns.flags.CD and message.flags & dns.flags.RD
    assert answer[12:] == APEX_SOA


@pytest.mark.parametrize("questions", [0, 2])
def test_screen_refuses_a_question_count_other_than_one(questions: int) -> None:
    answer = screen(_packet(questions, 0, 0, 0) + REDIS_QUESTION * questions).answer
    assert answer is not None and answer[3] & 0x0F == dns.rcode.FORMERR


def test_screen_drops_responses() -> None:
    assert screen(_packet(1, 0, 0, 0, flags=0x8000) + REDIS_QUESTION) == Screened()


def test_screen_answers_tsig_with_badkey() -> None:
    keyring = dns.tsigkeyring.from_text({"key.": "c2VjcmV0c2VjcmV0c2VjcmV0"})
    query = dns.message.make_query("redis.mesh", "A")
    query.use_tsig(keyring, keyname="key.")
    answer = screen(query.to_wire()).answer
    assert answer is not None
    assert answer[3] & 0x0F == NOTAUTH
    with pytest.raises(dns.tsig.PeerBadKey):
        dns.message.from_wire(answer, keyring=keyring, request_mac=query.mac)


def test_too_many_edns_options_are_formerr() -> None:
    options = b"\x00\x0a\x00\x00" * (MAX_EDNS_OPTIONS + 1)
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, len(options)) + options
    screened = screen(_packet(1, 0, 0, 1) + REDIS_QUESTION + opt)
    assert screened.problem is not None and "EDNS options" in screened.problem
