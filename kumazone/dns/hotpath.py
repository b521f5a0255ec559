"""The DNS hot path: common UDP queries answered from responses encoded once.

A query qualifies when it is a plain QUERY with one question, no other records
but an optional well-formed EDNS0 (version 0) OPT record, and a name with no
compression.  Its key is the lower-cased question, type and class, the EDNS
state (absent, or present with DO clear or set) and the client's mesh.  The
first such query is answered by the authority path; its response, if it fits
in 512 octets untruncated, becomes the template for the key.  Later ones copy
the template and patch the ID, the RD and CD flags and the question's case.

That patch is exact because L{kumazone.dns.wire.encode_message} compresses
names case-insensitively: where every pointer goes does not depend on the case
of the question, so the authority path's bytes for any case of a name differ
only in the question.  The cache is emptied whenever the table changes.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = ["Client", "HotCache", "HotKey", "HotQuery", "Template", "answer_from", "hot_key"]

#: Query header after the ID: QDCOUNT=1, ANCOUNT=0, NSCOUNT=0, then ARCOUNT 0 or 1.
_COUNTS_PLAIN = b"\x00\x01\x00\x00\x00\x00\x00\x00"
_COUNTS_EDNS = b"\x00\x01\x00\x00\x00\x00\x00\x01"
#: Templates are only kept for answers that fit any client's UDP limit.
MAX_TEMPLATE = 512
#: Options walked in a query's OPT record (more: the authority path says FORMERR).
MAX_EDNS_OPTIONS = 32
#: Longest query kept as a key of the exact-octets shortcut.
MAX_REMEMBERED_QUERY = 320
#: Entries before the cache starts over (an attacker's random names churn it).
MAX_ENTRIES = 100_000

#: A query's key: its name lower-cased (wire form), its type and class octets, its
#: EDNS state (0 none, 1 DO clear, 2 DO set) and the client's mesh.  A plain tuple:
#: the hot path makes one per query, and a NamedTuple costs six times as much to make.
HotKey = tuple[bytes, bytes, int, str]
#: An answer kept with RD clear, and the query counter of its type and rcode.
Template = tuple[bytes, list[int]]
#: A client's mesh, and that mesh's C{exact} dictionary (L{HotCache.exact_for}).
#: Read by index in the batched read loop, where an attribute would cost more.
Client = tuple[str, dict[bytes, Template]]


class HotQuery(NamedTuple):
    """A query that qualifies for the hot path, on its way through the authority path."""

    key: HotKey
    #: Where the question's name ends in C{data}.
    end: int
    data: bytes

    @property
    def mesh(self) -> str:
        """The mesh the query is answered for: the one in its key."""
        return self.key[3]


def answer_from(template: bytes, query: bytes) -> bytes:
    """The answer to C{query} from a C{template} kept for its exact octets: its ID, RD and CD."""
    flags = bytes((template[2] | (query[2] & 0x01), template[3] | (query[3] & 0x10)))
    return query[:2] + flags + template[4:]


def _without_rd(response: bytes) -> bytes:
    """C{response} with RD and CD clear, as templates are kept: both come from each query."""
    return response[:2] + bytes((response[2] & 0xFE, response[3] & 0xEF)) + response[4:]


def hot_key(data: bytes, mesh: str) -> tuple[HotKey, int] | None:
    """The cache key of a query and where its question's name ends; None if it does not qualify."""
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
    # The name, uncompressed (every query pays for this walk: it stays inline).
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
        state = _edns_state(data, question_end, size)
        if state is None:
            return None
    elif question_end != size:
        return None
    else:
        state = 0
    return (data[12:end].lower(), data[end:question_end], state, mesh), end


def _edns_state(data: bytes, start: int, size: int) -> int | None:
    """The EDNS state of the OPT record at C{start} (1 DO clear, 2 DO set); None if unfit.

    The OPT record: root name, type 41, class = UDP size, TTL = ext-rcode,
    version, flags; then options that must fill RDLENGTH and the packet exactly.
    """
    if size < start + 11 or data[start] != 0:
        return None
    if data[start + 1 : start + 3] != b"\x00\x29":
        return None
    if data[start + 6] != 0:  # EDNS version other than 0: BADVERS
        return None
    do_bit = data[start + 7] & 0x80
    (rdlength,) = struct.unpack_from("!H", data, start + 9)
    options = start + 11
    if options + rdlength != size:
        return None
    count = 0
    while options < size:
        count += 1
        if options + 4 > size or count > MAX_EDNS_OPTIONS:
            return None
        (option_length,) = struct.unpack_from("!H", data, options + 2)
        options += 4 + option_length
    if options != size:
        return None
    return 2 if do_bit else 1


class HotCache:
    """Templates by key, valid for one table version.

    C{exact} is a shortcut in front, one dictionary per mesh: keyed by a query's
    octets after its ID and flags, it finds the answer to a query seen before in
    exactly that form without parsing it; only the ID and RD need patching.
    """

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self.templates: dict[HotKey, Template] = {}
        self.exact: dict[str, dict[bytes, Template]] = {}
        #: For readers that see raw addresses: a client's packed IP address to
        #: its mesh and that mesh's C{exact} dictionary.
        self.clients: dict[bytes, Client] = {}
        self._remembered = 0

    def clear(self) -> None:
        """The table changed: every template goes."""
        self.templates.clear()
        self.exact.clear()
        self.clients.clear()
        self._remembered = 0

    def exact_for(self, mesh: str) -> dict[bytes, Template]:
        """The C{exact} dictionary of C{mesh}: the same object until L{clear}."""
        found = self.exact.get(mesh)
        if found is None:
            found = self.exact[mesh] = {}
        return found

    def client(self, ip: bytes, mesh: str) -> Client:
        """Keep that the client at packed address C{ip} is in C{mesh}; its C{clients} entry."""
        if len(self.clients) >= self.max_entries:
            self.clients.clear()
        entry = self.clients[ip] = (mesh, self.exact_for(mesh))
        return entry

    def remember(self, query: bytes, mesh: str, answer: bytes, counter: list[int]) -> None:
        """Keep C{answer} for queries with exactly C{query}'s octets after ID and flags.

        Not for long queries (EDNS options of no meaning to us): their octets as
        keys would let an attacker fill memory with a few hundred megabytes.
        """
        if len(query) > MAX_REMEMBERED_QUERY:
            return
        if self._remembered >= self.max_entries:
            for known in self.exact.values():
                known.clear()  # in place: readers may hold these dictionaries
            self._remembered = 0
        self._remembered += 1
        self.exact_for(mesh)[query[4:]] = (_without_rd(answer), counter)

    def store(self, query: HotQuery, response: bytes, counter: list[int]) -> None:
        """Keep C{response} to C{query} as the template for the query's key."""
        if len(response) > MAX_TEMPLATE or response[2] & 0x02:  # too big, or truncated
            return
        if len(self.templates) >= self.max_entries:
            self.templates.clear()
        key, end, data = query
        name, _type_class, _edns, mesh = key
        # The question's case comes from each query, as RD does.
        self.templates[key] = (_without_rd(response[:12] + name + response[end:]), counter)
        self.remember(data, mesh, response, counter)

    @staticmethod
    def answer(template: bytes, query: bytes, end: int) -> bytes:
        """The template patched with the query's ID, RD and CD flags and question case.

        The patch of L{answer_from}, and the question's octets in the same copy.
        """
        return (
            query[:2]
            + bytes((template[2] | (query[2] & 0x01), template[3] | (query[3] & 0x10)))
            + template[4:12]
            + query[12:end]
            + template[end:]
        )
