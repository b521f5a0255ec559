"""Zone <-> global sync: framing, heartbeats, silence detection and dispatch.

L{SyncProtocol} frames messages (L{kumazone.core.messages}), sends a heartbeat
every C{heartbeat} seconds and drops a peer silent for C{silence} seconds; it
hands each message to its handler's method for the message's kind
(C{<kind>_received}): L{kumazone.sync.global_side.GlobalSession} on the global,
L{kumazone.sync.zone_side.ZoneSync} on a zone.  Time comes from an injected
clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import protocol
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from kumazone.core.messages import Error, FrameDecoder, Message, Ping, ProtocolError, encode
from kumazone.core.ratelimit import RateLimiter
from kumazone.sync.metrics import SyncMetrics

__all__ = ["HEARTBEAT", "SILENCE", "Handler", "SyncFactory", "SyncProtocol"]

HEARTBEAT = 5.0
SILENCE = 15.0


class Handler(Protocol):
    """The sync logic one side puts behind a L{SyncProtocol}.

    Besides these, a handler has one method per kind of message it takes,
    C{<kind>_received(proto, message)} (C{hello_received}, C{table_received},
    ...); a message of any other kind closes the connection as unexpected.
    """

    @property
    def peer_role(self) -> str:
        """Who sends this handler its messages, as error texts say it (C{"a zone"})."""

    @property
    def awaiting(self) -> str | None:
        """The kind that must come before any other, or C{None} when any may come."""

    def connected(self, proto: SyncProtocol) -> None:
        """A connection is up."""

    def disconnected(self, proto: SyncProtocol, reason: Failure) -> None:
        """The connection is gone."""


class SyncProtocol(protocol.Protocol):
    """Framing, heartbeats, silence detection and dispatch; logic lives in the handler."""

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
        """Start the heartbeat and tell the handler."""
        self.last_heard = self.clock.seconds()
        self._no_delay()
        self._beat = LoopingCall(self._tick)
        self._beat.clock = self.clock
        self._beat.start(self.heartbeat, now=False)
        self.handler.connected(self)

    def _no_delay(self) -> None:
        # Messages are small and latency matters: no Nagle delay (under TLS the
        # TCP transport is the wrapper's own transport).
        transport: Any = self.transport
        while transport is not None:
            if hasattr(transport, "setTcpNoDelay"):
                transport.setTcpNoDelay(True)
                return
            transport = getattr(transport, "transport", None)

    def _tick(self) -> None:
        now = self.clock.seconds()
        if now - self.last_heard > self.silence:
            # Anyone can open a connection and stay silent: a bounded log.
            if SyncProtocol._silence_log.allow(now):
                self.log.warn(
                    "sync peer {peer} silent for {seconds:.0f}s: dropped",
                    peer=self.peer(),
                    seconds=now - self.last_heard,
                )
            self.abort()
            return
        self.send(Ping())

    def peer(self) -> str:
        """The peer's address as C{host:port}, for logs."""
        address = self.transport.getPeer() if self.transport is not None else None
        return f"{getattr(address, 'host', '?')}:{getattr(address, 'port', '?')}"

    def dataReceived(self, data: bytes) -> None:
        """Hand every complete message to the handler; close on a protocol error."""
        self.last_heard = self.clock.seconds()
        messages: list[Message] = []
        try:
            for message in self.decoder.feed(data):
                messages.append(message)
                if self.closed:
                    break
                self._dispatch(message)
        except ProtocolError as e:
            self.metrics.refused.labels("protocol").inc()
            self.fail(f"protocol error: {e}")
        finally:
            # Counted once the handler has seen the hello: under the zone's name.
            zone = self.zone or "?"
            self.metrics.octets.labels(zone, "in").inc(len(data))
            for message in messages:
                self.metrics.messages.labels(zone, "in", message.kind.capitalize()).inc()

    def _dispatch(self, message: Message) -> None:
        awaiting = self.handler.awaiting
        if awaiting is not None and message.kind != awaiting:
            self.fail(f"expected {awaiting}, got {message.kind}")
            return
        received = getattr(self.handler, f"{message.kind}_received", None)
        if received is None:
            self.fail(f"unexpected {message.kind} from {self.handler.peer_role}")
            return
        received(self, message)

    def send(self, message: Message) -> None:
        """Send C{message}, unless the connection is closed."""
        if self.closed or self.transport is None:
            return
        data = encode(message)
        self.metrics.octets.labels(self.zone or "?", "out").inc(len(data))
        self.metrics.messages.labels(self.zone or "?", "out", message.kind.capitalize()).inc()
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
        """Close once what was sent is written."""
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.loseConnection()

    def abort(self) -> None:
        """Close now, dropping anything unwritten."""
        self.closed = True
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        """Stop the heartbeat and tell the handler."""
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
        """A protocol around a new handler."""
        return SyncProtocol(
            self.make_handler(), self.clock, self.metrics, self.heartbeat, self.silence
        )
