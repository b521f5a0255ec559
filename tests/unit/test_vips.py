"""Tests for kumazone.core.vips: the VIP range and the VIP allocator."""

from __future__ import annotations

import hashlib
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from kumazone.core.vips import Allocation, Hold, ServiceKey, VipAllocator, VipRange

TINY4 = IPv4Network("10.0.0.0/29")
TINY6 = IPv6Network("fd00::/125")
HOLD_DOWN = 3600.0


def tiny_range() -> VipRange:
    return VipRange(TINY4, TINY6)


def expected_candidate(key: ServiceKey, size: int) -> int:
    """The candidate offset, computed from the design's words."""
    digest = hashlib.sha256(f"{key.mesh}/{key.service}".encode()).digest()
    return int.from_bytes(digest[:8], byteorder="big", signed=False) % size


def keys_with_candidate(vip_range: VipRange, offset: int, count: int, mesh: str = "default"):
    """C{count} distinct keys whose candidate offset is C{offset}."""
    found = []
    index = 0
    while len(found) < count:
        key = ServiceKey(mesh, f"svc-{index}")
        if expected_candidate(key, vip_range.size) == offset:
            found.append(key)
        index += 1
    return found


def offsets(table: VipAllocator) -> dict[ServiceKey, int]:
    return {key: allocation.offset for key, allocation in table.allocations.items()}


# -- VipRange ---------------------------------------------------------------------


def test_tiny_range_size_skips_network_and_broadcast() -> None:
    vip_range = tiny_range()
    assert vip_range.size == 6
    assert [vip_range.ipv4(o) for o in range(6)] == [
        IPv4Address(f"10.0.0.{i}") for i in range(1, 7)
    ]


def test_no_offset_maps_to_network_or_broadcast() -> None:
    vip_range = tiny_range()
    handed_out = {vip_range.ipv4(o) for o in range(vip_range.size)}
    assert TINY4.network_address not in handed_out
    assert TINY4.broadcast_address not in handed_out
    assert handed_out <= set(TINY4)


def test_ipv6_sits_at_the_same_offset() -> None:
    vip_range = tiny_range()
    for offset in range(vip_range.size):
        v4 = vip_range.ipv4(offset)
        v6 = vip_range.ipv6(offset)
        assert int(v4) - int(TINY4.network_address) == int(v6) - int(TINY6.network_address)
        assert v6 in TINY6


def test_design_example_pair() -> None:
    # DESIGN.md: "vip": "240.12.0.7", "vip6": "fd00:fd00::c:7"
    vip_range = VipRange(IPv4Network("240.0.0.0/4"), IPv6Network("fd00:fd00::/64"))
    offset = vip_range.offset_of(IPv4Address("240.12.0.7"))
    assert offset is not None
    assert vip_range.ipv6(offset) == IPv6Address("fd00:fd00::c:7")
    assert vip_range.size == 2**28 - 2


def test_offset_of_round_trip() -> None:
    vip_range = tiny_range()
    for offset in range(vip_range.size):
        assert vip_range.offset_of(vip_range.ipv4(offset)) == offset
        assert vip_range.offset_of(vip_range.ipv6(offset)) == offset


@pytest.mark.parametrize(
    "address",
    [
        IPv4Address("10.0.0.0"),
        IPv4Address("10.0.0.7"),
        IPv4Address("10.0.0.8"),
        IPv4Address("9.255.255.255"),
        IPv6Address("fd00::"),
        IPv6Address("fd00::7"),
        IPv6Address("fd00::100"),
    ],
)
def test_offset_of_outside_the_usable_range(address: IPv4Address | IPv6Address) -> None:
    assert tiny_range().offset_of(address) is None


@given(st.integers(min_value=0, max_value=2**28 - 3))
def test_offset_of_round_trip_on_the_default_range(offset: int) -> None:
    vip_range = VipRange(IPv4Network("240.0.0.0/4"), IPv6Network("fd00:fd00::/64"))
    assert vip_range.offset_of(vip_range.ipv4(offset)) == offset
    assert vip_range.offset_of(vip_range.ipv6(offset)) == offset
    assert vip_range.ipv4(offset) in IPv4Network("240.0.0.0/4")


def test_ipv6_range_smaller_than_ipv4_is_refused() -> None:
    with pytest.raises(ValueError, match="smaller"):
        VipRange(IPv4Network("10.0.0.0/24"), IPv6Network("fd00::/121"))


def test_ipv6_range_as_large_as_ipv4_is_accepted() -> None:
    assert VipRange(IPv4Network("10.0.0.0/24"), IPv6Network("fd00::/120")).size == 254


@pytest.mark.parametrize("cidr", ["10.0.0.0/29", "240.0.0.0/4", "192.168.0.0/16"])
@pytest.mark.parametrize("service", ["redis", "web", "echo-server_echo-example_svc_1010", ""])
@pytest.mark.parametrize("mesh", ["default", "other", "ünïcode"])
def test_candidate_is_sha256_prefix_mod_size(cidr: str, service: str, mesh: str) -> None:
    vip_range = VipRange(IPv4Network(cidr), IPv6Network("fd00::/64"))
    key = ServiceKey(mesh, service)
    assert vip_range.candidate(key) == expected_candidate(key, vip_range.size)


def test_candidate_known_value() -> None:
    # Pinned so that any change to the hash input (separator, encoding, byte order)
    # shows up: zones and global computing on their own must agree.
    vip_range = VipRange(IPv4Network("240.0.0.0/4"), IPv6Network("fd00:fd00::/64"))
    key = ServiceKey("default", "redis")
    digest = hashlib.sha256(b"default/redis").digest()
    assert vip_range.candidate(key) == int(digest[:8].hex(), 16) % (2**28 - 2)


@given(st.text(max_size=30), st.text(max_size=30))
def test_candidate_is_in_range(mesh: str, service: str) -> None:
    vip_range = tiny_range()
    candidate = vip_range.candidate(ServiceKey(mesh, service))
    assert 0 <= candidate < vip_range.size


def test_next_offset_wraps() -> None:
    vip_range = tiny_range()
    assert vip_range.next_offset(0) == 1
    assert vip_range.next_offset(vip_range.size - 1) == 0


# -- VipAllocator.reconcile -------------------------------------------------------------


def test_first_allocation_takes_the_candidate() -> None:
    table = VipAllocator(tiny_range(), HOLD_DOWN)
    key = ServiceKey("default", "redis")
    delta = table.reconcile([key], now=0.0)
    candidate = expected_candidate(key, 6)
    assert delta.added == [Allocation(key, candidate, claim=1)]
    assert table.vip(key) == (
        IPv4Address(f"10.0.0.{candidate + 1}"),
        IPv6Address(f"fd00::{candidate + 1}"),
    )
    assert table.owner(candidate) == key


def test_vip_of_unknown_key_is_none() -> None:
    assert VipAllocator(tiny_range(), HOLD_DOWN).vip(ServiceKey("default", "nope")) is None


def test_vips_are_stable_while_keys_exist() -> None:
    table = VipAllocator(tiny_range(), HOLD_DOWN)
    a, b, c, d = (ServiceKey("default", name) for name in "abcd")
    table.reconcile([a, b], now=0.0)
    before = offsets(table)
    table.reconcile([a, b, c], now=1.0)
    table.reconcile([a, b, c, d], now=2.0)
    table.reconcile([b, a], now=3.0)
    table.reconcile([a, b, d], now=4.0)
    assert {k: offsets(table)[k] for k in (a, b)} == before


def test_same_vip_back_after_delete_and_recreate_within_hold_down() -> None:
    table = VipAllocator(tiny_range(), HOLD_DOWN)
    key = ServiceKey("default", "redis")
    table.reconcile([key], now=0.0)
    vip = table.vip(key)
    offset = table.allocations[key].offset
    delta = table.reconcile([], now=10.0)
    assert delta.removed == [Allocation(key, offset, claim=1)]
    assert delta.holds_added == [Hold(key, offset, 10.0 + HOLD_DOWN)]
    assert table.vip(key) is None
    delta = table.reconcile([key], now=20.0)
    assert table.vip(key) == vip
    assert delta.holds_dropped == [Hold(key, offset, 10.0 + HOLD_DOWN)]
    assert table.holds == {}


def test_same_vip_back_after_hold_down_expired() -> None:
    table = VipAllocator(tiny_range(), HOLD_DOWN)
    key = ServiceKey("default", "redis")
    table.reconcile([key], now=0.0)
    vip = table.vip(key)
    table.reconcile([], now=10.0)
    table.reconcile([], now=10.0 + HOLD_DOWN + 1)
    assert table.holds == {}
    table.reconcile([key], now=10.0 + 5 * HOLD_DOWN)
    assert table.vip(key) == vip


def test_same_vip_back_even_after_other_keys_were_added_meanwhile() -> None:
    table = VipAllocator(tiny_range(), HOLD_DOWN)
    key = ServiceKey("default", "redis")
    table.reconcile([key], now=0.0)
    vip = table.vip(key)
    table.reconcile([], now=1.0)
    # Three keys that want the same offset: the first would take it if it were free.
    others = keys_with_candidate(table.range, expected_candidate(key, 6), 3)
    table.reconcile(others, now=2.0)
    table.reconcile([*others, key], now=3.0)
    assert table.vip(key) == vip


def test_hold_down_keeps_freed_vip_from_another_key_until_until() -> None:
    vip_range = tiny_range()
    first, second, third = keys_with_candidate(vip_range, 2, 3)
    table = VipAllocator(vip_range, HOLD_DOWN)
    table.reconcile([first], now=100.0)
    assert table.allocations[first].offset == 2
    table.reconcile([], now=200.0)
    until = 200.0 + HOLD_DOWN
    assert table.holds[2] == Hold(first, 2, until)

    # Just before `until`, a key asking for offset 2 must probe past it.
    table.reconcile([second], now=until - 0.001)
    assert table.allocations[second].offset == 3
    assert table.owner(2) is None
    assert 2 in table.holds

    # At `until` the hold ends and offset 2 is free for another key.
    delta = table.reconcile([second, third], now=until)
    assert Hold(first, 2, until) in delta.holds_dropped
    assert table.allocations[third].offset == 2
    assert table.allocations[second].offset == 3


def test_hold_is_renewed_not_duplicated() -> None:
    table = VipAllocator(tiny_range(), HOLD_DOWN)
    key = ServiceKey("default", "redis")
    table.reconcile([key], now=0.0)
    table.reconcile([], now=1.0)
    table.reconcile([key], now=2.0)
    table.reconcile([], now=3.0)
    assert list(table.holds.values()) == [Hold(key, table.range.candidate(key), 3.0 + HOLD_DOWN)]


def test_collisions_probe_upwards() -> None:
    vip_range = tiny_range()
    keys = keys_with_candidate(vip_range, 3, 3)
    table = VipAllocator(vip_range, HOLD_DOWN)
    table.reconcile(keys, now=0.0)
    # New keys are placed in sorted order: the smallest takes the candidate.
    assert [table.allocations[k].offset for k in sorted(keys)] == [3, 4, 5]


def test_collisions_wrap_around() -> None:
    vip_range = tiny_range()
    keys = keys_with_candidate(vip_range, 5, 3)
    table = VipAllocator(vip_range, HOLD_DOWN)
    table.reconcile(keys, now=0.0)
    assert [table.allocations[k].offset for k in sorted(keys)] == [5, 0, 1]
    assert table.vip(sorted(keys)[1]) == (IPv4Address("10.0.0.1"), IPv6Address("fd00::1"))


def test_collision_probe_skips_holds_and_owners() -> None:
    vip_range = tiny_range()
    a, b, c = keys_with_candidate(vip_range, 4, 3)
    table = VipAllocator(vip_range, HOLD_DOWN)
    table.reconcile([a], now=0.0)
    table.reconcile([a, b], now=1.0)
    assert (table.allocations[a].offset, table.allocations[b].offset) == (4, 5)
    table.reconcile([b], now=2.0)  # offset 4 is held for a
    table.reconcile([b, c], now=3.0)
    assert table.allocations[c].offset == 0


def test_exhaustion_reports_keys_and_keeps_serving() -> None:
    vip_range = tiny_range()
    keys = [ServiceKey("default", f"s{i}") for i in range(8)]
    table = VipAllocator(vip_range, HOLD_DOWN)
    delta = table.reconcile(keys[:6], now=0.0)
    assert len(delta.added) == 6
    assert table.exhausted == set()
    served = offsets(table)
    version = table.version

    delta = table.reconcile(keys, now=1.0)
    assert table.exhausted == {keys[6], keys[7]}
    assert sorted(delta.exhausted) == sorted([keys[6], keys[7]])
    assert delta.added == []
    assert offsets(table) == served
    assert table.version == version
    assert sorted(set(offsets(table).values())) == list(range(6))


def test_held_offsets_count_towards_exhaustion_and_free_up_later() -> None:
    vip_range = tiny_range()
    keys = [ServiceKey("default", f"s{i}") for i in range(7)]
    table = VipAllocator(vip_range, HOLD_DOWN)
    table.reconcile(keys[:6], now=0.0)
    freed = table.allocations[keys[0]].offset
    table.reconcile(keys[1:7], now=10.0)
    assert table.exhausted == {keys[6]}
    assert table.vip(keys[6]) is None
    assert table.used == 6
    # Still exhausted just before the hold ends.
    table.reconcile(keys[1:7], now=10.0 + HOLD_DOWN - 1)
    assert table.exhausted == {keys[6]}
    # Once it ends, the waiting key takes the freed offset.
    delta = table.reconcile(keys[1:7], now=10.0 + HOLD_DOWN)
    assert table.exhausted == set()
    assert delta.added == [Allocation(keys[6], freed, claim=table.version)]


def test_exhausted_key_leaves_exhausted_when_no_longer_wanted() -> None:
    keys = [ServiceKey("default", f"s{i}") for i in range(7)]
    table = VipAllocator(tiny_range(), HOLD_DOWN)
    table.reconcile(keys, now=0.0)
    assert len(table.exhausted) == 1
    table.reconcile([k for k in keys if k not in table.exhausted], now=1.0)
    assert table.exhausted == set()


def test_returning_key_gets_its_hold_even_when_range_is_full() -> None:
    keys = [ServiceKey("default", f"s{i}") for i in range(7)]
    table = VipAllocator(tiny_range(), HOLD_DOWN)
    table.reconcile(keys[:6], now=0.0)
    offset = table.allocations[keys[0]].offset
    table.reconcile(keys[1:], now=1.0)
    assert keys[6] in table.exhausted
    table.reconcile(keys, now=2.0)
    assert table.allocations[keys[0]].offset == offset
    assert table.exhausted == {keys[6]}


def test_version_grows_only_on_change() -> None:
    table = VipAllocator(tiny_range(), HOLD_DOWN, version=41)
    a, b = ServiceKey("default", "a"), ServiceKey("default", "b")
    assert table.reconcile([], now=0.0).changed is False
    assert table.version == 41
    table.reconcile([a], now=1.0)
    assert table.version == 42
    table.reconcile([a], now=2.0)
    assert table.version == 42
    table.reconcile([a, b], now=3.0)
    assert table.version == 43
    table.reconcile([b], now=4.0)
    assert table.version == 44
    # Only the hold expires: the table itself is unchanged.
    delta = table.reconcile([b], now=4.0 + HOLD_DOWN)
    assert delta.holds_dropped and not delta.changed
    assert table.version == 44


def test_version_does_not_grow_on_exhaustion_alone() -> None:
    keys = [ServiceKey("default", f"s{i}") for i in range(7)]
    table = VipAllocator(tiny_range(), HOLD_DOWN)
    table.reconcile(keys[:6], now=0.0)
    version = table.version
    delta = table.reconcile(keys, now=1.0)
    assert delta.exhausted == [keys[6]]
    assert table.version == version


def test_one_reconcile_bumps_version_once() -> None:
    table = VipAllocator(tiny_range(), HOLD_DOWN)
    table.reconcile([ServiceKey("m", f"s{i}") for i in range(5)], now=0.0)
    assert table.version == 1


def test_determinism_regardless_of_input_order() -> None:
    vip_range = tiny_range()
    keys = [*keys_with_candidate(vip_range, 1, 3), *keys_with_candidate(vip_range, 5, 2)]
    forward = VipAllocator(vip_range, HOLD_DOWN)
    backward = VipAllocator(tiny_range(), HOLD_DOWN)
    forward.reconcile(keys, now=0.0)
    backward.reconcile(list(reversed(keys)), now=0.0)
    assert offsets(forward) == offsets(backward)
    assert forward.version == backward.version


@given(
    st.lists(
        st.builds(ServiceKey, st.sampled_from(["default", "m2"]), st.text("abc_", max_size=4)),
        max_size=10,
        unique=True,
    ),
    st.randoms(use_true_random=False),
)
def test_determinism_property(keys: list[ServiceKey], random) -> None:
    shuffled = list(keys)
    random.shuffle(shuffled)
    one, two = VipAllocator(tiny_range(), HOLD_DOWN), VipAllocator(tiny_range(), HOLD_DOWN)
    one.reconcile(keys, now=0.0)
    two.reconcile(iter(shuffled), now=0.0)
    assert offsets(one) == offsets(two)
    assert one.exhausted == two.exhausted


def test_table_rebuilt_from_rows_behaves_the_same() -> None:
    vip_range = tiny_range()
    keys = keys_with_candidate(vip_range, 2, 4)
    table = VipAllocator(vip_range, HOLD_DOWN)
    table.reconcile(keys, now=0.0)
    table.reconcile(keys[1:], now=1.0)
    copy = VipAllocator(
        vip_range, HOLD_DOWN, table.allocations.values(), table.holds.values(), table.version
    )
    assert offsets(copy) == offsets(table)
    assert copy.used == table.used
    newcomer = keys_with_candidate(vip_range, 2, 5)[4]
    table.reconcile([*keys[1:], newcomer], now=2.0)
    copy.reconcile([*keys[1:], newcomer], now=2.0)
    assert offsets(copy) == offsets(table)
    assert copy.version == table.version


def test_duplicate_offsets_refused_on_load() -> None:
    a, b = ServiceKey("default", "a"), ServiceKey("default", "b")
    with pytest.raises(ValueError, match="twice"):
        VipAllocator(tiny_range(), HOLD_DOWN, [Allocation(a, 1), Allocation(b, 1)])


# -- stateful property ---------------------------------------------------------------

KEY_POOL = [ServiceKey(mesh, f"s{i}") for mesh in ("default", "other") for i in range(5)]


class VipTableMachine(RuleBasedStateMachine):
    """Random add/delete sequences with advancing time on a 6-address range."""

    @initialize()
    def start(self) -> None:
        self.table = VipAllocator(tiny_range(), hold_down=100.0)
        self.now = 0.0
        self.wanted: set[ServiceKey] = set()
        self.previous: dict[ServiceKey, int] = {}
        self.version = 0
        #: offset -> (key, until): the holds the table should have.
        self.held: dict[int, tuple[ServiceKey, float]] = {}

    def _reconcile(self) -> None:
        before = offsets(self.table)
        delta = self.table.reconcile(sorted(self.wanted), now=self.now)
        after = offsets(self.table)
        # A key that still exists never changes VIP.
        for key, offset in before.items():
            if key in self.wanted:
                assert after[key] == offset, f"{key} moved from {offset} to {after[key]}"
        # Holds, modelled here rather than read from the table: a hold ends at `until`.
        self.held = {o: (k, until) for o, (k, until) in self.held.items() if until > self.now}
        for offset, (key, _until) in self.held.items():
            owner = self.table.owner(offset)
            # Nobody else takes a held offset; its key, if it came back, gets it again.
            assert owner is None or owner == key, f"{owner} took {offset}, held for {key}"
            if key in self.wanted:
                assert after[key] == offset
        self.held = {o: (k, u) for o, (k, u) in self.held.items() if k not in self.wanted}
        for key, offset in before.items():
            if key not in self.wanted:
                self.held = {o: (k, u) for o, (k, u) in self.held.items() if k != key}
                self.held[offset] = (key, self.now + self.table.hold_down)
        assert {o: (h.key, h.until) for o, h in self.table.holds.items()} == self.held
        assert [(a.key, a.offset) for a in sorted(delta.removed, key=lambda a: a.key)] == [
            (k, o) for k, o in sorted(before.items()) if k not in self.wanted
        ]
        # The version grows exactly when the table changed.
        if before != after:
            assert self.table.version == self.version + 1
        else:
            assert self.table.version == self.version
        self.version = self.table.version
        # Every wanted key has a VIP or is reported exhausted, and exhaustion
        # only happens when every offset is taken or held.
        assert set(after) == self.wanted - self.table.exhausted
        if self.table.exhausted:
            assert len(after) + len(self.held) == self.table.range.size

    @rule(key=st.sampled_from(KEY_POOL))
    def add(self, key: ServiceKey) -> None:
        self.wanted.add(key)
        self._reconcile()

    @precondition(lambda self: bool(self.wanted))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.wanted)))
        self.wanted.discard(key)
        self._reconcile()

    @rule(keys=st.sets(st.sampled_from(KEY_POOL)))
    def replace_all(self, keys: set[ServiceKey]) -> None:
        self.wanted = set(keys)
        self._reconcile()

    @rule(seconds=st.sampled_from([0.0, 1.0, 30.0, 99.999, 100.0, 250.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds
        self._reconcile()

    @invariant()
    def no_offset_owned_twice(self) -> None:
        owned = [allocation.offset for allocation in self.table.allocations.values()]
        assert len(owned) == len(set(owned))
        for key, allocation in self.table.allocations.items():
            assert allocation.key == key
            assert self.table.owner(allocation.offset) == key
            assert 0 <= allocation.offset < self.table.range.size

    @invariant()
    def no_offset_owned_and_held(self) -> None:
        owned = {allocation.offset for allocation in self.table.allocations.values()}
        assert owned.isdisjoint(self.table.holds)
        for offset, hold in self.table.holds.items():
            assert hold.offset == offset
            assert hold.key not in self.table.allocations

    @invariant()
    def used_counts_owned_and_held(self) -> None:
        assert self.table.used == len(self.table.allocations) + len(self.table.holds)
        assert self.table.used <= self.table.range.size


TestVipTableMachine = VipTableMachine.TestCase
TestVipTableMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
