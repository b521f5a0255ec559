"""The DNS wire format, pure: checks of received packets, and the encoder of answers.

twisted.names' parser is lenient (it ignores missing records and trailing octets)
and its encoder cuts an answer mid-record at C{maxSize}; kumazone screens every
packet before parsing it (L{screen}), and sizes its answers itself, dropping whole
records.  No I/O here: the protocols in L{kumazone.dns.server} frame and dispatch.

Every check does work bounded by a small constant per octet, whatever the packet's
shape: the header decides first (a response, an opcode other than QUERY, a count of
questions other than one, answer or authority records, over two additional ones:
answered or dropped from the header alone); so at most four names are walked, with
compression pointers capped per name and per message as twisted.names caps them;
EDNS options are capped in number; and what reaches twisted.names is one question
and at most one OPT record without options.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from twisted.names import dns

__all__ = [
    "MAX_POINTERS_PER_MESSAGE",
    "MAX_POINTERS_PER_NAME",
    "Screened",
    "encode_message",
    "encode_response",
    "formerr_for",
    "screen",
    "servfail_for",
]

#: A DNS header: ID, flags, then the four section counts.
_HEADER = struct.Struct("!HHHHHH")
#: The same header, with the flags as their two octets.
_HEADER_OCTETS = struct.Struct("!H2B4H")
#: Compression pointers hold 14 bits of offset.
_MAX_POINTER = 0x3FFF
#: A real encoder follows one pointer per name; a chain of them is an attack.
MAX_POINTERS_PER_NAME = 16
#: twisted.names' own cap on the pointers followed in one message.
MAX_POINTERS_PER_MESSAGE: int = dns.Name.maxCompressionPointers
#: Options in one OPT record (a real query has a few: cookie, padding, client subnet).
MAX_EDNS_OPTIONS = 32
#: The flag bits copied from a query into its answer: RD (first octet), CD (second).
_RD = 0x01
_CD = 0x10
#: TSIG's error code for a key the server does not know (RFC 8945).
BADKEY = 17
#: RCODE NOTAUTH (RFC 8945: the answer to a query signed with a key not known here).
NOTAUTH = 9


# -- walking names -------------------------------------------------------------------


class _Walk:
    """The names of one packet, each walked in a bounded number of steps.

    At most L{MAX_POINTERS_PER_NAME} pointers and 255 octets of labels per name,
    and L{MAX_POINTERS_PER_MESSAGE} pointers in all; and L{screen} walks no more
    than four names of a packet.
    """

    __slots__ = ("data", "pointers")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pointers = 0

    def name_end(self, start: int) -> int:
        """Where the name at C{start} ends; raises C{ValueError} for anything malformed.

        Compression pointers must point strictly backwards (so they cannot loop);
        labels of the reserved types, labels holding a dot and names over 255
        octets are refused.
        """
        data = self.data
        size = len(data)
        position, end, hops, total = start, -1, 0, 0
        while True:
            if position >= size:
                raise ValueError("a name runs past the end of the packet")
            length = data[position]
            if length >= 0xC0:
                if position + 1 >= size:
                    raise ValueError("a compression pointer is cut off")
                target = ((length & 0x3F) << 8) | data[position + 1]
                if target >= position:
                    raise ValueError("a compression pointer does not point backwards")
                hops += 1
                if hops > MAX_POINTERS_PER_NAME:
                    raise ValueError("too many compression pointers in a name")
                if end < 0:
                    end = position + 2
                position = target
                continue
            if length & 0xC0:
                raise ValueError(f"label type {length >> 6:#x} is not supported")
            total += length + 1
            if total > 255:
                raise ValueError("a name is over 255 octets")
            if length == 0:
                break
            after = position + 1 + length
            if after > size:
                raise ValueError("a label runs past the end of the packet")
            if data.find(b".", position + 1, after) >= 0:
                raise ValueError("a label holds a '.'")
            position = after
        self.pointers += hops
        if self.pointers > MAX_POINTERS_PER_MESSAGE:
            raise ValueError("too many compression pointers in the packet")
        return end if end >= 0 else position + 1

    def expanded(self, start: int) -> bytes:
        """The name at C{start}, already walked by L{name_end}, uncompressed."""
        data, out, position = self.data, bytearray(), start
        for _ in range(128 + MAX_POINTERS_PER_NAME):  # labels, the root, pointers
            length = data[position]
            if length & 0xC0 == 0xC0:
                position = ((length & 0x3F) << 8) | data[position + 1]
                continue
            out += data[position : position + 1 + length]
            if length == 0:
                return bytes(out)
            position += 1 + length
        raise ValueError("too many compression pointers in a name")


def _name_end(data: bytes, start: int) -> int:
    """Where the name at C{start} ends (see L{_Walk.name_end})."""
    return _Walk(data).name_end(start)


@dataclass(frozen=True, slots=True)
class _Record:
    """Where one resource record lies in a packet."""

    type: int
    owner: int
    rdata: int
    end: int


def _records(walk: _Walk, questions: int, count: int) -> tuple[int, list[_Record]]:
    """Where the questions end, and the C{count} records after them; C{ValueError} if malformed.

    The packet must end exactly with its last record.
    """
    data = walk.data
    offset = _HEADER.size
    for _ in range(questions):
        offset = walk.name_end(offset) + 4
        if offset > len(data):
            raise ValueError("a question is cut off")
    question_end = offset
    records = []
    for _ in range(count):
        owner = offset
        offset = walk.name_end(offset)
        if offset + 10 > len(data):
            raise ValueError("a record header is cut off")
        rtype, _cls, _ttl, rdlength = struct.unpack_from("!HHIH", data, offset)
        rdata = offset + 10
        offset = rdata + rdlength
        if offset > len(data):
            raise ValueError("record data runs past the end of the packet")
        if rtype == dns.OPT:
            _check_options(data, rdata, offset)
        records.append(_Record(rtype, owner, rdata, offset))
    if offset != len(data):
        raise ValueError(f"{len(data) - offset} octets after the last record")
    return question_end, records


def _check_options(data: bytes, start: int, end: int) -> None:
    """The options of an OPT record must fill its data exactly (RFC 6891); a few of them."""
    count = 0
    while start < end:
        count += 1
        if count > MAX_EDNS_OPTIONS:
            raise ValueError(f"over {MAX_EDNS_OPTIONS} EDNS options")
        if start + 4 > end:
            raise ValueError("an EDNS option is cut off")
        (length,) = struct.unpack_from("!H", data, start + 2)
        start += 4 + length
    if start != end:
        raise ValueError("an EDNS option is longer than its OPT record")


# -- the screen in front of twisted.names ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Screened:
    """What the wire check makes of a received packet.

    @ivar parse: the octets for twisted.names to parse (the header, the question,
        and the OPT record without its options: kumazone implements none, so they
        are ignored and never echoed); None when the packet is answered here.
    @ivar answer: the answer to send instead (None with C{parse} None: silence).
    @ivar problem: why the packet is malformed (to count and log), or None.
    """

    parse: bytes | None = None
    answer: bytes | None = None
    problem: str | None = None


def screen(data: bytes) -> Screened:
    """Screen one received packet, with work bounded by a small constant per octet.

    Silence for a packet shorter than a header and for a response (QR=1: never
    answered, so two servers cannot loop); NOTIMP for any opcode but QUERY;
    FORMERR for a question count other than one, for malformed packets and for
    records anywhere but one OPT and a last TSIG in the additional section;
    NOTAUTH with TSIG error BADKEY for a signed query (we know no key, RFC 8945).
    """
    if len(data) < _HEADER.size:
        return Screened(problem="shorter than a DNS header")
    if data[2] & 0x80:
        return Screened()
    questions, answers, authority, additional = struct.unpack_from("!HHHH", data, 4)
    if (data[2] >> 3) & 0xF != dns.OP_QUERY:
        return Screened(answer=_header_answer(data, dns.ENOTIMP, _question_of(data, questions)))
    if questions != 1:
        return Screened(answer=_header_answer(data, dns.EFORMAT))
    # Before any walk: a query carries no answer or authority records, and at
    # most two additional ones; so at most three names are walked.
    if answers or authority:
        problem = "a query with records in the answer or authority section"
        return Screened(answer=formerr_for(data), problem=problem)
    if additional > 2:
        problem = "a query with more additional records than an OPT and a TSIG"
        return Screened(answer=formerr_for(data), problem=problem)
    walk = _Walk(data)
    try:
        question_end, records = _records(walk, 1, additional)
        question = walk.expanded(_HEADER.size) + data[question_end - 4 : question_end]
        opt, tsig = _additional(walk, records)
        if tsig is not None:
            return Screened(answer=_badkey(walk, question, tsig))
    except ValueError as e:
        return Screened(answer=formerr_for(data), problem=str(e))
    counts = struct.pack("!HHHH", 1, 0, 0, 0 if opt is None else 1)
    parse = data[:4] + counts + question
    if opt is not None:
        # Root owner, type, class (the UDP size), TTL (extended RCODE, version, DO), no options.
        parse += b"\x00" + data[opt.rdata - 10 : opt.rdata - 2] + b"\x00\x00"
    return Screened(parse=parse)


def _additional(walk: _Walk, records: list[_Record]) -> tuple[_Record | None, _Record | None]:
    """The query's OPT and TSIG records; C{ValueError} for any other record."""
    opt = tsig = None
    for index, record in enumerate(records):
        if record.type == dns.OPT:
            if opt is not None:
                raise ValueError("two OPT records")
            if walk.expanded(record.owner) != b"\x00":
                raise ValueError("an OPT record whose owner is not the root (RFC 6891)")
            opt = record
        elif record.type == dns.TSIG and index == len(records) - 1:
            tsig = record
        elif record.type == dns.TSIG:
            raise ValueError("a TSIG record that is not the last record (RFC 8945)")
        else:
            raise ValueError("a query with a record other than OPT or TSIG")
    return opt, tsig


def _badkey(walk: _Walk, question: bytes, tsig: _Record) -> bytes:
    """The unsigned NOTAUTH answer, TSIG error BADKEY, to a query signed with C{tsig}.

    As RFC 8945 (5.2.1, 5.3.2) and NSD have it: the key name, algorithm, time
    signed, fudge and original ID echoed, no MAC, no other data.
    """
    data = walk.data
    algorithm_end = walk.name_end(tsig.rdata)
    if algorithm_end + 10 > tsig.end:
        raise ValueError("a TSIG record is cut off")
    (mac_size,) = struct.unpack_from("!H", data, algorithm_end + 8)
    after_mac = algorithm_end + 10 + mac_size
    if after_mac + 6 > tsig.end:
        raise ValueError("a TSIG record is cut off")
    original_id, _error, other_size = struct.unpack_from("!HHH", data, after_mac)
    if after_mac + 6 + other_size != tsig.end:
        raise ValueError("a TSIG record's data does not fill it")
    rdata = (
        walk.expanded(tsig.rdata)
        + data[algorithm_end : algorithm_end + 8]
        + struct.pack("!HHHH", 0, original_id, BADKEY, 0)
    )
    record = walk.expanded(tsig.owner) + struct.pack("!HHIH", dns.TSIG, dns.ANY, 0, len(rdata))
    header = _answer_header(data, NOTAUTH, 1, 1)
    return header + question + record + rdata


def _question_of(data: bytes, questions: int) -> bytes:
    """The question of a packet with one, uncompressed, if it can be read; else nothing."""
    if questions != 1:
        return b""
    walk = _Walk(data)
    try:
        end = walk.name_end(_HEADER.size) + 4
        if end > len(data):
            return b""
        return walk.expanded(_HEADER.size) + data[end - 4 : end]
    except ValueError:
        return b""


def _answer_header(data: bytes, rcode: int, questions: int, additional: int = 0) -> bytes:
    """The header of an answer to the query in C{data}: its ID, opcode, RD and CD."""
    message_id, flags = struct.unpack_from("!HH", data)
    opcode = (flags >> 11) & 0xF
    copied = flags & ((_RD << 8) | _CD)
    answer_flags = 0x8000 | (opcode << 11) | copied | rcode
    return _HEADER.pack(message_id, answer_flags, questions, 0, 0, additional)


def _header_answer(data: bytes, rcode: int, question: bytes = b"") -> bytes | None:
    """An answer with C{rcode} (and C{question}, if any) to a raw packet; or None.

    None (silence) when the header cannot be read or the packet is a response.
    """
    if len(data) < _HEADER.size or data[2] & 0x80:
        return None
    return _answer_header(data, rcode, 1 if question else 0) + question


def formerr_for(data: bytes) -> bytes | None:
    """A FORMERR answer built from a raw packet's header, or None to stay silent.

    Silent when the header cannot be read or the packet is itself a response.
    """
    return _header_answer(data, dns.EFORMAT)


def servfail_for(data: bytes) -> bytes | None:
    """A SERVFAIL answer built from a raw packet's header, or None to stay silent.

    For when even building the proper answer failed; silent as L{formerr_for} is.
    """
    return _header_answer(data, dns.ESERVER)


# -- the encoder -----------------------------------------------------------------


class _FoldedNames(dict[bytes, int]):
    """Compression targets matched case-insensitively, and only where a pointer reaches."""

    def __contains__(self, name: object) -> bool:
        return isinstance(name, bytes) and super().__contains__(name.lower())

    def __getitem__(self, name: bytes) -> int:
        return super().__getitem__(name.lower())

    def __setitem__(self, name: bytes, offset: int) -> None:
        if offset <= _MAX_POINTER:
            super().setdefault(name.lower(), offset)


def encode_message(message: dns.Message, records: Iterable[Any] | None = None) -> bytes:
    """Encode C{message} whole (no truncation), compressing names case-insensitively.

    Where every pointer goes then does not depend on the case of the question:
    what the hot path (L{kumazone.dns.hotpath}) relies on.
    """
    body = BytesIO()
    names = _FoldedNames()
    for query in message.queries:
        query.encode(body, names)
    sections = (message.answers, message.authority, message.additional)
    for section in sections:
        for record in section:
            record.encode(body, names)
    byte3 = (
        ((message.answer & 1) << 7)
        | ((message.opCode & 0xF) << 3)
        | ((message.auth & 1) << 2)
        | ((message.trunc & 1) << 1)
        | (message.recDes & 1)
    )
    byte4 = (
        ((message.recAv & 1) << 7)
        | ((message.authenticData & 1) << 5)
        | ((message.checkingDisabled & 1) << 4)
        | (message.rCode & 0xF)
    )
    header = _HEADER_OCTETS.pack(
        message.id,
        byte3,
        byte4,
        len(message.queries),
        len(message.answers),
        len(message.authority),
        len(message.additional),
    )
    return header + body.getvalue()


def _wire(response: dns._EDNSMessage) -> bytes:
    """Encode without twisted.names' own truncation.

    L{dns.Message.encode} cuts the body at C{maxSize} octets (512 by default)
    mid-record and leaves the counts as they were; we size answers ourselves
    (L{encode_response}), and compress names case-insensitively (L{encode_message}).
    """
    return encode_message(response._toMessage())


def encode_response(response: dns._EDNSMessage, limit: int | None) -> tuple[bytes, bool]:
    """Encode C{response} to at most C{limit} octets (None: no limit), dropping whole records.

    @return: the octets, and whether TC was set.
    """
    data = _wire(response)
    if limit is None or len(data) <= limit:
        return data, False
    return _trim(_copy(response), data, limit)


def _copy(response: dns._EDNSMessage) -> dns._EDNSMessage:
    """C{response} with sections of its own, to drop records from."""
    return dns._EDNSMessage(
        id=response.id,
        answer=response.answer,
        opCode=response.opCode,
        auth=response.auth,
        recDes=response.recDes,
        recAv=response.recAv,
        rCode=response.rCode,
        authenticData=response.authenticData,
        checkingDisabled=response.checkingDisabled,
        ednsVersion=response.ednsVersion,
        dnssecOK=response.dnssecOK,
        maxSize=response.maxSize,
        queries=response.queries[:],
        answers=response.answers[:],
        authority=response.authority[:],
        additional=response.additional[:],
    )


def _trim(message: dns._EDNSMessage, data: bytes, limit: int) -> tuple[bytes, bool]:
    """Drop records from C{message} (encoded: C{data}) until it fits in C{limit} octets.

    Additional records go first (without TC, RFC 2181 9), then authority and
    answer records from the end, with TC set.
    """
    while message.additional:
        message.additional.pop()
        data = _wire(message)
        if len(data) <= limit:
            return data, False
    message.trunc = True
    while message.authority or message.answers:
        (message.authority or message.answers).pop()
        data = _wire(message)
        if len(data) <= limit:
            return data, True
    if len(data) > limit:
        # The question alone does not fit (a 255-octet name in 512 octets cannot
        # happen, but a header is always possible).
        message.queries = []
        data = _wire(message)
    return data, True
