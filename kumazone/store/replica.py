"""A zone replica on a PostgreSQL store it shares with the zone's other replicas.

Several processes of one zone (C{--zone=NAME --store=postgresql://...}) share
the store.  One leads (L{kumazone.store.election}); every one serves DNS and
the API from its own memory.

- B{The leader} runs the zone as one process does: it places VIPs, expires
  hold-downs and writes.  Its writes go to the database on the store's one
  thread, fenced by its epoch, and what a change makes the listeners see (DNS,
  the hot path, the gauges) is held until the write is stored: nothing is
  served that is not stored, and an API write is answered once it is.
- B{A follower} never places a VIP.  It learns of every change from the
  store's change log: the database notifies each commit (LISTEN/NOTIFY, on a
  connection and a thread of its own) and the follower reads the rows after the
  last it applied, O(change) each; a read every L{SAFETY_NET} seconds catches
  a notification lost with a connection.  An API write on a follower is written
  to the database as a resource (unfenced: any replica may), and answered once
  this replica has applied it from the log; the leader takes it up, places its
  VIPs and writes them, and every follower applies that.
- B{Taking the lead}: the new leader first applies every change the old one
  stored (the epoch moved first, so no later one can come), then places what
  is unplaced.  B{Losing it} (or a write refused, or the database gone): the
  replica stops writing and, once the database answers again, loads the whole
  state and follows (O(table), at such moments only).  Meanwhile it keeps
  serving the last stored table.

Database calls never run on the reactor: every call of the store goes through
one thread (L{ThreadPool} of one: the order of writes is the order they were
made), the election has its thread, and the notifications theirs.  psycopg's
blocking API on threads rather than its asyncio one: Twisted's reactor here is
epoll, not asyncio's loop, and one thread of writes keeps their order simply.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, Gauge
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from kumazone.core.bulk import CollectorPause
from kumazone.core.resources import Resource, ResourceKey
from kumazone.core.storage import StoreChanges, StoredState, StoreError
from kumazone.core.zone import ConflictError, ReloadPlan, Zone, ZoneChange, publish
from kumazone.store.election import Election
from kumazone.store.leader import Contender, Leadership
from kumazone.store.postgres import CHANNEL, Fenced, PostgresStore, connect
from kumazone.sync.zone_side import FOLLOW_KEYS

__all__ = ["SAFETY_NET", "ZoneReplica", "open_store"]

#: Seconds between reads of the change log without a notification.
SAFETY_NET = 2.0
#: Changes the leader keeps in the log (a follower further behind loads whole).
LOG_KEPT = 10_000
#: Seconds between trims of the log by the leader.
TRIM_INTERVAL = 60.0


def open_store(
    url: str, log: Logger, stopping: Callable[[], bool] = lambda: False
) -> PostgresStore:
    """The store at C{url}, waiting for the database with a line each try (start-up only)."""
    delay = 1.0
    while True:
        try:
            return PostgresStore(url)
        except StoreError as e:
            if stopping():
                raise
            log.warn("{error}; trying again in {delay:.0f} s", error=str(e), delay=delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


class FencedWrites:
    """A leader's writes on the store's one thread, each fenced by its epoch.

    Writes of one generation are made on top of each other in memory: once one of
    them fails, the later ones of that generation are not made (they are refused on
    the thread itself, before the failure has reached the reactor).
    """

    store: PostgresStore
    reactor: Any
    _pool: ThreadPool
    leading: bool
    epoch: int
    _failed_generation = -1
    #: Writes handed to the thread, the last of them stored, and their generation
    #: (writes of an older one no longer count).
    _written = 0
    _durable = 0
    _generation = 0

    def _gauges(self, registry: CollectorRegistry) -> None:
        self.leader_gauge = Gauge(
            "kumazone_leader", "1 while this replica leads, else 0", registry=registry
        )
        self.store_up_gauge = Gauge(
            "kumazone_store_up", "1 while the store answers, else 0", registry=registry
        )

    def _fence(self) -> str | None:
        """The leader's name these writes are fenced under, or None if this replica
        may not write now (then L{commit} refuses, with why)."""
        raise NotImplementedError

    def commit(self, changes: StoreChanges) -> None:
        """Hand the leader's change to the store's thread, fenced by its epoch;
        L{_stored} or L{_write_failed} is told how it went."""
        name = self._fence()
        if name is None:
            raise StoreError(f"{self._name()}: this replica does not lead; not written")
        self._written += 1
        number, generation = self._written, self._generation
        done = deferToThreadPool(
            self.reactor, self._pool, self._write, changes, (name, self.epoch), generation
        )
        done.addCallbacks(
            lambda seq: self._stored(number, generation, seq),
            lambda failure: self._write_failed(generation, failure),
        )

    def _name(self) -> str:
        raise NotImplementedError

    def _stored(self, number: int, generation: int, seq: int) -> None:
        raise NotImplementedError

    def _write_failed(self, generation: int, failure: Failure) -> None:
        raise NotImplementedError

    def _write(self, changes: StoreChanges, fence: tuple[str, int], generation: int) -> int:
        # On the store's thread.
        if generation <= self._failed_generation:
            raise StoreError("an earlier write failed; not written")
        try:
            return self.store.commit_fenced(changes, fence)
        except BaseException:
            self._failed_generation = generation
            raise


class ZoneReplica(FencedWrites):
    """The zone's store, writer and listener gate when replicas share PostgreSQL."""

    log = Logger()

    def __init__(
        self,
        store: PostgresStore,
        zone_name: str,
        reactor: Any,
        registry: CollectorRegistry,
        holder: str | None = None,
    ) -> None:
        self.store = store
        self.reactor = reactor
        self.name = f"zone:{zone_name}"
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}"
        self._state: StoredState | None = store.load()  # start-up: before the reactor runs
        self.applied = self._state.log_seq
        self.zone: Zone | None = None
        #: What the zone's changes are told to once stored (DNS, the hot path, gauges).
        self.listeners: list[Callable[[ZoneChange], None]] = []
        self.leading = False
        #: Told True when this replica takes the lead, False when it loses it
        #: (a zone synced with a global connects to it only while leading).
        self.role_listeners: list[Callable[[bool], None]] = []
        self.epoch = 0
        #: Writes, in the order they were made, on one thread and connection; reads
        #: of the log and whole loads on another, so that they never wait for each other.
        self._pool = ThreadPool(1, 1, name="kumazone-store-writes")
        self._reads = ThreadPool(1, 1, name="kumazone-store-reads")
        self.reader = PostgresStore(store.url)
        self._held: list[tuple[int, ZoneChange]] = []
        self._durable_waiters: list[tuple[int, Deferred[None]]] = []
        self._applied_waiters: list[tuple[int, Deferred[None]]] = []
        self._own: set[int] = set()
        self._reading = False
        self._read_again = False
        self._resyncing = False
        self._stopping = False
        self._fenced_epoch = -1
        self.election = Election(
            Contender(store.url, self.name, self.holder), reactor, self._elected
        )
        self._gauges(registry)
        self.store_up_gauge.set(1)
        self._loops = [LoopingCall(self.poke), LoopingCall(self._trim)]
        for loop in self._loops:
            loop.clock = reactor
        self._listener: threading.Thread | None = None
        #: The next slice of a big change followed (L{_release}), when due.
        self._releasing: Any = None
        self._collector = CollectorPause()

    # -- the Store the zone writes through ------------------------------------

    def load(self) -> StoredState:
        """The state loaded at start (once: the zone's constructor)."""
        state, self._state = self._state, None
        if state is None:
            raise StoreError("a replica's zone reloads through ZoneReplica.reload")
        return state

    def _fence(self) -> str | None:
        return None if not self.leading or self._resyncing or self._stopping else self.name

    def _name(self) -> str:
        return self.name

    def close(self) -> None:
        self.store.close()
        self.reader.close()

    def _stored(self, number: int, generation: int, seq: int) -> None:
        if generation != self._generation:
            return
        if seq > self.applied:
            self._own.add(seq)  # not to be taken up again when the log brings it
        self._durable = number
        held, self._held = self._held, []
        for marker, change in held:
            if marker <= number:
                publish(self.listeners, change, self._warn)
            else:
                self._held.append((marker, change))
        self._fire(self._durable_waiters, number)

    def _write_failed(self, generation: int, failure: Failure) -> None:
        if generation != self._generation:
            return
        if failure.check(Fenced):
            self._fenced_epoch = self.epoch  # never to lead under it again
            self.log.warn("{name}: {error}: stepping down", name=self.name, error=failure.value)
        else:
            self.log.error("{name}: a write failed: {error}", name=self.name, error=failure.value)
        self._set_leading(False)
        self._resync()

    def _set_leading(self, leading: bool) -> None:
        self.leader_gauge.set(1 if leading else 0)
        if leading == self.leading:
            return
        self.leading = leading
        for listener in list(self.role_listeners):
            try:
                listener(leading)
            except Exception:
                self.log.failure("{name}: a role listener failed", name=self.name)

    # -- what listeners see ----------------------------------------------------

    def gate(self, change: ZoneChange) -> None:
        """The zone's one listener: a change is told on once what it wrote is stored."""
        if self._held or self._durable < self._written:
            self._held.append((self._written, change))
            return
        publish(self.listeners, change, self._warn)

    def _warn(self, message: str) -> None:
        self.log.warn("{message}", message=message)

    # -- API writes --------------------------------------------------------------

    def put(self, resource: Resource, now: float) -> bool | Deferred[bool]:
        """The API's PUT: on the leader as one process does it, once stored; on a
        follower, written as a resource and answered once applied from the log."""
        zone = self._zone()
        owner = zone.owner_of(resource.key)
        if owner not in (None, "api"):
            raise ConflictError(f"{resource.key} is defined in {owner}; change it there")
        if self.leading and not self._resyncing:
            created = zone.put(resource, now)
            return self.when_durable().addCallback(lambda _: created)
        before = zone.api.get(resource.key)
        if before == resource:
            return False
        return self._write_through(StoreChanges(puts=(resource,)), before is None)

    def delete(self, key: ResourceKey, now: float) -> bool | Deferred[bool]:
        """The API's DELETE, as L{put} does it."""
        zone = self._zone()
        owner = zone.owner_of(key)
        if owner not in (None, "api"):
            raise ConflictError(f"{key} is defined in {owner}; remove it there")
        if self.leading and not self._resyncing:
            deleted = zone.delete(key, now)
            return self.when_durable().addCallback(lambda _: deleted)
        if key not in zone.api:
            return False
        return self._write_through(StoreChanges(deletes=(key,)), True)

    def _write_through(self, changes: StoreChanges, result: bool) -> Deferred[bool]:
        written = deferToThreadPool(
            self.reactor, self._pool, self.store.commit_fenced, changes, None
        )

        def applied(seq: int) -> Deferred[None]:
            self.poke()
            return self._when_applied(seq)

        return written.addCallback(applied).addCallback(lambda _: result)

    def when_durable(self) -> Deferred[None]:
        """Fires once every write made so far is stored (fails if one is not)."""
        if self._durable >= self._written:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._durable_waiters.append((self._written, waiter))
        return waiter

    def _when_applied(self, seq: int) -> Deferred[None]:
        if self.applied >= seq:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._applied_waiters.append((seq, waiter))
        return waiter

    @staticmethod
    def _fire(waiters: list[tuple[int, Deferred[None]]], reached: int) -> None:
        for entry in list(waiters):
            if entry[0] <= reached:
                waiters.remove(entry)
                entry[1].callback(None)

    def _fail_waiters(self, why: str) -> None:
        for waiters in (self._durable_waiters, self._applied_waiters):
            pending, waiters[:] = list(waiters), []
            for _, waiter in pending:
                waiter.errback(Failure(StoreError(why)))

    # -- following the log -------------------------------------------------------

    def poke(self) -> None:
        """Read the change log after what this replica applied (notified, or the
        safety net's turn, or after a write of its own)."""
        if self.zone is None or self._resyncing or self._stopping:
            return
        if self._reading:
            self._read_again = True
            return
        self._reading = True
        done = deferToThreadPool(self.reactor, self._reads, self.reader.changes_since, self.applied)
        done.addCallbacks(self._read, self._read_failed)

    def _read(self, rows: list[tuple[int, StoreChanges]] | None) -> None:
        self._reading = False
        self.store_up_gauge.set(1)
        if self._resyncing:
            return  # read before the reload began: the reload has all of it
        if rows is None:
            self.log.warn("{name}: behind the trimmed change log: loading whole", name=self.name)
            self._resync()
            return
        zone = self._zone()
        now = self.reactor.seconds()
        for seq, changes in rows:
            if seq <= self.applied:
                continue
            self.applied = seq
            if seq in self._own:
                self._own.discard(seq)
                continue
            try:
                if self.leading:
                    # Only an API write through the database (it has no table version);
                    # a leader's own rows (of an earlier epoch of its own, or the last
                    # leader's, applied before it led) are never taken up again.
                    if changes.table_version is None:
                        self._take_up(zone, changes, now)
                elif changes.reset_table:
                    self._resync()
                    return
                else:
                    zone.follow(changes, now, FOLLOW_KEYS)
            except StoreError:
                return  # the write failure resyncs
            except Exception:
                self.log.failure(
                    "{name}: a change from the log failed; loading whole", name=self.name
                )
                self._resync()
                return
        self._fire(self._applied_waiters, self.applied)
        self._release()
        if len(rows) >= 1000 or self._read_again:
            self._read_again = False
            self.poke()

    def _release(self) -> None:
        """The entries (and DNS) follow a big change of the global's table
        L{FOLLOW_KEYS} services per reactor turn, as the leader does."""
        zone = self.zone
        if self._releasing is not None or zone is None:
            return  # (leading by now, it goes on: the slices are the table's, not the role's)
        if zone.follow_global(FOLLOW_KEYS):
            self._collector.pause()
            self._releasing = self.reactor.callLater(0, self._released)
        else:
            self._collector.resume()

    def _released(self) -> None:
        self._releasing = None
        self._release()

    def _take_up(self, zone: Zone, changes: StoreChanges, now: float) -> None:
        """A follower's API write, as the leader: placed and written (its rows)."""
        for resource in changes.puts:
            try:
                zone.put(resource, now)
            except ConflictError as e:
                self.log.warn("{name}: {error}; not taken up", name=self.name, error=str(e))
        for key in changes.deletes:
            try:
                zone.delete(key, now)
            except ConflictError as e:
                self.log.warn("{name}: {error}; not taken up", name=self.name, error=str(e))

    def _read_failed(self, failure: Failure) -> None:
        self._reading = False
        self.store_up_gauge.set(0)
        failure.trap(StoreError)
        self.log.warn("{name}: {error}", name=self.name, error=failure.value)

    def _trim(self) -> None:
        if self.leading and not self._resyncing:
            trimmed = deferToThreadPool(self.reactor, self._pool, self.store.trim_log, LOG_KEPT)
            trimmed.addErrback(lambda f: self.log.warn("{error}", error=f.value))

    # -- leading ---------------------------------------------------------------

    def _elected(self, found: Leadership) -> None:
        self.store_up_gauge.set(1 if found.store_up else 0)
        if found.leading and not self.leading:
            self._promote(found.epoch)
        elif not found.leading and self.leading:
            self.log.warn("{name}: stepping down: {why}", name=self.name, why=found.why)
            self._set_leading(False)
            zone = self._zone()
            zone.following = True
            if self._held or self._durable < self._written:
                self._resync()  # changes made but not stored: back to what is

    def _still_elected(self, epoch: int) -> bool:
        return (
            not self._stopping
            and self.election.leading
            and self.election.leadership.epoch == epoch
            and epoch != self._fenced_epoch
        )

    def _promote(self, epoch: int) -> None:
        """Apply what the last leader stored (its epoch is over), then lead.

        A read that fails is tried again (every 0.5 s) for as long as this replica
        holds that epoch: the election tells a change only once.
        """
        if self._resyncing or not self._still_elected(epoch):
            return  # the reload takes the lead when it is done
        caught = deferToThreadPool(self.reactor, self._reads, self._catch_up_rows, self.applied)

        def again(failure: Failure) -> None:
            failure.trap(StoreError)
            self.store_up_gauge.set(0)
            self.log.warn("{name}: {error}; trying again", name=self.name, error=failure.value)
            self.reactor.callLater(0.5, self._promote, epoch)

        def lead(rows: list[tuple[int, StoreChanges]] | None) -> None:
            if not self._still_elected(epoch) or self.leading:
                return
            if rows is None:
                self._resync()
                return
            self._reading = False
            self._read(rows)
            if self._resyncing:
                return
            self.epoch = epoch
            # (Told first: a connection to the global, say, is made in a later turn.)
            self._set_leading(True)
            self._zone().lead(self.reactor.seconds())

        caught.addCallbacks(lead, again)

    def _catch_up_rows(self, seq: int) -> list[tuple[int, StoreChanges]] | None:
        """Every change after C{seq} (on the store's thread, in pages)."""
        rows: list[tuple[int, StoreChanges]] = []
        while True:
            page = self.reader.changes_since(seq)
            if page is None:
                return None
            rows += page
            if len(page) < 1000:
                return rows
            seq = page[-1][0]

    # -- a whole reload ----------------------------------------------------------

    def _resync(self) -> None:
        """Stop writing; once the database answers, load the whole state and follow."""
        if self._resyncing or self._stopping:
            return
        self._resyncing = True
        self._generation += 1  # what is in flight no longer counts
        self._held = []
        self._written = self._durable = 0
        self._fail_waiters(f"{self.name}: the change was not stored")
        self._set_leading(False)
        zone = self._zone()
        zone.following = True
        loaded = deferToThreadPool(self.reactor, self._reads, self._load_when_up)
        loaded.addCallbacks(self._reloaded, self._reload_failed)

    def _reload_failed(self, failure: Failure) -> None:
        """A reload that failed (a bug): logged, and tried again in a second."""
        self.log.failure("{name}: reloading failed; trying again", failure, name=self.name)
        self._resyncing = False
        self.reactor.callLater(1.0, self._resync)

    def _load_when_up(self) -> tuple[StoredState, ReloadPlan | None] | None:
        """On the reads thread: the stored state, and what differs from the zone's
        (compared here, off the reactor: nothing changes the zone's rows while it
        reloads, see L{Zone.difference})."""
        delay = 0.5
        while not self._stopping:
            try:
                state = self.reader.load()
            except StoreError as e:
                self.reactor.callFromThread(self._store_down, str(e))
                until = time.monotonic() + delay
                while time.monotonic() < until and not self._stopping:
                    time.sleep(0.1)
                delay = min(delay * 2, 5.0)
                continue
            try:
                return state, self._zone().difference(state)
            except Exception:
                # A bug, or a change made meanwhile after all: compared again on the
                # reactor (L{Zone.reload} does it without a plan).
                self.reactor.callFromThread(
                    self.log.failure,
                    "{name}: comparing the stored state failed",
                    Failure(),
                    name=self.name,
                )
                return state, None
        return None

    def _store_down(self, error: str) -> None:
        self.store_up_gauge.set(0)
        self.log.warn("{name}: {error}; trying again", name=self.name, error=error)

    def _reloaded(self, loaded: tuple[StoredState, ReloadPlan | None] | None) -> None:
        if loaded is None:
            return
        state, plan = loaded
        self._resyncing = False
        self.store_up_gauge.set(1)
        self._written = self._durable = 0
        self._held = []
        self._own.clear()
        self.applied = state.log_seq
        self.log.info(
            "{name}: loaded whole at change {seq} (table version {version})",
            name=self.name,
            seq=state.log_seq,
            version=state.table_version,
        )
        self._zone().reload(state, following=True, plan=plan, limit=FOLLOW_KEYS)
        self._release()
        if self.election.leading:
            self._promote(self.election.leadership.epoch)

    # -- start and stop ----------------------------------------------------------

    def _zone(self) -> Zone:
        assert self.zone is not None
        return self.zone

    def start(self, zone: Zone) -> None:
        """Follow from now (the zone was built from the state loaded at start)."""
        self.zone = zone
        zone.following = True
        self.listeners.extend(zone.listeners)
        zone.listeners[:] = [self.gate]
        self._pool.start()
        self._reads.start()
        self._listener = threading.Thread(target=self._listen, name="kumazone-notify", daemon=True)
        self._listener.start()
        self._loops[0].start(SAFETY_NET, now=True)
        self._loops[1].start(TRIM_INTERVAL, now=False)
        self.election.startService()

    def _listen(self) -> None:
        """On its own thread: wait for the database's notifications, poke on each."""
        while not self._stopping:
            try:
                with connect(self.store.url, autocommit=True) as db:
                    db.execute(f"LISTEN {CHANNEL}")
                    self.reactor.callFromThread(self.poke)
                    while not self._stopping:
                        for _ in db.notifies(timeout=1.0, stop_after=1):
                            self.reactor.callFromThread(self.poke)
            except psycopg.Error:
                time.sleep(1.0)  # the safety net reads meanwhile

    def stop(self) -> Deferred[None]:
        """Stop leading and following; the threads end."""
        self._stopping = True
        self._set_leading(False)
        if self.zone is not None:
            self.zone.following = True  # nothing more is written
        for loop in self._loops:
            if loop.running:
                loop.stop()
        stopped = self.election.stopService()

        def stop_pool(result: object) -> None:
            self._pool.stop()
            self._reads.stop()
            self.store.close()
            self.reader.close()

        stopped.addBoth(stop_pool)
        return stopped
