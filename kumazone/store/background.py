"""A zone's big table writes on another thread, in order, acknowledged once stored.

A zone that takes a whole table from the global (100,000 rows: half a second of
SQLite) would leave DNS unanswered that long on the reactor.  L{BackgroundWrites}
hands such a write to a thread (L{SQLiteStore.begin_background}: every other call
of the store waits for it, so writes keep their order) and says when what the zone
holds is stored (L{when_stored}, the zone's C{durable} for its acknowledgements).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from kumazone.core.storage import StoreChanges, StoreError
from kumazone.store.sqlite import SQLiteStore

__all__ = ["BackgroundWrites"]


class BackgroundWrites:
    """Writes of C{store} run by C{in_thread} (C{deferToThreadPool}, bound).

    @param failed: told (on the reactor) why a write failed, once its memory
        must go back to what is stored (the zone's C{recover}, and a reconnection).
    """

    def __init__(
        self,
        store: SQLiteStore,
        in_thread: Callable[[Callable[[], None]], Deferred[Any]],
        failed: Callable[[str], None],
    ) -> None:
        self.store = store
        self._in_thread = in_thread
        self._failed = failed
        #: The write on its way (at most one: the next waits for it to begin).
        self._writing: Deferred[Any] | None = None
        self._waiters: list[Deferred[None]] = []

    def write(self, changes: StoreChanges) -> None:
        """Write C{changes} on another thread (L{Zone.write_in_background}).

        Raises L{StoreError} at once if the store refuses writes (one failed
        before); waits, on the reactor, for a write still on its way to end.
        """
        begun = self.store.begin_background(changes)
        writing = self._writing = self._in_thread(begun)
        writing.addBoth(self._written, writing)

    def _written(self, result: object, writing: Deferred[Any]) -> None:
        reason = None
        if isinstance(result, Failure):
            error = result.value
            reason = str(error) if isinstance(error, StoreError) else repr(error)
            self._failed(reason)
        if writing is not self._writing:
            return
        self._writing = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if reason is None:
                waiter.callback(None)
            else:
                waiter.errback(StoreError(reason))

    def when_stored(self) -> Deferred[None]:
        """Fires once every write begun so far is stored; fails with L{StoreError}
        if one failed."""
        if self._writing is None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter
