"""The DNS server: twisted.names' L{DNSServerFactory} around the zone authority.

What twisted.names leaves out and kumazone adds: FORMERR for malformed queries
(silence when not even the header can be read), the SOA in the authority section
of NXDOMAIN and NODATA answers, EDNS0 answered per RFC 6891 (OPT echoed only when
the query had one, BADVERS for versions above 0), UDP answers truncated by whole
records with TC set, the client's mesh chosen by its source address, and metrics.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from twisted.logger import Logger
from twisted.names import dns, server
from twisted.names.error import DomainError
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from kumazone.core.ratelimit import Clock, RateLimiter, limited
from kumazone.dns.authority import MeshAuthority, NameNotFound, Result
from kumazone.dns.hotpath import HotCache, HotKey, encode_message, hot_key
from kumazone.metrics import Metrics

__all__ = [
    "MAX_UDP_PAYLOAD",
    "KumaDNSDatagramProtocol",
    "KumaDNSProtocol",
    "KumaDNSServerFactory",
    "encode_response",
]

#: Our EDNS0 UDP payload size (the 2020 DNS flag day value).
MAX_UDP_PAYLOAD = 1232
#: Without EDNS0, a UDP answer is at most 512 octets (RFC 1035).
CLASSIC_UDP_PAYLOAD = 512
TCP_IDLE_TIMEOUT = 30
MAX_TCP_CONNECTIONS = 512
#: UDP socket buffers asked for (NSD asks for about as much).
SOCKET_BUFFER = 4 * 1024 * 1024

_HEADER = struct.Struct("!HHHHHH")

#: Either of the two protocols that feed the factory.
_Proto = dns.DNSDatagramProtocol | dns.DNSProtocol


class _Query(dns._EDNSMessage):
    """A received query, with the time it arrived and its hot-path key."""

    timeReceived: float
    hot: tuple[HotKey, int, bytes] | None = None


def _peer_host(proto: _Proto, address: tuple[str, int] | None) -> str:
    """The client's address: from the datagram, or from the TCP connection."""
    if address is not None:
        return address[0]
    return str(getattr(cast(Any, proto.transport).getPeer(), "host", ""))


def _name_end(data: bytes, start: int) -> int:
    """Where the name at C{start} ends; raises ValueError for anything malformed.

    Compression pointers must point strictly backwards (so they cannot loop);
    labels of the reserved types, labels holding a dot and names over 255 octets
    are refused.
    """
    position, total, end = start, 0, None
    while True:
        if position >= len(data):
            raise ValueError("a name runs past the end of the packet")
        length = data[position]
        if length & 0xC0 == 0xC0:
            if position + 1 >= len(data):
                raise ValueError("a compression pointer is cut off")
            target = ((length & 0x3F) << 8) | data[position + 1]
            if target >= position:
                raise ValueError("a compression pointer does not point backwards")
            if end is None:
                end = position + 2
            position = target
            continue
        if length & 0xC0:
            raise ValueError(f"label type {length >> 6:#x} is not supported")
        if length == 0:
            total += 1
            if total > 255:
                raise ValueError("a name is over 255 octets")
            return end if end is not None else position + 1
        label = data[position + 1 : position + 1 + length]
        if len(label) < length:
            raise ValueError("a label runs past the end of the packet")
        if b"." in label:
            raise ValueError("a label holds a '.'")
        total += length + 1
        if total > 255:
            raise ValueError("a name is over 255 octets")
        position += 1 + length


def wire_problem(data: bytes) -> str | None:
    """Why C{data} is not a well-formed DNS message, or None.

    twisted.names' parser is lenient (it ignores missing records and trailing
    octets); a query must pass this walk of every section first.
    """
    if len(data) < _HEADER.size:
        return "shorter than a DNS header"
    questions, answers, authority, additional = struct.unpack_from("!HHHH", data, 4)
    offset = _HEADER.size
    try:
        for _ in range(questions):
            offset = _name_end(data, offset) + 4
            if offset > len(data):
                raise ValueError("a question is cut off")
        for _ in range(answers + authority + additional):
            offset = _name_end(data, offset)
            if offset + 10 > len(data):
                raise ValueError("a record header is cut off")
            (rdlength,) = struct.unpack_from("!H", data, offset + 8)
            offset += 10 + rdlength
            if offset > len(data):
                raise ValueError("record data runs past the end of the packet")
    except ValueError as e:
        return str(e)
    if offset != len(data):
        return f"{len(data) - offset} octets after the last record"
    return None


def formerr_for(data: bytes) -> bytes | None:
    """A FORMERR answer built from a raw packet's header, or None to stay silent.

    Silent when the header cannot be read or the packet is itself a response.
    """
    if len(data) < _HEADER.size:
        return None
    message_id, flags = struct.unpack("!HH", data[:4])
    if flags & 0x8000:
        return None
    opcode = (flags >> 11) & 0xF
    recursion_desired = flags & 0x0100
    return _HEADER.pack(
        message_id, 0x8000 | (opcode << 11) | recursion_desired | dns.EFORMAT, 0, 0, 0, 0
    )


def _wire(response: dns._EDNSMessage) -> bytes:
    """Encode without twisted.names' own truncation.

    L{dns.Message.encode} cuts the body at C{maxSize} octets (512 by default)
    mid-record and leaves the counts as they were; we size answers ourselves,
    and compress names case-insensitively (see L{kumazone.hotpath}).
    """
    return encode_message(response._toMessage())


def encode_response(response: dns._EDNSMessage, limit: int | None) -> tuple[bytes, bool]:
    """Encode C{response} to at most C{limit} octets, dropping whole records.

    Additional records go first (without TC, RFC 2181 9), then authority and
    answer records from the end, with TC set.  Returns the bytes and whether TC
    was set.
    """
    data = _wire(response)
    if limit is None or len(data) <= limit:
        return data, False
    trimmed = dns._EDNSMessage(
        id=response.id,
        answer=response.answer,
        opCode=response.opCode,
        auth=response.auth,
        recDes=response.recDes,
        recAv=response.recAv,
        rCode=response.rCode,
        ednsVersion=response.ednsVersion,
        dnssecOK=response.dnssecOK,
        maxSize=response.maxSize,
        queries=response.queries[:],
        answers=response.answers[:],
        authority=response.authority[:],
        additional=response.additional[:],
    )
    while trimmed.additional:
        trimmed.additional.pop()
        data = _wire(trimmed)
        if len(data) <= limit:
            return data, False
    trimmed.trunc = True
    while trimmed.authority or trimmed.answers:
        (trimmed.authority or trimmed.answers).pop()
        data = _wire(trimmed)
        if len(data) <= limit:
            return data, True
    if len(data) > limit:
        # The question alone does not fit (a 255-octet name in 512 octets cannot
        # happen, but a header is always possible).
        trimmed.queries = []
        data = _wire(trimmed)
    return data, True


class KumaDNSDatagramProtocol(dns.DNSDatagramProtocol):
    """UDP: hands every datagram, parsed or not, to the factory."""

    controller: KumaDNSServerFactory
    noisy = False
    _sendto: Callable[[bytes, tuple[str, int]], int]

    def startProtocol(self) -> None:
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
        known = hot.exact.get(mesh)
        if known is not None and len(data) > 12 and not data[2] & 0xFE:
            seen = known.get(data[4:])
            if seen is not None:
                template, counter = seen
                counter[0] += 1
                return data[:2] + bytes((template[2] | (data[2] & 0x01),)) + template[3:]
        found = hot_key(data, mesh)
        if found is None:
            return None
        entry = hot.templates.get(found[0])
        if entry is None:
            return None
        template, counter = entry
        answer = HotCache.answer(template, data, found[1])
        hot.remember(data, mesh, answer, counter)
        counter[0] += 1
        return answer


class KumaDNSProtocol(dns.DNSProtocol, TimeoutMixin):
    """TCP: length-prefixed messages, closed after an idle period (RFC 7766)."""

    controller: KumaDNSServerFactory

    def connectionMade(self) -> None:
        super().connectionMade()
        self.setTimeout(TCP_IDLE_TIMEOUT)

    def stringReceived(self, data: bytes) -> None:
        self.resetTimeout()
        self.controller.packetReceived(data, self, None)

    def timeoutConnection(self) -> None:
        cast(Any, self.transport).loseConnection()


class _Monotonic:
    """The default clock of the DNS server: monotonic seconds."""

    seconds = staticmethod(time.monotonic)


_MONOTONIC = _Monotonic()


class KumaDNSServerFactory(server.DNSServerFactory):
    """Serves the zone authority over UDP and TCP."""

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
        super().__init__(authorities=[authority])
        self.authority = authority
        self.mesh_of = mesh_of
        self.metrics = metrics
        #: Bound once: answers are timed on the hot path.
        self.seconds = clock.seconds
        self.stats = metrics.dns
        #: Responses for common UDP queries, emptied whenever the table changes.
        self.hot = HotCache()
        self.limited_log = limited(
            RateLimiter(burst=10, interval=60.0), clock, lambda line: self.log.warn(line)
        )

    def buildProtocol(self, addr: object) -> KumaDNSProtocol | None:
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

        C{hot} is the packet's hot-path key when it has one: the answer then
        becomes the template for later queries with that key.
        """
        started = time.perf_counter()
        transport = "udp" if address is not None else "tcp"
        problem = wire_problem(data)
        if problem is not None:
            self._malformed(data, proto, address, transport, problem)
            return
        try:
            plain = dns.Message()
            plain.fromStr(data)
            opt_records = sum(1 for r in plain.additional if r.type == dns.OPT)
            if any(r.type == dns.OPT and r.name.name for r in plain.additional):
                raise ValueError("an OPT record whose owner is not the root (RFC 6891)")
            message = _Query._fromMessage(plain)
        except Exception as e:
            self._malformed(data, proto, address, transport, f"{type(e).__name__}: {e}")
            return
        if message.answer:
            return  # a response sent to us: never answer one (no loops)
        message.timeReceived = started
        message.hot = (hot[0], hot[1], data) if hot is not None else None
        if opt_records > 1 or message.answers or message.authority or message.additional:
            # A query carries its question and at most one OPT record; we take no
            # TSIG, and records elsewhere would be answered as if they were not there.
            self.metrics.malformed.labels(transport).inc()
            self._reply(proto, message, address, dns.EFORMAT)
            return
        if len(message.queries) != 1:
            self._reply(proto, message, address, dns.EFORMAT)
            return
        try:
            self.messageReceived(message, proto, address)
        except Exception as e:
            # A bug of ours, not the client's: SERVFAIL, and a bounded log.
            self.limited_log(f"answering a query failed: {type(e).__name__}: {e}")
            try:
                self._reply(proto, message, address, dns.ESERVER)
            except Exception:
                answer = formerr_for(data)
                if answer is not None:
                    self._write(
                        proto,
                        answer[:3] + bytes((answer[3] & 0xF0 | dns.ESERVER,)) + answer[4:],
                        address,
                    )

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

    def _malformed(
        self,
        data: bytes,
        proto: _Proto,
        address: tuple[str, int] | None,
        transport: str,
        why: str,
    ) -> None:
        self.metrics.malformed.labels(transport).inc()
        peer = _peer_host(proto, address)
        self.limited_log(f"malformed DNS packet ({len(data)} octets) from {peer}: {why}")
        answer = formerr_for(data)
        if answer is not None:
            self._count_query(0, dns.EFORMAT, transport)
            self._write(proto, answer, address)

    def handleQuery(
        self,
        message: dns._EDNSMessage,
        protocol: _Proto,
        address: tuple[str, int] | None,
    ) -> None:
        if message.ednsVersion is not None and message.ednsVersion > 0:
            self._reply(protocol, message, address, dns.EBADVERSION)
            return
        hot = getattr(message, "hot", None)
        # A query with a hot-path key is answered for the mesh in its key, so that
        # its answer can only become the template of that mesh.
        mesh = hot[0][3] if hot is not None else self.mesh_of(_peer_host(protocol, address))
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
        answers, authority, additional = response
        self._reply(protocol, message, address, dns.OK, answers, authority, additional, True)

    def gotResolverError(
        self,
        failure: Failure,
        protocol: _Proto,
        message: dns._EDNSMessage,
        address: tuple[str, int] | None,
    ) -> None:
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
        edns = message.ednsVersion is not None
        response = dns._EDNSMessage(
            id=message.id,
            answer=True,
            opCode=message.opCode,
            auth=authoritative,
            recDes=message.recDes,
            recAv=False,
            rCode=rcode,
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
        if address is None:
            limit = None
        elif edns:
            limit = max(CLASSIC_UDP_PAYLOAD, min(message.maxSize, MAX_UDP_PAYLOAD))
        else:
            limit = CLASSIC_UDP_PAYLOAD
        data, truncated = encode_response(response, limit)
        if truncated:
            self.metrics.truncated.inc()
        qtype = message.queries[0].type if message.queries else 0
        transport = "udp" if address is not None else "tcp"
        counter = self._count_query(qtype, rcode, transport)
        hot = getattr(message, "hot", None)
        if hot is not None and not truncated:
            self.hot.store(hot[0], hot[1], hot[2], data, counter)
        started = getattr(message, "timeReceived", None)
        if started is not None:
            self.stats.observe(time.perf_counter() - started)
        self._write(proto, data, address)

    def _count_query(self, qtype: int, rcode: int, transport: str) -> list[int]:
        cell = self.stats.cell(qtype, rcode, transport)
        cell[0] += 1
        return cell

    def _write(
        self,
        proto: _Proto,
        data: bytes,
        address: tuple[str, int] | None,
    ) -> None:
        if address is not None:
            try:
                cast(KumaDNSDatagramProtocol, proto)._sendto(data, address)
            except OSError:
                self.metrics.send_errors.inc()
        else:
            cast(dns.DNSProtocol, proto).sendString(data)
