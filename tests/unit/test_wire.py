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
import pytest
from twisted.names import dns as tdns

from kumazone.dns.wire import encode_response, formerr_for

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
