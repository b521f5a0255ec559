"""The leader election on the reactor: a L{Contender} stepped on a thread of its own.

Every L{STEP} seconds the contender's step runs on the election's one thread
(its database calls block; the reactor never waits for them), and what it
found comes back to the reactor: C{on_change} is told each time this replica
starts or stops leading, or the database goes down or comes back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from kumazone.store.leader import STEP, Contender, Leadership

__all__ = ["Election"]


class Election(Service):
    """Steps C{contender} every C{step} seconds; C{leadership} is the last step's finding."""

    log = Logger()

    def __init__(
        self,
        contender: Contender,
        reactor: Any,
        on_change: Callable[[Leadership], object],
        step: float = STEP,
    ) -> None:
        self.contender = contender
        self.reactor = reactor
        self.on_change = on_change
        self.step = step
        self.leadership = Leadership(False, why="not started", store_up=False)
        self._pool = ThreadPool(1, 1, name="kumazone-leader")
        self._loop = LoopingCall(self._step)
        self._loop.clock = reactor
        self._busy = False

    @property
    def leading(self) -> bool:
        return self.leadership.leading

    def startService(self) -> None:
        super().startService()
        self._pool.start()
        self._loop.start(self.step, now=True)

    def _step(self) -> None:
        if self._busy:
            # The last step has not come back (a database that answers nothing, or
            # a network that went dark): the lead ends by this replica's own clock
            # all the same, once the lease it last renewed has run out.
            if self.leadership.leading and self.contender.lease_over():
                before, self.leadership = self.leadership, self._lease_over(store_up=False)
                self._tell(self.leadership, before)
            return
        self._busy = True
        done: Deferred[Leadership] = deferToThreadPool(
            self.reactor, self._pool, self.contender.step
        )
        done.addCallbacks(self._stepped, self._failed)

    def _lease_over(self, store_up: bool) -> Leadership:
        return Leadership(
            False, why="the lease ran out before the store answered", store_up=store_up
        )

    def _stepped(self, found: Leadership) -> None:
        self._busy = False
        if found.leading and self.contender.lease_over():
            # A step that took longer than the lease: not to be trusted as a renewal
            # (the next step finds the lease over and tries to lead anew).
            found = self._lease_over(found.store_up)
        before, self.leadership = self.leadership, found
        if (found.leading, found.epoch, found.store_up) != (
            before.leading,
            before.epoch,
            before.store_up,
        ):
            self._tell(found, before)

    def _tell(self, found: Leadership, before: Leadership) -> None:
        if found.leading and not before.leading:
            self.log.info(
                "{name}: this replica leads (epoch {epoch})",
                name=self.contender.name,
                epoch=found.epoch,
            )
        elif before.leading and not found.leading:
            self.log.warn(
                "{name}: this replica no longer leads: {why}",
                name=self.contender.name,
                why=found.why,
            )
        if found.store_up != before.store_up and before.why != "not started":
            if found.store_up:
                self.log.info("{name}: the store is reachable again", name=self.contender.name)
            else:
                self.log.warn(
                    "{name}: the store is unreachable: {why}",
                    name=self.contender.name,
                    why=found.why or "(still leading within the lease)",
                )
        try:
            self.on_change(found)
        except Exception:
            self.log.failure("a listener of the leader election failed")

    def _failed(self, failure: Failure) -> None:
        # A bug of ours in the step (database errors are findings, not failures).
        self._busy = False
        self.log.failure("a leader election step failed", failure)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        done: Deferred[None] = deferToThreadPool(self.reactor, self._pool, self.contender.resign)

        def stop_pool(result: object) -> None:
            self._pool.stop()

        done.addBoth(stop_pool)
        return done
