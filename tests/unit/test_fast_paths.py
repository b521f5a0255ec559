"""The start-up's fast paths give what the paths they shortcut give, bad input included.

A zone's first load (100,000 services) goes through shortcuts: Dataplanes of the
usual shape validated in one pass, a compact encoder made once, the names of
every service put at once (L{NameIndex.fill}), the entries built anew in one
pass for a big change, keys sorted on their last field.  Each is held here to
the general path it stands for.
"""

from __future__ import annotations

import copy
import gc
import json
import sys
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kumazone.core import resources
from kumazone.core.bulk import (
    FREEZE_AT,
    bulk_load,
    release_free_memory,
    take_release,
    when_release_wanted,
)
from kumazone.core.config import DnsServerConfig
from kumazone.core.names import NameIndex, ServiceNames, assign_names, service_names
from kumazone.core.resources import Resource, ResourceError, parse_resource
from kumazone.core.sortedindex import SortedIndex, sorted_keys
from kumazone.core.vips import ServiceKey, VipRange
from kumazone.core.zone import VipEntry, Zone, ZoneChange
from kumazone.store.sqlite import SQLiteStore
from tests.builders import dataplane, dataplane_resource

# -- resources: the usual Dataplane's one pass --------------------------------------


def _full(document: object) -> Resource | ResourceError:
    """What the full checks make of a JSON document (the path the fast one shortcuts)."""
    try:
        return resources._parse_checked(document, None)
    except ResourceError as e:
        return e


def _parsed(document: object) -> Resource | ResourceError:
    try:
        return parse_resource(document, from_json=True)
    except ResourceError as e:
        return e


def _same(a: Resource | ResourceError, b: Resource | ResourceError) -> None:
    if isinstance(a, ResourceError) or isinstance(b, ResourceError):
        assert type(a) is type(b) and str(a) == str(b)
    else:
        assert a == b and type(a.key) is type(b.key) and a.mesh is b.mesh


#: Values put in place of one field of a valid Dataplane.
_ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 70000),
    st.floats(allow_nan=False),
    st.sampled_from(
        [
            "",
            "x",
            "10.0.0.1",
            "010.0.0.1",
            "10.0.0.1 ",
            "::1",
            "fd00::1:0",
            "host.example",
            "-bad",
            "a" * 64,
            "a" * 254,
            "web_v2",
            "web/v2",
            "wéb",
            "Dataplane",
            "DELEGATED",
        ]
    ),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from(["kuma.io/service", "", "version", "x"]), st.text(max_size=3)),
)
#: Where one field is changed, added or dropped (a path into the document).
_PLACES = st.sampled_from(
    [
        ("type",),
        ("name",),
        ("mesh",),
        ("labels",),
        ("labels", "team"),
        ("creationTime",),
        ("unknown",),
        ("networking",),
        ("networking", "address"),
        ("networking", "advertisedAddress"),
        ("networking", "inbound"),
        ("networking", "gateway"),
        ("networking", "outbound"),
        ("networking", "transparentProxying"),
        ("networking", "nonsense"),
        ("networking", "inbound", 0),
        ("networking", "inbound", 0, "port"),
        ("networking", "inbound", 0, "servicePort"),
        ("networking", "inbound", 0, "address"),
        ("networking", "inbound", 0, "serviceAddress"),
        ("networking", "inbound", 0, "tags"),
        ("networking", "inbound", 0, "tags", "kuma.io/service"),
        ("networking", "inbound", 0, "tags", "version"),
        ("networking", "inbound", 0, "tags", ""),
        ("networking", "inbound", 1),
        ("networking", "inbound", 1, "port"),
        ("networking", "inbound", 1, "tags", "kuma.io/service"),
    ]
)


def _changed(document: dict[str, Any], place: tuple[Any, ...], value: object, drop: bool) -> None:
    target: Any = document
    for step in place[:-1]:
        if isinstance(target, dict) and step in target:
            target = target[step]
        elif isinstance(target, list) and isinstance(step, int) and step < len(target):
            target = target[step]
        else:
            return
    last = place[-1]
    if isinstance(target, dict):
        if drop:
            target.pop(last, None)
        else:
            target[last] = value
    elif isinstance(target, list) and isinstance(last, int) and last < len(target):
        if drop:
            del target[last]
        else:
            target[last] = value


@settings(max_examples=600, deadline=None)
@given(
    st.lists(st.tuples(_PLACES, _ODD_VALUES, st.booleans()), max_size=3),
    st.integers(1, 3),
    st.booleans(),
)
def test_the_usual_dataplane_parses_as_every_rule_checked(changes, inbounds, labelled) -> None:
    document: dict[str, Any] = dataplane(
        "web-1", *[f"svc-{i}" for i in range(inbounds)], address="10.1.2.3"
    )
    if labelled:
        document["labels"] = {"team": "a"}
    for place, value, drop in changes:
        _changed(document, place, copy.deepcopy(value), drop)
    _same(_parsed(copy.deepcopy(document)), _full(copy.deepcopy(document)))
    # And as from YAML: what JSON cannot hold is refused first, then every rule.
    try:
        resources._check_json(resources._require_mapping(document, "(resource)"), "")
        expected = _full(copy.deepcopy(document))
    except ResourceError as e:
        expected = e
    try:
        from_yaml: Resource | ResourceError = parse_resource(copy.deepcopy(document))
    except ResourceError as e:
        from_yaml = e
    _same(from_yaml, expected)


def test_the_usual_dataplane_is_taken_by_the_fast_path() -> None:
    document = dataplane("web-1", "web", "api", "web", address="10.1.2.3")
    document["networking"]["inbound"][0]["servicePort"] = 8080
    document["networking"]["inbound"][1]["tags"]["version"] = "v1"
    fast = resources._usual_dataplane(document, None)
    assert fast is not None
    assert fast == resources._parse_checked(document, None)
    assert fast.services == ("web", "api")
    assert fast.address == "10.1.2.3"
    # Two inbounds of one service: that service, however it was parsed.
    document = dataplane("web-2", "web", "web", address="10.1.2.4")
    fast = resources._usual_dataplane(document, None)
    assert fast is not None and fast.services == ("web",)
    assert (
        fast
        == resources._parse_checked(document, None)
        == Resource(fast.key, fast.raw, ("web",), "10.1.2.4")
    )


@pytest.mark.parametrize(
    "document",
    [
        {"type": "Dataplane", "name": "x", "networking": {"address": "::1", "inbound": []}},
        dataplane("web-1", "web", address="fd00::1"),
        dataplane("web-1", "web", address="host.example"),
        {**dataplane("web-1", "web"), "mesh": "bad mesh"},
        {1: "x"},
    ],
)
def test_what_the_fast_path_leaves_goes_the_full_way(document: dict[Any, Any]) -> None:
    assert resources._usual_dataplane(document, None) is None
    _same(_parsed(document), _full(document))


def test_a_non_string_key_is_refused_as_before() -> None:
    document: dict[Any, Any] = dataplane("web-1", "web")
    document["networking"]["inbound"][0][7] = "x"
    assert resources._usual_dataplane(document, None) is None
    with pytest.raises(ResourceError, match=r"keys must be strings"):
        parse_resource(document, from_json=True)


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats()
        | st.text(alphabet='ab"\\\n\u00e9\u2028\U0001f600'),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.text(alphabet="ab\u00e9", max_size=3), inner, max_size=3)
        ),
        max_leaves=10,
    )
)
def test_the_compact_encoder_writes_what_json_dumps_writes(value: object) -> None:
    document = {"x": value}
    expected = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert resources._compact(document) == expected


def test_the_fast_constructor_makes_the_same_resource() -> None:
    # (The fast constructor takes what the resource keeps: one service as itself.)
    made = resources._resource(
        resources.ResourceKey("Dataplane", "default", "a"), b"{}", "s", "10.0.0.1"
    )
    assert made.services == ("s",)
    assert made == Resource(
        resources.ResourceKey("Dataplane", "default", "a"), b"{}", ("s",), "10.0.0.1"
    )
    assert hash(made) == hash(
        Resource(resources.ResourceKey("Dataplane", "default", "a"), b"{}", ("s",), "10.0.0.1")
    )


# -- names: every claimant at once ----------------------------------------------------

_SERVICES = ["a", "A", "a_b", "a.b", "A_B", "b", "s" * 64, "dns", "x_dns", "web", "Web", "c_d_e"]


def names_of(service: str) -> ServiceNames:
    return service_names(service, "mesh")


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.tuples(st.sampled_from(["default", "m2"]), st.sampled_from(_SERVICES)),
        st.integers(0, 3),
        max_size=20,
    ),
    st.lists(
        st.tuples(
            st.booleans(),
            st.tuples(st.sampled_from(["default", "m2"]), st.sampled_from(_SERVICES)),
            st.integers(0, 3),
        ),
        max_size=6,
    ),
)
def test_a_filled_index_is_the_index_of_every_put(claims, later) -> None:
    claimants = [(mesh, service, claim) for (mesh, service), claim in claims.items()]
    filled = NameIndex(names_of)
    assignments = list(filled.fill(claimants))
    one_by_one = NameIndex(names_of)
    for mesh, service, claim in claimants:
        one_by_one.put(mesh, service, claim)
    expected = assign_names(claimants, names_of)
    assert assignments == [expected[(m, s)] for m, s, _c in claimants]
    assert len(filled) == len(one_by_one) == len(claimants)
    # Then it goes on as the other would.
    for put, (mesh, service), claim in later:
        if put:
            assert filled.put(mesh, service, claim) == one_by_one.put(mesh, service, claim)
        else:
            assert filled.remove(mesh, service) == one_by_one.remove(mesh, service)
        for m, s in {(m, s) for m, s, _c in claimants} | {(mesh, service)}:
            assert ((m, s) in filled) == ((m, s) in one_by_one)
            if (m, s) in filled:
                assert filled.assigned(m, s) == one_by_one.assigned(m, s)


def test_fill_shares_the_names_it_worked_out() -> None:
    index = NameIndex(names_of)
    ((owned, problems),) = list(index.fill([("default", "web", 1)]))
    assert owned == ("web.mesh",) and problems == ()
    (held,) = index._claims["default"]
    assert held is owned[0]


def test_fill_needs_an_empty_index() -> None:
    index = NameIndex(names_of)
    index.put("default", "web", 1)
    with pytest.raises(ValueError):
        index.fill([("default", "api", 1)])


# -- keys sorted on their last field --------------------------------------------------


@given(
    st.lists(
        st.tuples(st.sampled_from(["default", "m2", "a"]), st.text(max_size=4)),
        max_size=30,
    )
)
def test_sorted_keys_sorts_as_sorted(keys: list[tuple[str, str]]) -> None:
    service_keys = [ServiceKey(*key) for key in keys]
    assert sorted_keys(service_keys) == sorted(service_keys)
    one_mesh = [ServiceKey("default", service) for _mesh, service in keys]
    assert sorted_keys(one_mesh) == sorted(one_mesh)
    assert sorted_keys(service for _mesh, service in keys) == sorted(s for _m, s in keys)


def test_a_sorted_index_iterates_its_values_in_key_order() -> None:
    index = SortedIndex([(ServiceKey("m", "b"), 2), (ServiceKey("m", "a"), 1)])
    assert list(index) == [1, 2]
    index.set(ServiceKey("m", "0"), 0)
    assert list(index) == [0, 1, 2]


_batches = st.lists(
    st.one_of(
        # Keys after every key held, in order (a table's rows), or not.
        st.tuples(st.just("after"), st.integers(0, 200), st.booleans()),
        st.lists(
            st.tuples(st.integers(0, 400), st.one_of(st.none(), st.integers(0, 9))),
            max_size=200,
        ),
    ),
    max_size=8,
)


@given(_batches)
def test_a_sorted_index_updated_in_batches_is_the_sorted_mapping(batches: list[Any]) -> None:
    index: SortedIndex[ServiceKey, int] = SortedIndex()
    model: dict[ServiceKey, int] = {}
    for batch in batches:
        if isinstance(batch, tuple):
            _after, count, in_order = batch
            last = max((int(k.service) for k in model), default=1000)
            changes: list[tuple[ServiceKey, int | None]] = [
                (ServiceKey("m", str(last + 1 + i)), i) for i in range(count)
            ]
            if not in_order:
                changes.reverse()
        else:
            changes = [(ServiceKey("m", str(1000 + n)), v) for n, v in batch]
        index.update(changes)
        for key, value in changes:
            if value is None:
                model.pop(key, None)
            else:
                model[key] = value
        assert list(index.keys()) == sorted(model)
        assert list(index) == [model[key] for key in sorted(model)]


# -- VIPs as text ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["240.0.0.1", "240.0.0.0", "255.255.255.255", "10.0.0.1", "240.000.0.1", "::1", "x", ""],
)
def test_the_offset_of_a_vip_text_is_the_offset_of_its_address(text: str) -> None:
    vip_range = VipRange(IPv4Network("240.0.0.0/4"), IPv6Network("fd00:fd00::/64"))
    try:
        expected: int | type[Exception] | None = vip_range.offset_of(IPv4Address(text))
    except ValueError as e:
        expected = type(e)
    try:
        got: int | type[Exception] | None = vip_range.offset_of_ipv4_text(text)
    except ValueError as e:
        got = type(e)
    assert got == expected


def test_vip_texts_are_the_addresses_as_text() -> None:
    for cidr, cidr6 in [("240.0.0.0/4", "fd00:fd00::/64"), ("10.0.0.0/31", "::/120")]:
        vip_range = VipRange(IPv4Network(cidr), IPv6Network(cidr6))
        for offset in range(min(vip_range.size, 300)):
            assert vip_range.ipv4_text(offset) == str(vip_range.ipv4(offset))
            assert vip_range.ipv6_text(offset) == str(vip_range.ipv6(offset))


def test_entries_of_ranges_made_one_after_another_spell_their_own_range() -> None:
    # An entry at an offset takes its range from its class, one for each range (by
    # the range object, more ranges than are kept): each spells its own range's VIPs.
    key, names = ServiceKey("default", "web"), ("web.mesh",)
    for i in range(100):
        cidr = IPv4Network(f"10.{i}.0.0/16")
        vip_range = VipRange(cidr, IPv6Network(f"fd00:{i}::/64"))
        entry = VipEntry.at(key, vip_range, 5, names, (), False, ())
        assert entry.vip == str(cidr[6]) and entry.vip6 == str(vip_range.ipv6(5))
        assert entry.vip6 == str(IPv6Network(f"fd00:{i}::/64")[6])
        assert entry.offset_in(vip_range) == 5 and not hasattr(entry, "__dict__")
        del vip_range, entry
        gc.collect()


def test_an_entry_at_an_offset_is_the_entry_of_its_texts() -> None:
    # A zone's entries hold an offset and the range; the API and the authority path
    # read the texts from them, and an entry given the texts equals one given the offset.
    vip_range = VipRange(IPv4Network("240.0.0.0/4"), IPv6Network("fd00:fd00::/64"))
    key, names = ServiceKey("default", "web"), ("web.mesh",)
    for offset in (0, 1, 255, 65_535, vip_range.size - 1):
        made = VipEntry.at(key, vip_range, offset, names, (), False, ("z",))
        vip, vip6 = str(vip_range.ipv4(offset)), str(vip_range.ipv6(offset))
        expected = VipEntry(key, vip, vip6, names, (), False, ("z",), offset)
        assert (made.vip, made.vip6) == (vip, vip6)
        assert made == expected and expected == made
        assert hash(made) == hash(expected) and repr(made) == repr(expected)
        assert made.offset_in(vip_range) == offset == expected.offset_in(vip_range)
        # Another range object of the same CIDRs is the same range.
        again = VipRange(IPv4Network("240.0.0.0/4"), IPv6Network("fd00:fd00::/64"))
        assert made == VipEntry.at(key, again, offset, names, (), False, ("z",))
    made = VipEntry.at(key, vip_range, 7, names, (), False, ("z",))
    for other in [
        VipEntry.at(key, vip_range, 8, names, (), False, ("z",)),
        VipEntry.at(key, vip_range, 7, ("other.mesh",), (), False, ("z",)),
        VipEntry.at(key, vip_range, 7, names, (), True, ("z",)),
        VipEntry.at(key, vip_range, 7, names, (), False, ("y",)),
        VipEntry.at(key, vip_range, 7, names, ("bad",), False, ("z",)),
        VipEntry.at(ServiceKey("other", "web"), vip_range, 7, names, (), False, ("z",)),
        VipEntry(key, "240.0.0.9", made.vip6, names, (), False, ("z",), 7),
        VipEntry(key, made.vip, "fd00:fd00::9", names, (), False, ("z",), 7),
        # The same offset of another range is other VIPs.
        VipEntry.at(
            key,
            VipRange(IPv4Network("10.0.0.0/8"), IPv6Network("fd00:fd00::/64")),
            7,
            names,
            (),
            False,
            ("z",),
        ),
        VipEntry.at(key, vip_range, 7, (), (), False, ("z",)),
        VipEntry.at(key, vip_range, 7, ("web.mesh", "web.x.mesh"), (), False, ("z",)),
    ]:
        assert made != other and other != made
    # None, one or several names: each entry gives them as a tuple, as made.
    for some in [(), ("web.mesh",), ("web_x.mesh", "web.x.mesh"), ("a.mesh", "b.mesh", "c")]:
        for entry in (
            VipEntry.at(key, vip_range, 7, some, (), False, ("z",)),
            VipEntry(key, made.vip, made.vip6, some, (), False, ("z",), 7),
        ):
            assert entry.names == some and type(entry.names) is tuple
            assert entry.replace(zones=("y",)).names == some
            assert entry == VipEntry.at(key, vip_range, 7, tuple(some), (), False, ("z",))
    with pytest.raises(AttributeError):
        made.offset = 9  # type: ignore[misc]
    with pytest.raises(AttributeError):
        made.names = ("other.mesh",)  # type: ignore[misc]
    # Another offset of a range's entry is the VIPs of that offset; new texts, no offset.
    moved = made.replace(offset=9)
    assert (moved.vip, moved.vip6, moved.offset) == (
        vip_range.ipv4_text(9),
        vip_range.ipv6_text(9),
        9,
    )
    texts = made.replace(vip="10.0.0.1")
    assert (texts.vip, texts.vip6, texts.offset) == ("10.0.0.1", made.vip6, -1)


# -- the zone: a big change builds its entries in one pass ----------------------------

_BIG_SERVICES = [f"svc-{i}" for i in range(40)] + ["a_b", "a.b", "Web", "web", "s" * 70, "x_dns"]


def _zone(tmp: Path, name: str, rebuild_at: int, warnings: list[str]) -> Zone:
    zone = Zone("zone-1", DnsServerConfig(), SQLiteStore(str(tmp / name)), warn=warnings.append)
    zone.rebuild_at = rebuild_at
    return zone


def _state(zone: Zone) -> tuple[Any, ...]:
    entries = zone.snapshot.entries
    return (
        list(entries),
        [zone._names.assigned(e.key.mesh, e.key.service) for e in entries],
        dict(zone.snapshot.mesh_of_address),
        zone.snapshot.version,
    )


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.lists(
            st.tuples(
                st.sampled_from(_BIG_SERVICES),
                st.sampled_from(["default", "m2"]),
                st.integers(0, 5),
            ),
            max_size=30,
        ),
        min_size=1,
        max_size=4,
    )
)
def test_a_rebuilt_change_is_the_incremental_one(tmp_path_factory, files) -> None:
    tmp = tmp_path_factory.mktemp("rebuild")
    told: dict[str, list[ZoneChange]] = {"fast": [], "slow": []}
    warned: dict[str, list[str]] = {"fast": [], "slow": []}
    fast = _zone(tmp, "fast.sqlite", 0, warned["fast"])
    slow = _zone(tmp, "slow.sqlite", 1 << 30, warned["slow"])
    fast.listeners.append(told["fast"].append)
    slow.listeners.append(told["slow"].append)
    for now, documents in enumerate(files):
        loaded = [
            dataplane_resource(f"dp-{index}", service, mesh=mesh, address=f"192.0.2.{address}")
            for index, (service, mesh, address) in enumerate(documents)
        ]
        for zone in (fast, slow):
            zone.set_file("/r/a.yaml", loaded, float(now))
        assert _state(fast) == _state(slow)
    # The same warnings (the incremental path gives them in no particular order).
    assert sorted(warned["fast"]) == sorted(warned["slow"])
    assert len(told["fast"]) == len(told["slow"])
    for a, b in zip(told["fast"], told["slow"], strict=True):
        assert sorted(a.added, key=lambda e: e.key) == sorted(b.added, key=lambda e: e.key)
        assert sorted(a.removed, key=lambda e: e.key) == sorted(b.removed, key=lambda e: e.key)
        assert (a.addresses, a.services_added, a.services_removed, a.full) == (
            b.addresses,
            b.services_added,
            b.services_removed,
            b.full,
        )


def test_a_first_load_of_many_services_is_one_change(tmp_path: Path) -> None:
    warnings: list[str] = []
    zone = _zone(tmp_path, "z.sqlite", Zone.rebuild_at, warnings)
    changes: list[ZoneChange] = []
    zone.listeners.append(changes.append)
    count = Zone.rebuild_at + 10
    zone.set_file(
        "/r/a.json",
        [
            dataplane_resource(f"dp-{i}", f"svc-{i}", address=f"10.0.{i // 256}.{i % 256}")
            for i in range(count)
        ],
        0.0,
    )
    (change,) = changes
    assert not change.full and change.removed == ()
    assert [e.key for e in change.added] == sorted(
        ServiceKey("default", f"svc-{i}") for i in range(count)
    )
    assert list(zone.snapshot.entries) == list(change.added)
    # The same zone again, from its store: the same entries.
    again = Zone("zone-1", DnsServerConfig(), SQLiteStore(str(tmp_path / "z.sqlite")))
    assert [(e.key, e.vip, e.names) for e in again.snapshot.entries] == [
        (e.key, e.vip, e.names) for e in zone.snapshot.entries
    ]


def test_address_uses_count_one_dataplane_as_its_mesh(tmp_path: Path) -> None:
    zone = _zone(tmp_path, "z.sqlite", Zone.rebuild_at, [])
    one = dataplane_resource("dp-1", "web", address="192.0.2.1")
    two = dataplane_resource("dp-2", "api", address="192.0.2.1")
    other = dataplane_resource("dp-3", "db", mesh="m2", address="192.0.2.1")
    zone.set_file("/r/a.yaml", [one], 0.0)
    assert zone.snapshot.mesh_of_address == {"192.0.2.1": "default"}
    zone.set_file("/r/a.yaml", [one, two], 1.0)
    assert zone.snapshot.mesh_of_address == {"192.0.2.1": "default"}
    zone.set_file("/r/a.yaml", [one, two, other], 2.0)
    assert zone.snapshot.mesh_of_address == {}
    zone.set_file("/r/a.yaml", [two], 3.0)
    assert zone.snapshot.mesh_of_address == {"192.0.2.1": "default"}
    zone.set_file("/r/a.yaml", [], 4.0)
    assert zone.snapshot.mesh_of_address == {}


# -- the collector during a bulk load -------------------------------------------------


def test_bulk_load_pauses_the_collector_and_leaves_it_as_it_was() -> None:
    assert gc.isenabled()
    try:
        with bulk_load():
            assert not gc.isenabled()
            with bulk_load():
                assert not gc.isenabled()
            assert not gc.isenabled()
        assert gc.isenabled()
        gc.disable()
        with bulk_load():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_bulk_load_freezes_what_a_big_load_made() -> None:
    frozen = gc.get_freeze_count()
    try:
        with bulk_load():
            kept = [[i] for i in range(FREEZE_AT + 10)]
        after_big = gc.get_freeze_count()
        assert after_big >= frozen + FREEZE_AT
        with bulk_load():
            small = [[i] for i in range(10)]
        assert gc.get_freeze_count() == after_big
        del kept, small
    finally:
        gc.unfreeze()


def test_a_big_bulk_load_asks_once_for_its_free_memory_to_be_given_back() -> None:
    take_release()
    asked: list[bool] = []
    when_release_wanted(lambda: asked.append(True))
    try:
        with bulk_load():
            small = [[i] for i in range(10)]
        assert not take_release()
        assert asked == []
        with bulk_load():
            kept = [[i] for i in range(FREEZE_AT + 10)]
        assert asked == [True]  # the service is told at once
        assert take_release()
        assert not take_release()  # once
        del kept, small
    finally:
        when_release_wanted(None)
        gc.unfreeze()


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def test_free_memory_left_inside_the_c_heap_goes_back_to_the_system() -> None:
    # Blocks of 8,000 octets come from the C heap (not Python's small-object
    # arenas, not mmap); one kept after them keeps free() from trimming the top.
    blocks = [bytes(8000) + bytes([i % 256]) for i in range(10_000)]
    keeper = bytes(8000) + b"k"
    del blocks
    before = _rss_kib()
    assert release_free_memory()  # glibc (Debian): malloc_trim is there
    assert before - _rss_kib() > 40_000  # of the 80 MB freed, most gone from RSS
    del keeper


def test_a_claim_changed_keeps_the_names_and_grows_no_map() -> None:
    """A provisional VIP confirmed changes a claimant's claim: alone on its names, it
    keeps them, no one else's changes, and the map of names keeps its size."""
    index = NameIndex(lambda service: service_names(service, "mesh"))
    for i in range(3000):
        index.put("default", f"s{i}", 0)
    index.put("default", "redis", 1)
    index.put("default", "Redis", 2)  # shares redis.mesh: the least claim keeps it
    size = sys.getsizeof(index._claims["default"])
    for claim in (5, 6, 7):
        for i in range(3000):
            assert index.put("default", f"s{i}", claim) == set()
            assert index.assigned("default", f"s{i}") == ((f"s{i}.mesh",), ())
    assert sys.getsizeof(index._claims["default"]) == size
    # A contested name still goes by the claims.
    assert index.put("default", "Redis", 0) == {("default", "redis"), ("default", "Redis")}
    assert index.assigned("default", "Redis")[0] == ("redis.mesh",)
