"""The dataplane's resolver over real sockets: its mesh's names from the table, the rest upstream.

Upstreams are real servers on port 53 (as root; else one high port for all) of
their own loopback addresses, 127.0.53.1 to 127.0.53.8: dnsmasq serving an
outside name and a large TXT record, and small servers in this test's threads
that answer, answer SERVFAIL or REFUSED, never answer, truncate over UDP, or
spoof; 127.0.53.4 has nothing listening.  The DNS servers under test
(L{DataplaneDNSFactory}, and a zone's L{KumaDNSServerFactory} over the same
table to compare with) run in one child process (this module run as a script),
each on 127.0.0.1 port 0, UDP and TCP, with its own resolv.conf and metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from kumazone.core.config import DnsServerConfig
from kumazone.core.vips import ServiceKey
from kumazone.core.zone import VipEntry, ZoneSnapshot
from kumazone.dataplane.forwarder import servfail_answer

REPO = Path(__file__).resolve().parent.parent.parent
CONFIG = DnsServerConfig()  # mesh, 240.0.0.0/4, fd00:fd00::/64
MESH = "default"
SNAPSHOT = ZoneSnapshot(
    version=3,
    entries=(
        VipEntry(
            ServiceKey("default", "redis_db_svc_6379"),
            "240.0.0.10",
            "fd00:fd00::a",
            ("redis_db_svc_6379.mesh", "redis.db.svc.6379.mesh"),
        ),
        VipEntry(ServiceKey("default", "web"), "240.0.0.11", "fd00:fd00::b", ("web.mesh",)),
        VipEntry(ServiceKey("payments", "ledger"), "240.0.0.30", "fd00:fd00::1e", ("ledger.mesh",)),
    ),
    mesh_of_address={},
)
#: Seconds the dataplanes under test give the upstreams (2.0 in production).
BUDGET = 1.0
DNSMASQ = "127.0.53.1"
ANSWERS = "127.0.53.2"  # answers 192.0.2.2 for any name
ANSWERS_TOO = "127.0.53.3"  # answers 192.0.2.3
DEAD = "127.0.53.4"  # nothing listens
SILENT = "127.0.53.5"  # reads, never answers
SERVFAIL = "127.0.53.6"
REFUSED = "127.0.53.7"
SPOOFER = "127.0.53.8"  # answers after three datagrams that must be ignored
TRUNCATES = "127.0.53.9"  # TC over UDP, 40 records over TCP
SLOW = "127.0.53.10"  # answers each query after SLOW_DELAY
ALL = (DNSMASQ, ANSWERS, ANSWERS_TOO, DEAD, SILENT, SERVFAIL, REFUSED, SPOOFER, TRUNCATES, SLOW)
#: An IPv6 upstream, named with a scope in resolv.conf (which glibc, and so the
#: forwarder, ignores for an address that is not link-local).
IPV6 = "::1"
SLOW_DELAY = 0.5
TXT_STRINGS = [chr(ord("a") + i) * 200 for i in range(5)]  # about 1,000 octets of TXT


# -- the child process --------------------------------------------------------------


def serve(spec_path: str) -> None:
    """Run the DNS servers C{spec_path} lists until killed; write their ports beside it."""
    from prometheus_client.twisted import MetricsResource
    from twisted.internet import reactor
    from twisted.web.server import Site

    from kumazone.dataplane.forwarder import Forwarder
    from kumazone.dataplane.metrics import DataplaneMetrics
    from kumazone.dataplane.resolver import DataplaneAuthority, DataplaneDNSFactory
    from kumazone.dns import udpbatch
    from kumazone.dns.authority import MeshAuthority
    from kumazone.dns.server import KumaDNSDatagramProtocol, KumaDNSServerFactory
    from kumazone.metrics import Metrics

    spec = json.loads(Path(spec_path).read_text())
    ports: dict[str, dict[str, int]] = {}
    r: Any = reactor
    for name, instance in spec["instances"].items():
        metrics = Metrics("dp")
        factory: KumaDNSServerFactory
        if instance.get("zone"):
            zone_authority = MeshAuthority(CONFIG, ("127.0.0.1",))
            zone_authority.update(SNAPSHOT)
            factory = KumaDNSServerFactory(zone_authority, lambda _a: MESH, metrics, r)
        else:
            authority = DataplaneAuthority(CONFIG, ("127.0.0.1",))
            authority.update(SNAPSHOT)
            dp_metrics = DataplaneMetrics(metrics.registry)
            forwarder = Forwarder(
                instance["resolv_conf"], r, dp_metrics, timeout=BUDGET, port=spec["port"]
            )
            factory = DataplaneDNSFactory(authority, MESH, metrics, dp_metrics, forwarder, r)
        for _attempt in range(20):
            protocol = KumaDNSDatagramProtocol(factory)
            if udpbatch.available and not instance.get("stock_udp"):
                udp: Any = udpbatch.BatchedDNSPort(0, protocol, "127.0.0.1", reactor=r)
                udp.startListening()
            else:
                udp = r.listenUDP(0, protocol, interface="127.0.0.1")
            port = udp.getHost().port
            try:
                r.listenTCP(port, factory, interface="127.0.0.1")
                break
            except Exception:
                udp.stopListening()
        site = Site(MetricsResource(registry=metrics.registry))
        web = r.listenTCP(0, site, interface="127.0.0.1")
        ports[name] = {"dns": port, "metrics": web.getHost().port}
    written = Path(spec_path).with_suffix(".ports")
    written.with_suffix(".tmp").write_text(json.dumps(ports))
    written.with_suffix(".tmp").replace(written)
    r.run()


# -- upstreams in this process ------------------------------------------------------


@dataclass
class Upstream:
    """A nameserver on (address, port) over UDP and TCP, run by threads of the test."""

    address: str
    port: int
    mode: str  # answer, servfail, refused, silent, spoof, truncate, slow
    value: str = "192.0.2.2"
    #: What it was asked: (name in lower case, type, "udp" or "tcp").
    asked: list[tuple[str, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stopped = threading.Event()
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        self.udp = socket.socket(family, socket.SOCK_DGRAM)
        self.udp.bind((self.address, self.port))
        self.udp.settimeout(0.1)
        self.tcp = socket.socket(family, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((self.address, self.port))
        self.tcp.listen(16)
        self.tcp.settimeout(0.1)
        self.threads = [
            threading.Thread(target=self._udp_loop, daemon=True),
            threading.Thread(target=self._tcp_loop, daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def names(self, transport: str | None = None) -> list[str]:
        return [name for name, _type, how in self.asked if transport in (None, how)]

    def answer(self, data: bytes, transport: str) -> list[bytes]:
        """The datagrams (or TCP messages) sent back for C{data}."""
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = str(question.name).lower()
        self.asked.append((name, dns.rdatatype.to_text(question.rdtype), transport))
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        if self.mode == "silent":
            return []
        if self.mode in ("servfail", "refused"):
            response.set_rcode(dns.rcode.SERVFAIL if self.mode == "servfail" else dns.rcode.REFUSED)
            return [response.to_wire()]
        records = 40 if self.mode == "truncate" else 1
        if question.rdtype == dns.rdatatype.A:
            values = [self.value] + [f"198.51.100.{i}" for i in range(1, records)]
            response.answer.append(dns.rrset.from_text_list(question.name, 30, "IN", "A", values))
        if self.mode == "truncate" and transport == "udp":
            response.answer = []
            response.flags |= dns.flags.TC
        real = response.to_wire()
        if self.mode != "spoof" or transport != "udp":
            return [real]
        other_id = bytes([real[0] ^ 0x55, real[1]]) + real[2:]
        other_name = dns.message.make_response(dns.message.make_query("other.test", "A"))
        other_name.id = query.id
        not_answer = bytes(real[:2]) + bytes([real[2] & 0x7F]) + real[3:]
        return [other_id, other_name.to_wire(), not_answer, real]

    def _udp_loop(self) -> None:
        while not self.stopped.is_set():
            try:
                data, client = self.udp.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            datagrams = self.answer(data, "udp")
            if self.mode == "slow":
                later = threading.Timer(SLOW_DELAY, self._send, (datagrams, client))
                later.daemon = True
                later.start()
            else:
                self._send(datagrams, client)

    def _send(self, datagrams: list[bytes], client: tuple[str, int]) -> None:
        for datagram in datagrams:
            try:
                self.udp.sendto(datagram, client)
            except OSError:
                return

    def _tcp_loop(self) -> None:
        while not self.stopped.is_set():
            try:
                connection, _client = self.tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._tcp_connection, args=(connection,), daemon=True).start()

    def _tcp_connection(self, connection: socket.socket) -> None:
        connection.settimeout(5)
        with connection:
            try:
                while True:
                    data = read_message(connection)
                    if data is None:
                        return
                    for message in self.answer(data, "tcp"):
                        connection.sendall(struct.pack("!H", len(message)) + message)
            except OSError:
                return

    def stop(self) -> None:
        self.stopped.set()
        self.udp.close()
        self.tcp.close()
        for thread in self.threads:
            thread.join(timeout=1)


def read_message(connection: socket.socket) -> bytes | None:
    """One length-prefixed DNS message from C{connection}; None at its end."""
    data = b""
    while len(data) < 2:
        chunk = connection.recv(2 - len(data))
        if not chunk:
            return None
        data += chunk
    (length,) = struct.unpack("!H", data)
    message = b""
    while len(message) < length:
        chunk = connection.recv(length - len(message))
        if not chunk:
            return None
        message += chunk
    return message


# -- fixtures -----------------------------------------------------------------------


def free_port() -> int:
    """53 as root; else a port free on every upstream address (resolv.conf takes one port)."""
    if os.geteuid() == 0:
        return 53
    for _attempt in range(50):
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind((ALL[0], 0))
        port = int(probe.getsockname()[1])
        probe.close()
        if all(is_free(address, port) for address in ALL):
            return port
    raise RuntimeError("no port free on all of 127.0.53.1-9")


def is_free(address: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        probe = socket.socket(family, kind)
        try:
            probe.bind((address, port))
        except OSError:
            return False
        finally:
            probe.close()
    return True


@dataclass
class World:
    """The upstreams, dnsmasq's log, and the DNS servers under test."""

    port: int
    upstreams: dict[str, Upstream]
    dnsmasq_log: Path | None
    ports: dict[str, dict[str, int]]
    resolv_confs: dict[str, Path]

    def dns_port(self, instance: str) -> int:
        return self.ports[instance]["dns"]

    def metric(self, instance: str, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample from C{instance}'s /metrics (0 when absent)."""
        url = f"http://127.0.0.1:{self.ports[instance]['metrics']}/"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        wanted = name
        if labels:
            inner = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
            wanted = f"{name}{{{inner}}}"
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            if canonical(key) == canonical(wanted):
                return float(value)
        return 0.0

    def dnsmasq_lines(self) -> str:
        assert self.dnsmasq_log is not None
        return self.dnsmasq_log.read_text()


def canonical(sample: str) -> str:
    """A sample name with its labels sorted, as written here."""
    if "{" not in sample:
        return sample
    name, _, labels = sample.partition("{")
    parts = sorted(part for part in labels.rstrip("}").split(",") if part)
    return name + "{" + ",".join(parts) + "}"


INSTANCES: dict[str, list[str]] = {
    "main": [DNSMASQ],
    "failover": [DEAD, SILENT, ANSWERS],
    "answered_no": [SERVFAIL, REFUSED, ANSWERS],
    "no_good_answer": [SERVFAIL, DEAD],
    "no_answer": [SILENT, DEAD],
    "spoofed": [SPOOFER],
    "truncated": [TRUNCATES],
    "changing": [ANSWERS],
    "stock_udp": [DNSMASQ],
    "slow": [SLOW],
    "ipv6": [f"{IPV6}%lo", DEAD],
}


def start_dnsmasq(port: int, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    log = tmp_path / "dnsmasq.log"
    as_root = ["--user=root", "--group=root"] if os.geteuid() == 0 else []
    txt = ",".join(f'"{text}"' for text in TXT_STRINGS)
    process = subprocess.Popen(
        [
            dnsmasq,
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            *as_root,
            f"--pid-file={tmp_path / 'dnsmasq.pid'}",
            f"--listen-address={DNSMASQ}",
            "--bind-interfaces",
            f"--port={port}",
            "--no-resolv",
            "--no-hosts",
            "--address=/outside.test/192.0.2.10",
            f"--txt-record=big.test,{txt}",
            # Truncates over UDP past 512 octets, whatever the client's EDNS size.
            "--edns-packet-max=512",
            "--log-queries",
            "--log-facility=-",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    probe = dns.message.make_query("outside.test", "A").to_wire()
    while True:
        assert process.poll() is None, f"dnsmasq exited: {log.read_text()}"
        try:
            if udp(probe, port, DNSMASQ, timeout=0.2):
                return process, log
        except OSError:
            pass
        assert time.monotonic() < deadline, f"dnsmasq does not answer: {log.read_text()}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp_path = tmp_path_factory.mktemp("dp-forwarder")
    port = free_port()
    busy = [address for address in ALL if not is_free(address, port)]
    assert not busy, f"port {port} is taken on {busy}: these tests need it free"
    upstreams = {
        ANSWERS: Upstream(ANSWERS, port, "answer"),
        ANSWERS_TOO: Upstream(ANSWERS_TOO, port, "answer", value="192.0.2.3"),
        SILENT: Upstream(SILENT, port, "silent"),
        SERVFAIL: Upstream(SERVFAIL, port, "servfail"),
        REFUSED: Upstream(REFUSED, port, "refused"),
        SPOOFER: Upstream(SPOOFER, port, "spoof"),
        TRUNCATES: Upstream(TRUNCATES, port, "truncate"),
        SLOW: Upstream(SLOW, port, "slow"),
    }
    if socket.has_ipv6 and is_free(IPV6, port):
        upstreams[IPV6] = Upstream(IPV6, port, "answer", value="192.0.2.6")
    dnsmasq: subprocess.Popen[bytes] | None = None
    log = None
    if shutil.which("dnsmasq") or os.path.exists("/usr/sbin/dnsmasq"):
        dnsmasq, log = start_dnsmasq(port, tmp_path)
    resolv_confs = {}
    instances: dict[str, dict[str, Any]] = {"zone": {"zone": True}}
    for name, nameservers in INSTANCES.items():
        resolv_conf = tmp_path / f"resolv-{name}.conf"
        lines = ["# as written by the test", "search example.com", "options ndots:1"]
        resolv_conf.write_text("\n".join(lines + [f"nameserver {a}" for a in nameservers]) + "\n")
        resolv_confs[name] = resolv_conf
        instances[name] = {"resolv_conf": str(resolv_conf), "stock_udp": name == "stock_udp"}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"port": port, "instances": instances}))
    server_log = tmp_path / "server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.process.test_dp_forwarder", str(spec)],
        cwd=REPO,
        stdout=server_log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    ports_file = spec.with_suffix(".ports")
    deadline = time.monotonic() + 30
    try:
        while not ports_file.exists():
            assert server.poll() is None, f"the DNS servers exited: {server_log.read_text()}"
            assert time.monotonic() < deadline, f"no ports: {server_log.read_text()}"
            time.sleep(0.02)
        ports = json.loads(ports_file.read_text())
        yield World(port, upstreams, log, ports, resolv_confs)
    finally:
        server.kill()
        server.wait()
        if dnsmasq is not None:
            dnsmasq.kill()
            dnsmasq.wait()
        for upstream in upstreams.values():
            upstream.stop()


needs_dnsmasq = pytest.mark.skipif(
    not (shutil.which("dnsmasq") or os.path.exists("/usr/sbin/dnsmasq")),
    reason="dnsmasq is not installed (make lab-tools installs dnsmasq-base)",
)


# -- clients ------------------------------------------------------------------------


def udp(data: bytes, port: int, host: str = "127.0.0.1", timeout: float = 3.0) -> bytes:
    """The answer to C{data} over UDP."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.send(data)
        return sock.recv(65535)


def tcp(data: bytes, port: int, host: str = "127.0.0.1") -> bytes:
    """The answer to C{data} over TCP."""
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(struct.pack("!H", len(data)) + data)
        answer = read_message(sock)
    assert answer is not None
    return answer


def make(name: str, rdtype: str = "A", **kwargs: Any) -> bytes:
    message = dns.message.make_query(name, rdtype, **kwargs)
    data: bytes = message.to_wire()
    return data


def dig(port: int, *args: str) -> str:
    command = ["dig", "@127.0.0.1", "-p", str(port), "+time=3", "+tries=1", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=10, check=True).stdout


def addresses(answer: bytes) -> list[str]:
    message = dns.message.from_wire(answer)
    return sorted(rr.address for rrset in message.answer for rr in rrset)


Ask = Callable[..., bytes]
TRANSPORTS = pytest.mark.parametrize("ask", [udp, tcp], ids=["udp", "tcp"])


# -- the mesh's names ---------------------------------------------------------------


MESH_QUERIES = [
    ("redis_db_svc_6379.mesh", "A"),
    ("REDIS.db.svc.6379.MESH", "AAAA"),
    ("web.mesh", "ANY"),
    ("web.mesh", "TXT"),  # NODATA
    ("nope.mesh", "A"),  # NXDOMAIN
    ("ledger.mesh", "A"),  # another mesh's: NXDOMAIN
    ("svc.6379.mesh", "A"),  # an empty non-terminal
    ("mesh", "SOA"),
    ("mesh", "NS"),
    ("10.0.0.240.in-addr.arpa", "PTR"),
    ("b.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.0.0.d.f.ip6.arpa", "PTR"),
    ("99.0.0.240.in-addr.arpa", "PTR"),
    ("240.in-addr.arpa", "SOA"),
]


@needs_dnsmasq
@TRANSPORTS
def test_mesh_names_are_answered_as_the_zone_answers_them(world: World, ask: Ask) -> None:
    dataplane, zone = world.dns_port("main"), world.dns_port("zone")
    for name, rdtype in MESH_QUERIES:
        for edns in ({"use_edns": False}, {"use_edns": 0, "want_dnssec": True}):
            sent = make(name, rdtype, **edns)
            expected = ask(sent, zone)
            # Three times: the hot path answers the second and third over UDP.
            for _ in range(3):
                assert ask(sent, dataplane) == expected, (name, rdtype, edns)
    # Inside the domain, a class or type not served stays REFUSED: never forwarded.
    for sent in (make("web.mesh", "TXT", rdclass=dns.rdataclass.CH), make("mesh", "AXFR")):
        answer = ask(sent, dataplane)
        assert dns.message.from_wire(answer).rcode() == dns.rcode.REFUSED
        assert answer == ask(sent, zone)
    # The upstream heard of none of them (and its log works: it shows an outside name).
    marker = f"marker-{ask.__name__}.outside.test"
    assert addresses(ask(make(marker), dataplane)) == ["192.0.2.10"]
    lines = wait_for_line(world, marker)
    assert ".mesh" not in lines.lower() and "240.in-addr" not in lines
    assert "ip6.arpa" not in lines


def wait_for_line(world: World, text: str) -> str:
    deadline = time.monotonic() + 5
    while text not in (lines := world.dnsmasq_lines()):
        assert time.monotonic() < deadline, f"{text} not in dnsmasq's log:\n{lines}"
        time.sleep(0.05)
    return lines


@needs_dnsmasq
def test_mesh_names_with_dig(world: World) -> None:
    port = world.dns_port("main")
    assert dig(port, "+short", "redis.db.svc.6379.mesh").split() == ["240.0.0.10"]
    assert dig(port, "+short", "+tcp", "web.mesh", "AAAA").split() == ["fd00:fd00::b"]
    assert "status: NXDOMAIN" in dig(port, "unknown-service.mesh")
    assert "web.mesh." in dig(port, "+short", "-x", "240.0.0.11")


# -- forwarded names ----------------------------------------------------------------


FORWARDED = [
    make("outside.test"),
    make("Outside.TEST", "A", use_edns=0, payload=4096),
    make("outside.test", "AAAA", use_edns=0, want_dnssec=True),
    make(
        "www.outside.test",
        "A",
        use_edns=0,
        options=[dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"c" * 8)],
    ),
    make("version.bind", "TXT", rdclass=dns.rdataclass.CH),  # dnsmasq answers it
    make("1.0.0.127.in-addr.arpa", "PTR"),  # a reverse name outside the VIPs'
    make("in-addr.arpa", "SOA"),
    make("meshy", "A"),
]


@needs_dnsmasq
@TRANSPORTS
def test_other_names_come_back_as_the_upstream_gave_them(world: World, ask: Ask) -> None:
    port = world.dns_port("main")
    for sent in FORWARDED:
        direct = ask(sent, world.port, DNSMASQ)
        assert ask(sent, port) == direct, dns.message.from_wire(sent).question
    version = dns.message.from_wire(ask(FORWARDED[4], port))
    assert "dnsmasq" in version.answer[0].to_text()
    assert world.metric("main", "kumazone_dataplane_queries_total", {"source": "upstream"}) > 0
    seconds = "kumazone_dataplane_upstream_seconds_count"
    assert world.metric("main", seconds, {"upstream": DNSMASQ}) > 0


@needs_dnsmasq
def test_forwarded_with_dig(world: World) -> None:
    port = world.dns_port("main")
    assert dig(port, "+short", "outside.test").split() == ["192.0.2.10"]
    assert dig(port, "+short", "+tcp", "deep.in.outside.test").split() == ["192.0.2.10"]


@needs_dnsmasq
def test_a_truncated_answer_is_asked_again_over_tcp(world: World) -> None:
    port = world.dns_port("main")
    no_edns = make("big.test", "TXT", use_edns=False)
    large = make("big.test", "TXT", use_edns=0, payload=4096)
    direct_udp = udp(no_edns, world.port, DNSMASQ)
    assert direct_udp[2] & 0x02, "dnsmasq truncates it over UDP"
    # The client takes the whole answer: the one dnsmasq gives over TCP.
    direct_tcp = tcp(large, world.port, DNSMASQ)
    assert len(direct_tcp) > 1000 and not direct_tcp[2] & 0x02
    assert udp(large, port) == direct_tcp
    # A client that takes 512 octets: the truncated answer, as it came.
    assert udp(no_edns, port) == direct_udp
    # EDNS with 512: the same.
    small = make("big.test", "TXT", use_edns=0, payload=512)
    assert udp(small, port) == udp(small, world.port, DNSMASQ)
    # dig retries over TCP itself on our TC, and gets it all.
    assert dig(port, "+short", "+noedns", "big.test", "TXT").count("a" * 200) == 1


def test_a_truncated_answer_from_a_small_server(world: World) -> None:
    upstream = world.upstreams[TRUNCATES]
    before = len(upstream.asked)
    answer = udp(make("many.test", "A", use_edns=0, payload=1232), world.dns_port("truncated"))
    assert len(addresses(answer)) == 40 and not answer[2] & 0x02
    assert upstream.asked[before:] == [("many.test.", "A", "udp"), ("many.test.", "A", "tcp")]
    # Over TCP from the start.
    answer = tcp(make("many-tcp.test", "A"), world.dns_port("truncated"))
    assert len(addresses(answer)) == 40
    assert upstream.asked[before + 2 :] == [("many-tcp.test.", "A", "tcp")]


# -- failover -----------------------------------------------------------------------


@TRANSPORTS
def test_failover_in_order(world: World, ask: Ask) -> None:
    """A dead upstream (refused at once), a silent one (timed out), then one that answers."""
    silent, answers = world.upstreams[SILENT], world.upstreams[ANSWERS]
    name = f"failover-{ask.__name__}.test"
    started = time.monotonic()
    answer = ask(make(name), world.dns_port("failover"))
    took = time.monotonic() - started
    assert addresses(answer) == ["192.0.2.2"]
    transport = ask.__name__
    assert silent.names(transport).count(f"{name}.") == 1
    assert answers.names(transport).count(f"{name}.") == 1
    # The silent one had its share of the budget (a third of a third of it) and no more.
    assert BUDGET / 9 * 0.9 < took < BUDGET / 2
    failures = "kumazone_dataplane_upstream_failures_total"
    assert world.metric("failover", failures, {"reason": "network"}) >= 1
    assert world.metric("failover", failures, {"reason": "timeout"}) >= 1


@TRANSPORTS
def test_servfail_and_refused_fail_over_at_once(world: World, ask: Ask) -> None:
    name = f"answered-no-{ask.__name__}.test"
    started = time.monotonic()
    answer = ask(make(name), world.dns_port("answered_no"))
    assert time.monotonic() - started < BUDGET / 4
    assert addresses(answer) == ["192.0.2.2"]
    for address in (SERVFAIL, REFUSED, ANSWERS):
        assert world.upstreams[address].names(ask.__name__).count(f"{name}.") == 1, address
    failures = "kumazone_dataplane_upstream_failures_total"
    assert world.metric("answered_no", failures, {"reason": "servfail"}) >= 1
    assert world.metric("answered_no", failures, {"reason": "refused"}) >= 1


@TRANSPORTS
def test_an_upstreams_servfail_when_none_answers_better(world: World, ask: Ask) -> None:
    sent = make("no-good.test", "A", use_edns=0)
    direct = ask(sent, world.port, SERVFAIL)
    assert dns.message.from_wire(direct).rcode() == dns.rcode.SERVFAIL
    assert ask(sent, world.dns_port("no_good_answer")) == direct


@pytest.mark.parametrize("edns", [False, True])
def test_servfail_when_no_upstream_answers_in_time(world: World, edns: bool) -> None:
    name = f"nobody-{str(edns).lower()}.test"
    sent = make(name, "A", use_edns=0 if edns else False, want_dnssec=edns)
    started = time.monotonic()
    answer = udp(sent, world.dns_port("no_answer"))
    took = time.monotonic() - started
    assert answer == servfail_answer(sent)
    message = dns.message.from_wire(answer)
    assert message.rcode() == dns.rcode.SERVFAIL and message.flags & dns.flags.RA
    assert (message.edns == 0) == edns
    assert BUDGET * 0.9 < took < BUDGET * 1.5
    # The silent upstream was asked twice (two rounds), the dead one once (refused).
    assert world.upstreams[SILENT].names("udp").count(f"{name}.") == 2


def test_spoofed_answers_are_ignored(world: World) -> None:
    before = world.metric(
        "spoofed", "kumazone_dataplane_upstream_failures_total", {"reason": "spoofed"}
    )
    sent = make("spoofed.test", "A")
    answer = udp(sent, world.dns_port("spoofed"))
    assert answer[:2] == sent[:2] and addresses(answer) == ["192.0.2.2"]
    assert dns.message.from_wire(answer).question == dns.message.from_wire(sent).question
    after = world.metric(
        "spoofed", "kumazone_dataplane_upstream_failures_total", {"reason": "spoofed"}
    )
    assert after - before == 3


# -- resolv.conf and the cache ------------------------------------------------------


def test_resolv_conf_changed_at_run_time(world: World) -> None:
    port = world.dns_port("changing")
    assert addresses(udp(make("before.test"), port)) == ["192.0.2.2"]
    path = world.resolv_confs["changing"]
    new = path.with_suffix(".new")
    new.write_text(f"nameserver {ANSWERS_TOO}\n")
    new.replace(path)
    deadline = time.monotonic() + 3
    attempt = 0
    while True:
        attempt += 1
        if addresses(udp(make(f"after-{attempt}.test"), port)) == ["192.0.2.3"]:
            break
        assert time.monotonic() < deadline, "the new resolv.conf was not read"
        time.sleep(0.1)
    # Gone: the last nameservers stay.
    path.unlink()
    time.sleep(1.1)
    assert addresses(udp(make("gone.test"), port)) == ["192.0.2.3"]


def test_forwarded_answers_are_never_cached(world: World) -> None:
    answers = world.upstreams[ANSWERS]
    port = world.dns_port("failover")
    for _ in range(3):
        assert addresses(udp(make("again.test"), port)) == ["192.0.2.2"]
    assert answers.names("udp").count("again.test.") == 3
    # A REFUSED the hot path learnt inside the domain (a CH query of web.mesh)
    # answers no name outside it (sales.test: a name as long).
    for _ in range(3):
        refused = udp(make("web.mesh", "A", rdclass=dns.rdataclass.CH), port)
        assert dns.message.from_wire(refused).rcode() == dns.rcode.REFUSED
    for _ in range(2):
        assert addresses(udp(make("sales.test"), port)) == ["192.0.2.2"]
    assert answers.names("udp").count("sales.test.") == 2


@needs_dnsmasq
def test_twisteds_own_udp_port(world: World) -> None:
    port, zone = world.dns_port("stock_udp"), world.dns_port("zone")
    for _ in range(3):
        sent = make("redis_db_svc_6379.mesh")
        assert udp(sent, port) == udp(sent, zone)
        assert dns.message.from_wire(udp(make("nope.mesh"), port)).rcode() == dns.rcode.NXDOMAIN
        assert addresses(udp(make("outside.test"), port)) == ["192.0.2.10"]


def test_a_late_answer_is_still_taken(world: World) -> None:
    """The first query timed out and was sent again; the first one's answer ends it."""
    slow = world.upstreams[SLOW]
    started = time.monotonic()
    answer = udp(make("late.test"), world.dns_port("slow"))
    took = time.monotonic() - started
    assert addresses(answer) == ["192.0.2.2"]
    assert slow.names("udp").count("late.test.") == 2, "asked again after a third of the budget"
    # Not the second's answer: that would come a third of the budget later.
    assert SLOW_DELAY * 0.9 < took < SLOW_DELAY + BUDGET / 3 * 0.8


@TRANSPORTS
def test_an_ipv6_upstream(world: World, ask: Ask) -> None:
    if IPV6 not in world.upstreams:
        pytest.skip(f"no IPv6 loopback, or port {world.port} taken on {IPV6}")
    name = f"six-{ask.__name__}.test"
    assert addresses(ask(make(name), world.dns_port("ipv6"))) == ["192.0.2.6"]
    assert world.upstreams[IPV6].names(ask.__name__) == [f"{name}."]


if __name__ == "__main__":
    serve(sys.argv[1])
