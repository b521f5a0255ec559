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
only in the question.  Only answers with records are kept so, and a change of
the table drops those of the names it touched (L{HotCache.apply}); negative
answers are made per query from the authority's maps (L{HotCache.negative}).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

if TYPE_CHECKING:
    from kumazone.core.zone import ZoneChange
    from kumazone.dns.authority import MeshAuthority

__all__ = [
    "Client",
    "HotCache",
    "HotKey",
    "HotQuery",
    "Template",
    "answer_from",
    "hot_key",
    "wire_name",
]

#: Query header after the ID: QDCOUNT=1, ANCOUNT=0, NSCOUNT=0, then ARCOUNT 0 or 1.
_COUNTS_PLAIN = b"\x00\x01\x00\x00\x00\x00\x00\x00"
_COUNTS_EDNS = b"\x00\x01\x00\x00\x00\x00\x00\x01"
#: Templates are only kept for answers that fit any client's UDP limit.
MAX_TEMPLATE = 512
#: Options walked in a query's OPT record (more: the authority path says FORMERR).
MAX_EDNS_OPTIONS = 32
#: Longest query kept as a key of the exact-octets shortcut.
MAX_REMEMBERED_QUERY = 320
#: Entries before the cache starts over (random names never enter it; the forms of
#: real names' queries do: case, EDNS options).
MAX_ENTRIES = 100_000
#: Negative answers kept by their queries' exact octets, in all meshes, until the
#: table changes (a change may make any of them wrong): past it they start over.
#: Apart from the positive answers, so a flood of random names churns only these.
MAX_NEGATIVE_ENTRIES = 16_384

#: A query's key: its name lower-cased (wire form), its type and class octets, its
#: EDNS state (0 none, 1 DO clear, 2 DO set) and the client's mesh.  A plain tuple:
#: the hot path makes one per query, and a NamedTuple costs six times as much to make.
HotKey = tuple[bytes, bytes, int, str]
#: An answer kept with RD clear, and the query counter of its type and rcode.
Template = tuple[bytes, list[int]]
#: A client's mesh, and that mesh's C{exact} and C{negatives} dictionaries
#: (L{HotCache.exact_for}).  Read by index in the batched read loop (and by the C
#: loop, _hotloop.c), where an attribute would cost more.
Client = tuple[str, dict[bytes, Template], dict[bytes, Template]]


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


#: Most tails of negative answers kept (they are few: see L{HotCache.negative}).
MAX_TAILS = 4096
#: Octet forms of one question kept in the exact-octets shortcut (its case, its EDNS
#: options): more forms of one name are answered from its template, so a flood of a
#: real name's random-case or random-cookie forms cannot push other names out.
MAX_FORMS = 8
#: Query types whose counters a tail keeps at hand (others look theirs up).
MAX_TAIL_COUNTERS = 16
#: The query types whose answers at an apex carry the SOA, as type octets.
_SERIAL_TYPES = (b"\x00\x06", b"\x00\xff")
_OK, _NXDOMAIN, _REFUSED = 0, 3, 5

#: Where a cache entry lies: (None, template key) or (mesh, exact octets).
_Item = tuple[str | None, Any]
#: A negative answer's header after the ID (RD and CD clear), the octets after its
#: question, and its queries' counters by type and class octets.
_Tail = tuple[bytes, bytes, dict[bytes, list[int]]]


def wire_name(name: bytes) -> bytes:
    """C{name} (text, no trailing dot) as the hot path keys it: wire form, lower case."""
    if not name:
        return b"\x00"
    labels = name.lower().split(b".")
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"


_K = TypeVar("_K")


def _templates_only(index: dict[_K, list[_Item]]) -> dict[_K, list[_Item]]:
    """C{index} without the exact-octets entries (the templates' are kept)."""
    kept: dict[_K, list[_Item]] = {}
    for key, items in index.items():
        templates = [item for item in items if item[0] is None]
        if templates:
            kept[key] = templates
    return kept


def _dotted(wire: bytes) -> bytes:
    """The presentation form (no trailing dot) of an uncompressed wire-form name."""
    labels = []
    position = 0
    length = wire[0]
    while length:
        labels.append(wire[position + 1 : position + 1 + length])
        position += 1 + length
        length = wire[position]
    return b".".join(labels)


def _packed_forms(address: str) -> tuple[bytes, ...]:
    """How a client address comes in a socket address: its packed forms (IPv4 also mapped)."""
    try:
        packed = socket.inet_pton(socket.AF_INET, address)
    except OSError:
        try:
            return (socket.inet_pton(socket.AF_INET6, address),)
        except OSError:
            return ()
    return packed, b"\x00" * 10 + b"\xff\xff" + packed


class HotCache:
    """Templates by key, kept until a change touches their names; negative answers made.

    C{exact} is a shortcut in front, one dictionary per mesh: keyed by a query's
    octets after its ID and flags, it finds the answer to a query seen before in
    exactly that form without parsing it; only the ID and RD need patching.

    Only answers with records are kept by name; each is listed under its name
    (lower case, presentation form), or, for a VIP's full reverse name, under
    the VIP's offset, so a change drops the answers of the names and PTRs it
    touched, at a cost of their entries (L{apply}).  The answers at an apex that
    carry the SOA are listed too, and dropped when the serial moves.

    Negative answers (NXDOMAIN, NODATA, REFUSED) are never kept by name: so a
    flood of random names leaves the cache as it was.  They are made per query
    (L{negative}): the authority says which it is, and the octets after the
    question depend only on the rcode, the apex, the question name's length and
    the EDNS state (the SOA's owner is a pointer to the apex in the question);
    those tails are learnt from the authority path's answers, for one table version.
    A negative answer asked for again in the same octets is kept by them, apart
    from the positive ones (C{negatives}, per mesh, at most L{MAX_NEGATIVE_ENTRIES}
    in all), until the table changes: a resolver's search list asks the same
    names that do not exist again and again.
    """

    def __init__(
        self,
        max_entries: int = MAX_ENTRIES,
        authority: MeshAuthority | None = None,
        cell: Callable[[int, int], list[int]] | None = None,
    ) -> None:
        """
        @param authority: whose answers are made and kept; without one, no
            negative answers are made, and every change empties the cache.
        @param cell: the counter of UDP answers of a query type and rcode.
        """
        self.max_entries = max_entries
        self.authority = authority
        self._cell = cell or (lambda qtype, rcode: [0])
        self.templates: dict[HotKey, Template] = {}
        self.exact: dict[str, dict[bytes, Template]] = {}
        #: Per mesh: negative answers by their queries' octets after ID and flags,
        #: for this table version (L{remember_negative}).
        self.negatives: dict[str, dict[bytes, Template]] = {}
        self._negative_entries = 0
        self._negative_context: tuple[Any, ...] | None = None
        #: Hashes of (mesh, octets) of negative queries seen once: only a second
        #: ask keeps one, so a flood of names never asked twice costs a hash each.
        self._negative_once: set[int] = set()
        #: For readers that see raw addresses: a client's packed IP address to
        #: its mesh and that mesh's C{exact} dictionary.
        self.clients: dict[bytes, Client] = {}
        #: Lower-cased name, presentation form (as the authority tells changed
        #: names) -> where its answers lie.
        self._by_name: dict[bytes, list[_Item]] = {}
        #: A VIP's offset -> where the answers to its two full reverse names lie
        #: (as the authority tells changed PTRs: L{MeshAuthority.changed_offsets}).
        self._by_offset: dict[int, list[_Item]] = {}
        #: The entries that carry the SOA (and so its serial).
        self._serial: list[_Item] = []
        #: Exact-octets forms kept per key (at most L{MAX_FORMS}), and in all.
        self._forms: dict[HotKey, int] = {}
        self._exact_entries = 0
        self.tails: dict[tuple[int, bytes | None, int, int], _Tail] = {}
        self._version = authority.version if authority is not None else 0
        if authority is not None:
            apexes = [authority.apex, *authority.reverse_apexes]
            self._apexes = frozenset(wire_name(apex) for apex in apexes)
            # Names the SOA's own names compress into: a question ending with
            # one changes the SOA's octets, so its answer is not made here.
            soa_names = [authority.nameserver, authority.hostmaster]
            odd = set()
            for soa_name in soa_names:
                while soa_name != authority.apex and b"." in soa_name:
                    odd.add(soa_name)
                    soa_name = soa_name.split(b".", 1)[1]
            self._odd = frozenset(odd)
            self._odd_names: tuple[bytes, ...] = tuple(odd)
            self._odd_suffixes = tuple(b"." + name for name in odd)
        else:
            self._apexes = frozenset()
            self._odd = frozenset()
            self._odd_names = ()
            self._odd_suffixes = ()

    def clear(self) -> None:
        """Anything may have changed: every answer goes."""
        self.templates.clear()
        self.exact.clear()
        self.negatives.clear()
        self._negative_entries = 0
        self._negative_once.clear()
        self._negative_context = None
        self.clients.clear()
        self._by_name.clear()
        self._by_offset.clear()
        self._serial.clear()
        self._forms.clear()
        self._exact_entries = 0
        self.tails.clear()
        if self.authority is not None:
            self._version = self.authority.version

    def apply(self, change: ZoneChange) -> None:
        """Drop the answers C{change} may have changed (the authority has applied it already).

        The names whose records changed (L{MeshAuthority.changed}), the PTRs of
        the VIPs whose PTR changed (L{MeshAuthority.changed_offsets}), the answers
        carrying the SOA when its serial moved, and the mesh of the addresses
        whose mesh may have changed; a full change empties the cache.
        """
        authority = self.authority
        self._negative_context = None  # the authority may have new maps
        if (
            change.full
            or authority is None
            or authority.changed is None
            or authority.version != change.snapshot.version
        ):
            self.clear()
            return
        by_name, by_offset = self._by_name, self._by_offset
        if by_name:
            for name in authority.changed:
                self._drop(by_name.pop(name.encode("ascii").lower(), None))
        if by_offset:
            for offset in authority.changed_offsets:
                self._drop(by_offset.pop(offset, None))
        if authority.version != self._version:
            self._version = authority.version
            self.tails.clear()
            self._forget_negatives()
            serial, self._serial = self._serial, []
            self._drop(serial)
        for address in change.addresses:
            for packed in _packed_forms(address):
                self.clients.pop(packed, None)

    def _drop(self, items: list[_Item] | None) -> None:
        """Drop the entries at C{items} (some may be gone already)."""
        if not items:
            return
        templates, exact, forms = self.templates, self.exact, self._forms
        for mesh, key in items:
            if mesh is None:
                templates.pop(key, None)
                forms.pop(key, None)
            else:
                known = exact.get(mesh)
                if known is not None and known.pop(key, None) is not None:
                    self._exact_entries -= 1

    def _evict_exact(self) -> None:
        """The exact-octets shortcut is full: it starts over, the templates stay.

        In place (readers hold the exact dictionaries); O(templates), and only
        after C{max_entries} new forms.
        """
        for known in self.exact.values():
            known.clear()
        self._forms.clear()
        self._exact_entries = 0
        self._by_name = _templates_only(self._by_name)
        self._by_offset = _templates_only(self._by_offset)
        self._serial = [item for item in self._serial if item[0] is None]

    def _list(self, name: bytes, item: _Item, type_class: bytes) -> None:
        """List an entry under its name (and as carrying the serial, if it does)."""
        if len(self.templates) >= self.max_entries:
            # Only a table of more names than that gets here: start over (in place:
            # readers may hold the exact dictionaries).
            self.templates.clear()
            for known in self.exact.values():
                known.clear()
            self._by_name.clear()
            self._by_offset.clear()
            self._serial.clear()
            self._forms.clear()
            self._exact_entries = 0
        # Listed by the name's presentation form, as the authority tells changed names:
        # a change of many rows then drops what it touched without encoding each name.
        # A VIP's reverse name is listed by the VIP's offset, as the authority tells
        # changed PTRs.
        dotted = _dotted(name).lower()
        offset = None
        if dotted.endswith(b".arpa") and self.authority is not None:
            offset = self.authority.ptr_offset(dotted)
        if offset is None:
            items = self._by_name.get(dotted)
            if items is None:
                items = self._by_name[dotted] = []
        else:
            items = self._by_offset.get(offset)
            if items is None:
                items = self._by_offset[offset] = []
        items.append(item)
        if name in self._apexes and type_class[:2] in _SERIAL_TYPES:
            self._serial.append(item)

    def exact_for(self, mesh: str) -> dict[bytes, Template]:
        """The C{exact} dictionary of C{mesh}: the same object until L{clear}."""
        found = self.exact.get(mesh)
        if found is None:
            found = self.exact[mesh] = {}
        return found

    def negatives_for(self, mesh: str) -> dict[bytes, Template]:
        """The C{negatives} dictionary of C{mesh}: the same object until L{clear}."""
        found = self.negatives.get(mesh)
        if found is None:
            found = self.negatives[mesh] = {}
        return found

    def client(self, ip: bytes, mesh: str) -> Client:
        """Keep that the client at packed address C{ip} is in C{mesh}; its C{clients} entry."""
        if len(self.clients) >= self.max_entries:
            self.clients.clear()
        entry = self.clients[ip] = (mesh, self.exact_for(mesh), self.negatives_for(mesh))
        return entry

    def remember_negative(self, query: bytes, mesh: str, answer: bytes, counter: list[int]) -> None:
        """Keep the negative C{answer} for queries with exactly C{query}'s octets, in C{mesh}.

        Only from its second ask (within a table version): a query asked again (a
        resolver's search list, a client's retry) is then answered as a positive
        one is, without parsing; a flood of names asked once costs a hash each.
        Until the table changes (L{apply}); at most L{MAX_NEGATIVE_ENTRIES} in all,
        then they start over.
        """
        if len(query) > MAX_REMEMBERED_QUERY:
            return
        octets = query[4:]
        once = self._negative_once
        seen = hash((mesh, octets))
        if seen not in once:
            if len(once) >= MAX_NEGATIVE_ENTRIES:
                once.clear()
            once.add(seen)
            return
        if self._negative_entries >= MAX_NEGATIVE_ENTRIES:
            self._forget_negatives()
        known = self.negatives_for(mesh)
        if octets not in known:
            self._negative_entries += 1
        known[octets] = (_without_rd(answer), counter)

    def _forget_negatives(self) -> None:
        """Every negative answer kept by octets goes (in place: readers hold the dicts).

        O(MAX_NEGATIVE_ENTRIES) at most, once per table version or per that many
        new negative queries.
        """
        if self._negative_entries:
            for known in self.negatives.values():
                known.clear()
            self._negative_entries = 0

    def remember(self, query: bytes, key: HotKey, answer: bytes, counter: list[int]) -> None:
        """Keep C{answer} (to a query of C{key}) for queries with exactly C{query}'s octets.

        Only after its ID and flags.  Not for long queries (EDNS options of no
        meaning to us): their octets as keys would let an attacker fill memory
        with a few hundred megabytes.
        """
        if len(query) > MAX_REMEMBERED_QUERY:
            return
        mesh = key[3]
        octets = query[4:]
        known = self.exact_for(mesh)
        if octets in known:
            known[octets] = (_without_rd(answer), counter)
            return
        forms = self._forms.get(key, 0)
        if forms >= MAX_FORMS:
            return
        if self._exact_entries >= self.max_entries:
            self._evict_exact()
            known = self.exact_for(mesh)
        self._forms[key] = forms + 1
        self._exact_entries += 1
        self._list(key[0], (mesh, octets), key[1])
        known[octets] = (_without_rd(answer), counter)

    def store(self, query: HotQuery, response: bytes, counter: list[int]) -> None:
        """Learn from the authority path's C{response} to C{query}.

        An answer with records becomes the template for the query's key; a
        negative one teaches the tail of its kind (L{negative}).
        """
        if len(response) > MAX_TEMPLATE or response[2] & 0x02:  # too big, or truncated
            return
        key, end, data = query
        name, type_class = key[0], key[1]
        rcode = response[3] & 0x0F
        if rcode == _OK and response[6:8] != b"\x00\x00":
            # The question's case comes from each query, as RD does.
            if key not in self.templates:
                self._list(name, (None, key), type_class)
            self.templates[key] = (_without_rd(response[:12] + name + response[end:]), counter)
            self.remember(data, key, response, counter)
        elif rcode in (_OK, _NXDOMAIN, _REFUSED):
            tail_key = self._tail_key(key)
            if tail_key is not None and tail_key[0] == rcode:
                if len(self.tails) >= MAX_TAILS:
                    self.tails.clear()
                header = _without_rd(response[:12])[2:]
                self.tails[tail_key] = (header, response[end + 4 :], {type_class: counter})

    def negative_context(self) -> tuple[Any, ...] | None:
        """What the C loop (_hotloop.c) makes an NXDOMAIN of, as L{negative} would; or None.

        For a name in the domain that no one has: the authority's maps to tell
        (L{MeshAuthority.forward_maps}), the names L{_tail_key} leaves to the
        authority path, and the tails.  Made once per table change (L{apply},
        L{clear}): the authority replaces its maps on a full build.
        """
        context = self._negative_context
        if context is None:
            authority = self.authority
            if authority is None:
                return None
            forward, empty = authority.forward_maps()
            context = self._negative_context = (
                forward,
                empty,
                authority.apex,
                b"." + authority.apex,
                self._odd_names,
                self._odd_suffixes,
                self.tails,
                _NXDOMAIN,
            )
        return context

    def _tail_key(self, key: HotKey) -> tuple[int, bytes | None, int, int] | None:
        """What a negative answer to a query of C{key} depends on after its question; or None.

        None when the answer has records, or when it cannot be made from a tail
        (the name ends with a name the SOA compresses into).
        """
        authority = self.authority
        if authority is None:
            return None
        name, type_class, edns, mesh = key
        dotted = _dotted(name)
        if dotted in self._odd or dotted.endswith(self._odd_suffixes):
            return None
        qtype = (type_class[0] << 8) | type_class[1]
        qclass = (type_class[2] << 8) | type_class[3]
        found = authority.negative(dotted, qtype, qclass, mesh)
        if found is None:
            return None
        rcode, apex = found
        return rcode, apex, len(name), edns

    def negative(self, query: bytes, key: HotKey, end: int) -> tuple[bytes, list[int]] | None:
        """The negative answer to C{query} (of C{key}, its name ending at C{end}), counted; or None.

        With it, the counter it was counted in (for L{remember_negative}).

        None when the answer is not negative, or its tail is not known yet: the
        authority path answers it, and teaches the tail (L{store}).
        """
        tail_key = self._tail_key(key)
        if tail_key is None:
            return None
        tail = self.tails.get(tail_key)
        if tail is None:
            return None
        header, rest, counters = tail
        type_class = key[1]
        counter = counters.get(type_class)
        if counter is None:
            qtype = (type_class[0] << 8) | type_class[1]
            counter = self._cell(qtype, tail_key[0])
            if len(counters) < MAX_TAIL_COUNTERS:
                counters[type_class] = counter
        counter[0] += 1
        return (
            query[:2]
            + bytes((header[0] | (query[2] & 0x01), header[1] | (query[3] & 0x10)))
            + header[2:]
            + query[12 : end + 4]
            + rest
        ), counter

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
