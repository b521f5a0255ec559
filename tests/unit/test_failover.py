"""FailoverEndpoint: the global's replicas tried in turn, from the one that last worked."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError

from kumazone.sync.failover import FailoverEndpoint


class Endpoint:
    """Answers each connect with what C{outcomes} says next: 'ok', 'refused' or 'hang'."""

    def __init__(self, name: str, outcomes: list[str]) -> None:
        self.name = name
        self.outcomes = outcomes
        self.tried = 0
        self.pending: list[Deferred[Any]] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        self.tried += 1
        outcome = self.outcomes.pop(0) if self.outcomes else "refused"
        if outcome == "ok":
            return succeed(f"protocol of {self.name}")
        if outcome == "hang":
            self.pending.append(Deferred())
            return self.pending[-1]
        return fail(ConnectionRefusedError(self.name))


def results(d: Deferred[Any]) -> list[Any]:
    got: list[Any] = []
    d.addBoth(got.append)
    return got


def test_the_first_reachable_endpoint_connects_and_the_next_attempt_starts_there() -> None:
    a, b, c = (
        Endpoint("a", ["refused", "ok"]),
        Endpoint("b", ["refused"]),
        Endpoint("c", ["ok", "ok"]),
    )
    failover = FailoverEndpoint([a, b, c], ["a:1", "b:1", "c:1"])
    assert results(failover.connect(None)) == ["protocol of c"]
    assert (a.tried, b.tried, c.tried) == (1, 1, 1)
    assert failover.current_name == "c:1"
    assert results(failover.connect(None)) == ["protocol of c"]  # c again, first
    assert (a.tried, b.tried, c.tried) == (1, 1, 2)


def test_when_none_can_be_reached_the_attempt_fails_after_trying_each_once() -> None:
    a, b = Endpoint("a", []), Endpoint("b", [])
    failover = FailoverEndpoint([a, b], ["a:1", "b:1"])
    (failure,) = results(failover.connect(None))
    assert failure.check(ConnectionRefusedError)
    assert (a.tried, b.tried) == (1, 1)
    assert failover.current_name == "a:1"


def test_cancelling_an_attempt_cancels_the_connection_in_flight() -> None:
    a, b = Endpoint("a", ["refused"]), Endpoint("b", ["hang"])
    failover = FailoverEndpoint([a, b], ["a:1", "b:1"])
    attempt = failover.connect(None)
    got = results(attempt)
    attempt.cancel()
    assert got and got[0].check(CancelledError)
    assert b.pending[0].called  # cancelled too


def test_an_endpoint_list_needs_a_name_for_each() -> None:
    with pytest.raises(ValueError):
        FailoverEndpoint([], [])
    with pytest.raises(ValueError):
        FailoverEndpoint([Endpoint("a", [])], ["a:1", "b:1"])
