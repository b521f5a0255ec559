"""A client endpoint over several addresses: the replicas of the global, tried in turn.

A zone given C{--global=A,B,C} connects through a L{FailoverEndpoint}: each
connection attempt starts with the address that last worked (the first one at
first) and, when it cannot be reached, tries the next ones in order within the
same attempt, so that a global replica down costs a zone one refused (or timed
out) connection, not a backoff.  Only when none can be reached does the attempt
fail, and the zone's C{ClientService} waits and tries again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["FailoverEndpoint"]


@implementer(IStreamClientEndpoint)
class FailoverEndpoint:
    """Connects through the first of C{endpoints} (named by C{names}) that can be reached."""

    log = Logger()

    def __init__(self, endpoints: Sequence[Any], names: Sequence[str]) -> None:
        if not endpoints or len(endpoints) != len(names):
            raise ValueError("one name for each of one or more endpoints")
        self.endpoints = list(endpoints)
        self.names = list(names)
        #: The index of the endpoint that last connected (where the next attempt starts).
        self.current = 0

    @property
    def current_name(self) -> str:
        return self.names[self.current]

    def connect(self, factory: Any) -> Deferred[Any]:
        """The first connection made, trying each endpoint once from L{current}."""
        order = [(self.current + i) % len(self.endpoints) for i in range(len(self.endpoints))]
        failures: list[str] = []
        trying: list[Deferred[Any]] = []

        def cancel(_: Deferred[Any]) -> None:
            # The zone stops: the attempt in flight goes too (done fails with CancelledError).
            if trying:
                trying[-1].cancel()

        done: Deferred[Any] = Deferred(cancel)

        def attempt(position: int) -> None:
            index = order[position]
            trying.append(self.endpoints[index].connect(factory))

            def connected(protocol: Any) -> None:
                if done.called:
                    protocol.transport.loseConnection()  # cancelled meanwhile
                    return
                if index != self.current:
                    self.log.info(
                        "connected to {name} (after {failed})",
                        name=self.names[index],
                        failed="; ".join(failures),
                    )
                self.current = index
                done.callback(protocol)

            def failed(failure: Failure) -> None:
                if done.called:
                    return  # cancelled: the zone is stopping
                failures.append(f"{self.names[index]}: {failure.getErrorMessage()}")
                if position + 1 < len(order):
                    attempt(position + 1)
                else:
                    done.errback(failure)

            trying[-1].addCallbacks(connected, failed)

        attempt(0)
        return done
