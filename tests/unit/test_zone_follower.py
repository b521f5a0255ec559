"""A zone replica that follows its leader serves what the leader serves.

The leader stores each change; a follower applies the stored change
(L{Zone.follow}), never placing a VIP the store does not hold, but for the
provisional VIPs of a zone synced with a global, which are never stored: it
places those itself, from the leader's rows and hold-downs.  These tests replay
random changes on a leader (the API, files, the global's table, time passing
hold-downs, a failed write) and check after each that a follower fed the
leader's stored changes serves exactly the leader's entries.

One case is left out for a zone synced with a global: a leader's write that
fails.  The leader goes back to the store and places its provisional VIPs from
scratch, without the hold-downs the lost write had; a follower, which never saw
that write, keeps its own.  Those may then differ until the global confirms one
(its rows are the same on every replica), as README.md says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kumazone.core.resources import DATAPLANE, ResourceKey
from kumazone.core.storage import StoreChanges, StoredState
from kumazone.core.vips import ServiceKey, TableDelta
from kumazone.core.zone import Zone
from kumazone.store.sqlite import SQLiteStore
from tests.builders import dataplane_resource
from tests.unit.test_zone_incremental import (
    HOLD_DOWN,
    MESHES,
    NAMES,
    PATHS,
    SMALL,
    FlakyStore,
    Run,
    copy_of,
    global_ops,
    local_ops,
    resources,
)

#: The local changes but a failed write (see above).
stored_ops = st.one_of(
    st.tuples(st.just("put"), resources),
    st.tuples(st.just("delete"), st.sampled_from(NAMES), st.sampled_from(MESHES)),
    st.tuples(st.just("file"), st.sampled_from(PATHS), st.lists(resources, max_size=4)),
    st.tuples(st.just("file"), st.sampled_from(PATHS), st.just([])),
    st.tuples(st.just("wait"), st.sampled_from([1.0, HOLD_DOWN / 2, HOLD_DOWN + 1])),
)


class LoggedStore(FlakyStore):
    """The leader's store: each change it stored is kept for the follower, in order."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.log: list[StoreChanges] = []

    def commit(self, changes: StoreChanges) -> None:
        super().commit(changes)
        self.log.append(changes)


class FollowerStore:
    """A follower's store: the state it starts from; it never writes."""

    def __init__(self, state: StoredState) -> None:
        self.state = state

    def load(self) -> StoredState:
        return self.state

    def commit(self, changes: StoreChanges) -> None:
        raise AssertionError(f"a follower wrote {changes}")

    def close(self) -> None:
        pass


class Pair(Run):
    """The leader under test (L{Run}) and a follower fed the leader's stored changes."""

    def __init__(self, tmp: Path, federated: bool) -> None:
        super().__init__(tmp, federated)
        self.store.real.close()
        self.store = LoggedStore(self.path)
        self.zone.store = self.store
        self.follower = Zone("zone-1", SMALL, FollowerStore(self.store.load()), federated=federated)
        self.follower.following = True
        self.follower.update(0.0)
        self.steps = 0
        self.sliced = 0

    def do(self, op: tuple[Any, ...]) -> None:
        self.steps += 1
        files_first = self.steps % 2 == 0  # its own files read before or after the log
        if op[0] == "file" and files_first:
            self.follower.set_file(op[1], op[2], self.now)
        super().do(op)
        self.catch_up()
        if op[0] == "file" and not files_first:
            self.follower.set_file(op[1], op[2], self.now)

    def catch_up(self) -> None:
        log, self.store.log = self.store.log, []
        if log and self.steps % 4 == 0:
            # Now and then the whole stored state instead, as a replica that fell
            # behind the log (or failed a write) reloads: by the difference.
            self.follower.reload(self.store.load(), following=True)
            return
        for changes in log:
            if changes.reset_table:
                # A new table (the global's first, a new VIP range): loaded whole.
                self.follower.reload(self.store.load(), following=True)
            else:
                # In slices of two services, as a replica follows a big change.
                self.follower.follow(changes, self.now, 2)
                while self.follower.follow_global(2):
                    self.sliced += 1

    def check(self) -> None:
        super().check()
        if self.zone._stale:
            return  # the leader catches up with its files at the next change or tick
        leader, follower = self.zone.snapshot, self.follower.snapshot
        assert list(follower.entries) == list(leader.entries)
        assert follower.version == leader.version
        assert follower.exhausted == leader.exhausted
        assert dict(follower.mesh_of_address) == dict(leader.mesh_of_address)
        assert set(self.follower.wanted()) == set(self.zone.wanted())
        mismatch = self.follower._mismatch
        if mismatch is not None:  # what it would place when it leads, kept change by change
            assert mismatch == self.follower._all_mismatched()

    def promote(self) -> None:
        """The follower leads (its writes to a copy of the store), with services of
        its own files the last leader never placed: it places what a zone started
        afresh over the same store and files places."""
        if self.zone._stale:
            return
        follower, now = self.follower, self.now + 1
        only_here = [
            dataplane_resource("dp-x", "x1", "x2", address="192.0.2.9"),
            dataplane_resource("dp-y", "y1", mesh="m2", address="192.0.2.10"),
        ]
        follower.set_file("/r/only-here.yaml", only_here, now)
        files = {**self.files, "/r/only-here.yaml": only_here}
        follower.store = LoggedStore(copy_of(self.path, str(self.tmp / "promoted.sqlite")))
        fresh = Zone(
            "zone-1",
            SMALL,
            SQLiteStore(copy_of(self.path, str(self.tmp / "fresh.sqlite"))),
            federated=self.federated,
        )
        try:
            follower.lead(now)
            fresh.set_files(files, now)
            fresh.update(now)
            assert list(follower.snapshot.entries) == list(fresh.snapshot.entries)
            assert follower.table.version == fresh.table.version
            assert follower.snapshot.exhausted == fresh.snapshot.exhausted
        finally:
            follower.store.close()
            fresh.store.close()


def replay(tmp: Path, federated: bool, ops: list[tuple[Any, ...]]) -> None:
    pair = Pair(tmp, federated)
    try:
        for op in ops:
            pair.do(op)
            pair.check()
        pair.promote()
    finally:
        pair.store.close()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(local_ops, max_size=20))
def test_a_standalone_zones_follower_serves_what_its_leader_serves(
    tmp_path_factory: Any, ops: list[tuple[Any, ...]]
) -> None:
    replay(tmp_path_factory.mktemp("standalone"), False, ops)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(st.one_of(stored_ops, global_ops, global_ops), max_size=24))
def test_a_federated_zones_follower_serves_what_its_leader_serves(
    tmp_path_factory: Any, ops: list[tuple[Any, ...]]
) -> None:
    replay(tmp_path_factory.mktemp("federated"), True, [("g-full",), *ops])


def test_a_followers_provisional_vip_is_the_leaders_until_the_global_confirms_it(
    tmp_path: Path,
) -> None:
    """The global unreachable: a new service is served on every replica, at one VIP."""
    pair = Pair(tmp_path, True)
    try:
        pair.do(("g-full",))
        pair.do(("put", dataplane_resource("dp-1", "web", address="192.0.2.7")))
        pair.check()
        (entry,) = pair.follower.snapshot.entries
        assert entry.provisional
        pair.do(("g-confirm",))
        pair.check()
        (confirmed,) = pair.follower.snapshot.entries
        assert not confirmed.provisional
        assert (confirmed.vip, confirmed.vip6) == (entry.vip, entry.vip6)
    finally:
        pair.store.close()


def test_a_follower_reloaded_whole_places_the_provisional_vips_again(tmp_path: Path) -> None:
    pair = Pair(tmp_path, True)
    try:
        pair.do(("g-full",))
        pair.do(("put", dataplane_resource("dp-1", "web", address="192.0.2.7")))
        before = list(pair.follower.snapshot.entries)
        pair.follower.reload(SQLiteStore(pair.path).load(), following=True)
        assert list(pair.follower.snapshot.entries) == before
    finally:
        pair.store.close()


def test_a_follower_follows_a_big_change_of_the_globals_table_in_slices(tmp_path: Path) -> None:
    pair = Pair(tmp_path, True)
    try:
        pair.do(("g-full",))
        for index, service in enumerate(["a", "b", "c", "d", "e"]):
            pair.rows[ServiceKey("default", service)] = (index, 1)
        pair.global_version += 1
        pair.send(dict(pair.sent_rows))
        log, pair.store.log = pair.store.log, []
        (changes,) = log
        pair.follower.follow(changes, pair.now, 2)
        assert len(pair.follower.snapshot.entries) == 0  # held back: two per slice
        assert pair.follower.follow_global(2) == 3
        assert len(pair.follower.snapshot.entries) == 2
        while pair.follower.follow_global(2):
            pass
        assert list(pair.follower.snapshot.entries) == list(pair.zone.snapshot.entries)
        assert len(pair.follower.snapshot.entries) == 5
    finally:
        pair.store.close()


def test_a_follower_reloaded_over_the_same_table_changes_only_what_differs(
    tmp_path: Path,
) -> None:
    pair = Pair(tmp_path, False)
    try:
        for index, service in enumerate(["web", "db", "cache"]):
            pair.do(("put", dataplane_resource(f"dp-{index}", service, address="192.0.2.7")))
        pair.check()
        follower = pair.follower
        told: list[Any] = []
        follower.listeners.append(told.append)
        # The follower lost a change (a write of its own that was never stored, say):
        # db's row is gone from its memory.
        db = next(a for a in follower.table.allocations.values() if a.key.service == "db")
        follower.follow(StoreChanges(delta=TableDelta(removed=[db])), pair.now)
        assert "db" not in {e.key.service for e in follower.snapshot.entries}
        told.clear()
        follower.reload(pair.store.load(), following=True)
        assert list(follower.snapshot.entries) == list(pair.zone.snapshot.entries)
        (change,) = told
        assert not change.full  # an ordinary change: the listeners rebuild nothing
        assert [e.key.service for e in change.added] == ["db"]
    finally:
        pair.store.close()


def test_a_follower_reloaded_after_missing_a_placement_leads_without_moving_it(
    tmp_path: Path,
) -> None:
    """The range full: y waits.  The follower misses the change that places y; its
    reload takes y's row, and y is no longer waiting, nor placed again when it leads."""
    pair = Pair(tmp_path, False)
    try:
        services = [f"s{i}" for i in range(14)]  # the 14 VIPs of the range
        for index, service in enumerate(services):
            pair.do(("put", dataplane_resource(f"dp-{index}", service, address="192.0.2.7")))
        pair.do(("put", dataplane_resource("dp-y", "y", address="192.0.2.8")))
        y = ServiceKey("default", "y")
        assert y in pair.follower.table.exhausted
        pair.zone.delete(ResourceKey(DATAPLANE, "default", "dp-0"), pair.now)
        pair.now += HOLD_DOWN + 1
        pair.zone.tick(pair.now)  # the hold-down runs out: y is placed
        assert y in pair.zone.table.allocations
        pair.store.log = []  # ... and the follower misses both changes
        pair.follower.set_file("/r/none.yaml", [], pair.now)
        pair.follower.reload(pair.store.load(), following=True)
        assert y not in pair.follower.table.exhausted
        assert list(pair.follower.snapshot.entries) == list(pair.zone.snapshot.entries)
        pair.follower.store = LoggedStore(copy_of(pair.path, str(tmp_path / "promoted.sqlite")))
        pair.follower.lead(pair.now)
        assert pair.follower.table.allocations[y] == pair.zone.table.allocations[y]
        assert list(pair.follower.snapshot.entries) == list(pair.zone.snapshot.entries)
        pair.follower.store.close()
    finally:
        pair.store.close()


def test_a_new_table_of_the_global_reloads_a_follower_by_the_difference(
    tmp_path: Path,
) -> None:
    """The global failed over: its new leader sends its table whole under a new id, the
    same rows.  The zone's leader stores it anew; a follower takes it by the difference
    (no rebuild: nothing to change)."""
    from kumazone.core.messages import Row, table_messages

    pair = Pair(tmp_path, True)
    try:
        pair.do(("g-full",))
        for index, service in enumerate(["a", "b", "c"]):
            pair.rows[ServiceKey("default", service)] = (index, 1)
        pair.global_version += 1
        pair.send(dict(pair.sent_rows))
        pair.catch_up()
        before = list(pair.follower.snapshot.entries)
        assert len(before) == 3
        told: list[Any] = []
        pair.follower.listeners.append(told.append)
        rows = [
            Row(k.mesh, k.service, offset, ("zone-2",), claim)
            for k, (offset, claim) in sorted(pair.rows.items())
        ]
        for message in table_messages(pair.global_version, 0, True, rows, size=2):
            pair.zone.apply_global(message, "t-2", pair.now)
        assert pair.store.log[-1].reset_table
        pair.catch_up()
        assert pair.follower.table_id == "t-2"
        assert list(pair.follower.snapshot.entries) == before == list(pair.zone.snapshot.entries)
        assert not any(change.full for change in told)
    finally:
        pair.store.close()
