"""The DNS authority: a twisted.names L{IResolver} over a Kuma zone's VIP table.

Authoritative for the configured domain and for the reverse domains of both CIDRs.
Keys are lower-cased bytes; answers repeat the name as it was asked.  A name that
is not ours raises L{dns.DomainError} (REFUSED); a name that is ours and does not
exist raises L{NameNotFound}, which carries the SOA for the authority section.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Network, IPv6Network

from twisted.internet import defer
from twisted.names import dns
from twisted.names.common import ResolverBase
from twisted.names.error import AuthoritativeDomainError, DomainError

from kumazone.core.config import DnsServerConfig
from kumazone.core.names import nameserver_name
from kumazone.core.vips import VipRange
from kumazone.core.zone import DEFAULT_MESH, VipEntry, ZoneSnapshot

__all__ = ["MeshAuthority", "NameNotFound", "NotOurs", "Result", "reverse_domains"]

#: An answer as twisted.names' resolvers give one: answer, authority and additional records.
Result = tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]

_SERVED_CLASSES = (dns.IN, dns.ANY)
#: TTL of a provisional VIP's records, until the global confirms it.
PROVISIONAL_TTL = 5
#: AXFR and IXFR: the table is not handed out whole.
_TRANSFERS = (dns.AXFR, dns.IXFR)
#: A full reverse name: 4 octet labels + in-addr.arpa, 32 nibbles + ip6.arpa.
_FULL_REVERSE_LABELS = {b"in-addr.arpa": 6, b"ip6.arpa": 34}


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


@dataclass(frozen=True, slots=True)
class _Served:
    """A table entry as the authority serves it.

    Records are made per query on the authority path (the hot path keeps the
    encoded answers), so that a 100,000-service table holds no record objects.
    """

    entry: VipEntry
    offset: int
    names: tuple[bytes, ...]
    #: The name the PTR gives: the DNS-compliant form, if this service owns it.
    ptr: bytes | None


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


def _reverse_index(
    entries: Iterable[_Served], forward: dict[str, dict[bytes, _Served]]
) -> dict[int, _Served]:
    """VIP offsets to their entries, each PTR naming a name that resolves back to it."""
    by_offset: dict[int, _Served] = {}
    for served in entries:
        in_mesh = forward[served.entry.key.mesh]
        owned = [name for name in served.names if in_mesh[name] is served]
        if served.ptr is not None and (not owned or owned[-1] != served.ptr):
            served = replace(served, ptr=owned[-1] if owned else None)
        by_offset[served.offset] = served
    return by_offset


class MeshAuthority(ResolverBase):
    """Answers for the domain and the VIPs' reverse domains from a L{ZoneSnapshot}."""

    def __init__(self, config: DnsServerConfig, nameserver_addresses: Sequence[str] = ()) -> None:
        super().__init__()
        self.config = config
        self.ttl = config.ttl
        self.apex = config.domain.encode("ascii")
        self._suffix = b"." + self.apex
        self.nameserver = nameserver_name(config.domain).encode("ascii")
        self.hostmaster = b"hostmaster." + self.apex
        self._nameserver_addresses = [ipaddress.ip_address(a) for a in nameserver_addresses]
        self.reverse_apexes = [
            domain.encode("ascii")
            for network in (config.cidr, config.cidr6)
            for domain in reverse_domains(network)
        ]
        self.version = 0
        self._range = VipRange(config.cidr, config.cidr6)
        #: mesh -> name -> entry (a few meshes, so no dict per name).
        self._forward: dict[str, dict[bytes, _Served]] = {}
        self._empty: dict[bytes, set[str]] = {}
        #: VIP offset -> entry, for PTR (one key per service serves both families).
        self._by_offset: dict[int, _Served] = {}
        self._built: dict[VipEntry, _Served] = {}
        self.update(ZoneSnapshot(version=0, entries=(), mesh_of_address={}))

    def update(self, snapshot: ZoneSnapshot) -> None:
        """Serve C{snapshot} from now on.

        Only entries that changed since the last snapshot are built again: an
        update of a 100,000-service table that changes one service costs
        dictionary work.
        """
        built = {entry: self._built.get(entry) or self._serve(entry) for entry in snapshot.entries}
        forward, empty = self._forward_index(built.values())
        by_offset = _reverse_index(built.values(), forward)
        self._built = built
        self._forward, self._empty, self._by_offset = forward, empty, by_offset
        self.version = snapshot.version

    def _serve(self, entry: VipEntry) -> _Served:
        """C{entry} as the authority serves it."""
        names = tuple(text.encode("ascii") for text in entry.names)
        offset = self._range.offset_of(ipaddress.IPv4Address(entry.vip))
        return _Served(entry, -1 if offset is None else offset, names, names[-1] if names else None)

    def _forward_index(
        self, entries: Iterable[_Served]
    ) -> tuple[dict[str, dict[bytes, _Served]], dict[bytes, set[str]]]:
        """Each mesh's names to their entries; and the empty non-terminals, to their meshes."""
        forward: dict[str, dict[bytes, _Served]] = {}
        empty: dict[bytes, set[str]] = {self.nameserver.split(b".", 1)[1]: {"*"}}
        for served in entries:
            mesh = served.entry.key.mesh
            in_mesh = forward.get(mesh)
            if in_mesh is None:
                in_mesh = forward[mesh] = {}
            for name in served.names:
                # The first service to claim a name in a mesh keeps it (entries
                # come sorted; the zone gives each name one owner anyway).
                in_mesh.setdefault(name, served)
                parent = name
                while True:
                    parent = parent.split(b".", 1)[1]
                    if parent == self.apex or not parent.endswith(self._suffix):
                        break
                    empty.setdefault(parent, set()).add(mesh)
        return forward, empty

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

    def _forward_answer(self, asked: bytes, name: bytes, qtype: int, mesh: str) -> Result:
        """A name in the domain: the apex, the nameserver, a service of C{mesh}, or none."""
        if name == self.apex:
            return self._apex_answer(asked, self.apex, qtype)
        if name == self.nameserver:
            return self._nameserver_answer(asked, qtype)
        served = self._forward.get(mesh, {}).get(name)
        if served is not None:
            answers = []
            ttl = self._ttl_of(served.entry)
            if qtype in (dns.A, dns.ALL_RECORDS):
                answers.append(self._rr(asked, dns.Record_A(served.entry.vip, ttl), dns.A, ttl))
            if qtype in (dns.AAAA, dns.ALL_RECORDS):
                record = dns.Record_AAAA(served.entry.vip6, ttl)
                answers.append(self._rr(asked, record, dns.AAAA, ttl))
            if answers:
                return answers, [], []
            return [], [self._soa(self.apex)], []
        meshes = self._empty.get(name)
        if meshes is not None and (mesh in meshes or "*" in meshes):
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

    def _reverse_answer(
        self, asked: bytes, name: bytes, apex: bytes, qtype: int, mesh: str
    ) -> Result:
        """A name under the reverse domain C{apex}: a VIP of C{mesh}, an interior name, or none."""
        address = _reverse_address(name)
        served = None
        if address is not None:
            family = (
                ipaddress.IPv4Address if name.endswith(b"in-addr.arpa") else ipaddress.IPv6Address
            )
            offset = self._range.offset_of(family(address))
            served = self._by_offset.get(offset) if offset is not None else None
        if served is not None and (served.entry.key.mesh != mesh or served.ptr is None):
            served = None
        if name == apex and (served is None or qtype in (dns.SOA, dns.NS)):
            return self._apex_answer(asked, apex, qtype)
        if served is not None:
            # (With a /30 or /31, a reverse domain's apex is itself a VIP's name.)
            assert served.ptr is not None
            if qtype not in (dns.PTR, dns.ALL_RECORDS):
                return [], [self._soa(apex)], []
            ttl = self._ttl_of(served.entry)
            return [self._rr(asked, dns.Record_PTR(served.ptr, ttl), dns.PTR, ttl)], [], []
        suffix = b"in-addr.arpa" if apex.endswith(b"in-addr.arpa") else b"ip6.arpa"
        labels = name[: -len(suffix) - 1].split(b".") if name != suffix else []
        if len(labels) < _FULL_REVERSE_LABELS[suffix] - 2 and all(
            _address_label(label, suffix) for label in labels
        ):
            # An interior name of the reverse tree: it may have names below it.
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
