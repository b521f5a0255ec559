"""DNS over TCP: one read of many messages is answered a few messages per reactor turn.

A read of 64 KB of costly queries must not hold every other client for its whole
length; the protocol answers L{KumaDNSProtocol.MESSAGES_PER_TURN} messages and
takes the rest up at the next turn, and the transport's own flow control (a
client that does not read) still holds it back.
"""

from __future__ import annotations

import struct

import dns.message
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from kumazone.core.config import load_config
from kumazone.dns.authority import MeshAuthority
from kumazone.dns.server import KumaDNSProtocol, KumaDNSServerFactory
from kumazone.metrics import Metrics

CONFIG = load_config(None, {})


def framed(count: int) -> bytes:
    query = dns.message.make_query("nosuch.mesh", "A").to_wire()
    return b"".join(struct.pack("!H", len(query)) + query for _ in range(count))


def answers(transport: StringTransport) -> int:
    data, count = transport.value(), 0
    while len(data) >= 2:
        (length,) = struct.unpack("!H", data[:2])
        data = data[2 + length :]
        count += 1
    return count


class Turns(Clock):
    """A clock whose C{turn()} runs the calls due now, not those they schedule.

    (L{Clock.advance} runs calls scheduled while it runs too: every turn at once.)
    """

    def turn(self) -> None:
        due = [call for call in self.getDelayedCalls() if call.getTime() <= self.seconds()]
        for call in due:
            self.calls.remove(call)
            call.func(*call.args, **call.kw)


def connect(clock: Clock) -> tuple[KumaDNSProtocol, StringTransport]:
    factory = KumaDNSServerFactory(
        MeshAuthority(CONFIG, ["127.0.0.1"]), lambda host: "default", Metrics("z"), clock
    )
    proto = factory.buildProtocol(None)
    assert proto is not None
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def test_one_read_of_many_messages_is_answered_over_several_turns() -> None:
    clock = Turns()
    proto, transport = connect(clock)
    per_turn = KumaDNSProtocol.MESSAGES_PER_TURN
    proto.dataReceived(framed(5 * per_turn + 3))
    assert answers(transport) == per_turn
    assert transport.producerState == "paused"  # not read meanwhile
    for turn in range(2, 7):
        clock.turn()
        assert answers(transport) == min(turn * per_turn, 5 * per_turn + 3)
    assert transport.producerState == "producing"
    assert not clock.getDelayedCalls()


def test_a_full_write_buffer_still_holds_the_connection_back() -> None:
    clock = Turns()
    proto, transport = connect(clock)
    per_turn = KumaDNSProtocol.MESSAGES_PER_TURN
    proto.dataReceived(framed(3 * per_turn))
    proto.pauseProducing()  # as the transport does when its buffer fills
    clock.turn()
    assert answers(transport) == per_turn  # the next turn does not resume a held connection
    proto.resumeProducing()  # the buffer drained
    clock.turn()
    clock.turn()
    assert answers(transport) == 3 * per_turn


def test_a_connection_gone_between_turns_is_not_read_again() -> None:
    clock = Turns()
    proto, transport = connect(clock)
    proto.dataReceived(framed(2 * KumaDNSProtocol.MESSAGES_PER_TURN))
    transport.loseConnection()
    proto.connectionLost()
    clock.turn()
    assert answers(transport) == KumaDNSProtocol.MESSAGES_PER_TURN
