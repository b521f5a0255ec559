"""A dataplane's side of dataplane sync: say which table it holds, apply what the zone sends.

L{DataplaneClient} is the handler behind a L{SyncProtocol} (which frames,
heartbeats and dispatches); one lives as long as the process, and each
connection that C{ClientService} makes calls L{DataplaneClient.connected}
afresh.  The table itself is L{kumazone.dataplane.table.DataplaneTable}.
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from kumazone.core.messages import DpAck, DpHello, DpTable, DpWelcome, Error, Ping
from kumazone.core.ratelimit import RateLimiter, limited
from kumazone.dataplane.metrics import DataplaneMetrics
from kumazone.dataplane.table import DataplaneTable, TableError
from kumazone.sync.protocol import SyncProtocol

__all__ = ["ACK_DELAY", "DataplaneClient"]

#: A change is acknowledged this long after it applied, with any that follow it: a
#: zone fanning a change out to thousands of dataplanes is not read their acks while
#: it writes (an ack only tells the zone's listing which version is held).
ACK_DELAY = 1.0


class DataplaneClient:
    """The dataplane's sync logic: hello, then the zone's welcome and tables, acknowledged."""

    log = Logger()
    #: Who sends this handler its messages, as error texts say it.
    peer_role = "the zone"
    #: Any kind may come first (a refusal comes as an error, without a welcome).
    awaiting: str | None = None

    def __init__(
        self,
        table: DataplaneTable,
        name: str,
        clock: IReactorTime,
        metrics: DataplaneMetrics,
        zone: str = "",
    ) -> None:
        """
        @param name: this dataplane's name (its mesh is the table's).
        @param zone: how logs and sync metrics name the zone (its address).
        """
        self.table = table
        self.name = name
        self.clock = clock
        self.metrics = metrics
        self.zone = zone
        self.proto: SyncProtocol | None = None
        self.welcomed = False
        #: Rows in the parts of the table being received, and whether one was
        #: applied on this connection (the first one is logged).
        self._rows_received = 0
        self._first_table = True
        #: This side closed the connection to ask for the whole table.
        self._asking_again = False
        self._stopping = False
        self.connected_since: float | None = None
        self.last_table_at: float | None = None
        self._ack_call: IDelayedCall | None = None
        metrics.connected.set(0)
        metrics.table_version.set(table.version)
        self._log_failure = limited(
            RateLimiter(burst=5, interval=60.0), clock, lambda line: self.log.warn(line)
        )

    def connected(self, proto: SyncProtocol) -> None:
        """Say who this is and which table it holds."""
        self.proto = proto
        proto.zone = self.zone
        have, table_id = self.table.claim()
        proto.send(DpHello(self.table.mesh, self.name, have, table_id))

    def dpwelcome_received(self, proto: SyncProtocol, welcome: DpWelcome) -> None:
        """The zone accepted this dataplane; its tables follow."""
        if self.welcomed:
            proto.fail("a second welcome")
            return
        try:
            again = self.table.welcome(welcome)
        except TableError as e:
            proto.fail(f"cannot take the welcome: {e}")
            return
        if again:
            # The table held was built under other settings: ask for the whole one.
            self.log.info(
                "the zone's settings changed (domain {domain}, {cidr}, {cidr6}): "
                "reconnecting for the whole table",
                domain=welcome.domain,
                cidr=welcome.cidr,
                cidr6=welcome.cidr6,
            )
            self._asking_again = True
            proto.close()
            return
        self.welcomed = True
        self._rows_received, self._first_table = 0, True
        self.connected_since = self.clock.seconds()
        self.metrics.connected.set(1)
        self.log.info(
            "connected to the zone at {zone} as {mesh}/{name} (zone table version {version}, "
            "holding {held})",
            zone=self.zone,
            mesh=self.table.mesh,
            name=self.name,
            version=welcome.version,
            held=f"version {self.table.version}" if self.table.loaded else "no table",
        )

    def dptable_received(self, proto: SyncProtocol, part: DpTable) -> None:
        """Apply (a part of) a table; acknowledge it once whole."""
        if not self.welcomed:
            proto.fail("a table before the welcome")
            return
        held = self.table.version if self.table.loaded else None
        try:
            done = self.table.receive(part)
        except TableError as e:
            proto.fail(f"cannot apply the table: {e}; reconnecting for the whole table")
            return
        self._rows_received += len(part.upsert) + len(part.remove)
        if done:
            first = self._first_table
            if first:
                self._log_first_table(part, held)
            self._rows_received = 0
            self.last_table_at = self.clock.seconds()
            self.metrics.table_version.set(self.table.version)
            if first:
                proto.send(DpAck(self.table.version))  # the connection's table: at once
            else:
                self._ack_later(proto)

    def _ack_later(self, proto: SyncProtocol) -> None:
        """Acknowledge the version held in L{ACK_DELAY} seconds (once for every change
        applied meanwhile)."""
        if self._ack_call is not None and self._ack_call.active():
            return

        def ack() -> None:
            self._ack_call = None
            if self.proto is proto and not proto.closed:
                proto.send(DpAck(self.table.version))

        self._ack_call = self.clock.callLater(ACK_DELAY, ack)

    def _log_first_table(self, last: DpTable, held: int | None) -> None:
        """Say how this connection began: the whole table, or the changes since the one held."""
        self._first_table = False
        if last.full:
            self.log.info(
                "took the zone's whole table: version {version}, {count} service(s)",
                version=last.version,
                count=len(self.table.entries),
            )
        else:
            self.log.info(
                "resumed from table version {held}: now version {version}, {rows} row(s) changed",
                held=held,
                version=last.version,
                rows=self._rows_received,
            )

    def error_received(self, proto: SyncProtocol, error: Error) -> None:
        """Log what the zone says before it closes (rate-limited)."""
        self._log_failure(f"the zone at {self.zone} refused this dataplane: {error.message}")

    def ping_received(self, proto: SyncProtocol, ping: Ping) -> None:
        """The zone is still there."""

    def stop(self) -> None:
        """The dataplane stops: close the connection (the protocol's own close, see
        L{SyncProtocol.close}), and say so rather than that the zone was lost."""
        self._stopping = True
        if self.proto is not None:
            self.proto.close()

    def disconnected(self, proto: SyncProtocol, reason: Failure) -> None:
        """Lost the zone (or never reached it): keep serving the table held."""
        if self.proto is proto:
            self.proto = None
        if self._ack_call is not None and self._ack_call.active():
            self._ack_call.cancel()
        self._ack_call = None
        held = f"table version {self.table.version}" if self.table.loaded else "no table yet"
        if self._stopping:
            self.log.info("closed the connection to the zone at {zone}", zone=self.zone)
        elif self._asking_again:
            self._asking_again = False
        elif self.welcomed:
            self.log.warn(
                "lost the zone at {zone}: {why}; serving {held}",
                zone=self.zone,
                why=reason.getErrorMessage(),
                held=held,
            )
        else:
            self._log_failure(
                f"could not sync with the zone at {self.zone}: {reason.getErrorMessage()} "
                f"(serving {held})"
            )
        self.welcomed = False
        self.connected_since = None
        self.metrics.connected.set(0)
