"""Bad packets against a real zone process: FORMERR or silence, never a stop.

The contract (DESIGN.md, "DNS behaviour"): a query whose 12-octet header can be
read gets FORMERR with its ID echoed; a packet shorter than a header, or a response
(QR=1), gets silence; the server never stops answering because of a packet, and
counts what it could not parse in the malformed-packets metric.

After every bad packet, a good query (the sentinel) goes down the same socket or
connection: its answer proves the server still answers, and anything that arrives
before it is what the bad packet got.
"""

from __future__ import annotations

import collections
import random
import re
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import dns.exception
import dns.message
import dns.rcode
import pytest

from tests.kzprocess import ZoneProcess, sample_zone

SEED = 20240611
RANDOM_UDP_PACKETS = 2000
RANDOM_TCP_PACKETS = 300
MUTATED_QUERIES = 1000
SENTINEL_ID = 0xABCD
CRAFTED_ID = 0x1234
WAIT = 2.0  # seconds for one answer on loopback: far more than needed

TRANSPORTS = pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])


@pytest.fixture(scope="module")
def zone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZoneProcess]:
    with sample_zone(tmp_path_factory.mktemp("malformed")) as process:
        yield process


@pytest.fixture(scope="module")
def redis_vip(zone: ZoneProcess) -> str:
    [item] = [i for i in zone.vips()["items"] if (i["mesh"], i["service"]) == ("default", "redis")]
    return str(item["vip"])


# -- wire helpers -----------------------------------------------------------------------------


def header(
    qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0, flags: int = 0, message_id: int = CRAFTED_ID
) -> bytes:
    return struct.pack("!HHHHHH", message_id, flags, qd, an, ns, ar)


def question(wire_name: bytes, qtype: int = 1, qclass: int = 1) -> bytes:
    return wire_name + struct.pack("!HH", qtype, qclass)


REDIS = b"\x05redis\x04mesh\x00"
OPT = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)


def sentinel(message_id: int = SENTINEL_ID) -> bytes:
    return header(message_id=message_id) + question(REDIS)


def message_id_of(data: bytes) -> int:
    return int(struct.unpack("!H", data[:2])[0])


def rcode_of(data: bytes) -> int:
    return data[3] & 0x0F


def is_response(data: bytes) -> bool:
    return bool(data[2] & 0x80)


def opcode_of(data: bytes) -> int:
    return (data[2] >> 3) & 0x0F


def framed(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


class Client:
    """One UDP socket or TCP connection to the zone, reading whole messages."""

    def __init__(self, zone: ZoneProcess, tcp: bool) -> None:
        self.zone = zone
        self.tcp = tcp
        self.dropped = 0
        self._open()

    def _open(self) -> None:
        address = ("127.0.0.1", self.zone.ports["dns"])
        if self.tcp:
            self.sock = socket.create_connection(address, timeout=WAIT)
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.settimeout(WAIT)
            self.sock.connect(address)

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        if self.tcp:
            self.sock.sendall(framed(data))
        else:
            self.sock.send(data)

    def receive(self) -> bytes | None:
        """The next message, or None on timeout (or a closed TCP connection)."""
        try:
            if not self.tcp:
                return self.sock.recv(65535)
            prefix = self._exactly(2)
            if prefix is None:
                return None
            return self._exactly(struct.unpack("!H", prefix)[0])
        except TimeoutError:
            return None

    def _exactly(self, count: int) -> bytes | None:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                self.dropped += 1
                self.sock.close()
                self._open()
                return None
            data += chunk
        return data

    def until(self, wanted_id: int) -> tuple[list[bytes], bytes | None]:
        """Messages before the one with C{wanted_id}, and that one (None if it never came)."""
        before: list[bytes] = []
        for _ in range(100):
            data = self.receive()
            if data is None:
                return before, None
            if len(data) >= 2 and message_id_of(data) == wanted_id:
                return before, data
            before.append(data)
        return before, None

    def send_then_sentinel(self, packet: bytes) -> tuple[list[bytes], bytes | None]:
        """Send C{packet} then a good query; what came before the good answer, and it."""
        dropped = self.dropped
        self.send(packet)
        self.send(sentinel())
        before, answer = self.until(SENTINEL_ID)
        if answer is None and self.dropped > dropped:
            # The server closed the connection; the sentinel went down with it.
            return before, None
        return before, answer


def assert_sentinel_answered(answer: bytes | None, redis_vip: str) -> None:
    assert answer is not None, "the server did not answer a good query after the bad packet"
    message = dns.message.from_wire(answer)
    assert message.rcode() == dns.rcode.NOERROR
    assert [rdata.address for rrset in message.answer for rdata in rrset] == [redis_vip]


def malformed_count(zone: ZoneProcess, transport: str) -> float:
    status, body = zone.http("diagnostics", "GET", "/metrics")
    assert status == 200
    pattern = rf'^kumazone_dns_malformed_packets_total\{{transport="{transport}"\}} (\S+)$'
    found = re.search(pattern, body.decode(), re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def still_answers(zone: ZoneProcess, redis_vip: str) -> None:
    for tcp in (False, True):
        response = zone.query("redis.mesh", "A", tcp=tcp)
        assert response.rcode() == dns.rcode.NOERROR
        assert [rdata.address for rrset in response.answer for rdata in rrset] == [redis_vip]


def dnspython_rejects(packet: bytes) -> str | None:
    """Why dnspython (an independent, strict decoder) rejects C{packet}, or None."""
    try:
        dns.message.from_wire(packet)
    except dns.exception.DNSException as e:
        return type(e).__name__
    except Exception as e:  # any failure to decode counts
        return type(e).__name__
    return None


# -- crafted packets ---------------------------------------------------------------------------

FORMERR_CASES = {
    "header-only-no-question": header(qd=0),
    "header-claims-a-question": header(),
    "question-cut-in-a-label": header() + b"\x05red",
    "question-without-class": header() + REDIS + b"\x00\x01",
    "label-runs-past-the-end": header() + b"\x3fabc",
    "label-type-01-extended": header() + question(b"\x41" + b"a" * 65 + b"\x04mesh\x00"),
    "label-type-10-reserved": header() + question(b"\x80" + b"a" * 128 + b"\x04mesh\x00"),
    "name-over-255-octets": header() + question((b"\x3f" + b"a" * 63) * 4 + b"\x04mesh\x00"),
    "compression-pointer-to-itself": header() + question(b"\xc0\x0c"),
    "compression-loop-of-two": header() + b"\x01a\xc0\x10\x01b\xc0\x0c" + b"\x00\x01\x00\x01",
    "compression-pointer-past-the-end": header() + question(b"\xc0\xff"),
    "compression-pointer-forward": header() + question(b"\xc0\x12") + REDIS,
    "two-opt-records": header(ar=2) + question(REDIS) + OPT + OPT,
    "opt-option-longer-than-its-record": header(ar=1)
    + question(REDIS)
    + b"\x00"
    + struct.pack("!HHIH", 41, 1232, 0, 4)
    + b"\x00\x0c\x00\x10",
    "opt-record-cut-short": header(ar=1) + question(REDIS) + b"\x00\x00\x29\x04",
    "additional-count-without-records": header(ar=1) + question(REDIS),
    "answer-count-without-records": header(an=3) + question(REDIS),
    "second-question-cut": header(qd=2) + question(REDIS) + b"\x03foo",
    "trailing-garbage": header() + question(REDIS) + b"\xde\xad\xbe\xef",
    # One label holding dots: as text it is "..aaa...", a name of over 255 octets.
    "dotted-label-in-an-over-long-name": header()
    + question(b"\x01." + (b"\x3f" + b"a" * 63) * 5 + b"\x04mesh\x00"),
}

SILENCE_CASES = {
    "empty": b"",
    "one-octet": sentinel(CRAFTED_ID)[:1],
    "two-octets": sentinel(CRAFTED_ID)[:2],
    "eleven-octets": sentinel(CRAFTED_ID)[:11],
    "response-well-formed": header(flags=0x8400) + question(REDIS),
    "response-with-an-answer": header(an=1, flags=0x8400)
    + question(REDIS)
    + b"\xc0\x0c"
    + struct.pack("!HHIH", 1, 1, 60, 4)
    + bytes([240, 0, 0, 1]),
    "response-malformed": header(flags=0x8000) + question(b"\xc0\x0c"),
    "response-header-only": header(qd=0, flags=0x8000),
}


@TRANSPORTS
@pytest.mark.parametrize("name", sorted(FORMERR_CASES))
def test_crafted_query_gets_formerr(zone, redis_vip, tcp: bool, name: str) -> None:
    if name != "header-only-no-question":  # well-formed, but no question to answer
        assert dnspython_rejects(FORMERR_CASES[name]), "the case itself is not malformed"
    client = Client(zone, tcp)
    try:
        before, answer = client.send_then_sentinel(FORMERR_CASES[name])
    finally:
        client.close()
    assert len(before) == 1, f"{name}: {len(before)} answer(s) to the bad packet"
    reply = before[0]
    assert len(reply) >= 12
    assert message_id_of(reply) == CRAFTED_ID
    assert is_response(reply)
    assert rcode_of(reply) == dns.rcode.FORMERR, (
        f"{name}: RCODE {dns.rcode.to_text(rcode_of(reply))}, not FORMERR"
    )
    assert_sentinel_answered(answer, redis_vip)


@TRANSPORTS
@pytest.mark.parametrize("name", sorted(SILENCE_CASES))
def test_crafted_packet_gets_silence(zone, redis_vip, tcp: bool, name: str) -> None:
    client = Client(zone, tcp)
    try:
        before, answer = client.send_then_sentinel(SILENCE_CASES[name])
    finally:
        client.close()
    assert before == [], f"{name}: the server answered {before!r}"
    assert_sentinel_answered(answer, redis_vip)


@TRANSPORTS
def test_label_holding_a_dot_is_one_label(zone, redis_vip, tcp: bool) -> None:
    """The one-label name `redis\\.mesh.` is not redis.mesh: it is outside the domain."""
    packet = header() + question(b"\x0aredis.mesh\x00")
    client = Client(zone, tcp)
    try:
        before, answer = client.send_then_sentinel(packet)
    finally:
        client.close()
    assert_sentinel_answered(answer, redis_vip)
    assert len(before) == 1
    reply = before[0]
    assert rcode_of(reply) in (dns.rcode.REFUSED, dns.rcode.FORMERR)
    if rcode_of(reply) == dns.rcode.REFUSED:
        # The question is echoed as asked: one label of ten octets.
        assert reply[12 : 12 + 16] == packet[12:]


@TRANSPORTS
def test_malformed_counter_counts_unparseable_packets(zone, redis_vip, tcp: bool) -> None:
    transport = "tcp" if tcp else "udp"
    unparseable = [
        SILENCE_CASES["eleven-octets"],
        FORMERR_CASES["compression-pointer-to-itself"],
        FORMERR_CASES["compression-pointer-past-the-end"],
        FORMERR_CASES["opt-option-longer-than-its-record"],
        FORMERR_CASES["label-runs-past-the-end"],
    ]
    before = malformed_count(zone, transport)
    client = Client(zone, tcp)
    try:
        for packet in unparseable:
            _, answer = client.send_then_sentinel(packet)
            assert_sentinel_answered(answer, redis_vip)
    finally:
        client.close()
    assert malformed_count(zone, transport) - before == len(unparseable)


# -- random packets -----------------------------------------------------------------------------


@dataclass
class RandomRun:
    """What a batch of random packets got."""

    #: Every packet of at least 12 octets with QR=0, by the ID it was given.
    queries: dict[int, bytes] = field(default_factory=dict)
    #: Answers to those queries, by ID.
    answers: dict[int, list[bytes]] = field(default_factory=lambda: collections.defaultdict(list))
    #: Packets that must get no answer (too short, or QR=1).
    silent: int = 0
    short: int = 0
    #: Messages that answered no query of ours.
    unexpected: list[bytes] = field(default_factory=list)
    #: TCP connections the server closed.
    dropped: int = 0
    malformed_before: float = 0.0
    malformed_after: float = 0.0


def random_packets(rng: random.Random, count: int) -> list[bytes]:
    """C{count} random byte strings; packet i carries ID i when it is long enough."""
    packets = []
    for index in range(count):
        length = rng.choice((rng.randrange(0, 12), rng.randrange(12, 40), rng.randrange(40, 600)))
        packet = bytearray(rng.randbytes(length))
        if length >= 2:
            packet[0:2] = struct.pack("!H", index)
        packets.append(bytes(packet))
    return packets


def expects_answer(packet: bytes) -> bool:
    return len(packet) >= 12 and not is_response(packet)


def record(run: RandomRun, packet: bytes, before: list[bytes], answer_id: int | None) -> None:
    for data in before:
        if answer_id is not None and len(data) >= 2 and message_id_of(data) == answer_id:
            run.answers[answer_id].append(data)
        else:
            run.unexpected.append(data)


def run_random(zone: ZoneProcess, tcp: bool, packets: list[bytes]) -> RandomRun:
    transport = "tcp" if tcp else "udp"
    run = RandomRun(malformed_before=malformed_count(zone, transport))
    client = Client(zone, tcp)
    try:
        for packet in packets:
            if expects_answer(packet):
                run.queries[message_id_of(packet)] = packet
            else:
                run.silent += 1
                run.short += len(packet) < 12
            if tcp:
                # Each packet is followed by a good query on the same connection.
                before, _ = client.send_then_sentinel(packet)
            elif expects_answer(packet):
                client.send(packet)
                before, answer = client.until(message_id_of(packet))
                if answer is not None:
                    before.append(answer)
            else:
                client.send(packet)
                before = []
            record(run, packet, before, message_id_of(packet) if expects_answer(packet) else None)
        # Over UDP, a last good query flushes out anything a silent packet got.
        client.send(sentinel())
        before, answer = client.until(SENTINEL_ID)
        run.unexpected.extend(before)
        assert answer is not None, "the server stopped answering"
        run.dropped = client.dropped
    finally:
        client.close()
    run.malformed_after = malformed_count(zone, transport)
    return run


@pytest.fixture(scope="module")
def random_udp(zone: ZoneProcess) -> RandomRun:
    return run_random(zone, False, random_packets(random.Random(SEED), RANDOM_UDP_PACKETS))


@pytest.fixture(scope="module")
def random_tcp(zone: ZoneProcess) -> RandomRun:
    return run_random(zone, True, random_packets(random.Random(SEED + 1), RANDOM_TCP_PACKETS))


@pytest.fixture(params=["udp", "tcp"])
def random_run(request: pytest.FixtureRequest) -> RandomRun:
    return request.getfixturevalue(f"random_{request.param}")


def test_random_packets_cover_every_kind(random_udp: RandomRun) -> None:
    """The batch holds enough of each kind for the other tests to mean something."""
    assert random_udp.short > 300
    assert random_udp.silent - random_udp.short > 300  # QR=1
    assert len(random_udp.queries) > 500


def test_every_random_query_gets_one_answer_with_its_id(random_run: RandomRun) -> None:
    missing = [i for i in random_run.queries if not random_run.answers.get(i)]
    doubled = [i for i, answers in random_run.answers.items() if len(answers) > 1]
    assert missing == [], f"{len(missing)} queries got no answer, e.g. " + ", ".join(
        random_run.queries[i][:40].hex() for i in missing[:3]
    )
    assert doubled == []
    for answers in random_run.answers.values():
        assert is_response(answers[0])
        assert len(answers[0]) >= 12


def test_random_short_packets_and_responses_get_silence(random_run: RandomRun) -> None:
    assert random_run.unexpected == []


def test_random_tcp_packets_never_close_the_connection(random_tcp: RandomRun) -> None:
    assert random_tcp.dropped == 0


def test_random_queries_get_formerr(random_run: RandomRun) -> None:
    """A random query is malformed; a non-QUERY opcode may get NOTIMP instead."""
    wrong = []
    for message_id, packet in random_run.queries.items():
        answers = random_run.answers.get(message_id)
        if not answers or dnspython_rejects(packet) is None:
            continue  # no answer is another test's failure; a valid packet is fine
        allowed = {dns.rcode.FORMERR}
        if opcode_of(packet) != 0:
            allowed.add(dns.rcode.NOTIMP)
        if rcode_of(answers[0]) not in allowed:
            wrong.append(packet)
    assert wrong == [], f"{len(wrong)} malformed queries not answered FORMERR, e.g. " + ", ".join(
        p[:48].hex() for p in wrong[:3]
    )


def test_malformed_counter_went_up(random_run: RandomRun) -> None:
    # Every packet shorter than a header is unparseable, whatever the parser.
    assert random_run.malformed_after - random_run.malformed_before >= random_run.short > 0


def test_server_still_answers_after_random_packets(
    zone, redis_vip, random_udp: RandomRun, random_tcp: RandomRun
) -> None:
    still_answers(zone, redis_vip)


# -- mutated queries ----------------------------------------------------------------------------


def test_mutated_queries_that_are_malformed_get_formerr(zone, redis_vip) -> None:
    """One to three random octets changed in a good EDNS0 query.

    dnspython is the referee: what it cannot decode (a bad label type, a forward
    or looping pointer, counts that do not match the records, trailing octets, a
    misplaced OPT) is malformed and must get FORMERR.
    """
    rng = random.Random(SEED + 2)
    good = dns.message.make_query(
        "echo-server.echo-example.svc.1010.mesh", "A", use_edns=0
    ).to_wire()
    wrong: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    client = Client(zone, tcp=False)
    try:
        for index in range(MUTATED_QUERIES):
            packet = bytearray(good)
            for _ in range(rng.randint(1, 3)):
                packet[rng.randrange(2, len(packet))] = rng.getrandbits(8)
            packet[0:2] = struct.pack("!H", index)
            if is_response(packet) or opcode_of(packet) != 0:
                continue
            why = dnspython_rejects(bytes(packet))
            client.send(bytes(packet))
            _, answer = client.until(index)
            assert answer is not None, f"no answer to {bytes(packet).hex()}"
            if why is not None and rcode_of(answer) != dns.rcode.FORMERR:
                key = f"{why}->{dns.rcode.to_text(rcode_of(answer))}"
                wrong[key] += 1
                examples.setdefault(key, bytes(packet).hex())
    finally:
        client.close()
    still_answers(zone, redis_vip)
    assert not wrong, f"malformed queries answered without FORMERR: {dict(wrong)}; {examples}"
