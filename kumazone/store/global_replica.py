"""A replica of the global on a PostgreSQL store it shares with the global's other replicas.

The global's replicas share the store and elect one leader
(L{kumazone.store.election}).  The leader runs the federation as one process
does: it takes zone sync, places VIPs and writes.  Its writes go to the
database on one thread, fenced by its epoch; and nothing is pushed to a zone
until everything written before is stored (L{GlobalReplica.pushable}: the hub
asks before each push, and is told when the writes have drained).

The others stand by: they hold no table; they forward each zone sync
connection, byte for byte (TLS stays between the zone and the leader), and each
API request to the leader, at the address the leader wrote in the leader table
(L{kumazone.sync.forward}); /ready says C{follower}.  When one takes the lead
it loads the whole table from the store (on a thread), builds the federation
(O(table), once) and serves zone sync on its port from then on, closing what it
forwarded; zones connect again and take its table whole (a new table id), with
every VIP as the last leader stored it.  A leader whose write fails, or that
loses the lead, closes its zone sync and forwards again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from kumazone.core.storage import StoredState, StoreError
from kumazone.store.election import Election
from kumazone.store.leader import Contender, Leadership
from kumazone.store.postgres import Fenced, PostgresStore
from kumazone.store.replica import FencedWrites

__all__ = ["GlobalReplica"]

#: The leader's name in the leader table.
NAME = "global"


class GlobalReplica(FencedWrites):
    """The global's store while it leads, and its election.

    C{prepare(state)} builds the federation from the stored state, on the
    store's thread; C{on_lead} is given what it made, on the reactor;
    C{on_stand_by(why)} takes it down.
    """

    log = Logger()

    def __init__(
        self,
        store: PostgresStore,
        reactor: Any,
        registry: CollectorRegistry,
        holder: str,
        prepare: Callable[[StoredState], Any],
        on_lead: Callable[[Any], None],
        on_stand_by: Callable[[str], None],
        contact: str = "",
    ) -> None:
        self.store = store
        self.reactor = reactor
        self.prepare = prepare
        self.on_lead = on_lead
        self.on_stand_by = on_stand_by
        #: Told when every write made so far is stored (the hub pushes then).
        self.on_drained: Callable[[], None] = lambda: None
        self.leading = False
        self.epoch = 0
        self._pool = ThreadPool(1, 1, name="kumazone-store-writes")
        self._fenced_epoch = -1
        self._loading = False
        self._stopping = False
        self.election = Election(
            Contender(store.url, NAME, holder, contact=contact), reactor, self._elected
        )
        self._gauges(registry)
        # Elected but not leading (a load or a start that failed, an epoch that moved
        # during a load): the election says a change once, so look again each second.
        self._retaking = LoopingCall(self._retake)
        self._retaking.clock = reactor

    # -- the Store the federation writes through ----------------------------------

    def load(self) -> StoredState:
        """Never: the state is loaded when this replica takes the lead, for L{prepare}
        (a federation that cannot write goes back to no stored state: it stands by)."""
        raise StoreError("global: the state is loaded once, when a replica takes the lead")

    def _fence(self) -> str | None:
        return NAME if self.leading and not self._stopping else None

    def _name(self) -> str:
        return NAME

    def close(self) -> None:
        self.store.close()

    def pushable(self) -> bool:
        """Whether every write made so far is stored: only then may zones be sent the table."""
        return self.leading and self._durable >= self._written

    def _stored(self, number: int, generation: int, seq: int) -> None:
        if generation != self._generation:
            return
        self._durable = number
        if self._durable >= self._written:
            try:
                self.on_drained()
            except Exception:
                self.log.failure("global: pushing the stored table failed")

    def _write_failed(self, generation: int, failure: Failure) -> None:
        if generation != self._generation:
            return
        if failure.check(Fenced):
            self._fenced_epoch = self.epoch
        self._stand_by(f"a write failed: {failure.getErrorMessage()}")

    # -- leading ------------------------------------------------------------------

    def _elected(self, found: Leadership) -> None:
        self.store_up_gauge.set(1 if found.store_up else 0)
        if found.leading and not self.leading:
            self._take_lead(found.epoch)
        elif not found.leading and self.leading:
            self._stand_by(found.why)

    def _retake(self) -> None:
        found = self.election.leadership
        if found.leading and not self.leading and not self._stopping:
            self._take_lead(found.epoch)

    def _take_lead(self, epoch: int) -> None:
        if self._loading or self._stopping or epoch == self._fenced_epoch:
            return
        self._loading = True
        loaded = deferToThreadPool(self.reactor, self._pool, self._load_prepared)

        def lead(result: tuple[StoredState, Any]) -> None:
            state, prepared = result
            self._loading = False
            found = self.election.leadership
            if self._stopping or not found.leading or found.epoch != epoch:
                return  # a newer epoch is taken up by the next look (_retaking)
            self._generation += 1
            self._written = self._durable = 0
            self.epoch = epoch
            self.leading = True
            self.leader_gauge.set(1)
            self.log.info(
                "global: leading (epoch {epoch}): {count} service(s), table version {version}",
                epoch=epoch,
                count=len(state.allocations),
                version=state.table_version,
            )
            try:
                self.on_lead(prepared)
            except Exception:
                self.log.failure("global: taking the lead failed")
                self._stand_by("taking the lead failed")

        def failed(failure: Failure) -> None:
            self._loading = False
            if failure.check(StoreError):
                self.store_up_gauge.set(0)
                self.log.warn("global: {error}; trying again", error=failure.getErrorMessage())
            else:
                self.log.failure("global: loading the table failed; trying again", failure)

        loaded.addCallbacks(lead, failed)

    def _load_prepared(self) -> tuple[StoredState, Any]:
        """On the store's thread: the stored state, and what C{prepare} makes of it."""
        state = self.store.load()
        return state, self.prepare(state)

    def _stand_by(self, why: str) -> None:
        if not self.leading:
            return
        self.leading = False
        self.leader_gauge.set(0)
        self._generation += 1
        self._written = self._durable = 0
        self.log.warn("global: standing by: {why}", why=why)
        try:
            self.on_stand_by(why)
        except Exception:
            self.log.failure("global: standing by failed")

    # -- start and stop -------------------------------------------------------------

    def start(self) -> None:
        self._pool.start()
        self.leader_gauge.set(0)
        self.store_up_gauge.set(1)
        # The global's followers load the whole table when they lead: no change log.
        self.store.log_changes = False
        self.election.startService()
        self._retaking.start(1.0, now=False)

    def stop(self) -> Any:
        self._stopping = True
        if self._retaking.running:
            self._retaking.stop()
        self._stand_by("stopping")
        stopped = self.election.stopService()

        def stop_pool(result: object) -> None:
            self._pool.stop()
            self.store.close()

        stopped.addBoth(stop_pool)
        return stopped
