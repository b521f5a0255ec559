"""DNS over UDP in batches: many datagrams per system call, in and out.

Profiling the server at full load showed two thirds of its time in C{recvfrom},
C{sendto} and Twisted's read loop around them: one system call in and one out
for every query.  Linux reads and writes many datagrams in one call with
C{recvmmsg(2)} and C{sendmmsg(2)} (NSD uses both); Python's socket module has
neither, so they are reached here through ctypes.

L{BatchedDNSPort} is a C{twisted.internet.udp.Port} whose C{doRead} takes up to
L{BATCH} queries per call, answers each one the hot path knows in place, and
sends those answers with one C{sendmmsg}.  Every other query goes, one by one,
to the factory exactly as from the stock port, and is answered by the authority
path with C{sendto}.  Where the calls are missing (not Linux) the service uses
the stock port; L{available} says which.

The loop over a batch runs in C where the extension L{kumazone.dns._hotloop}
was built (C{setup.py}; L{native} says whether it was): it answers the queries
with a kept answer, and the NXDOMAIN for a name in the domain no one has from
the hot cache's tails (L{HotCache.negative_context}), and leaves the rest to
this module's loop, which is the reference and, where the extension is
missing, does it all; with it, one call to C reads a batch, answers it and
sends the answers (L{_hotloop.serve}), and Python runs only for what it left.
At 50,000 queries a second the Python loop cost 1.57 x NSD's CPU per answer,
the C one 1.22 x (bench/README.md).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import udp

from kumazone.dns import dispatch
from kumazone.dns.hotpath import Client, hot_key

if TYPE_CHECKING:
    from kumazone.dns.server import KumaDNSDatagramProtocol

try:
    from kumazone.dns import _hotloop
except ImportError:  # not built: no C compiler or Python headers at install
    _hotloop = None  # type: ignore[assignment]

__all__ = ["BATCH", "BatchedDNSPort", "available", "listen", "native"]

#: Datagrams read (and answers sent) per system call.
BATCH = 64
#: Octets read of one datagram: Twisted's own UDP port reads at most this many too.
SLOT = 8192
#: Batches per C{doRead} at most before the reactor serves its other sockets.
ROUNDS = 16
#: Seconds of reading per C{doRead} at most (checked after each batch).  A
#: saturated port filled all 16 rounds, about 10 ms on the bench machine, and an
#: API request, which needs several turns of the reactor, waited that long at
#: each: 39 ms for a PUT under full load.  A shorter turn costs one more pass
#: of the reactor per 64 to 128 datagrams, a few us.
TURN_SECONDS = 0.001
#: Room for any socket address (struct sockaddr_storage).
NAME_SLOT = 128

_MSG_DONTWAIT = 0x40
_READ_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


_Call = Callable[..., int]


def _find_calls() -> tuple[_Call, _Call] | None:
    """C{recvmmsg} and C{sendmmsg} from the C library, or None where there are none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        recvmmsg = libc.recvmmsg
        sendmmsg = libc.sendmmsg
    except (OSError, AttributeError):
        return None
    int_, pointer, uint = ctypes.c_int, ctypes.c_void_p, ctypes.c_uint
    recvmmsg.argtypes = [int_, pointer, uint, int_, pointer]
    recvmmsg.restype = ctypes.c_int
    sendmmsg.argtypes = [int_, pointer, uint, int_]
    sendmmsg.restype = ctypes.c_int
    return recvmmsg, sendmmsg


_CALLS = _find_calls()
#: Whether this system has C{recvmmsg} and C{sendmmsg}.
available = _CALLS is not None

_Known = Callable[..., list[int]]
if _hotloop is not None and (
    _hotloop.MMSGHDR_SIZE != ctypes.sizeof(_MMsgHdr) or _hotloop.IOVEC_SIZE != ctypes.sizeof(_IOVec)
):
    _hotloop = None  # type: ignore[assignment]  # its structs are not ctypes': the Python loop
#: The C loop over a batch's known answers, or None where it was not built.
_KNOWN: _Known | None = None if _hotloop is None else _hotloop.answer_known
_Serve = Callable[..., tuple[int, list[int] | None, int, int]]
#: One batch read, answered and sent in C (L{_hotloop.serve}), or None.
_SERVE: _Serve | None = None if _hotloop is None else _hotloop.serve
#: Whether the C loop is there.
native = _KNOWN is not None


class _Messages:
    """C{BATCH} message headers, each with its own data slot and address slot.

    Answers are written to the slot of their query's index, and their headers
    share the queries' address buffer: the kernel's record of where a query came
    from is where its answer goes, with no copying.
    """

    def __init__(self, name_length: int, names: Any = None) -> None:
        self.headers = (_MMsgHdr * BATCH)()
        self.iovecs = (_IOVec * BATCH)()
        self.data = ctypes.create_string_buffer(BATCH * SLOT)
        self.names = ctypes.create_string_buffer(BATCH * NAME_SLOT) if names is None else names
        data, names_at = ctypes.addressof(self.data), ctypes.addressof(self.names)
        for i in range(BATCH):
            self.iovecs[i].iov_base = data + i * SLOT
            self.iovecs[i].iov_len = SLOT
            header = self.headers[i].msg_hdr
            header.msg_name = names_at + i * NAME_SLOT
            header.msg_namelen = name_length
            header.msg_iov = ctypes.addressof(self.iovecs[i])
            header.msg_iovlen = 1
        self.address = ctypes.addressof(self.headers)
        # Byte views, read and written with slices and struct: much cheaper per
        # datagram than ctypes' attribute access.
        self.header_bytes = memoryview(self.headers).cast("B")
        self.iovec_bytes = memoryview(self.iovecs).cast("B")
        self.data_bytes = memoryview(self.data).cast("B")
        self.name_bytes = memoryview(self.names).cast("B")


_HEADER_SIZE = ctypes.sizeof(_MMsgHdr)
_LENGTH_OFFSET = _MMsgHdr.msg_len.offset
_IOVEC_SIZE = ctypes.sizeof(_IOVec)
_IOV_LEN_OFFSET = _IOVec.iov_len.offset
_read_length = struct.Struct("I").unpack_from
_write_length = struct.Struct("N").pack_into


class BatchedDNSPort(udp.Port):
    """A UDP port that reads queries and sends hot-path answers in batches."""

    protocol: KumaDNSDatagramProtocol

    def __init__(
        self,
        port: int,
        protocol: KumaDNSDatagramProtocol,
        interface: str = "",
        reactor: Any = None,
        calls: tuple[_Call, _Call] | None = _CALLS,
        known: _Known | None = _KNOWN,
    ) -> None:
        """Listen on C{port}; C{calls} are C{recvmmsg} and C{sendmmsg} (for tests to wrap).

        C{known}: the C loop over a batch's known answers (L{_hotloop.answer_known}),
        or None for this module's loop alone (tests run both).  With both the
        system's calls and the C loop, a batch is read, answered and sent in one
        call to C (L{_hotloop.serve}), and Python runs only for what it leaves.
        """
        if calls is None:
            raise RuntimeError("recvmmsg and sendmmsg are not available on this system")
        super().__init__(port, protocol, interface, maxPacketSize=SLOT, reactor=reactor)
        self._recvmmsg, self._sendmmsg = calls
        self._known = known
        self._serve = _SERVE if calls is _CALLS and known is _KNOWN else None
        self._serving: tuple[Any, ...] = ()
        ipv6 = self.addressFamily == socket.AF_INET6
        #: Length of a socket address, and where the IP address lies in it.
        self._name_length = 28 if ipv6 else 16
        self._ip = slice(8, 24) if ipv6 else slice(4, 8)
        self._received = _Messages(NAME_SLOT)
        self._answers = _Messages(self._name_length, self._received.names)

    def startListening(self) -> None:
        """Bind, then check that the kernel takes both calls (seccomp or an old kernel may not).

        Each check asks for zero datagrams, so it takes none from the socket.  On
        failure the socket is closed at once and L{OSError} says why.
        """
        super().startListening()
        fd = self.socket.fileno()
        taken = self._recvmmsg(fd, self._received.address, 0, _MSG_DONTWAIT, None) >= 0
        taken = taken and self._sendmmsg(fd, self._answers.address, 0, 0) >= 0
        if not taken:
            number = ctypes.get_errno()
            self.stopReading()
            self.connectionLost()
            raise OSError(number, f"recvmmsg/sendmmsg: {os.strerror(number)}")
        # Its wakeups dispatched without the legacy log context (L{dispatch}).
        dispatch.install(self.reactor)
        if self._serve is not None:
            received, answers = self._received, self._answers
            #: What L{_hotloop.serve} takes that stays the same: made once.
            self._serving = (
                fd, BATCH, received.header_bytes, answers.header_bytes, received.data_bytes,
                received.name_bytes, answers.iovec_bytes, answers.data_bytes,
                self._ip.start, self._ip.stop, SLOT, NAME_SLOT,
            )  # fmt: skip

    def doRead(self) -> None:
        """Read up to L{ROUNDS} batches of queries (for L{TURN_SECONDS} at most), answering each."""
        clock = time.perf_counter
        until = clock() + TURN_SECONDS
        serve = self._serve
        if serve is not None:
            serving = self._serving
            controller = self.protocol.controller
            hot = controller.hot  # (a dataplane resolver's changes with its configuration)
            for _round in range(ROUNDS):
                started = clock()
                try:
                    count, rest, number, failed = serve(
                        serving, hot.clients, hot.negative_context()
                    )
                except Exception as e:
                    # A bug of ours or no memory: the batch read (if it was) is lost,
                    # its clients retry.  The port stays open (Twisted would close it
                    # on an exception) and reads through ctypes from now on, so an
                    # error before the read cannot make it spin on a readable socket.
                    controller.limited_log(
                        f"the C loop failed: {type(e).__name__}: {e}; reading in Python"
                    )
                    self._serve = None
                    return
                if count <= 0:
                    if count < 0:
                        self._read_failed(number)
                    return
                if rest:  # read and partly answered, nothing sent: the Python loop goes on
                    self._answer_batch(count, rest, started)
                else:
                    stats = controller.stats
                    stats.hot_answers += count
                    stats.observe_many(clock() - started, count)
                    if failed:
                        controller.metrics.send_errors.inc(failed)
                if count < BATCH or clock() > until:
                    return
            return
        fd = self.socket.fileno()
        address = self._received.address
        for _round in range(ROUNDS):
            count = self._recvmmsg(fd, address, BATCH, _MSG_DONTWAIT, None)
            if count <= 0:
                if count < 0:
                    self._read_failed(ctypes.get_errno())
                return
            self._answer_batch(count)
            if count < BATCH or clock() > until:
                return

    def _answer_batch(
        self, count: int, rest: list[int] | None = None, started: float = 0.0
    ) -> None:
        """Answer the C{count} queries just read; hot answers go out in runs, one call each.

        C{rest}: the queries the C loop left (it answered the others in place),
        read at C{started}.

        A query seen before in the same octets (after its ID and flags) is answered
        here, straight from the buffers; the other ones go through the protocol's
        templates and negative answers and, if neither has one, to the authority path.
        """
        # The loop is one piece on purpose: each of its lines runs once per datagram.
        # Moving just the copy of a known answer into a function cost 4% (1.65 to
        # 1.73 us of Python per datagram, batches of 64, the kernel calls stubbed);
        # this method itself, called once per batch, cost nothing measurable.
        if rest is None:
            started = time.perf_counter()
        protocol = self.protocol
        controller = protocol.controller
        clients = controller.hot.clients
        template_answer = protocol.template_answer
        received, answers = self._received, self._answers
        headers, data, names = received.header_bytes, received.data_bytes, received.name_bytes
        out_iovecs, out_data = answers.iovec_bytes, answers.data_bytes
        ip_start, ip_stop = self._ip.start, self._ip.stop
        indices: list[int] | range = range(count) if rest is None else rest
        looked = rest is not None  # whether the C loop looked for kept answers already
        if self._known is not None and rest is None:
            # The C loop answers what has a kept answer; the rest is left here.
            try:
                indices = self._known(
                    count, headers, data, names, out_iovecs, out_data, clients,
                    ip_start, ip_stop, SLOT, NAME_SLOT, controller.hot.negative_context(),
                )  # fmt: skip
                looked = True
            except Exception as e:  # no memory: this loop does it all, as without C
                controller.limited_log(f"the C loop failed: {type(e).__name__}: {e}")
        run = 0  # the first answer not sent yet
        slow = 0
        for i in indices:
            base = i * SLOT
            (length,) = _read_length(headers, i * _HEADER_SIZE + _LENGTH_OFFSET)
            flags = data[base + 2]
            name = i * NAME_SLOT
            ip = bytes(names[name + ip_start : name + ip_stop])
            size = 0  # stays 0 when the query takes the authority path
            try:
                client = clients.get(ip)
                if client is None:
                    client = self._client(ip)
                seen = None
                if length > 12 and not flags & 0xFE and not looked:
                    octets = bytes(data[base + 4 : base + length])
                    seen = client[1].get(octets)
                    if seen is None:
                        seen = client[2].get(octets)
                if seen is not None:
                    # hotpath.answer_from's patch, done in place in the send
                    # buffer: a call and a copy per datagram cost more here.
                    template, counter = seen
                    counter[0] += 1
                    size = len(template)
                    out_data[base : base + size] = template
                    out_data[base : base + 2] = data[base : base + 2]
                    out_data[base + 2] = template[2] | (flags & 0x01)
                    out_data[base + 3] = template[3] | (data[base + 3] & 0x10)
                else:
                    query = bytes(data[base : base + length])
                    answer = template_answer(query, client[0])
                    if answer is None:
                        self._answer_slowly(query, name, client[0])
                    else:
                        size = len(answer)
                        out_data[base : base + size] = answer
            except Exception as e:
                # A bug of ours: the client retries, the log says why (bounded).
                controller.limited_log(f"answering a query failed: {type(e).__name__}: {e}")
            if size:
                _write_length(out_iovecs, i * _IOVEC_SIZE + _IOV_LEN_OFFSET, size)
            else:
                if i > run:
                    self._send(run, i)
                run = i + 1
                slow += 1
        if count > run:
            self._send(run, count)
        if count > slow:
            stats = controller.stats
            stats.hot_answers += count - slow
            stats.observe_many(time.perf_counter() - started, count - slow)

    def _client(self, ip: bytes) -> Client:
        """The mesh of a client address and its exact answers, kept until the table changes."""
        controller = self.protocol.controller
        return controller.hot.client(
            ip, controller.mesh_of(socket.inet_ntop(self.addressFamily, ip))
        )

    def _answer_slowly(self, query: bytes, name: int, mesh: str) -> None:
        """Hand one query to the authority path, as the stock port would."""
        address = self._received.name_bytes[name : name + self._name_length]
        host = socket.inet_ntop(self.addressFamily, bytes(address[self._ip]))
        port = int.from_bytes(address[2:4], "big")
        self.protocol.controller.packetReceived(
            query, self.protocol, (host, port), hot_key(query, mesh)
        )

    def _send(self, start: int, stop: int) -> None:
        """Send the answers in slots C{start} to C{stop}; one that fails is counted and skipped."""
        fd = self.socket.fileno()
        while start < stop:
            sent = self._sendmmsg(fd, self._answers.address + start * _HEADER_SIZE, stop - start, 0)
            if sent > 0:
                start += sent
                continue
            if sent < 0 and ctypes.get_errno() == errno.EINTR:
                continue
            # A full send buffer or a refused destination: that client retries.
            self.protocol.controller.metrics.send_errors.inc()
            start += 1

    def _read_failed(self, number: int) -> None:
        """What the stock port does with a failed read: ignore, report refusal, or raise."""
        if number in _READ_AGAIN:
            return
        if number == errno.ECONNREFUSED:
            if self._connectedAddr:
                self.protocol.connectionRefused()
            return
        raise OSError(number, f"recvmmsg: {errno.errorcode.get(number, number)}")


dispatch.direct(BatchedDNSPort)


def listen(
    reactor: Any,
    port: int,
    protocol: KumaDNSDatagramProtocol,
    interface: str,
    warn: Callable[[str], None],
) -> Any:
    """DNS over UDP on C{interface}: batched where the system has it, else Twisted's own port.

    C{warn} is told (once per port) why batching is off.
    """
    if available:
        if not native:
            warn(
                "DNS over UDP: the C loop (kumazone/dns/_hotloop.c) is not built, the"
                " Python loop answers (about 1.3 x the CPU per answer): reinstall with a"
                " C compiler and Python's headers"
            )
        listening = BatchedDNSPort(port, protocol, interface, reactor=reactor)
        try:
            listening.startListening()
        except OSError as e:
            warn(f"DNS over UDP: one datagram per system call ({e})")
        else:
            return listening
        protocol = type(protocol)(protocol.controller)
    return reactor.listenUDP(port, protocol, interface=interface)
