"""A zone's big table writes on another thread: in order, and acknowledged once stored."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from kumazone.core.config import DnsServerConfig
from kumazone.core.messages import Row, table_messages
from kumazone.core.storage import StoreChanges, StoreError
from kumazone.core.vips import Allocation, ServiceKey, TableDelta
from kumazone.core.zone import BACKGROUND_ROWS, Zone
from kumazone.store.background import BackgroundWrites, StoredWrites
from kumazone.store.sqlite import SQLiteStore
from tests.builders import dataplane_resource


class Thread:
    """Stands for the thread pool: each write runs when the test says (as a thread would)."""

    def __init__(self) -> None:
        self.queued: list[tuple[Callable[[], None], Deferred[Any]]] = []

    def __call__(self, work: Callable[[], None]) -> Deferred[Any]:
        done: Deferred[Any] = Deferred()
        self.queued.append((work, done))
        return done

    def run(self) -> None:
        work, done = self.queued.pop(0)
        try:
            work()
        except Exception:
            done.errback(Failure())
        else:
            done.callback(None)


def rows(*pairs: tuple[str, int]) -> StoreChanges:
    added = [Allocation(ServiceKey("default", name), offset) for name, offset in pairs]
    return StoreChanges(delta=TableDelta(added=added), table_version=len(pairs))


@pytest.fixture
def store(tmp_path: Path):
    store = SQLiteStore(str(tmp_path / "zone.sqlite"))
    yield store
    store.close()


def test_what_waits_for_the_write_fires_once_it_is_stored(store: SQLiteStore) -> None:
    thread, failures = Thread(), []
    writes = BackgroundWrites(store, thread, failures.append)
    assert writes.when_stored().called  # nothing on its way
    writes.write(rows(("a", 1), ("b", 2)), True)
    stored = writes.when_stored()
    assert not stored.called
    thread.run()
    assert stored.called and failures == []
    assert sorted(a.key.service for a in store.load().allocations) == ["a", "b"]
    assert writes.when_stored().called


def test_a_failed_write_is_told_and_fails_who_waits_for_it(store: SQLiteStore) -> None:
    store.commit(rows(("a", 1)))
    thread, failures = Thread(), []
    writes = BackgroundWrites(store, thread, failures.append)
    writes.write(rows(("b", 1)), True)  # offset 1 is a's: the store refuses it
    stored = writes.when_stored()
    thread.run()
    assert len(failures) == 1 and "UNIQUE" in failures[0]
    errors: list[Failure] = []
    stored.addErrback(errors.append)
    assert errors and errors[0].check(StoreError)
    # Until the store is read again, every write is refused at once.
    with pytest.raises(StoreError):
        writes.write(rows(("c", 3)), True)
    with pytest.raises(StoreError):
        store.commit(rows(("c", 3)))
    assert [a.key.service for a in store.load().allocations] == ["a"]
    writes.write(rows(("c", 3)), True)
    thread.run()
    assert sorted(a.key.service for a in store.load().allocations) == ["a", "c"]


def test_a_small_update_is_written_at_once_unless_a_big_one_is_on_its_way(
    store: SQLiteStore,
) -> None:
    """A small update waits for nothing; one that comes while a big one is being
    written follows it to the thread (so the reactor does not wait for the big one),
    in order, and who waits is told once both are stored."""
    thread, failures = Thread(), []
    writes = BackgroundWrites(store, thread, failures.append)
    writes.write(rows(("a", 1)), False)
    assert not thread.queued and len(store.load().allocations) == 1
    big = StoreChanges(
        delta=TableDelta(
            added=[Allocation(ServiceKey("default", f"s{i}"), 100 + i) for i in range(20)]
        ),
        table_version=2,
    )
    writes.write(big, True)
    # The next version, at once: its row replaces s0's (a delete, then an insert).
    moved = StoreChanges(
        delta=TableDelta(
            removed=[Allocation(ServiceKey("default", "s0"), 100)],
            added=[Allocation(ServiceKey("default", "s0"), 500)],
        ),
        table_version=3,
    )
    writes.write(moved, False)
    assert len(thread.queued) == 2  # behind the big one, not written on this thread
    stored = writes.when_stored()
    thread.run()
    assert not stored.called
    thread.run()
    assert stored.called and failures == []
    state = store.load()
    assert state.table_version == 3 and len(state.allocations) == 21
    assert {a.key.service: a.offset for a in state.allocations}["s0"] == 500


def test_the_writes_refused_after_a_failure_are_not_told_again(store: SQLiteStore) -> None:
    """One failure, one recovery: the writes queued behind it are refused silently
    (the failure's recovery covers them), and who waits is told it failed."""
    store.commit(rows(("a", 1)))
    thread, failures = Thread(), []
    writes = BackgroundWrites(store, thread, failures.append)
    writes.write(rows(("b", 1)), True)  # offset 1 is a's: refused
    writes.write(rows(("c", 3)), False)  # behind it
    stored = writes.when_stored()
    thread.run()
    thread.run()
    assert len(failures) == 1
    errors: list[Failure] = []
    stored.addErrback(errors.append)
    assert errors and errors[0].check(StoreError)
    assert [a.key.service for a in store.load().allocations] == ["a"]


def test_a_change_of_the_zone_behind_a_big_write_follows_it_and_is_answered_once_stored(
    store: SQLiteStore,
) -> None:
    """While a table from the global is written, an API write does not wait for it on
    the reactor: it is served at once, written after it, and answered once stored."""
    thread, failures = Thread(), []
    writes = BackgroundWrites(store, thread, failures.append)
    zone = Zone("zone-1", DnsServerConfig(), store, federated=True)
    zone.write_in_background = writes.write
    api = StoredWrites(zone, writes)
    assert api.put(dataplane_resource("db-1", "db"), 0.0) is True  # nothing on its way
    assert not thread.queued
    rows = [Row("default", f"svc-{i:05d}", i, ("zone-2",), 1) for i in range(BACKGROUND_ROWS)]
    for message in table_messages(1, 0, True, rows, size=300):
        zone.apply_global(message, "t-1", 0.0)
    assert len(thread.queued) == 1  # the table, on its way
    answers: list[object] = []
    answer = api.put(dataplane_resource("web-1", "web"), 1.0)
    assert isinstance(answer, Deferred)
    answer.addBoth(answers.append)
    assert len(thread.queued) == 2 and answers == []  # behind the table, not written here
    assert zone.snapshot.entries.get(ServiceKey("default", "web")) is not None  # served
    deleted = api.delete(dataplane_resource("db-1", "db").key, 2.0)
    assert isinstance(deleted, Deferred)
    deleted.addBoth(answers.append)
    thread.run()
    assert answers == []
    thread.run()
    thread.run()
    assert answers == [True, True] and failures == []
    state = store.load()
    assert [r.name for r in state.resources] == ["web-1"]
    assert len(state.allocations) == BACKGROUND_ROWS


def test_a_change_of_the_zone_behind_a_write_that_fails_is_answered_with_the_failure(
    store: SQLiteStore,
) -> None:
    store.commit(rows(("a", 1)))
    thread, failures = Thread(), []
    writes = BackgroundWrites(store, thread, failures.append)
    zone = Zone("zone-1", DnsServerConfig(), store, federated=True)
    zone.write_in_background = writes.write
    writes.write(rows(("b", 1)), True)  # offset 1 is a's: refused
    answers: list[Failure] = []
    answer = StoredWrites(zone, writes).put(dataplane_resource("web-1", "web"), 1.0)
    assert isinstance(answer, Deferred)
    answer.addErrback(answers.append)
    thread.run()
    thread.run()
    assert len(failures) == 1  # told once: its recovery covers the write behind it
    assert len(answers) == 1 and answers[0].check(StoreError)
    assert store.load().resources == []
