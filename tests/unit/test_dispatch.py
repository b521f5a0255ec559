"""The epoll reactor's dispatch for the DNS ports (L{kumazone.dns.dispatch}), on a real
epoll reactor and real pipes (the reactor is turned by hand, never run)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.selectreactor import SelectReactor
from twisted.python import context, log
from twisted.python.failure import Failure

from kumazone.dns import dispatch
from kumazone.dns.udpbatch import BatchedDNSPort


class _Reader:
    """A pipe's read end; records the legacy log context's C{system} of each read."""

    def __init__(self, fd: int, fail: bool = False) -> None:
        self.fd = fd
        self.fail = fail
        self.systems: list[str] = []
        self.lost: list[Failure] = []

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "the-reader"

    def doRead(self) -> None:
        os.read(self.fd, 100)
        self.systems.append(context.get(log.ILogContext)["system"])
        if self.fail:
            raise RuntimeError("a bug in doRead")

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)


class _Direct(_Reader):
    """Dispatched without the legacy log context."""


dispatch.direct(_Direct)


@pytest.fixture
def reactor() -> Iterator[EPollReactor]:
    made = EPollReactor()
    yield made
    made.removeAll()
    made._poller.close()
    for fd in (made.waker.i, made.waker.o):
        os.close(fd)


def _readable(
    reactor: EPollReactor, kind: type[_Reader], fail: bool = False
) -> tuple[_Reader, int]:
    read, write = os.pipe()
    reader = kind(read, fail)
    reactor.addReader(reader)
    os.write(write, b"x")
    return reader, write


def test_the_dns_ports_are_dispatched_without_the_legacy_log_context(reactor: Any) -> None:
    assert dispatch.install(reactor)
    assert dispatch.installed(reactor)
    plain, plain_end = _readable(reactor, _Reader)
    direct, direct_end = _readable(reactor, _Direct)
    try:
        reactor.doIteration(0)
        # Every other selectable reads as Twisted dispatches it: its prefix is
        # the legacy system; a registered one reads under the context it found.
        assert plain.systems == ["the-reader"]
        assert direct.systems == ["-"]
    finally:
        for reader, end in ((plain, plain_end), (direct, direct_end)):
            reactor.removeReader(reader)
            os.close(reader.fd)
            os.close(end)


def test_a_dns_port_whose_read_fails_is_logged_and_disconnected(reactor: Any) -> None:
    dispatch.install(reactor)
    errors: list[dict[str, Any]] = []
    log.addObserver(errors.append)
    failing, end = _readable(reactor, _Direct, fail=True)
    try:
        reactor.doIteration(0)
    finally:
        log.removeObserver(errors.append)
        os.close(failing.fd)
        os.close(end)
    assert [e["failure"].value.args for e in errors if e.get("isError")] == [("a bug in doRead",)]
    assert len(failing.lost) == 1 and failing.lost[0].check(RuntimeError)
    assert failing not in reactor.getReaders()


class _BadLoser(_Direct):
    """Fails its read, then fails again being disconnected."""

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        raise RuntimeError("a bug in connectionLost")


dispatch.direct(_BadLoser)


def test_a_failure_past_the_reactors_own_handling_is_logged_and_the_turn_goes_on(
    reactor: Any,
) -> None:
    dispatch.install(reactor)
    errors: list[dict[str, Any]] = []
    log.addObserver(errors.append)
    failing, failing_end = _readable(reactor, _BadLoser, fail=True)
    plain, plain_end = _readable(reactor, _Reader)
    try:
        reactor.doIteration(0)  # raises nothing
    finally:
        log.removeObserver(errors.append)
        reactor.removeReader(plain)
        for fd in (failing.fd, failing_end, plain.fd, plain_end):
            os.close(fd)
    logged = {e["failure"].value.args[0] for e in errors if e.get("isError")}
    assert logged == {"a bug in doRead", "a bug in connectionLost"}
    assert plain.systems == ["the-reader"]  # the other descriptor was served


def test_install_is_once_and_leaves_other_reactors_as_they_are(reactor: Any) -> None:
    assert dispatch.install(reactor)
    poll = reactor.doIteration
    assert dispatch.install(reactor)
    assert reactor.doIteration is poll
    other = SelectReactor()
    try:
        assert not dispatch.install(other)
        assert not dispatch.installed(other)
        assert type(other).doIteration is SelectReactor.doIteration
        assert "doIteration" not in vars(other)
    finally:
        other.removeAll()
        for fd in (other.waker.i, other.waker.o):
            os.close(fd)


def test_a_batched_dns_port_listening_gives_its_reactor_the_dispatch(reactor: Any) -> None:
    # (The process tests answer through such ports on the real reactor.)
    port = BatchedDNSPort(0, DatagramProtocol(), "127.0.0.1", reactor=reactor)  # type: ignore[arg-type]
    assert not dispatch.installed(reactor)
    port.startListening()
    try:
        assert dispatch.installed(reactor)
        assert port in reactor.getReaders()
    finally:
        port.stopListening()
        reactor.runUntilCurrent()  # (the port closes on the next turn)
