"""The DNS wire format, pure: checks of received packets, and the encoder of answers.

twisted.names' parser is lenient (it ignores missing records and trailing octets)
and its encoder cuts an answer mid-record at C{maxSize}; kumazone walks every
section of a query before parsing it, and sizes its answers itself, dropping whole
records.  No I/O here: the protocols in L{kumazone.dns.server} frame and dispatch.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from io import BytesIO
from typing import Any

from twisted.names import dns

__all__ = ["encode_message", "encode_response", "formerr_for", "servfail_for", "wire_problem"]

#: A DNS header: ID, flags, then the four section counts.
_HEADER = struct.Struct("!HHHHHH")
#: The same header, with the flags as their two octets.
_HEADER_OCTETS = struct.Struct("!H2B4H")
#: Compression pointers hold 14 bits of offset.
_MAX_POINTER = 0x3FFF


# -- checks of received packets --------------------------------------------------


def _name_end(data: bytes, start: int) -> int:
    """Where the name at C{start} ends; raises C{ValueError} for anything malformed.

    Compression pointers must point strictly backwards (so they cannot loop);
    labels of the reserved types, labels holding a dot and names over 255 octets
    are refused.
    """
    position, total, end = start, 0, None
    while True:
        if position >= len(data):
            raise ValueError("a name runs past the end of the packet")
        length = data[position]
        if length & 0xC0 == 0xC0:
            if position + 1 >= len(data):
                raise ValueError("a compression pointer is cut off")
            target = ((length & 0x3F) << 8) | data[position + 1]
            if target >= position:
                raise ValueError("a compression pointer does not point backwards")
            if end is None:
                end = position + 2
            position = target
            continue
        if length & 0xC0:
            raise ValueError(f"label type {length >> 6:#x} is not supported")
        if length == 0:
            total += 1
            if total > 255:
                raise ValueError("a name is over 255 octets")
            return end if end is not None else position + 1
        label = data[position + 1 : position + 1 + length]
        if len(label) < length:
            raise ValueError("a label runs past the end of the packet")
        if b"." in label:
            raise ValueError("a label holds a '.'")
        total += length + 1
        if total > 255:
            raise ValueError("a name is over 255 octets")
        position += 1 + length


def wire_problem(data: bytes) -> str | None:
    """Why C{data} is not a well-formed DNS message, or None.

    A query must pass this walk of every section before twisted.names parses it.
    """
    if len(data) < _HEADER.size:
        return "shorter than a DNS header"
    questions, answers, authority, additional = struct.unpack_from("!HHHH", data, 4)
    offset = _HEADER.size
    try:
        for _ in range(questions):
            offset = _name_end(data, offset) + 4
            if offset > len(data):
                raise ValueError("a question is cut off")
        for _ in range(answers + authority + additional):
            offset = _name_end(data, offset)
            if offset + 10 > len(data):
                raise ValueError("a record header is cut off")
            (rdlength,) = struct.unpack_from("!H", data, offset + 8)
            offset += 10 + rdlength
            if offset > len(data):
                raise ValueError("record data runs past the end of the packet")
    except ValueError as e:
        return str(e)
    if offset != len(data):
        return f"{len(data) - offset} octets after the last record"
    return None


def _header_answer(data: bytes, rcode: int) -> bytes | None:
    """An answer of only a header with C{rcode}, built from a raw packet's; or None."""
    if len(data) < _HEADER.size:
        return None
    message_id, flags = struct.unpack("!HH", data[:4])
    if flags & 0x8000:
        return None
    opcode = (flags >> 11) & 0xF
    recursion_desired = flags & 0x0100
    return _HEADER.pack(message_id, 0x8000 | (opcode << 11) | recursion_desired | rcode, 0, 0, 0, 0)


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
