"""Zone <-> global sync: framing, heartbeats, silence detection and dispatch.

L{SyncProtocol} frames messages (L{kumazone.core.messages}), sends a heartbeat
every C{heartbeat} seconds and drops a peer silent for C{silence} seconds; it
hands each message to its handler's method for the message's kind
(C{<kind>_received}): L{kumazone.sync.global_side.GlobalSession} on the global,
L{kumazone.sync.zone_side.ZoneSync} on a zone, and on a zone's dataplane port
L{kumazone.sync.dataplane_side.DataplaneSession} (which writes one change's
frames, encoded once, to many peers: L{SyncProtocol.send_encoded}).  Time comes from an injected
clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import protocol
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from kumazone.core.messages import Error, FrameDecoder, Message, Ping, ProtocolError, encode
from kumazone.core.ratelimit import RateLimiter
from kumazone.sync.metrics import SyncMetrics

__all__ = [
    "CLOSE_GRACE",
    "HEARTBEAT",
    "SILENCE",
    "Handler",
    "SyncCounters",
    "SyncFactory",
    "SyncProtocol",
]

HEARTBEAT = 5.0
SILENCE = 15.0
#: A dataplane link beats more slowly: a zone holds thousands of them, and a
#: heartbeat costs each end a TLS record and a JSON message.
DATAPLANE_HEARTBEAT = 15.0
DATAPLANE_SILENCE = 45.0
#: Seconds a closing connection may take to flush before it is cut.
CLOSE_GRACE = 5.0
#: Octets that may be queued for a peer that does not read, by default.
MAX_PENDING_OCTETS = 32 << 20


class SyncCounters(Protocol):
    """What a L{SyncProtocol} counts in: L{SyncMetrics} has them; so may others.

    C{octets} is labelled (zone, direction), C{messages} (zone, direction, type),
    C{refused} (reason).
    """

    octets: Any
    messages: Any
    refused: Any


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
    #: Closes a peer can cause (one per connection it opens): a bounded log.
    _close_log = RateLimiter(burst=20, interval=60.0)

    def __init__(
        self,
        handler: Handler,
        clock: IReactorTime,
        metrics: SyncMetrics | SyncCounters,
        heartbeat: float = HEARTBEAT,
        silence: float = SILENCE,
        max_pending: int = MAX_PENDING_OCTETS,
    ) -> None:
        """
        @param max_pending: octets that may be written while the peer does not
            read (the transport paused this producer); past them it is dropped,
            as it is when paused for longer than C{silence}.
        """
        self.handler = handler
        self.clock = clock
        self.metrics = metrics
        self.heartbeat = heartbeat
        self.silence = silence
        self.max_pending = max_pending
        self.decoder = FrameDecoder()
        self.zone = ""  # set once known, for metric labels
        self.last_heard = 0.0
        #: When the heartbeat last ran (a late run means this process was busy).
        self._last_tick = 0.0
        self._beat: LoopingCall | None = None
        #: When anything was last sent (a ping is needed only when that is long ago).
        self._last_sent = 0.0
        #: How L{send_encoded} writes (L{_direct_write}, once connected).
        self._write_now: Callable[[bytes], object] = lambda data: None
        self.closed = False
        #: When the transport paused this producer (its peer reads too slowly).
        self.paused_since: float | None = None
        self.pending_octets = 0
        self._cut: IDelayedCall | None = None

    def connectionMade(self) -> None:
        """Start the heartbeat and tell the handler."""
        self._write_now = self._direct_write()
        self.last_heard = self._last_tick = self.clock.seconds()
        self._no_delay()
        self._beat = LoopingCall(self._tick)
        self._beat.clock = self.clock
        self._beat.start(self.heartbeat, now=False)
        register = getattr(self.transport, "registerProducer", None)
        if register is not None:
            register(self, True)
        self.handler.connected(self)

    # -- IPushProducer: the transport says when the peer stops reading ---------

    def pauseProducing(self) -> None:
        """The peer is not reading: note when, and count what is queued from now."""
        if self.paused_since is None:
            self.paused_since = self.clock.seconds()
            self.pending_octets = 0

    def resumeProducing(self) -> None:
        """The peer reads again: the handler may send what it held back."""
        if self.paused_since is None:
            return
        self.paused_since, self.pending_octets = None, 0
        resumed = getattr(self.handler, "resumed", None)
        if resumed is not None and not self.closed:
            resumed(self)

    def stopProducing(self) -> None:
        """The connection is going."""

    @property
    def paused(self) -> bool:
        """Whether the peer has stopped reading what is sent."""
        return self.paused_since is not None

    def _slow_reader(self, why: str) -> None:
        """Drop a peer that does not read: count it, log at a bounded rate, cut."""
        if self.closed:
            return
        self.metrics.refused.labels("slow-reader").inc()
        if SyncProtocol._close_log.allow(self.clock.seconds()):
            self.log.warn(
                "sync peer {peer} ({zone}) dropped: {why}",
                peer=self.peer(),
                zone=self.zone or "unknown zone",
                why=why,
            )
        self.abort()

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
        stalled = now - self._last_tick > 2 * self.heartbeat
        self._last_tick = now
        if stalled:
            # This process itself did not run (a long piece of work, a pause): what
            # the peer sent meanwhile is still unread, so it is not judged silent or
            # slow until the next beat, once the reactor has read its sockets.
            self.send(Ping())
            return
        if self.paused_since is not None and now - self.paused_since > self.silence:
            self._slow_reader(f"read nothing for {now - self.paused_since:.0f}s")
            return
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
        if now - self._last_sent < self.heartbeat / 2:
            return  # the peer heard from us within half a beat: no ping needed
        self.send(Ping())

    def peer(self) -> str:
        """The peer's address as C{host:port}, for logs."""
        address = self.transport.getPeer() if self.transport is not None else None
        return f"{getattr(address, 'host', '?')}:{getattr(address, 'port', '?')}"

    def dataReceived(self, data: bytes) -> None:
        """Hand every complete message to the handler; close on a protocol error."""
        if self.closed:
            return  # closing: what a peer sends now costs nothing
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
        if self.paused_since is not None:
            self.pending_octets += len(data)
            if self.pending_octets > self.max_pending:
                self._slow_reader(f"more than {self.max_pending} octets queued, none read")
                return
        self.metrics.octets.labels(self.zone or "?", "out").inc(len(data))
        self.metrics.messages.labels(self.zone or "?", "out", message.kind.capitalize()).inc()
        self.transport.write(data)
        self._last_sent = self.clock.seconds()

    def _direct_write(self) -> Callable[[bytes], object]:
        """How L{send_encoded} writes: past TLS's small-write aggregation where it can.

        Twisted's TLS transport holds each small write until the next reactor turn,
        through a delayed call per connection: a fan-out to thousands of peers
        would schedule thousands of them.  A fan-out's frame is written at once
        instead, after whatever the aggregation held (so the order is kept).
        """
        transport: Any = self.transport
        aggregator = getattr(transport, "_aggregator", None)
        flush = getattr(aggregator, "flush", None)
        if not isinstance(transport, TLSMemoryBIOProtocol) or flush is None:
            return transport.write

        def write(data: bytes) -> None:
            flush()
            TLSMemoryBIOProtocol.write(transport, data)

        return write

    def send_encoded(self, data: bytes, kind: str, messages: int = 1, count: bool = True) -> bool:
        """Send frames encoded already (the same octets to many peers); False if not sent.

        C{data} holds C{messages} whole frames of kind C{kind}, counted unless
        C{count} is false (a caller writing to many peers counts them at once).
        The bound on what a peer that does not read may have queued applies: past
        it the peer is dropped, and this returns False.
        """
        if self.closed or self.transport is None:
            return False
        if self.paused_since is not None:
            self.pending_octets += len(data)
            if self.pending_octets > self.max_pending:
                self._slow_reader(f"more than {self.max_pending} octets queued, none read")
                return False
        if count:
            self.metrics.octets.labels(self.zone or "?", "out").inc(len(data))
            self.metrics.messages.labels(self.zone or "?", "out", kind.capitalize()).inc(messages)
        self._write_now(data)
        self._last_sent = self.clock.seconds()
        return True

    def fail(self, why: str, log: bool = True) -> None:
        """Tell the peer why, log it (unless the caller did), and close."""
        if log and SyncProtocol._close_log.allow(self.clock.seconds()):
            self.log.warn(
                "sync with {peer} ({zone}) closed: {why}",
                peer=self.peer(),
                zone=self.zone or "unknown zone",
                why=why,
            )
        self.send(Error(why))
        self.close()

    def close(self) -> None:
        """Close once what was sent is written, or after L{CLOSE_GRACE} seconds at most."""
        if not self.closed and self.transport is not None:
            self.closed = True
            unregister = getattr(self.transport, "unregisterProducer", None)
            if unregister is not None:
                unregister()
            self.transport.loseConnection()
            # A peer that does not read would keep a closing connection open.
            self._cut = self.clock.callLater(CLOSE_GRACE, self.abort)

    def abort(self) -> None:
        """Close now, dropping anything unwritten."""
        self.closed = True
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        """Stop the heartbeat and tell the handler."""
        self.closed = True
        if self._cut is not None and self._cut.active():
            self._cut.cancel()
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
        metrics: SyncMetrics | SyncCounters,
        heartbeat: float = HEARTBEAT,
        silence: float = SILENCE,
        max_pending: int = MAX_PENDING_OCTETS,
    ) -> None:
        self.make_handler = make_handler
        self.clock = clock
        self.metrics = metrics
        self.heartbeat = heartbeat
        self.silence = silence
        self.max_pending = max_pending

    def buildProtocol(self, addr: Any) -> SyncProtocol:
        """A protocol around a new handler."""
        return SyncProtocol(
            self.make_handler(),
            self.clock,
            self.metrics,
            self.heartbeat,
            self.silence,
            self.max_pending,
        )
