"""Zone sync on every replica of the global: served by the leader, forwarded by the others.

A replica of the global keeps its zone sync port open for as long as it runs
(L{ZoneSyncPort}).  While it leads, a connection is zone sync itself (over
mutual TLS, or not with C{--insecure}).  While it stands by, each connection is
forwarded to the leader's zone sync port as it is, byte for byte (L{Forward}):
TLS stays between the zone and the leader, which checks the zone's certificate
as ever, so a replica standing by neither holds a key a zone trusts more nor
sees what zones send.  A zone (or a load balancer before the replicas) may
therefore connect to any replica.  With no leader known, a connection is
closed at once, and the zone tries its next address.

The leader's address comes from the leader table (each replica writes how to
reach it when it takes the lead; L{kumazone.store.leader.Contender}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from twisted.internet import protocol
from twisted.internet.interfaces import IAddress, IReactorTCP
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.portforward import ProxyClientFactory, ProxyServer
from twisted.python.failure import Failure

__all__ = ["CONNECT_TIMEOUT", "MAX_FORWARDED", "Forward", "ZoneSyncPort"]

#: Seconds a forwarded connection may take to reach the leader.
CONNECT_TIMEOUT = 5.0
#: Connections forwarded at once; more are closed at once (and counted).
MAX_FORWARDED = 1024


class Forward(ProxyServer):
    """One zone's connection, forwarded to the leader's zone sync port at C{target}."""

    noisy = False
    factory: ZoneSyncPort  # type: ignore[assignment]

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target

    def connectionMade(self) -> None:
        host, port = self.target
        # Nothing is read from the zone before the leader's side is connected.
        self.transport.pauseProducing()
        client = ProxyClientFactory()
        client.noisy = False
        client.setServer(self)
        self.factory.reactor.connectTCP(host, port, client, timeout=CONNECT_TIMEOUT)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.forgotten(self)
        super().connectionLost(reason)

    def abort(self) -> None:
        """Close both sides now, whatever is unsent (a zone or leader not reading)."""
        peer = self.peer
        self.transport.abortConnection()  # type: ignore[attr-defined]
        if peer is not None and peer.transport is not None:
            peer.transport.abortConnection()  # type: ignore[attr-defined]


class ZoneSyncPort(protocol.Factory):
    """The factory of a replica's zone sync port: zone sync while it leads, else forwarding.

    C{leader()} says where the leader's zone sync listens, (host, port), or None.
    """

    log = Logger()
    noisy = False

    def __init__(
        self,
        reactor: IReactorTCP,
        leader: Callable[[], tuple[str, int] | None],
        registry: CollectorRegistry,
        warn: Callable[[str], None],
    ) -> None:
        self.reactor = reactor
        self.leader = leader
        #: Zone sync's factory (TLS wrapped, or not) while this replica leads.
        self.serving: protocol.Factory | None = None
        self._forwarded: set[Forward] = set()
        #: A warning at a bounded rate (the zones set the rate of refusals).
        self._warn = warn
        self.forwarded = Counter(
            "kumazone_kds_forwarded",
            "Zone sync connections a replica standing by forwarded to the leader",
            registry=registry,
        )
        self.refused = Counter(
            "kumazone_kds_forward_refused",
            "Zone sync connections a replica standing by closed at once, by reason",
            ["reason"],
            registry=registry,
        )

    def serve(self, factory: protocol.Factory | None) -> None:
        """Serve zone sync with C{factory} from now (this replica leads), or forward
        (None).  Connections forwarded so far are closed: they went to a leader
        that is no longer one, and their zones connect again."""
        if factory is not None:
            factory.doStart()
        if self.serving is not None:
            self.serving.doStop()
        self.serving = factory
        for forwarded in list(self._forwarded):
            forwarded.abort()

    def check(self) -> None:
        """Close what is forwarded to a replica that no longer leads (another does, or
        none is known): its zones connect again, and reach the leader."""
        found = None if self.serving is not None else self.leader()
        for forwarded in list(self._forwarded):
            if forwarded.target != found:
                forwarded.abort()

    def forgotten(self, forwarded: Forward) -> None:
        self._forwarded.discard(forwarded)

    def buildProtocol(self, addr: IAddress | None) -> Any:
        if self.serving is not None:
            return self.serving.buildProtocol(addr)
        found = self.leader()
        if found is None or len(self._forwarded) >= MAX_FORWARDED:
            # Closed at once: the zone tries its next address.
            if found is None:
                self.refused.labels("no leader").inc()
            else:
                self.refused.labels("full").inc()
                self._warn(f"zone sync: {MAX_FORWARDED} connections forwarded already; refused")
            return None
        made = Forward(found)
        made.factory = self
        self._forwarded.add(made)
        self.forwarded.inc()
        return made

    def stopFactory(self) -> None:
        if self.serving is not None:
            self.serving.doStop()
            self.serving = None

    @staticmethod
    def parse(address: Any) -> tuple[str, int] | None:
        """C{"host:port"} or C{"[v6]:port"} as (host, port), or None if it is not one."""
        if not isinstance(address, str) or ":" not in address:
            return None
        host, _, port = address.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            return None
        return host, int(port)
