"""The zone's side of dataplane sync: each mesh's names pushed to its dataplanes.

L{DataplaneHub} follows the zone's table (it is one of the zone's listeners) and
sends each mesh's rows as dataplanes get them (L{DpRow}: a service, its VIP's
offset, its name forms), made from the zone's entries when they are sent: it
keeps no row of its own per service.  A dataplane connects to the dataplane port, says
L{DpHello} and gets L{DpWelcome} and its mesh's table: whole, or only what
changed since the version it holds (L{DataplaneSession}).  From then on each
change of the table reaches it as one L{DpTable}: the rows of its mesh that
changed, or none (another mesh changed: only the version, the SOA serial, moved).

What a change costs on the reactor is what changed plus the sessions: each
mesh's message is encoded once and the same octets written to every session of
that mesh, L{DataplaneLimits.fanout_batch} sessions per reactor turn, in order
for each session.  A reconnecting dataplane is sent the current row (or the
removal) of each service of its mesh that changed since its version, from a
bounded log of what changed per mesh; beyond that log (or with another table),
its mesh's table whole.
"""

from __future__ import annotations

import bisect
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from OpenSSL import SSL
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from kumazone.core.config import DnsServerConfig
from kumazone.core.messages import (
    DpAck,
    DpHello,
    DpRow,
    DpTable,
    DpWelcome,
    Error,
    Ping,
    dp_table_messages,
    encode,
)
from kumazone.core.names import name_forms
from kumazone.core.ratelimit import RateLimiter, TokenBucket, limited
from kumazone.core.sortedindex import SortedIndex
from kumazone.core.vips import ServiceKey, VipRange
from kumazone.core.zone import VipEntry, Zone, ZoneChange, ZoneSnapshot
from kumazone.sync.certs import dataplane_identity_problem
from kumazone.sync.metrics import SyncMetrics
from kumazone.sync.protocol import (
    DATAPLANE_HEARTBEAT,
    DATAPLANE_SILENCE,
    SyncFactory,
    SyncProtocol,
)
from kumazone.sync.tls import certificate_names, dataplane_identity

__all__ = [
    "LABEL",
    "DataplaneHub",
    "DataplaneLimits",
    "DataplaneMetrics",
    "DataplaneSession",
]

#: The C{zone} label of the sync octet and message counters for every dataplane
#: connection (one label, never one per dataplane).
LABEL = "dataplane"
#: Resumed tables kept per state of the table (a reconnect storm: one per version held).
_RESUMES_KEPT = 64


@dataclass(frozen=True)
class DataplaneLimits:
    """What the dataplane port allows.

    @ivar max_sessions: dataplanes connected at once; one more is refused.
    @ivar max_pending_octets: octets queued for a dataplane that does not read;
        past them, or paused longer than the silence timeout, it is dropped.
    @ivar fanout_batch: sessions written to per reactor turn when a change goes out.
    @ivar log_touches: services the change log keeps per mesh (a service changed
        twice counts twice); a dataplane behind the log gets its table whole.
    @ivar max_messages_per_second: pings and errors one dataplane may send (twice
        as many at once); acks answer the zone's tables and are not metered.
    """

    max_sessions: int = 50_000
    max_pending_octets: int = 4 << 20
    fanout_batch: int = 500
    log_touches: int = 4096
    max_messages_per_second: float = 10.0

    def __post_init__(self) -> None:
        for name in (
            "max_sessions",
            "max_pending_octets",
            "fanout_batch",
            "log_touches",
            "max_messages_per_second",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, is {getattr(self, name)!r}")


class DataplaneMetrics:
    """The dataplane port's own metrics (octets and messages are the sync counters')."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.connected = Gauge(
            "kumazone_dataplanes_connected",
            "Dataplanes connected to this zone, by mesh",
            ["mesh"],
            registry=r,
        )
        self.refused = Counter(
            "kumazone_dataplane_refused",
            "Dataplane connections refused or dropped, by reason",
            ["reason"],
            registry=r,
        )
        self.tables = Counter(
            "kumazone_dataplane_tables",
            "Tables sent to dataplanes as they said hello: whole (full), the changes "
            "since the version held (changes), or nothing new (current)",
            ["how"],
            registry=r,
        )
        self.fanout_seconds = Histogram(
            "kumazone_dataplane_fanout_seconds",
            "Seconds from a change of the table until every dataplane was written it",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )


class _Counters:
    """What L{SyncProtocol} counts for dataplane connections: octets and messages in
    the sync counters (zone label L{LABEL}), refusals in the dataplane counter."""

    def __init__(self, sync: SyncMetrics, refused: Counter) -> None:
        self.octets = sync.octets
        self.messages = sync.messages
        self.refused = refused


class _Encoded(NamedTuple):
    """Frames encoded once, written to many sessions."""

    octets: bytes
    messages: int


def _encoded(tables: Sequence[DpTable]) -> _Encoded:
    return _Encoded(b"".join(encode(table) for table in tables), len(tables))


class _MeshLog:
    """What changed in one mesh: the services each change touched, by the version it
    started from; at most C{bound} touches, the oldest dropped first."""

    def __init__(self) -> None:
        #: The version each change started from (non-decreasing), and its services.
        self.versions: list[int] = []
        self.services: list[tuple[str, ...]] = []
        self.touches = 0
        #: A version below this may miss a change that was dropped.
        self.floor = 0

    def add(self, before: int, services: tuple[str, ...], bound: int) -> None:
        self.versions.append(before)
        self.services.append(services)
        self.touches += len(services)
        if self.touches <= bound:
            return
        drop = 0
        while self.touches > bound:
            self.touches -= len(self.services[drop])
            drop += 1
        self.floor = self.versions[drop - 1] + 1
        del self.versions[:drop]
        del self.services[:drop]

    def since(self, have: int) -> set[str]:
        """The services touched by every change from a version C{have} or later.

        A dataplane holding version C{have} has every change that led to it, and
        may have some that started from it (the global's version does not move
        with a provisional VIP): those are sent again, which changes nothing.
        """
        start = bisect.bisect_left(self.versions, have)
        touched: set[str] = set()
        for services in self.services[start:]:
            touched.update(services)
        return touched


class _FanOut:
    """One change on its way to the sessions that were connected when it came."""

    def __init__(
        self,
        version: int,
        sessions: list[DataplaneSession],
        by_mesh: dict[str, _Encoded],
        default: _Encoded | None,
        since: float,
    ) -> None:
        self.version = version
        self.sessions = sessions
        self.by_mesh = by_mesh
        self.default = default
        self.since = since
        self.position = 0


class _Refusal(NamedTuple):
    """Why a hello is refused: a metric reason, a log line, the text the dataplane gets."""

    reason: str
    line: str
    why: str


def _same_row(old: VipEntry, new: VipEntry, vip_range: VipRange) -> bool:
    """Whether the two entries make the same row (L{DataplaneHub._row}), without making it."""
    return (
        old.names == new.names
        and old.provisional == new.provisional
        and old.offset_in(vip_range) == new.offset_in(vip_range)
    )


def _index_of(snapshot: ZoneSnapshot) -> SortedIndex[ServiceKey, VipEntry]:
    """The zone's index of entries in C{snapshot} (a zone's snapshot holds one)."""
    entries = snapshot.entries
    if isinstance(entries, SortedIndex):
        return entries
    return SortedIndex((entry.key, entry) for entry in entries)


class DataplaneHub:
    """The zone's dataplane sync: its table as each mesh's dataplanes get it, and
    the sessions."""

    log = Logger()

    def __init__(
        self,
        zone: Zone,
        clock: IReactorTime,
        metrics: DataplaneMetrics,
        sync_metrics: SyncMetrics,
        dns: DnsServerConfig,
        nameservers: Sequence[str],
        require_certificates: bool = True,
        limits: DataplaneLimits | None = None,
        heartbeat: float = DATAPLANE_HEARTBEAT,
        silence: float = DATAPLANE_SILENCE,
    ) -> None:
        """
        @param dns: the zone's dnsServer config (what the welcome says).
        @param nameservers: the addresses of the apex NS name, as the zone's
            authority serves them.
        @param require_certificates: every dataplane must show its certificate
            (the port is TLS); else, without TLS, a hello names the dataplane.
        """
        self.zone = zone
        self.clock = clock
        self.metrics = metrics
        self.sync_metrics = sync_metrics
        self.dns = dns
        self.nameservers = tuple(nameservers)
        self.require_certificates = require_certificates
        self.limits = limits or DataplaneLimits()
        self.heartbeat = heartbeat
        self.silence = silence
        self.counters = _Counters(sync_metrics, metrics.refused)
        #: The accepted sessions by (mesh, name), and the same sorted (the API's listing).
        self.sessions: dict[tuple[str, str], DataplaneSession] = {}
        self.listing: SortedIndex[tuple[str, str], DataplaneSession] = SortedIndex()
        self._per_mesh: dict[str, int] = {}
        #: The zone's entries: its live index, which the zone changes in place and
        #: then tells the hub of (L{apply}); read only on the reactor, at once.
        self._entries: SortedIndex[ServiceKey, VipEntry] = SortedIndex()
        self._logs: dict[str, _MeshLog] = {}
        self._queue: deque[_FanOut] = deque()
        self._call: IDelayedCall | None = None
        self._full: dict[str, _Encoded] = {}
        self._resumes: dict[tuple[str, int], tuple[_Encoded, str]] = {}
        self._octets_out = sync_metrics.octets.labels(LABEL, "out")
        self._tables_out = sync_metrics.messages.labels(LABEL, "out", DpTable.kind.capitalize())
        self._refusal_log = limited(
            RateLimiter(burst=20, interval=60.0), clock, lambda line: self.log.warn(line)
        )
        #: Every other line a dataplane can cause (its comings and goings, its errors).
        self.dataplane_log = limited(
            RateLimiter(burst=50, interval=60.0), clock, lambda line: self.log.info(line)
        )
        self.table_id = uuid.uuid4().hex
        #: The highest version sent under C{table_id}.
        self._highest = -1
        self.version = 0
        #: A dataplane holding a version below this gets its table whole.
        self._floor = 0
        self._rebuild(zone.snapshot)
        zone.listeners.append(self.apply)

    def factory(self) -> SyncFactory:
        """The factory of the dataplane port's connections."""
        return SyncFactory(
            self.session,
            self.clock,
            self.counters,
            self.heartbeat,
            self.silence,
            self.limits.max_pending_octets,
        )

    def session(self) -> DataplaneSession:
        """A session for a new dataplane connection."""
        return DataplaneSession(self)

    # -- the table ----------------------------------------------------------------

    def _row(self, entry: VipEntry, vip_range: VipRange) -> DpRow:
        offset = entry.offset_in(vip_range)
        assert offset is not None  # the zone's entries hold VIPs of its range
        service = entry.key.service
        return DpRow(
            service,
            offset,
            name_forms(service, self.dns.domain, entry.names),
            entry.provisional,
        )

    def _rebuild(self, snapshot: ZoneSnapshot) -> None:
        """Start from the snapshot, with a log that starts here: O(1)."""
        self._entries = _index_of(snapshot)
        self._logs = {}
        if snapshot.version <= self._highest:
            # A table whose versions were sent already under this id (a new table
            # from the global, a recovery): a version held says nothing of it.
            self.table_id = uuid.uuid4().hex
            self._highest = -1
        self.version = self._floor = snapshot.version

    def apply(self, change: ZoneChange) -> None:
        """Follow one change of the zone's table and send it to the dataplanes.

        O(change) and an encoding per mesh changed; the writes go out
        L{DataplaneLimits.fanout_batch} sessions per reactor turn.
        """
        self._full.clear()
        self._resumes.clear()
        snapshot = change.snapshot
        before, after = self.version, snapshot.version
        if change.full or after < before:
            self._rebuild(snapshot)
            self._fan_out(after, {mesh: self._full_table(mesh) for mesh in self._per_mesh}, None)
            return
        self._entries = _index_of(snapshot)
        vip_range = self.zone.table.range
        was = {gone.key: gone for gone in change.removed}
        touched: dict[ServiceKey, VipEntry | None] = dict.fromkeys(was)
        for came in change.added:
            touched[came.key] = came
        # Per mesh: the rows sent and the services removed; a mesh no dataplane of
        # which is connected is sent nothing (its log says which services changed).
        changed: dict[str, tuple[list[DpRow], list[str]]] = {}
        unsent: dict[str, list[str]] = {}
        per_mesh = self._per_mesh
        for key, entry in touched.items():
            mesh, service = key
            if entry is None:
                changed.setdefault(mesh, ([], []))[1].append(service)
                continue
            old = was.get(key)
            if old is not None and _same_row(old, entry, vip_range):
                continue  # what changed (the zones it is in) is nothing a dataplane serves
            if per_mesh.get(mesh):
                changed.setdefault(mesh, ([], []))[0].append(self._row(entry, vip_range))
            else:
                unsent.setdefault(mesh, []).append(service)
        if not changed and not unsent and after == before:
            return
        self.version = after
        by_mesh: dict[str, _Encoded] = {}
        bound = self.limits.log_touches
        for mesh in changed.keys() | unsent.keys():
            upsert, remove = changed.get(mesh, ([], []))
            log = self._logs.get(mesh)
            if log is None:
                log = self._logs[mesh] = _MeshLog()
            log.add(before, (*(r.service for r in upsert), *unsent.get(mesh, ()), *remove), bound)
            if per_mesh.get(mesh):
                by_mesh[mesh] = _encoded(dp_table_messages(after, before, False, upsert, remove))
        # Every other mesh: only the version (the SOA serial) moved.
        default = _encoded([DpTable(after, before, False)]) if after != before else None
        self._fan_out(after, by_mesh, default)

    def _full_table(self, mesh: str) -> _Encoded:
        """Mesh C{mesh}'s table whole, encoded once per state of the table."""
        found = self._full.get(mesh)
        if found is None:
            vip_range, row = self.zone.table.range, self._row
            rows = [row(entry, vip_range) for entry in self._mesh_entries(mesh)]
            found = self._full[mesh] = _encoded(dp_table_messages(self.version, 0, True, rows))
        return found

    def _mesh_entries(self, mesh: str) -> list[VipEntry]:
        """Mesh C{mesh}'s entries, in service order (one slice of the zone's index)."""
        return self._entries[slice(*self._mesh_bounds(mesh))]

    def _mesh_bounds(self, mesh: str) -> tuple[int, int]:
        """Where mesh C{mesh}'s entries start and end in the zone's index."""
        entries = self._entries
        # Mesh names hold no NUL: every later mesh sorts at or after mesh + NUL.
        return entries.position(ServiceKey(mesh, "")), entries.position(ServiceKey(mesh + "\0", ""))

    def table_for(self, mesh: str, have: int, table_id: str) -> tuple[_Encoded, str]:
        """What a dataplane of C{mesh} holding version C{have} of table C{table_id}
        is sent: (the frames, C{"full"}, C{"changes"} or C{"current"})."""
        log = self._logs.get(mesh)
        floor = max(self._floor, log.floor if log is not None else 0)
        if table_id != self.table_id or not floor <= have <= self.version:
            return self._full_table(mesh), "full"
        found = self._resumes.get((mesh, have))
        if found is not None:
            return found
        services = log.since(have) if log is not None else set()
        start, end = self._mesh_bounds(mesh)
        if len(services) > end - start:
            found = self._full_table(mesh), "full"  # the whole table is no larger
        else:
            vip_range = self.zone.table.range
            upsert, remove = [], []
            for service in sorted(services):
                entry = self._entries.get(ServiceKey(mesh, service))
                if entry is None:
                    remove.append(service)
                else:
                    upsert.append(self._row(entry, vip_range))
            found = (
                _encoded(dp_table_messages(self.version, have, False, upsert, remove)),
                "changes" if services or have != self.version else "current",
            )
        if len(self._resumes) >= _RESUMES_KEPT:
            self._resumes.clear()
        self._resumes[(mesh, have)] = found
        return found

    # -- fan-out ------------------------------------------------------------------

    def _fan_out(
        self, version: int, by_mesh: dict[str, _Encoded], default: _Encoded | None
    ) -> None:
        """Queue a change for every session connected now; the first batch goes at once."""
        if not self.sessions or not (by_mesh or default):
            return
        self._highest = max(self._highest, version)
        job = _FanOut(version, list(self.sessions.values()), by_mesh, default, self.clock.seconds())
        self._queue.append(job)
        if self._call is None:
            self._pump()

    def _pump(self) -> None:
        """Write queued changes to up to L{DataplaneLimits.fanout_batch} sessions."""
        self._call = None
        budget = self.limits.fanout_batch
        octets = messages = 0
        queue = self._queue
        while queue and budget > 0:
            job = queue[0]
            start = job.position
            end = min(len(job.sessions), start + budget)
            by_mesh, default, version = job.by_mesh, job.default, job.version
            for session in job.sessions[start:end]:
                encoded = by_mesh.get(session.mesh, default)
                if encoded is None:
                    continue
                sent = session.proto.send_encoded(
                    encoded.octets, DpTable.kind, encoded.messages, count=False
                )
                if sent:
                    session.sent(version)
                    octets += len(encoded.octets)
                    messages += encoded.messages
            budget -= end - start
            job.position = end
            if end >= len(job.sessions):
                queue.popleft()
                self.metrics.fanout_seconds.observe(self.clock.seconds() - job.since)
        if octets:
            self._octets_out.inc(octets)
            self._tables_out.inc(messages)
        if queue:
            self._call = self.clock.callLater(0, self._pump)

    @property
    def backlog(self) -> int:
        """Session writes still queued."""
        return sum(len(job.sessions) - job.position for job in self._queue)

    def stop(self) -> None:
        """Close every dataplane's connection (the zone stops)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._queue.clear()
        for session in list(self.sessions.values()):
            session.proto.close()

    # -- sessions -----------------------------------------------------------------

    def identify(self, session: DataplaneSession, hello: DpHello) -> tuple[str, str] | _Refusal:
        """Who the dataplane is: its certificate's identity (TLS), else its hello's."""
        proto = session.proto
        get = getattr(proto.transport, "getPeerCertificate", None)
        if get is None:
            if self.require_certificates:
                return _Refusal(
                    "no-certificate",
                    f"dataplane connection from {proto.peer()} refused: no TLS",
                    "a client certificate is required",
                )
            problem = dataplane_identity_problem(hello.mesh, hello.name)
            if problem is not None:
                return _Refusal(
                    "bad-name",
                    f"dataplane connection from {proto.peer()} refused: "
                    f"{hello.mesh[:80]!r}/{hello.name[:80]!r}: {problem}",
                    f"not a dataplane's mesh and name: {problem}",
                )
            return hello.mesh, hello.name
        peer = get()
        if peer is None:
            return _Refusal(
                "no-certificate",
                f"dataplane connection from {proto.peer()} refused: no client certificate",
                "a client certificate is required",
            )
        identity = dataplane_identity(peer)
        if identity is None:
            names = ", ".join(sorted(certificate_names(peer))) or "nothing"
            return _Refusal(
                "no-identity",
                f"dataplane connection from {proto.peer()} refused: its certificate "
                f"names no dataplane ({names[:200]})",
                "the certificate names no dataplane (a URI spiffe://MESH/NAME: "
                "kumazone certs --dataplane MESH/NAME)",
            )
        if (hello.mesh or hello.name) and (hello.mesh, hello.name) != identity:
            mesh, name = identity
            return _Refusal(
                "wrong-identity",
                f"dataplane {mesh}/{name} from {proto.peer()} refused: its hello claims "
                f"{hello.mesh[:80]!r}/{hello.name[:80]!r}",
                f"the certificate names dataplane {mesh}/{name}, "
                f"not {hello.mesh[:80]}/{hello.name[:80]}",
            )
        return identity

    def refuse(self, session: DataplaneSession, refusal: _Refusal) -> None:
        """Count a refusal, log it (bounded), tell the dataplane why and close."""
        session.refused = True
        self.metrics.refused.labels(refusal.reason).inc()
        self._refusal_log(refusal.line)
        session.proto.fail(refusal.why, log=False)

    def accept(self, session: DataplaneSession, hello: DpHello, identity: tuple[str, str]) -> None:
        """Make C{session} the dataplane's, welcome it and send its table."""
        previous = self.sessions.get(identity)
        if previous is None and len(self.sessions) >= self.limits.max_sessions:
            self.refuse(
                session,
                _Refusal(
                    "too-many",
                    f"dataplane {identity[0]}/{identity[1]} from {session.proto.peer()} "
                    f"refused: {len(self.sessions)} connected, the most this zone takes",
                    "this zone serves as many dataplanes as it may; try another or later",
                ),
            )
            return
        if previous is not None:
            previous.proto.fail("replaced by a new connection of the same dataplane", log=False)
            self._forget(previous)
        mesh, name = identity
        session.mesh, session.name, session.accepted = mesh, name, True
        self.sessions[identity] = session
        self.listing.set(identity, session)
        self._count(mesh, 1)
        encoded, how = self.table_for(mesh, hello.have, hello.table_id)
        dns = self.dns
        session.proto.send(
            DpWelcome(
                mesh,
                name,
                self.version,
                self.table_id,
                dns.domain,
                str(dns.cidr),
                str(dns.cidr6),
                dns.ttl,
                self.nameservers,
            )
        )
        if session.proto.send_encoded(encoded.octets, DpTable.kind, encoded.messages):
            session.sent(self.version)
            self._highest = max(self._highest, self.version)
        self.metrics.tables.labels(how).inc()
        self.dataplane_log(
            f"dataplane {mesh}/{name} connected from {session.proto.peer()} "
            f"(holds version {hello.have}; sent {how})"
        )

    def _count(self, mesh: str, delta: int) -> None:
        count = self._per_mesh.get(mesh, 0) + delta
        if count > 0:
            self._per_mesh[mesh] = count
            self.metrics.connected.labels(mesh).set(count)
            return
        self._per_mesh.pop(mesh, None)
        try:
            self.metrics.connected.remove(mesh)  # a mesh gone is no series left behind
        except KeyError:
            pass

    def _forget(self, session: DataplaneSession) -> bool:
        """Remove C{session} if it is its dataplane's; whether it was."""
        identity = (session.mesh, session.name)
        if self.sessions.get(identity) is not session:
            return False
        del self.sessions[identity]
        self.listing.pop(identity)
        self._count(session.mesh, -1)
        return True

    def lost(self, session: DataplaneSession, reason: Failure) -> None:
        """A connection is gone: count one that never said hello, forget an accepted one."""
        if not session.accepted:
            if session.refused:
                return  # counted and logged when refused
            why = "tls" if reason.check(SSL.Error) else "before-hello"
            self.metrics.refused.labels(why).inc()
            self._refusal_log(
                f"dataplane connection from {session.proto.peer()} closed before hello: "
                f"{reason.getErrorMessage()[:200]}"
            )
            return
        proto = session.proto
        if not proto.paused and self.clock.seconds() - proto.last_heard > self.silence:
            # The protocol dropped it as silent (it logged that, bounded): counted here.
            self.metrics.refused.labels("silent").inc()
        if self._forget(session):
            self.dataplane_log(
                f"dataplane {session.mesh}/{session.name} disconnected: "
                f"{reason.getErrorMessage()[:200]}"
            )


class DataplaneSession:
    """One dataplane's connection: one method per kind of message it takes."""

    #: Who sends a session its messages, as error texts say it.
    peer_role = "a dataplane"

    def __init__(self, hub: DataplaneHub) -> None:
        self.hub = hub
        self.mesh = ""
        self.name = ""
        self.accepted = False
        #: Set when the hello was refused (already logged and counted).
        self.refused = False
        #: The version last sent, the highest sent, and the last acknowledged (-1: none).
        self.sent_version = -1
        self.highest_sent = -1
        self.acked = -1
        self.connected_at = 0.0
        self.address = ""
        rate = hub.limits.max_messages_per_second
        self._rate = TokenBucket(rate, 2 * rate)
        self.proto: SyncProtocol

    @property
    def awaiting(self) -> str | None:
        """C{"dphello"} until the dataplane is accepted; then C{None}."""
        return None if self.accepted else DpHello.kind

    def connected(self, proto: SyncProtocol) -> None:
        """A dataplane connected; it has not said hello yet."""
        self.proto = proto
        proto.zone = LABEL
        self.connected_at = self.hub.clock.seconds()
        address: Any = proto.transport.getPeer() if proto.transport is not None else None
        self.address = str(getattr(address, "host", ""))

    def sent(self, version: int) -> None:
        """Version C{version} was written to the dataplane."""
        self.sent_version = version
        self.highest_sent = max(self.highest_sent, version)

    def dphello_received(self, proto: SyncProtocol, hello: DpHello) -> None:
        """Accept the dataplane (welcome it, send its table) or refuse it."""
        if self.accepted:
            proto.fail(f"unexpected {hello.kind} from {self.peer_role}")
            return
        identity = self.hub.identify(self, hello)
        if isinstance(identity, _Refusal):
            self.hub.refuse(self, identity)
            return
        self.hub.accept(self, hello, identity)

    def dpack_received(self, proto: SyncProtocol, ack: DpAck) -> None:
        """Note the version the dataplane holds (one it was sent)."""
        if ack.version > self.highest_sent:
            self.hub.refuse(
                self,
                _Refusal(
                    "bad-ack",
                    f"dataplane {self.mesh}/{self.name}: ack of version {ack.version}, "
                    f"sent {self.highest_sent}",
                    f"ack of version {ack.version}, which was never sent",
                ),
            )
            return
        self.acked = ack.version

    def _metered(self) -> bool:
        if self._rate.take(self.hub.clock.seconds()):
            return True
        limit = self.hub.limits.max_messages_per_second
        self.hub.refuse(
            self,
            _Refusal(
                "rate",
                f"dataplane {self.mesh}/{self.name}: more than {limit:g} messages per second",
                f"more than {limit:g} messages per second",
            ),
        )
        return False

    def ping_received(self, proto: SyncProtocol, ping: Ping) -> None:
        """The dataplane is still there."""
        self._metered()

    def error_received(self, proto: SyncProtocol, error: Error) -> None:
        """Log what the dataplane reports (bounded, and cut to a line's length)."""
        if self._metered():
            self.hub.dataplane_log(
                f"dataplane {self.mesh}/{self.name} reports: {error.message[:300]!r}"
            )

    def disconnected(self, proto: SyncProtocol, reason: Failure) -> None:
        """The connection is gone."""
        self.hub.lost(self, reason)
