"""The DNS authority: a twisted.names L{IResolver} over a Kuma zone's VIP table.

Authoritative for the configured domain and for the reverse domains of both CIDRs.
Names are looked up lower-cased (the maps hold the entries' own text names);
answers repeat the name as it was asked.  A name that
is not ours raises L{dns.DomainError} (REFUSED); a name that is ours and does not
exist raises L{NameNotFound}, which carries the SOA for the authority section.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Network, IPv6Network

from twisted.internet import defer
from twisted.names import dns
from twisted.names.common import ResolverBase
from twisted.names.error import AuthoritativeDomainError, DomainError

from kumazone.core.bulk import bulk_load
from kumazone.core.config import DnsServerConfig
from kumazone.core.names import nameserver_name
from kumazone.core.vips import ServiceKey, VipRange
from kumazone.core.zone import DEFAULT_MESH, VipEntry, ZoneChange, ZoneSnapshot

__all__ = ["MeshAuthority", "NameNotFound", "Negative", "NotOurs", "Result", "reverse_domains"]

#: An answer as twisted.names' resolvers give one: answer, authority and additional records.
Result = tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]

_SERVED_CLASSES = (dns.IN, dns.ANY)
#: TTL of a provisional VIP's records, until the global confirms it.
PROVISIONAL_TTL = 5
#: AXFR and IXFR: the table is not handed out whole.
_TRANSFERS = (dns.AXFR, dns.IXFR)
#: A full reverse name: 4 octet labels + in-addr.arpa, 32 nibbles + ip6.arpa.
_FULL_REVERSE_LABELS = {b"in-addr.arpa": 6, b"ip6.arpa": 34}
#: The query types a name of a service has data for.
_ADDRESS_TYPES = frozenset((dns.A, dns.AAAA, dns.ALL_RECORDS))
#: The query types an apex has data for.
_APEX_TYPES = frozenset((dns.SOA, dns.NS, dns.ALL_RECORDS))
_PTR_TYPES = frozenset((dns.PTR, dns.ALL_RECORDS))

#: What a name in the domain or a reverse domain is (L{MeshAuthority._forward_kind}
#: and L{MeshAuthority._reverse_kind}): one decision, for the answer and for the
#: hot path's negative answers alike.
_APEX, _NAMESERVER, _SERVED, _EMPTY, _NONE = range(5)

#: A negative answer: its rcode (NOERROR for NODATA, NXDOMAIN, REFUSED) and the
#: apex whose SOA it carries (None for REFUSED, which carries none).
Negative = tuple[int, bytes | None]


class NameNotFound(AuthoritativeDomainError):
    """NXDOMAIN: the name is in our domain and does not exist; carries the SOA."""

    def __init__(self, name: bytes, authority: list[dns.RRHeader]) -> None:
        super().__init__(name)
        self.authority = authority


class NotOurs(DomainError):
    """The name (or class, or type) is not something this server answers: REFUSED."""


def reverse_domains(network: IPv4Network | IPv6Network) -> list[str]:
    """The reverse domains (octet or nibble aligned) that exactly cover C{network}."""
    if isinstance(network, IPv4Network):
        step, suffix = 8, "in-addr.arpa"
    else:
        step, suffix = 4, "ip6.arpa"
    aligned = -(-network.prefixlen // step) * step
    domains = []
    for subnet in network.subnets(new_prefix=aligned):
        labels = subnet.network_address.reverse_pointer.split(".")
        keep = aligned // step
        address_labels = labels[: len(labels) - 2]
        kept = address_labels[len(address_labels) - keep :] if keep else []
        domains.append(".".join([*kept, suffix]))
    return domains


def _address_label(label: bytes, suffix: bytes) -> bool:
    """Whether C{label} can be part of a reverse name: an octet, or a nibble."""
    if suffix == b"in-addr.arpa":
        return label.isdigit() and label == str(int(label)).encode() and int(label) < 256
    return len(label) == 1 and label in b"0123456789abcdef"


def _reverse_address(name: bytes) -> int | None:
    """The address a full reverse name stands for, or None if it is not one."""
    labels = name.split(b".")
    if labels[-2:] == [b"in-addr", b"arpa"] and len(labels) == 6:
        octets = labels[3::-1]
        # Canonical decimal only: "010" is another name than "10".
        if all(o.isdigit() and o == str(int(o)).encode() and int(o) < 256 for o in octets):
            return int.from_bytes(bytes(int(o) for o in octets), "big")
        return None
    if labels[-2:] == [b"ip6", b"arpa"] and len(labels) == 34:
        nibbles = labels[31::-1]
        if all(len(n) == 1 and n in b"0123456789abcdef" for n in nibbles):
            return int(b"".join(nibbles), 16)
    return None


def _key_of(entry: VipEntry) -> ServiceKey:
    """The service key of an entry: who keeps a contested name (the least)."""
    return entry.key


class MeshAuthority(ResolverBase):
    """Answers for the domain and the VIPs' reverse domains from a L{ZoneSnapshot}.

    Kept up to date by L{apply}, at a cost of what changed: per mesh, each name
    to the entry that owns it (the least service key of those claiming it: the
    first in the snapshot's order); the empty non-terminals, counted per mesh;
    and VIP offsets to their entries, for PTR.  L{update} builds it all afresh.
    """

    def __init__(self, config: DnsServerConfig, nameserver_addresses: Sequence[str] = ()) -> None:
        super().__init__()
        self.config = config
        self.ttl = config.ttl
        self.apex = config.domain.encode("ascii")
        self._suffix = b"." + self.apex
        #: The same, as text: the names the maps hold.
        self._apex_text = config.domain
        self._suffix_text = "." + config.domain
        self.nameserver = nameserver_name(config.domain).encode("ascii")
        self.hostmaster = b"hostmaster." + self.apex
        self._nameserver_addresses = [ipaddress.ip_address(a) for a in nameserver_addresses]
        #: The query types the nameserver's name has data for.
        self._nameserver_types = frozenset(
            qtype
            for qtype in (dns.A, dns.AAAA, dns.ALL_RECORDS)
            if self._nameserver_records(self.nameserver, qtype)
        )
        self.reverse_apexes = [
            domain.encode("ascii")
            for network in (config.cidr, config.cidr6)
            for domain in reverse_domains(network)
        ]
        self.version = 0
        self._range = VipRange(config.cidr, config.cidr6)
        #: mesh -> name -> the entry that owns it (a few meshes, so no dict per name).
        self._forward: dict[str, dict[str, VipEntry]] = {}
        #: (mesh, name) -> every entry claiming it, least key first; only names
        #: claimed by more than one entry (the zone gives each name one owner).
        self._contested: dict[tuple[str, str], list[VipEntry]] = {}
        #: Empty non-terminals: name -> mesh -> how many names of that mesh lie below.
        self._empty: dict[str, dict[str, int]] = {}
        #: VIP offset -> entry, for PTR (one key per service serves both families).
        self._by_offset: dict[int, VipEntry] = {}
        self._offset_contested: dict[int, list[VipEntry]] = {}
        #: The names (lower case, forward, as text) whose answers the last
        #: L{apply} may have changed; None after a full build (anything may have).
        self.changed: set[str] | None = None
        #: The VIP offsets whose PTR answers (both families) the last L{apply} may
        #: have changed: offsets, not reverse names, so that a change of many
        #: rows does not spell out two reverse names per row.
        self.changed_offsets: set[int] = set()
        self.update(ZoneSnapshot(version=0, entries=(), mesh_of_address={}))

    def update(self, snapshot: ZoneSnapshot) -> None:
        """Serve C{snapshot} from now on: a full build (the maps hold its entries)."""
        self._forward, self._contested, self._by_offset = {}, {}, {}
        self._offset_contested = {}
        self._empty = {self.nameserver.split(b".", 1)[1].decode("ascii"): {"*": 1}}
        add = self._add
        with bulk_load():  # a first build grows a few maps by a key per service
            for entry in snapshot.entries:
                add(entry, None)
        self.version = snapshot.version
        self.changed = None
        self.changed_offsets = set()

    def apply(self, change: ZoneChange) -> None:
        """Serve the table after C{change}: its C{removed} entries go, its C{added} come.

        Costs what changed, whatever the table's size; with C{full}, L{update}.
        L{changed} then holds the forward names whose answers may differ, and
        L{changed_offsets} the VIPs whose PTRs may.
        """
        if change.full:
            self.update(change.snapshot)
            return
        changed: set[str] = set()
        self.changed_offsets = set()
        # (A change lists each entry replaced among the removed, as it was: found
        # through its VIP or its names, with no map by key of every service.)
        added = {entry.key: entry for entry in change.added} if change.removed else {}
        replaced: set[ServiceKey] = set()
        for entry in change.removed:
            served = self._held(entry)
            if served is None or served.key in replaced:
                continue
            new = added.get(served.key)
            if new is not None and self._replace(served, new, changed):
                replaced.add(served.key)
            else:
                self._remove(served, changed)
        for entry in change.added:
            if entry.key in replaced:
                continue
            # Replaced without being listed as removed (a replica that dropped
            # changes its listeners were never told): the key's entry held with
            # this one's VIP or one of its names goes first.
            held = self._held(entry)
            if held is not None:
                self._remove(held, changed)
            self._add(entry, changed)
        self.version = change.snapshot.version
        self.changed = changed

    def _replace(self, old: VipEntry, new: VipEntry, changed: set[str]) -> bool:
        """C{new} in the place of C{old}, if they have the same names and VIP (a
        provisional VIP the global confirmed, zones that moved): no map's key
        changes, so none of them grows (dicts do not reuse a deleted key's entry).
        Whether it could."""
        offset = self._offset(old)
        if old.names != new.names or offset != self._offset(new):
            return False
        mesh = old.key.mesh
        in_mesh = self._forward[mesh]
        for name in old.names:
            claims = self._contested.get((mesh, name))
            if claims is not None:
                claims[claims.index(old)] = new  # (same key: the order holds)
            if in_mesh.get(name) is old:
                in_mesh[name] = new
        if offset >= 0:
            offset_claims = self._offset_contested.get(offset)
            if offset_claims is not None:
                offset_claims[offset_claims.index(old)] = new
            if self._by_offset.get(offset) is old:
                self._by_offset[offset] = new
            self.changed_offsets.add(offset)
        changed.update(new.names)
        return True

    def _held(self, entry: VipEntry) -> VipEntry | None:
        """The entry served for C{entry}'s key, if it has C{entry}'s VIP or one of
        its names (as a removed entry has: as it was served), else None."""
        key = entry.key
        offset = self._offset(entry)
        if offset >= 0:
            holder = self._by_offset.get(offset)
            if holder is not None and holder.key == key:
                return holder
            for claim in self._offset_contested.get(offset, ()):
                if claim.key == key:
                    return claim
        in_mesh = self._forward.get(key.mesh)
        if in_mesh is not None:
            for name in entry.names:
                holder = in_mesh.get(name)
                if holder is not None and holder.key == key:
                    return holder
                for claim in self._contested.get((key.mesh, name), ()):
                    if claim.key == key:
                        return claim
        return None

    def _offset(self, entry: VipEntry) -> int:
        """C{entry}'s VIP offset in the served range, or -1 if it is not of it."""
        offset = entry.offset_in(self._range)
        return -1 if offset is None else offset

    def _ptr(self, entry: VipEntry) -> str | None:
        """The name C{entry}'s PTR gives: the last of its names it owns (the
        DNS-compliant form, unless another service holds it), or None."""
        in_mesh = self._forward.get(entry.key.mesh)
        if in_mesh is not None:
            for name in reversed(entry.names):
                if in_mesh.get(name) is entry:
                    return name
        return None

    def ptr_offset(self, name: bytes) -> int | None:
        """The VIP offset whose PTR answers C{name} (a full reverse name, lower
        case, dotted) gives, or None: where L{changed_offsets} lists it."""
        address = _reverse_address(name)
        if address is None:
            return None
        if name.endswith(b".in-addr.arpa"):
            return self._range.offset_of(ipaddress.IPv4Address(address))
        return self._range.offset_of(ipaddress.IPv6Address(address))

    def _parents(self, name: str) -> Iterable[str]:
        """The names between C{name} and the apex: the non-terminals it makes."""
        parent = name
        while "." in parent:
            parent = parent.split(".", 1)[1]
            if parent == self._apex_text or not parent.endswith(self._suffix_text):
                break
            yield parent

    def _add(self, entry: VipEntry, changed: set[str] | None) -> None:
        """Serve C{entry}; its names (and those of entries it displaces) into C{changed}."""
        key = entry.key
        mesh = key.mesh
        in_mesh = self._forward.get(mesh)
        if in_mesh is None:
            in_mesh = self._forward[mesh] = {}
        names, offset = entry.names, self._offset(entry)
        if offset >= 0 and offset not in self._by_offset:
            below_apex = -len(self._suffix_text)
            for name in names:
                if name in in_mesh or name.find(".", 0, below_apex) >= 0:
                    break
            else:
                # The usual new service (a first build, a fresh zone's table): its
                # names are no one's, each one label under the apex (no empty
                # non-terminal to count), its VIP no one else's.  What the rest of
                # this method does, in short.
                for name in names:
                    in_mesh[name] = entry
                self._by_offset[offset] = entry
                if changed is not None:
                    changed.update(names)
                    self.changed_offsets.add(offset)
                return
        for name in names:
            owner = in_mesh.get(name)
            if owner is None:
                in_mesh[name] = entry
            elif owner is not entry:
                claims = self._contested.get((mesh, name))
                if claims is None:
                    claims = self._contested[mesh, name] = [owner]
                claims.append(entry)
                claims.sort(key=_key_of)
                if claims[0] is entry:
                    in_mesh[name] = entry
                    self._ptr_moved(owner, changed)
            suffix = self._suffix_text
            if "." not in name[: -len(suffix)] or not name.endswith(suffix):
                continue  # one label under the apex (the usual case): no parent to count
            for parent in self._parents(name):
                counts = self._empty.get(parent)
                if counts is None:
                    counts = self._empty[parent] = {}
                counts[mesh] = counts.get(mesh, 0) + 1
        if offset >= 0:
            holder = self._by_offset.get(offset)
            if holder is None:
                self._by_offset[offset] = entry
            else:
                offset_claims = self._offset_contested.get(offset)
                if offset_claims is None:
                    offset_claims = self._offset_contested[offset] = [holder]
                offset_claims.append(entry)
                offset_claims.sort(key=_key_of)
                self._by_offset[offset] = offset_claims[0]
        if changed is not None:
            changed.update(names)
            if offset >= 0:
                self.changed_offsets.add(offset)

    def _remove(self, entry: VipEntry, changed: set[str]) -> None:
        """Stop serving C{entry}; its names (and those of entries taking over) into C{changed}."""
        key = entry.key
        mesh = key.mesh
        in_mesh = self._forward[mesh]  # (kept when empty: there are a few meshes)
        for name in entry.names:
            claims = self._contested.get((mesh, name))
            if claims is None:
                if in_mesh.get(name) is entry:
                    del in_mesh[name]
            else:
                claims.remove(entry)
                if in_mesh[name] is entry:
                    in_mesh[name] = claims[0]
                    self._ptr_moved(claims[0], changed)
                if len(claims) == 1:
                    del self._contested[mesh, name]
            for parent in self._parents(name):
                counts = self._empty[parent]
                counts[mesh] -= 1
                if not counts[mesh]:
                    del counts[mesh]
                    if not counts:
                        del self._empty[parent]
        offset = self._offset(entry)
        if offset >= 0:
            offset_claims = self._offset_contested.get(offset)
            if offset_claims is None:
                if self._by_offset.get(offset) is entry:
                    del self._by_offset[offset]
            else:
                offset_claims.remove(entry)
                self._by_offset[offset] = offset_claims[0]
                if len(offset_claims) == 1:
                    del self._offset_contested[offset]
            self.changed_offsets.add(offset)
        changed.update(entry.names)

    def _ptr_moved(self, entry: VipEntry, changed: set[str] | None) -> None:
        """C{entry} won or lost a name: its PTR (L{_ptr}, worked out when asked) may
        have moved; with C{changed} (an L{apply}), its offset counts in
        L{changed_offsets}."""
        if changed is not None:
            offset = self._offset(entry)
            if offset >= 0:
                self.changed_offsets.add(offset)

    # -- records ----------------------------------------------------------------

    def _soa(self, owner: bytes) -> dns.RRHeader:
        """The SOA record, owned by C{owner}, its serial the table's version."""
        record = dns.Record_SOA(
            mname=self.nameserver,
            rname=self.hostmaster,
            serial=self.version & 0xFFFFFFFF,
            refresh=3600,
            retry=600,
            expire=86400,
            minimum=self.ttl,
            ttl=self.ttl,
        )
        return dns.RRHeader(owner, dns.SOA, dns.IN, self.ttl, record, auth=True)

    def _rr(
        self, owner: bytes, record: dns.IEncodableRecord, kind: int, ttl: int | None = None
    ) -> dns.RRHeader:
        """C{record} as an authoritative answer owned by C{owner}."""
        ttl = self.ttl if ttl is None else ttl
        return dns.RRHeader(owner, kind, dns.IN, ttl, record, auth=True)

    def _ttl_of(self, entry: VipEntry) -> int:
        """A provisional VIP is served briefly: the global may yet give another."""
        return min(self.ttl, PROVISIONAL_TTL) if entry.provisional else self.ttl

    def _apex_answer(self, asked: bytes, apex: bytes, qtype: int) -> Result:
        """SOA and NS at C{apex}, the NS name's addresses as additional records; else NODATA."""
        answers = []
        additional: list[dns.RRHeader] = []
        if qtype in (dns.SOA, dns.ALL_RECORDS):
            answers.append(self._soa(asked))
        if qtype in (dns.NS, dns.ALL_RECORDS):
            answers.append(self._rr(asked, dns.Record_NS(self.nameserver, self.ttl), dns.NS))
            additional = self._nameserver_records(self.nameserver, dns.ALL_RECORDS)
        if not answers:
            return [], [self._soa(apex)], []
        return answers, [], additional

    # -- lookups ----------------------------------------------------------------

    def resolve(self, asked: bytes, qtype: int, qclass: int, mesh: str = DEFAULT_MESH) -> Result:
        """Answer C{asked} for a client in C{mesh}; raises L{NameNotFound} or L{NotOurs}."""
        if qclass not in _SERVED_CLASSES or qtype in _TRANSFERS:
            raise NotOurs(asked)
        name = asked.lower().rstrip(b".")
        if name == self.apex or name.endswith(self._suffix):
            return self._forward_answer(asked, name, qtype, mesh)
        for apex in self.reverse_apexes:
            if name == apex or name.endswith(b"." + apex):
                return self._reverse_answer(asked, name, apex, qtype, mesh)
        raise NotOurs(asked)

    def negative(self, name: bytes, qtype: int, qclass: int, mesh: str) -> Negative | None:
        """Whether the answer to C{name} (lower case, no trailing dot) is negative, and how.

        The same decisions as L{resolve} (both follow L{_forward_kind} and
        L{_reverse_kind}), without making records: NODATA (NOERROR) or NXDOMAIN
        with the apex whose SOA they carry, REFUSED with None; None when the
        answer has records.  For the hot path's negative answers.
        """
        if qclass not in _SERVED_CLASSES or qtype in _TRANSFERS:
            return dns.EREFUSED, None
        if name == self.apex or name.endswith(self._suffix):
            kind, _served = self._forward_kind(name, mesh)
            if kind == _APEX:
                return None if qtype in _APEX_TYPES else (dns.OK, self.apex)
            if kind == _NAMESERVER:
                return None if qtype in self._nameserver_types else (dns.OK, self.apex)
            if kind == _SERVED:
                return None if qtype in _ADDRESS_TYPES else (dns.OK, self.apex)
            return (dns.OK if kind == _EMPTY else dns.ENAME), self.apex
        for apex in self.reverse_apexes:
            if name == apex or name.endswith(b"." + apex):
                kind, _served = self._reverse_kind(name, apex, qtype, mesh)
                if kind == _APEX:
                    return None if qtype in _APEX_TYPES else (dns.OK, apex)
                if kind == _SERVED:
                    return None if qtype in _PTR_TYPES else (dns.OK, apex)
                return (dns.OK if kind == _EMPTY else dns.ENAME), apex
        return dns.EREFUSED, None

    def forward_maps(self) -> tuple[dict[str, dict[str, VipEntry]], dict[str, dict[str, int]]]:
        """The maps L{_forward_kind} reads: mesh -> name -> served, and the empty non-terminals.

        For the C loop's NXDOMAIN answers (L{HotCache.negative_context}): a name
        in the domain in neither is no one's.  Replaced on a full build.
        """
        return self._forward, self._empty

    def _forward_kind(self, name: bytes, mesh: str) -> tuple[int, VipEntry | None]:
        """What C{name} in the domain is for C{mesh}: apex, nameserver, a service's, empty, none."""
        if name == self.apex:
            return _APEX, None
        if name == self.nameserver:
            return _NAMESERVER, None
        # The maps hold text; a name of other octets than ASCII is no one's.
        text = name.decode("latin-1")
        in_mesh = self._forward.get(mesh)
        served = in_mesh.get(text) if in_mesh is not None else None
        if served is not None:
            return _SERVED, served
        meshes = self._empty.get(text)
        if meshes is not None and (mesh in meshes or "*" in meshes):
            return _EMPTY, None
        return _NONE, None

    def _forward_answer(self, asked: bytes, name: bytes, qtype: int, mesh: str) -> Result:
        """A name in the domain: the apex, the nameserver, a service of C{mesh}, or none."""
        kind, served = self._forward_kind(name, mesh)
        if kind == _APEX:
            return self._apex_answer(asked, self.apex, qtype)
        if kind == _NAMESERVER:
            return self._nameserver_answer(asked, qtype)
        if served is not None:
            answers = []
            ttl = self._ttl_of(served)
            if qtype in (dns.A, dns.ALL_RECORDS):
                answers.append(self._rr(asked, dns.Record_A(served.vip, ttl), dns.A, ttl))
            if qtype in (dns.AAAA, dns.ALL_RECORDS):
                record = dns.Record_AAAA(served.vip6, ttl)
                answers.append(self._rr(asked, record, dns.AAAA, ttl))
            if answers:
                return answers, [], []
            return [], [self._soa(self.apex)], []
        if kind == _EMPTY:
            return [], [self._soa(self.apex)], []
        raise NameNotFound(asked, [self._soa(self.apex)])

    def _nameserver_answer(self, asked: bytes, qtype: int) -> Result:
        """The nameserver's own addresses."""
        answers = self._nameserver_records(asked, qtype)
        if not answers:
            return [], [self._soa(self.apex)], []
        return answers, [], []

    def _nameserver_records(self, owner: bytes, qtype: int) -> list[dns.RRHeader]:
        """The A and AAAA records of the nameserver's addresses of C{qtype}, owned by C{owner}."""
        answers = []
        for address in self._nameserver_addresses:
            if address.version == 4 and qtype in (dns.A, dns.ALL_RECORDS):
                answers.append(self._rr(owner, dns.Record_A(str(address), self.ttl), dns.A))
            elif address.version == 6 and qtype in (dns.AAAA, dns.ALL_RECORDS):
                record = dns.Record_AAAA(str(address), self.ttl)
                answers.append(self._rr(owner, record, dns.AAAA))
        return answers

    def _reverse_kind(
        self, name: bytes, apex: bytes, qtype: int, mesh: str
    ) -> tuple[int, VipEntry | None]:
        """What C{name} under the reverse domain C{apex} is for C{mesh}.

        The apex (for SOA and NS, or when no VIP of C{mesh} is named so); a VIP of
        C{mesh}; an interior name of the reverse tree (empty); or none.
        """
        address = _reverse_address(name)
        served = None
        if address is not None:
            family = (
                ipaddress.IPv4Address if name.endswith(b"in-addr.arpa") else ipaddress.IPv6Address
            )
            offset = self._range.offset_of(family(address))
            served = self._by_offset.get(offset) if offset is not None else None
        if served is not None and (served.key.mesh != mesh or self._ptr(served) is None):
            served = None
        if name == apex and (served is None or qtype in (dns.SOA, dns.NS)):
            return _APEX, None
        if served is not None:
            # (With a /30 or /31, a reverse domain's apex is itself a VIP's name.)
            return _SERVED, served
        suffix = b"in-addr.arpa" if apex.endswith(b"in-addr.arpa") else b"ip6.arpa"
        labels = name[: -len(suffix) - 1].split(b".") if name != suffix else []
        if len(labels) < _FULL_REVERSE_LABELS[suffix] - 2 and all(
            _address_label(label, suffix) for label in labels
        ):
            # An interior name of the reverse tree: it may have names below it.
            return _EMPTY, None
        return _NONE, None

    def _reverse_answer(
        self, asked: bytes, name: bytes, apex: bytes, qtype: int, mesh: str
    ) -> Result:
        """A name under the reverse domain C{apex}: a VIP of C{mesh}, an interior name, or none."""
        kind, served = self._reverse_kind(name, apex, qtype, mesh)
        if kind == _APEX:
            return self._apex_answer(asked, apex, qtype)
        if served is not None:
            ptr = self._ptr(served)
            assert ptr is not None
            if qtype not in _PTR_TYPES:
                return [], [self._soa(apex)], []
            ttl = self._ttl_of(served)
            record = dns.Record_PTR(ptr.encode("ascii"), ttl)
            return [self._rr(asked, record, dns.PTR, ttl)], [], []
        if kind == _EMPTY:
            return [], [self._soa(apex)], []
        raise NameNotFound(asked, [self._soa(apex)])

    # -- IResolver ----------------------------------------------------------------

    def query(
        self, query: dns.Query, timeout: Sequence[int] | None = None, mesh: str = DEFAULT_MESH
    ) -> defer.Deferred[Result]:
        """Answer one question for a client in C{mesh}."""
        try:
            return defer.succeed(self.resolve(query.name.name, query.type, query.cls, mesh))
        except (DomainError, AuthoritativeDomainError):
            return defer.fail()

    def _lookup(
        self, name: bytes, cls: int, type: int, timeout: Sequence[int] | None
    ) -> defer.Deferred[Result]:
        """L{ResolverBase}'s lookups, for a client in the default mesh."""
        try:
            return defer.succeed(self.resolve(name, type, cls))
        except (DomainError, AuthoritativeDomainError):
            return defer.fail()
