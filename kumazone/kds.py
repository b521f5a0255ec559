"""Zone <-> global sync over TCP (TLS): framing and heartbeats, and each side's logic.

L{SyncProtocol} frames messages (L{kumazone.sync}), sends a heartbeat every
C{heartbeat} seconds and drops a peer silent for C{silence} seconds; it hands
messages to a handler.  L{GlobalHub} is the global's handler factory (one
L{GlobalSession} per zone connection); L{ZoneSync} is a zone's.  Time comes from
an injected clock.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Any, Protocol

from twisted.internet import protocol
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from kumazone.federation import FederatedTable, GlobalTable
from kumazone.metrics import SyncMetrics
from kumazone.names import ZONE_NAME
from kumazone.ratelimit import RateLimiter, limited
from kumazone.sync import (
    Ack,
    Error,
    FrameDecoder,
    Hello,
    Inventory,
    Message,
    Ping,
    ProtocolError,
    Table,
    Welcome,
    encode,
    inventory_messages,
    table_messages,
)
from kumazone.tls import certificate_names
from kumazone.vips import ServiceKey, TableDelta
from kumazone.zone import Zone

__all__ = ["GlobalHub", "SyncProtocol", "ZoneSync"]

HEARTBEAT = 5.0
SILENCE = 15.0


class ZoneConnected(Exception):
    """A connected zone cannot be deleted."""


class Handler(Protocol):
    """What L{SyncProtocol} calls."""

    def connected(self, proto: SyncProtocol) -> None: ...
    def received(self, proto: SyncProtocol, message: Message) -> None: ...
    def disconnected(self, proto: SyncProtocol, reason: Failure) -> None: ...


class SyncProtocol(protocol.Protocol):
    """Framing, heartbeats and silence detection; logic lives in the handler."""

    log = Logger()
    _silence_log = RateLimiter(burst=10, interval=60.0)

    def __init__(
        self,
        handler: Handler,
        clock: IReactorTime,
        metrics: SyncMetrics,
        heartbeat: float = HEARTBEAT,
        silence: float = SILENCE,
    ) -> None:
        self.handler = handler
        self.clock = clock
        self.metrics = metrics
        self.heartbeat = heartbeat
        self.silence = silence
        self.decoder = FrameDecoder()
        self.zone = ""  # set once known, for metric labels
        self.last_heard = 0.0
        self._beat: LoopingCall | None = None
        self.closed = False

    def connectionMade(self) -> None:
        self.last_heard = self.clock.seconds()
        # Messages are small and latency matters: no Nagle delay (under TLS the
        # TCP transport is the wrapper's own transport).
        transport: Any = self.transport
        while transport is not None:
            if hasattr(transport, "setTcpNoDelay"):
                transport.setTcpNoDelay(True)
                break
            transport = getattr(transport, "transport", None)
        self._beat = LoopingCall(self._tick)
        self._beat.clock = self.clock
        self._beat.start(self.heartbeat, now=False)
        self.handler.connected(self)

    def _tick(self) -> None:
        if self.clock.seconds() - self.last_heard > self.silence:
            # Anyone can open a connection and stay silent: a bounded log.
            if SyncProtocol._silence_log.allow(self.clock.seconds()):
                self.log.warn(
                    "sync peer {peer} silent for {seconds:.0f}s: dropped",
                    peer=self.peer(),
                    seconds=self.clock.seconds() - self.last_heard,
                )
            self.abort()
            return
        self.send(Ping())

    def peer(self) -> str:
        address = self.transport.getPeer() if self.transport is not None else None
        return f"{getattr(address, 'host', '?')}:{getattr(address, 'port', '?')}"

    def dataReceived(self, data: bytes) -> None:
        self.last_heard = self.clock.seconds()
        messages: list[Message] = []
        try:
            for message in self.decoder.feed(data):
                messages.append(message)
                if self.closed:
                    break
                self.handler.received(self, message)
        except ProtocolError as e:
            self.metrics.refused.labels("protocol").inc()
            self.fail(f"protocol error: {e}")
        finally:
            # Counted once the handler has seen the hello: under the zone's name.
            zone = self.zone or "?"
            self.metrics.octets.labels(zone, "in").inc(len(data))
            for message in messages:
                self.metrics.messages.labels(zone, "in", type(message).__name__).inc()

    def send(self, message: Message) -> None:
        if self.closed or self.transport is None:
            return
        data = encode(message)
        self.metrics.octets.labels(self.zone or "?", "out").inc(len(data))
        self.metrics.messages.labels(self.zone or "?", "out", type(message).__name__).inc()
        self.transport.write(data)

    def fail(self, why: str, log: bool = True) -> None:
        """Tell the peer why, log it (unless the caller did), and close."""
        if log:
            self.log.warn(
                "sync with {peer} ({zone}) closed: {why}",
                peer=self.peer(),
                zone=self.zone or "unknown zone",
                why=why,
            )
        self.send(Error(why))
        self.close()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.loseConnection()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.closed = True
        if self._beat is not None and self._beat.running:
            self._beat.stop()
        self.handler.disconnected(self, reason)


class SyncFactory(protocol.Factory):
    """Builds a L{SyncProtocol} around a handler made per connection."""

    noisy = False

    def __init__(
        self,
        make_handler: Callable[[], Handler],
        clock: IReactorTime,
        metrics: SyncMetrics,
        heartbeat: float = HEARTBEAT,
        silence: float = SILENCE,
    ) -> None:
        self.make_handler = make_handler
        self.clock = clock
        self.metrics = metrics
        self.heartbeat = heartbeat
        self.silence = silence

    def buildProtocol(self, addr: Any) -> SyncProtocol:
        return SyncProtocol(
            self.make_handler(), self.clock, self.metrics, self.heartbeat, self.silence
        )


# -- the global side ----------------------------------------------------------------


class GlobalHub:
    """The global's sync logic: one table, many zone sessions."""

    log = Logger()

    def __init__(
        self,
        table: GlobalTable,
        table_id: str,
        cidrs: tuple[str, str],
        persist: Callable[[TableDelta | None, list[str], list[str]], None],
        clock: IReactorTime,
        metrics: SyncMetrics,
        require_certificates: bool = True,
    ) -> None:
        self.table = table
        self.table_id = table_id
        self.cidrs = cidrs
        self.persist = persist
        self.clock = clock
        self.metrics = metrics
        self.require_certificates = require_certificates
        self.sessions: dict[str, GlobalSession] = {}
        self._refusal_log = limited(
            RateLimiter(burst=20, interval=60.0), clock.seconds, lambda line: self.log.warn(line)
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
        delta = self.table.delete_zone(name, self.clock.seconds())
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
        for name, record in self.table.zones.items():
            self.metrics.connected.labels(name).set(1 if record.connected else 0)
            self.metrics.table_version.labels(name).set(record.acked)
            self.metrics.lag_versions.labels(name).set(max(0, self.table.version - record.acked))
            behind = record.behind_since
            self.metrics.lag_seconds.labels(name).set(
                0 if behind is None or record.acked >= self.table.version else now - behind
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
                proto.fail(f"expected hello, got {type(message).__name__.lower()}")
                return
            self._hello(message, now)
            return
        record = hub.table.zone(self.zone)
        record.last_contact = now
        if isinstance(message, Inventory):
            delta = hub.table.receive_inventory(self.zone, message, now)
            if message.last:
                hub.changed(delta, [self.zone], [])
        elif isinstance(message, Ack):
            hub.table.acknowledge(self.zone, message.version, now)
            hub.update_metrics()
        elif isinstance(message, Ping):
            pass
        elif isinstance(message, Error):
            hub.log.warn("zone {zone} reports: {message}", zone=self.zone, message=message.message)
        else:
            proto.fail(f"unexpected {type(message).__name__.lower()} from a zone")

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
        record = hub.table.zone(hello.zone)
        record.pending, record.pending_part = None, None  # a new connection starts afresh
        record.connected = True
        record.last_contact = now
        hub.log.info(
            "zone {zone} connected from {peer} (holds table version {have})",
            zone=hello.zone,
            peer=self.proto.peer(),
            have=hello.have,
        )
        self.proto.send(Welcome(hub.table.version, hub.table_id))
        self.sent_version = hello.have if hello.table == hub.table_id else -1
        self.push()
        hub.persist(None, [hello.zone], [])
        hub.update_metrics()

    def push(self) -> None:
        """Send what changed since the version this zone was last sent."""
        table = self.hub.table
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
            record = hub.table.zones.get(self.zone)
            if record is not None:
                record.connected = False
                record.last_contact = hub.clock.seconds()
                hub.persist(None, [self.zone], [])
            hub.log.info(
                "zone {zone} disconnected: {why}", zone=self.zone, why=reason.getErrorMessage()
            )
            hub.update_metrics()


# -- the zone side ------------------------------------------------------------------


def _pairs(keys: AbstractSet[ServiceKey]) -> list[tuple[str, str]]:
    return [(key.mesh, key.service) for key in keys]


class ZoneSync:
    """A zone's sync logic: send the inventory, apply the global's table.

    One instance lives as long as the zone; each connection calls
    L{connected} afresh.
    """

    log = Logger()

    def __init__(self, zone: Zone, clock: IReactorTime, metrics: SyncMetrics) -> None:
        self.zone = zone
        self.clock = clock
        self.metrics = metrics
        self.proto: SyncProtocol | None = None
        self.sent: AbstractSet[ServiceKey] = frozenset()
        self.global_table_id: str | None = None
        self.force_full = False
        self.connected_since: float | None = None
        self.last_table_at: float | None = None
        zone.listeners.append(lambda snapshot: self.inventory_changed())
        self._log_failure = limited(
            RateLimiter(burst=5, interval=60.0), clock.seconds, lambda line: self.log.warn(line)
        )

    def connected(self, proto: SyncProtocol) -> None:
        self.proto = proto
        proto.zone = self.zone.name
        table = self.zone.table
        if isinstance(table, FederatedTable):
            table.forget_partial()
        # After a change it could not apply, the zone claims no table at all, so
        # that the global sends the whole one.
        claimed = "" if self.force_full else self.zone.table_origin
        have = table.version if claimed else 0
        proto.send(
            Hello(
                self.zone.name,
                have,
                claimed,
                str(self.zone.config.cidr),
                str(self.zone.config.cidr6),
            )
        )
        self.sent = self.zone.wanted()
        for message in inventory_messages(_pairs(self.sent), full=True):
            proto.send(message)

    def inventory_changed(self) -> None:
        if self.proto is None or self.proto.closed or self.global_table_id is None:
            return
        wanted = self.zone.wanted()
        if wanted == self.sent:
            return
        add, remove = wanted - self.sent, self.sent - wanted
        self.sent = wanted
        for message in inventory_messages(_pairs(add), _pairs(remove), full=False):
            self.proto.send(message)

    def received(self, proto: SyncProtocol, message: Message) -> None:
        if isinstance(message, Welcome):
            self.global_table_id = message.table
            self.connected_since = self.clock.seconds()
            self.metrics.connected.labels(self.zone.name).set(1)
            self.log.info(
                "connected to the global (table version {version})", version=message.version
            )
            self.inventory_changed()  # anything that changed while connecting
        elif isinstance(message, Table):
            if self.global_table_id is None:
                proto.fail("table before welcome")
                return
            try:
                done = self.zone.apply_global(message, self.global_table_id, self.clock.seconds())
            except ValueError as e:
                self.force_full = True
                proto.fail(f"cannot apply table change: {e}; reconnecting for a full table")
                return
            if done:
                self.force_full = False
                self.last_table_at = self.clock.seconds()
                self.metrics.table_version.labels(self.zone.name).set(message.version)
                proto.send(Ack(message.version))
        elif isinstance(message, Error):
            self._log_failure(f"the global refused this zone: {message.message}")
        elif not isinstance(message, Ping):
            proto.fail(f"unexpected {type(message).__name__.lower()} from the global")

    def disconnected(self, proto: SyncProtocol, reason: Failure) -> None:
        if self.proto is proto:
            self.proto = None
        if self.global_table_id is not None:
            self.log.warn(
                "lost the global: {why}; serving table version {version}",
                why=reason.getErrorMessage(),
                version=self.zone.table.version,
            )
        else:
            self._log_failure(f"could not sync with the global: {reason.getErrorMessage()}")
        self.global_table_id = None
        self.connected_since = None
        self.metrics.connected.labels(self.zone.name).set(0)
