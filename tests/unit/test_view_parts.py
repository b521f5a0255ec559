"""A zone's view of the global's table taking a whole table in parts (kumazone.core.view).

A full table is worked out part by part (its offsets checked, its rows compared
with those held), so that the last part costs what it brings.  These tests hold
that to the same view taking the same table as a change from the version it
holds: the path that compares nothing part by part.
"""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kumazone.core.federation import FederatedView
from kumazone.core.messages import ProtocolError, Row, TableUpdate
from kumazone.core.vips import Allocation, ServiceKey, TableDelta, VipRange

SMALL = VipRange(IPv4Network("10.0.0.0/28"), IPv6Network("fd00::/124"))  # 14 offsets
BIG = VipRange(IPv4Network("240.0.0.0/4"), IPv6Network("fd00:fd00::/64"))
HOLD_DOWN = 100.0
POOL = [ServiceKey(m, s) for m in ("default", "m2") for s in ("a", "b", "c", "d", "e", "f")]


def row(key: ServiceKey, offset: int) -> Row:
    return Row(key.mesh, key.service, offset, ("zone-2",), 1)


def allocation(key: ServiceKey, offset: int) -> Allocation:
    """What L{row} makes of C{key} in the view."""
    return Allocation(key, offset, ("zone-2",), 1)


def parts(
    version: int,
    base: int,
    full: bool,
    rows: list[Row],
    remove: list[tuple[str, str]],
    size: int,
) -> list[TableUpdate]:
    """C{rows} C{size} a part; the removals in a part of their own after them (a part
    removes before it adds)."""
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
    if remove or not chunks:
        chunks.append([])
    return [
        TableUpdate(
            version,
            base,
            full,
            i,
            i == len(chunks) - 1,
            tuple(chunk),
            tuple(remove) if i == len(chunks) - 1 else (),
        )
        for i, chunk in enumerate(chunks)
    ]


def state(view: FederatedView) -> dict[str, Any]:
    return {
        "version": view.version,
        "rows": dict(view.global_rows),
        "at": dict(view._global_at),
        "provisional": dict(view.provisional),
        "provisional_at": dict(view._provisional_at),
        "holds": dict(view.holds),
        "exhausted": set(view.exhausted),
    }


def summary(delta: TableDelta | None) -> tuple[Any, ...] | None:
    if delta is None:
        return None
    return (
        sorted(delta.added),
        sorted(delta.removed),
        sorted(delta.holds_added, key=repr),
        sorted(delta.holds_dropped, key=repr),
        sorted(delta.exhausted),
    )


@st.composite
def tables(draw: st.DrawFn) -> tuple[dict[ServiceKey, int], list[Row], list[tuple[str, str]], int]:
    """A table (key -> offset), and the rows and removals of a full message that gives it.

    The message may give a key at a decoy offset before its own, and a decoy key
    that a later part removes: a full table's parts may say a thing twice.
    """
    keys = draw(st.lists(st.sampled_from(POOL), unique=True, max_size=len(POOL)))
    offsets = draw(st.permutations(range(SMALL.size)))
    table = dict(zip(keys, offsets, strict=False))
    free = [o for o in range(SMALL.size) if o not in table.values()]
    rows = [row(k, o) for k, o in table.items()]
    remove: list[tuple[str, str]] = []
    if free and table and draw(st.booleans()):
        moved = draw(st.sampled_from(sorted(table)))
        rows.insert(0, row(moved, free.pop()))  # given again, at its own offset, later
    others = [k for k in POOL if k not in table]
    if free and others and draw(st.booleans()):
        decoy = draw(st.sampled_from(others))
        rows.insert(0, row(decoy, free.pop()))
        remove.append((decoy.mesh, decoy.service))
    return table, rows, remove, draw(st.integers(1, 4))


operations = st.lists(
    st.one_of(
        st.tuples(st.just("table"), tables()),
        st.tuples(st.just("local"), st.sets(st.sampled_from(POOL), max_size=6)),
        st.tuples(st.just("wait"), st.sampled_from([1.0, HOLD_DOWN])),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_a_full_table_in_parts_does_what_the_same_change_does(ops) -> None:
    view = FederatedView(SMALL, hold_down=HOLD_DOWN)
    twin = FederatedView(SMALL, hold_down=HOLD_DOWN)
    now, local = 0.0, set()
    for op in ops:
        if op[0] == "table":
            table, rows, remove, size = op[1]
            version = view.version + 1
            delta = None
            for message in parts(version, 0, True, rows, remove, size):
                delta = view.apply(message, now)
            held = twin.global_rows
            change = [row(k, o) for k, o in table.items() if held.get(k) != allocation(k, o)]
            gone = [(k.mesh, k.service) for k in held if k not in table]
            message = TableUpdate(version, twin.version, False, 0, True, tuple(change), tuple(gone))
            expected = twin.apply(message, now)
            assert summary(delta) == summary(expected)
        else:
            if op[0] == "local":
                local = op[1]
            else:
                now += op[1]
            assert summary(view.reconcile(local, now)) == summary(twin.reconcile(local, now))
        assert state(view) == state(twin)
        assert set(view.take_touched()) == set(twin.take_touched())


def test_a_fresh_view_takes_a_whole_table_in_parts() -> None:
    view = FederatedView(BIG)
    rows = [row(ServiceKey("default", f"s{i:03d}"), 10 + i) for i in range(100)]
    messages = parts(7, 0, True, rows, [], 30)
    for message in messages[:-1]:
        assert view.apply(message) is None
        assert view.global_rows == {} and view.version == 0
    delta = view.apply(messages[-1])
    assert delta is not None and view.version == 7
    assert [a.key for a in delta.added] == [ServiceKey(r.mesh, r.service) for r in rows]
    assert view.global_rows == {a.key: a for a in delta.added}
    assert view._global_at == {a.offset: a.key for a in delta.added}
    # Followed a slice at a time, in the table's order, each key once: one changed
    # meanwhile keeps its place.
    assert view.defer_touched(40)
    moved = ServiceKey("default", "s050")
    view.apply(TableUpdate(8, 7, False, 0, True, (row(moved, 500),), ()))
    assert view.defer_touched(0)
    assert view.held_back == 100
    followed = []
    while view.held_back:
        view.release(40)
        followed.extend(view.take_touched())
    assert followed == [a.key for a in delta.added]


def test_a_key_given_again_frees_the_offset_it_was_given_first() -> None:
    view = FederatedView(BIG)
    a, b = ServiceKey("default", "a"), ServiceKey("default", "b")
    messages = parts(3, 0, True, [row(a, 5), row(a, 6), row(b, 5)], [], 1)
    for message in messages:
        view.apply(message)
    assert view.global_rows == {a: allocation(a, 6), b: allocation(b, 5)}
    assert view._global_at == {6: a, 5: b}


def test_a_key_removed_by_a_later_part_is_not_in_the_table() -> None:
    view = FederatedView(BIG, [Allocation(ServiceKey("default", "old"), 1)], 2)
    a, b = ServiceKey("default", "a"), ServiceKey("default", "b")
    messages = parts(3, 0, True, [row(a, 5), row(b, 6)], [("default", "a")], 1)
    for message in messages:
        view.apply(message)
    assert view.global_rows == {b: allocation(b, 6)}
    assert view._global_at == {6: b}


@pytest.mark.parametrize("held", [[], [Allocation(ServiceKey("default", "old"), 1)]])
def test_a_full_table_giving_one_offset_twice_is_refused_and_changes_nothing(held) -> None:
    view = FederatedView(BIG, held, 2)
    before = state(view)
    a, b = ServiceKey("default", "a"), ServiceKey("default", "b")
    messages = parts(3, 0, True, [row(a, 5), row(b, 5)], [], 1)
    view.apply(messages[0])
    with pytest.raises(ProtocolError, match="one VIP to two services"):
        view.apply(messages[1])
    assert state(view) == before
    # The next table (a new connection) starts afresh.
    view.forget_partial()
    for message in parts(4, 0, True, [row(b, 5)], [], 1):
        view.apply(message)
    assert view.global_rows == {b: allocation(b, 5)}


@pytest.mark.parametrize("held", [[], [Allocation(ServiceKey("default", "old"), 1)]])
def test_an_offset_given_twice_in_a_table_that_ends_with_one_key_there_is_taken(held) -> None:
    """What counts is the whole table: a key that moves away from an offset another
    key is given, or a key removed from it, leaves that offset to the other."""
    a, b, c = (ServiceKey("default", s) for s in "abc")
    moved = parts(3, 0, True, [row(a, 5), row(b, 5), row(a, 6)], [], 1)
    removed = parts(3, 0, True, [row(c, 7), row(b, 7)], [("default", "c")], 1)
    for messages, expected in ((moved, {a: 6, b: 5}), (removed, {b: 7})):
        view = FederatedView(BIG, held, 2)
        for message in messages:
            view.apply(message)
        assert view.global_rows == {k: allocation(k, o) for k, o in expected.items()}
        assert view._global_at == {o: k for k, o in expected.items()}


@pytest.mark.parametrize("full", [True, False])
def test_a_row_of_a_local_service_is_keyed_by_the_zones_own_key(full: bool) -> None:
    """A zone holds its own services' keys already: the global's rows for them take
    those very objects (and their strings), not a copy of each."""
    view = FederatedView(BIG, hold_down=HOLD_DOWN)
    # Keys made as a zone's inventory makes them: not the objects rows decode to.
    local = [ServiceKey("default", "".join(["lo", "cal", str(i)])) for i in range(3)]
    view.reconcile(local[:2], 0.0)
    view.change([local[2]], [], 0.0)
    if not full:
        for message in parts(1, 0, True, [row(ServiceKey("m2", "other"), 9)], [], 10):
            view.apply(message)
    rows = [row(ServiceKey("default", f"local{i}"), i + 1) for i in range(3)]
    rows.append(row(ServiceKey("m2", "elsewhere"), 7))
    for message in parts(2, 1, full, rows, [], 2):
        view.apply(message)
    for key in local:
        assert view.global_rows[key].key is key
        assert view.global_rows[key].offset == int(key.service[-1]) + 1
    assert view.global_rows[ServiceKey("m2", "elsewhere")].offset == 7
