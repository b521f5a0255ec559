"""Tests for kumazone.core.names: service names to DNS names."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kumazone.core.names import (
    MAX_LABEL_OCTETS,
    MAX_NAME_OCTETS,
    ServiceNames,
    name_problem,
    nameserver_name,
    service_names,
)

# -- service_names -------------------------------------------------------------


def test_both_forms_underscore_form_first() -> None:
    result = service_names("echo-server_echo-example_svc_1010", "mesh")
    assert result == ServiceNames(
        names=("echo-server_echo-example_svc_1010.mesh", "echo-server.echo-example.svc.1010.mesh"),
        problems=(),
    )


def test_single_underscore_gives_two_names() -> None:
    assert service_names("a_b", "mesh").names == ("a_b.mesh", "a.b.mesh")


def test_no_underscore_gives_one_name() -> None:
    result = service_names("redis", "mesh")
    assert result.names == ("redis.mesh",)
    assert result.problems == ()


def test_names_are_lower_cased() -> None:
    result = service_names("Echo_Server", "Mesh")
    assert result.names == ("echo_server.mesh", "echo.server.mesh")


def test_lower_casing_does_not_duplicate() -> None:
    result = service_names("REDIS", "mesh")
    assert result.names == ("redis.mesh",)
    assert len(set(result.names)) == len(result.names)


def test_domain_with_several_labels() -> None:
    assert service_names("web_v2", "mesh.example").names == (
        "web_v2.mesh.example",
        "web.v2.mesh.example",
    )


def test_label_of_63_octets_is_allowed() -> None:
    service = "a" * MAX_LABEL_OCTETS
    assert service_names(service, "mesh").names == (f"{service}.mesh",)


def test_label_over_63_octets_is_dropped_with_reason() -> None:
    service = "a" * (MAX_LABEL_OCTETS + 1)
    result = service_names(service, "mesh")
    assert result.names == ()
    assert len(result.problems) == 1
    assert "64" in result.problems[0]
    assert "63" in result.problems[0]


def test_long_label_only_in_underscore_form() -> None:
    # 40 + 1 + 40 octets: the underscore form has one 81-octet label, the dotted
    # form two labels of 40.
    service = "a" * 40 + "_" + "b" * 40
    result = service_names(service, "mesh")
    assert result.names == ("a" * 40 + "." + "b" * 40 + ".mesh",)
    assert len(result.problems) == 1
    assert repr(f"{service}.mesh") in result.problems[0]
    assert "label" in result.problems[0]


def _service_of_wire_length(total: int, domain: str = "mesh") -> str:
    """A dotted service name whose full name is C{total} octets on the wire."""
    # wire length = sum(len(label) + 1) + 1 (root); domain "mesh" costs 5.
    remaining = total - 1 - (len(domain) + 1)
    labels = []
    while remaining > 0:
        size = min(MAX_LABEL_OCTETS, remaining - 1)
        labels.append("x" * size)
        remaining -= size + 1
    assert remaining == 0
    return ".".join(labels)


def test_name_of_255_octets_is_allowed() -> None:
    service = _service_of_wire_length(MAX_NAME_OCTETS)
    result = service_names(service, "mesh")
    assert result.names == (f"{service}.mesh",)
    assert result.problems == ()


def test_name_over_255_octets_is_dropped_with_reason() -> None:
    service = _service_of_wire_length(MAX_NAME_OCTETS + 1)
    result = service_names(service, "mesh")
    assert result.names == ()
    assert len(result.problems) == 1
    assert "256" in result.problems[0]
    assert "255" in result.problems[0]


@pytest.mark.parametrize("service", ["web server", "web/api", "wéb", "web*", "web\n", "a:b"])
def test_bad_characters_are_dropped_with_reason(service: str) -> None:
    result = service_names(service, "mesh")
    assert result.names == ()
    assert len(result.problems) == 1
    assert "not allowed" in result.problems[0]


def test_bad_character_is_named_in_reason() -> None:
    (problem,) = service_names("web/api", "mesh").problems
    assert "'/'" in problem


def test_double_underscore_keeps_underscore_form_only() -> None:
    result = service_names("a__b", "mesh")
    assert result.names == ("a__b.mesh",)
    assert len(result.problems) == 1
    assert "'a..b.mesh'" in result.problems[0]
    assert "empty label" in result.problems[0]


@pytest.mark.parametrize("service", ["_a", "a_"])
def test_leading_or_trailing_underscore_dotted_form_dropped(service: str) -> None:
    result = service_names(service, "mesh")
    assert result.names == (f"{service}.mesh",)
    assert len(result.problems) == 1
    assert "empty label" in result.problems[0]


def test_empty_label_in_service_itself() -> None:
    result = service_names("a..b", "mesh")
    assert result.names == ()
    assert "empty label" in result.problems[0]


@pytest.mark.parametrize("service", ["dns", "DNS", "x.dns", "ns.dns", "a.b.dns"])
def test_reserved_nameserver_subtree(service: str) -> None:
    result = service_names(service, "mesh")
    assert result.names == ()
    assert len(result.problems) == 1
    assert "dns.mesh" in result.problems[0]
    assert "reserved" in result.problems[0]


def test_reserved_only_in_dotted_form() -> None:
    result = service_names("ns_dns", "mesh")
    assert result.names == ("ns_dns.mesh",)
    assert len(result.problems) == 1
    assert "reserved" in result.problems[0]


@pytest.mark.parametrize("service", ["dnsx", "xdns", "dns-server", "dns_", "my-dns"])
def test_names_near_the_reserved_subtree_are_allowed(service: str) -> None:
    assert f"{service}.mesh" in service_names(service, "mesh").names


def test_nameserver_name_is_in_the_reserved_subtree() -> None:
    assert nameserver_name("mesh") == "ns.dns.mesh"
    assert name_problem(nameserver_name("mesh")) is None


# -- name_problem ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["a", "redis.mesh", "a_b.mesh", "A-B.c-d.mesh", "0.1.2", "x" * 63 + ".mesh"],
)
def test_name_problem_accepts_valid_names(name: str) -> None:
    assert name_problem(name) is None


@pytest.mark.parametrize(
    ("name", "word"),
    [
        ("", "not allowed"),
        ("a b", "not allowed"),
        ("a..b", "empty label"),
        (".a", "empty label"),
        ("a.", "empty label"),
        ("x" * 64 + ".mesh", "label"),
        (_service_of_wire_length(256) + ".mesh", "256"),
        ("café.mesh", "not allowed"),
    ],
)
def test_name_problem_rejects(name: str, word: str) -> None:
    problem = name_problem(name)
    assert problem is not None
    assert word in problem


def test_name_problem_wire_length_boundary() -> None:
    name_255 = _service_of_wire_length(MAX_NAME_OCTETS) + ".mesh"
    name_256 = _service_of_wire_length(MAX_NAME_OCTETS + 1) + ".mesh"
    assert name_problem(name_255) is None
    assert name_problem(name_256) is not None


# -- properties ----------------------------------------------------------------------

_service_text = st.text(
    alphabet=st.sampled_from("abcXYZ019_.-/ é"), min_size=0, max_size=80
) | st.text(max_size=300)
_domains = st.sampled_from(["mesh", "MESH", "mesh.example", "svc.cluster.local"])


@given(_service_text, _domains)
def test_every_returned_name_is_valid_and_in_the_domain(service: str, domain: str) -> None:
    result = service_names(service, domain)
    for name in result.names:
        assert name_problem(name) is None
        assert name.endswith("." + domain.lower())
        assert name == name.lower()
        assert not name.endswith(".dns." + domain.lower())
    assert len(set(result.names)) == len(result.names)


@given(_service_text, _domains)
def test_every_form_is_either_named_or_explained(service: str, domain: str) -> None:
    result = service_names(service, domain)
    forms = 2 if "_" in service else 1
    assert len(result.names) + len(result.problems) == forms


# At most 5 x 11 + 4 = 59 characters: every label and the whole name fit.
@given(st.from_regex(r"\A[a-z0-9][a-z0-9-]{0,10}(_[a-z0-9][a-z0-9-]{0,10}){0,4}\Z"))
def test_well_formed_services_get_every_form(service: str) -> None:
    result = service_names(service, "mesh")
    expected = [f"{service}.mesh"]
    if "_" in service:
        expected.append(service.replace("_", ".") + ".mesh")
    expected = [name for name in expected if name != "dns.mesh" and not name.endswith(".dns.mesh")]
    assert list(result.names) == expected


def assigned(*claimants: tuple[str, str, int]) -> dict[tuple[str, str], tuple[Any, Any]]:
    from kumazone.core.names import assign_names, service_names

    return assign_names(claimants, lambda service: service_names(service, "mesh"))


def test_each_name_has_one_owner_per_mesh() -> None:
    names = assigned(("default", "a.b", 1), ("default", "a_b", 2), ("payments", "a_b", 3))
    assert names[("default", "a.b")] == (("a.b.mesh",), ())
    assert names[("default", "a_b")] == (
        ("a_b.mesh",),
        ("a.b.mesh is service a.b's name in this mesh",),
    )
    assert names[("payments", "a_b")] == (("a_b.mesh", "a.b.mesh"), ())


def test_the_earliest_claim_holds_a_name_whatever_the_sort_order() -> None:
    # redis came first: Redis (which sorts before it) gets no name.
    names = assigned(("default", "Redis", 5), ("default", "redis", 2))
    assert names[("default", "redis")] == (("redis.mesh",), ())
    assert names[("default", "Redis")] == ((), ("redis.mesh is service redis's name in this mesh",))
    # a_b came first: a.b does not take its dotted name.
    names = assigned(("default", "a.b", 9), ("default", "a_b", 4))
    assert names[("default", "a_b")] == (("a_b.mesh", "a.b.mesh"), ())
    assert names[("default", "a.b")][0] == ()


def test_when_the_holder_goes_the_next_claimant_takes_the_name() -> None:
    names = assigned(("default", "WEB", 7), ("default", "Web", 3))
    assert names[("default", "Web")][0] == ("web.mesh",)
    assert names[("default", "WEB")][0] == ()


def test_equal_claims_go_by_service_name() -> None:
    names = assigned(("default", "redis", 0), ("default", "Redis", 0))
    assert names[("default", "Redis")][0] == ("redis.mesh",)


def test_the_owner_does_not_depend_on_the_order_of_the_claimants() -> None:
    claimants = [("default", s, c) for s, c in (("x_y", 4), ("X.y", 2), ("x.y", 9), ("X_Y", 2))]
    first = assigned(*claimants)
    assert assigned(*reversed(claimants)) == first
    assert first[("default", "X.y")][0] == ("x.y.mesh",)


@settings(max_examples=300)
@given(
    st.text(alphabet="ab_-.9Z/ ", max_size=260)
    | st.builds(lambda n, k: ".".join(["a" * k] * n), st.integers(1, 9), st.integers(1, 70))
)
def test_name_problem_fast_path_agrees_with_the_full_check(name: str) -> None:
    labels = name.split(".")
    fine = (
        all(c.isascii() and (c.isalnum() or c in "_-.") for c in name)
        and all(0 < len(label) <= 63 for label in labels)
        and len(name) + 2 <= 255
    )
    assert (name_problem(name) is None) == fine


# -- NameIndex: assign_names kept incrementally ------------------------------------

_CLAIMANTS = st.tuples(
    st.sampled_from(["default", "m2"]),
    st.sampled_from(["a", "A", "a_b", "a.b", "A_B", "b", "s" * 64, "dns", "x_dns"]),
)


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(st.booleans(), _CLAIMANTS, st.integers(0, 3)),
        max_size=30,
    )
)
def test_name_index_equals_assign_names_after_any_changes(ops) -> None:
    from kumazone.core.names import NameIndex, assign_names, service_names

    def names_of(service: str) -> ServiceNames:
        return service_names(service, "mesh")

    index = NameIndex(names_of)
    claims: dict[tuple[str, str], int] = {}
    for put, (mesh, service), claim in ops:
        before = {c: index.assigned(*c) for c in claims}
        if put:
            changed = index.put(mesh, service, claim)
            claims[(mesh, service)] = claim
        else:
            changed = index.remove(mesh, service)
            claims.pop((mesh, service), None)
        expected = assign_names(((m, s, c) for (m, s), c in claims.items()), names_of)
        assert {c: index.assigned(*c) for c in claims} == expected
        assert len(index) == len(claims)
        # What it says changed is every claimant whose assignment changed (and
        # the one added or removed).
        moved = {c for c in claims if before.get(c) != expected[c]}
        moved |= {c for c in before if c not in claims}
        assert moved <= changed


@settings(max_examples=300)
@given(
    st.lists(
        st.lists(st.tuples(st.booleans(), _CLAIMANTS, st.integers(0, 3)), max_size=6),
        max_size=8,
    ),
    st.randoms(use_true_random=False),
)
def test_name_index_over_the_callers_claims_equals_assign_names(batches, random) -> None:
    # As a zone keeps it: the claims are the table's (one map less), a batch of
    # changes is made to the table first, then told to the index in any order.
    from kumazone.core.names import NameIndex, assign_names, service_names
    from kumazone.core.vips import PROVISIONAL_CLAIM

    def names_of(service: str) -> ServiceNames:
        return service_names(service, "mesh")

    claims: dict[tuple[str, str], int] = {}
    index = NameIndex(
        names_of, lambda mesh, service: claims.get((mesh, service), PROVISIONAL_CLAIM)
    )
    for batch in batches:
        before = {c: index.assigned(*c) for c in claims}
        told: dict[tuple[str, str], int | None] = {}
        for put, claimant, claim in batch:
            if put:
                claims[claimant] = told[claimant] = claim
            else:
                claims.pop(claimant, None)
                told[claimant] = None
        order = list(told.items())
        random.shuffle(order)
        changed: set[tuple[str, str]] = set()
        for (mesh, service), claim in order:
            if claim is None:
                changed |= index.remove(mesh, service)
            else:
                changed |= index.put(mesh, service, claim)
        expected = assign_names(((m, s, c) for (m, s), c in claims.items()), names_of)
        assert {c: index.assigned(*c) for c in claims} == expected
        assert len(index) == len(claims)
        assert all(c in index for c in claims) and not any(
            c in index for c in before if c not in claims
        )
        moved = {c for c in claims if before.get(c) != expected[c]}
        moved |= {c for c in before if c not in claims}
        assert moved <= changed
    filled = NameIndex(names_of, lambda mesh, service: claims[(mesh, service)])
    got = list(filled.fill([(m, s, c) for (m, s), c in claims.items()]))
    expected = assign_names(((m, s, c) for (m, s), c in claims.items()), names_of)
    assert got == [expected[c] for c in claims]


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet="abcXYZ019-_.é ", min_size=1, max_size=70)
    | st.sampled_from(["dns", "DNS", "a" * 63, "a" * 64, "x" * 250]),
    st.sampled_from(["mesh", "Mesh", "a.b", "x" * 190, "dns.mesh"]),
)
def test_the_fast_path_of_service_names_agrees_with_every_rule(service: str, domain: str) -> None:
    from kumazone.core.names import _service_names

    assert service_names(service, domain) == _service_names(service, domain)


@pytest.mark.parametrize(
    ("service", "names", "forms"),
    [
        ("web", ("web.mesh",), 1),
        ("Web", ("web.mesh",), 1),
        ("a_b", ("a_b.mesh", "a.b.mesh"), 3),
        ("a_b", ("a.b.mesh",), 2),
        ("a_b", (), 0),
    ],
)
def test_name_forms_round_trip(service, names, forms):
    from kumazone.core.names import name_forms, names_from_forms

    assert name_forms(service, "mesh", names) == forms
    assert names_from_forms(service, "mesh", forms) == names
