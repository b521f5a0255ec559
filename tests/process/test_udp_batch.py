"""UDP in batches (recvmmsg/sendmmsg) answers exactly what Twisted's own UDP port answers.

Both ports are real sockets on loopback, fed by real client sockets bound to
several loopback addresses (one per mesh); the test drives each port's
C{doRead} itself, so no reactor runs.  For the same queries, every client must
get the same answers, byte for byte, from either port: hot answers, first-seen
queries the authority path answers in the middle of a batch, malformed
datagrams, EDNS0 variants, several meshes.  Every test runs the batched port
twice: with its C loop over known answers (kumazone/dns/_hotloop.c) and with
its Python loop alone.
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

from kumazone.core.config import load_config
from kumazone.core.zone import Zone
from kumazone.dns import udpbatch
from kumazone.dns.authority import MeshAuthority
from kumazone.dns.server import KumaDNSDatagramProtocol, KumaDNSServerFactory
from kumazone.metrics import Metrics
from kumazone.store.sqlite import SQLiteStore
from kumazone.zone_service import mesh_lookup
from tests.builders import dataplane_resource
from tests.unit.test_hotpath import PreciseChanges

pytestmark = pytest.mark.skipif(
    not udpbatch.available, reason="recvmmsg/sendmmsg exist on Linux only"
)

CONFIG = load_config(None, {})
#: Client addresses on loopback: the first two are Dataplanes of two meshes.
CLIENTS = {"default": "127.0.0.1", "payments": "127.0.0.2", "unknown": "127.0.0.3"}
SERVICES = [
    ("redis", "default"),
    ("backend", "default"),
    ("redis", "payments"),
    ("ledger", "payments"),
    ("echo-server_echo-example_svc_1010", "default"),
]
#: Queries sent before the ports read them: well under any receive buffer.
CHUNK = 150

Answers = dict[tuple[str, int], bytes]

#: The batched port's loop over known answers in the test running: C, or None.
LOOP: dict[str, Any] = {"known": udpbatch._KNOWN}


@pytest.fixture(autouse=True, params=["c", "python"])
def loop(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each test with the C loop and with the Python loop alone."""
    if request.param == "c" and not udpbatch.native:
        pytest.fail("the C loop (kumazone/dns/_hotloop.c) is not built: run make")
    LOOP["known"] = udpbatch._KNOWN if request.param == "c" else None
    yield request.param
    LOOP["known"] = udpbatch._KNOWN


@pytest.fixture
def zone() -> Zone:
    zone = Zone("zone-1", CONFIG, SQLiteStore(":memory:"))
    zone.set_file("/inventory.yaml", inventory(), 0.0)
    return zone


def inventory(payments_client_mesh: str = "payments") -> list[Any]:
    """The services, and a Dataplane for each client of a known mesh (::1 in payments)."""
    resources = [
        dataplane_resource(f"dp-{i}", service, mesh=mesh, address=f"10.1.0.{i + 1}")
        for i, (service, mesh) in enumerate(SERVICES)
    ]
    resources += [
        dataplane_resource("client-default", "client", address=CLIENTS["default"]),
        dataplane_resource(
            "client-payments", "client", mesh=payments_client_mesh, address=CLIENTS["payments"]
        ),
    ]
    resources.append(dataplane_resource("client-v6", "client", mesh="payments", address="::1"))
    return resources


@pytest.fixture
def factory(zone: Zone) -> KumaDNSServerFactory:
    """The DNS factory wired to the zone as the service wires it."""
    authority = MeshAuthority(CONFIG, ["127.0.0.1"])
    authority.update(zone.snapshot)
    made = KumaDNSServerFactory(authority, mesh_lookup(lambda: zone.snapshot), Metrics("z"))
    # The authority first, then the cache; each change as precise as can be.
    zone.listeners.append(PreciseChanges(zone, authority.apply, made.hot.apply))
    return made


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
    kind: str,
    factory: KumaDNSServerFactory,
    reactor: EPollReactor,
    host: str,
    calls: Any = None,
) -> udp.Port:
    protocol = KumaDNSDatagramProtocol(factory)
    port: udp.Port
    if kind == "batched":
        port = udpbatch.BatchedDNSPort(
            0, protocol, host, reactor=reactor, calls=calls or udpbatch._CALLS, known=LOOP["known"]
        )
    else:
        port = udp.Port(0, protocol, host, maxPacketSize=udpbatch.SLOT, reactor=reactor)
    port.startListening()
    return port


def exchange(
    port: udp.Port,
    clients: dict[str, socket.socket],
    queries: list[tuple[str, bytes]],
    first_id: int = 0,
) -> Answers:
    """Send C{queries} in chunks, drive C{port}, and collect the answers.

    Query I goes out with ID C{first_id} + I; its answer is kept under (the
    client it reached, I) without its ID.  An answer with another ID (a late one
    from an earlier exchange) is left out.  A chunk is done when no answer has
    come for a while (some queries get none).
    """
    target = port.getHost()
    host = "127.0.0.1" if target.host == "::" else target.host  # dual stack: over IPv4
    answers: Answers = {}
    for start in range(0, len(queries), CHUNK):
        for index in range(start, min(start + CHUNK, len(queries))):
            mesh, query = queries[index]
            if len(query) >= 2:
                query = (first_id + index).to_bytes(2, "big") + query[2:]
            clients[mesh].sendto(query, (host, target.port))
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
                    quiet_since = time.monotonic()
                    index = int.from_bytes(answer[:2], "big") - first_id
                    if 0 <= index < len(queries):
                        assert (mesh, index) not in answers, f"two answers to query {index}"
                        answers[(mesh, index)] = answer[2:]
    return answers


def addresses(answers: Answers, rdtype: str = "A") -> dict[tuple[str, int], str]:
    """The first address in each answer."""
    found = {}
    for key, answer in answers.items():
        message = dns.message.from_wire(b"\0\0" + answer)
        found[key] = next(rr for rrset in message.answer for rr in rrset).to_text()
    return found


def send_errors(factory: KumaDNSServerFactory) -> float:
    registry = factory.metrics.registry
    return registry.get_sample_value("kumazone_dns_send_errors_total") or 0.0


def corpus(rng: random.Random) -> list[tuple[str, bytes]]:
    """Queries with unique IDs: repeated questions, first-seen ones, odd and malformed ones."""
    names = [
        "redis.mesh",
        "backend.mesh",
        "ledger.mesh",
        "nope.mesh",
        "mesh",
        "ns.dns.mesh",
        "echo-server.echo-example.svc.1010.mesh",
        "svc.1010.mesh",
        "example.com",
        "42.1.0.10.in-addr.arpa",
        f"{'a' * 63}.mesh",
    ]
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
    odd = [
        b"",
        b"\x00" * 5,
        b"\x00" * 12,
        queries[0][:20],
        queries[1] + b"\x00",
        queries[2][:2] + b"\x80" + queries[2][3:],  # a response: no answer
        queries[3][:2] + b"\x28" + queries[3][3:],  # opcode UPDATE
        queries[4] + b"x" * 9000,
    ]  # longer than what a port reads of a datagram
    queries += odd * 3
    rng.shuffle(queries)
    meshes = list(CLIENTS)
    return [(rng.choice(meshes), query) for query in queries]


def test_batched_answers_equal_twisted_udp_port_answers(factory, reactor) -> None:
    queries = corpus(random.Random(20261127))
    clients = client_sockets()
    stock = listen("stock", factory, reactor, "127.0.0.1")
    reference = exchange(stock, clients, queries)
    stock.stopListening()
    batched = listen("batched", factory, reactor, "127.0.0.1")
    warm = exchange(batched, clients, queries, 10_000)  # templates made by the stock pass
    factory.hot.clear()
    cold = exchange(batched, clients, queries, 20_000)  # first-seen queries answered mid-batch
    batched.stopListening()
    for sock in clients.values():
        sock.close()
    # The corpus has answers of every kind, to every client.
    rcodes = {answer[1] & 0x0F for answer in reference.values()}
    assert {dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.FORMERR} <= rcodes
    assert {mesh for mesh, _ in reference} == set(CLIENTS)
    assert len(reference) > 400
    assert warm == reference
    assert cold == reference


@pytest.mark.parametrize("interface", ["127.0.0.1", "::"])
def test_mesh_follows_the_source_address(factory, reactor, interface) -> None:
    """Also on a dual-stack socket, where IPv4 clients come as ::ffff:127.0.0.x."""
    clients = client_sockets()
    batched = listen("batched", factory, reactor, interface)
    query = dns.message.make_query("redis.mesh", "A").to_wire()
    queries = [(mesh, query) for mesh in CLIENTS]
    seen = []
    for attempt in range(3):  # the authority path, then the hot path
        seen.append(addresses(exchange(batched, clients, queries, 10 * attempt)))
    batched.stopListening()
    assert seen[0] == seen[1] == seen[2]
    vips = {mesh: seen[0][(mesh, i)] for i, mesh in enumerate(CLIENTS)}
    assert vips["default"] == vips["unknown"] != vips["payments"]


def test_a_client_that_changes_mesh_gets_the_new_mesh_at_once(zone, factory, reactor) -> None:
    clients = client_sockets()
    batched = listen("batched", factory, reactor, "127.0.0.1")
    query = dns.message.make_query("redis.mesh", "A").to_wire()
    seen = []
    for attempt in range(6):
        if attempt == 3:  # 127.0.0.2 is a Dataplane of mesh default from now on
            zone.set_file("/inventory.yaml", inventory(payments_client_mesh="default"), 1.0)
        answers = exchange(batched, clients, [("payments", query)], 10 * attempt)
        seen.append(addresses(answers)[("payments", 0)])
    batched.stopListening()
    assert seen[0] == seen[1] == seen[2] != seen[3] == seen[4] == seen[5]


def test_ipv6_clients_get_their_answers(factory, reactor) -> None:
    clients = client_sockets(socket.AF_INET6)
    queries = [(mesh, query) for mesh, query in corpus(random.Random(6)) if mesh == "default"]
    stock = listen("stock", factory, reactor, "::1")
    reference = exchange(stock, clients, queries)
    stock.stopListening()
    batched = listen("batched", factory, reactor, "::1")
    got = exchange(batched, clients, queries, 10_000)
    redis = dns.message.make_query("redis.mesh", "A").to_wire()
    mesh_answers = [
        addresses(exchange(batched, clients, [("default", redis)], 20_000 + i)) for i in range(2)
    ]
    batched.stopListening()
    assert len(reference) > 100
    assert got == reference
    # ::1 is a Dataplane of payments: the second answer came from the hot path.
    payments_redis = factory.authority.resolve(b"redis.mesh", dns.rdatatype.A, 1, "payments")
    expected = payments_redis[0][0].payload.dottedQuad()
    assert [found[("default", 0)] for found in mesh_answers] == [expected, expected]


def test_partial_and_failed_sends(factory, reactor) -> None:
    """sendmmsg may send fewer than asked (the rest follow), or fail (one is dropped, counted)."""
    recvmmsg, sendmmsg = udpbatch._CALLS or (None, None)
    calls = {"count": 0}

    def flaky_sendmmsg(fd: int, headers: int, count: int, flags: int) -> int:
        calls["count"] += 1
        if count == 0:
            return sendmmsg(fd, headers, count, flags)  # the check at start-up
        if calls["count"] == 3:
            ctypes.set_errno(errno.EPERM)
            return -1
        return sendmmsg(fd, headers, min(count, 7), flags)

    clients = client_sockets()
    query = dns.message.make_query("backend.mesh", "AAAA").to_wire()
    batched = listen("batched", factory, reactor, "127.0.0.1", (recvmmsg, flaky_sendmmsg))
    exchange(batched, clients, [("default", query)], 1000)  # authority path: sent with sendto
    errors_before = send_errors(factory)
    answers = exchange(batched, clients, [("default", query)] * 40)
    batched.stopListening()
    assert send_errors(factory) == errors_before + 1
    # Calls: the check, then 7, then the failure (answer 7 dropped), then 7 at a time.
    assert sorted(index for _, index in answers) == [i for i in range(40) if i != 7]


def test_read_errors_are_those_of_twisted_udp_port(factory, reactor) -> None:
    recvmmsg, sendmmsg = udpbatch._CALLS or (None, None)
    failure = {"errno": 0}

    def failing_recvmmsg(*arguments: Any) -> int:
        if failure["errno"] and arguments[2]:
            ctypes.set_errno(failure["errno"])
            return -1
        return recvmmsg(*arguments)

    batched = listen("batched", factory, reactor, "127.0.0.1", (failing_recvmmsg, sendmmsg))
    for ignored in (errno.EAGAIN, errno.EINTR, errno.ECONNREFUSED):
        failure["errno"] = ignored
        batched.doRead()
    failure["errno"] = errno.ENOBUFS
    with pytest.raises(OSError, match="ENOBUFS"):
        batched.doRead()  # the reactor logs it and closes the port, as for Twisted's port
    batched.stopListening()


def test_a_kernel_without_the_calls_is_found_at_start(factory, reactor) -> None:
    sendmmsg = udpbatch._CALLS[1] if udpbatch._CALLS else None

    def refused(*arguments: Any) -> int:
        ctypes.set_errno(errno.ENOSYS)
        return -1

    batched = udpbatch.BatchedDNSPort(
        0, KumaDNSDatagramProtocol(factory), "127.0.0.1", reactor=reactor, calls=(refused, sendmmsg)
    )
    with pytest.raises(OSError, match="recvmmsg/sendmmsg"):
        batched.startListening()
    assert not hasattr(batched, "socket")  # closed at once: the stock port can bind
    with pytest.raises(RuntimeError, match="recvmmsg"):
        udpbatch.BatchedDNSPort(
            0, KumaDNSDatagramProtocol(factory), "127.0.0.1", reactor=reactor, calls=None
        )


def test_every_batched_answer_is_counted_and_timed(factory, reactor) -> None:
    clients = client_sockets()
    batched = listen("batched", factory, reactor, "127.0.0.1")
    query = dns.message.make_query("redis.mesh", "A").to_wire()
    exchange(batched, clients, [("default", query)], 1000)
    stats = factory.stats
    hot_before, timed_before = stats.hot_answers, sum(stats.buckets)
    cell = stats.cell(dns.rdatatype.A, dns.rcode.NOERROR, "udp")
    counted_before = cell[0]
    queries = [("default", query)] * 100
    # A first-seen question in the middle of the batch takes the authority path.
    queries.insert(50, ("default", dns.message.make_query("backend.mesh", "A").to_wire()))
    assert len(exchange(batched, clients, queries)) == 101
    batched.stopListening()
    assert stats.hot_answers == hot_before + 100
    assert sum(stats.buckets) == timed_before + 101
    assert cell[0] == counted_before + 101


def test_a_saturated_port_yields_to_the_reactor_after_its_turn(factory, reactor) -> None:
    """Full batches one after another end the read after TURN_SECONDS, not after ROUNDS."""
    recvmmsg, sendmmsg = udpbatch._CALLS or (None, None)
    reads = {"full": 0}

    def always_full(fd: int, headers: int, count: int, flags: int, timeout: Any) -> int:
        if count == 0:
            return recvmmsg(fd, headers, count, flags, timeout)  # the check at start-up
        reads["full"] += 1
        return udpbatch.BATCH

    batched = listen("batched", factory, reactor, "127.0.0.1", (always_full, sendmmsg))
    # Each batch takes 0.4 ms here (a busy server's 64 answers take about as long).
    batched._answer_batch = lambda count: time.sleep(0.0004)  # type: ignore[method-assign]
    batched.doRead()
    batched.stopListening()
    turn_rounds = int(udpbatch.TURN_SECONDS / 0.0004) + 1
    assert 1 <= reads["full"] <= turn_rounds < udpbatch.ROUNDS


def test_a_failure_in_the_loop_costs_that_batch_and_the_port_stays_open(
    factory, reactor, monkeypatch
) -> None:
    """An exception in answering (a bug of ours, or no memory) is logged; the port goes on."""
    clients = client_sockets()
    batched = listen("batched", factory, reactor, "127.0.0.1")
    query = dns.message.make_query("redis.mesh", "A").to_wire()
    exchange(batched, clients, [("default", query)] * 2, 1000)  # kept by its octets now
    logged: list[str] = []
    monkeypatch.setattr(factory, "limited_log", logged.append)
    kept = factory.hot.exact["default"][query[4:]]
    factory.hot.exact["default"][query[4:]] = (kept[0], ["not a number"])  # counting fails
    answered = exchange(batched, clients, [("default", query)], 2000)
    if batched._serve is None:  # the Python loop counts it: the error is logged, no answer
        assert logged and "TypeError" in logged[-1] and not answered
    else:  # the C loop leaves what it cannot count to Python, whose template answers it
        assert len(answered) == 1 and not logged
    factory.hot.exact["default"][query[4:]] = kept
    if batched._serve is not None:  # the C call itself failing: it is not called again
        calls = []

        def failing(*arguments: Any) -> Any:
            calls.append(arguments)
            raise MemoryError("for the test")

        batched._serve = failing
        exchange(batched, clients, [("default", query)], 2500)
        assert len(calls) == 1 and "MemoryError" in logged[-1] and batched._serve is None
    answers = exchange(batched, clients, [("default", query)] * 3, 3000)
    batched.stopListening()
    assert len(answers) == 3
