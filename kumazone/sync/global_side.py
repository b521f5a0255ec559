"""The global's side of zone sync: one merged table (L{GlobalHub}), a session per zone."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from kumazone.core.federation import MergedTable
from kumazone.core.messages import (
    Ack,
    Error,
    Hello,
    Inventory,
    Ping,
    Welcome,
    table_messages,
)
from kumazone.core.names import ZONE_NAME
from kumazone.core.ratelimit import RateLimiter, limited
from kumazone.core.vips import TableDelta
from kumazone.sync.metrics import SyncMetrics
from kumazone.sync.protocol import SyncProtocol
from kumazone.sync.tls import certificate_names

__all__ = ["GlobalHub", "GlobalSession", "ZoneConnected"]


class ZoneConnected(Exception):
    """A connected zone cannot be deleted."""


class GlobalHub:
    """The global's sync logic: one table, many zone sessions."""

    log = Logger()

    def __init__(
        self,
        merged: MergedTable,
        table_id: str,
        cidrs: tuple[str, str],
        persist: Callable[[TableDelta | None, list[str], list[str]], None],
        clock: IReactorTime,
        metrics: SyncMetrics,
        require_certificates: bool = True,
    ) -> None:
        self.merged = merged
        self.table_id = table_id
        self.cidrs = cidrs
        self.persist = persist
        self.clock = clock
        self.metrics = metrics
        self.require_certificates = require_certificates
        self.sessions: dict[str, GlobalSession] = {}
        self._refusal_log = limited(
            RateLimiter(burst=20, interval=60.0), clock, lambda line: self.log.warn(line)
        )

    def session(self) -> GlobalSession:
        """A session for a new zone connection."""
        return GlobalSession(self)

    def refused(self, reason: str, line: str) -> None:
        """Count a refused connection under C{reason} and log C{line} (rate-limited)."""
        self.metrics.refused.labels(reason).inc()
        self._refusal_log(line)

    def changed(self, delta: TableDelta | None, zones: list[str], deleted: list[str]) -> None:
        """Persist a change and push the new table to every zone."""
        self.persist(delta, zones, deleted)
        for session in list(self.sessions.values()):
            session.push()
        self.update_metrics()

    def delete_zone(self, name: str) -> bool:
        """Forget zone C{name} (an operator's DELETE /zones/{name})."""
        if name in self.sessions:
            # It would come straight back with its inventory.
            raise ZoneConnected(f"zone {name!r} is connected; stop it before deleting it")
        delta = self.merged.delete_zone(name, self.clock.seconds())
        if delta is None:
            return False
        self.changed(delta, [], [name])
        self._forget_metrics(name)
        return True

    def _forget_metrics(self, zone: str) -> None:
        for gauge in (
            self.metrics.connected,
            self.metrics.table_version,
            self.metrics.lag_versions,
            self.metrics.lag_seconds,
        ):
            try:
                gauge.remove(zone)
            except KeyError:
                pass

    def update_metrics(self) -> None:
        """Set each zone's connection and lag gauges."""
        now = self.clock.seconds()
        for name, record in self.merged.zones.items():
            self.metrics.connected.labels(name).set(1 if record.connected else 0)
            self.metrics.table_version.labels(name).set(record.acked)
            self.metrics.lag_versions.labels(name).set(max(0, self.merged.version - record.acked))
            behind = record.behind_since
            self.metrics.lag_seconds.labels(name).set(
                0 if behind is None or record.acked >= self.merged.version else now - behind
            )


class _Refusal(NamedTuple):
    """Why a hello is refused: a metric reason, a log line, the text the zone gets."""

    reason: str
    line: str
    why: str


class GlobalSession:
    """One zone's connection to the global: one method per kind of message it takes."""

    #: Who sends a session its messages, as error texts say it.
    peer_role = "a zone"

    def __init__(self, hub: GlobalHub) -> None:
        self.hub = hub
        self.zone: str | None = None
        #: Set when the hello was refused (already logged and counted).
        self.refused = False
        self.sent_version = -1
        self.proto: SyncProtocol

    @property
    def awaiting(self) -> str | None:
        """C{"hello"} until the zone has said who it is; then C{None}."""
        return "hello" if self.zone is None else None

    def connected(self, proto: SyncProtocol) -> None:
        """A zone connected; it has not said who it is yet."""
        self.proto = proto

    # -- hello --------------------------------------------------------------------

    def hello_received(self, proto: SyncProtocol, hello: Hello) -> None:
        """Accept the zone (welcome it, send its table) or refuse it."""
        if self.zone is not None:
            proto.fail(f"unexpected {hello.kind} from {self.peer_role}")
            return
        refusal = (
            self._name_refusal(hello)
            or self._certificate_refusal(hello)
            or self._cidr_refusal(hello)
        )
        if refusal is not None:
            self._refuse(refusal)
            return
        self._take_over(hello, self.hub.clock.seconds())
        self._welcome(hello)

    def _name_refusal(self, hello: Hello) -> _Refusal | None:
        if ZONE_NAME.match(hello.zone):
            return None
        return _Refusal(
            "bad-name",
            f"zone connection from {self.proto.peer()} refused: {hello.zone[:80]!r} "
            "is not a zone name",
            "not a zone name (lower-case letters, digits and '-', at most 63)",
        )

    def _certificate_refusal(self, hello: Hello) -> _Refusal | None:
        names = self._certificate_names()
        if names is None:
            if not self.hub.require_certificates:
                return None
            return _Refusal(
                "no-certificate",
                f"zone {hello.zone!r} refused: no client certificate",
                "a client certificate is required",
            )
        if hello.zone in names:
            return None
        return _Refusal(
            "wrong-zone",
            f"zone connection from {self.proto.peer()} refused: its certificate names "
            f"{', '.join(sorted(names)) or 'nothing'}, it claims zone {hello.zone!r}",
            f"certificate does not name zone {hello.zone!r}",
        )

    def _certificate_names(self) -> set[str] | None:
        """The names in the zone's certificate; C{None} without TLS."""
        get = getattr(self.proto.transport, "getPeerCertificate", None)
        if get is None:
            return None
        peer = get()
        return certificate_names(peer) if peer is not None else set()

    def _cidr_refusal(self, hello: Hello) -> _Refusal | None:
        cidr, cidr6 = self.hub.cidrs
        if (hello.cidr, hello.cidr6) == (cidr, cidr6):
            return None
        return _Refusal(
            "cidr",
            f"zone {hello.zone!r} refused: its CIDRs {hello.cidr} {hello.cidr6} differ "
            f"from the global's {cidr} {cidr6}",
            f"VIP ranges differ: zone {hello.cidr} {hello.cidr6}, global {cidr} {cidr6}",
        )

    def _refuse(self, refusal: _Refusal) -> None:
        self.refused = True
        self.hub.refused(refusal.reason, refusal.line)
        self.proto.fail(refusal.why, log=False)

    def _take_over(self, hello: Hello, now: float) -> None:
        """Make this the zone's session, closing any it had before."""
        hub = self.hub
        previous = hub.sessions.get(hello.zone)
        if previous is not None:
            previous.proto.fail("replaced by a new connection from the same zone")
        self.zone = hello.zone
        self.proto.zone = hello.zone
        hub.sessions[hello.zone] = self
        record = hub.merged.zone(hello.zone)
        record.pending, record.pending_part = None, None  # a new connection starts afresh
        record.connected = True
        record.last_contact = now
        hub.log.info(
            "zone {zone} connected from {peer} (holds table version {have})",
            zone=hello.zone,
            peer=self.proto.peer(),
            have=hello.have,
        )

    def _welcome(self, hello: Hello) -> None:
        """Welcome the zone and send it what it lacks of the table."""
        hub = self.hub
        self.proto.send(Welcome(hub.merged.version, hub.table_id))
        self.sent_version = hello.have if hello.table_id == hub.table_id else -1
        self.push()
        hub.persist(None, [hello.zone], [])
        hub.update_metrics()

    # -- after hello --------------------------------------------------------------

    def _heard(self) -> tuple[str, float]:
        """This zone's name and the time now, noted as its last contact."""
        # The protocol hands a session nothing but a hello until the zone is known.
        assert self.zone is not None
        now = self.hub.clock.seconds()
        self.hub.merged.zone(self.zone).last_contact = now
        return self.zone, now

    def inventory_received(self, proto: SyncProtocol, inventory: Inventory) -> None:
        """Take in (a part of) the zone's inventory; after its last part, share the change."""
        zone, now = self._heard()
        delta = self.hub.merged.receive_inventory(zone, inventory, now)
        if inventory.last:
            self.hub.changed(delta, [zone], [])

    def ack_received(self, proto: SyncProtocol, ack: Ack) -> None:
        """Note the table version the zone now holds."""
        zone, now = self._heard()
        self.hub.merged.acknowledge(zone, ack.version, now)
        self.hub.update_metrics()

    def ping_received(self, proto: SyncProtocol, ping: Ping) -> None:
        """The zone is still there."""
        self._heard()

    def error_received(self, proto: SyncProtocol, error: Error) -> None:
        """Log what the zone reports."""
        zone, _now = self._heard()
        self.hub.log.warn("zone {zone} reports: {message}", zone=zone, message=error.message)

    def push(self) -> None:
        """Send what changed since the version this zone was last sent."""
        table = self.hub.merged
        if self.sent_version == table.version:
            return
        changes = table.changes_since(self.sent_version) if self.sent_version >= 0 else None
        if changes is None:
            messages = table_messages(table.version, 0, True, table.rows())
        else:
            upsert, remove = changes
            messages = table_messages(table.version, self.sent_version, False, upsert, remove)
        for message in messages:
            self.proto.send(message)
        self.sent_version = table.version

    # -- the end ------------------------------------------------------------------

    def disconnected(self, proto: SyncProtocol, reason: Failure) -> None:
        """The connection is gone: count it if it never said hello, else mark the zone."""
        if self.zone is None:
            if not self.refused:  # a refused one was logged and counted then
                self.hub.refused(
                    "before-hello",
                    f"sync connection from {proto.peer()} closed before hello: "
                    f"{reason.getErrorMessage()}",
                )
        elif self.hub.sessions.get(self.zone) is self:
            self._zone_lost(self.zone, reason)

    def _zone_lost(self, zone: str, reason: Failure) -> None:
        hub = self.hub
        del hub.sessions[zone]
        record = hub.merged.zones.get(zone)
        if record is not None:
            record.connected = False
            record.last_contact = hub.clock.seconds()
            hub.persist(None, [zone], [])
        hub.log.info("zone {zone} disconnected: {why}", zone=zone, why=reason.getErrorMessage())
        hub.update_metrics()
