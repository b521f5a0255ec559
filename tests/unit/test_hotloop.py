"""The batched port's C loop (kumazone/dns/_hotloop.c) against its rules, on plain buffers.

No sockets: the receive side's headers, datagrams and addresses are written
here as the kernel's recvmmsg would, the C loop runs over them, and what it
wrote to the send side (answers, their lengths), the counters it moved and the
datagrams it left to the Python loop are compared with a model of the Python
loop's rules (a kept answer for a known client's exact query octets, patched by
L{hotpath.answer_from}).  tests/process/test_udp_batch.py runs both loops on
real sockets.
"""

from __future__ import annotations

import errno
import random
import socket
import struct
from typing import Any

import dns.message
import dns.rcode
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kumazone.core.zone import Zone
from kumazone.dns import udpbatch
from kumazone.dns.hotpath import answer_from
from kumazone.store.sqlite import SQLiteStore
from tests.unit.test_hotpath import (
    CLIENTS,
    CONFIG,
    SEED,
    SERVICES,
    TYPES,
    corpus_names,
    inventory,
    make_query,
    random_case,
)
from tests.unit.test_hotpath import wire as wire_parts

try:
    from kumazone.dns import _hotloop
except ImportError:  # make builds it: a missing C loop is a failure, not a skip
    pytest.fail("the C loop (kumazone/dns/_hotloop.c) is not built: run make", pytrace=False)

SLOT, NAME_SLOT, BATCH = udpbatch.SLOT, udpbatch.NAME_SLOT, udpbatch.BATCH
IP = slice(4, 8)  # where an IPv4 socket address holds its address
SENTINEL = 0xA5


def messages() -> udpbatch._Messages:
    return udpbatch._Messages(NAME_SLOT)


def fill(received: udpbatch._Messages, batch: list[tuple[bytes, bytes]]) -> None:
    """Write C{batch} (source address, datagram) as recvmmsg would."""
    for i, (ip, datagram) in enumerate(batch):
        base = i * SLOT
        received.data_bytes[base : base + len(datagram)] = datagram
        name = i * NAME_SLOT
        received.name_bytes[name + IP.start : name + IP.stop] = ip
        offset = i * udpbatch._HEADER_SIZE + udpbatch._LENGTH_OFFSET
        struct.pack_into("I", received.header_bytes, offset, len(datagram))


def run(
    batch: list[tuple[bytes, bytes]], clients: dict[bytes, Any], negative: Any = None
) -> tuple[list[int], Any]:
    received, answers = messages(), messages()
    fill(received, batch)
    answers.data_bytes[:] = bytes([SENTINEL]) * len(answers.data_bytes)
    rest = _hotloop.answer_known(
        len(batch),
        received.header_bytes,
        received.data_bytes,
        received.name_bytes,
        answers.iovec_bytes,
        answers.data_bytes,
        clients,
        IP.start,
        IP.stop,
        SLOT,
        NAME_SLOT,
        negative,
    )
    return rest, answers


def iov_len(answers: udpbatch._Messages, i: int) -> int:
    offset = i * udpbatch._IOVEC_SIZE + udpbatch._IOV_LEN_OFFSET
    return int(struct.unpack_from("N", answers.iovec_bytes, offset)[0])


def model(batch: list[tuple[bytes, bytes]], clients: dict[bytes, Any]) -> dict[int, bytes]:
    """The Python loop's rule: which datagrams have a kept answer, and that answer."""
    found = {}
    for i, (ip, datagram) in enumerate(batch):
        client = clients.get(ip)
        if client is None or len(datagram) <= 12 or datagram[2] & 0xFE:
            continue
        seen = client[1].get(datagram[4:]) or client[2].get(datagram[4:])
        if seen is not None:
            found[i] = answer_from(seen[0], datagram)
    return found


QUERY = bytes.fromhex("123401000001000000000000057265646973046d6573680000010001")
#: An answer to QUERY as kept: ID zero, QR and AA set, RD and CD clear.
TEMPLATE = b"\x00\x00\x84\x00" + QUERY[4:6] + b"\x00\x01" + QUERY[8:] + b"\xc0\x0c" + bytes(10)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_the_c_loop_answers_what_the_python_loop_would(data: st.DataObject) -> None:
    rng = random.Random(data.draw(st.integers(0, 2**32 - 1)))
    ips = [bytes([127, 0, 0, n]) for n in range(1, 5)]
    tails = [
        QUERY[4:],
        QUERY[4:-1] + b"\x1c",
        QUERY[4:] + b"\x00\x00)\x04\xd0\x00\x00\x00\x00\x00\x00",
    ]
    clients: dict[bytes, Any] = {}
    counters: dict[bytes, list[int]] = {}
    for ip in ips[:3]:  # the fourth is a client not seen yet
        known: tuple[dict[bytes, Any], dict[bytes, Any]] = ({}, {})  # positive, negative
        for tail in rng.sample(tails, rng.randrange(len(tails) + 1)):
            counters[tail] = counters.get(tail) or [rng.randrange(10**20)]  # big ints too
            answer = TEMPLATE[:4] + rng.randbytes(rng.randrange(20))
            # In either dictionary, or in both (the positive one is asked first).
            for where in rng.choice([(0,), (1,), (0, 1)]):
                known[where][tail] = (answer if where == 0 else answer + b"-", counters[tail])
        clients[ip] = ("default", *known)
    batch = []
    for _ in range(data.draw(st.integers(0, BATCH))):
        ip = rng.choice(ips)
        shape = rng.random()
        if shape < 0.6:
            datagram = (
                rng.randbytes(2)
                + bytes([rng.choice([0, 1, 1, 0x80, 0x29])])
                + bytes([rng.choice([0, 0x10, 0x20])])
                + rng.choice(tails)
            )
        elif shape < 0.8:
            datagram = rng.randbytes(rng.randrange(14))  # at most a header: the Python loop's
        else:
            datagram = rng.randbytes(rng.randrange(SLOT + 1))
        batch.append((ip, datagram))
    before = {tail: list(counter) for tail, counter in counters.items()}
    expected = model(batch, clients)
    hits: dict[bytes, int] = {}
    for i in expected:
        tail = batch[i][1][4:]
        hits[tail] = hits.get(tail, 0) + 1

    rest, answers = run(batch, clients)

    assert rest == [i for i in range(len(batch)) if i not in expected]
    for i, answer in expected.items():
        assert iov_len(answers, i) == len(answer)
        assert bytes(answers.data_bytes[i * SLOT : i * SLOT + len(answer)]) == answer
    for i in rest:  # left to the Python loop: its send slot untouched
        assert answers.data_bytes[i * SLOT] == SENTINEL
    for tail, counter in counters.items():
        assert counter == [before[tail][0] + hits.get(tail, 0)]


def test_objects_of_another_shape_are_left_to_the_python_loop() -> None:
    """What the C loop does not expect it does not touch: the Python loop judges it."""
    tail = QUERY[4:]
    good = (TEMPLATE, [0])
    shapes: list[Any] = [
        ["default", {tail: good}, {}],  # a list, not a tuple
        ("default", {tail: good}),
        ("default", {tail: good}, {}, "more"),
        ("default", "not a dict", {}),
        ("default", {tail: good}, "not a dict"),
        ("default", {tail: [TEMPLATE, [0]]}, {}),  # the kept answer a list
        ("default", {}, {tail: [TEMPLATE, [0]]}),
        ("default", {tail: ("text", [0])}, {}),
        ("default", {tail: (TEMPLATE[:3], [0])}, {}),  # shorter than its header's flags
        ("default", {tail: (TEMPLATE, (0,))}, {}),
        ("default", {tail: (TEMPLATE, [])}, {}),
        ("default", {tail: (b"\x00" * (SLOT + 1), [0])}, {}),  # would not fit its slot
    ]
    for shape in shapes:
        rest, answers = run([(b"\x7f\x00\x00\x01", QUERY)], {b"\x7f\x00\x00\x01": shape})
        assert rest == [0], shape
        assert answers.data_bytes[0] == SENTINEL
    # A count that is not an int (adding to it could run Python code): left too, untouched.
    counter: list[Any] = ["x"]
    rest, _answers = run(
        [(b"\x7f\x00\x00\x01", QUERY)],
        {b"\x7f\x00\x00\x01": ("m", {tail: (TEMPLATE, counter)}, {})},
    )
    assert rest == [0] and counter == ["x"]


def test_bad_arguments_are_refused() -> None:
    received, answers = messages(), messages()
    arguments: list[Any] = [
        BATCH,
        received.header_bytes,
        received.data_bytes,
        received.name_bytes,
        answers.iovec_bytes,
        answers.data_bytes,
        {},
        IP.start,
        IP.stop,
        SLOT,
        NAME_SLOT,
        None,
    ]
    assert _hotloop.answer_known(*arguments) == list(range(BATCH))  # no clients yet
    with pytest.raises(TypeError, match="12 arguments"):
        _hotloop.answer_known(*arguments[:11])
    for index, value, error in [
        (0, BATCH + 1, ValueError),  # more datagrams than slots
        (0, 2**60, ValueError),  # so many that the buffer checks would overflow
        (0, -1, ValueError),
        (9, 2**60, ValueError),  # a slot as large
        (6, [], TypeError),
        (8, NAME_SLOT + 1, ValueError),
        (7, 9, ValueError),  # an empty address range
        (5, bytes(BATCH * SLOT), BufferError),  # the send side must be writable
        (11, ({}, {}), TypeError),  # a negative context of another shape
        (11, ({}, {}, b"mesh", b".mesh", (), ("x",), {}, 3), TypeError),
    ]:
        changed = list(arguments)
        changed[index] = value
        with pytest.raises(error):
            _hotloop.answer_known(*changed)


def test_the_c_loop_makes_the_nxdomain_answers_the_python_path_makes() -> None:
    """For a corpus of names (no one's, services', near the apex, odd forms), before and after
    a change: every answer the C loop makes equals the Python path's, octet for octet, and it
    makes those for names no one has."""
    zone = Zone("zone-1", CONFIG, SQLiteStore(":memory:"))
    zone.set_file("/inventory.yaml", inventory(SERVICES), 0.0)
    factory, proto, capture = wire_parts(zone)
    rng = random.Random(SEED)
    made = compared = 0
    for step in range(2):
        if step:  # one of the names no one had becomes a service's
            zone.set_file("/inventory.yaml", inventory([*SERVICES, ("ghost", "default")]), 1.0)
        names = [*corpus_names(zone), "ghost.mesh", "x.ghost.mesh", "a.b.c.mesh", "ns.dns.mesh"]
        # Empty non-terminals (NODATA), of a service of the default mesh only.
        names += ["svc.1010.mesh", "1010.mesh", "echo-example.svc.1010.mesh"] * 4
        names += [f"{rng.getrandbits(40):x}.mesh" for _ in range(40)]
        for name in names:
            for rdtype in [*TYPES, "AXFR"]:
                host = rng.choice(list(CLIENTS))
                mesh_of = factory.mesh_of(CLIENTS[host])
                edns, rd = rng.randrange(4), rng.random() < 0.5
                rdclass = "IN" if rng.random() < 0.9 else rng.choice(["CH", "ANY"])
                query = make_query(random_case(rng, name), rdtype, edns, rd, rdclass, rng)
                # The authority path first (it teaches the tails), then the Python path.
                proto.datagramReceived(query, (CLIENTS[host], 5353))
                capture.sent.pop()
                expected = proto.template_answer(query, mesh_of)
                ip = bytes(int(octet) for octet in CLIENTS[host].split("."))
                clients = {ip: (mesh_of, {}, {})}  # nothing kept by octets: the C loop judges it
                rest, answers = run([(ip, query)], clients, factory.hot.negative_context())
                compared += 1
                if rest:
                    continue
                made += 1
                answer = bytes(answers.data_bytes[: iov_len(answers, 0)])
                assert answer == expected, (step, name, rdtype, edns, rdclass, host)
                assert dns.message.from_wire(answer).rcode() == dns.rcode.NXDOMAIN
    assert compared > 1000
    assert made > compared / 10, (made, compared)  # the random names, at least


def test_serve_reports_what_the_kernel_said_and_refuses_bad_arguments() -> None:
    """serve's read: an empty socket reads nothing, a closed one says EBADF (no exception)."""
    received, answers = messages(), messages()
    buffers = [
        received.header_bytes,
        answers.header_bytes,
        received.data_bytes,
        received.name_bytes,
        answers.iovec_bytes,
        answers.data_bytes,
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        fixed: list[Any] = [sock.fileno(), BATCH, *buffers, IP.start, IP.stop, SLOT, NAME_SLOT]
        assert _hotloop.serve(tuple(fixed), {}, None) == (-1, None, errno.EAGAIN, 0)  # empty
        with pytest.raises(TypeError, match="3 arguments"):
            _hotloop.serve(tuple(fixed), {})
        with pytest.raises(TypeError, match="tuple of 12"):
            _hotloop.serve(fixed, {}, None)
        for index, value, error in [
            (0, -1, ValueError),
            (1, BATCH + 1, ValueError),  # more datagrams than slots
            (1, 0, ValueError),
            (2, bytes(len(received.header_bytes)), BufferError),  # the kernel writes there
            (9, IP.start, ValueError),  # an empty address range
        ]:
            changed = list(fixed)
            changed[index] = value
            with pytest.raises(error):
                _hotloop.serve(tuple(changed), {}, None)
        with pytest.raises(TypeError, match="clients"):
            _hotloop.serve(tuple(fixed), [], None)
    assert _hotloop.serve(tuple(fixed), {}, None) == (-1, None, errno.EBADF, 0)  # closed
