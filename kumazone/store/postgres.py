"""The store on PostgreSQL (psycopg 3): SQLite's tables and transactions, for several replicas.

The same logical schema as L{kumazone.store.sqlite} (resources, vips, holds,
zones, zone_services, meta) and the same contract: every change is one
transaction that writes the rows it changed; C{UNIQUE(vip_offset)} makes a VIP
on two services impossible; a failed write changes nothing and raises
L{StoreError}.

Schema versions.  The tables are created, or migrated from an older version,
at open, in one transaction holding a transaction-level advisory lock
(L{MIGRATION_LOCK}): of several replicas starting at once, one creates or
migrates and the others wait for it, then find the current version.

Passwords.  The store URL names no password (L{check_url} refuses one: it would
be seen in C{ps} and in logs); libpq takes it from C{PGPASSWORD} or
C{~/.pgpass}.  Errors name the database as C{host:port/db}, never the password.

Like the SQLite store this class is synchronous and not thread-safe: callers
use it from one thread at a time (the control plane's database thread, never
the reactor).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from importlib import resources as package_files
from typing import Any, TypeVar

import psycopg

from kumazone.core.storage import StoreChanges, StoredState, StoreError
from kumazone.core.vips import TableDelta
from kumazone.store import changelog
from kumazone.store.rows import load_state
from kumazone.store.urls import check_url, describe_url

T = TypeVar("T")

__all__ = [
    "CHANNEL",
    "MIGRATION_LOCK",
    "SCHEMA_VERSION",
    "Fenced",
    "PostgresStore",
    "check_url",
    "connect",
    "describe_url",
]

SCHEMA_VERSION = 4
#: The advisory lock (one bigint) held while the schema is created or migrated.
MIGRATION_LOCK = 0x6B756D617A6F6E65  # "kumazone"
#: Scripts taking the schema from each older version to the next one.
_MIGRATIONS = {1: "migrate-v1-v2.sql", 2: "migrate-v2-v3.sql", 3: "migrate-v3-v4.sql"}
#: The channel every transaction notifies (with its log sequence number) at commit.
CHANNEL = "kumazone_changes"
#: Seconds a connection attempt may take.
CONNECT_TIMEOUT = 5


class Fenced(StoreError):
    """A leader's write refused: its epoch is no longer the leader's (another replica leads)."""


#: Server-side limits of a store connection (ms): a statement, a wait for a lock,
#: and a transaction left open between statements.  The last ends the session of a
#: replica paused (or cut off) in the middle of a transaction, which would otherwise
#: hold its row locks (the leader row, the log's counter) and stop every other
#: replica's writes and the failover for as long as its connection stays open.
SESSION_LIMITS = (
    "-c statement_timeout=5000 -c lock_timeout=3000 -c idle_in_transaction_session_timeout=1500"
    # And the server notices a client cut off (no packet comes back) in about 4 s,
    # even in the middle of reading a statement, where the timeouts above do not run.
    " -c tcp_keepalives_idle=2 -c tcp_keepalives_interval=1 -c tcp_keepalives_count=2"
    " -c tcp_user_timeout=4000"
)


def connect(url: str, **options: Any) -> psycopg.Connection[Any]:
    """A connection to the database at C{url} that gives up rather than hang.

    Connecting takes L{CONNECT_TIMEOUT} s at most, and a dead peer is noticed in
    seconds (TCP keepalives, and a user timeout for unacknowledged writes), so
    that a replica cut off from the database finds out while its lease runs.
    The server ends its statements, lock waits and idle transactions past
    L{SESSION_LIMITS} (C{options} may set others).
    """
    options.setdefault("options", SESSION_LIMITS)
    return psycopg.connect(
        url,
        connect_timeout=CONNECT_TIMEOUT,
        application_name="kumazone",
        keepalives=1,
        keepalives_idle=2,
        keepalives_interval=1,
        keepalives_count=2,
        tcp_user_timeout=4000,
        **options,
    )


def _schema_file(name: str) -> str:
    return (package_files.files("kumazone.store") / "schema" / "postgresql" / name).read_text()


class PostgresStore:
    """A store in the PostgreSQL database at C{url}; connects (and creates the schema) at once."""

    def __init__(self, url: str) -> None:
        self.url = check_url(url)
        self.where = describe_url(url)
        self._db: psycopg.Connection[Any] | None = None
        #: Whether the current transaction's first statement went through.
        self._alive = False
        #: Whether writes go to the change log (for replicas that follow it).
        self.log_changes = True
        self._connect()

    # -- connection -----------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        if self._db is not None and not self._db.closed and not self._db.broken:
            return self._db
        if self._db is not None:
            self._db.close()
            self._db = None
        try:
            db = connect(self.url)
        except psycopg.Error as e:
            raise StoreError(f"cannot open store {self.where}: {_reason(e)}") from None
        try:
            self._create(db)
        except psycopg.Error as e:
            db.close()
            raise StoreError(f"cannot open store {self.where}: {_reason(e)}") from None
        except BaseException:
            db.close()
            raise
        self._db = db
        return db

    def _create(self, db: psycopg.Connection[Any]) -> None:
        """Create the schema, or migrate it, under the migration lock; one transaction."""
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            exists = db.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()
            if not (exists and exists[0]):
                # A new database: version 1, then every migration (one history to keep).
                db.execute(_schema_file("v1.sql"))
                version = 1
            else:
                row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                version = int(row[0]) if row else 0
            if version == SCHEMA_VERSION:
                return
            if version > SCHEMA_VERSION or version not in _MIGRATIONS:
                raise StoreError(
                    f"store {self.where} has schema version {version}, this kumazone "
                    f"reads version {SCHEMA_VERSION}"
                )
            while version < SCHEMA_VERSION:
                db.execute(_schema_file(_MIGRATIONS[version]))
                version += 1

    # -- reading --------------------------------------------------------------

    def load(self) -> StoredState:
        """Read everything back, in one snapshot; raises L{StoreError} if it cannot."""
        return self._once_more(self._load_once, "read")

    def _load_once(self) -> StoredState:
        try:
            db = self._connect()
            with db.transaction(), db.cursor() as cursor:
                self._first(cursor, "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                return load_state(db.execute)
        except (ValueError, KeyError) as e:
            raise StoreError(f"cannot read store {self.where}: {e}") from None

    # -- writing --------------------------------------------------------------

    def commit(self, changes: StoreChanges) -> None:
        """Apply C{changes} in one transaction; on failure raise L{StoreError}, changing nothing."""
        self._commit(changes, None)

    def commit_fenced(self, changes: StoreChanges, fence: tuple[str, int] | None) -> int:
        """L{commit} as the leader of C{fence} (name, epoch): L{Fenced}, and nothing
        written, unless that epoch still leads when the transaction commits.  None:
        no check (a write any replica may make: the API's resources).

        The caller takes C{fence} when it decides to write (on the reactor), never
        later: a leader that stepped down meanwhile must be refused, not unchecked.
        Returns the change's sequence number in the change log.
        """
        return self._commit(changes, fence)

    def _commit(self, changes: StoreChanges, fence: tuple[str, int] | None) -> int:
        return self._once_more(lambda: self._commit_once(changes, fence), "write to")

    def _once_more(self, work: Callable[[], T], verb: str) -> T:
        """C{work}, and once more on a new connection if the old one was found dead
        before its transaction did anything (a server restarted meanwhile: the first
        statement on a connection it ended always fails).  Nothing is sent twice:
        once L{_first} has gone through, a failure is the caller's L{StoreError}."""
        for attempt in range(2):
            self._alive = False
            try:
                return work()
            except psycopg.OperationalError as e:
                dead = self._db is None or self._db.broken or self._db.closed
                if attempt == 0 and dead and not self._alive:
                    self._drop()
                    continue
                raise StoreError(f"cannot {verb} store {self.where}: {_reason(e)}") from None
            except psycopg.Error as e:
                raise StoreError(f"cannot {verb} store {self.where}: {_reason(e)}") from None
        raise AssertionError("unreachable")

    def _first(self, cursor: psycopg.Cursor[Any], sql: str, params: Any = None) -> None:
        """The first statement of a transaction: past it, the connection was alive."""
        cursor.execute(sql, params)
        self._alive = True

    def _drop(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _commit_once(self, changes: StoreChanges, fence: tuple[str, int] | None) -> int:
        try:
            db = self._connect()
            with db.transaction(), db.cursor() as cursor:
                self._first(cursor, "SELECT 1")
                if fence is not None:
                    self._check_fence(cursor, *fence)
                if changes.reset_table:
                    cursor.execute("DELETE FROM vips")
                    cursor.execute("DELETE FROM holds")
                _write_resources(cursor, changes)
                if changes.delta is not None:
                    _write_delta(cursor, changes.delta)
                _write_zones(cursor, changes)
                _write_meta(cursor, changes)
                return _append(cursor, changes) if self.log_changes else 0
        except (OverflowError, ValueError, TypeError) as e:
            raise StoreError(f"cannot write to store {self.where}: {e}") from None

    def changes_since(self, seq: int, limit: int = 1000) -> list[tuple[int, StoreChanges]] | None:
        """The logged changes after C{seq}, oldest first (C{limit} at most); None if
        the log no longer holds them all (trimmed: load the whole state again)."""
        return self._once_more(lambda: self._changes_since_once(seq, limit), "read")

    def _changes_since_once(self, seq: int, limit: int) -> list[tuple[int, StoreChanges]] | None:
        db = self._connect()
        with db.transaction(), db.cursor() as cursor:
            # One snapshot: a trim between two statements cannot open a gap unseen.
            self._first(cursor, "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            cursor.execute("SELECT value::bigint FROM meta WHERE key = 'log_seq'")
            last = cursor.fetchone()
            cursor.execute(
                "SELECT seq, body FROM changes WHERE seq > %s ORDER BY seq LIMIT %s",
                (seq, limit),
            )
            rows = cursor.fetchall()
        newest = int(last[0]) if last else 0
        # Sequence numbers have no gaps: the rows must start right after seq.
        if (rows and rows[0][0] != seq + 1) or (not rows and newest > seq):
            return None  # trimmed past seq
        try:
            return [(int(n), changelog.decode(body)) for n, body in rows]
        except ValueError as e:
            raise StoreError(f"store {self.where}: change log unreadable: {e}") from None

    def trim_log(self, keep: int) -> None:
        """Drop all but the last C{keep} (1 at least) changes of the log (a follower
        further behind loads the whole state again)."""
        keep = max(1, keep)
        try:
            db = self._connect()
            with db.transaction():
                db.execute(
                    "DELETE FROM changes WHERE seq <= "
                    "(SELECT value::bigint FROM meta WHERE key = 'log_seq') - %s",
                    (keep,),
                )
        except psycopg.Error as e:
            raise StoreError(f"cannot write to store {self.where}: {_reason(e)}") from None

    def _check_fence(self, cursor: psycopg.Cursor[Any], name: str, epoch: int) -> None:
        # FOR KEY SHARE: a replica taking over (SELECT ... FOR UPDATE of this row
        # first) waits for this transaction, and this one fails once the row has
        # moved on; the leader's own renewal (an UPDATE of renewed_at) does not wait.
        cursor.execute(
            "SELECT 1 FROM leader WHERE name=%s AND epoch=%s FOR KEY SHARE", (name, epoch)
        )
        if cursor.fetchone() is None:
            raise Fenced(f"store {self.where}: epoch {epoch} of {name} no longer leads")

    def close(self) -> None:
        """Close the connection."""
        if self._db is not None:
            self._db.close()
            self._db = None


def _reason(error: psycopg.Error) -> str:
    """The first line of what the server or libpq said (no URL, so no password)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _append(cursor: psycopg.Cursor[Any], changes: StoreChanges) -> int:
    """Log C{changes} under the next sequence number and notify at commit; the number.

    The counter's row lock, held to the commit, makes sequence order commit order.
    """
    cursor.execute(
        "UPDATE meta SET value = (value::bigint + 1)::text WHERE key = 'log_seq' RETURNING value"
    )
    row = cursor.fetchone()
    assert row is not None
    seq = int(row[0])
    cursor.execute(
        "INSERT INTO changes (seq, body) VALUES (%s, %s)", (seq, changelog.encode(changes))
    )
    cursor.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(seq)))
    return seq


def _many(cursor: psycopg.Cursor[Any], sql: str, rows: Iterable[tuple[Any, ...]]) -> None:
    rows = list(rows)
    if rows:
        cursor.executemany(sql, rows)


def _write_resources(cursor: psycopg.Cursor[Any], changes: StoreChanges) -> None:
    _many(
        cursor,
        "INSERT INTO resources (type, mesh, name, document) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (type, mesh, name) DO UPDATE SET document = excluded.document",
        [(r.type, r.mesh, r.name, r.raw.decode("utf-8")) for r in changes.puts],
    )
    _many(
        cursor,
        "DELETE FROM resources WHERE type=%s AND mesh=%s AND name=%s",
        [(k.type, k.mesh, k.name) for k in changes.deletes],
    )


def _write_delta(cursor: psycopg.Cursor[Any], delta: TableDelta) -> None:
    _many(
        cursor,
        "DELETE FROM vips WHERE mesh=%s AND service=%s",
        [(a.key.mesh, a.key.service) for a in delta.removed],
    )
    _many(
        cursor,
        "DELETE FROM holds WHERE vip_offset=%s",
        [(h.offset,) for h in delta.holds_dropped],
    )
    _many(
        cursor,
        "INSERT INTO holds (vip_offset, mesh, service, until) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (vip_offset) DO UPDATE SET mesh = excluded.mesh, "
        "service = excluded.service, until = excluded.until",
        [(h.offset, h.key.mesh, h.key.service, h.until) for h in delta.holds_added],
    )
    zones_text: dict[tuple[str, ...], str] = {}
    _many(
        cursor,
        "INSERT INTO vips (mesh, service, vip_offset, zones, claim) VALUES (%s, %s, %s, %s, %s)",
        [
            (
                a.key.mesh,
                a.key.service,
                a.offset,
                zones_text.get(a.zones)
                or zones_text.setdefault(a.zones, json.dumps(list(a.zones))),
                a.claim,
            )
            for a in delta.added
        ],
    )


def _write_zones(cursor: psycopg.Cursor[Any], changes: StoreChanges) -> None:
    for name in changes.zones_deleted:
        cursor.execute("DELETE FROM zones WHERE name=%s", (name,))
        cursor.execute("DELETE FROM zone_services WHERE zone=%s", (name,))
    _many(
        cursor,
        "INSERT INTO zones (name, last_contact, acked) VALUES (%s, %s, %s) "
        "ON CONFLICT (name) DO UPDATE SET "
        "last_contact = excluded.last_contact, acked = excluded.acked",
        [(r.name, r.last_contact, r.acked) for r in changes.zones_put],
    )
    _many(
        cursor,
        "DELETE FROM zone_services WHERE zone=%s AND mesh=%s AND service=%s",
        [(zone, k.mesh, k.service) for zone, k in changes.zone_services_removed],
    )
    _many(
        cursor,
        "INSERT INTO zone_services (zone, mesh, service) VALUES (%s, %s, %s) "
        "ON CONFLICT DO NOTHING",
        [(zone, k.mesh, k.service) for zone, k in changes.zone_services_added],
    )


def _write_meta(cursor: psycopg.Cursor[Any], changes: StoreChanges) -> None:
    version = changes.table_version
    for key, value in (
        ("table_origin", changes.table_id),
        ("table_version", None if version is None else str(version)),
        ("vip_range", changes.vip_range),
    ):
        if value is not None:
            cursor.execute("UPDATE meta SET value=%s WHERE key=%s", (value, key))
