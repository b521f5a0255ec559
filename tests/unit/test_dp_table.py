"""The dataplane's table: parts staged, changes checked, entries as the zone builds them, stored.

No sockets and no reactor: the table is fed messages as the zone would send them,
and its store lives in C{tmp_path}.
"""

from __future__ import annotations

import ipaddress
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from twisted.names import dns

from kumazone.core.config import DnsServerConfig
from kumazone.core.messages import DpRow, DpTable, DpWelcome, dp_table_messages
from kumazone.core.names import name_forms
from kumazone.core.vips import ServiceKey, VipRange
from kumazone.core.zone import VipEntry, Zone, ZoneChange
from kumazone.dataplane.resolver import DataplaneAuthority
from kumazone.dataplane.table import (
    STORE_FILE,
    DataplaneTable,
    StoredTable,
    TableError,
    TableStore,
    TableStoreError,
    open_store,
)
from kumazone.dns.authority import MeshAuthority, NameNotFound
from kumazone.store.sqlite import SQLiteStore
from tests.builders import dataplane_resource

MESH = "default"
TABLE_ID = "table-1"


def welcome(
    version: int = 1,
    table_id: str = TABLE_ID,
    mesh: str = MESH,
    domain: str = "mesh",
    cidr: str = "240.0.0.0/4",
    cidr6: str = "fd00:fd00::/64",
    ttl: int = 60,
    nameservers: tuple[str, ...] = ("127.0.0.1",),
) -> DpWelcome:
    return DpWelcome(mesh, "web-1", version, table_id, domain, cidr, cidr6, ttl, nameservers)


class Recorder:
    """A table's listeners: every change it tells, and every config."""

    def __init__(self, table: DataplaneTable) -> None:
        self.changes: list[ZoneChange] = []
        self.configs: list[DnsServerConfig] = []
        table.listeners.append(self.changes.append)
        table.config_listeners.append(self.configs.append)


class RecordingStore(TableStore):
    """A store that keeps each commit's arguments (rows written, removed, reset)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.commits: list[tuple[dict[str, str], list[DpRow], list[str], bool]] = []

    def commit(
        self,
        meta: dict[str, str],
        upsert: Any = (),
        remove: Any = (),
        reset: bool = False,
    ) -> None:
        upsert, remove = list(upsert), list(remove)
        self.commits.append((dict(meta), upsert, remove, reset))
        super().commit(meta, upsert, remove, reset)


def connected(table: DataplaneTable, message: DpWelcome | None = None) -> bool:
    """A new connection: the hello's claim, then the welcome; whether it must reconnect."""
    table.claim()
    return table.welcome(message or welcome())


def full(version: int, *rows: DpRow) -> DpTable:
    return DpTable(version, 0, True, 0, True, tuple(rows))


def change(
    version: int, base: int, upsert: tuple[DpRow, ...] = (), remove: tuple[str, ...] = ()
) -> DpTable:
    return DpTable(version, base, False, 0, True, upsert, remove)


def names(table: DataplaneTable) -> dict[str, tuple[str, ...]]:
    return {entry.key.service: entry.names for entry in table.entries}


# -- parts and changes ------------------------------------------------------------------


def test_parts_are_staged_until_the_last() -> None:
    table = DataplaneTable(MESH)
    seen = Recorder(table)
    connected(table)
    parts = dp_table_messages(7, 0, True, [DpRow(f"svc-{i}", i) for i in range(10)], size=3)
    assert len(parts) == 4
    for part in parts[:-1]:
        assert table.receive(part) is False
        assert not table.loaded and len(table.entries) == 0 and seen.changes == []
    assert table.receive(parts[-1]) is True
    assert table.loaded and table.version == 7 and table.table_id == TABLE_ID
    assert len(table.entries) == 10
    assert [c.full for c in seen.changes] == [True]
    assert seen.changes[0].snapshot.version == 7
    assert [config.domain for config in seen.configs] == ["mesh"]


@pytest.mark.parametrize(
    "second",
    [
        DpTable(7, 0, True, 2, True),  # a part skipped
        DpTable(8, 0, True, 1, True),  # another version
        DpTable(7, 0, False, 1, True),  # not full any more
        DpTable(7, 0, True, 0, True),  # part 0 again
    ],
)
def test_a_part_that_does_not_follow_is_refused(second: DpTable) -> None:
    table = DataplaneTable(MESH)
    connected(table)
    assert table.receive(DpTable(7, 0, True, 0, False, (DpRow("a", 1),))) is False
    with pytest.raises(TableError, match="does not follow"):
        table.receive(second)
    assert not table.loaded
    # What was staged is gone: a fresh table starts at part 0.
    assert table.receive(full(7, DpRow("b", 2))) is True
    assert list(names(table)) == ["b"]


def test_a_table_before_the_welcome_is_refused() -> None:
    table = DataplaneTable(MESH)
    table.claim()
    with pytest.raises(TableError, match="before the zone's welcome"):
        table.receive(full(1))


def test_a_change_applies_to_the_version_it_was_made_from() -> None:
    table = DataplaneTable(MESH)
    seen = Recorder(table)
    connected(table)
    table.receive(full(5, DpRow("a", 1), DpRow("b", 2), DpRow("c", 3)))
    entries = {e.key.service: e for e in table.entries}
    assert table.receive(change(6, 5, (DpRow("b", 20), DpRow("d", 4)), ("c", "zzz"))) is True
    assert table.version == 6
    last = seen.changes[-1]
    assert not last.full
    assert last.snapshot.version == 6
    assert {e.key.service for e in last.removed} == {"b", "c"}
    assert entries["b"] in last.removed and entries["c"] in last.removed
    assert [(e.key.service, e.vip) for e in last.added] == [("b", "240.0.0.21"), ("d", "240.0.0.5")]
    assert list(names(table)) == ["a", "b", "d"]


def test_a_change_of_another_mesh_moves_only_the_version() -> None:
    table = DataplaneTable(MESH)
    seen = Recorder(table)
    connected(table)
    table.receive(full(5, DpRow("a", 1)))
    assert table.receive(change(9, 5)) is True
    assert table.version == 9
    last = seen.changes[-1]
    assert (last.removed, last.added, last.full, last.snapshot.version) == ((), (), False, 9)


def test_a_change_that_changes_nothing_tells_nobody() -> None:
    table = DataplaneTable(MESH)
    seen = Recorder(table)
    connected(table)
    table.receive(full(5, DpRow("a", 1)))
    assert table.receive(change(5, 5, (DpRow("a", 1),), ("gone",))) is True
    assert len(seen.changes) == 1


@pytest.mark.parametrize(
    "message, problem",
    [
        (change(7, 4), "a change from version 4, but this dataplane holds version 5"),
        (change(7, 6), "holds version 5"),
        (change(4, 5), "from the later 5"),
    ],
)
def test_a_change_from_another_version_is_refused(message: DpTable, problem: str) -> None:
    table = DataplaneTable(MESH)
    connected(table)
    table.receive(full(5, DpRow("a", 1)))
    assert table.claim() == (5, TABLE_ID)
    connected(table)
    with pytest.raises(TableError, match=problem):
        table.receive(message)
    assert table.version == 5 and list(names(table)) == ["a"]
    # The next hello claims nothing, so that the zone sends the whole table ...
    assert table.claim() == (0, "")
    table.welcome(welcome())
    table.receive(full(8, DpRow("a", 1), DpRow("b", 2)))
    # ... and once it is held, the hello claims it again.
    assert table.claim() == (8, TABLE_ID)


def test_a_change_of_another_table_is_refused() -> None:
    table = DataplaneTable(MESH)
    connected(table)
    table.receive(full(5, DpRow("a", 1)))
    connected(table, welcome(table_id="table-2"))
    with pytest.raises(TableError, match="holds version 5"):
        table.receive(change(6, 5))


def test_a_change_before_any_table_is_refused() -> None:
    table = DataplaneTable(MESH)
    connected(table)
    with pytest.raises(TableError, match="holds no table"):
        table.receive(change(1, 0))


def test_a_full_table_replaces_what_is_held_telling_only_what_differs() -> None:
    table = DataplaneTable(MESH)
    seen = Recorder(table)
    connected(table)
    table.receive(full(5, DpRow("a", 1), DpRow("b", 2), DpRow("c", 3)))
    kept = table.entries.get(ServiceKey(MESH, "a"))
    connected(table, welcome(table_id="table-2"))
    table.receive(full(2, DpRow("a", 1), DpRow("b", 9, provisional=True), DpRow("d", 4)))
    assert (table.version, table.table_id) == (2, "table-2")
    last = seen.changes[-1]
    assert not last.full
    assert {e.key.service for e in last.removed} == {"b", "c"}
    assert {e.key.service for e in last.added} == {"b", "d"}
    assert table.entries.get(ServiceKey(MESH, "a")) is kept
    assert table.entries.get(ServiceKey(MESH, "b")).provisional  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "row, problem",
    [
        (DpRow("a", 1 << 28), "outside 240.0.0.0/4"),
        (DpRow("a", -1), "outside"),
        (DpRow("", 1), "without a service"),
        (DpRow("a", 1, 4), "unknown name forms"),
    ],
)
def test_a_bad_row_is_refused(row: DpRow, problem: str) -> None:
    table = DataplaneTable(MESH)
    connected(table)
    with pytest.raises(TableError, match=problem):
        table.receive(full(1, row))
    assert not table.loaded


def test_a_welcome_of_another_mesh_is_refused() -> None:
    table = DataplaneTable(MESH)
    table.claim()
    with pytest.raises(TableError, match="'other', not 'default'"):
        table.welcome(welcome(mesh="other"))


def test_a_welcome_whose_settings_do_not_parse_is_refused() -> None:
    table = DataplaneTable(MESH)
    table.claim()
    with pytest.raises(TableError, match="do not parse"):
        table.welcome(welcome(cidr="240.0.0.0/40"))


def test_a_welcome_under_another_domain_asks_for_the_whole_table() -> None:
    table = DataplaneTable(MESH)
    connected(table)
    table.receive(full(5, DpRow("a", 1)))
    assert connected(table, welcome(domain="mesh.internal")) is True
    assert names(table) == {"a": ("a.mesh",)}  # served as it was until the table comes
    assert table.claim() == (0, "")
    assert connected(table, welcome(domain="mesh.internal")) is False
    table.receive(full(6, DpRow("a", 1)))
    assert names(table) == {"a": ("a.mesh.internal",)}
    assert table.config is not None and table.config.domain == "mesh.internal"


def test_a_welcome_with_another_ttl_applies_at_once() -> None:
    table = DataplaneTable(MESH)
    seen = Recorder(table)
    connected(table)
    table.receive(full(5, DpRow("a", 1)))
    assert connected(table, welcome(ttl=30, nameservers=("192.0.2.53",))) is False
    assert table.config is not None
    assert (table.config.ttl, table.config.nameserver_addresses) == (30, ("192.0.2.53",))
    assert seen.configs[-1] is table.config
    assert seen.changes[-1].full
    # The rows held are still good: a change applies to them.
    assert table.receive(change(6, 5, (DpRow("b", 2),))) is True


# -- entries exactly as the zone builds them -------------------------------------------------

#: Services whose names take every rule: both forms, a form another service holds,
#: case, a label too long for a name, the nameserver's reserved label.
SERVICES = {
    "default": [
        "redis",
        "Redis",
        "echo-server_echo-example_svc_1010",
        "a.b",
        "a_b",
        "x" * 64,
        "kumazone-ns",
        "web",
    ],
    "other": ["redis", "db_primary"],
}


@pytest.fixture
def zone() -> Zone:
    zone = Zone("zone-1", DnsServerConfig(), SQLiteStore(":memory:"))
    for mesh, services in SERVICES.items():
        for index, service in enumerate(services):
            address = f"192.0.2.{10 + index}" if mesh == "default" else f"198.51.100.{10 + index}"
            zone.put(dataplane_resource(f"dp-{index}", service, mesh=mesh, address=address), 0.0)
    return zone


def rows_of(zone: Zone, mesh: str) -> list[DpRow]:
    """The rows a zone sends a dataplane of C{mesh}, as the zone side makes them."""
    config = zone.config
    vip_range = VipRange(config.cidr, config.cidr6)
    rows = []
    for entry in zone.snapshot.entries:
        if entry.key.mesh != mesh:
            continue
        offset = vip_range.offset_of(ipaddress.IPv4Address(entry.vip))
        assert offset is not None
        forms = name_forms(entry.key.service, config.domain, entry.names)
        rows.append(DpRow(entry.key.service, offset, forms, entry.provisional))
    return rows


def served(entry: VipEntry) -> tuple[Any, ...]:
    """What the DNS answers of an entry depend on."""
    return (entry.key, entry.vip, entry.vip6, entry.names, entry.provisional)


def zone_welcome(zone: Zone, mesh: str) -> DpWelcome:
    config = zone.config
    return DpWelcome(
        mesh,
        "web-1",
        zone.snapshot.version,
        TABLE_ID,
        config.domain,
        str(config.cidr),
        str(config.cidr6),
        config.ttl,
        ("127.0.0.1",),
    )


@pytest.mark.parametrize("mesh", sorted(SERVICES))
def test_entries_are_the_zones(zone: Zone, mesh: str) -> None:
    table = DataplaneTable(mesh)
    table.claim()
    table.welcome(zone_welcome(zone, mesh))
    for part in dp_table_messages(zone.snapshot.version, 0, True, rows_of(zone, mesh), size=2):
        table.receive(part)
    expected = [served(e) for e in zone.snapshot.entries if e.key.mesh == mesh]
    assert [served(e) for e in table.entries] == expected
    assert table.snapshot.version == zone.snapshot.version
    # Some of them do have no name, or only one form.
    if mesh == "default":
        by_service = names(table)
        assert by_service["x" * 64] == ()
        assert by_service["echo-server_echo-example_svc_1010"] == (
            "echo-server_echo-example_svc_1010.mesh",
            "echo-server.echo-example.svc.1010.mesh",
        )
        assert sum(1 for n in by_service.values() if "redis.mesh" in n) == 1


def questions(zone: Zone, mesh: str) -> list[tuple[bytes, int]]:
    """Every name of the mesh's entries (and their reverse names), some that are not, the apex."""
    asked: list[tuple[bytes, int]] = [(b"mesh", dns.SOA), (b"mesh", dns.NS), (b"mesh", dns.A)]
    asked += [(b"nothing.mesh", dns.A), (b"svc.mesh", dns.A), (b"ns.kumazone-ns.mesh", dns.A)]
    for entry in zone.snapshot.entries:
        for name in entry.names:
            for qtype in (dns.A, dns.AAAA, dns.TXT):
                asked.append((name.upper().encode(), qtype))
        for address in (entry.vip, entry.vip6):
            reverse = ipaddress.ip_address(address).reverse_pointer.encode()
            asked += [(reverse, dns.PTR), (reverse, dns.A)]
    return asked


def answer(authority: MeshAuthority, name: bytes, qtype: int, mesh: str) -> Any:
    try:
        return authority.resolve(name, qtype, dns.IN, mesh)
    except NameNotFound as e:
        return ("NXDOMAIN", e.authority)
    except Exception as e:
        return (type(e).__name__,)


@pytest.mark.parametrize("mesh", sorted(SERVICES))
def test_answers_are_the_zones(zone: Zone, mesh: str) -> None:
    """The same authority code over the table answers every question as over the zone's."""
    table = DataplaneTable(mesh)
    table.claim()
    table.welcome(zone_welcome(zone, mesh))
    table.receive(full(zone.snapshot.version, *rows_of(zone, mesh)))
    assert table.config is not None
    theirs = MeshAuthority(zone.config, ("127.0.0.1",))
    theirs.update(zone.snapshot)
    ours = DataplaneAuthority(table.config, table.config.nameserver_addresses)
    ours.update(table.snapshot)
    for name, qtype in questions(zone, mesh):
        assert answer(ours, name, qtype, mesh) == answer(theirs, name, qtype, mesh), (name, qtype)


def test_changes_follow_the_zones(zone: Zone) -> None:
    """The zone changes; the rows it then sends give the table the zone's entries again."""
    table = DataplaneTable(MESH)
    table.claim()
    table.welcome(zone_welcome(zone, MESH))
    table.receive(full(zone.snapshot.version, *rows_of(zone, MESH)))
    for step, resource in enumerate(
        [
            dataplane_resource("dp-0", "web", mesh=MESH, address="192.0.2.10"),  # redis goes
            dataplane_resource("dp-new", "redis", "new_one", mesh=MESH, address="192.0.2.99"),
        ]
    ):
        before = {row.service: row for row in rows_of(zone, MESH)}
        base = zone.snapshot.version
        zone.put(resource, float(step + 1))
        after = {row.service: row for row in rows_of(zone, MESH)}
        upsert = tuple(row for service, row in after.items() if before.get(service) != row)
        remove = tuple(service for service in before if service not in after)
        table.receive(change(zone.snapshot.version, base, upsert, remove))
        expected = [served(e) for e in zone.snapshot.entries if e.key.mesh == MESH]
        assert [served(e) for e in table.entries] == expected
    # Entries made by different tables keep one range between them, not one each.
    assert len({id(entry._range) for entry in table.entries}) == 1


# -- the store ------------------------------------------------------------------------------


def stored_table(path: Path) -> tuple[DataplaneTable, list[str]]:
    warnings: list[str] = []
    store, stored = open_store(str(path), warnings.append)
    return DataplaneTable(MESH, store, stored, warnings.append), warnings


def test_a_table_is_stored_and_loaded_back(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILE
    table, warnings = stored_table(path)
    assert not table.loaded and table.config is None and warnings == []
    connected(table, welcome(ttl=30, nameservers=("192.0.2.53", "2001:db8::53")))
    table.receive(full(5, DpRow("a", 1), DpRow("b_c", 2, 3), DpRow("d", 3, 1, True)))
    table.receive(change(6, 5, (DpRow("e", 4),), ("a",)))
    assert table.store is not None
    table.store.close()

    again, warnings = stored_table(path)
    assert warnings == []
    assert again.loaded
    assert (again.version, again.table_id, again.config) == (6, TABLE_ID, table.config)
    assert [served(e) for e in again.entries] == [served(e) for e in table.entries]
    assert again.claim() == (6, TABLE_ID)
    # It goes on from there.
    again.welcome(welcome(ttl=30, nameservers=("192.0.2.53", "2001:db8::53")))
    assert again.receive(change(7, 6, (), ("e",))) is True
    assert list(names(again)) == ["b_c", "d"]


def test_each_table_writes_only_what_changed(tmp_path: Path) -> None:
    store = RecordingStore(str(tmp_path / STORE_FILE))
    table = DataplaneTable(MESH, store)
    connected(table)
    table.receive(full(5, DpRow("a", 1), DpRow("b", 2), DpRow("c", 3)))
    table.receive(change(6, 5, (DpRow("b", 20),), ("c",)))
    table.receive(change(7, 6))
    connected(table)
    table.receive(full(8, DpRow("a", 1), DpRow("b", 20), DpRow("d", 4)))
    writes = [
        (sorted(r.service for r in rows), removed, reset)
        for _m, rows, removed, reset in store.commits
    ]
    assert writes == [
        (["a", "b", "c"], [], True),
        (["b"], ["c"], False),
        ([], [], False),
        (["d"], [], False),
    ]
    assert [meta["version"] for meta, *_rest in store.commits] == ["5", "6", "7", "8"]


def test_a_failed_write_is_a_warning_and_the_next_one_writes_everything(tmp_path: Path) -> None:
    store = RecordingStore(str(tmp_path / STORE_FILE))
    warnings: list[str] = []
    table = DataplaneTable(MESH, store, warn=warnings.append)
    connected(table)
    table.receive(full(5, DpRow("a", 1)))
    store._db.close()  # every write now fails
    assert table.receive(change(6, 5, (DpRow("b", 2),))) is True
    assert table.version == 6 and list(names(table)) == ["a", "b"]
    assert len(warnings) == 1 and "served but not stored" in warnings[0]
    store._db = sqlite3.connect(store.path, isolation_level=None)
    table.receive(change(7, 6, (DpRow("c", 3),)))
    assert store.commits[-1][3] is True  # reset: every row
    assert sorted(r.service for r in store.commits[-1][1]) == ["a", "b", "c"]
    store.close()
    again, _warnings = stored_table(tmp_path / STORE_FILE)
    assert (again.version, list(names(again))) == (7, ["a", "b", "c"])


def test_a_corrupt_store_is_set_aside_and_the_dataplane_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILE
    path.write_bytes(b"this is no database, " * 100)
    table, warnings = stored_table(path)
    assert not table.loaded and len(table.entries) == 0
    assert len(warnings) == 1
    assert "cannot be read" in warnings[0] and "set aside" in warnings[0], warnings
    assert (tmp_path / (STORE_FILE + ".unreadable")).exists()
    # The new store works.
    connected(table)
    table.receive(full(3, DpRow("a", 1)))
    assert table.store is not None
    table.store.close()
    again, warnings = stored_table(path)
    assert warnings == [] and again.version == 3


@pytest.mark.parametrize(
    "damage",
    [
        "UPDATE meta SET value='not json' WHERE key='welcome'",
        "UPDATE meta SET value='x' WHERE key='version'",
        "UPDATE rows SET forms=9",
        "DELETE FROM meta WHERE key='welcome'",
        "UPDATE rows SET vip_offset='x'",
        "DROP TABLE rows",
        "UPDATE meta SET value='2' WHERE key='schema_version'",
    ],
)
def test_a_store_that_makes_no_sense_is_set_aside(tmp_path: Path, damage: str) -> None:
    path = tmp_path / STORE_FILE
    table, _warnings = stored_table(path)
    connected(table)
    table.receive(full(3, DpRow("a", 1)))
    assert table.store is not None
    table.store.close()
    with sqlite3.connect(path) as db:
        db.execute(damage)
    again, warnings = stored_table(path)
    assert not again.loaded and len(again.entries) == 0
    assert len(warnings) == 1 and "set aside" in warnings[0], warnings


def test_a_row_outside_the_stored_range_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILE
    table, _warnings = stored_table(path)
    connected(table)
    table.receive(full(3, DpRow("a", 1)))
    assert table.store is not None
    table.store.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE rows SET vip_offset=?", (1 << 40,))
    again, warnings = stored_table(path)
    assert not again.loaded
    assert len(warnings) == 1 and "does not make sense" in warnings[0], warnings


def test_a_store_of_another_mesh_is_not_served(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILE
    table, _warnings = stored_table(path)
    connected(table)
    table.receive(full(3, DpRow("a", 1)))
    assert table.store is not None
    table.store.close()
    warnings: list[str] = []
    store, stored = open_store(str(path), warnings.append)
    other = DataplaneTable("other", store, stored, warnings.append)
    assert not other.loaded and "mesh 'default'" in warnings[0]
    other.claim()
    other.welcome(welcome(mesh="other"))
    other.receive(full(4, DpRow("z", 9)))
    assert store is not None
    store.close()
    _store, stored = open_store(str(path), warnings.append)
    assert (stored.mesh, [row.service for row in stored.rows]) == ("other", ["z"])


def test_a_store_that_cannot_be_made_keeps_the_table_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "missing-dir" / STORE_FILE
    warnings: list[str] = []
    store, stored = open_store(str(path), warnings.append)
    assert store is None and stored == StoredTable()
    assert len(warnings) == 1 and "in memory only" in warnings[0]
    table = DataplaneTable(MESH, store, stored, warnings.append)
    connected(table)
    assert table.receive(full(1, DpRow("a", 1))) is True


def test_a_store_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILE
    path.write_bytes(b"garbage" * 1000)
    with pytest.raises(TableStoreError, match=str(path)):
        TableStore(str(path)).load()
