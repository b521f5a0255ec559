"""The store: resources given through the API and the VIP table, in SQLite.

Every change is one transaction, so a process killed at any moment restarts with a
consistent table; C{UNIQUE(vip_offset)} makes a VIP on two services impossible.  No
Twisted here: the zone calls it from the reactor thread (one transaction per change;
a change of many rows, such as a first load, writes them all in it).
"""

from __future__ import annotations

import json
import os
import sqlite3
from importlib import resources as package_files

from kumazone.core.federation import ZoneRecord
from kumazone.core.resources import ResourceKey, parse_resource
from kumazone.core.storage import StoreChanges, StoredState, StoreError
from kumazone.core.vips import Allocation, Hold, ServiceKey, TableDelta

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

SCHEMA_VERSION = 2


def _schema(version: int) -> str:
    return _schema_file(f"v{version}.sql")


def _schema_file(name: str) -> str:
    return (package_files.files("kumazone.store") / "schema" / name).read_text()


#: The script that takes a store from each older schema version to the next one.
_MIGRATIONS = {1: "migrate-v1-v2.sql"}


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
        """Read everything back; raises L{StoreError} if the store cannot be read."""
        try:
            return self._load()
        except (sqlite3.Error, ValueError, KeyError) as e:
            raise StoreError(f"cannot read store {self.path}: {e}") from None

    def _load(self) -> StoredState:
        state = StoredState()
        for type_, mesh, name, document in self._db.execute(
            "SELECT type, mesh, name, document FROM resources ORDER BY type, mesh, name"
        ):
            key = ResourceKey(type_, mesh, name)
            try:
                resource = parse_resource(json.loads(document))
            except ValueError as e:
                state.bad_resources.append((key, str(e)))
                continue
            state.resources.append(resource)
        state.allocations = [
            Allocation(ServiceKey(mesh, service), offset, tuple(json.loads(zones)), claim)
            for mesh, service, offset, zones, claim in self._db.execute(
                "SELECT mesh, service, vip_offset, zones, claim FROM vips ORDER BY vip_offset"
            )
        ]
        state.zones = [
            ZoneRecord(
                name,
                {ServiceKey(mesh, service) for mesh, service in json.loads(services)},
                last_contact=last_contact,
                acked=acked,
            )
            for name, services, last_contact, acked in self._db.execute(
                "SELECT name, services, last_contact, acked FROM zones ORDER BY name"
            )
        ]
        state.holds = [
            Hold(ServiceKey(mesh, service), offset, until)
            for offset, mesh, service, until in self._db.execute(
                "SELECT vip_offset, mesh, service, until FROM holds ORDER BY vip_offset"
            )
        ]
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        state.table_version = int(meta["table_version"])
        state.vip_range = meta["vip_range"]
        state.table_id = meta["table_origin"]
        return state

    def commit(self, changes: StoreChanges) -> None:
        """Apply C{changes} in one transaction.

        Raises L{StoreError} (and changes nothing) if the write fails.
        """
        try:
            with self._transaction():
                if changes.reset_table:
                    self._db.execute("DELETE FROM vips")
                    self._db.execute("DELETE FROM holds")
                self._write_resources(changes)
                if changes.delta is not None:
                    self._write_delta(changes.delta)
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

    def _write_delta(self, delta: TableDelta) -> None:
        db = self._db
        for allocation in delta.removed:
            db.execute(
                "DELETE FROM vips WHERE mesh=? AND service=?",
                (allocation.key.mesh, allocation.key.service),
            )
        for hold in delta.holds_dropped:
            db.execute("DELETE FROM holds WHERE vip_offset=?", (hold.offset,))
        for hold in delta.holds_added:
            db.execute(
                "INSERT OR REPLACE INTO holds (vip_offset, mesh, service, until) "
                "VALUES (?, ?, ?, ?)",
                (hold.offset, hold.key.mesh, hold.key.service, hold.until),
            )
        for allocation in delta.added:
            db.execute(
                "INSERT INTO vips (mesh, service, vip_offset, zones, claim) VALUES (?, ?, ?, ?, ?)",
                (
                    allocation.key.mesh,
                    allocation.key.service,
                    allocation.offset,
                    json.dumps(list(allocation.zones)),
                    allocation.claim,
                ),
            )

    def _write_zones(self, changes: StoreChanges) -> None:
        for record in changes.zones_put:
            services = sorted([k.mesh, k.service] for k in record.services)
            self._db.execute(
                "INSERT OR REPLACE INTO zones (name, services, last_contact, acked) "
                "VALUES (?, ?, ?, ?)",
                (record.name, json.dumps(services), record.last_contact, record.acked),
            )
        for name in changes.zones_deleted:
            self._db.execute("DELETE FROM zones WHERE name=?", (name,))

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
        """Close the database."""
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
