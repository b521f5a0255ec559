"""One store contract, two databases: every test here runs against SQLite and a real PostgreSQL.

The PostgreSQL server is the session's own (L{tests.pgserver}); each test gets a
database of its own on it.  What SQLite alone has (its file, its migrations
from older schema versions, C{:memory:}) is tested in tests/unit/test_sqlite_store.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

import pytest

from kumazone.core.federation import ZoneRecord
from kumazone.core.resources import DATAPLANE, ResourceKey, parse_resource
from kumazone.core.storage import Store, StoreChanges, StoredState, StoreError
from kumazone.core.vips import Allocation, Hold, ServiceKey, TableDelta, VipAllocator, VipRange
from kumazone.store.postgres import PostgresStore
from kumazone.store.sqlite import SQLiteStore
from tests.builders import dataplane_resource, external_service

_databases = itertools.count()
Opener = Callable[[], Store]


def key(service: str, mesh: str = "default") -> ServiceKey:
    return ServiceKey(mesh, service)


def by_offset(row: Allocation | Hold) -> int:
    return row.offset


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Opener]]:
    """(name, open): C{open()} opens a new connection to one store, the same each time."""
    opened: list[Store] = []
    if request.param == "sqlite":
        path = str(tmp_path / "data" / "kumazone.sqlite")

        def open_store() -> Store:
            opened.append(SQLiteStore(path))
            return opened[-1]

    else:
        server = request.getfixturevalue("postgres")
        url = server.fresh_database(f"store_{next(_databases)}")

        def open_store() -> Store:
            opened.append(PostgresStore(url))
            return opened[-1]

    yield request.param, open_store
    for store in opened:
        store.close()


@pytest.fixture
def opener(backend: tuple[str, Opener]) -> Opener:
    return backend[1]


@pytest.fixture
def store(opener: Opener) -> Store:
    return opener()


def test_a_new_store_is_empty(store: Store) -> None:
    assert store.load() == StoredState()


def test_round_trip_through_another_connection(opener: Opener) -> None:
    store = opener()
    redis = dataplane_resource("redis-1", "redis", address="192.0.2.10")
    httpbin = parse_resource(external_service("httpbin"))
    store.commit(
        StoreChanges(
            puts=[redis, dataplane_resource("web-1", "web"), httpbin],
            delta=TableDelta(
                added=[Allocation(key("redis"), 7, ("zone-1",), 3), Allocation(key("web"), 3)],
                holds_added=[Hold(key("old"), 11, 1234.5)],
            ),
            table_version=42,
            vip_range="240.0.0.0/4 fd00:fd00::/64",
            table_id="abc",
        )
    )
    state = opener().load()
    by_key = {r.key: r for r in state.resources}
    assert sorted(by_key) == sorted(
        [redis.key, httpbin.key, ResourceKey(DATAPLANE, "default", "web-1")]
    )
    assert by_key[redis.key].document == redis.document
    assert (by_key[redis.key].services, by_key[redis.key].address) == (("redis",), "192.0.2.10")
    assert by_key[httpbin.key].document == httpbin.document
    assert state.allocations == [
        Allocation(key("web"), 3),
        Allocation(key("redis"), 7, ("zone-1",), 3),
    ]
    assert state.holds == [Hold(key("old"), 11, 1234.5)]
    assert (state.table_version, state.vip_range, state.table_id) == (
        42,
        "240.0.0.0/4 fd00:fd00::/64",
        "abc",
    )


def test_a_real_table_round_trips(opener: Opener) -> None:
    vip_range = VipRange(IPv4Network("10.0.0.0/29"), IPv6Network("fd00::/125"))
    table = VipAllocator(vip_range, 100.0)
    store = opener()
    keys = [key(f"s{i}") for i in range(5)]
    for now, wanted in [(0.0, keys), (1.0, keys[1:]), (2.0, keys[2:]), (50.0, keys[:1] + keys[3:])]:
        store.commit(StoreChanges(delta=table.reconcile(wanted, now), table_version=table.version))
    state = opener().load()
    reloaded = VipAllocator(vip_range, 100.0, state.allocations, state.holds, state.table_version)
    assert reloaded.allocations == table.allocations
    assert reloaded.holds == table.holds
    assert state.table_version == table.version


def test_put_replaces_and_delete_removes(store: Store) -> None:
    store.commit(StoreChanges(puts=[dataplane_resource("redis-1", "redis")]))
    store.commit(StoreChanges(puts=[dataplane_resource("redis-1", "cache", address="192.0.2.99")]))
    (resource,) = store.load().resources
    assert (resource.services, resource.address) == (("cache",), "192.0.2.99")
    store.commit(StoreChanges(deletes=[resource.key, ResourceKey(DATAPLANE, "default", "nope")]))
    assert store.load().resources == []


def test_removed_rows_dropped_holds_and_a_hold_taken_back(store: Store) -> None:
    store.commit(
        StoreChanges(
            delta=TableDelta(
                added=[Allocation(key("a"), 1), Allocation(key("b"), 2)],
                holds_added=[Hold(key("c"), 3, 10.0)],
            )
        )
    )
    store.commit(
        StoreChanges(
            delta=TableDelta(
                removed=[Allocation(key("a"), 1)],
                holds_added=[Hold(key("a"), 1, 20.0)],
                holds_dropped=[Hold(key("c"), 3, 10.0)],
            )
        )
    )
    state = store.load()
    assert (state.allocations, state.holds) == (
        [Allocation(key("b"), 2)],
        [Hold(key("a"), 1, 20.0)],
    )
    store.commit(
        StoreChanges(
            delta=TableDelta(
                added=[Allocation(key("a"), 1)], holds_dropped=[Hold(key("a"), 1, 20.0)]
            )
        )
    )
    state = store.load()
    assert (state.allocations, state.holds) == (
        [Allocation(key("a"), 1), Allocation(key("b"), 2)],
        [],
    )


def test_reset_table_keeps_resources_and_meta_only_changes_when_given(store: Store) -> None:
    store.commit(
        StoreChanges(
            puts=[dataplane_resource("redis-1", "redis")],
            delta=TableDelta(
                added=[Allocation(key("redis"), 5)], holds_added=[Hold(key("x"), 6, 1.0)]
            ),
            table_version=3,
            vip_range="old",
        )
    )
    store.commit(
        StoreChanges(
            delta=TableDelta(added=[Allocation(key("redis"), 9)]),
            table_version=4,
            vip_range="new",
            reset_table=True,
        )
    )
    store.commit(StoreChanges(puts=[dataplane_resource("web-1", "web")]))
    state = store.load()
    assert (state.allocations, state.holds) == ([Allocation(key("redis"), 9)], [])
    assert len(state.resources) == 2
    assert (state.table_version, state.vip_range) == (4, "new")


def _populated(store: Store) -> StoredState:
    store.commit(
        StoreChanges(
            puts=[dataplane_resource("redis-1", "redis")],
            delta=TableDelta(
                added=[Allocation(key("redis"), 5)], holds_added=[Hold(key("old"), 6, 9.0)]
            ),
            table_version=10,
            vip_range="240.0.0.0/4 fd00:fd00::/64",
            zones_put=[ZoneRecord("zone-1", last_contact=1.0, acked=10)],
            zone_services_added=[("zone-1", key("redis"))],
        )
    )
    return store.load()


@pytest.mark.parametrize(
    "bad",
    [
        # Two services on one VIP: the schema refuses it, whatever the code asks.
        TableDelta(added=[Allocation(key("web"), 5)]),
        TableDelta(added=[Allocation(key("a"), 1), Allocation(key("b"), 1)]),
        # One service on two VIPs.
        TableDelta(added=[Allocation(key("redis"), 8)]),
        # A number no column holds.
        TableDelta(added=[Allocation(key("big"), 2**64)]),
    ],
    ids=["vip-taken", "vip-twice", "service-twice", "too-large"],
)
def test_a_failing_commit_changes_nothing_and_the_store_goes_on(
    opener: Opener, bad: TableDelta
) -> None:
    store = opener()
    before = _populated(store)
    with pytest.raises(StoreError):
        store.commit(
            StoreChanges(
                puts=[dataplane_resource("web-1", "web")],
                deletes=[ResourceKey(DATAPLANE, "default", "redis-1")],
                delta=bad,
                table_version=11,
                vip_range="changed",
                zones_put=[ZoneRecord("zone-2")],
                zone_services_removed=[("zone-1", key("redis"))],
            )
        )
    assert store.load() == before
    assert opener().load() == before  # and so it is for everyone
    store.commit(StoreChanges(delta=TableDelta(added=[Allocation(key("a"), 1)]), table_version=11))
    assert opener().load().table_version == 11


def test_zone_records_and_their_services_are_rows(backend: tuple[str, Opener]) -> None:
    name, opener = backend
    store = opener()

    def zones(state: StoredState) -> dict[str, tuple[set[ServiceKey], float, int]]:
        return {z.name: (set(z.services), z.last_contact, z.acked) for z in state.zones}

    store.commit(
        StoreChanges(
            zones_put=[ZoneRecord("zone-1", last_contact=1.0)],
            zone_services_added=[("zone-1", key("redis")), ("zone-1", key("web"))],
        )
    )
    store.commit(StoreChanges(zones_put=[ZoneRecord("zone-1", {key("x")}, True, 5.0, 3)]))
    assert zones(store.load()) == {"zone-1": ({key("redis"), key("web")}, 5.0, 3)}
    store.commit(
        StoreChanges(
            zone_services_added=[("zone-1", key("db")), ("zone-2", key("redis"))],
            zone_services_removed=[("zone-1", key("web"))],
            zones_put=[ZoneRecord("zone-2")],
        )
    )
    store.commit(StoreChanges(zone_services_added=[("zone-1", key("db"))]))  # again: harmless
    assert zones(store.load()) == {
        "zone-1": ({key("redis"), key("db")}, 5.0, 3),
        "zone-2": ({key("redis")}, 0.0, 0),
    }
    store.commit(StoreChanges(zones_deleted=["zone-1"]))
    assert zones(store.load()) == {"zone-2": ({key("redis")}, 0.0, 0)}
    # A deleted zone's services go with it, row by row.
    assert _zone_service_rows(name, store) == [("zone-2", "default", "redis")]


def test_a_stored_document_that_no_longer_validates_is_reported(
    backend: tuple[str, Opener], tmp_path: Path
) -> None:
    name, opener = backend
    store = opener()
    store.commit(StoreChanges(puts=[dataplane_resource("redis-1", "redis")]))
    rows = [
        ("Dataplane", "default", "bad", '{"type": "Dataplane", "name": "bad"}'),
        ("Dataplane", "default", "garbled", "{not json"),
    ]
    _insert_raw(name, store, rows)
    state = opener().load()
    assert [r.name for r in state.resources] == ["redis-1"]
    assert [k.name for k, _ in state.bad_resources] == ["bad", "garbled"]
    assert "networking" in dict(state.bad_resources)[ResourceKey("Dataplane", "default", "bad")]


def _insert_raw(name: str, store: Any, rows: list[tuple[str, str, str, str]]) -> None:
    """Rows written past the store (as an older kumazone or an operator might have)."""
    if name == "sqlite":
        import sqlite3

        db = sqlite3.connect(store.path)
        db.executemany("INSERT INTO resources VALUES (?, ?, ?, ?)", rows)
        db.commit()
        db.close()
        return
    import psycopg

    with psycopg.connect(store.url, autocommit=True) as db:
        db.cursor().executemany("INSERT INTO resources VALUES (%s, %s, %s, %s)", rows)


def _zone_service_rows(name: str, store: Any) -> list[tuple[str, ...]]:
    """The zone_services table as the database holds it."""
    query = "SELECT zone, mesh, service FROM zone_services ORDER BY zone, mesh, service"
    if name == "sqlite":
        import sqlite3

        db = sqlite3.connect(store.path)
        try:
            return [tuple(row) for row in db.execute(query)]
        finally:
            db.close()
    import psycopg

    with psycopg.connect(store.url) as pg:
        return [tuple(row) for row in pg.execute(query)]


def test_shared_keys_between_the_table_and_the_zones(store: Store) -> None:
    store.commit(
        StoreChanges(
            delta=TableDelta(added=[Allocation(key("redis"), 1, ("zone-1",))]),
            zones_put=[ZoneRecord("zone-1")],
            zone_services_added=[("zone-1", key("redis"))],
        )
    )
    state = store.load()
    (service,) = state.zones[0].services
    assert service is state.allocations[0].key  # one object per service in memory
