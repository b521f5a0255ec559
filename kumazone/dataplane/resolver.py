"""The dataplane's DNS server: its mesh's names as the zone answers them, the rest forwarded.

Names in the domain and the VIPs' reverse domains are answered by the zone's own
code (L{MeshAuthority} and the hot path of L{KumaDNSServerFactory}), for the one
mesh the dataplane is in: so an unknown name under the domain is NXDOMAIN, and
AXFR or a class other than IN there is REFUSED, never forwarded.  Any other name,
whatever its type or class, goes to the upstreams (L{Forwarder}) in the octets the
client sent, over the transport it used, and its answer comes back as it came.

The hot path answers from templates and from negative answers it makes; neither
may ever stand for a forwarded name: forwarded answers are not stored, and
L{DataplaneAuthority.negative} says nothing of names outside its domains, so the
hot path leaves them to the factory (a REFUSED learnt for the domain cannot
answer them either).
"""

from __future__ import annotations

from typing import Any

from twisted.names import dns, resolve
from twisted.python.failure import Failure

from kumazone.core.ratelimit import Clock
from kumazone.core.zone import ZoneChange
from kumazone.dataplane.forwarder import Forwarder, servfail_answer
from kumazone.dataplane.metrics import DataplaneMetrics
from kumazone.dns.authority import MeshAuthority, Negative
from kumazone.dns.hotpath import HotCache
from kumazone.dns.server import CLASSIC_UDP_PAYLOAD, KumaDNSServerFactory
from kumazone.metrics import Metrics

__all__ = ["DataplaneAuthority", "DataplaneDNSFactory"]

_Proto = dns.DNSDatagramProtocol | dns.DNSProtocol


class DataplaneAuthority(MeshAuthority):
    """A L{MeshAuthority} that says nothing of the names it does not serve.

    Its L{negative} is None for a name outside the domain and the reverse
    domains, so the hot path never makes a REFUSED for a name to be forwarded.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._apexes = frozenset((self.apex, *self.reverse_apexes))
        self._suffixes = tuple(b"." + apex for apex in self._apexes)

    def ours(self, name: bytes) -> bool:
        """Whether C{name} (lower case, no trailing dot) is in the domain or a reverse domain."""
        return name in self._apexes or name.endswith(self._suffixes)

    def negative(self, name: bytes, qtype: int, qclass: int, mesh: str) -> Negative | None:
        """As L{MeshAuthority.negative} in the domains; None (not known here) outside them."""
        if not self.ours(name):
            return None
        return super().negative(name, qtype, qclass, mesh)


#: The largest UDP payload over IPv4: no answer sent over UDP can be larger.
_MAX_DATAGRAM = 65507


def _udp_limit(message: dns._EDNSMessage) -> int:
    """The most octets the client of C{message} takes over UDP: its EDNS size, or 512."""
    if message.ednsVersion is None:
        return CLASSIC_UDP_PAYLOAD
    return min(_MAX_DATAGRAM, max(CLASSIC_UDP_PAYLOAD, message.maxSize))


class DataplaneDNSFactory(KumaDNSServerFactory):
    """Serves one mesh's names from a L{DataplaneAuthority}, and forwards every other name."""

    authority: DataplaneAuthority

    def __init__(
        self,
        authority: DataplaneAuthority,
        mesh: str,
        metrics: Metrics,
        dp_metrics: DataplaneMetrics,
        forwarder: Forwarder,
        clock: Clock,
    ) -> None:
        """
        @param mesh: the mesh of every client (the dataplane's own).
        @param clock: the reactor (or what stands for it): for the rate of log
            lines and the turns of a TCP connection.
        """
        super().__init__(authority, lambda _address: mesh, metrics, clock)
        self.mesh = mesh
        self.dp_metrics = dp_metrics
        self.forwarder = forwarder
        dp_metrics.count_local(metrics.dns)

    def set_authority(self, authority: DataplaneAuthority) -> None:
        """Serve C{authority} from now on (the dataplane's configuration changed), a fresh cache."""
        self.authority = authority
        self.resolver = resolve.ResolverChain([authority])
        self.hot = HotCache(
            authority=authority, cell=lambda qtype, rcode: self.stats.cell(qtype, rcode, "udp")
        )

    def apply(self, change: ZoneChange) -> None:
        """Serve the table after C{change}: the authority first, then the answers it touched go."""
        self.authority.apply(change)
        self.hot.apply(change)

    # -- input ------------------------------------------------------------------

    def _answer(
        self, message: Any, proto: _Proto, address: tuple[str, int] | None, data: bytes
    ) -> None:
        """Keep the octets the client sent with the parsed query: they are what is forwarded."""
        message.raw = data
        super()._answer(message, proto, address, data)

    def handleQuery(
        self,
        message: dns._EDNSMessage,
        protocol: _Proto,
        address: tuple[str, int] | None,
    ) -> None:
        """Forward a query for a name outside the domains; answer any other as the zone does."""
        raw = getattr(message, "raw", None)
        if raw is not None:
            name = message.queries[0].name.name.lower().rstrip(b".")
            if not self.authority.ours(name):
                self._forward(raw, message, protocol, address)
                return
        super().handleQuery(message, protocol, address)

    # -- forwarding -------------------------------------------------------------

    def _forward(
        self,
        raw: bytes,
        message: dns._EDNSMessage,
        protocol: _Proto,
        address: tuple[str, int] | None,
    ) -> None:
        """Hand C{raw} to the upstreams over the client's transport; send back what comes."""
        self.dp_metrics.forwarded()
        tcp = address is None
        answer = self.forwarder.forward(raw, tcp, None if tcp else _udp_limit(message))
        answer.addCallback(self._forwarded, protocol, address)
        answer.addErrback(self._forward_failed, raw, protocol, address)

    def _forwarded(self, answer: bytes, protocol: _Proto, address: tuple[str, int] | None) -> None:
        """Send an upstream's answer (or the SERVFAIL) to the client, if it is still there."""
        if not answer:
            return
        if address is None and getattr(protocol, "_gone", False):
            return  # the TCP connection went while the upstreams were asked
        self._write(protocol, answer, address)

    def _forward_failed(
        self, failure: Failure, raw: bytes, protocol: _Proto, address: tuple[str, int] | None
    ) -> None:
        """A bug of ours on the way: SERVFAIL, and a bounded log."""
        self.limited_log(f"forwarding a query failed: {failure.getErrorMessage()}")
        try:
            self._forwarded(servfail_answer(raw), protocol, address)
        except Exception as e:
            self.limited_log(f"answering a forwarded query failed: {type(e).__name__}: {e}")
