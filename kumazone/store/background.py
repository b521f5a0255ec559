"""A zone's big table writes on another thread, in order, acknowledged once stored.

A zone that takes a whole table from the global (100,000 rows: half a second of
SQLite) would leave DNS unanswered that long on the reactor.  L{BackgroundWrites}
hands such a write to one thread (L{SQLiteStore.begin_background}: a call of the
store on the reactor waits for the writes begun before it, so writes keep their
order), and the table updates that come while one is on its way follow it there
(a zone with services of its own gets the next version right behind its first
table), and so do the zone's own changes (the API, files, hold-downs); it says
when what the zone holds is stored (L{when_stored}: the zone's C{durable} for its
acknowledgements, and L{StoredWrites} for the API's answers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from kumazone.core.resources import Resource, ResourceKey
from kumazone.core.storage import StoreChanges, StoreError
from kumazone.core.zone import Zone
from kumazone.store.sqlite import RefusedAfterFailure, SQLiteStore

__all__ = ["BackgroundWrites", "StoredWrites"]


class BackgroundWrites:
    """Writes of C{store} run by C{in_thread} (C{deferToThreadPool} on a pool of one
    thread, bound: the writes run in the order they were begun).

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
        #: The last write handed to the thread (those before it end first).
        self._writing: Deferred[Any] | None = None
        self._waiters: list[Deferred[None]] = []

    def write(self, changes: StoreChanges, big: bool) -> None:
        """Write a table update (L{Zone.write_in_background}): on the other thread if
        C{big} or if a write is on its way there, else at once.

        Raises L{StoreError} at once if the store refuses writes (one failed
        before), or if a write made at once fails.
        """
        if not big and not self.store.writing_in_background:
            self.store.commit(changes)
            return
        writing = self._in_thread(self.store.begin_background(changes))
        self._writing = writing
        writing.addBoth(self._written, writing)

    def _written(self, result: object, writing: Deferred[Any]) -> None:
        reason = None
        try:
            if isinstance(result, Failure):
                error = result.value
                reason = str(error) if isinstance(error, StoreError) else repr(error)
                if not isinstance(error, RefusedAfterFailure):
                    self._failed(reason)  # (once: the writes refused after it are its)
        finally:
            if writing is self._writing:
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


class StoredWrites:
    """The API's writes to a zone whose big writes go to another thread: a write
    made while one is on its way follows it there, and is answered once stored.

    The zone serves the change at once (as it does a big table update while it is
    written); if the write fails, the zone goes back to what is stored and the
    answer is the failure (L{StoreError}).
    """

    def __init__(self, zone: Zone, writes: BackgroundWrites) -> None:
        self.zone = zone
        self.writes = writes

    def put(self, resource: Resource, now: float) -> bool | Deferred[bool]:
        return self._stored(self.zone.put(resource, now))

    def delete(self, key: ResourceKey, now: float) -> bool | Deferred[bool]:
        return self._stored(self.zone.delete(key, now))

    def _stored(self, result: bool) -> bool | Deferred[bool]:
        if not self.writes.store.writing_in_background:
            return result  # written already, on the reactor
        return self.writes.when_stored().addCallback(lambda _: result)
