"""The store: resources given through the API, the VIP table and the global's zones, in SQLite.

Every change is one transaction that writes the rows it changed and no others:
the resources put or deleted, the allocations and hold-downs of the table's
delta, the meta values given, the global's zone records named (one row each: a
hello or a disconnect writes one row) and the zones' services that came and
went (one row each).  C{UNIQUE(vip_offset)} makes a VIP on two services
impossible.  No Twisted here: the zone and the global call it from the reactor
thread, one transaction per change (a change of many rows, such as a first
load, writes them all in it).

Durability.  The database is in WAL mode with C{synchronous=FULL}: every commit
appends its pages to the write-ahead log and fsyncs it before C{commit}
returns; checkpoints (SQLite's, automatic) fsync the database file too.  So a
crash, or a power loss, at any moment loses at most the transaction being
written, which was never acknowledged: an API PUT is answered after its commit
returns, a zone acknowledges a table version only once it has stored it, and
the global pushes to zones only what it has stored (after a failed write it
goes back to what the store holds).  After a crash SQLite rolls back the
unfinished transaction at the next open; the store holds every acknowledged
change, and nothing else.

A write of many rows (a zone's whole table from the global: 100,000 rows take
half a second) may run on another thread (L{begin_background}), so that DNS is
answered meanwhile: it is one transaction as any other, writes run in the order
they were begun (a call on the calling thread waits for those begun before it),
and once one fails every write is refused until L{load} (the caller goes back to
what is stored, as after any failed write).  What it writes is acknowledged (to
the global) only once it has ended.  Its rows go in as JSON arrays of 5,000
(C{json_each}): one statement per 5,000 rows, during which the GIL is free, where
C{executemany} takes the GIL back for every row (and, beside a busy reactor,
waits up to 5 ms each time).
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable
from importlib import resources as package_files
from typing import Any

from kumazone.core.storage import StoreChanges, StoredState, StoreError
from kumazone.core.vips import TableDelta
from kumazone.store.rows import load_state

__all__ = ["SCHEMA_VERSION", "RefusedAfterFailure", "SQLiteStore"]

SCHEMA_VERSION = 3


def _schema(version: int) -> str:
    return _schema_file(f"v{version}.sql")


def _schema_file(name: str) -> str:
    return (package_files.files("kumazone.store") / "schema" / name).read_text()


#: The script that takes a store from each older schema version to the next one.
_MIGRATIONS = {1: "migrate-v1-v2.sql", 2: "migrate-v2-v3.sql"}
#: Rows a write on another thread hands SQLite in one statement (a JSON array).
_JSON_CHUNK = 5000
#: Whether this SQLite has C{->>} (3.38): else such a write takes C{executemany} too.
_JSON_ROWS = sqlite3.sqlite_version_info >= (3, 38, 0)


class RefusedAfterFailure(StoreError):
    """A write refused because one on another thread failed before it (until L{load})."""


class SQLiteStore:
    """SQLite-backed store; C{path} may be C{:memory:}."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            if path != ":memory:":
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed table survives a power loss too, so the global
            # never goes back to a version its zones have already seen.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._create()
            #: Held by each call while it uses the database.
            self._lock = threading.Lock()
            #: Writes begun on the calling thread and not yet ended on another, and
            #: the condition a call on the calling thread waits on until there are none.
            self._background = 0
            self._idle = threading.Condition()
            #: Why a write on another thread failed: every write is refused until L{load}.
            self._failed: str | None = None
        except sqlite3.Error as e:
            raise StoreError(f"cannot open store {path}: {e}") from None

    def _create(self) -> None:
        exists = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
        ).fetchone()
        if exists:
            (version,) = self._db.execute(
                "SELECT value FROM meta WHERE key='schema_version'"
            ).fetchone()
            self._migrate(int(version))
            return
        # Created in one transaction: a crash leaves either no schema or all of it.
        self._db.executescript(f"BEGIN IMMEDIATE;\n{_schema(SCHEMA_VERSION)}\nCOMMIT;")

    def _migrate(self, version: int) -> None:
        """Bring a store of an older schema up to L{SCHEMA_VERSION}, in one transaction."""
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION or version not in _MIGRATIONS:
            raise StoreError(
                f"store {self.path} has schema version {version}, this kumazone "
                f"reads version {SCHEMA_VERSION}"
            )
        scripts = []
        while version < SCHEMA_VERSION:
            scripts.append(_schema_file(_MIGRATIONS[version]))
            version += 1
        # executescript commits first; the whole migration is one transaction: a crash
        # leaves the old schema or the new one.
        try:
            self._db.executescript("BEGIN IMMEDIATE;\n" + "\n".join(scripts) + "\nCOMMIT;")
        except sqlite3.Error:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def load(self) -> StoredState:
        """Read everything back; raises L{StoreError} if the store cannot be read.

        A write refused since one failed (L{begin_background}) is taken again
        from here on: the caller holds what is stored.
        """
        self._wait_for_background()
        with self._lock:
            try:
                state = self._load()
            except (sqlite3.Error, ValueError, KeyError) as e:
                raise StoreError(f"cannot read store {self.path}: {e}") from None
            self._failed = None
            return state

    def _wait_for_background(self) -> None:
        with self._idle:
            while self._background:
                self._idle.wait()

    @property
    def writing_in_background(self) -> bool:
        """Whether a write begun on another thread (L{begin_background}) has not ended."""
        return self._background > 0

    def _load(self) -> StoredState:
        return load_state(self._db.execute)

    def commit(self, changes: StoreChanges) -> None:
        """Apply C{changes} in one transaction.

        Raises L{StoreError} (and changes nothing) if the write fails.  Waits for
        the writes begun before it on other threads (L{begin_background}) to end.
        """
        self._wait_for_background()
        with self._lock:
            self._refuse_after_failure()
            self._commit(changes)

    def begin_background(self, changes: StoreChanges) -> Callable[[], None]:
        """Begin a write of C{changes}; the returned function writes them, on another thread.

        Call it exactly once, the functions of several writes in the order they
        were begun (one thread).  Until it has returned, every call from the
        calling thread waits (so comes after these changes).  It raises
        L{StoreError} if the write fails (nothing of it is stored), and every
        write is refused from then on until L{load}.  Raises L{StoreError} at
        once if writes are refused already.
        """
        self._refuse_after_failure()
        with self._idle:
            self._background += 1

        def write() -> None:
            try:
                with self._lock:
                    self._refuse_after_failure()  # (one begun before it failed)
                    try:
                        self._commit(changes, free_gil=True)
                    except Exception as e:  # (StoreError, or a bug of ours: refused alike)
                        self._failed = str(e)
                        raise
            finally:
                with self._idle:
                    self._background -= 1
                    self._idle.notify_all()

        return write

    def _refuse_after_failure(self) -> None:
        if self._failed is not None:
            raise RefusedAfterFailure(
                f"an earlier write failed ({self._failed}); read the store again"
            )

    def _commit(self, changes: StoreChanges, free_gil: bool = False) -> None:
        try:
            with self._transaction():
                if changes.reset_table:
                    self._db.execute("DELETE FROM vips")
                    self._db.execute("DELETE FROM holds")
                self._write_resources(changes)
                if changes.delta is not None:
                    self._write_delta(changes.delta, free_gil and _JSON_ROWS)
                self._write_zones(changes)
                self._write_meta(changes)
        except (sqlite3.Error, OverflowError, ValueError, TypeError) as e:
            # Whatever the database refuses (a number too large for it, a bad
            # value): rolled back, and the caller goes back to what is stored.
            raise StoreError(f"cannot write to store {self.path}: {e}") from None

    def _write_resources(self, changes: StoreChanges) -> None:
        for resource in changes.puts:
            self._db.execute(
                "INSERT OR REPLACE INTO resources (type, mesh, name, document) VALUES (?, ?, ?, ?)",
                (resource.type, resource.mesh, resource.name, resource.raw.decode("utf-8")),
            )
        for key in changes.deletes:
            self._db.execute(
                "DELETE FROM resources WHERE type=? AND mesh=? AND name=?",
                (key.type, key.mesh, key.name),
            )

    def _write_delta(self, delta: TableDelta, free_gil: bool = False) -> None:
        zones_text: dict[tuple[str, ...], str] = {(): "[]"}
        self._write_rows(
            "DELETE FROM vips WHERE mesh=? AND service=?",
            "DELETE FROM vips WHERE (mesh, service) IN "
            "(SELECT value->>0, value->>1 FROM json_each(?))",
            [(a.key.mesh, a.key.service) for a in delta.removed],
            free_gil,
        )
        db = self._db
        db.executemany(
            "DELETE FROM holds WHERE vip_offset=?", [(h.offset,) for h in delta.holds_dropped]
        )
        db.executemany(
            "INSERT OR REPLACE INTO holds (vip_offset, mesh, service, until) VALUES (?, ?, ?, ?)",
            [(h.offset, h.key.mesh, h.key.service, h.until) for h in delta.holds_added],
        )
        self._write_rows(
            "INSERT INTO vips (mesh, service, vip_offset, zones, claim) VALUES (?, ?, ?, ?, ?)",
            "INSERT INTO vips (mesh, service, vip_offset, zones, claim) SELECT "
            "value->>0, value->>1, value->>2, value->>3, value->>4 FROM json_each(?)",
            # (Made as they go: a fresh zone's table is a million rows, and a
            # tuple each at once was the peak of its memory.)
            (
                (
                    key[0],
                    key[1],
                    offset,
                    zones_text.get(zones) or zones_text.setdefault(zones, json.dumps(list(zones))),
                    claim,
                )
                for key, offset, zones, claim in delta.added
            ),
            free_gil,
        )

    def _write_rows(
        self, each: str, as_json: str, rows: Iterable[tuple[Any, ...]], free_gil: bool
    ) -> None:
        """C{rows} by C{each} (executemany: one statement prepared for all, a first load
        writes 100,000), or, with C{free_gil}, by C{as_json} 5,000 at a time (one
        statement each over a JSON array: the GIL stays free while it runs).  The
        rows are taken as they go, 5,000 at most held at a time."""
        if not free_gil:
            self._db.executemany(each, rows)
            return
        rows = iter(rows)
        while chunk := list(itertools.islice(rows, _JSON_CHUNK)):
            # Not ASCII-escaped: a lone surrogate fails to bind, as in executemany.
            text = json.dumps(chunk, ensure_ascii=False)
            if "\\u0000" in text:  # (SQLite's JSON ends a text at a NUL)
                self._db.executemany(each, chunk)
            else:
                self._db.execute(as_json, (text,))

    def _write_zones(self, changes: StoreChanges) -> None:
        db = self._db
        for name in changes.zones_deleted:
            db.execute("DELETE FROM zones WHERE name=?", (name,))
            db.execute("DELETE FROM zone_services WHERE zone=?", (name,))
        for record in changes.zones_put:
            # One row: the zone's services are rows of their own (below).
            db.execute(
                "INSERT INTO zones (name, last_contact, acked) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET "
                "last_contact=excluded.last_contact, acked=excluded.acked",
                (record.name, record.last_contact, record.acked),
            )
        if changes.zone_services_removed:
            db.executemany(
                "DELETE FROM zone_services WHERE zone=? AND mesh=? AND service=?",
                [(zone, k.mesh, k.service) for zone, k in changes.zone_services_removed],
            )
        if changes.zone_services_added:
            db.executemany(
                "INSERT OR IGNORE INTO zone_services (zone, mesh, service) VALUES (?, ?, ?)",
                [(zone, k.mesh, k.service) for zone, k in changes.zone_services_added],
            )

    def _write_meta(self, changes: StoreChanges) -> None:
        # The meta key of the table id is 'table_origin' on disk (since schema v1).
        version = changes.table_version
        for key, value in (
            ("table_origin", changes.table_id),
            ("table_version", None if version is None else str(version)),
            ("vip_range", changes.vip_range),
        ):
            if value is not None:
                self._db.execute("UPDATE meta SET value=? WHERE key=?", (value, key))

    def close(self) -> None:
        """Close the database (once the writes begun on other threads have ended)."""
        self._wait_for_background()
        with self._lock:
            self._db.close()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, value: object, tb: object) -> None:
        if kind is None:
            try:
                self._db.execute("COMMIT")
                return
            except sqlite3.Error:
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        # Never leave a transaction open: every later write would fail.
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
