"""The store: resources given through the API and the VIP table, in SQLite.

Every change is one transaction, so a process killed at any moment restarts with a
consistent table; ``UNIQUE(vip_offset)`` makes a VIP on two services impossible.  No
Twisted here: the zone calls it from the reactor thread (one transaction per change;
a change of many rows, such as a first load, writes them all in it).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources as package_files

from kumazone.federation import ZoneRecord
from kumazone.resources import Resource, ResourceKey, parse_resource
from kumazone.vips import Allocation, Hold, ServiceKey, TableDelta

__all__ = ["SCHEMA_VERSION", "SQLiteStore", "StoreError", "StoredState"]

SCHEMA_VERSION = 1


class StoreError(Exception):
    """The store cannot be opened or used."""


@dataclass
class StoredState:
    """Everything the store holds, as loaded at start-up."""

    resources: list[Resource] = field(default_factory=list)
    allocations: list[Allocation] = field(default_factory=list)
    holds: list[Hold] = field(default_factory=list)
    table_version: int = 0
    vip_range: str = ""
    table_origin: str = ""
    zones: list[ZoneRecord] = field(default_factory=list)
    #: Rows that no longer validate (kept in the database, reported, not served).
    bad_resources: list[tuple[ResourceKey, str]] = field(default_factory=list)


def _schema(version: int) -> str:
    return (package_files.files("kumazone") / "schema" / f"v{version}.sql").read_text()


class SQLiteStore:
    """SQLite-backed store; C{path} may be ``:memory:``."""

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
            if int(version) != SCHEMA_VERSION:
                raise StoreError(
                    f"store {self.path} has schema version {version}, this kumazone "
                    f"reads version {SCHEMA_VERSION}"
                )
            return
        # Created in one transaction: a crash leaves either no schema or all of it.
        self._db.executescript(f"BEGIN IMMEDIATE;\n{_schema(SCHEMA_VERSION)}\nCOMMIT;")

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
            Allocation(ServiceKey(mesh, service), offset, tuple(json.loads(zones)))
            for mesh, service, offset, zones in self._db.execute(
                "SELECT mesh, service, vip_offset, zones FROM vips ORDER BY vip_offset"
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
        state.table_origin = meta["table_origin"]
        return state

    def commit(
        self,
        puts: Iterable[Resource] = (),
        deletes: Iterable[ResourceKey] = (),
        delta: TableDelta | None = None,
        table_version: int | None = None,
        vip_range: str | None = None,
        reset_table: bool = False,
        table_origin: str | None = None,
        zones_put: Iterable[ZoneRecord] = (),
        zones_deleted: Iterable[str] = (),
    ) -> None:
        """Apply resource changes and a table delta in one transaction.

        Raises L{StoreError} (and changes nothing) if the write fails.
        """
        try:
            self._commit(
                puts,
                deletes,
                delta,
                table_version,
                vip_range,
                reset_table,
                table_origin,
                zones_put,
                zones_deleted,
            )
        except sqlite3.Error as e:
            raise StoreError(f"cannot write to store {self.path}: {e}") from None

    def _commit(
        self,
        puts: Iterable[Resource],
        deletes: Iterable[ResourceKey],
        delta: TableDelta | None,
        table_version: int | None,
        vip_range: str | None,
        reset_table: bool,
        table_origin: str | None,
        zones_put: Iterable[ZoneRecord],
        zones_deleted: Iterable[str],
    ) -> None:
        with self._transaction():
            db = self._db
            if reset_table:
                db.execute("DELETE FROM vips")
                db.execute("DELETE FROM holds")
            for resource in puts:
                db.execute(
                    "INSERT OR REPLACE INTO resources (type, mesh, name, document) "
                    "VALUES (?, ?, ?, ?)",
                    (
                        resource.type,
                        resource.mesh,
                        resource.name,
                        resource.raw.decode("utf-8"),
                    ),
                )
            for key in deletes:
                db.execute(
                    "DELETE FROM resources WHERE type=? AND mesh=? AND name=?",
                    (key.type, key.mesh, key.name),
                )
            if delta is not None:
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
                        "INSERT INTO vips (mesh, service, vip_offset, zones) VALUES (?, ?, ?, ?)",
                        (
                            allocation.key.mesh,
                            allocation.key.service,
                            allocation.offset,
                            json.dumps(list(allocation.zones)),
                        ),
                    )
            for record in zones_put:
                services = sorted([k.mesh, k.service] for k in record.services)
                db.execute(
                    "INSERT OR REPLACE INTO zones (name, services, last_contact, acked) "
                    "VALUES (?, ?, ?, ?)",
                    (record.name, json.dumps(services), record.last_contact, record.acked),
                )
            for name in zones_deleted:
                db.execute("DELETE FROM zones WHERE name=?", (name,))
            if table_origin is not None:
                db.execute("UPDATE meta SET value=? WHERE key='table_origin'", (table_origin,))
            if table_version is not None:
                db.execute(
                    "UPDATE meta SET value=? WHERE key='table_version'", (str(table_version),)
                )
            if vip_range is not None:
                db.execute("UPDATE meta SET value=? WHERE key='vip_range'", (vip_range,))

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
