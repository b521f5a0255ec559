"""Zone <-> global sync: framing, heartbeats and silence detection.

L{SyncProtocol} frames messages (L{kumazone.core.messages}), sends a heartbeat
every C{heartbeat} seconds and drops a peer silent for C{silence} seconds; it
hands each message to its handler: L{kumazone.sync.global_side.GlobalSession} on
the global, L{kumazone.sync.zone_side.ZoneSync} on a zone.  Time comes from an
injected clock.
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
                self.metrics.messages.labels(zone, "in", message.kind.capitalize()).inc()

    def send(self, message: Message) -> None:
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
