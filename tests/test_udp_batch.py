"""UDP in batches (recvmmsg/sendmmsg) answers exactly what Twisted's own UDP port answers.

Both ports are real sockets on loopback, fed by real client sockets bound to
several loopback addresses (one per mesh); the test drives each port's
C{doRead} itself, so no reactor runs.  For the same queries, every client must
get the same answers, byte for byte, from either port: hot answers, first-seen
queries the authority path answers in the middle of a batch, malformed
datagrams, EDNS0 variants, several meshes.
"""

from __future__ import annotations

import ctypes
import errno
import random
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from twisted.internet import udp
from twisted.internet.epollreactor import EPollReactor

from kumazone import udpbatch
from kumazone.authority import ZoneAuthority
from kumazone.config import load_config
from kumazone.dnsserver import KumaDNSDatagramProtocol, KumaDNSServerFactory
from kumazone.metrics import Metrics
from kumazone.resources import parse_resource
from kumazone.service import mesh_lookup
from kumazone.store import SQLiteStore
from kumazone.zone import Zone
from tests.builders import dataplane

pytestmark = pytest.mark.skipif(
    not udpbatch.available, reason="recvmmsg/sendmmsg exist on Linux only"
)

CONFIG = load_config(None, {})
#: Client addresses on loopback: the first two are Dataplanes of two meshes.
CLIENTS = {"default": "127.0.0.1", "payments": "127.0.0.2", "unknown": "127.0.0.3"}
SERVICES = [("redis", "default"), ("backend", "default"), ("redis", "payments"),
            ("ledger", "payments"), ("echo-server_echo-example_svc_1010", "default")]
#: Queries sent before the ports read them: well under any receive buffer.
CHUNK = 150

Answers = dict[tuple[str, bytes], bytes]


@pytest.fixture
def factory() -> KumaDNSServerFactory:
    zone = Zone("zone-1", CONFIG, SQLiteStore(":memory:"))
    resources = [
        parse_resource(dataplane(f"dp-{i}", service, mesh=mesh, address=f"10.1.0.{i + 1}"))
        for i, (service, mesh) in enumerate(SERVICES)
    ]
    resources += [
        parse_resource(dataplane(f"client-{mesh}", "client", mesh=mesh, address=address))
        for mesh, address in CLIENTS.items()
        if mesh != "unknown"
    ]
    zone.set_file("/inventory.yaml", resources, 0.0)
    authority = ZoneAuthority(CONFIG, ["127.0.0.1"])
    authority.update(zone.snapshot)
    return KumaDNSServerFactory(authority, mesh_lookup(lambda: zone.snapshot), Metrics("z"))


@pytest.fixture
def reactor() -> Iterator[EPollReactor]:
    """A reactor the ports register with; it never runs (the test calls doRead)."""
    made = EPollReactor()
    yield made
    made.runUntilCurrent()  # the ports' delayed connectionLost: their sockets close
    made._poller.close()


def client_sockets(family: int = socket.AF_INET) -> dict[str, socket.socket]:
    if family == socket.AF_INET6:
        made = {"default": socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)}
        made["default"].bind(("::1", 0))
    else:
        made = {}
        for mesh, address in CLIENTS.items():
            made[mesh] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            made[mesh].bind((address, 0))
    for sock in made.values():
        sock.setblocking(False)
    return made


def listen(
    kind: str, factory: KumaDNSServerFactory, reactor: EPollReactor, host: str,
    calls: Any = None,
) -> udp.Port:
    protocol = KumaDNSDatagramProtocol(factory)
    port: udp.Port
    if kind == "batched":
        port = udpbatch.BatchedDNSPort(
            0, protocol, host, reactor=reactor, calls=calls or udpbatch._CALLS
        )
    else:
        port = udp.Port(0, protocol, host, maxPacketSize=udpbatch.SLOT, reactor=reactor)
    port.startListening()
    return port


def exchange(port: udp.Port, clients: dict[str, socket.socket],
             queries: list[tuple[str, bytes]]) -> Answers:
    """Send C{queries} in chunks, drive C{port}, and collect every answer by (client, ID).

    A chunk is done when no answer has come for a while (some queries get none).
    """
    target = port.getHost()
    answers: Answers = {}
    for start in range(0, len(queries), CHUNK):
        for mesh, query in queries[start : start + CHUNK]:
            clients[mesh].sendto(query, (target.host, target.port))
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 0.3:
            ready, _, _ = select.select([port.socket], [], [], 0.02)
            if ready:
                port.doRead()
            for mesh, sock in clients.items():
                while True:
                    try:
                        answer = sock.recv(65535)
                    except BlockingIOError:
                        break
                    key = (mesh, answer[:2])
                    assert key not in answers, f"two answers for query {key}"
                    answers[key] = answer
                    quiet_since = time.monotonic()
    return answers


def send_errors(factory: KumaDNSServerFactory) -> float:
    registry = factory.metrics.registry
    return registry.get_sample_value("kumazone_dns_send_errors_total") or 0.0


def corpus(rng: random.Random) -> list[tuple[str, bytes]]:
    """Queries with unique IDs: repeated questions, first-seen ones, odd and malformed ones."""
    names = ["redis.mesh", "backend.mesh", "ledger.mesh", "nope.mesh", "mesh", "ns.dns.mesh",
             "echo-server.echo-example.svc.1010.mesh", "svc.1010.mesh", "example.com",
             "42.1.0.10.in-addr.arpa", f"{'a' * 63}.mesh"]
    queries: list[bytes] = []
    for _ in range(420):
        name = "".join(c.upper() if rng.random() < 0.2 else c for c in rng.choice(names))
        rdtype = rng.choice(["A", "A", "A", "AAAA", "AAAA", "PTR", "TXT", "ANY", "SOA"])
        edns = rng.choice([-1, -1, 0, 0, 1])
        message = dns.message.make_query(
            name, rdtype, use_edns=edns, want_dnssec=edns == 0 and rng.random() < 0.3
        )
        if rng.random() < 0.3:
            message.flags &= ~dns.flags.RD
        queries.append(message.to_wire())
    # Malformed, odd, or not a query at all; each gets FORMERR, an answer, or silence.
    odd = [b"", b"\x00" * 5, b"\x00" * 12, queries[0][:20], queries[1] + b"\x00",
           queries[2][:2] + b"\x80" + queries[2][3:],  # a response: no answer
           queries[3][:2] + b"\x28" + queries[3][3:],  # opcode UPDATE
           queries[4] + b"x" * 9000]  # longer than what a port reads of a datagram
    queries += odd * 3
    rng.shuffle(queries)
    meshes = list(CLIENTS)
    sent: list[tuple[str, bytes]] = []
    for index, query in enumerate(queries):
        ident = index.to_bytes(2, "big")
        sent.append((rng.choice(meshes), ident + query[2:] if len(query) >= 2 else query))
    return sent


def test_batched_answers_equal_twisted_udp_port_answers(factory, reactor) -> None:
    queries = corpus(random.Random(20261127))
    clients = client_sockets()
    stock = listen("stock", factory, reactor, "127.0.0.1")
    reference = exchange(stock, clients, queries)
    stock.stopListening()
    batched = listen("batched", factory, reactor, "127.0.0.1")
    warm = exchange(batched, clients, queries)  # templates made by the stock pass
    factory.hot.clear()
    cold = exchange(batched, clients, queries)  # first-seen queries answered mid-batch
    batched.stopListening()
    for sock in clients.values():
        sock.close()
    # The corpus has answers of every kind, to every client.
    rcodes = {answer[3] & 0x0F for answer in reference.values()}
    assert {dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.FORMERR} <= rcodes
    assert {mesh for mesh, _ in reference} == set(CLIENTS)
    assert len(reference) > 400
    assert warm == reference
    assert cold == reference


def test_mesh_follows_the_source_address(factory, reactor) -> None:
    clients = client_sockets()
    batched = listen("batched", factory, reactor, "127.0.0.1")
    query = dns.message.make_query("redis.mesh", "A").to_wire()
    queries = [(mesh, bytes((0, i)) + query[2:]) for i, mesh in enumerate(CLIENTS)] * 1
    answers = {}
    for _ in range(3):  # the first authority-path, then hot
        answers = exchange(batched, clients, queries)
    batched.stopListening()
    vips = {
        mesh: dns.message.from_wire(answers[(mesh, bytes((0, i)))]).answer[0][0].address
        for i, mesh in enumerate(CLIENTS)
    }
    assert vips["default"] == vips["unknown"] != vips["payments"]


def test_ipv6_clients_get_their_answers(factory, reactor) -> None:
    clients = client_sockets(socket.AF_INET6)
    rng = random.Random(6)
    queries = [(mesh, query) for mesh, query in corpus(rng) if mesh == "default"]
    stock = listen("stock", factory, reactor, "::1")
    reference = exchange(stock, clients, queries)
    stock.stopListening()
    batched = listen("batched", factory, reactor, "::1")
    got = exchange(batched, clients, queries)
    batched.stopListening()
    assert len(reference) > 100
    assert got == reference


def test_a_failed_send_is_counted_and_the_rest_are_sent(factory, reactor) -> None:
    recvmmsg, sendmmsg = udpbatch._CALLS or (None, None)
    failures = {"left": 1}

    def failing_sendmmsg(*args: Any) -> int:
        if failures["left"]:
            failures["left"] -= 1
            ctypes.set_errno(errno.EPERM)
            return -1
        return sendmmsg(*args)

    clients = client_sockets()
    query = dns.message.make_query("backend.mesh", "AAAA").to_wire()
    primer = [("default", b"\xff\xff" + query[2:])]
    batched = listen("batched", factory, reactor, "127.0.0.1", (recvmmsg, failing_sendmmsg))
    exchange(batched, clients, primer)  # authority path: sent with sendto
    errors_before = send_errors(factory)
    queries = [("default", i.to_bytes(2, "big") + query[2:]) for i in range(40)]
    answers = exchange(batched, clients, queries)
    batched.stopListening()
    assert send_errors(factory) == errors_before + 1
    assert sorted(int.from_bytes(ident, "big") for _, ident in answers) == list(range(1, 40))


def test_every_batched_answer_is_counted_and_timed(factory, reactor) -> None:
    clients = client_sockets()
    batched = listen("batched", factory, reactor, "127.0.0.1")
    query = dns.message.make_query("redis.mesh", "A").to_wire()
    exchange(batched, clients, [("default", query)])
    stats = factory.stats
    hot_before, timed_before = stats.hot_answers, sum(stats.buckets)
    cell = stats.cell(dns.rdatatype.A, dns.rcode.NOERROR, "udp")
    counted_before = cell[0]
    queries = [("default", i.to_bytes(2, "big") + query[2:]) for i in range(100)]
    first_seen = dns.message.make_query("backend.mesh", "A")
    first_seen.id = 1000
    queries.insert(50, ("default", first_seen.to_wire()))  # the authority path, mid-batch
    assert len(exchange(batched, clients, queries)) == 101
    batched.stopListening()
    assert stats.hot_answers == hot_before + 100
    assert sum(stats.buckets) == timed_before + 101
    assert cell[0] == counted_before + 101


def test_a_batched_port_needs_the_calls(factory, reactor) -> None:
    with pytest.raises(RuntimeError, match="recvmmsg"):
        udpbatch.BatchedDNSPort(0, KumaDNSDatagramProtocol(factory), "127.0.0.1",
                                reactor=reactor, calls=None)
