"""What the PostgreSQL store alone has: its URL, concurrent first opens, a database that is down.

Against the session's own PostgreSQL server (L{tests.pgserver}).
"""

from __future__ import annotations

import threading

import psycopg
import pytest

from kumazone.core.storage import StoreChanges, StoreError
from kumazone.core.vips import Allocation, ServiceKey, TableDelta
from kumazone.store.postgres import SCHEMA_VERSION, PostgresStore, check_url, describe_url


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://kumazone@db.example:5432/kumazone",
        "postgres://kumazone@127.0.0.1/kz",
        "postgresql://127.0.0.1:6543/kz",
    ],
)
def test_store_urls_taken(url: str) -> None:
    assert check_url(url) == url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("postgresql://kumazone:s3cret@db.example/kz", "PGPASSWORD"),
        ("mysql://kumazone@db.example/kz", "not a postgresql:// URL"),
        ("postgresql://kumazone@db.example", "names a host and a database"),
        ("postgresql:///kz", "names a host and a database"),
        ("postgresql://kumazone@db.example:99999/kz", "bad port"),
    ],
)
def test_store_urls_refused_say_why_and_never_show_a_password(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as raised:
        check_url(url)
    assert "s3cret" not in str(raised.value)


def test_a_described_url_has_no_password() -> None:
    described = describe_url("postgresql://kz:s3cret@db.example:5433/kumazone")
    assert described == "postgresql://kz@db.example:5433/kumazone"


def test_a_database_that_is_down_is_a_store_error_naming_it(postgres) -> None:
    # A port nothing listens on: the server's own port, on an address it does not serve.
    url = f"postgresql://kumazone@127.0.0.2:{postgres.port}/kumazone"
    with pytest.raises(StoreError, match=r"cannot open store postgresql://kumazone@127\.0\.0\.2"):
        PostgresStore(url)


def test_replicas_opening_a_new_database_at_once_create_the_schema_once(postgres) -> None:
    url = postgres.fresh_database("concurrent_open")
    stores: list[PostgresStore] = []
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def open_one() -> None:
        start.wait()
        try:
            stores.append(PostgresStore(url))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert errors == []
        assert len(stores) == 6
        stores[0].commit(
            StoreChanges(delta=TableDelta(added=[Allocation(ServiceKey("default", "a"), 1)]))
        )
        assert all(len(s.load().allocations) == 1 for s in stores)
        with psycopg.connect(url) as db:
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            assert row == (str(SCHEMA_VERSION),)
            count = db.execute("SELECT count(*) FROM meta WHERE key='schema_version'").fetchone()
            assert count == (1,)
    finally:
        for store in stores:
            store.close()


def test_a_newer_schema_is_refused(postgres) -> None:
    url = postgres.fresh_database("newer_schema")
    PostgresStore(url).close()
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(StoreError, match="schema version 99"):
        PostgresStore(url)


def test_the_store_reconnects_after_the_server_restarts(postgres) -> None:
    url = postgres.fresh_database("restart")
    store = PostgresStore(url)
    store.commit(StoreChanges(table_version=5))
    postgres.stop()
    try:
        with pytest.raises(StoreError, match=r"cannot (read|write|open) store"):
            store.load()
    finally:
        postgres.start()
    assert store.load().table_version == 5  # a new connection, the same rows
    store.close()


def test_a_v1_database_is_migrated_at_open_and_keeps_its_rows(postgres) -> None:
    from importlib import resources as package_files

    url = postgres.fresh_database("migrate_v1")
    v1 = (package_files.files("kumazone.store") / "schema" / "postgresql" / "v1.sql").read_text()
    with psycopg.connect(url, autocommit=True) as db:
        db.execute(v1)
        db.execute("INSERT INTO vips (mesh, service, vip_offset) VALUES ('default', 'web', 9)")
        db.execute("UPDATE meta SET value='7' WHERE key='table_version'")
    store = PostgresStore(url)
    state = store.load()
    store.close()
    assert [(a.key.service, a.offset) for a in state.allocations] == [("web", 9)]
    assert state.table_version == 7
    with psycopg.connect(url) as db:
        version = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        assert version == (str(SCHEMA_VERSION),)
        assert db.execute("SELECT count(*) FROM leader").fetchone() == (0,)
        columns = db.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'leader'"
        ).fetchall()
        assert ("contact",) in columns  # v4: where the leader is reached


def test_a_fenced_write_of_an_epoch_that_no_longer_leads_writes_nothing(postgres) -> None:
    from kumazone.store.postgres import Fenced

    url = postgres.fresh_database("fenced")
    store = PostgresStore(url)
    with psycopg.connect(url, autocommit=True) as db:
        db.execute(
            "INSERT INTO leader (name, epoch, holder, pid, renewed_at) "
            "VALUES ('global', 3, 'a', 1, now())"
        )
    web = TableDelta(added=[Allocation(ServiceKey("default", "web"), 1)])
    with pytest.raises(Fenced, match="epoch 2 of global no longer leads"):
        store.commit_fenced(StoreChanges(delta=web, table_version=1), ("global", 2))
    assert store.load().allocations == []
    store.commit_fenced(StoreChanges(delta=web, table_version=1), ("global", 3))
    assert len(store.load().allocations) == 1
    store.close()


def test_every_write_is_logged_in_order_and_a_trimmed_log_says_so(postgres) -> None:
    url = postgres.fresh_database("change_log")
    store = PostgresStore(url)
    web = ServiceKey("default", "web")
    first = store.commit_fenced(StoreChanges(table_version=1), None)
    second = store.commit_fenced(
        StoreChanges(delta=TableDelta(added=[Allocation(web, 3)]), table_version=2), None
    )
    assert second == first + 1
    rows = store.changes_since(0)
    assert rows is not None
    assert [seq for seq, _ in rows] == [first, second]
    assert rows[1][1].delta is not None and rows[1][1].delta.added == [Allocation(web, 3)]
    assert store.load().log_seq == second
    # A failed write logs nothing: the next one follows on.
    with pytest.raises(StoreError):
        store.commit(
            StoreChanges(delta=TableDelta(added=[Allocation(ServiceKey("default", "x"), 3)]))
        )
    third = store.commit_fenced(StoreChanges(table_version=3), None)
    assert third == second + 1
    store.trim_log(1)
    assert store.changes_since(0) is None  # a follower that far behind loads whole
    assert [seq for seq, _ in store.changes_since(second) or []] == [third]
    assert store.changes_since(third) == []
    store.close()


def test_a_commit_notifies_the_change_log_channel(postgres) -> None:
    from kumazone.store.postgres import CHANNEL

    url = postgres.fresh_database("notify")
    store = PostgresStore(url)
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        seq = store.commit_fenced(StoreChanges(table_version=1), None)
        notified = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
    assert notified == [str(seq)]
    store.close()
