"""One leader among the replicas that share a PostgreSQL database: a lock, a lease, an epoch.

Replicas of one control plane (the global, or the replicas of one zone) share
a name (C{global}, C{zone:NAME}).  Each runs a L{Contender} on a connection of
its own, and calls L{Contender.step} every L{STEP} seconds:

- The leader holds a session-level advisory lock for the name on that
  connection, and renews the lease in the C{leader} table (C{renewed_at}) at
  each step.  The lock alone is not enough: a leader paused with SIGSTOP, or
  cut off behind a half-open connection, keeps its session, and so the lock,
  open on the server for as long as TCP lets it.
- A replica that cannot take the lock reads the lease; once it has run out
  (the server's clock: no replica's clock is trusted), it ends the lock
  holder's session with C{pg_terminate_backend} and takes the lock.
- Taking the lead increments the name's C{epoch}.  Every write of a leader
  checks its epoch in the same transaction (L{kumazone.store.postgres.PostgresStore.commit_fenced},
  C{SELECT ... FOR KEY SHARE}): a paused leader that resumes writes nothing, because
  its epoch has moved on, and steps down at its next step, when the renewal of
  its lease finds the row taken (or its session gone).
- A leader that cannot renew steps down once the lease it last renewed would
  have run out by its own monotonic clock, which counts a pause too.

So with L{LEASE} 3 s and L{STEP} 0.5 s: a leader killed outright is replaced
within a step (its session ends with it, and the lock is free); a leader
paused or cut off within the lease plus a step or two, under 5 s.

Synchronous and blocking: run it on a thread of its own, never on the reactor
(L{kumazone.store.election} does).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from kumazone.store.postgres import connect, describe_url

__all__ = ["LEASE", "LOCK_CLASS", "STEP", "Contender", "Leadership"]

#: Seconds a lease runs unless renewed.
LEASE = 3.0
#: Seconds between steps (a renewal, or an attempt to lead).
STEP = 0.5
#: The first key of the two-key advisory lock; the second is the name's CRC-32.
LOCK_CLASS = 0x6B7A  # "kz"


@dataclass(frozen=True)
class Leadership:
    """What one step found: whether this replica leads, and under which epoch."""

    leading: bool
    epoch: int = 0
    #: Why this replica does not lead (or stopped leading); '' while it leads.
    why: str = ""
    #: The database could be reached during this step.
    store_up: bool = True
    #: How to reach the replica that leads, as it wrote it (while another leads).
    contact: str = ""


def _lock_key(name: str) -> int:
    """The advisory lock's second key: a signed 32-bit CRC of the name."""
    value = zlib.crc32(name.encode("utf-8"))
    return value - (1 << 32) if value >= 1 << 31 else value


class Contender:
    """One replica's part in choosing the leader of C{name}; C{holder} says who it is."""

    def __init__(
        self,
        url: str,
        name: str,
        holder: str,
        lease: float = LEASE,
        clock: Callable[[], float] = time.monotonic,
        contact: str = "",
    ) -> None:
        self.url = url
        #: How the other replicas reach this one, written when it takes the lead.
        self.contact = contact
        self.where = describe_url(url)
        self.name = name
        self.holder = holder
        self.lease = lease
        self._clock = clock
        self._key = _lock_key(name)
        self._db: psycopg.Connection[Any] | None = None
        #: The epoch this replica leads under, or None.
        self.epoch: int | None = None
        #: When (own clock) the lease was last renewed.
        self._renewed = 0.0
        #: A lock holder seen renewing no lease: (its pid, since when).
        self._unrenewed: tuple[int, float] | None = None
        #: What the lock's holder wrote of how to reach it, at the last look.
        self._seen_contact = ""

    # -- the one entry point ------------------------------------------------

    def step(self) -> Leadership:
        """Renew the lead, or try to take it; never raises for a database problem."""
        if self.epoch is not None and self._clock() - self._renewed >= self.lease:
            # Paused, or unable to renew for a whole lease: another may lead by now.
            return self._step_down("the lease ran out before it was renewed")
        try:
            db = self._connection()
            if self.epoch is not None:
                return self._renew(db)
            return self._try_to_lead(db)
        except psycopg.Error as e:
            self._drop_connection()
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if self.epoch is not None and self._clock() - self._renewed < self.lease:
                # Still within the lease this replica renewed: it leads until then.
                return Leadership(True, self.epoch, store_up=False)
            self.epoch = None
            return Leadership(False, why=f"store {self.where}: {reason}", store_up=False)

    def lease_over(self) -> bool:
        """Whether the lease this replica last renewed has run out by its own clock
        (read from another thread: one float, written once per renewal)."""
        return self._clock() - self._renewed >= self.lease

    def resign(self) -> None:
        """Stop leading (at shutdown): the lock goes with the session, at once."""
        self.epoch = None
        self._drop_connection()

    # -- steps ---------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        if self._db is None or self._db.closed or self._db.broken:
            self._drop_connection()
            self._db = connect(self.url, autocommit=True, options="-c statement_timeout=2000")
        return self._db

    def _drop_connection(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            finally:
                self._db = None

    def _renew(self, db: psycopg.Connection[Any]) -> Leadership:
        started = self._clock()
        renewed = db.execute(
            "UPDATE leader SET renewed_at = now() "
            "WHERE name = %s AND epoch = %s AND pid = pg_backend_pid()",
            (self.name, self.epoch),
        ).rowcount
        if renewed != 1:
            return self._step_down("another replica leads now")
        self._renewed = started
        assert self.epoch is not None
        return Leadership(True, self.epoch)

    def _try_to_lead(self, db: psycopg.Connection[Any]) -> Leadership:
        if not self._take_lock(db):
            holder = self._expired_holder(db)
            if holder is None:
                return Leadership(False, why="another replica leads", contact=self._seen_contact)
            # The lease ran out: end the holder's session (a paused or cut-off
            # leader), which frees the lock.
            db.execute("SELECT pg_terminate_backend(%s)", (holder,))
            self._unrenewed = None
            if not self._wait_for_lock(db):
                return Leadership(False, why="the last leader's session is still ending")
        started = self._clock()
        with db.transaction():
            # FOR UPDATE waits for the last leader's writes still in flight (they
            # hold the row FOR KEY SHARE); they fail once this commits, their epoch
            # gone.  (A session paused in one is ended by the server within
            # idle_in_transaction_session_timeout: see postgres.SESSION_LIMITS.)
            db.execute("SELECT 1 FROM leader WHERE name = %s FOR UPDATE", (self.name,))
            row = db.execute(
                "INSERT INTO leader (name, epoch, holder, pid, renewed_at, contact) "
                "VALUES (%s, 1, %s, pg_backend_pid(), now(), %s) "
                "ON CONFLICT (name) DO UPDATE SET epoch = leader.epoch + 1, "
                "holder = excluded.holder, pid = excluded.pid, renewed_at = now(), "
                "contact = excluded.contact "
                "RETURNING epoch",
                (self.name, self.holder, self.contact),
            ).fetchone()
        assert row is not None
        self.epoch = int(row[0])
        self._renewed = started
        return Leadership(True, self.epoch)

    def _take_lock(self, db: psycopg.Connection[Any]) -> bool:
        row = db.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, self._key)).fetchone()
        return bool(row and row[0])

    def _wait_for_lock(self, db: psycopg.Connection[Any]) -> bool:
        """The lock, once the ended session has let it go (a moment), within a step."""
        deadline = self._clock() + STEP
        while True:
            if self._take_lock(db):
                return True
            if self._clock() >= deadline:
                return False
            time.sleep(0.02)

    def _expired_holder(self, db: psycopg.Connection[Any]) -> int | None:
        """The backend pid holding the lock, if its lease has run out; else None.

        A holder that renews no lease (it took the lock and has not written its
        row yet, or it stopped right there) counts as expired once this replica
        has seen it so for a whole lease.
        """
        self._seen_contact = ""
        row = db.execute(
            "SELECT l.pid, r.pid IS NOT NULL, "
            "coalesce(r.renewed_at + make_interval(secs => %s) < now(), false), "
            "coalesce(r.contact, '') "
            "FROM pg_locks l LEFT JOIN leader r ON r.name = %s AND r.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted "
            "AND l.classid = (%s::int)::oid AND l.objid = (%s::int)::oid AND l.objsubid = 2 "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (self.lease, self.name, LOCK_CLASS, self._key),
        ).fetchone()
        if row is None:
            self._unrenewed = None
            return None  # free again: the next step takes it
        pid, renews, expired = int(row[0]), bool(row[1]), bool(row[2])
        if renews:
            self._unrenewed = None
            if not expired:
                # The lock's holder renews its lease: how to reach it is what it wrote.
                self._seen_contact = str(row[3])
            return pid if expired else None
        now = self._clock()
        if self._unrenewed is None or self._unrenewed[0] != pid:
            self._unrenewed = (pid, now)
            return None
        return pid if now - self._unrenewed[1] >= self.lease else None

    def _step_down(self, why: str) -> Leadership:
        self.epoch = None
        self._drop_connection()  # the lock, if still held, goes with the session
        return Leadership(False, why=why)
