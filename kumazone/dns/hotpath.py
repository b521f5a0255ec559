"""The DNS hot path: common UDP queries answered from responses encoded once.

A query qualifies when it is a plain QUERY with one question, no other records
but an optional well-formed EDNS0 (version 0) OPT record, and a name with no
compression.  Its key is the lower-cased question, type and class, the EDNS
state (absent, or present with DO clear or set) and the client's mesh.  The
first such query is answered by the authority path; its response, if it fits
in 512 octets untruncated, becomes the template for the key.  Later ones copy
the template and patch the ID, the RD flag and the question's case.

That patch is exact because L{encode_message} compresses names
case-insensitively: where every pointer goes does not depend on the case of the
question, so the authority path's bytes for any case of a name differ only in
the question.  The cache is emptied whenever the table changes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from io import BytesIO
from typing import Any

from twisted.names import dns

__all__ = ["HotCache", "HotKey", "encode_message", "hot_key"]

#: Query header after the ID: QDCOUNT=1, ANCOUNT=0, NSCOUNT=0, then ARCOUNT 0 or 1.
_COUNTS_PLAIN = b"\x00\x01\x00\x00\x00\x00\x00\x00"
_COUNTS_EDNS = b"\x00\x01\x00\x00\x00\x00\x00\x01"
_HEADER = struct.Struct("!H2B4H")
#: Compression pointers hold 14 bits of offset.
_MAX_POINTER = 0x3FFF
#: Templates are only kept for answers that fit any client's UDP limit.
MAX_TEMPLATE = 512
#: Entries before the cache starts over (an attacker's random names churn it).
MAX_ENTRIES = 100_000

HotKey = tuple[bytes, bytes, int, str]


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
    """Encode C{message} whole (no truncation), compressing names case-insensitively."""
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
    header = _HEADER.pack(
        message.id,
        byte3,
        byte4,
        len(message.queries),
        len(message.answers),
        len(message.authority),
        len(message.additional),
    )
    return header + body.getvalue()


def hot_key(data: bytes, mesh: str) -> tuple[HotKey, int] | None:
    """The cache key of a query and where its question ends, or None if it does not qualify."""
    size = len(data)
    if size < 17 or data[2] & 0xFE:  # QR, opcode, AA, TC: only RD may be set
        return None
    counts = data[4:12]
    if counts == _COUNTS_PLAIN:
        edns = False
    elif counts == _COUNTS_EDNS:
        edns = True
    else:
        return None
    position = 12
    total = 1
    while True:
        if position >= size:
            return None
        length = data[position]
        if length == 0:
            break
        if length > 63:
            return None
        label = data[position + 1 : position + 1 + length]
        if len(label) < length or 46 in label:  # 46: a '.' inside a label
            return None
        total += length + 1
        position += 1 + length
    if total > 255:
        return None
    end = position + 1
    question_end = end + 4
    if edns:
        # The OPT record: root name, type 41, class = UDP size, TTL = ext-rcode,
        # version, flags; then options that must fill RDLENGTH exactly.
        if size < question_end + 11 or data[question_end] != 0:
            return None
        if data[question_end + 1 : question_end + 3] != b"\x00\x29":
            return None
        if data[question_end + 6] != 0:  # EDNS version other than 0: BADVERS
            return None
        do_bit = data[question_end + 7] & 0x80
        (rdlength,) = struct.unpack_from("!H", data, question_end + 9)
        options = question_end + 11
        if options + rdlength != size:
            return None
        while options < size:
            if options + 4 > size:
                return None
            (option_length,) = struct.unpack_from("!H", data, options + 2)
            options += 4 + option_length
        if options != size:
            return None
        state = 2 if do_bit else 1
    else:
        if question_end != size:
            return None
        state = 0
    return (data[12:end].lower(), data[end:question_end], state, mesh), end


class HotCache:
    """Templates by key, valid for one table version.

    C{exact} is a shortcut in front, one dictionary per mesh: keyed by a query's
    octets after its ID and flags, it finds the answer to a query seen before in
    exactly that form without parsing it; only the ID and RD need patching.
    """

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self.templates: dict[HotKey, tuple[bytes, Any]] = {}
        self.exact: dict[str, dict[bytes, tuple[bytes, Any]]] = {}
        #: For readers that see raw addresses: a client's packed IP address to
        #: its mesh and that mesh's C{exact} dictionary.
        self.clients: dict[bytes, tuple[str, dict[bytes, tuple[bytes, Any]]]] = {}
        self._remembered = 0

    def clear(self) -> None:
        """The table changed: every template goes."""
        self.templates.clear()
        self.exact.clear()
        self.clients.clear()
        self._remembered = 0

    def exact_for(self, mesh: str) -> dict[bytes, tuple[bytes, Any]]:
        """The C{exact} dictionary of C{mesh}: the same object until L{clear}."""
        found = self.exact.get(mesh)
        if found is None:
            found = self.exact[mesh] = {}
        return found

    def client(self, ip: bytes, mesh: str) -> tuple[str, dict[bytes, tuple[bytes, Any]]]:
        """Keep that the client at packed address C{ip} is in C{mesh}; its C{clients} entry."""
        if len(self.clients) >= self.max_entries:
            self.clients.clear()
        entry = self.clients[ip] = (mesh, self.exact_for(mesh))
        return entry

    def remember(self, query: bytes, mesh: str, answer: bytes, counter: Any) -> None:
        """Keep C{answer} for queries with exactly C{query}'s octets after ID and flags."""
        if self._remembered >= self.max_entries:
            for known in self.exact.values():
                known.clear()  # in place: readers may hold these dictionaries
            self._remembered = 0
        self._remembered += 1
        self.exact_for(mesh)[query[4:]] = (
            answer[:2] + bytes((answer[2] & 0xFE,)) + answer[3:],
            counter,
        )

    def store(self, key: HotKey, end: int, query: bytes, response: bytes, counter: Any) -> None:
        """Keep C{response} (to C{query}, whose key C{key} is) as the template for C{key}."""
        if len(response) > MAX_TEMPLATE or response[2] & 0x02:  # too big, or truncated
            return
        if len(self.templates) >= self.max_entries:
            self.templates.clear()
        # RD comes from each query; the question's case too.
        template = response[:2] + bytes((response[2] & 0xFE,)) + response[3:12] + key[0]
        template += response[end:]
        self.templates[key] = (template, counter)
        self.remember(query, key[3], response, counter)

    @staticmethod
    def answer(template: bytes, query: bytes, end: int) -> bytes:
        """The template patched with the query's ID, RD flag and question case."""
        return (
            query[:2]
            + bytes((template[2] | (query[2] & 0x01),))
            + template[3:12]
            + query[12:end]
            + template[end:]
        )
