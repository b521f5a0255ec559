"""The dataplane's table: its mesh's names and VIPs as the zone sends them, kept on disk.

L{DataplaneTable} is pure but for its store: it takes the zone's L{DpWelcome}
(how the zone serves names: domain, CIDRs, TTL, nameservers) and L{DpTable}
messages (parts staged until the last, then applied at once: a full table
replaces what is held, a change applies to the version it was made from, and a
change from any other version is refused, so that the dataplane asks for the
whole table again).  It keeps one L{VipEntry} per service, exactly as the zone
builds them, in a live L{SortedIndex}, and tells its listeners each change as
a L{ZoneChange}, as the zone does, so that L{MeshAuthority.apply} and
L{HotCache.apply} follow it at a cost of what changed.

L{TableStore} keeps the table in SQLite under the data dir: the welcome's
settings, the table's id and version, and one row per service.  Each applied
table is one transaction writing the rows it changed.  L{open_store} opens it
at start-up; a store that cannot be read is set aside with a warning and the
dataplane starts empty (it never stops for it).
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network

from kumazone.core.config import ConfigError, DnsServerConfig, load_config
from kumazone.core.messages import FORM_DOTTED, FORM_UNDERSCORE, DpRow, DpTable, DpWelcome
from kumazone.core.names import name_problem, names_from_forms
from kumazone.core.sortedindex import SortedIndex
from kumazone.core.vips import ServiceKey, VipRange
from kumazone.core.zone import VipEntry, ZoneChange, ZoneSnapshot, publish

__all__ = [
    "STORE_FILE",
    "DataplaneTable",
    "StoredTable",
    "TableError",
    "TableStore",
    "TableStoreError",
    "open_store",
    "welcome_config",
]

#: The store's file name under the data dir.
STORE_FILE = "dataplane.sqlite3"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE rows (
    service TEXT PRIMARY KEY,
    vip_offset INTEGER NOT NULL,
    forms INTEGER NOT NULL,
    provisional INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO meta (key, value) VALUES ('schema_version', '1');
"""

_ALL_FORMS = FORM_UNDERSCORE | FORM_DOTTED


@functools.lru_cache(maxsize=4)
def _range_of(cidr: IPv4Network, cidr6: IPv6Network) -> VipRange:
    """The one range of these CIDRs: every entry made under them shares it (each
    entry keeps its range, so a range made per change would be kept per change)."""
    return VipRange(cidr, cidr6)


class TableError(ValueError):
    """A message of the zone that this table cannot apply (it needs the whole table)."""


class TableStoreError(Exception):
    """The store cannot be opened, read or written."""


def welcome_config(
    domain: str, cidr: str, cidr6: str, ttl: int, nameservers: Sequence[str]
) -> DnsServerConfig:
    """The L{DnsServerConfig} a zone's welcome describes; L{TableError} if it is not one."""
    flags: dict[str, object] = {"domain": domain, "cidr": cidr, "cidr6": cidr6, "ttl": ttl}
    if nameservers:
        flags["nameserver_addresses"] = ",".join(nameservers)
    try:
        return load_config(None, {}, flags)
    except ConfigError as e:
        raise TableError(f"the zone's settings do not parse: {e}") from None


def _rows_meaning(config: DnsServerConfig) -> tuple[object, ...]:
    """What a row's names and VIPs depend on: rows held under others must come anew."""
    return (config.domain, config.cidr, config.cidr6)


@dataclass
class StoredTable:
    """What the store holds, as loaded at start-up."""

    mesh: str = ""
    table_id: str = ""
    version: int = 0
    config: DnsServerConfig | None = None
    rows: list[DpRow] = field(default_factory=list)


class TableStore:
    """The table in SQLite (WAL): meta values and one row per service; C{path} may be C{:memory:}.

    C{synchronous=NORMAL}: a power loss may lose the last tables applied (never
    the store's consistency); the dataplane then claims an older version and
    the zone sends what it lacks.  The zone, not this file, is the authority.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise TableStoreError(f"cannot open {path}: {e}") from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            exists = self._db.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
            ).fetchone()
            if not exists:
                self._db.executescript(f"BEGIN IMMEDIATE;\n{_SCHEMA}\nCOMMIT;")
            (version,) = self._db.execute(
                "SELECT value FROM meta WHERE key='schema_version'"
            ).fetchone()
            if version != str(SCHEMA_VERSION):
                raise TableStoreError(f"{path} has schema version {version}, not {SCHEMA_VERSION}")
        except (sqlite3.Error, TypeError) as e:
            self._db.close()
            raise TableStoreError(f"cannot open {path}: {e}") from None
        except TableStoreError:
            self._db.close()
            raise

    def load(self) -> StoredTable:
        """Everything held; L{TableStoreError} if anything in it does not make sense."""
        try:
            meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
            stored = StoredTable(
                mesh=meta.get("mesh", ""),
                table_id=meta.get("table_id", ""),
                version=int(meta.get("version", "0")),
            )
            welcome = meta.get("welcome")
            if welcome is not None:
                document = json.loads(welcome)
                stored.config = welcome_config(
                    document["domain"],
                    document["cidr"],
                    document["cidr6"],
                    int(document["ttl"]),
                    [str(address) for address in document["ns"]],
                )
            for service, offset, forms, provisional in self._db.execute(
                "SELECT service, vip_offset, forms, provisional FROM rows ORDER BY service"
            ):
                if not isinstance(service, str) or not isinstance(offset, int):
                    raise ValueError(f"row {service!r} is not a service and an offset")
                if not isinstance(forms, int) or forms & ~_ALL_FORMS:
                    raise ValueError(f"row {service!r} has forms {forms!r}")
                stored.rows.append(DpRow(service, offset, forms, bool(provisional)))
        except (sqlite3.Error, ValueError, KeyError, TypeError, TableError) as e:
            raise TableStoreError(f"cannot read {self.path}: {e}") from None
        if stored.rows and stored.config is None:
            raise TableStoreError(f"cannot read {self.path}: rows without the zone's settings")
        return stored

    def commit(
        self,
        meta: dict[str, str],
        upsert: Iterable[DpRow] = (),
        remove: Iterable[str] = (),
        reset: bool = False,
    ) -> None:
        """One transaction: C{meta} values set, rows removed then upserted (all first, C{reset})."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                if reset:
                    db.execute("DELETE FROM rows")
                else:
                    db.executemany(
                        "DELETE FROM rows WHERE service=?", [(service,) for service in remove]
                    )
                db.executemany(
                    "INSERT OR REPLACE INTO rows (service, vip_offset, forms, provisional) "
                    "VALUES (?, ?, ?, ?)",
                    [(r.service, r.offset, r.forms, int(r.provisional)) for r in upsert],
                )
                db.executemany(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", sorted(meta.items())
                )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OverflowError) as e:
            raise TableStoreError(f"cannot write {self.path}: {e}") from None

    def close(self) -> None:
        """Close the database."""
        self._db.close()


def _set_aside(path: str) -> str:
    """Move a store that cannot be read (and its WAL files) out of the way; where it went."""
    aside = path + ".unreadable"
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.replace(path + suffix, aside + suffix)
    return aside


def open_store(path: str, warn: Callable[[str], None]) -> tuple[TableStore | None, StoredTable]:
    """The store at C{path} and what it holds; never raises.

    A store that cannot be read is set aside (C{<path>.unreadable}) and a new
    one started, with a warning; if even that fails, the table lives in memory
    only (and a warning says so).
    """
    try:
        store = TableStore(path)
        try:
            return store, store.load()
        except TableStoreError:
            store.close()
            raise
    except TableStoreError as e:
        problem = str(e)
    if path == ":memory:":  # pragma: no cover - a memory store always opens
        return None, StoredTable()
    try:
        aside = _set_aside(path)
        store = TableStore(path)
    except (OSError, TableStoreError) as e:
        warn(
            f"the stored table cannot be read ({problem}) nor a new one started ({e}): "
            "starting empty, keeping the table in memory only"
        )
        return None, StoredTable()
    warn(f"the stored table cannot be read ({problem}): set aside as {aside}, starting empty")
    return store, StoredTable()


@dataclass(frozen=True)
class _Session:
    """What this connection's welcome said."""

    table_id: str
    config: DnsServerConfig


class DataplaneTable:
    """One mesh's names and VIPs from the zone, with listeners told each change.

    C{entries} is live (a L{SortedIndex} by service key changed in place): read
    it on the reactor, at once.  Before any table is held (L{loaded} false),
    C{config} is the one stored last, or None.
    """

    def __init__(
        self,
        mesh: str,
        store: TableStore | None = None,
        stored: StoredTable | None = None,
        warn: Callable[[str], None] = lambda message: None,
    ) -> None:
        self.mesh = mesh
        self.store = store
        self._warn = warn
        #: Told every change of the table, after it is applied.
        self.listeners: list[Callable[[ZoneChange], None]] = []
        #: Told when the settings change (before the change that comes with them).
        self.config_listeners: list[Callable[[DnsServerConfig], None]] = []
        self.config: DnsServerConfig | None = None
        self.table_id = ""
        self.version = 0
        #: Whether a table is held (from the store or the zone).
        self.loaded = False
        self._rows: dict[str, DpRow] = {}
        self.entries: SortedIndex[ServiceKey, VipEntry] = SortedIndex()
        self._session: _Session | None = None
        self._parts: list[DpTable] = []
        #: Claim no table in the next hello: the zone must send the whole one.
        self._force_full = False
        self._claimed = False
        #: After a failed write: the next one writes everything.
        self._store_behind = False
        if stored is not None:
            self._load(stored)
        self.snapshot = self._make_snapshot()

    def _load(self, stored: StoredTable) -> None:
        if stored.mesh and stored.mesh != self.mesh:
            self._warn(
                f"the stored table is mesh {stored.mesh!r}'s, this dataplane is in "
                f"{self.mesh!r}: starting empty"
            )
            self._store_behind = True
            return
        self.config = stored.config
        if stored.config is None:
            return
        vip_range = _range_of(stored.config.cidr, stored.config.cidr6)
        try:
            rows = {row.service: self._checked(row, vip_range) for row in stored.rows}
        except TableError as e:
            self._warn(f"the stored table does not make sense ({e}): starting empty")
            self._store_behind = True
            return
        self._rows = rows
        self.table_id = stored.table_id
        self.version = stored.version
        self.loaded = stored.table_id != "" or stored.version != 0 or bool(rows)
        self.entries = SortedIndex(
            (ServiceKey(self.mesh, row.service), self._entry(row, stored.config, vip_range))
            for row in rows.values()
        )

    # -- the connection ---------------------------------------------------------

    def claim(self) -> tuple[int, str]:
        """What the hello says this dataplane holds: (version, table id), or (0, "")."""
        self._session, self._parts = None, []
        self._claimed = self.loaded and not self._force_full
        return (self.version, self.table_id) if self._claimed else (0, "")

    def welcome(self, welcome: DpWelcome) -> bool:
        """Take the zone's welcome; True if the table must be asked for whole (reconnect).

        That is when the table claimed in the hello was built under other
        settings (domain or CIDRs).  A change of TTL or nameservers only is
        applied at once.  Raises L{TableError} for a welcome that cannot be
        taken (another mesh, settings that do not parse).
        """
        if welcome.mesh != self.mesh:
            raise TableError(f"the zone welcomes mesh {welcome.mesh!r}, not {self.mesh!r}")
        config = welcome_config(
            welcome.domain, welcome.cidr, welcome.cidr6, welcome.ttl, welcome.nameservers
        )
        self._session, self._parts = _Session(welcome.table_id, config), []
        held = self.config
        if held is None or not self.loaded or held == config:
            return False
        if _rows_meaning(held) != _rows_meaning(config):
            if self._claimed:
                self._force_full = True
                return True
            return False  # the whole table comes, and the settings with it
        # The same rows, served with another TTL or other nameservers.
        self._set_config(config)
        self._write()
        self._publish(ZoneChange(self._make_snapshot(), full=True))
        return False

    def receive(self, part: DpTable) -> bool:
        """Stage one part of a table; at the last one apply them all. True once applied.

        Raises L{TableError} (staged parts dropped) for a part that does not
        follow, or a table that cannot be applied to what is held: the zone
        must then be asked for the whole table.
        """
        try:
            return self._receive(part)
        except TableError:
            self._parts = []
            self._force_full = True
            raise

    def _receive(self, part: DpTable) -> bool:
        session = self._session
        if session is None:
            raise TableError("a table before the zone's welcome")
        first = self._parts[0] if self._parts else part
        if part.part != len(self._parts) or (part.version, part.base, part.full) != (
            first.version,
            first.base,
            first.full,
        ):
            raise TableError(
                f"part {part.part} of version {part.version} does not follow the "
                f"{len(self._parts)} part(s) of version {first.version} received"
            )
        self._parts.append(part)
        if not part.last:
            return False
        parts, self._parts = self._parts, []
        if part.full:
            self._apply_full(session, part.version, parts)
        else:
            self._apply_change(session, part.version, part.base, parts)
        return True

    # -- applying ---------------------------------------------------------------

    def _apply_full(self, session: _Session, version: int, parts: list[DpTable]) -> None:
        """The whole table: what it holds replaces what is held (the rows that differ)."""
        config = session.config
        vip_range = _range_of(config.cidr, config.cidr6)
        rows: dict[str, DpRow] = {}
        for message in parts:
            for row in message.upsert:
                rows[row.service] = self._checked(row, vip_range)
        rebuild = not self.loaded or self.config is None or config != self.config
        old = self._rows
        self._force_full = False
        self.table_id, self.version, self.loaded = session.table_id, version, True
        if rebuild:
            self._rows = rows
            self._set_config(config)
            self.entries = SortedIndex(
                (ServiceKey(self.mesh, row.service), self._entry(row, config, vip_range))
                for row in rows.values()
            )
            self._write(reset=True)
            self._publish(ZoneChange(self._make_snapshot(), full=True))
            return
        upsert = [row for service, row in rows.items() if old.get(service) != row]
        remove = [service for service in old if service not in rows]
        self._change(config, vip_range, upsert, remove)

    def _apply_change(
        self, session: _Session, version: int, base: int, parts: list[DpTable]
    ) -> None:
        """The changes from version C{base}: refused unless that is the table held."""
        if not self.loaded or session.table_id != self.table_id or base != self.version:
            held = f"version {self.version}" if self.loaded else "no table"
            raise TableError(f"a change from version {base}, but this dataplane holds {held}")
        config = self.config
        if config is None or config != session.config:
            raise TableError("a change of a table held under other settings")
        if version < base:
            raise TableError(f"a change to version {version} from the later {base}")
        vip_range = _range_of(config.cidr, config.cidr6)
        rows: dict[str, DpRow | None] = {}
        for message in parts:
            for service in message.remove:
                rows[service] = None
            for row in message.upsert:
                rows[row.service] = self._checked(row, vip_range)
        old = self._rows
        upsert = [
            row for service, row in rows.items() if row is not None and old.get(service) != row
        ]
        remove = [service for service, row in rows.items() if row is None and service in old]
        if version == self.version and not upsert and not remove:
            return  # nothing at all: no write, no listener
        self.version = version
        self._change(config, vip_range, upsert, remove)

    def _change(
        self,
        config: DnsServerConfig,
        vip_range: VipRange,
        upsert: list[DpRow],
        remove: list[str],
    ) -> None:
        """Rows and entries follow C{upsert} and C{remove}; the listeners are told."""
        entries, rows, mesh = self.entries, self._rows, self.mesh
        removed: list[VipEntry] = []
        added: list[VipEntry] = []
        changes: list[tuple[ServiceKey, VipEntry | None]] = []
        for service in remove:
            del rows[service]
            key = ServiceKey(mesh, service)
            entry = entries.get(key)
            if entry is not None:
                removed.append(entry)
            changes.append((key, None))
        for row in upsert:
            rows[row.service] = row
            key = ServiceKey(mesh, row.service)
            before = entries.get(key)
            if before is not None:
                removed.append(before)
            entry = self._entry(row, config, vip_range)
            added.append(entry)
            changes.append((key, entry))
        entries.update(changes)
        self._write(upsert, remove)
        self._publish(ZoneChange(self._make_snapshot(), tuple(removed), tuple(added)))

    def _checked(self, row: DpRow, vip_range: VipRange) -> DpRow:
        if not row.service:
            raise TableError("a row without a service")
        if not 0 <= row.offset < vip_range.size:
            raise TableError(
                f"service {row.service!r}: offset {row.offset} is outside {vip_range.cidr}"
            )
        if row.forms & ~_ALL_FORMS:
            raise TableError(f"service {row.service!r}: unknown name forms {row.forms}")
        return row

    def _entry(self, row: DpRow, config: DnsServerConfig, vip_range: VipRange) -> VipEntry:
        """The entry of C{row}, as the zone builds it (but for problems and zones)."""
        names = names_from_forms(row.service, config.domain, row.forms)
        if names and any(name_problem(name) is not None for name in names):
            # The zone never names a service so; a name that is no DNS name is not served.
            names = tuple(name for name in names if name_problem(name) is None)
        key = ServiceKey(self.mesh, row.service)
        return VipEntry.at(key, vip_range, row.offset, names, (), row.provisional, ())

    def _set_config(self, config: DnsServerConfig) -> None:
        self.config = config
        for listener in list(self.config_listeners):
            listener(config)

    def _write(
        self, upsert: Iterable[DpRow] = (), remove: Iterable[str] = (), reset: bool = False
    ) -> None:
        """Store what memory now holds: the rows changed (all, after a failed write).

        A failure is a warning: the table is served all the same, and the next
        write writes it whole.
        """
        if self.store is None:
            return
        meta = {"mesh": self.mesh, "table_id": self.table_id, "version": str(self.version)}
        if self.config is not None:
            meta["welcome"] = _config_text(self.config)
        if reset or self._store_behind:
            reset, upsert, remove = True, self._rows.values(), ()
        try:
            self.store.commit(meta, upsert, remove, reset)
        except TableStoreError as e:
            if not self._store_behind:
                self._warn(f"the table is served but not stored: {e}")
            self._store_behind = True
            return
        self._store_behind = False

    def _publish(self, change: ZoneChange) -> None:
        self.snapshot = change.snapshot
        publish(self.listeners, change, self._warn)

    def _make_snapshot(self) -> ZoneSnapshot:
        config = self.config
        size = _range_of(config.cidr, config.cidr6).size if config is not None else 0
        return ZoneSnapshot(
            version=self.version,
            entries=self.entries,
            mesh_of_address={},
            range_size=size,
            range_used=len(self.entries),
            meshes=(self.mesh,),
        )


def _config_text(config: DnsServerConfig) -> str:
    """The welcome's settings as the store keeps them."""
    return json.dumps(
        {
            "domain": config.domain,
            "cidr": str(config.cidr),
            "cidr6": str(config.cidr6),
            "ttl": config.ttl,
            "ns": list(config.nameserver_addresses),
        }
    )
