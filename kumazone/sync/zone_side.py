"""A zone's side of zone sync: send the inventory, apply the global's table."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from kumazone.core.bulk import CollectorPause
from kumazone.core.messages import (
    Ack,
    Error,
    Hello,
    Inventory,
    Ping,
    TableUpdate,
    Welcome,
    inventory_messages,
)
from kumazone.core.ratelimit import RateLimiter, limited
from kumazone.core.storage import StoreError
from kumazone.core.view import FederatedView
from kumazone.core.vips import ServiceKey
from kumazone.core.zone import Zone, ZoneChange
from kumazone.sync.metrics import SyncMetrics
from kumazone.sync.protocol import SyncProtocol

__all__ = ["FOLLOW_KEYS", "PARTS_PER_TURN", "REFUSED_LONGEST", "REFUSED_WAIT", "ZoneSync"]

#: Services of a table update the zone's entries (and DNS) follow per reactor
#: turn: a change of 100,000 rows never holds the zone (its DNS, its heartbeat)
#: for long.
FOLLOW_KEYS = 500
#: Inventory parts sent per reactor turn (a whole inventory goes over many turns).
PARTS_PER_TURN = 4

#: After the global refuses it, a zone waits this long before connecting again,
#: twice as long after each refusal in a row, up to L{REFUSED_LONGEST} (or as long
#: as the global asks, if longer).
REFUSED_WAIT = 5.0
REFUSED_LONGEST = 300.0
#: A connection that lasted this long without a refusal ends a row of refusals.
FORGIVEN_AFTER = 60.0
_RETRY_IN = re.compile(r"retry in (\d{1,6}) s")
#: Errors that close a connection without refusing the zone: no wait for them.
_NOT_REFUSALS = ("the global cannot", "replaced by a new connection")


def _pairs(keys: Iterable[ServiceKey]) -> list[tuple[str, str]]:
    return [(key.mesh, key.service) for key in keys]


class ZoneSync:
    """A zone's sync logic: send the inventory, apply the global's table.

    One instance lives as long as the zone; each connection calls
    L{connected} afresh.
    """

    log = Logger()
    #: Who sends this handler its messages, as error texts say it.
    peer_role = "the global"
    #: Any kind may come first (a refusal comes as an error, without a welcome).
    awaiting: str | None = None

    def __init__(
        self,
        zone: Zone,
        clock: IReactorTime,
        metrics: SyncMetrics,
        durable: Callable[[], Deferred[None]] | None = None,
    ) -> None:
        self.zone = zone
        #: A replica's writes go to the database on a thread: a version is
        #: acknowledged once this fires (None: the store wrote it already).
        self._durable = durable
        self.clock = clock
        self.metrics = metrics
        self.proto: SyncProtocol | None = None
        #: Services that came or went since the whole inventory went out on this
        #: connection, not sent yet (its parts on their way, or no welcome yet).
        #: (Not a copy of what was sent: a zone holds a million services, and the
        #: global takes a change's additions and removals as the state they give.)
        self._moved: dict[ServiceKey, None] = {}
        self.global_table_id: str | None = None
        self.force_full = False
        self.connected_since: float | None = None
        self.last_table_at: float | None = None
        #: Refusals in a row, and until when the next connection must wait.
        self.refusals = 0
        self.cooldown_until = 0.0
        self._refused_here = False
        #: The whole inventory on its way, L{PARTS_PER_TURN} parts per reactor turn.
        self._parts: Iterator[Inventory] | None = None
        self._sending: IDelayedCall | None = None
        #: The next slice of a table update followed in slices, when due.
        self._following: IDelayedCall | None = None
        #: The collector is off while a big table update is followed (L{CollectorPause}).
        self._collector = CollectorPause()
        #: The last version acknowledged on this connection, whether a table came
        #: whole on it, and the table (id, version) its hello claimed.
        self._acked = -1
        self._table_here = False
        self._claimed: tuple[str, int] = ("", 0)
        zone.listeners.append(self._changed)
        self._log_failure = limited(
            RateLimiter(burst=5, interval=60.0), clock, lambda line: self.log.warn(line)
        )

    def connected(self, proto: SyncProtocol) -> None:
        """Say hello and send the whole inventory."""
        self.proto = proto
        self._refused_here = False
        proto.zone = self.zone.name
        table = self.zone.table
        if isinstance(table, FederatedView):
            table.forget_partial()
        # After a change it could not apply, the zone claims no table at all, so
        # that the global sends the whole one.
        claimed = "" if self.force_full else self.zone.table_id
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
        self._acked, self._table_here, self._claimed = -1, False, (claimed, have)
        self._send_whole()

    def _send_whole(self) -> None:
        """Send the whole inventory as it is now, in parts (L{_send_parts})."""
        if self._sending is not None and self._sending.active():
            self._sending.cancel()
        self._moved = {}
        self._parts = iter(inventory_messages(self.zone.wanted(), full=True))
        self._send_parts()

    def _send_parts(self) -> None:
        """Send the next parts of the whole inventory; come back for the rest.

        Changes made meanwhile go once the last part is out (L{inventory_changed}).
        """
        self._sending = None
        proto, parts = self.proto, self._parts
        if parts is None or proto is None or proto.closed:
            self._parts = None
            return
        if proto.paused:
            return  # resumed() goes on
        for _ in range(PARTS_PER_TURN):
            message = next(parts, None)
            if message is None:
                self._parts = None
                self.inventory_changed()
                return
            proto.send(message)
        self._sending = self.clock.callLater(0, self._send_parts)

    def resumed(self, proto: SyncProtocol) -> None:
        """The global reads again: go on with the inventory on its way."""
        if self._parts is not None and self._sending is None and proto is self.proto:
            self._send_parts()

    def _changed(self, change: ZoneChange) -> None:
        """The zone's table changed: send the services that came and went (O(those);
        a full change says them too, since the inventory before it)."""
        if self.proto is None or self.proto.closed:
            return  # the next connection sends the whole inventory
        moved = self._moved
        moved.update(dict.fromkeys(change.services_added))
        moved.update(dict.fromkeys(change.services_removed))
        self.inventory_changed()

    def inventory_changed(self) -> None:
        """Send the services that came or went since the whole inventory went out
        (O(those)).  Nothing until the whole inventory is out and the global has
        welcomed this zone (each calls this again)."""
        if self.proto is None or self.proto.closed or self.global_table_id is None:
            return
        if self._parts is not None:
            return  # done once the whole inventory is out
        if not self._moved:
            return
        moved, self._moved = self._moved, {}
        wanted = self.zone.wanted()
        add = [key for key in moved if key in wanted]
        remove = [key for key in moved if key not in wanted]
        # (The global takes a key added that it holds, or removed that it does
        # not, as the state it gives: nothing to tell it apart from a change.)
        for message in inventory_messages(_pairs(add), _pairs(remove), full=False):
            self.proto.send(message)

    def welcome_received(self, proto: SyncProtocol, welcome: Welcome) -> None:
        """The global accepted this zone: send what changed while connecting."""
        self.global_table_id = welcome.table_id
        self.connected_since = self.clock.seconds()
        self.metrics.connected.labels(self.zone.name).set(1)
        self.log.info("connected to the global (table version {version})", version=welcome.version)
        self.inventory_changed()  # anything that changed while connecting

    def table_received(self, proto: SyncProtocol, update: TableUpdate) -> None:
        """Apply (a part of) the global's table; acknowledge it once whole and followed.

        A large update is stored at once and followed (entries, DNS)
        L{FOLLOW_KEYS} services per reactor turn.
        """
        if self.global_table_id is None:
            proto.fail("table before welcome")
            return
        if self.zone.following:
            # A replica that no longer leads: its table comes from its leader now.
            proto.close()
            return
        now = self.clock.seconds()
        if update.full and not update.last:
            # A whole table in parts: its rows are long-lived objects by the hundred
            # thousand, made over many turns; the collector waits until they are
            # followed (a full collection meanwhile held the reactor 0.1 s at each).
            self._collector.pause()
        try:
            done = self.zone.apply_global(update, self.global_table_id, now, FOLLOW_KEYS)
        except ValueError as e:
            self._collector_idle()
            self.force_full = True
            proto.fail(f"cannot apply table change: {e}; reconnecting for a full table")
            return
        except StoreError as e:
            self._collector_idle()
            # Not stored (the zone went back to its store): the next connection claims
            # what is stored, and the global sends on from there.
            proto.fail(f"cannot store the table: {e}")
            return
        if not done:
            return
        self.force_full = False
        self._table_here = True
        table = self.zone.table
        if isinstance(table, FederatedView) and table.held_back:
            self._collector.pause()
        if self._following is None:
            if isinstance(table, FederatedView) and table.held_back:
                self._following = self.clock.callLater(0, self._follow)
            else:
                self._follow()

    def _collector_idle(self) -> None:
        """The collector back on, unless a table update is still being followed."""
        if self._following is None:
            self._collector.resume(freeze=False)

    def _follow(self) -> None:
        """Follow the next slice of the table updates applied; once none waits, acknowledge."""
        self._following = None
        if self.zone.follow_global(FOLLOW_KEYS):
            self._following = self.clock.callLater(0, self._follow)
            return
        self._collector.resume()
        version = self.zone.table.version
        self.last_table_at = self.clock.seconds()
        self.metrics.table_version.labels(self.zone.name).set(version)
        proto = self.proto
        if proto is None or proto.closed or self.global_table_id is None:
            return
        # Only a version this connection was sent (or its hello claimed, and the
        # global took), and never one below what it acknowledged.
        claimed = self._claimed == (self.global_table_id, version)
        if version > self._acked and (self._table_here or claimed):
            if self._durable is None:
                self._acked = version
                proto.send(Ack(version))
                return
            self._durable().addCallbacks(
                lambda _: self._ack_stored(proto, version),
                lambda failure: failure.trap(StoreError),  # the replica reloads
            )

    def _ack_stored(self, proto: SyncProtocol, version: int) -> None:
        """Acknowledge C{version}, stored meanwhile, if still on the same connection."""
        if proto is self.proto and not proto.closed and version > self._acked:
            self._acked = version
            proto.send(Ack(version))

    def error_received(self, proto: SyncProtocol, error: Error) -> None:
        """Log what the global says before it closes (rate-limited), and wait before retrying.

        The wait doubles with each refusal in a row (L{REFUSED_WAIT}); the
        global may ask for longer (C{"retry in N s"}).
        """
        self._log_failure(f"the global refused this zone: {error.message}")
        if any(text in error.message for text in _NOT_REFUSALS):
            return  # the global's own trouble, or a newer connection of this zone
        self.refusals += 1
        self._refused_here = True
        wait = min(REFUSED_LONGEST, REFUSED_WAIT * 2.0 ** min(self.refusals - 1, 16))
        asked = _RETRY_IN.search(error.message)
        if asked is not None:
            wait = max(wait, min(REFUSED_LONGEST, float(asked.group(1))))
        self.cooldown_until = self.clock.seconds() + wait

    def retry_delay(self, delay: float) -> float:
        """The wait before the next connection: C{delay}, or longer while refused lately."""
        return max(delay, self.cooldown_until - self.clock.seconds())

    def ping_received(self, proto: SyncProtocol, ping: Ping) -> None:
        """The global is still there."""

    def disconnected(self, proto: SyncProtocol, reason: Failure) -> None:
        """Lost the global (or never reached it): keep serving the table held."""
        if self.proto is not None and proto is not self.proto:
            return  # an older connection's close, come late: the current one goes on
        if self.proto is proto:
            self.proto = None
            self._parts = None
            if self._sending is not None and self._sending.active():
                self._sending.cancel()
            self._sending = None
        since = self.connected_since
        if (
            not self._refused_here
            and since is not None
            and self.clock.seconds() - since >= FORGIVEN_AFTER
        ):
            self.refusals = 0
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
        self._collector_idle()  # (a table that came in part only is dropped)
