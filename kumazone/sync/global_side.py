"""The global's side of zone sync: one merged table, one session per zone."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from kumazone.core.federation import MergedTable
from kumazone.core.messages import (
    Ack,
    Error,
    Hello,
    Inventory,
    Message,
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
        return GlobalSession(self)

    def refused(self, reason: str, line: str) -> None:
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
        for label in (
            self.metrics.connected,
            self.metrics.table_version,
            self.metrics.lag_versions,
            self.metrics.lag_seconds,
        ):
            try:
                label.remove(name)
            except KeyError:
                pass
        return True

    def update_metrics(self) -> None:
        now = self.clock.seconds()
        for name, record in self.merged.zones.items():
            self.metrics.connected.labels(name).set(1 if record.connected else 0)
            self.metrics.table_version.labels(name).set(record.acked)
            self.metrics.lag_versions.labels(name).set(max(0, self.merged.version - record.acked))
            behind = record.behind_since
            self.metrics.lag_seconds.labels(name).set(
                0 if behind is None or record.acked >= self.merged.version else now - behind
            )


class GlobalSession:
    """One zone's connection to the global."""

    def __init__(self, hub: GlobalHub) -> None:
        self.hub = hub
        self.zone: str | None = None
        #: Set when _hello refused the zone (already logged and counted).
        self.refused = False
        self.sent_version = -1
        self.proto: SyncProtocol

    def connected(self, proto: SyncProtocol) -> None:
        self.proto = proto

    def _certificate_names(self) -> set[str] | None:
        transport = self.proto.transport
        get = getattr(transport, "getPeerCertificate", None)
        if get is None:
            return None
        peer = get()
        return certificate_names(peer) if peer is not None else set()

    def received(self, proto: SyncProtocol, message: Message) -> None:
        hub = self.hub
        now = hub.clock.seconds()
        if self.zone is None:
            if not isinstance(message, Hello):
                proto.fail(f"expected hello, got {message.kind}")
                return
            self._hello(message, now)
            return
        record = hub.merged.zone(self.zone)
        record.last_contact = now
        if isinstance(message, Inventory):
            delta = hub.merged.receive_inventory(self.zone, message, now)
            if message.last:
                hub.changed(delta, [self.zone], [])
        elif isinstance(message, Ack):
            hub.merged.acknowledge(self.zone, message.version, now)
            hub.update_metrics()
        elif isinstance(message, Ping):
            pass
        elif isinstance(message, Error):
            hub.log.warn("zone {zone} reports: {message}", zone=self.zone, message=message.message)
        else:
            proto.fail(f"unexpected {message.kind} from a zone")

    def _refuse(self, reason: str, line: str, why: str) -> None:
        self.refused = True
        self.hub.refused(reason, line)
        self.proto.fail(why, log=False)

    def _hello(self, hello: Hello, now: float) -> None:
        hub = self.hub
        if not ZONE_NAME.match(hello.zone):
            self._refuse(
                "bad-name",
                f"zone connection from {self.proto.peer()} refused: {hello.zone[:80]!r} "
                "is not a zone name",
                "not a zone name (lower-case letters, digits and '-', at most 63)",
            )
            return
        names = self._certificate_names()
        if names is None and hub.require_certificates:
            self._refuse(
                "no-certificate",
                f"zone {hello.zone!r} refused: no client certificate",
                "a client certificate is required",
            )
            return
        if names is not None and hello.zone not in names:
            self._refuse(
                "wrong-zone",
                f"zone connection from {self.proto.peer()} refused: its certificate names "
                f"{', '.join(sorted(names)) or 'nothing'}, it claims zone {hello.zone!r}",
                f"certificate does not name zone {hello.zone!r}",
            )
            return
        if (hello.cidr, hello.cidr6) != hub.cidrs:
            self._refuse(
                "cidr",
                f"zone {hello.zone!r} refused: its CIDRs {hello.cidr} {hello.cidr6} differ "
                f"from the global's {hub.cidrs[0]} {hub.cidrs[1]}",
                f"VIP ranges differ: zone {hello.cidr} {hello.cidr6}, "
                f"global {hub.cidrs[0]} {hub.cidrs[1]}",
            )
            return
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
        self.proto.send(Welcome(hub.merged.version, hub.table_id))
        self.sent_version = hello.have if hello.table_id == hub.table_id else -1
        self.push()
        hub.persist(None, [hello.zone], [])
        hub.update_metrics()

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

    def disconnected(self, proto: SyncProtocol, reason: Failure) -> None:
        hub = self.hub
        if self.zone is None:
            if self.refused:
                return  # logged and counted when it was refused
            hub.refused(
                "before-hello",
                f"sync connection from {proto.peer()} closed before hello: "
                f"{reason.getErrorMessage()}",
            )
            return
        if hub.sessions.get(self.zone) is self:
            del hub.sessions[self.zone]
            record = hub.merged.zones.get(self.zone)
            if record is not None:
                record.connected = False
                record.last_contact = hub.clock.seconds()
                hub.persist(None, [self.zone], [])
            hub.log.info(
                "zone {zone} disconnected: {why}", zone=self.zone, why=reason.getErrorMessage()
            )
            hub.update_metrics()
