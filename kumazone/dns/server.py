"""The DNS server: twisted.names' L{DNSServerFactory} around the L{MeshAuthority}.

What twisted.names leaves out and kumazone adds: FORMERR for malformed queries
(silence when not even the header can be read), the SOA in the authority section
of NXDOMAIN and NODATA answers, EDNS0 answered per RFC 6891 (OPT echoed only when
the query had one, BADVERS for versions above 0), UDP answers truncated by whole
records with TC set, the client's mesh chosen by its source address, and metrics.
The wire checks and the encoder are in L{kumazone.dns.wire}; the pre-encoded
answers in L{kumazone.dns.hotpath}.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.names import dns, server
from twisted.names.error import DomainError
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from kumazone.core.ratelimit import Clock, RateLimiter, limited
from kumazone.dns.authority import MeshAuthority, NameNotFound, Result
from kumazone.dns.hotpath import HotCache, HotKey, HotQuery, answer_from, hot_key
from kumazone.dns.wire import Screened, encode_response, formerr_for, screen, servfail_for
from kumazone.metrics import Metrics

__all__ = [
    "MAX_UDP_PAYLOAD",
    "KumaDNSDatagramProtocol",
    "KumaDNSProtocol",
    "KumaDNSServerFactory",
]

#: Our EDNS0 UDP payload size (the 2020 DNS flag day value).
MAX_UDP_PAYLOAD = 1232
#: Without EDNS0, a UDP answer is at most 512 octets (RFC 1035).
CLASSIC_UDP_PAYLOAD = 512
TCP_IDLE_TIMEOUT = 30
MAX_TCP_CONNECTIONS = 512
#: UDP socket buffers asked for (NSD asks for about as much).
SOCKET_BUFFER = 4 * 1024 * 1024

#: Either of the two protocols that feed the factory.
_Proto = dns.DNSDatagramProtocol | dns.DNSProtocol


class _Query(dns._EDNSMessage):
    """A received query, with the time it arrived and, if it has one, its hot-path key."""

    timeReceived: float
    hot: HotQuery | None = None


def _peer_host(proto: _Proto, address: tuple[str, int] | None) -> str:
    """The client's address: from the datagram, or from the TCP connection."""
    if address is not None:
        return address[0]
    return str(getattr(cast(Any, proto.transport).getPeer(), "host", ""))


def _parse(data: bytes) -> _Query | str:
    """C{data}, screened by L{screen} already, as a message; or why it is malformed."""
    try:
        plain = dns.Message()
        plain.fromStr(data)
        return _Query._fromMessage(plain)
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def _response(
    message: dns._EDNSMessage,
    rcode: int,
    answers: Sequence[dns.RRHeader],
    authority: Sequence[dns.RRHeader],
    additional: Sequence[dns.RRHeader],
    authoritative: bool,
) -> dns._EDNSMessage:
    """The response to C{message}: its ID, opcode, RD, CD and question; EDNS0 if it had EDNS.

    CD is copied (RFC 6840 5.9); AD stays clear: nothing here is DNSSEC-validated.
    """
    edns = message.ednsVersion is not None
    response = dns._EDNSMessage(
        id=message.id,
        answer=True,
        opCode=message.opCode,
        auth=authoritative,
        recDes=message.recDes,
        recAv=False,
        rCode=rcode,
        authenticData=False,
        checkingDisabled=message.checkingDisabled,
        ednsVersion=0 if edns else None,
        dnssecOK=message.dnssecOK,
        maxSize=MAX_UDP_PAYLOAD,
        queries=message.queries[:],
        answers=list(answers),
        authority=list(authority),
        additional=list(additional),
    )
    if rcode == dns.EFORMAT and len(message.queries) != 1:
        response.queries = []
    return response


def _size_limit(message: dns._EDNSMessage, address: tuple[str, int] | None) -> int | None:
    """The most octets an answer to C{message} may take: None over TCP."""
    if address is None:
        return None
    if message.ednsVersion is not None:
        return max(CLASSIC_UDP_PAYLOAD, min(message.maxSize, MAX_UDP_PAYLOAD))
    return CLASSIC_UDP_PAYLOAD


class KumaDNSDatagramProtocol(dns.DNSDatagramProtocol):
    """UDP: answers from the hot path, and hands every other datagram to the factory."""

    controller: KumaDNSServerFactory
    noisy = False
    _sendto: Callable[[bytes, tuple[str, int]], int]

    def startProtocol(self) -> None:
        """Enlarge the socket's buffers, and keep its C{sendto} for the hot path."""
        sock = cast(Any, self.transport).socket
        # A burst of queries must wait in the kernel, not be dropped: ask for a
        # few megabytes (the kernel caps it at net.core.rmem_max).
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            except OSError:
                pass
        # The hot path writes to the socket itself: the port's write() checks
        # the address's syntax twice per datagram, which costs more than the answer.
        self._sendto = sock.sendto

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        """Answer one datagram: from the hot path if it can, else through the factory."""
        controller = self.controller
        stats = controller.stats
        # Reading the clock can be a system call (on VMs without a usable TSC),
        # as costly as the answer itself: the hot path times one query in 16.
        stats.ticks += 1
        started = 0.0 if stats.ticks & 15 else time.perf_counter()
        mesh = controller.mesh_of(addr[0])
        answer = self.hot_answer(data, mesh)
        if answer is None:
            controller.packetReceived(data, self, addr, hot_key(data, mesh))
            return
        stats.hot_answers += 1
        try:
            self._sendto(answer, addr)
        except OSError:
            # A full send buffer or an unreachable client: the client retries.
            controller.metrics.send_errors.inc()
            return
        if started:
            stats.observe(time.perf_counter() - started)

    def hot_answer(self, data: bytes, mesh: str) -> bytes | None:
        """The hot path's answer to C{data} from a client in C{mesh}, counted; or None."""
        hot = self.controller.hot
        if len(data) > 12 and not data[2] & 0xFE:
            octets = data[4:]
            known = hot.exact.get(mesh)
            seen = None if known is None else known.get(octets)
            if seen is None:
                negatives = hot.negatives.get(mesh)
                if negatives is not None:
                    seen = negatives.get(octets)
            if seen is not None:
                template, counter = seen
                counter[0] += 1
                return answer_from(template, data)
        return self.template_answer(data, mesh)

    def template_answer(self, data: bytes, mesh: str) -> bytes | None:
        """The answer to C{data} from its key's template, or a negative answer, counted; or None.

        An answer from a template is also kept for queries in exactly C{data}'s octets.
        """
        found = hot_key(data, mesh)
        if found is None:
            return None
        key, end = found
        hot = self.controller.hot
        entry = hot.templates.get(key)
        if entry is None:
            # Never kept by name: a flood of random names leaves the templates be.
            negative = hot.negative(data, key, end)
            if negative is None:
                return None
            hot.remember_negative(data, mesh, *negative)
            return negative[0]
        template, counter = entry
        answer = HotCache.answer(template, data, end)
        hot.remember(data, key, answer, counter)
        counter[0] += 1
        return answer


class KumaDNSProtocol(dns.DNSProtocol, TimeoutMixin):
    """TCP: length-prefixed messages, closed after an idle period (RFC 7766).

    The protocol is the push producer of its own answers: when the transport's
    write buffer fills (a client that sends and does not read), the transport
    pauses it, it stops reading, and the messages already read wait unparsed
    until the buffer drains; so what one connection holds stays bounded (one
    read of queries and one write buffer of answers), and the kernel's socket
    buffers, then TCP's window, hold the rest.
    """

    controller: KumaDNSServerFactory
    #: Messages of one read answered in one turn of the reactor; the rest of the
    #: read waits for the next turn, so a read of 64 KB of costly queries cannot
    #: hold every other client (UDP, the API, sync) for its whole length.
    MESSAGES_PER_TURN = 8
    _this_turn = 0
    #: Paused by the transport (its write buffer is full) / until the next turn.
    _held = False
    _yielding = False
    _gone = False

    def connectionMade(self) -> None:
        """Start the idle timer, and take part in the transport's flow control."""
        super().connectionMade()
        cast(Any, self.transport).registerProducer(self, True)
        self.setTimeout(TCP_IDLE_TIMEOUT)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Stop the idle timer and tell the factory."""
        self._gone = True
        self.setTimeout(None)
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        """A read (or a resumption): a new turn, with its own budget of messages."""
        self._this_turn = 0
        super().dataReceived(data)

    def pauseProducing(self) -> None:
        """The transport's write buffer is full: stop reading until it drains."""
        self._held = True
        super().pauseProducing()

    def resumeProducing(self) -> None:
        """The write buffer drained: read again (unless waiting for the next turn)."""
        self._held = False
        if not self._yielding:
            super().resumeProducing()

    def stringReceived(self, data: bytes) -> None:
        """Hand one message to the factory; past the turn's budget, wait for the next turn."""
        self.resetTimeout()
        self._this_turn += 1
        if self._this_turn >= self.MESSAGES_PER_TURN and not self._yielding:
            self._yielding = True
            super().pauseProducing()  # this message is the turn's last
            call_later = getattr(self.controller.clock, "callLater", None)
            if call_later is None:
                from twisted.internet import reactor as call_later_from

                call_later = cast(Any, call_later_from).callLater
            call_later(0, self._next_turn)
        self.controller.packetReceived(data, self, None)

    def _next_turn(self) -> None:
        self._yielding = False
        if not self._gone and not self._held:
            super().resumeProducing()

    def timeoutConnection(self) -> None:
        """Drop an idle connection, answers not yet read included.

        An abort rather than a close: a close waits for the write buffer to be
        read, which a client that never reads never does.
        """
        cast(Any, self.transport).abortConnection()


class _Monotonic:
    """The default clock of the DNS server: monotonic seconds."""

    seconds = staticmethod(time.monotonic)


_MONOTONIC = _Monotonic()


class KumaDNSServerFactory(server.DNSServerFactory):
    """Serves a L{MeshAuthority} over UDP and TCP, each client the answers of its mesh."""

    protocol = KumaDNSProtocol
    _messageFactory = dns._EDNSMessage  # type: ignore[assignment]
    log = Logger()
    noisy = False

    def __init__(
        self,
        authority: MeshAuthority,
        mesh_of: Callable[[str], str],
        metrics: Metrics,
        clock: Clock = _MONOTONIC,
    ) -> None:
        """
        @param mesh_of: the mesh of a client, from its address.
        @param clock: what the rate of log lines is measured by (answer latency is
            measured by C{time.perf_counter}, a stopwatch whatever the clock is).
        """
        super().__init__(authorities=[authority])
        self.authority = authority
        self.mesh_of = mesh_of
        self.metrics = metrics
        self.clock = clock
        self.stats = metrics.dns
        #: Responses for common UDP queries; L{HotCache.apply} after each change.
        self.hot = HotCache(
            authority=authority, cell=lambda qtype, rcode: self.stats.cell(qtype, rcode, "udp")
        )
        self.limited_log = limited(
            RateLimiter(burst=10, interval=60.0), clock, lambda line: self.log.warn(line)
        )

    def buildProtocol(self, addr: object) -> KumaDNSProtocol | None:
        """A TCP protocol, or None (refused) when too many connections are open."""
        if len(self.connections) >= MAX_TCP_CONNECTIONS:
            # Each idle connection holds a descriptor for TCP_IDLE_TIMEOUT seconds.
            self.metrics.tcp_refused.inc()
            self.limited_log(f"DNS over TCP: {MAX_TCP_CONNECTIONS} connections open; refused")
            return None
        return self.protocol(self)

    # -- input ------------------------------------------------------------------

    def packetReceived(
        self,
        data: bytes,
        proto: _Proto,
        address: tuple[str, int] | None,
        hot: tuple[HotKey, int] | None = None,
    ) -> None:
        """Parse one packet and answer it; never raises.

        @param address: the client's, for UDP; None for TCP.
        @param hot: the packet's hot-path key and where its name ends, when it has
            one: the answer then becomes the template for later queries with that key.
        """
        started = time.perf_counter()
        transport = "udp" if address is not None else "tcp"
        screened = screen(data)
        if screened.parse is None:
            self._screened_out(data, proto, address, transport, screened)
            return
        parsed = _parse(screened.parse)
        if isinstance(parsed, str):
            self._malformed(data, proto, address, transport, parsed)
            return
        message = parsed
        message.timeReceived = started
        if hot is not None:
            key, end = hot
            message.hot = HotQuery(key, end, data)
        self._answer(message, proto, address, data)

    def _screened_out(
        self,
        data: bytes,
        proto: _Proto,
        address: tuple[str, int] | None,
        transport: str,
        screened: Screened,
    ) -> None:
        """Send (or not) the answer the wire check gave; count and log a malformed packet."""
        if screened.problem is not None:
            self._malformed(data, proto, address, transport, screened.problem)
            return
        if screened.answer is not None:
            self._count_query(0, screened.answer[3] & 0x0F, transport)
            self._write(proto, screened.answer, address)

    def _malformed(
        self,
        data: bytes,
        proto: _Proto,
        address: tuple[str, int] | None,
        transport: str,
        why: str,
    ) -> None:
        """Count and log a packet that cannot be parsed; FORMERR if its header can be read."""
        self.metrics.malformed.labels(transport).inc()
        peer = _peer_host(proto, address)
        self.limited_log(f"malformed DNS packet ({len(data)} octets) from {peer}: {why}")
        answer = formerr_for(data)
        if answer is not None:
            self._count_query(0, dns.EFORMAT, transport)
            self._write(proto, answer, address)

    def _answer(
        self, message: _Query, proto: _Proto, address: tuple[str, int] | None, data: bytes
    ) -> None:
        """Answer a well-formed query (C{data}, parsed); SERVFAIL on a bug of ours."""
        try:
            self.messageReceived(message, proto, address)
        except Exception as e:
            # A bug of ours, not the client's: SERVFAIL, and a bounded log.
            self.limited_log(f"answering a query failed: {type(e).__name__}: {e}")
            try:
                self._reply(proto, message, address, dns.ESERVER)
            except Exception:
                answer = servfail_for(data)
                if answer is not None:
                    self._write(proto, answer, address)

    def messageReceived(
        self,
        message: _Query,
        proto: _Proto,
        address: tuple[str, int] | None = None,
    ) -> None:
        """Dispatch a parsed query by opcode (only QUERY is implemented)."""
        if message.opCode == dns.OP_QUERY:
            self.handleQuery(message, proto, address)
        else:
            self._reply(proto, message, address, dns.ENOTIMP)

    def handleQuery(
        self,
        message: dns._EDNSMessage,
        protocol: _Proto,
        address: tuple[str, int] | None,
    ) -> None:
        """Answer a QUERY from the authority, for the client's mesh."""
        if message.ednsVersion is not None and message.ednsVersion > 0:
            self._reply(protocol, message, address, dns.EBADVERSION)
            return
        hot = getattr(message, "hot", None)
        # A query with a hot-path key is answered for the mesh in its key, so that
        # its answer can only become the template of that mesh.
        mesh = hot.mesh if hot is not None else self.mesh_of(_peer_host(protocol, address))
        query = message.queries[0]
        # The authority answers synchronously: call it directly rather than
        # through a Deferred (IResolver.query remains for other callers).
        try:
            result = self.authority.resolve(query.name.name, query.type, query.cls, mesh)
        except Exception:
            self.gotResolverError(Failure(), protocol, message, address)
        else:
            self.gotResolverResponse(result, protocol, message, address)

    # -- output -----------------------------------------------------------------

    def gotResolverResponse(
        self,
        response: Result,
        protocol: _Proto,
        message: dns._EDNSMessage,
        address: tuple[str, int] | None,
    ) -> None:
        """Send the authority's records, authoritatively."""
        answers, authority, additional = response
        self._reply(protocol, message, address, dns.OK, answers, authority, additional, True)

    def gotResolverError(
        self,
        failure: Failure,
        protocol: _Proto,
        message: dns._EDNSMessage,
        address: tuple[str, int] | None,
    ) -> None:
        """Send NXDOMAIN with the SOA, REFUSED for names not ours, or SERVFAIL."""
        if failure.check(NameNotFound):
            authority = failure.value.authority  # type: ignore[union-attr]
            self._reply(protocol, message, address, dns.ENAME, [], authority, [], True)
        elif failure.check(DomainError):
            self._reply(protocol, message, address, dns.EREFUSED)
        else:
            self.limited_log(f"DNS lookup failed: {failure.getErrorMessage()}")
            self._reply(protocol, message, address, dns.ESERVER)

    def _reply(
        self,
        proto: _Proto,
        message: dns._EDNSMessage,
        address: tuple[str, int] | None,
        rcode: int,
        answers: Sequence[dns.RRHeader] = (),
        authority: Sequence[dns.RRHeader] = (),
        additional: Sequence[dns.RRHeader] = (),
        authoritative: bool = False,
    ) -> None:
        """Send the response to C{message}, truncated to what the client can receive."""
        response = _response(message, rcode, answers, authority, additional, authoritative)
        data, truncated = encode_response(response, _size_limit(message, address))
        if truncated:
            self.metrics.truncated.inc()
        self._account(message, address, rcode, data, truncated)
        self._write(proto, data, address)

    def _account(
        self,
        message: dns._EDNSMessage,
        address: tuple[str, int] | None,
        rcode: int,
        data: bytes,
        truncated: bool,
    ) -> None:
        """Count the answer C{data} to C{message}, keep it as a template if it can be, time it."""
        qtype = message.queries[0].type if message.queries else 0
        transport = "udp" if address is not None else "tcp"
        counter = self._count_query(qtype, rcode, transport)
        hot = getattr(message, "hot", None)
        if hot is not None and not truncated:
            self.hot.store(hot, data, counter)
        started = getattr(message, "timeReceived", None)
        if started is not None:
            self.stats.observe(time.perf_counter() - started)

    def _count_query(self, qtype: int, rcode: int, transport: str) -> list[int]:
        """Count one answer; the counter, for the hot path to count its copies in."""
        cell = self.stats.cell(qtype, rcode, transport)
        cell[0] += 1
        return cell

    def _write(
        self,
        proto: _Proto,
        data: bytes,
        address: tuple[str, int] | None,
    ) -> None:
        """Send C{data}: to C{address} over UDP (a failure counted), else over TCP."""
        if address is not None:
            try:
                cast(KumaDNSDatagramProtocol, proto)._sendto(data, address)
            except OSError:
                self.metrics.send_errors.inc()
        else:
            cast(dns.DNSProtocol, proto).sendString(data)
