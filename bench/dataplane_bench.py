#!/usr/bin/env python3
"""Data-plane DNS (issue 13): one run, one table, every target.

1. Fan-out: a zone (a real twistd process, SERVICES services, its dataplane port over
   mutual TLS) serving N simulated dataplanes for each N of CONNECTIONS (1,000 and
   10,000), held by one or two client processes (Twisted, TLS, one certificate per
   dataplane from the bench's CA):
   - the time from a PUT of one Dataplane (a new service) until every connection
     holds it (each connection notes when the DpTable carrying the service arrives),
     median and worst over CHANGES changes: target < 1 s at 10,000;
   - what a one-service change costs per dataplane: the frame, the TLS record (the
     TCP payload, counted by the kernel: TCP_INFO), and the packets (segments in each
     direction, with IPv4 and TCP headers): target < 200 octets;
   - the zone's resident memory per connection ((RSS with N connected - before) / N).
2. Resolver: a real dataplane process (`--role=dataplane`) fed by a zone of
   DNS_SERVICES services, beside that zone and NSD on the same records, with
   dns_bench's load (dnsperf, 90% existing .mesh names, A and AAAA, 10% unknown);
   then its forwarding: names outside the mesh through the dataplane to an upstream
   (NSD on 127.0.0.1 port 53, the only nameserver of the resolv.conf the dataplane is
   given) beside dnsperf straight at that upstream: queries per second, and latency
   at a fixed rate (mean and p99): the ratios.

Every server runs on CPU 0 (`taskset -c 0`); dnsperf, the simulated dataplanes and
this script on CPU 1.  Everything is on 127.0.0.1, in a temporary directory, and
every process started is stopped at the end (on an error or Ctrl-C too).

    bench/dataplane_bench.py             # the defaults below (make bench), 4 to 5 min
    bench/dataplane_bench.py --quick     # a smoke run, about 1 min
"""

from __future__ import annotations

import argparse
import datetime
import errno
import json
import os
import queue
import random
import re
import resource
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter, deque
from pathlib import Path
from typing import IO, Any

from benchlib import (
    BIN,
    DNSPERF_CPU,
    RUNNING,
    SERVER_CPU,
    BenchError,
    Server,
    address,
    check_tools,
    dataplane,
    dns_query,
    dnsperf,
    http_get,
    http_request,
    load,
    print_machine,
    raise_interrupt,
    read_vips,
    resolves,
    start_nsd,
    start_zone,
    stop_all,
    tool,
    write_queries,
    write_services,
    write_zone_file,
)
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet import epollreactor, stdio, task, tcp
from twisted.internet import main as main_module
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from kumazone.core.messages import DpAck, DpHello, DpTable, Error, Ping, decode, encode
from kumazone.dataplane.client import ACK_DELAY
from kumazone.sync.certs import LEAF_KEY_USAGE

MESH = "default"
#: Open files the script, the zone and the client processes may have (the zone
#: holds one per dataplane).
NOFILE = 65536
#: The outside names the upstream serves (and the dataplane forwards).
OUTSIDE = "outside.test"
OUTSIDE_HOSTS = 1000
#: TCP_INFO (linux/tcp.h): offsets of tcpi_bytes_received, tcpi_segs_in,
#: tcpi_data_segs_in, tcpi_segs_out, tcpi_data_segs_out and tcpi_bytes_sent.
_TCP_INFO = ((128, "Q"), (140, "I"), (152, "I"), (136, "I"), (156, "I"), (200, "Q"))
#: Frames larger than this (a whole table, on connect) are read only as far as the
#: header: decoding them in full would make the simulated dataplanes the bottleneck.
_SMALL_FRAME = 8192
#: A DpTable's head: its version, and whether it is not the last part (fields at their
#: defaults are left out: no "full" unless true, no "part" if 0, no "last" unless false).
_HEAD = re.compile(
    rb'\{"v":\d+,"t":"dptable","version":(\d+),"base":\d+(?:,"full":true)?'
    rb'(?:,"part":\d+)?(,"last":false)?'
)
_LENGTH = struct.Struct("!I")
#: Linux's SO_TIMESTAMPNS: recvmsg gives the time the kernel received the data.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


# -- the simulated dataplanes (run as `dataplane_bench.py --client ...`) -----------


def tcp_info(sock: socket.socket) -> tuple[int, ...]:
    """Octets and segments in and out of a TCP socket, as the kernel counts them."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return (0,) * len(_TCP_INFO)
    return tuple(
        struct.unpack_from(code, raw, offset)[0] if len(raw) >= offset + 8 else 0
        for offset, code in _TCP_INFO
    )


def read_stamped(self: Any) -> Any:
    """Twisted's TCP read (C{tcp.Connection.doRead}), through recvmsg: the kernel's
    receive time is kept, so the time a change reached a dataplane does not wait for
    a client process, which stands for thousands of dataplanes, to come round to it."""
    try:
        data, ancillary, _, _ = self.socket.recvmsg(self.bufferSize, 64)
    except OSError as e:
        return None if e.args[0] == errno.EWOULDBLOCK else main_module.CONNECTION_LOST
    for level, kind, value in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            seconds, nanoseconds = struct.unpack_from("qq", value)
            self.received_at = seconds + nanoseconds / 1e9
    return self._dataReceived(data)


@implementer(IOpenSSLClientConnectionCreator)
class Creator:
    """One TLS context for every connection; each connection its own certificate.

    The zone's chain is checked against the CA (a real dataplane also checks the
    zone's host name: a cost on the dataplane's side only)."""

    def __init__(self, ca: str, certificates: list[Any], key: Any, first: int) -> None:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.load_verify_locations(ca)
        context.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: bool(ok))
        self.context = context
        self.certificates = certificates
        self.key = key
        self.first = first

    def clientConnectionForTLS(self, tls: TLSMemoryBIOProtocol) -> SSL.Connection:
        simulated: Any = tls.wrappedProtocol
        connection = SSL.Connection(self.context, None)
        connection.use_certificate(self.certificates[simulated.index - self.first])
        connection.use_privatekey(self.key)
        connection.set_connect_state()
        return connection


class SimDataplane(Protocol):
    """One dataplane's connection: hello, welcome, tables acknowledged, a change noted."""

    def __init__(self, pool: Pool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.buffer = bytearray()
        self.ready = False
        self.gone = False
        self.version = -1
        self.tls: Any = None
        self.tcp: Any = None
        self.sock: socket.socket | None = None
        #: When the change watched was read here, and when the kernel received it.
        self.arrived: float | None = None
        self.received = 0.0
        self.frame_octets = 0
        self.at_watch: tuple[int, ...] = ()
        self.at_arrival: tuple[int, ...] = ()
        #: Why this side closed the connection (a refusal, a frame it cannot read).
        self.why = ""
        self.ack_due = False

    def connectionMade(self) -> None:
        self.tls = self.transport
        self.tcp = self.tls.transport  # under TLS, the TCP connection
        self.tcp.setTcpNoDelay(True)
        self.sock = self.tcp.getHandle()
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.pool.opened.append(self)
        self.tls.write(encode(DpHello(MESH, f"sim-{self.index}", 0, "")))

    def dataReceived(self, data: bytes) -> None:
        now = time.time()
        buffer = self.buffer
        buffer += data
        while len(buffer) >= 4:
            (length,) = _LENGTH.unpack_from(buffer)
            if len(buffer) < 4 + length:
                break
            body = bytes(buffer[4 : 4 + length])
            del buffer[: 4 + length]
            self.frame(body, now)

    def frame(self, body: bytes, now: float) -> None:
        if len(body) > _SMALL_FRAME:
            head = _HEAD.match(body)
            if head is None:
                self.pool.problem(self, f"a frame of {len(body)} octets that is no table")
                return
            if head.group(2) is None:  # the last part
                self.table_done(int(head.group(1)))
            return
        message = decode(body)
        if isinstance(message, DpTable):
            watch = self.pool.watch
            if (
                watch is not None
                and self.arrived is None
                and any(row.service == watch for row in message.upsert)
            ):
                self.arrived = now
                self.received = getattr(self.tcp, "received_at", now)
                self.frame_octets = len(body) + 4
                self.at_arrival = tcp_info(self.sock) if self.sock else ()
                self.pool.arrivals += 1
            if message.last:
                self.table_done(message.version)
        elif isinstance(message, Error):
            self.pool.problem(self, f"the zone says: {message.message}")
        # DpWelcome: the table follows; Ping: the zone is there.

    def table_done(self, version: int) -> None:
        """Acknowledge as the real dataplane does: its first table at once, a change
        ACK_DELAY later with those that follow (kumazone.dataplane.client)."""
        self.version = version
        if not self.ready:
            self.tls.write(encode(DpAck(version)))
            self.ready = True
            self.pool.became_ready(self)
        elif not self.ack_due:
            self.ack_due = True
            self.pool.reactor.callLater(ACK_DELAY, self.ack)

    def ack(self) -> None:
        self.ack_due = False
        if not self.gone:
            self.tls.write(encode(DpAck(self.version)))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.gone = True
        self.pool.lost(self, self.why or reason.getErrorMessage())


class SimFactory(ClientFactory):
    noisy = False

    def __init__(self, pool: Pool, index: int) -> None:
        self.pool, self.index = pool, index

    def buildProtocol(self, addr: Any) -> SimDataplane:
        return SimDataplane(self.pool, self.index)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.pool.failed(f"connect: {reason.getErrorMessage()[:120]}")


class Pool:
    """COUNT connections, at most WINDOW of them on their way (handshake, table)."""

    def __init__(self, reactor: Any, args: argparse.Namespace, creator: Creator) -> None:
        self.reactor = reactor
        self.args = args
        self.creator = creator
        self.pending = deque(range(args.first, args.first + args.count))
        self.in_flight = 0
        #: Connections with their table (in the order they got it), and every
        #: connection made (the heartbeat's).
        self.connections: list[SimDataplane] = []
        self.opened: list[SimDataplane] = []
        self.ready = 0
        self.failures: Counter[str] = Counter()
        self.dropped = 0
        self.watch: str | None = None
        self.arrivals = 0
        self.started = time.monotonic()
        self.reported = False
        self.control: Control | None = None
        self.tick = 0
        self.ping = encode(Ping())

    def emit(self, event: dict[str, Any]) -> None:
        assert self.control is not None
        self.control.sendLine(json.dumps(event).encode())

    def fill(self) -> None:
        while self.pending and self.in_flight < self.args.window:
            index = self.pending.popleft()
            self.in_flight += 1
            factory = TLSMemoryBIOFactory(self.creator, True, SimFactory(self, index))
            self.reactor.connectTCP("127.0.0.1", self.args.port, factory, timeout=30)
        self.check_done()

    def check_done(self) -> None:
        if self.reported or self.pending or self.in_flight:
            return
        self.reported = True
        self.emit(
            {
                "event": "connected",
                "ready": self.ready,
                "failed": sum(self.failures.values()),
                "why": self.failures.most_common(3),
                "seconds": time.monotonic() - self.started,
            }
        )

    def became_ready(self, simulated: SimDataplane) -> None:
        self.connections.append(simulated)
        self.ready += 1
        self.in_flight -= 1
        self.fill()

    def failed(self, why: str) -> None:
        self.failures[why] += 1
        self.in_flight -= 1
        self.fill()

    def lost(self, simulated: SimDataplane, why: str) -> None:
        if simulated.ready:
            self.dropped += 1
            return
        self.failed(why[:120])

    def problem(self, simulated: SimDataplane, why: str) -> None:
        simulated.why = simulated.why or why  # counted when the connection goes
        if simulated.tls is not None:
            simulated.tls.loseConnection()

    def heartbeat(self) -> None:
        """Each connection pings every 5 s (a fifth of them each second), as SyncProtocol."""
        self.tick += 1
        if self.tick % 5 == 0:
            self.opened = [c for c in self.opened if not c.gone]
        for simulated in self.opened[self.tick % 5 :: 5]:
            if not simulated.gone:
                simulated.tls.write(self.ping)

    def live(self) -> list[SimDataplane]:
        return [c for c in self.connections if not c.gone]

    def command(self, command: dict[str, Any]) -> None:
        what = command["cmd"]
        if what == "watch":
            self.watch, self.arrivals = command["service"], 0
            for simulated in self.connections:
                simulated.arrived = None
                simulated.at_watch = tcp_info(simulated.sock) if simulated.sock else ()
            self.emit({"event": "watching", "live": len(self.live())})
        elif what == "collect":
            self.collect(time.monotonic() + command["timeout"])
        elif what == "stop":
            for simulated in self.connections:
                if not simulated.gone:
                    simulated.tls.loseConnection()
            self.emit({"event": "stopped"})
            self.reactor.callLater(1.0, self.reactor.stop)

    def collect(self, deadline: float) -> None:
        if self.arrivals < len(self.connections) - self.dropped and time.monotonic() < deadline:
            self.reactor.callLater(0.01, self.collect, deadline)
            return
        # A moment for the last acks to go out before their octets are counted.
        self.reactor.callLater(0.05, self.report)

    def report(self) -> None:
        live = self.live()
        held = [c for c in live if c.arrived is not None and c.at_watch and c.at_arrival]
        now = [tcp_info(c.sock) if c.sock else () for c in held]
        pairs = list(zip(held, now, strict=True))
        self.emit(
            {
                "event": "collected",
                "live": len(live),
                "held": len(held),
                "dropped": self.dropped,
                "times": [c.arrived for c in held],
                "received": [c.received for c in held],
                "frame": [c.frame_octets for c in held],
                # zone -> dataplane, up to the change's arrival
                "in_octets": [c.at_arrival[0] - c.at_watch[0] for c in held],
                "in_segments": [c.at_arrival[1] - c.at_watch[1] for c in held],
                "in_data_segments": [c.at_arrival[2] - c.at_watch[2] for c in held],
                # dataplane -> zone: the ack, and the kernel's acks of the change
                "out_segments": [n[3] - c.at_watch[3] for c, n in pairs],
                "out_data_segments": [n[4] - c.at_watch[4] for c, n in pairs],
                "out_octets": [n[5] - c.at_watch[5] for c, n in pairs],
            }
        )


class Control(LineReceiver):
    """The bench's commands, one JSON object a line on stdin; events back on stdout."""

    delimiter = b"\n"

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def lineReceived(self, line: bytes) -> None:
        self.pool.command(json.loads(line))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.pool.reactor.running:
            self.pool.reactor.stop()  # the bench is gone


def client_main(argv: list[str]) -> int:
    """Hold COUNT dataplane connections to the zone; take commands as JSON lines on stdin."""
    parser = argparse.ArgumentParser()
    add = parser.add_argument
    add("--port", type=int, required=True)
    add("--certs", required=True, help="PEM file with every simulated dataplane's certificate")
    add("--key", required=True, help="their key (one for all)")
    add("--ca", required=True)
    add("--first", type=int, required=True)
    add("--count", type=int, required=True)
    add("--window", type=int, required=True)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # pyOpenSSL's deprecations, on stderr per call
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.count + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, NOFILE), hard))
    epollreactor.install()
    from twisted.internet import reactor

    tcp.Connection.doRead = read_stamped  # type: ignore[method-assign]
    pems = x509.load_pem_x509_certificates(Path(args.certs).read_bytes())
    certificates = [
        crypto.X509.from_cryptography(c) for c in pems[args.first : args.first + args.count]
    ]
    if len(certificates) < args.count:
        raise SystemExit(
            f"{args.certs}: {len(pems)} certificates, {args.first + args.count} needed"
        )
    key: Any = serialization.load_pem_private_key(Path(args.key).read_bytes(), password=None)
    creator = Creator(args.ca, certificates, crypto.PKey.from_cryptography_key(key), args.first)
    pool = Pool(reactor, args, creator)
    pool.control = Control(pool)
    stdio.StandardIO(pool.control)
    task.LoopingCall(pool.heartbeat).start(1.0, now=False)
    reactor.callWhenRunning(pool.fill)
    reactor.run()
    return 0


# -- the bench ------------------------------------------------------------------


class SimClients(Server):
    """A process of simulated dataplanes, driven through its stdin and stdout; always stopped."""

    def __init__(self, label: str, command: list[str], work: Path, cpus: str) -> None:
        # Not Server.__init__: this one talks over pipes; stopping is Server's.
        self.label = label
        self.port = 0
        self.output = work / f"{label}.err"
        self.logs = [self.output]
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        with self.output.open("wb") as err:
            self.process = subprocess.Popen(
                ["taskset", "-c", cpus, *command],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        RUNNING.append(self)
        threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()

    def _read(self, out: IO[bytes] | None) -> None:
        assert out is not None
        for line in out:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                continue
        self.events.put(None)

    def send(self, command: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(command).encode() + b"\n")
            self.process.stdin.flush()
        except OSError:
            raise self.failed("its stdin is closed") from None

    def event(self, kind: str, timeout: float) -> dict[str, Any]:
        """The next event of C{kind} (others are skipped); L{BenchError} past C{timeout}."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.failed(f"no {kind} after {timeout:.0f} s")
            try:
                event = self.events.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if event is None:
                raise self.failed(f"exited ({self.process.poll()}) before {kind}")
            if event.get("event") == kind:
                return event


def raise_nofile() -> None:
    """Open files for everything this script starts (they inherit the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def make_certs(work: Path, simulated: int) -> Path:
    """The CA, the zones' certificate (127.0.0.1 in it) and one real dataplane's, by
    `kumazone certs`; then C{simulated} dataplane certificates from that CA, one key for
    all (the zone checks each as it checks any), written to dataplanes.pem."""
    certs = work / "certs"
    done = subprocess.run(
        [
            str(BIN / "kumazone"),
            "certs",
            "--out",
            str(certs),
            "--zone",
            "bench-zone",
            "--zone-host",
            "127.0.0.1",
            "--dataplane",
            f"{MESH}/dp-bench",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise BenchError(f"kumazone certs failed: {done.stderr.strip()[-500:]}")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    ca_key: Any = serialization.load_pem_private_key(
        (certs / "ca-key.pem").read_bytes(), password=None
    )
    key = ec.generate_private_key(ec.SECP256R1())
    (certs / "dataplanes-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    now = datetime.datetime.now(datetime.UTC)
    authority = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    with (certs / "dataplanes.pem").open("wb") as out:
        for i in range(simulated):
            identity = f"{MESH}/sim-{i}"
            certificate = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
                .issuer_name(ca_cert.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(
                    x509.SubjectAlternativeName(
                        [x509.UniformResourceIdentifier(f"spiffe://{identity}")]
                    ),
                    critical=False,
                )
                .add_extension(
                    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
                )
                .add_extension(LEAF_KEY_USAGE, critical=True)
                .add_extension(authority, critical=False)
                .sign(ca_key, hashes.SHA256())
            )
            out.write(certificate.public_bytes(serialization.Encoding.PEM))
    return certs


def zone_tls(certs: Path) -> list[str]:
    return [
        "--dp-interface=127.0.0.1",  # benchlib.start_zone gives --dp-port=0
        f"--tls-cert={certs / 'bench-zone.pem'}",
        f"--tls-key={certs / 'bench-zone-key.pem'}",
        f"--tls-ca={certs / 'ca.pem'}",
    ]


def start_dp_zone(
    work: Path, label: str, services: int, certs: Path
) -> tuple[Server, dict[str, Any]]:
    """A standalone zone with C{services} services and its dataplane port (mutual TLS)."""
    resources = work / f"{label}-resources"
    write_services(resources, services)
    server, info = start_zone(
        work,
        label,
        resources,
        f"svc-{services - 1}.mesh",
        120 + services / 200,
        zone_tls(certs),
        SERVER_CPU,
    )
    ports = json.loads((work / f"{label}-data" / "ports.json").read_text())
    if "dp" not in ports:
        raise server.failed("ports.json names no dataplane port (dp)")
    info["dp"] = int(ports["dp"])
    return server, info


def fanout_seconds(diagnostics: int) -> tuple[float, float]:
    """(sum, count) of the zone's kumazone_dataplane_fanout_seconds histogram."""
    status, body = http_get(f"http://127.0.0.1:{diagnostics}/metrics")
    if status != 200:
        return float("nan"), 0.0
    text = body.decode(errors="replace")
    found = {}
    for name in ("sum", "count"):
        match = re.search(rf"(?m)^kumazone_dataplane_fanout_seconds_{name}\S*\s+(\S+)$", text)
        found[name] = float(match.group(1)) if match else float("nan")
    return found["sum"], found["count"]


def cpu_rate(server: Server, seconds: float) -> float:
    """The share of a CPU C{server} used over the next C{seconds}."""
    before = server.cpu_seconds()
    time.sleep(seconds)
    return (server.cpu_seconds() - before) / seconds


def settle(zone: Server, idle: float, bound: float = 10.0) -> None:
    """Wait (up to C{bound} s) until the zone is back to its idle CPU use: each change
    is measured from a quiet zone, not on the tail of the one before."""
    deadline = time.monotonic() + bound
    while cpu_rate(zone, 0.5) > idle * 1.3 + 0.05 and time.monotonic() < deadline:
        pass


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def measure_fanout(
    args: argparse.Namespace, work: Path, certs: Path, n: int, report: dict[str, Any]
) -> None:
    """N simulated dataplanes on a fresh zone: connect, CHANGES changes, memory."""
    result: dict[str, Any] = {"n": n}
    report.setdefault("fanout", []).append(result)
    label = f"fanout-{n}"
    print(f"{n} dataplanes: starting a zone with {args.services} services ...", flush=True)
    zone, info = start_dp_zone(work, label, args.services, certs)
    time.sleep(1.0)
    result["rss_before"] = zone.rss_mb()
    cpu_before = zone.cpu_seconds()
    processes = args.clients or (2 if n >= 2000 else 1)
    share = [n // processes + (1 if p < n % processes else 0) for p in range(processes)]
    clients: list[SimClients] = []
    first = 0
    started = time.monotonic()
    for p, count in enumerate(share):
        clients.append(
            SimClients(
                f"{label}-clients-{p}",
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--client",
                    "--port",
                    str(info["dp"]),
                    "--certs",
                    str(certs / "dataplanes.pem"),
                    "--key",
                    str(certs / "dataplanes-key.pem"),
                    "--ca",
                    str(certs / "ca.pem"),
                    "--first",
                    str(first),
                    "--count",
                    str(count),
                    "--window",
                    str(args.window),
                ],
                work,
                DNSPERF_CPU,
            )
        )
        first += count
    connected = [c.event("connected", args.connect_timeout) for c in clients]
    result["connect_seconds"] = time.monotonic() - started
    result["connected"] = sum(int(e["ready"]) for e in connected)
    result["connect_failures"] = [w for e in connected for w in e["why"]]
    result["zone_cpu_per_connection"] = (zone.cpu_seconds() - cpu_before) / max(1, n)
    print(
        f"{n} dataplanes: {result['connected']} connected in {result['connect_seconds']:.1f} s",
        flush=True,
    )
    time.sleep(2.0)  # settled: heartbeats, acks
    result["rss_connected"] = zone.rss_mb()
    result["client_rss"] = sum(c.rss_mb() for c in clients)
    idle = cpu_rate(zone, 3.0)
    result["zone_idle_cpu"] = idle
    fan_sum, fan_count = fanout_seconds(info["diagnostics"])
    changes: list[dict[str, Any]] = []
    for k in range(args.changes):
        service = f"svc-{args.services + k}"  # a name as long as the zone's others
        for client in clients:
            client.send({"cmd": "watch", "service": service})
        live = sum(int(c.event("watching", 30)["live"]) for c in clients)
        before = zone.cpu_seconds()
        start = time.time()  # the clients' times are the wall clock's (the kernel's stamps)
        status, _, put_seconds = http_request(
            f"http://127.0.0.1:{info['api']}/meshes/{MESH}/dataplanes/{service}",
            "PUT",
            dataplane(service, service, address(k, 11)),
            timeout=30,
        )
        if status not in (200, 201):
            raise zone.failed(f"PUT {service} answered {status}")
        for client in clients:
            client.send({"cmd": "collect", "timeout": args.change_timeout})
        collected = [c.event("collected", args.change_timeout + 30) for c in clients]
        cpu = zone.cpu_seconds() - before
        times = [t for e in collected for t in e["times"]]
        received = [t for e in collected for t in e["received"]]
        held = sum(int(e["held"]) for e in collected)

        def values(key: str, events: list[dict[str, Any]] = collected) -> list[float]:
            return [v for e in events for v in e[key]]

        change = {
            "live": live,
            "held": held,
            "put": put_seconds,
            "all": (max(received) - start) if received and held >= live else float("inf"),
            "median": (median(received) - start) if received else float("inf"),
            "read_all": (max(times) - start) if times and held >= live else float("inf"),
            "cpu": cpu,
            **{
                key: median(values(key))
                for key in (
                    "frame",
                    "in_octets",
                    "in_segments",
                    "in_data_segments",
                    "out_octets",
                    "out_segments",
                    "out_data_segments",
                )
            },
        }
        changes.append(change)
        print(
            f"{n} dataplanes: change {k + 1}: PUT {put_seconds * 1000:.0f} ms, "
            f"{held} of {live} hold it, all after {change['all'] * 1000:.0f} ms "
            f"(median {change['median'] * 1000:.0f} ms, all read {change['read_all'] * 1000:.0f}"
            f" ms); frame {change['frame']:.0f} octets, TLS {change['in_octets']:.0f}; "
            f"zone CPU {cpu:.2f} s",
            flush=True,
        )
        settle(zone, idle)
    fan_sum_after, fan_count_after = fanout_seconds(info["diagnostics"])
    result["changes"] = changes
    result["zone_fanout_mean"] = (
        (fan_sum_after - fan_sum) / (fan_count_after - fan_count)
        if fan_count_after > fan_count
        else float("nan")
    )
    result["rss_after"] = zone.rss_mb()
    if not zone.alive():
        raise zone.failed("exited during the changes")
    for client in clients:
        client.send({"cmd": "stop"})
    for client in clients:
        try:
            client.event("stopped", 30)
        except BenchError:
            pass
        client.stop()
    zone.stop()


def port_53_free(host: str) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((host, 53))
            except OSError:
                return False
    return True


def start_upstream(work: Path) -> Server:
    """NSD on 127.0.0.1 port 53 serving OUTSIDE: the dataplane's upstream."""
    if not port_53_free("127.0.0.1"):
        raise BenchError("port 53 on 127.0.0.1 is taken: the upstream of the forwarding runs")
    directory = work / "upstream"
    directory.mkdir()
    zone_file = directory / "outside.zone"
    lines = [
        f"$ORIGIN {OUTSIDE}.",
        "$TTL 300",
        f"@ IN SOA ns.{OUTSIDE}. hostmaster.{OUTSIDE}. 1 3600 600 86400 60",
        f"@ IN NS ns.{OUTSIDE}.",
        "ns IN A 127.0.0.1",
    ]
    for i in range(OUTSIDE_HOSTS):
        lines.append(f"host-{i} IN A 127.77.{i // 256}.{i % 256}")
        lines.append(f"host-{i} IN AAAA fd77::{i:x}")
    zone_file.write_text("\n".join(lines) + "\n")
    conf = directory / "nsd.conf"
    conf.write_text(
        f"""server:
    ip-address: 127.0.0.1
    port: 53
    do-ip6: no
    server-count: 1
    username: ""
    zonesdir: "{directory}"
    database: ""
    zonelistfile: "{directory}/zone.list"
    xfrdfile: "{directory}/xfrd.state"
    xfrdir: "{directory}"
    pidfile: "{directory}/nsd.pid"
    logfile: "{directory}/nsd.log"
    cookie-secret-file: "{directory}/cookiesecrets.txt"
    zonefiles-write: 0
    rrl-ratelimit: 0
    rrl-whitelist-ratelimit: 0
remote-control:
    control-enable: no
zone:
    name: {OUTSIDE}
    zonefile: "{zone_file}"
"""
    )
    server = Server(
        "upstream", [tool("nsd") or "nsd", "-d", "-c", str(conf)], work, [directory / "nsd.log"]
    )
    server.port = 53
    server.wait_until(
        lambda: resolves(53, f"host-1.{OUTSIDE}"), 60, f"an answer for host-1.{OUTSIDE}"
    )
    return server


def write_outside_queries(path: Path, count: int = 100_000) -> None:
    """dns_bench's shape for outside names: 90% existing (A and AAAA), 10% unknown."""
    rng = random.Random(13)
    lines = []
    for i in range(count):
        qtype = "A" if rng.random() < 0.5 else "AAAA"
        if i % 10 == 9:
            lines.append(f"no-such-{rng.randrange(10**9)}.{OUTSIDE} {qtype}")
        else:
            lines.append(f"host-{rng.randrange(OUTSIDE_HOSTS)}.{OUTSIDE} {qtype}")
    path.write_text("\n".join(lines) + "\n")


def start_dataplane(work: Path, certs: Path, dp_port: int, resolv_conf: Path, last: str) -> Server:
    """The real dataplane process, synced with the zone, answering C{last}."""
    data = work / "dataplane-data"
    log = work / "dataplane.log"
    server = Server(
        "dataplane",
        [
            str(BIN / "twistd"),
            "-n",
            "--pidfile=",
            f"--logfile={log}",
            "kumazone",
            "--role=dataplane",
            f"--cp-address=127.0.0.1:{dp_port}",
            f"--tls-cert={certs / f'dp-{MESH}-dp-bench.pem'}",
            f"--tls-key={certs / f'dp-{MESH}-dp-bench-key.pem'}",
            f"--tls-ca={certs / 'ca.pem'}",
            f"--data-dir={data}",
            "--dns-port=0",
            "--dns-interface=127.0.0.1",
            "--diagnostics-port=0",
            f"--resolv-conf={resolv_conf}",
        ],
        work,
        [log],
    )
    ports: dict[str, Any] = {}

    def read_ports() -> bool:
        try:
            ports.update(json.loads((data / "ports.json").read_text()))
        except (OSError, ValueError):
            return False
        return "dns" in ports and "diagnostics" in ports

    server.wait_until(read_ports, 60, "ports.json")
    server.port = int(ports["dns"])
    ready = f"http://127.0.0.1:{ports['diagnostics']}/ready"
    server.wait_until(
        lambda: http_get(ready)[0] == 200 and resolves(server.port, last),
        120,
        f"/ready 200 and an answer for {last}",
    )
    return server


def measure_dns(args: argparse.Namespace, work: Path, certs: Path, report: dict[str, Any]) -> None:
    """The dataplane's .mesh queries/s beside the zone and NSD; its forwarding overhead."""
    dns: dict[str, Any] = {}
    report["dns"] = dns
    print(f"resolver: starting a zone with {args.dns_services} services ...", flush=True)
    zone, info = start_dp_zone(work, "dns-zone", args.dns_services, certs)
    zone.label = "zone"
    table = read_vips(zone, f"http://127.0.0.1:{info['api']}/vips?size=1000")
    last = table["items"][-1]["names"][0]
    upstream = start_upstream(work)
    resolv_conf = work / "resolv.conf"
    resolv_conf.write_text("# the dataplane's upstream: NSD on port 53\nnameserver 127.0.0.1\n")
    print("resolver: starting the dataplane and NSD ...", flush=True)
    dp = start_dataplane(work, certs, info["dp"], resolv_conf, last)
    zone_file = work / "mesh.zone"
    write_zone_file(zone_file, table)
    nsd = start_nsd(work, zone_file, last)
    for server in (dp, zone, nsd):
        if not (
            resolves(server.port, last, "AAAA") and dns_query(server.port, "no-such.mesh")[0] == 3
        ):
            raise server.failed(f"does not answer {last} AAAA, or no-such.mesh is not NXDOMAIN")
    outside = f"host-7.{OUTSIDE}"
    for port in (dp.port, 53):
        if not resolves(port, outside) or dns_query(port, f"no-such.{OUTSIDE}")[0] != 3:
            raise dp.failed(f"port {port}: no answer for {outside}, or no NXDOMAIN for no-such")

    queries = work / "queries.txt"
    write_queries(queries, table)
    servers = [dp, zone, nsd]
    for server in servers:
        result = dnsperf(server.port, queries, 300, once=True)
        dns[f"first_{server.label}"] = result["qps"]
        print(f"first pass {server.label:9} {result['qps']:9.0f} qps", flush=True)
    full: dict[str, list[float]] = {s.label: [] for s in servers}
    lost: dict[str, float] = {s.label: 0 for s in servers}
    for run in range(args.runs):
        for server in servers:
            result = dnsperf(server.port, queries, args.seconds)
            full[server.label].append(result["qps"])
            lost[server.label] += result["lost"]
            print(f".mesh run {run + 1} {server.label:9} {result['qps']:9.0f} qps", flush=True)
    for label in full:
        dns[f"qps_{label}"] = median(full[label])
        dns[f"lost_{label}"] = lost[label]
    dns["rss_dataplane"] = dp.rss_mb()

    outside_queries = work / "outside.txt"
    write_outside_queries(outside_queries)
    paths = {"via dataplane": dp.port, "direct": 53}
    fwd: dict[str, list[float]] = {label: [] for label in paths}
    fwd_lost: dict[str, float] = dict.fromkeys(paths, 0.0)
    for run in range(args.runs):
        for label, port in paths.items():
            result = dnsperf(port, outside_queries, args.seconds)
            fwd[label].append(result["qps"])
            fwd_lost[label] += result["lost"]
            print(f"outside run {run + 1} {label:13} {result['qps']:9.0f} qps", flush=True)
    for label, port in paths.items():
        dns[f"fwd_qps_{label}"] = median(fwd[label])
        dns[f"fwd_lost_{label}"] = fwd_lost[label]
        result = dnsperf(port, outside_queries, args.rate_seconds, args.fwd_rate)
        dns[f"fwd_mean_{label}"] = result["mean_ms"]
        dns[f"fwd_p99_{label}"] = result["p99_ms"]
        dns[f"fwd_rate_{label}"] = result["qps"]
        dns[f"fwd_rate_lost_{label}"] = result["lost"]
        print(
            f"outside {args.fwd_rate} qps {label:13} mean {result['mean_ms']:.3f} ms, "
            f"p99 {result['p99_ms']:.3f} ms, lost {result['lost']:.0f}",
            flush=True,
        )
    for server in (dp, zone, nsd, upstream):
        if not server.alive():
            raise server.failed("exited during the runs")
        server.stop()


# -- the table ------------------------------------------------------------------


def ms(seconds: float) -> str:
    if seconds != seconds:
        return "-"
    if seconds == float("inf"):
        return "never"
    return f"{seconds * 1000:.1f} ms" if seconds < 0.1 else f"{seconds * 1000:.0f} ms"


def rows(args: argparse.Namespace, report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, value, target, met) for every figure measured."""
    out: list[tuple[str, str, str, str]] = []

    def row(figure: str, value: str, target: str = "", met: bool | None = None) -> None:
        out.append((figure, value, target, "" if met is None else "met" if met else "MISSED"))

    # IPv4 (20) + TCP (20, and 12 of timestamps when on) per segment.
    try:
        stamps = Path("/proc/sys/net/ipv4/tcp_timestamps").read_text().strip() != "0"
    except OSError:
        stamps = True
    header = 52 if stamps else 40
    for result in report.get("fanout", []):
        n = result["n"]
        if "connected" not in result:
            continue
        row(
            f"{n:,} dataplanes ({args.services:,} services): connected",
            f"{result['connected']:,} in {result['connect_seconds']:.1f} s "
            f"(zone CPU {result['zone_cpu_per_connection'] * 1000:.2f} ms each)",
            f"{n:,}",
            result["connected"] == n,
        )
        changes = result.get("changes", [])
        if not changes:
            continue
        every = [c["all"] for c in changes]
        row(
            f"  PUT -> all {n:,} hold it (kernel): median / worst of {len(changes)}",
            f"{ms(median(every))} / {ms(max(every))}",
            "worst < 1 s",
            max(every) < 1.0,
        )
        row(
            "  PUT -> the median dataplane holds it; PUT itself",
            f"{ms(median([c['median'] for c in changes]))}; "
            f"{ms(median([c['put'] for c in changes]))}",
        )
        read = [c["read_all"] for c in changes]
        row(
            "  PUT -> all read by the simulated dataplanes",
            f"{ms(median(read))} / {ms(max(read))}",
        )
        row(
            "  zone: fan-out (metric: change -> all written)",
            f"{ms(result['zone_fanout_mean'])} mean",
        )
        row(
            "  zone: CPU per change; idle (heartbeats)",
            f"{median([c['cpu'] for c in changes]):.2f} s; {result['zone_idle_cpu']:.0%} of a CPU",
        )
        frame = median([c["frame"] for c in changes])
        tls = median([c["in_octets"] for c in changes])
        row(
            "  one-service change per dataplane: frame", f"{frame:.0f} octets", "< 200", frame < 200
        )
        row(
            "  ... TLS record (TCP payload, kernel count)",
            f"{tls:.0f} octets",
            "< 200",
            tls < 200,
        )
        segments_in = median([c["in_segments"] for c in changes])
        out_octets = median([c["out_octets"] for c in changes])
        segments_out = median([c["out_segments"] for c in changes])
        row(
            "  ... as IPv4 packets: zone -> dp; dp -> zone (ack)",
            f"{tls + header * segments_in:.0f} ({segments_in:.0f} seg); "
            f"{out_octets + header * segments_out:.0f} ({segments_out:.0f} seg)",
        )
        per = (result["rss_connected"] - result["rss_before"]) * 1024 / max(1, n)
        row(
            "  zone RSS per connection",
            f"{per:.1f} KB ({result['rss_before']:.0f} -> {result['rss_connected']:.0f} MB)",
        )
        row(
            "  simulated dataplanes' RSS per connection",
            f"{result['client_rss'] * 1024 / max(1, n):.1f} KB",
        )
    dns = report.get("dns", {})
    if "qps_dataplane" in dns:
        dp, zone, nsd = dns["qps_dataplane"], dns["qps_zone"], dns["qps_nsd"]
        row(f".mesh qps ({args.dns_services:,} services): dataplane", f"{dp:,.0f}")
        row(".mesh qps: zone", f"{zone:,.0f}")
        row(".mesh qps: NSD", f"{nsd:,.0f}")
        row(".mesh: dataplane / NSD; dataplane / zone", f"{dp / nsd:.2f}; {dp / zone:.2f}")
        row(
            "  first pass (cold) dataplane / zone / NSD",
            f"{dns['first_dataplane']:,.0f} / {dns['first_zone']:,.0f} / {dns['first_nsd']:,.0f}",
        )
        row(
            "  lost: dataplane / zone / NSD",
            f"{dns['lost_dataplane']:.0f} / {dns['lost_zone']:.0f} / {dns['lost_nsd']:.0f}",
        )
        row("  dataplane RSS", f"{dns['rss_dataplane']:.0f} MB")
    if "fwd_qps_direct" in dns:
        via, direct = dns["fwd_qps_via dataplane"], dns["fwd_qps_direct"]
        row("outside names qps: through the dataplane", f"{via:,.0f}")
        row("outside names qps: straight to the upstream", f"{direct:,.0f}")
        row("  through / straight", f"{via / direct:.2f}")
        row(
            "  lost: through / straight",
            f"{dns['fwd_lost_via dataplane']:.0f} / {dns['fwd_lost_direct']:.0f}",
        )
        rate = args.fwd_rate
        for what in ("mean", "p99"):
            v, d = dns[f"fwd_{what}_via dataplane"], dns[f"fwd_{what}_direct"]
            row(
                f"outside names {what} latency @{rate:,} q/s: through / straight",
                f"{v:.3f} / {d:.3f} ms ({v / d:.1f} x, +{v - d:.3f} ms)",
            )
        short = [
            label
            for label in ("via dataplane", "direct")
            if dns[f"fwd_rate_{label}"] < 0.95 * rate or dns[f"fwd_rate_lost_{label}"]
        ]
        if short:
            row("  rate NOT reached or queries lost", ", ".join(short))
    return out


def print_report(args: argparse.Namespace, report: dict[str, Any]) -> None:
    print_machine(report)
    print(
        "servers (zone, dataplane, NSD, upstream NSD) on CPU 0; dnsperf and the simulated "
        f"dataplanes on CPU 1;\nfan-out: mutual TLS on 127.0.0.1, {args.changes} changes per N "
        f"(one new service each); DNS runs {args.seconds} s at full speed (dnsperf -c 4 -q 200), "
        f"the median of {args.runs}, latency {args.rate_seconds} s at {args.fwd_rate:,} q/s\n"
    )
    table = rows(args, report)
    widths = [max(len(r[i]) for r in [("figure", "value", "target", ""), *table]) for i in range(3)]
    head = f"{'figure':{widths[0]}}  {'value':{widths[1]}}  {'target':{widths[2]}}  result"
    print(head)
    print("-" * len(head))
    for figure, value, target, met in table:
        print(f"{figure:{widths[0]}}  {value:{widths[1]}}  {target:{widths[2]}}  {met}".rstrip())
    targets = [r for r in table if r[3]]
    missed = [r for r in targets if r[3] != "met"]
    print(f"\n{len(targets) - len(missed)} of {len(targets)} targets met")
    for figure, _, target, _ in missed:
        print(f"  missed: {figure.strip()} ({target})")
    for error in report.get("errors", []):
        print(f"  not measured: {error}")


def main() -> int:
    if sys.argv[1:2] == ["--client"]:
        return client_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    add = parser.add_argument
    add(
        "--connections",
        default="1000,10000",
        help="numbers of simulated dataplanes, comma-separated (each on a fresh zone)",
    )
    add("--services", type=int, default=2000, help="services of the fan-out zone")
    add("--changes", type=int, default=5, help="changes timed per number of dataplanes")
    add("--clients", type=int, default=0, help="client processes (0: 2 from 2,000 on, else 1)")
    add("--window", type=int, default=25, help="connections on their way at once, per process")
    add("--connect-timeout", type=float, default=240, help="bound on connecting them all (s)")
    add("--change-timeout", type=float, default=10, help="bound on one change's delivery (s)")
    add("--dns-services", type=int, default=10_000, help="services of the resolver's zone")
    add("--seconds", type=int, default=10, help="length of each full-speed DNS run")
    add("--runs", type=int, default=2, help="full-speed runs per server (median)")
    add("--fwd-rate", type=int, default=1000, help="the fixed rate of the latency runs (q/s)")
    add("--rate-seconds", type=int, default=5, help="length of each latency run")
    add("--no-fanout", action="store_true", help="skip the fan-out")
    add("--no-dns", action="store_true", help="skip the resolver runs")
    add("--quick", action="store_true", help="a smoke run: small numbers, short runs")
    args = parser.parse_args()
    if args.quick:
        args.connections, args.services, args.changes = "300,1000", 500, 3
        args.dns_services, args.seconds, args.runs = 2000, 3, 1
        args.rate_seconds = 3
    try:
        counts = [int(c) for c in args.connections.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--connections: {args.connections!r} is not numbers separated by commas")
    if min([*counts, args.services, args.changes, args.window, args.dns_services, 1]) < 1:
        parser.error("--connections, --services, --changes, --window must be >= 1")
    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGHUP, raise_interrupt)
    report: dict[str, Any] = {"load_start": load(), "errors": []}
    started = time.monotonic()
    try:
        check_tools()
        raise_nofile()
        with tempfile.TemporaryDirectory(prefix="kumazone-dataplane-bench-") as tmp:
            work = Path(tmp)
            try:
                os.sched_setaffinity(0, {int(DNSPERF_CPU)})  # off the servers' CPU
                print("making certificates ...", flush=True)
                certs = make_certs(work, 0 if args.no_fanout else max(counts))
                if not args.no_fanout:
                    for n in counts:
                        measure_fanout(args, work, certs, n, report)
                if not args.no_dns:
                    measure_dns(args, work, certs, report)
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C waits
                stop_all()
                signal.signal(signal.SIGINT, signal.default_int_handler)
    except BenchError as e:
        print(f"dataplane_bench: {e}", file=sys.stderr)
        report["errors"].append(str(e).splitlines()[0])
    except KeyboardInterrupt:
        print("dataplane_bench: interrupted; every server stopped", file=sys.stderr)
        return 130
    report["load_end"] = load()
    print_report(args, report)
    print(f"(the whole run took {(time.monotonic() - started) / 60:.1f} min)")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
