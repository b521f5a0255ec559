"""Tests for kumazone.store.sqlite: what the SQLite store alone has (its file, migrations from
older schema versions, :memory:); the store contract both stores keep is
tests/process/test_store_backends.py."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from kumazone.core.resources import DATAPLANE, ResourceKey, parse_resource
from kumazone.core.storage import StoreChanges, StoredState, StoreError
from kumazone.core.vips import Allocation, Hold, ServiceKey, TableDelta
from kumazone.store.sqlite import SCHEMA_VERSION, SQLiteStore
from tests.builders import dataplane_resource, external_service


def by_offset(row: Allocation | Hold) -> int:
    return row.offset


def key(service: str, mesh: str = "default") -> ServiceKey:
    return ServiceKey(mesh, service)


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "data" / "kumazone.sqlite")


@pytest.fixture
def store(path: str):
    store = SQLiteStore(path)
    yield store
    store.close()


def test_new_store_is_empty(store: SQLiteStore) -> None:
    state = store.load()
    assert state == StoredState()
    assert state.table_version == 0
    assert state.vip_range == ""


def test_store_creates_missing_directories(path: str) -> None:
    assert not Path(path).parent.exists()
    SQLiteStore(path).close()
    assert Path(path).exists()


def test_round_trip_after_reopen(path: str) -> None:
    store = SQLiteStore(path)
    redis = dataplane_resource("redis-1", "redis", address="192.0.2.10")
    web = dataplane_resource("web-1", "web")
    httpbin = parse_resource(external_service("httpbin"))
    delta = TableDelta(
        added=[Allocation(key("redis"), 7), Allocation(key("web"), 3)],
        holds_added=[Hold(key("old"), 11, 1234.5)],
    )
    store.commit(
        StoreChanges(
            puts=[redis, web, httpbin],
            delta=delta,
            table_version=42,
            vip_range="240.0.0.0/4 fd00:fd00::/64",
        )
    )
    store.close()

    state = SQLiteStore(path).load()
    assert sorted(r.key for r in state.resources) == sorted([redis.key, web.key, httpbin.key])
    by_key = {r.key: r for r in state.resources}
    assert by_key[redis.key].document == redis.document
    assert by_key[redis.key].services == ("redis",)
    assert by_key[redis.key].address == "192.0.2.10"
    assert by_key[httpbin.key].document == httpbin.document
    assert sorted(state.allocations, key=by_offset) == [
        Allocation(key("web"), 3),
        Allocation(key("redis"), 7),
    ]
    assert state.holds == [Hold(key("old"), 11, 1234.5)]
    assert state.table_version == 42
    assert state.vip_range == "240.0.0.0/4 fd00:fd00::/64"
    assert state.bad_resources == []


def _populated(store: SQLiteStore) -> StoredState:
    store.commit(
        StoreChanges(
            puts=[dataplane_resource("redis-1", "redis")],
            delta=TableDelta(
                added=[Allocation(key("redis"), 5)], holds_added=[Hold(key("old"), 6, 9.0)]
            ),
            table_version=10,
            vip_range="240.0.0.0/4 fd00:fd00::/64",
        )
    )
    return store.load()


def test_failing_commit_rolls_back_completely(store: SQLiteStore) -> None:
    before = _populated(store)
    with pytest.raises((sqlite3.Error, StoreError)):
        store.commit(
            StoreChanges(
                puts=[dataplane_resource("web-1", "web")],
                deletes=[ResourceKey(DATAPLANE, "default", "redis-1")],
                delta=TableDelta(
                    removed=[Allocation(key("redis"), 5)],
                    holds_dropped=[Hold(key("old"), 6, 9.0)],
                    holds_added=[Hold(key("redis"), 5, 99.0)],
                    added=[Allocation(key("web"), 1), Allocation(key("api"), 1)],
                ),
                table_version=11,
                vip_range="changed",
                reset_table=True,
            )
        )
    after = store.load()
    assert after == before
    assert after.table_version == 10


def test_store_usable_after_a_failed_commit(path: str, store: SQLiteStore) -> None:
    _populated(store)
    with pytest.raises((sqlite3.Error, StoreError)):
        store.commit(
            StoreChanges(delta=TableDelta(added=[Allocation(key("a"), 1), Allocation(key("b"), 1)]))
        )
    store.commit(StoreChanges(delta=TableDelta(added=[Allocation(key("a"), 1)]), table_version=11))
    store.close()
    state = SQLiteStore(path).load()
    assert sorted(state.allocations, key=by_offset) == [
        Allocation(key("a"), 1),
        Allocation(key("redis"), 5),
    ]
    assert state.table_version == 11


def test_failing_commit_leaves_the_file_intact_for_another_reader(
    path: str, store: SQLiteStore
) -> None:
    before = _populated(store)
    with pytest.raises((sqlite3.Error, StoreError)):
        store.commit(
            StoreChanges(
                puts=[dataplane_resource("web-1", "web")],
                delta=TableDelta(added=[Allocation(key("a"), 2), Allocation(key("b"), 2)]),
            )
        )
    other = SQLiteStore(path)
    try:
        assert other.load() == before
    finally:
        other.close()


def test_schema_version_mismatch(path: str) -> None:
    SQLiteStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    with pytest.raises(StoreError) as info:
        SQLiteStore(path)
    assert str(SCHEMA_VERSION + 1) in str(info.value)
    assert path in str(info.value)


def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "garbage.sqlite"
    path.write_bytes(b"this is not an SQLite database, not at all" * 100)
    with pytest.raises(StoreError):
        SQLiteStore(str(path))


def test_memory_store() -> None:
    store = SQLiteStore(":memory:")
    assert store.load() == StoredState()
    store.commit(
        StoreChanges(
            puts=[dataplane_resource("redis-1", "redis")],
            delta=TableDelta(added=[Allocation(key("redis"), 1)]),
            table_version=1,
        )
    )
    state = store.load()
    assert [r.key for r in state.resources] == [ResourceKey(DATAPLANE, "default", "redis-1")]
    assert state.allocations == [Allocation(key("redis"), 1)]
    assert state.table_version == 1
    store.close()


def test_memory_stores_are_independent() -> None:
    one, two = SQLiteStore(":memory:"), SQLiteStore(":memory:")
    one.commit(StoreChanges(table_version=5))
    assert two.load().table_version == 0
    one.close()
    two.close()


def test_stored_resource_that_no_longer_validates_is_reported(path: str) -> None:
    store = SQLiteStore(path)
    store.commit(StoreChanges(puts=[dataplane_resource("redis-1", "redis")]))
    store.close()
    db = sqlite3.connect(path)
    db.execute(
        "INSERT INTO resources (type, mesh, name, document) VALUES (?, ?, ?, ?)",
        ("Dataplane", "default", "bad", '{"type": "Dataplane", "name": "bad"}'),
    )
    db.execute(
        "INSERT INTO resources (type, mesh, name, document) VALUES (?, ?, ?, ?)",
        ("Dataplane", "default", "garbled", "{not json"),
    )
    db.commit()
    db.close()
    state = SQLiteStore(path).load()
    assert [r.name for r in state.resources] == ["redis-1"]
    assert [k for k, _ in state.bad_resources] == [
        ResourceKey("Dataplane", "default", "bad"),
        ResourceKey("Dataplane", "default", "garbled"),
    ]
    assert "networking" in dict(state.bad_resources)[ResourceKey("Dataplane", "default", "bad")]


# -- schema v2: claims, and the migration from v1 ----------------------------------


def test_claims_are_stored_with_the_rows(path: str) -> None:
    store = SQLiteStore(path)
    web = Allocation(ServiceKey("default", "web"), 5, ("zone-1",), claim=41)
    store.commit(StoreChanges(delta=TableDelta(added=[web]), table_version=41))
    store.close()
    assert SQLiteStore(path).load().allocations == [web]


def _v1_store(path: str) -> None:
    from importlib import resources as package_files

    v1 = (package_files.files("kumazone.store") / "schema" / "v1.sql").read_text()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.executescript(v1)
    db.execute(
        "INSERT INTO vips (mesh, service, vip_offset, zones) VALUES ('default', 'a_b', 3, '[]')"
    )
    db.execute(
        "INSERT INTO vips (mesh, service, vip_offset, zones) VALUES ('default', 'a.b', 9, '[]')"
    )
    db.execute("UPDATE meta SET value='7' WHERE key='table_version'")
    db.commit()
    db.close()


def test_a_v1_store_is_migrated_at_open_and_keeps_its_rows(path: str) -> None:
    _v1_store(path)
    state = SQLiteStore(path).load()
    assert state.table_version == 7
    assert {(a.key.service, a.offset, a.claim) for a in state.allocations} == {
        ("a_b", 3, 0),
        ("a.b", 9, 0),
    }
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("3",)
    db.close()
    assert SCHEMA_VERSION == 3
    SQLiteStore(path).load()  # opening again: already v3, nothing to do


def test_a_failed_migration_leaves_the_v1_store_as_it_was(path: str) -> None:
    _v1_store(path)
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE vips ADD COLUMN claim INTEGER")  # the migration's ALTER fails
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="cannot open store"):
        SQLiteStore(path)
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("1",)
    db.close()


# -- schema v3: the zones' services as rows ------------------------------------------


def _schema_script(name: str) -> str:
    from importlib import resources as package_files

    return (package_files.files("kumazone.store") / "schema" / name).read_text()


def _v2_store(path: str) -> None:
    """A v2 store as a v2 global wrote it: two zones, their services as JSON lists."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.executescript(_schema_script("v2.sql"))
    db.execute(
        "INSERT INTO vips (mesh, service, vip_offset, zones, claim) "
        "VALUES ('default', 'redis', 3, '[\"zone-1\",\"zone-2\"]', 4)"
    )
    db.execute(
        "INSERT INTO zones (name, services, last_contact, acked) VALUES "
        '(\'zone-1\', \'[["default","redis"],["m","web"]]\', 12.5, 4)'
    )
    db.execute(
        "INSERT INTO zones (name, services, last_contact, acked) VALUES "
        "('zone-2', '[[\"default\",\"redis\"]]', 13.0, 3)"
    )
    db.execute("INSERT INTO zones (name, services, last_contact, acked) VALUES ('e', '[]', 1, 0)")
    db.execute("UPDATE meta SET value='4' WHERE key='table_version'")
    db.commit()
    db.close()


def _zones(state: StoredState) -> dict[str, tuple[set[ServiceKey], float, int]]:
    return {z.name: (z.services, z.last_contact, z.acked) for z in state.zones}


def test_a_v2_store_is_migrated_at_open_and_keeps_its_zones(path: str) -> None:
    _v2_store(path)
    state = SQLiteStore(path).load()
    assert _zones(state) == {
        "zone-1": ({key("redis"), key("web", "m")}, 12.5, 4),
        "zone-2": ({key("redis")}, 13.0, 3),
        "e": (set(), 1.0, 0),
    }
    assert state.allocations == [Allocation(key("redis"), 3, ("zone-1", "zone-2"), 4)]
    assert state.table_version == 4
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("3",)
    columns = [row[1] for row in db.execute("PRAGMA table_info(zones)")]
    assert columns == ["name", "last_contact", "acked"]
    assert sorted(db.execute("SELECT zone, mesh, service FROM zone_services")) == [
        ("zone-1", "default", "redis"),
        ("zone-1", "m", "web"),
        ("zone-2", "default", "redis"),
    ]
    db.close()
    assert _zones(SQLiteStore(path).load()) == _zones(state)  # again: nothing to do


def test_a_failed_migration_leaves_the_v2_store_as_it_was(path: str) -> None:
    _v2_store(path)
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE zones_v3 (x)")  # the migration's CREATE TABLE fails
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="cannot open store"):
        SQLiteStore(path)
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("2",)
    assert db.execute("SELECT name FROM sqlite_master WHERE name='zone_services'").fetchall() == []
    assert db.execute("SELECT services FROM zones WHERE name='zone-2'").fetchone() == (
        '[["default","redis"]]',
    )
    db.close()


def test_a_v1_store_with_zones_is_migrated_to_v3(path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.executescript(_schema_script("v1.sql"))
    db.execute(
        "INSERT INTO zones (name, services, last_contact, acked) "
        "VALUES ('zone-1', '[[\"default\",\"redis\"]]', 2, 1)"
    )
    db.commit()
    db.close()
    assert _zones(SQLiteStore(path).load()) == {"zone-1": ({key("redis")}, 2.0, 1)}


# -- a write on another thread -------------------------------------------------------


def _rows(count: int, first: int = 0) -> TableDelta:
    return TableDelta(added=[Allocation(key(f"svc-{i}"), i) for i in range(first, first + count)])


def test_a_write_on_another_thread_comes_before_every_call_after_it(store: SQLiteStore) -> None:
    """Begun on one thread, written on another: a commit made meanwhile waits for it,
    so the order of writes is the order they were begun in."""
    import threading

    write = store.begin_background(StoreChanges(delta=_rows(3000), table_version=1))
    done: list[str] = []

    def later() -> None:
        store.commit(StoreChanges(delta=_rows(1, first=5000), table_version=2))
        done.append("later")

    after = threading.Thread(target=later)
    after.start()
    after.join(0.2)
    assert done == [], "a commit went ahead of the write begun before it"
    writer = threading.Thread(target=write)
    writer.start()
    writer.join(10)
    after.join(10)
    assert done == ["later"]
    state = store.load()
    assert len(state.allocations) == 3001 and state.table_version == 2


def test_a_failed_write_on_another_thread_refuses_every_write_until_the_store_is_read(
    store: SQLiteStore,
) -> None:
    store.commit(StoreChanges(delta=_rows(2), table_version=1))
    # Offset 0 is svc-0's: the UNIQUE constraint refuses the whole transaction.
    clash = TableDelta(added=[Allocation(key("other"), 0), Allocation(key("more"), 9)])
    write = store.begin_background(StoreChanges(delta=clash, table_version=2))
    with pytest.raises(StoreError):
        write()
    with pytest.raises(StoreError, match="an earlier write failed"):
        store.commit(StoreChanges(delta=_rows(1, first=50), table_version=3))
    with pytest.raises(StoreError, match="an earlier write failed"):
        store.begin_background(StoreChanges(delta=_rows(1, first=60), table_version=3))
    state = store.load()  # what is stored: the failed write left nothing
    assert sorted(a.key.service for a in state.allocations) == ["svc-0", "svc-1"]
    assert state.table_version == 1
    store.commit(StoreChanges(delta=_rows(1, first=50), table_version=3))
    assert store.load().table_version == 3


def test_a_write_on_another_thread_stores_any_name_as_one_on_this_thread(
    store: SQLiteStore,
) -> None:
    """Rows go in as JSON there: names with a NUL, or outside the BMP, come back as
    they went in; a lone surrogate is refused, as on this thread."""
    odd = ["a\x00b", "a", "\U0001f600-emoji", 'quote"back\\slash']
    added = [Allocation(key(name), i) for i, name in enumerate(odd)]
    store.begin_background(StoreChanges(delta=TableDelta(added=added), table_version=1))()
    assert sorted(a.key.service for a in store.load().allocations) == sorted(odd)
    bad = TableDelta(added=[Allocation(key("\ud800"), 50)])
    with pytest.raises(StoreError):
        store.begin_background(StoreChanges(delta=bad, table_version=2))()
    store.load()
    gone = TableDelta(removed=[Allocation(key("a\x00b"), 0)])
    store.begin_background(StoreChanges(delta=gone, table_version=3))()
    assert sorted(a.key.service for a in store.load().allocations) == sorted(odd[1:])
