"""The global's side of zone sync: one merged table (L{GlobalHub}), a session per zone."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from kumazone.core.bulk import CollectorPause
from kumazone.core.federation import MergedTable
from kumazone.core.limits import Cooldowns, ZoneLimits, ZoneRefused
from kumazone.core.messages import (
    Ack,
    Error,
    Hello,
    Inventory,
    Ping,
    TableUpdate,
    Welcome,
    table_messages,
)
from kumazone.core.names import ZONE_NAME
from kumazone.core.ratelimit import RateLimiter, TokenBucket, limited
from kumazone.core.storage import StoreError
from kumazone.core.vips import TableDelta
from kumazone.sync.metrics import SyncMetrics
from kumazone.sync.protocol import SyncProtocol
from kumazone.sync.tls import certificate_names

__all__ = [
    "PARTS_PER_TURN",
    "PUSH_ROWS",
    "STEP_KEYS",
    "GlobalHub",
    "GlobalSession",
    "ZoneConnected",
]

#: Keys of a zone's accepted inventory applied per reactor turn (one version each):
#: a zone's first inventory of 500,000 services never holds the reactor for long.
STEP_KEYS = 2000
#: Table parts one zone is sent per reactor turn (a whole table goes over many turns).
PARTS_PER_TURN = 4
#: Rows one change pushed to a zone covers at most, unless one version has more: a
#: zone far behind is sent the versions between (see L{MergedTable.changes_from}).
PUSH_ROWS = 4000


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
        limits: ZoneLimits | None = None,
    ) -> None:
        """
        @param persist: stores a change; raises L{StoreError} after putting the
            table back to what the store holds.
        @param limits: what each zone may ask (L{ZoneLimits}' defaults if None).
        """
        self.merged = merged
        self.table_id = table_id
        self.cidrs = cidrs
        self.persist = persist
        #: Whether the table may be sent to zones now (a replica on a shared store:
        #: not while a write is on its way; it calls push_all once they are stored).
        self.may_push: Callable[[], bool] = lambda: True
        self.clock = clock
        self.metrics = metrics
        self.require_certificates = require_certificates
        self.limits = limits or ZoneLimits()
        #: Zones refused after hello wait before they are heard again.
        self.cooldowns = Cooldowns(self.limits.refusal_cooldown)
        self.sessions: dict[str, GlobalSession] = {}
        #: Keys of an accepted inventory applied per turn (L{STEP_KEYS}).
        self.step_keys = STEP_KEYS
        #: Rows one push covers at most (L{PUSH_ROWS}).
        self.push_rows = PUSH_ROWS
        #: The next slice of the zones' accepted inventories (L{step}), when due.
        self._stepping: IDelayedCall | None = None
        #: The zone whose inventory was stepped last (zones take turns).
        self._stepped: str = ""
        #: The collector is off while inventories are applied in slices (L{CollectorPause}).
        self._collector = CollectorPause()
        self._refusal_log = limited(
            RateLimiter(burst=20, interval=60.0), clock, lambda line: self.log.warn(line)
        )
        #: Every other line a zone can cause (what it reports, its comings and goings).
        self.zone_log = limited(
            RateLimiter(burst=50, interval=60.0), clock, lambda line: self.log.info(line)
        )

    def session(self) -> GlobalSession:
        """A session for a new zone connection."""
        return GlobalSession(self)

    def refuse(self, session: GlobalSession, refusal: ZoneRefused) -> None:
        """Refuse a zone's message: count it, log it (bounded), tell the zone, close.

        Unless the store failed (the global's fault, not the zone's), the zone is
        not heard again for a while (L{Cooldowns}); the error says how long.
        """
        self.metrics.refused.labels(refusal.reason).inc()
        wait = 0.0
        if refusal.reason != "store" and session.zone is not None:
            wait = self.cooldowns.refused(session.zone, self.clock.seconds())
        later = f"; retry in {wait:.0f} s" if wait else ""
        self._refusal_log(f"zone {session.zone}: refused ({refusal.reason}): {refusal}{later}")
        session.proto.fail(f"refused: {refusal}{later}", log=False)

    def refused(self, reason: str, line: str) -> None:
        """Count a refused connection under C{reason} and log C{line} (rate-limited)."""
        self.metrics.refused.labels(reason).inc()
        self._refusal_log(line)

    def changed(self, delta: TableDelta | None, zones: list[str], deleted: list[str]) -> None:
        """Persist a change and push the new table to every zone.

        Raises L{StoreError} (the table back to what is stored, nothing pushed)
        if the change cannot be stored.
        """
        self.persist(delta, zones, deleted)
        self.push_all()
        self.update_metrics()

    def accepted(self, session: GlobalSession, delta: TableDelta | None) -> None:
        """A zone's inventory came whole; its first slice (C{delta}) is applied: share it.

        The rest is applied a slice per reactor turn (L{step}).
        """
        assert session.zone is not None
        self.changed(delta, [session.zone], [])
        self.cooldowns.forgive(session.zone)
        self._schedule_step()

    def _schedule_step(self) -> None:
        if self._stepping is not None:
            return
        if self.merged.stepping():
            self._collector.pause()
            self._stepping = self.clock.callLater(0, self.step)
        else:
            self._collector.resume()

    def step(self) -> None:
        """Apply one slice of a zone's accepted inventory, share it, and come back.

        Zones take turns; a slice is L{step_keys} keys, one version.  A slice that
        cannot be stored is dropped with the rest of that zone's inventory, and
        the zone, if connected, is refused: it sends it all again.
        """
        self._stepping = None
        if not self.may_push():
            return  # a replica: the next slice once the last is stored (L{stored})
        zones = self.merged.stepping()
        if not zones:
            return
        later = [name for name in zones if name > self._stepped]
        name = self._stepped = (later or zones)[0]
        try:
            delta = self.merged.step(name, self.clock.seconds(), self.step_keys)
            if delta is not None:
                self.changed(delta, [name], [])
        except StoreError as e:
            self.merged.drop_todo(name)
            session = self.sessions.get(name)
            if session is not None:
                self.refuse(session, ZoneRefused("store", f"the global cannot store it ({e})"))
        except Exception:
            self.merged.drop_todo(name)  # not again at every turn
            raise
        finally:
            self._schedule_step()

    def stored(self) -> None:
        """Every write so far is stored (a replica on a shared store): push what waited,
        and apply the next slice of an inventory, one write in flight at a time."""
        self.push_all()
        self._schedule_step()

    def push_all(self) -> None:
        """Push the table to every zone; one that fails is dropped, the others go on."""
        for session in list(self.sessions.values()):
            try:
                session.push()
            except Exception as e:
                self.refused("push", f"zone {session.zone}: push failed ({type(e).__name__}: {e})")
                session.proto.fail(f"the global cannot send its table: {e}", log=False)

    def record_quietly(self, zone: str) -> None:
        """Store zone C{zone}'s record (contact, acked: one row, not its services);
        a failure only logs (bounded)."""
        try:
            self.persist(None, [zone], [])
        except StoreError as e:
            self._refusal_log(f"zone {zone}: its record not stored: {e}")

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
        #: The last version the zone acknowledged on this connection.
        self.acked = -1
        #: A table on its way, L{PARTS_PER_TURN} parts per reactor turn.
        self._parts: Iterator[TableUpdate] | None = None
        self._sending: IDelayedCall | None = None
        limits = hub.limits
        self._rate = TokenBucket(limits.max_messages_per_second, 2 * limits.max_messages_per_second)
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
            or self._cooling_refusal(hello)
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

    def _cooling_refusal(self, hello: Hello) -> _Refusal | None:
        """Refused at once, before any welcome or push, while its cool-down lasts."""
        wait = self.hub.cooldowns.remaining(hello.zone, self.hub.clock.seconds())
        if not wait:
            return None
        return _Refusal(
            "cooling-down",
            f"zone {hello.zone!r} refused: it was refused lately; {wait:.0f} s to wait",
            f"refused lately: retry in {max(1, round(wait))} s",
        )

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
        hub.zone_log(
            f"zone {hello.zone} connected from {self.proto.peer()} "
            f"(holds table version {hello.have})"
        )

    def _welcome(self, hello: Hello) -> None:
        """Welcome the zone and send it what it lacks of the table."""
        hub = self.hub
        self.proto.send(Welcome(hub.merged.version, hub.table_id))
        self.sent_version = hello.have if hello.table_id == hub.table_id else -1
        self.push()
        hub.record_quietly(hello.zone)
        hub.update_metrics()

    # -- after hello --------------------------------------------------------------

    def _heard(self, metered: bool = True) -> tuple[str, float]:
        """This zone's name and the time now, noted as its last contact.

        Raises L{ZoneRefused} if a C{metered} message exceeds the zone's rate.
        """
        # The protocol hands a session nothing but a hello until the zone is known.
        assert self.zone is not None
        now = self.hub.clock.seconds()
        if metered and not self._rate.take(now):
            raise ZoneRefused(
                "rate",
                f"more than {self.hub.limits.max_messages_per_second:g} messages per second",
            )
        self.hub.merged.zone(self.zone).last_contact = now
        return self.zone, now

    def inventory_received(self, proto: SyncProtocol, inventory: Inventory) -> None:
        """Take in (a part of) the zone's inventory; after its last part, share the change."""
        try:
            zone, now = self._heard()
            delta = self.hub.merged.receive_inventory(
                zone, inventory, now, self.hub.limits, self.hub.step_keys
            )
            if inventory.last:
                self.hub.accepted(self, delta)
        except ZoneRefused as refusal:
            self.hub.refuse(self, refusal)
        except StoreError as e:
            # The table is back to what is stored: the zone sends it all again.
            if self.zone is not None:
                self.hub.merged.drop_todo(self.zone)
            self.hub.refuse(self, ZoneRefused("store", f"the global cannot store it ({e})"))

    def ack_received(self, proto: SyncProtocol, ack: Ack) -> None:
        """Note the table version the zone now holds (one this connection was sent)."""
        try:
            zone, now = self._heard(metered=False)  # acks answer the global's pushes
            if not self.acked < ack.version <= self.sent_version:
                raise ZoneRefused(
                    "bad-ack",
                    f"ack of table version {ack.version}: sent {self.sent_version}, "
                    f"acknowledged {self.acked}",
                )
            self.hub.merged.acknowledge(zone, ack.version, now)
        except ZoneRefused as refusal:
            self.hub.refuse(self, refusal)
            return
        self.acked = ack.version
        self.hub.update_metrics()

    def ping_received(self, proto: SyncProtocol, ping: Ping) -> None:
        """The zone is still there."""
        try:
            self._heard()
        except ZoneRefused as refusal:
            self.hub.refuse(self, refusal)

    def error_received(self, proto: SyncProtocol, error: Error) -> None:
        """Log what the zone reports (bounded, and cut to a line's length)."""
        try:
            zone, _now = self._heard()
        except ZoneRefused as refusal:
            self.hub.refuse(self, refusal)
            return
        self.hub.zone_log(f"zone {zone} reports: {error.message[:300]!r}")

    def resumed(self, proto: SyncProtocol) -> None:
        """The zone reads again: send what it was not sent meanwhile."""
        if self._parts is not None:
            if self._sending is None:
                self._send_parts()
            return
        self.push()

    def push(self) -> None:
        """Send what changed since the version this zone was last sent.

        The parts go L{PARTS_PER_TURN} per reactor turn; changes made meanwhile
        follow once the last part is out, coalesced up to L{PUSH_ROWS} rows: a
        zone far behind is sent the versions between, each at most that many
        rows (or one version), so that no push, and no apply of it in the
        zone, costs more than that.
        """
        table = self.hub.merged
        if self.zone is None:
            return  # nothing before the welcome (the transport may resume before hello)
        if not self.hub.may_push():
            return  # not all stored yet: the hub pushes once it is
        if self._parts is not None or self.proto.paused or self.proto.closed:
            return  # a zone not reading gets the changes, coalesced, once it reads
        if self.sent_version == table.version:
            return
        step = (
            table.changes_from(self.sent_version, self.hub.push_rows)
            if self.sent_version >= 0
            else None
        )
        if step is None:
            version = table.version
            messages = table_messages(version, 0, True, table.listing)
        else:
            version, upsert, remove = step
            messages = table_messages(version, self.sent_version, False, upsert, remove)
        self.sent_version = version
        self._parts = iter(messages)
        self._send_parts()

    def _send_parts(self) -> None:
        """Send the next parts of the table on its way; come back for the rest."""
        self._sending = None
        parts = self._parts
        if parts is None:
            return
        if self.proto.closed:
            self._parts = None
            return
        if self.proto.paused:
            return  # resumed() goes on
        for _ in range(PARTS_PER_TURN):
            message = next(parts, None)
            if message is None:
                self._parts = None
                self.push()  # what changed while the parts went
                return
            self.proto.send(message)
        self._sending = self.hub.clock.callLater(0, self._send_parts)

    # -- the end ------------------------------------------------------------------

    def disconnected(self, proto: SyncProtocol, reason: Failure) -> None:
        """The connection is gone: count it if it never said hello, else mark the zone."""
        self._parts = None
        if self._sending is not None and self._sending.active():
            self._sending.cancel()
        self._sending = None
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
            hub.record_quietly(zone)
        hub.zone_log(f"zone {zone} disconnected: {reason.getErrorMessage()}")
        hub.update_metrics()
