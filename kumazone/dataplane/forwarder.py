"""Forwarding to the nameservers of resolv.conf: in order, with failover, over TCP when truncated.

A client's query goes to the upstreams as it came, but for a fresh random ID
per upstream query; the answer comes back as it came, but for the client's ID.
Each upstream query over UDP has a connected socket of its own (so a random
source port, and the kernel drops datagrams from any other address); an answer
must also match the ID and the question (case-insensitively), else it is
ignored and counted as spoofed.  Upstreams are tried in resolv.conf's order,
twice as glibc does (the second round for those that timed out, with twice the
time); an upstream that answers SERVFAIL or REFUSED, or cannot be reached, is
left for the next one at once.  A timed-out query's socket stays open until
the client's query is done: a late answer is still taken.

When no upstream gives a usable answer within the budget, the client gets the
first SERVFAIL or REFUSED an upstream gave, or else a SERVFAIL made here.

Twisted's connected UDP port is not used: it drops an IPv6 address's scope
(C{fe80::1%eth0}), and costs a port object per query; the sockets here are
plain non-blocking ones read by the reactor (L{IReadDescriptor}).
"""

from __future__ import annotations

# getaddrinfo encodes a host name with the "idna" codec, imported on first use: here,
# before twistd's -u/-g switch, since the user it switches to may not read Python's
# own files.
import encodings.idna  # noqa: F401
import errno
import ipaddress
import math
import os
import secrets
import socket
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReadDescriptor
from twisted.internet.protocol import ClientFactory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import Int16StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from kumazone.core.ratelimit import RateLimiter, limited
from kumazone.dataplane.metrics import DataplaneMetrics

__all__ = [
    "DEFAULT_TIMEOUT",
    "FALLBACK_NAMESERVER",
    "MAX_NAMESERVERS",
    "MAX_OUTSTANDING",
    "Forwarder",
    "ResolvConf",
    "answer_matches",
    "attempt_timeouts",
    "parse_resolv_conf",
    "question_end",
    "servfail_answer",
    "with_id",
]

#: Seconds from a client's query to its answer, whatever the upstreams do.
DEFAULT_TIMEOUT = 2.0
#: glibc uses the first three nameservers (MAXNS) and ignores the rest.
MAX_NAMESERVERS = 3
#: What glibc asks when resolv.conf names no nameserver.
FALLBACK_NAMESERVER = "127.0.0.1"
#: resolv.conf is looked at (stat) at most this often.
CHECK_INTERVAL = 1.0
#: Client queries forwarded at once; past it, SERVFAIL (each holds up to three sockets).
MAX_OUTSTANDING = 1000
#: Octets of resolv.conf read (a real one has a few hundred).
MAX_RESOLV_CONF = 64 * 1024
#: Problems of one read of resolv.conf logged (the others are counted in the last line).
MAX_LOGGED_PROBLEMS = 5
#: A TCP retry after a truncated answer gets at least this long (within the budget).
TCP_RETRY_TIMEOUT = 1.0
#: Datagrams read from one upstream socket per reactor wake-up.
READS_PER_WAKEUP = 8

_HEADER = 12
_QR, _TC = 0x80, 0x02
_SERVFAIL, _REFUSED = 2, 5
#: Our UDP payload size, as the DNS server's (the 2020 DNS flag day value).
_OPT_PAYLOAD = 1232
_OPT_TYPE = 41
_KEYWORDS = ("nameserver", "domain", "search", "sortlist", "options", "lookup", "family")
_FAILED_TO_CONNECT = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


# -- resolv.conf --------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvConf:
    """The nameservers of a resolv.conf (at most L{MAX_NAMESERVERS}), and what was wrong in it."""

    nameservers: tuple[str, ...]
    problems: tuple[str, ...] = ()


def _address(text: str) -> str | None:
    """C{text} as glibc reads a nameserver: IPv4, or IPv6 with an optional %scope; or None.

    As glibc, the scope is kept for link-local addresses (unicast and multicast) only.
    """
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        pass
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        return None
    link_local = address.is_link_local or (int(address) >> 112) & 0xFF0F == 0xFF02
    if address.scope_id is not None and not link_local:
        return str(ipaddress.IPv6Address(text.split("%", 1)[0]))
    return str(address)


def parse_resolv_conf(text: str) -> ResolvConf:
    """The C{nameserver} lines of a resolv.conf's C{text}, as glibc reads them.

    A line is a keyword at its very start and its value; C{#} and C{;} start a
    comment (at a line's start, or after a nameserver's address).  Lines that
    are no keyword glibc knows, and nameservers that are no address, are
    problems; past L{MAX_NAMESERVERS}, nameservers are ignored (a problem too).
    """
    nameservers: list[str] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or line[0] in "#;":
            continue
        keyword = line.split(None, 1)[0]
        if keyword not in _KEYWORDS or line[len(keyword)] not in " \t":
            problems.append(f"line {number}: not a resolv.conf keyword: {stripped[:80]!r}")
            continue
        if keyword != "nameserver":
            continue
        value = line[len(keyword) :].lstrip(" \t")
        for stop in ";# \t\r":
            value = value.split(stop, 1)[0]
        address = _address(value)
        if address is None:
            problems.append(f"line {number}: nameserver {value[:80]!r} is not an IP address")
        elif len(nameservers) >= MAX_NAMESERVERS:
            problems.append(f"line {number}: nameserver {address} ignored: glibc uses the first 3")
        else:
            nameservers.append(address)
    return ResolvConf(tuple(nameservers), tuple(problems))


def attempt_timeouts(budget: float, upstreams: int) -> tuple[float, float]:
    """How long one query to one upstream waits: in the first round, and in the second.

    Two rounds over the upstreams, the second waiting twice as long (as glibc's
    C{attempts:2} doubles its timeout), so that all of it fits in C{budget}.
    """
    first = budget / (3 * max(1, upstreams))
    return first, 2 * first


# -- wire ---------------------------------------------------------------------------


def question_end(query: bytes) -> int | None:
    """Where the question of C{query} ends: a query (QR clear) with one uncompressed question."""
    size = len(query)
    if size < _HEADER + 5 or query[2] & _QR or query[4:6] != b"\x00\x01":
        return None
    position = _HEADER
    while True:
        if position >= size:
            return None
        length = query[position]
        if length == 0:
            break
        if length > 63:
            return None
        position += 1 + length
    end = position + 5
    return end if end <= size else None


def with_id(message: bytes, message_id: bytes) -> bytes:
    """C{message} with its ID replaced by C{message_id} (two octets)."""
    return message_id + message[2:]


def answer_matches(answer: bytes, query: bytes, end: int) -> bool:
    """Whether C{answer} answers C{query} (its question ending at C{end}).

    The same ID, QR set, one question: the same name (ASCII case aside), type and class.
    """
    if len(answer) < end or answer[:2] != query[:2] or not answer[2] & _QR:
        return False
    if answer[4:6] != b"\x00\x01":
        return False
    name_end = end - 4
    return (
        answer[_HEADER:name_end].lower() == query[_HEADER:name_end].lower()
        and answer[name_end:end] == query[name_end:end]
    )


def _name_end(data: bytes, position: int) -> int | None:
    """Where the (possibly compressed) name at C{position} ends; None if it runs off."""
    size = len(data)
    while position < size:
        length = data[position]
        if length & 0xC0 == 0xC0:
            return position + 2 if position + 2 <= size else None
        if length & 0xC0:
            return None
        if length == 0:
            return position + 1
        position += 1 + length
    return None


def _opt_flags(query: bytes, end: int) -> int | None:
    """The flags (DO) of C{query}'s OPT record, its records starting at C{end}; None if none."""
    (additional,) = struct.unpack_from("!H", query, 10)
    position = end
    for _ in range(min(additional, 8)):
        after_name = _name_end(query, position)
        if after_name is None or after_name + 10 > len(query):
            return None
        rtype, _rclass, ttl, rdlength = struct.unpack_from("!HHIH", query, after_name)
        if rtype == _OPT_TYPE:
            return ttl & 0xFFFF
        position = after_name + 10 + rdlength
    return None


def servfail_answer(query: bytes) -> bytes:
    """The SERVFAIL a client gets when no upstream answers: made from its query.

    Its ID, opcode, RD and CD, RA set; its question; an OPT record (DO copied)
    if it had one.  Empty (nothing to send) for a packet shorter than a header
    or with QR set.
    """
    if len(query) < _HEADER or query[2] & _QR:
        return b""
    end = question_end(query)
    flags = 0x80 | (query[2] & 0x79), 0x80 | (query[3] & 0x10) | _SERVFAIL
    if end is None:
        return query[:2] + bytes(flags) + b"\x00" * 8
    opt_flags = _opt_flags(query, end)
    counts = struct.pack("!HHHH", 1, 0, 0, 0 if opt_flags is None else 1)
    answer = query[:2] + bytes(flags) + counts + query[_HEADER:end]
    if opt_flags is not None:
        # Root owner, OPT, our payload size, extended RCODE 0, version 0, DO as asked.
        answer += b"\x00" + struct.pack(
            "!HHBBHH", _OPT_TYPE, _OPT_PAYLOAD, 0, 0, opt_flags & 0x8000, 0
        )
    return answer


def _fresh_id() -> bytes:
    """A random ID for one upstream query."""
    return secrets.token_bytes(2)


# -- upstreams ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Upstream:
    """One nameserver, as sockets reach it."""

    address: str
    family: int
    sockaddr: tuple[Any, ...]


def _upstream(address: str, port: int) -> _Upstream | str:
    """The socket address of C{address} (its scope resolved); or why it has none."""
    try:
        found = socket.getaddrinfo(
            address,
            port,
            0,
            socket.SOCK_DGRAM,
            0,
            socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
        )
    except (OSError, UnicodeError) as e:
        return f"nameserver {address}: {e}"
    family, _type, _proto, _name, sockaddr = found[0]
    return _Upstream(address, family, tuple(sockaddr))


# -- one client query ---------------------------------------------------------------


@implementer(IReadDescriptor)
class _UDPSocket:
    """The connected UDP socket of one client query to one upstream, read by the reactor."""

    def __init__(self, forwarding: _Forwarding, index: int, sock: socket.socket) -> None:
        self.forwarding = forwarding
        self.index = index
        self.sock = sock
        self._fileno = sock.fileno()
        #: The IDs sent on this socket (at most one per round), and when.
        self.sent: dict[bytes, float] = {}

    def fileno(self) -> int:
        """The socket's descriptor (-1 once closed)."""
        return self._fileno

    def logPrefix(self) -> str:
        """What the reactor's log lines about this socket say."""
        return "dns-upstream"

    def doRead(self) -> None:
        """Hand each datagram (or the error: a port unreachable) to the client query."""
        for _ in range(READS_PER_WAKEUP):
            if self._fileno < 0:
                return
            try:
                data = self.sock.recv(65535)
            except BlockingIOError:
                return
            except OSError as e:
                self.forwarding.udp_failed(self, e)
                return
            self.forwarding.udp_received(self, data)

    def connectionLost(self, reason: Failure) -> None:
        """The socket has an error and nothing to read: a port unreachable (or the reactor stops).

        The reactor has stopped reading it already.
        """
        if self._fileno < 0:
            return
        error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self.forwarding.udp_failed(self, OSError(error, os.strerror(error)))

    def close(self) -> None:
        """Stop reading and close (once)."""
        if self._fileno < 0:
            return
        self.forwarding.forwarder.reactor.removeReader(self)
        self._fileno = -1
        self.sock.close()


class _TCPQuery(Int16StringReceiver):
    """One query over one TCP connection to an upstream: sends it, takes its answer."""

    def __init__(self, attempt: _TCPAttempt) -> None:
        self.attempt = attempt

    def connectionMade(self) -> None:
        """Send the query."""
        self.attempt.connected(self)
        self.sendString(self.attempt.packet)

    def stringReceived(self, data: bytes) -> None:
        """An answer (or what pretends to be one)."""
        self.attempt.received(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Closed, by either side."""
        self.attempt.lost(reason)


class _TCPAttempt(ClientFactory):
    """A query to one upstream over TCP; tells its client query once, how it went."""

    noisy = False

    def __init__(self, forwarding: _Forwarding, index: int, packet: bytes) -> None:
        self.forwarding = forwarding
        self.index = index
        self.packet = packet
        self.connector: Any = None
        self.protocol_: _TCPQuery | None = None
        self.over = False

    def buildProtocol(self, addr: Any) -> _TCPQuery:
        """The protocol of the connection."""
        return _TCPQuery(self)

    def connected(self, protocol: _TCPQuery) -> None:
        """Keep the protocol, to abort it."""
        self.protocol_ = protocol

    def received(self, data: bytes) -> None:
        """An answer: the client query judges it (and ends this attempt if it takes it)."""
        if not self.over:
            self.forwarding.tcp_received(self, data)

    def lost(self, reason: Failure) -> None:
        """The connection went before an answer was taken."""
        if not self.over:
            self.over = True
            self.forwarding.tcp_failed(self, "network")

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        """No connection: refused, unreachable, or no answer to the handshake in time."""
        if not self.over:
            self.over = True
            self.forwarding.tcp_failed(self, "network")

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        """Told by L{lost} already."""

    def stop(self) -> None:
        """End the attempt: abort the connection, or the connecting."""
        self.over = True
        if self.protocol_ is not None and self.protocol_.transport is not None:
            self.protocol_.transport.abortConnection()  # type: ignore[attr-defined]
        elif self.connector is not None and self.connector.state == "connecting":
            self.connector.stopConnecting()


class _Forwarding:
    """One client query, on its way through the upstreams until one answers or time is up."""

    def __init__(
        self,
        forwarder: Forwarder,
        query: bytes,
        end: int,
        tcp: bool,
        max_udp: int | None,
        upstreams: tuple[_Upstream, ...],
    ) -> None:
        self.forwarder = forwarder
        self.reactor = forwarder.reactor
        self.metrics = forwarder.metrics
        self.query = query
        self.end = end
        self.tcp = tcp
        self.max_udp = max_udp if max_udp is not None else 512
        self.upstreams = upstreams
        self.labels = [self.metrics.upstream_label(u.address) for u in upstreams]
        self.deferred: defer.Deferred[bytes] = defer.Deferred()
        now = self.reactor.seconds()
        self.deadline = now + forwarder.timeout
        first, self.second = attempt_timeouts(forwarder.timeout, len(upstreams))
        #: Attempts to come: (upstream index, how long it may take).
        self.plan: deque[tuple[int, float]] = deque((i, first) for i in range(len(upstreams)))
        #: Upstreams that timed out in the first round: asked again in the second.
        self.retry: list[int] = []
        self.second_round = False
        self.sockets: dict[int, _UDPSocket] = {}
        #: Upstreams that answered SERVFAIL or REFUSED or cannot be reached: not asked again.
        self.given_up: set[int] = set()
        #: The first SERVFAIL or REFUSED an upstream gave: the answer if no other comes.
        self.fallback: bytes | None = None
        #: The attempt waited for now (a UDP socket's upstream, or a TCP attempt).
        self.current: int | _TCPAttempt | None = None
        self.timer: IDelayedCall | None = None
        #: A truncated UDP answer, while the same upstream is asked over TCP.
        self.truncated: bytes | None = None
        self.tcp_sent_at = 0.0
        self.done = False

    # -- the plan -----------------------------------------------------------------

    def next(self) -> None:
        """Ask the next upstream in the plan; with none left (or no time), answer."""
        while not self.done:
            if not self.plan and self.retry and not self.second_round:
                self.second_round = True
                self.plan.extend((i, self.second) for i in self.retry if i not in self.given_up)
                self.retry = []
            remaining = self.deadline - self.reactor.seconds()
            if not self.plan or remaining <= 0:
                if remaining > 0 and self._waiting_for_late_answers():
                    # Nothing more to ask, but a socket that timed out may yet answer.
                    self.current = None
                    self._wait(remaining)
                    return
                self.finish(self.fallback)
                return
            index, allowed = self.plan.popleft()
            if index in self.given_up:
                continue
            if self.second_round and not self.plan:
                allowed = remaining  # the last attempt: all the time there is
            allowed = min(allowed, remaining)
            started = self._tcp_attempt(index, allowed) if self.tcp else self._udp(index, allowed)
            if started:
                return

    def _waiting_for_late_answers(self) -> bool:
        return any(i not in self.given_up for i in self.sockets)

    def _wait(self, seconds: float) -> None:
        self._cancel_timer()
        self.timer = self.reactor.callLater(seconds, self._timed_out)

    def _cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _timed_out(self) -> None:
        """The attempt waited for took too long: on to the next (its socket stays open)."""
        self.timer = None
        current = self.current
        self.current = None
        if isinstance(current, _TCPAttempt):
            current.stop()
            if self.truncated is not None:
                self.metrics.failed("timeout")
                self.finish(self.truncated)
                return
            index = current.index
        elif current is None:
            # Waiting for late answers only, and the budget is spent.
            self.finish(self.fallback)
            return
        else:
            index = current
        self.metrics.failed("timeout")
        if not self.second_round:
            self.retry.append(index)
        self.next()

    def _give_up_on(
        self, index: int, reason: str, answer: bytes | None = None, waited: bool = False
    ) -> None:
        """Upstream C{index} answered SERVFAIL or REFUSED, or cannot be reached: not asked again.

        @param waited: it is the attempt waited for now: on to the next one.
        """
        self.metrics.failed(reason)
        self.given_up.add(index)
        if answer is not None and self.fallback is None:
            self.fallback = answer
        if waited or (self.current is None and not self._waiting_for_late_answers()):
            self._cancel_timer()
            self.current = None
            self.next()

    def finish(self, answer: bytes | None) -> None:
        """Answer the client (C{answer}'s ID made the client's; None: SERVFAIL); release all."""
        if self.done:
            return
        self.done = True
        self._cancel_timer()
        for udp in self.sockets.values():
            udp.close()
        self.sockets.clear()
        if isinstance(self.current, _TCPAttempt):
            self.current.stop()
        self.current = None
        self.forwarder.outstanding -= 1
        if answer is None:
            reply = servfail_answer(self.query)
        else:
            reply = with_id(answer, self.query[:2])
        self.deferred.callback(reply)

    # -- UDP ----------------------------------------------------------------------

    def _udp(self, index: int, allowed: float) -> bool:
        """Ask upstream C{index} over UDP (on its socket, if it has one); whether it went."""
        upstream = self.upstreams[index]
        udp = self.sockets.get(index)
        if udp is None:
            try:
                sock = socket.socket(upstream.family, socket.SOCK_DGRAM)
            except OSError as e:
                self.metrics.failed("overload" if e.errno in _FAILED_TO_CONNECT else "network")
                self.given_up.add(index)
                return False
            try:
                sock.setblocking(False)
                sock.connect(upstream.sockaddr)
            except OSError:
                sock.close()
                self.metrics.failed("network")
                self.given_up.add(index)
                return False
            udp = self.sockets[index] = _UDPSocket(self, index, sock)
            self.reactor.addReader(udp)
        message_id = _fresh_id()
        try:
            udp.sock.send(message_id + self.query[2:])
        except OSError:
            udp.close()
            del self.sockets[index]
            self.metrics.failed("network")
            self.given_up.add(index)
            return False
        udp.sent[message_id] = self.reactor.seconds()
        self.metrics.upstream_queries.labels(self.labels[index], "udp").inc()
        self.current = index
        self._wait(allowed)
        return True

    def udp_received(self, udp: _UDPSocket, data: bytes) -> None:
        """A datagram from upstream C{udp.index}: its answer, or spoofed (ignored)."""
        if self.done:
            return
        message_id = data[:2]
        sent_at = udp.sent.get(message_id)
        if sent_at is None or not answer_matches(data, message_id + self.query[2:], self.end):
            self.metrics.failed("spoofed")
            return
        index = udp.index
        self.metrics.upstream_seconds.labels(self.labels[index]).observe(
            self.reactor.seconds() - sent_at
        )
        if data[2] & _TC:
            # Ask the same upstream over TCP; the truncated answer is the one
            # given if that fails, or its answer does not fit the client's limit.
            self._cancel_timer()
            self.truncated = data
            remaining = self.deadline - self.reactor.seconds()
            allowed = min(remaining, max(self.second, TCP_RETRY_TIMEOUT))
            for other in self.sockets.values():
                other.close()
            self.sockets.clear()
            if not self._tcp_attempt(index, allowed):
                self.finish(data)
            return
        rcode = data[3] & 0x0F
        if rcode == _SERVFAIL:
            self._give_up_on(index, "servfail", data, waited=self.current == index)
        elif rcode == _REFUSED:
            self._give_up_on(index, "refused", data, waited=self.current == index)
        else:
            self.finish(data)

    def udp_failed(self, udp: _UDPSocket, error: OSError) -> None:
        """Reading upstream C{udp.index}'s socket failed (a port unreachable): the next one."""
        if self.done:
            return
        udp.close()
        self.sockets.pop(udp.index, None)
        self._give_up_on(udp.index, "network", waited=self.current == udp.index)

    # -- TCP ----------------------------------------------------------------------

    def _tcp_attempt(self, index: int, allowed: float) -> bool:
        """Ask upstream C{index} over TCP; whether it went."""
        upstream = self.upstreams[index]
        message_id = _fresh_id()
        attempt = _TCPAttempt(self, index, message_id + self.query[2:])
        self.current = attempt
        self.tcp_sent_at = self.reactor.seconds()
        self._wait(allowed)
        try:
            attempt.connector = self.reactor.connectTCP(
                upstream.address, self.forwarder.port, attempt, timeout=max(allowed, 0.001)
            )
        except Exception:
            self.current = None
            self._cancel_timer()
            self.metrics.failed("network")
            self.given_up.add(index)
            return False
        self.metrics.upstream_queries.labels(self.labels[index], "tcp").inc()
        return True

    def tcp_received(self, attempt: _TCPAttempt, data: bytes) -> None:
        """An answer over TCP: taken if it matches (else ignored, as spoofed)."""
        if self.done or attempt is not self.current:
            return
        if not answer_matches(data, attempt.packet, self.end):
            self.metrics.failed("spoofed")
            return
        index = attempt.index
        self.metrics.upstream_seconds.labels(self.labels[index]).observe(
            self.reactor.seconds() - self.tcp_sent_at
        )
        attempt.stop()
        if self.truncated is not None:
            self.finish(data if len(data) <= self.max_udp else self.truncated)
            return
        rcode = data[3] & 0x0F
        if rcode == _SERVFAIL:
            self._give_up_on(index, "servfail", data, waited=True)
        elif rcode == _REFUSED:
            self._give_up_on(index, "refused", data, waited=True)
        else:
            self.finish(data)

    def tcp_failed(self, attempt: _TCPAttempt, reason: str) -> None:
        """A TCP attempt ended without an answer (refused, reset, closed)."""
        if self.done or attempt is not self.current:
            return
        if self.truncated is not None:
            self.metrics.failed(reason)
            self.finish(self.truncated)
            return
        self._give_up_on(attempt.index, reason, waited=True)


# -- the forwarder ------------------------------------------------------------------


class Forwarder:
    """Forwards queries to the nameservers of a resolv.conf; re-reads it when it changes."""

    log = Logger()

    def __init__(
        self,
        resolv_conf: str,
        reactor: Any,
        metrics: DataplaneMetrics,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        port: int = 53,
        max_outstanding: int = MAX_OUTSTANDING,
    ) -> None:
        """
        @param resolv_conf: the file whose C{nameserver} lines say where to forward.
        @param reactor: provides C{seconds}, C{callLater}, C{addReader},
            C{removeReader} and C{connectTCP}.
        @param timeout: seconds from a client's query to its answer (SERVFAIL if
            no upstream answers by then).
        @param port: the upstreams' port (resolv.conf has none: 53).
        @param max_outstanding: client queries forwarded at once; past it, SERVFAIL.
        """
        self.path = resolv_conf
        self.reactor = reactor
        self.metrics = metrics
        self.timeout = timeout
        self.port = port
        self.max_outstanding = max_outstanding
        #: Client queries on their way now.
        self.outstanding = 0
        self.limited_log = limited(
            RateLimiter(burst=10, interval=60.0), reactor, lambda line: self.log.warn(line)
        )
        self._upstreams: tuple[_Upstream, ...] = ()
        self._stamp: tuple[int, int, int, int] | None = None
        self._checked = -math.inf
        self.check()

    @property
    def nameservers(self) -> tuple[str, ...]:
        """The addresses queries are forwarded to, in order."""
        return tuple(upstream.address for upstream in self._upstreams)

    def check(self) -> None:
        """Re-read resolv.conf if it changed (looked at once a second at most).

        A file that cannot be read keeps the nameservers read last; with none
        ever read, or none named, it is L{FALLBACK_NAMESERVER}, as for glibc.
        """
        now = self.reactor.seconds()
        if now - self._checked < CHECK_INTERVAL:
            return
        self._checked = now
        try:
            status = os.stat(self.path)
            stamp = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
            if stamp == self._stamp:
                return
            with open(self.path, "rb") as file:
                text = file.read(MAX_RESOLV_CONF).decode("utf-8", "replace")
        except OSError as e:
            if self._stamp is not None or not self._upstreams:
                self._stamp = None
                self.limited_log(f"resolv.conf {self.path} cannot be read ({e.strerror})")
                if not self._upstreams:
                    self._set((FALLBACK_NAMESERVER,), [])
            return
        self._stamp = stamp
        parsed = parse_resolv_conf(text)
        self._set(parsed.nameservers or (FALLBACK_NAMESERVER,), list(parsed.problems))

    def _set(self, addresses: tuple[str, ...], problems: list[str]) -> None:
        """Forward to C{addresses} from now on; log C{problems} (a few)."""
        upstreams = []
        for address in addresses:
            found = _upstream(address, self.port)
            if isinstance(found, str):
                problems.append(found)
            else:
                upstreams.append(found)
        if not upstreams:
            fallback = _upstream(FALLBACK_NAMESERVER, self.port)
            assert not isinstance(fallback, str)
            upstreams.append(fallback)
        for problem in problems[:MAX_LOGGED_PROBLEMS]:
            self.limited_log(f"resolv.conf {self.path}: {problem}")
        if len(problems) > MAX_LOGGED_PROBLEMS:
            more = len(problems) - MAX_LOGGED_PROBLEMS
            self.limited_log(f"resolv.conf {self.path}: {more} more problem(s)")
        changed = tuple(upstreams) != self._upstreams
        self._upstreams = tuple(upstreams)
        if changed:
            self.log.info(
                "forwarding to {nameservers} (from {path})",
                nameservers=", ".join(self.nameservers),
                path=self.path,
            )

    def forward(self, query: bytes, tcp: bool, max_udp: int | None) -> defer.Deferred[bytes]:
        """The answer to C{query} from the upstreams, its ID the query's; or a SERVFAIL.

        Always fires with octets (empty for a packet with nothing to answer).

        @param tcp: the client asked over TCP: so are the upstreams.
        @param max_udp: the most octets the client takes over UDP (its EDNS
            payload size, or 512): a TCP retry's answer larger than that is not
            given, the truncated answer is.
        """
        end = question_end(query)
        if end is None:
            return defer.succeed(servfail_answer(query))
        if self.outstanding >= self.max_outstanding:
            self.metrics.failed("overload")
            return defer.succeed(servfail_answer(query))
        self.check()
        self.outstanding += 1
        forwarding = _Forwarding(self, query, end, tcp, max_udp, self._upstreams)
        try:
            forwarding.next()
        except Exception as e:
            # A bug of ours: the client still gets an answer.
            self.limited_log(f"forwarding a query failed: {type(e).__name__}: {e}")
            forwarding.finish(None)
        return forwarding.deferred
