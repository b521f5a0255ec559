"""Tests for kumazone.core.resources: parsing and validating Kuma Universal resources."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kumazone.core.resources import (
    DATAPLANE,
    EXTERNAL_SERVICE,
    MESH,
    Resource,
    ResourceError,
    ResourceKey,
    pack_document,
    parse_documents,
    parse_resource,
    parse_stored,
    unpack_document,
)
from tests.builders import as_yaml, dataplane, external_service, gateway


def assert_field(document: object, field: str) -> ResourceError:
    with pytest.raises(ResourceError) as info:
        parse_resource(document)
    assert info.value.field == field, str(info.value)
    assert str(info.value).startswith(f"{field}: ")
    assert info.value.message
    return info.value


# -- valid resources -----------------------------------------------------------------


def test_valid_dataplane() -> None:
    document = dataplane("redis-1", "redis", address="192.0.2.10")
    resource = parse_resource(document)
    assert resource.key == ResourceKey(DATAPLANE, "default", "redis-1")
    assert (resource.type, resource.mesh, resource.name) == (DATAPLANE, "default", "redis-1")
    assert resource.services == ("redis",)
    assert resource.address == "192.0.2.10"
    assert resource.document == document


def test_dataplane_with_several_inbounds_lists_each_service_once() -> None:
    document = dataplane("redis-1", "redis")
    document["networking"]["inbound"] = [
        {"port": 80, "tags": {"kuma.io/service": "web", "version": "v1"}},
        {"port": 81, "servicePort": 8081, "tags": {"kuma.io/service": "admin"}},
        {"port": 82, "tags": {"kuma.io/service": "web"}},
    ]
    assert parse_resource(document).services == ("web", "admin")


def test_dataplane_mesh_defaults_to_default() -> None:
    document = dataplane("redis-1", "redis")
    del document["mesh"]
    assert parse_resource(document).key == ResourceKey(DATAPLANE, "default", "redis-1")


def test_dataplane_with_hostname_address_has_no_ip() -> None:
    document = dataplane("redis-1", "redis")
    document["networking"]["address"] = "redis.internal"
    resource = parse_resource(document)
    assert resource.address is None
    assert resource.services == ("redis",)


def test_dataplane_with_ipv6_address() -> None:
    document = dataplane("redis-1", "redis")
    document["networking"]["address"] = "2001:db8::10"
    assert parse_resource(document).address == "2001:db8::10"


def test_dataplane_accepts_known_kuma_fields() -> None:
    document = {
        **dataplane("redis-1", "redis"),
        "labels": {"team": "a"},
        "creationTime": "2024-01-01T00:00:00Z",
        "modificationTime": "2024-01-01T00:00:00Z",
        "metrics": {"type": "prometheus"},
        "probes": {"port": 9000},
    }
    document["networking"]["advertisedAddress"] = "198.51.100.1"
    document["networking"]["outbound"] = [{"port": 10001, "tags": {"kuma.io/service": "x"}}]
    document["networking"]["transparentProxying"] = {"redirectPortInbound": 15006}
    document["networking"]["admin"] = {"port": 9901}
    assert parse_resource(document).services == ("redis",)


def test_valid_gateway_dataplane() -> None:
    resource = parse_resource(gateway("edge-gw", "edge-gateway"))
    assert resource.key == ResourceKey(DATAPLANE, "default", "edge-gw")
    assert resource.services == ("edge-gateway",)
    assert resource.address == "192.0.2.20"


def test_gateway_type_defaults_to_delegated() -> None:
    document = gateway("edge-gw", "edge-gateway")
    del document["networking"]["gateway"]["type"]
    assert parse_resource(document).services == ("edge-gateway",)


def test_valid_external_service() -> None:
    resource = parse_resource(external_service("httpbin"))
    assert resource.key == ResourceKey(EXTERNAL_SERVICE, "default", "httpbin")
    assert resource.services == ()
    assert resource.address is None


@pytest.mark.parametrize(
    "address", ["httpbin.org:443", "192.0.2.1:80", "[2001:db8::1]:443", "a:1", "h.org:65535"]
)
def test_external_service_addresses(address: str) -> None:
    document = external_service("httpbin")
    document["networking"] = {"address": address, "tls": {"enabled": True}}
    assert parse_resource(document).type == EXTERNAL_SERVICE


def test_valid_mesh() -> None:
    resource = parse_resource(
        {"type": "Mesh", "name": "default", "mtls": {"enabledBackend": "ca-1"}}
    )
    assert resource.key == ResourceKey(MESH, "", "default")
    assert resource.services == ()
    assert str(resource.key) == "Mesh default"


def test_resource_key_str() -> None:
    assert str(ResourceKey(DATAPLANE, "default", "redis-1")) == "Dataplane default/redis-1"


# -- invalid resources: the field named ------------------------------------------------


def _inbound(**values: Any) -> dict[str, Any]:
    document = dataplane("redis-1", "redis")
    inbound = document["networking"]["inbound"][0]
    for key, value in values.items():
        if value is _DELETE:
            del inbound[key]
        else:
            inbound[key] = value
    return document


_DELETE = object()


@pytest.mark.parametrize("port", [0, -1, 65536, 70000, "6379", 6379.0, True, None, [6379]])
def test_bad_inbound_port(port: object) -> None:
    assert_field(_inbound(port=port), "networking.inbound[0].port")


def test_missing_inbound_port() -> None:
    assert_field(_inbound(port=_DELETE), "networking.inbound[0].port")


def test_bad_inbound_port_in_second_inbound() -> None:
    document = dataplane("redis-1", "redis")
    document["networking"]["inbound"].append({"port": 99999, "tags": {"kuma.io/service": "b"}})
    assert_field(document, "networking.inbound[1].port")


def test_bad_service_port() -> None:
    assert_field(_inbound(servicePort=0), "networking.inbound[0].servicePort")


def test_missing_service_tag() -> None:
    error = assert_field(
        _inbound(tags={"version": "v1"}), 'networking.inbound[0].tags["kuma.io/service"]'
    )
    assert "required" in error.message


@pytest.mark.parametrize("value", ["", "red is", "redis!", "rédis", 5, None, ["redis"]])
def test_bad_service_tag_value(value: object) -> None:
    assert_field(
        _inbound(tags={"kuma.io/service": value}), 'networking.inbound[0].tags["kuma.io/service"]'
    )


def test_bad_other_tag_value() -> None:
    assert_field(
        _inbound(tags={"kuma.io/service": "redis", "version": "v 1"}),
        'networking.inbound[0].tags["version"]',
    )


def test_empty_tag_name() -> None:
    assert_field(_inbound(tags={"kuma.io/service": "redis", "": "x"}), "networking.inbound[0].tags")


@pytest.mark.parametrize("tags", [None, [], "kuma.io/service=redis"])
def test_tags_not_a_mapping(tags: object) -> None:
    assert_field(_inbound(tags=tags), "networking.inbound[0].tags")


def test_missing_tags() -> None:
    assert_field(_inbound(tags=_DELETE), "networking.inbound[0].tags")


@pytest.mark.parametrize("inbound", [None, "redis", 6379, []])
def test_inbound_entry_not_a_mapping(inbound: object) -> None:
    document = dataplane("redis-1", "redis")
    document["networking"]["inbound"] = [inbound]
    assert_field(document, "networking.inbound[0]")


def test_bad_inbound_address() -> None:
    assert_field(_inbound(address="not an address"), "networking.inbound[0].address")


def test_inbound_not_a_list() -> None:
    document = dataplane("redis-1", "redis")
    document["networking"]["inbound"] = {"port": 1}
    assert_field(document, "networking.inbound")


def test_no_inbound_and_no_gateway() -> None:
    document = dataplane("redis-1", "redis")
    document["networking"]["inbound"] = []
    assert_field(document, "networking")


@pytest.mark.parametrize(
    "address", ["", "not an address", "-bad.example", "bad.example-", "a_b", "1.2.3.4:80", 5, None]
)
def test_bad_networking_address(address: object) -> None:
    document = dataplane("redis-1", "redis")
    document["networking"]["address"] = address
    assert_field(document, "networking.address")


def test_missing_networking_address() -> None:
    document = dataplane("redis-1", "redis")
    del document["networking"]["address"]
    assert_field(document, "networking.address")


def test_address_longer_than_253_is_refused() -> None:
    document = dataplane("redis-1", "redis")
    document["networking"]["address"] = ".".join(["a" * 50] * 6)  # 305 characters
    assert_field(document, "networking.address")


@pytest.mark.parametrize("networking", [None, [], "192.0.2.1"])
def test_networking_not_a_mapping(networking: object) -> None:
    assert_field({**dataplane("redis-1", "redis"), "networking": networking}, "networking")


def test_unknown_networking_field() -> None:
    document = dataplane("redis-1", "redis")
    document["networking"]["adress"] = "192.0.2.1"
    assert_field(document, "networking.adress")


@pytest.mark.parametrize("kind", [None, "dataplane", "Service", "", 5, "Dataplanes"])
def test_bad_type(kind: object) -> None:
    error = assert_field({**dataplane("redis-1", "redis"), "type": kind}, "type")
    assert "Dataplane" in error.message


@pytest.mark.parametrize("kind", [[], {}, ["Dataplane"], {"Dataplane": 1}])
def test_unhashable_type(kind: object) -> None:
    assert_field({**dataplane("redis-1", "redis"), "type": kind}, "type")


def test_missing_type() -> None:
    document = dataplane("redis-1", "redis")
    del document["type"]
    assert_field(document, "type")


@pytest.mark.parametrize(
    "name", ["", "-redis", "redis-", "red is", "redis/1", ".redis", "r" * 254, None, 5]
)
def test_bad_name(name: object) -> None:
    assert_field({**dataplane("redis-1", "redis"), "name": name}, "name")


def test_missing_name() -> None:
    document = dataplane("redis-1", "redis")
    del document["name"]
    assert_field(document, "name")


def test_name_of_253_characters_is_accepted() -> None:
    assert parse_resource({**dataplane("redis-1", "redis"), "name": "r" * 253}).name == "r" * 253


@pytest.mark.parametrize("mesh", ["", "m" * 64, "bad mesh", None, 1])
def test_bad_mesh(mesh: object) -> None:
    assert_field({**dataplane("redis-1", "redis"), "mesh": mesh}, "mesh")


def test_mesh_resource_name_limit() -> None:
    assert parse_resource({"type": "Mesh", "name": "m" * 63}).name == "m" * 63
    assert_field({"type": "Mesh", "name": "m" * 64}, "name")


def test_mesh_resource_has_no_mesh_field() -> None:
    assert_field({"type": "Mesh", "name": "default", "mesh": "default"}, "mesh")


@pytest.mark.parametrize("field", ["spec", "Name", "meta", "tags"])
def test_unknown_top_level_field(field: str) -> None:
    document = dataplane("redis-1", "redis")
    document[field] = {}
    error = assert_field(document, field)
    assert "unknown" in error.message


def test_unknown_top_level_field_on_external_service() -> None:
    assert_field({**external_service("httpbin"), "inbound": []}, "inbound")


def test_bad_labels() -> None:
    assert_field({**dataplane("redis-1", "redis"), "labels": ["a"]}, "labels")
    assert_field({**dataplane("redis-1", "redis"), "labels": {"team": 5}}, 'labels["team"]')


@pytest.mark.parametrize("document", [None, [], "Dataplane", 5, 1.5, True])
def test_not_a_mapping(document: object) -> None:
    assert_field(document, "(resource)")


def test_non_string_keys() -> None:
    assert_field({1: "x", "type": "Mesh", "name": "m"}, "(resource)")


def test_gateway_with_inbound_is_refused() -> None:
    document = gateway("edge-gw", "edge-gateway")
    document["networking"]["inbound"] = [{"port": 80, "tags": {"kuma.io/service": "x"}}]
    assert_field(document, "networking.inbound")


def test_gateway_bad_type() -> None:
    document = gateway("edge-gw", "edge-gateway")
    document["networking"]["gateway"]["type"] = "EXTERNAL"
    assert_field(document, "networking.gateway.type")


def test_gateway_without_service_tag() -> None:
    document = gateway("edge-gw", "edge-gateway")
    document["networking"]["gateway"]["tags"] = {"zone": "a"}
    assert_field(document, 'networking.gateway.tags["kuma.io/service"]')


def test_gateway_not_a_mapping() -> None:
    document = gateway("edge-gw", "edge-gateway")
    document["networking"]["gateway"] = "BUILTIN"
    assert_field(document, "networking.gateway")


def test_external_service_without_service_tag() -> None:
    assert_field({**external_service("httpbin"), "tags": {"a": "b"}}, 'tags["kuma.io/service"]')


def test_external_service_without_tags() -> None:
    document = external_service("httpbin")
    del document["tags"]
    assert_field(document, "tags")


@pytest.mark.parametrize(
    "address",
    [
        "httpbin.org",
        "httpbin.org:",
        ":443",
        "httpbin.org:https",
        "httpbin.org:0",
        "httpbin.org:70000",
        "bad host:443",
        "",
        443,
        None,
        "httpbin.org:-1",
    ],
)
def test_bad_external_service_address(address: object) -> None:
    document = external_service("httpbin")
    document["networking"] = {"address": address}
    assert_field(document, "networking.address")


@pytest.mark.parametrize("port", ["\u00b2", "\u0663", "\uff18\uff10", "+80", " 80", "80 "])
def test_external_service_port_with_non_ascii_digit_or_sign(port: str) -> None:
    # str.isdigit() accepts '²' (which int() refuses) and '٣' (which int() reads as 3).
    document = external_service("httpbin")
    document["networking"] = {"address": f"httpbin.org:{port}"}
    assert_field(document, "networking.address")


def test_external_service_unknown_networking_field() -> None:
    document = external_service("httpbin")
    document["networking"]["inbound"] = []
    assert_field(document, "networking.inbound")


def test_error_is_a_value_error_with_field_and_message() -> None:
    error = assert_field(_inbound(port=0), "networking.inbound[0].port")
    assert isinstance(error, ValueError)
    assert "65535" in error.message
    assert "0" in error.message


def test_parse_does_not_mutate_the_document() -> None:
    document = dataplane("redis-1", "redis")
    before = copy.deepcopy(document)
    parse_resource(document)
    assert document == before


# -- parse_documents -------------------------------------------------------------------

MULTI = (
    as_yaml(
        dataplane("redis-1", "redis", address="192.0.2.10", port=6379),
        dataplane("broken", "broken", address="192.0.2.11", port=99999),
        external_service("httpbin"),
    )
    + "---\n---\n"  # an empty document between two
    + as_yaml({"type": "Mesh", "name": "default"})
)


def test_parse_documents_keeps_good_ones_and_reports_the_bad_one() -> None:
    results = parse_documents(MULTI)
    assert len(results) == 4
    good = [r for r in results if isinstance(r, Resource)]
    bad = [r for r in results if isinstance(r, ResourceError)]
    assert [r.key for r in good] == [
        ResourceKey(DATAPLANE, "default", "redis-1"),
        ResourceKey(EXTERNAL_SERVICE, "default", "httpbin"),
        ResourceKey(MESH, "", "default"),
    ]
    assert len(bad) == 1
    assert bad[0].field == "networking.inbound[0].port"
    # Results come in document order.
    assert isinstance(results[1], ResourceError)


def test_parse_documents_empty_text() -> None:
    assert parse_documents("") == []
    assert parse_documents("---\n---\n") == []


def test_parse_documents_json() -> None:
    text = json.dumps(dataplane("redis-1", "redis"))
    (resource,) = parse_documents(text, json_only=True)
    assert isinstance(resource, Resource)
    assert resource.services == ("redis",)


def test_parse_documents_json_list() -> None:
    text = json.dumps(
        [
            dataplane("redis-1", "redis"),
            external_service("httpbin"),
            {**dataplane("redis-1", "redis"), "name": None},
        ]
    )
    results = parse_documents(text, json_only=True)
    assert [type(r) for r in results] == [Resource, Resource, ResourceError]


def test_json_is_also_yaml() -> None:
    (resource,) = parse_documents(json.dumps(dataplane("redis-1", "redis")))
    assert isinstance(resource, Resource)


def test_unreadable_yaml_gives_one_clear_error() -> None:
    text = MULTI + "\nname: [unclosed\n"
    results = parse_documents(text)
    assert len(results) == 1
    (error,) = results
    assert isinstance(error, ResourceError)
    assert error.field == "(document)"
    assert "not valid YAML" in str(error)
    assert "line" in str(error)
    assert "\n" not in str(error)


def test_yaml_with_bad_indentation() -> None:
    (error,) = parse_documents("type: Mesh\n  name: x\n name: y\n")
    assert isinstance(error, ResourceError)
    assert "not valid YAML at line" in str(error)


def test_unreadable_json_gives_one_clear_error() -> None:
    (error,) = parse_documents('{"type": "Mesh", "name": ', json_only=True)
    assert isinstance(error, ResourceError)
    assert error.field == "(document)"
    assert "not valid JSON" in str(error)


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("creationTime: 2024-01-01T00:00:00Z", "creationTime"),
        ("creationTime: 2024-01-01", "creationTime"),
        ("labels: {since: 2024-01-01}", 'labels["since"]'),
        ("mtls: {key: !!binary aGVsbG8=}", "mtls.key"),
        ("mtls: !!set {a, b}", "mtls"),
    ],
)
def test_yaml_documents_stay_json(line: str, field: str) -> None:
    # Whatever YAML builds (timestamps, binary, sets), a Resource's document is
    # JSON (the store and the API write it as JSON), or the document is refused.
    text = f"type: Mesh\nname: prod\n{line}\n"
    (result,) = parse_documents(text)
    if isinstance(result, Resource):
        assert json.loads(json.dumps(result.document)) == result.document
    else:
        assert result.field == field, str(result)


def test_quoted_yaml_timestamp_is_a_string() -> None:
    (result,) = parse_documents('type: Mesh\nname: prod\ncreationTime: "2024-01-01T00:00:00Z"\n')
    assert isinstance(result, Resource)
    assert json.dumps(result.document)


def test_yaml_scalar_document_is_an_error_not_a_crash() -> None:
    (error,) = parse_documents("just a string\n")
    assert isinstance(error, ResourceError)
    assert error.field == "(resource)"


# -- property ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=25,
)

_field_names = st.sampled_from(
    [
        "type",
        "name",
        "mesh",
        "networking",
        "tags",
        "labels",
        "address",
        "inbound",
        "gateway",
        "port",
        "servicePort",
        "kuma.io/service",
        "outbound",
        "serviceAddress",
    ]
)
_plausible_leaves = st.sampled_from(
    [
        "Dataplane",
        "ExternalService",
        "Mesh",
        "default",
        "redis",
        "192.0.2.1",
        "h.org:443",
        "BUILTIN",
        "DELEGATED",
        6379,
        0,
        70000,
        "",
        None,
        True,
        "a:b",
        "[::1]:1",
        "x:²",
        "x:٣",
    ]
)
plausible_values = st.recursive(
    _plausible_leaves | json_values,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(_field_names, children, max_size=6)
    ),
    max_leaves=30,
)


def _mutations() -> st.SearchStrategy[object]:
    """Valid documents with one part replaced by something arbitrary."""

    def mutate(document: dict[str, Any], path: list[str], value: object) -> object:
        document = copy.deepcopy(document)
        target: Any = document
        for step in path[:-1]:
            target = target[step] if not isinstance(target, list) else target[int(step)]
        if isinstance(target, list):
            target[int(path[-1])] = value
        else:
            target[path[-1]] = value
        return document

    paths = [
        (dataplane("redis-1", "redis"), ["type"]),
        (dataplane("redis-1", "redis"), ["name"]),
        (dataplane("redis-1", "redis"), ["mesh"]),
        (dataplane("redis-1", "redis"), ["networking"]),
        (dataplane("redis-1", "redis"), ["networking", "address"]),
        (dataplane("redis-1", "redis"), ["networking", "inbound"]),
        (dataplane("redis-1", "redis"), ["networking", "inbound", "0"]),
        (dataplane("redis-1", "redis"), ["networking", "inbound", "0", "tags"]),
        (dataplane("redis-1", "redis"), ["networking", "inbound", "0", "port"]),
        (dataplane("redis-1", "redis"), ["networking", "gateway"]),
        (gateway("edge-gw", "edge-gateway"), ["networking", "gateway", "type"]),
        (external_service("httpbin"), ["tags"]),
        (external_service("httpbin"), ["networking", "address"]),
        (external_service("httpbin"), ["networking"]),
        ({"type": "Mesh", "name": "m"}, ["name"]),
    ]
    return st.sampled_from(paths).flatmap(
        lambda pair: plausible_values.map(lambda value: mutate(pair[0], pair[1], value))
    )


def _only_resource_errors(document: object) -> None:
    try:
        resource = parse_resource(document)
    except ResourceError as e:
        assert isinstance(e.field, str) and e.field
        assert str(e) == f"{e.field}: {e.message}"
        return
    assert isinstance(resource, Resource)


@settings(max_examples=300)
@given(json_values)
def test_arbitrary_json_values_only_raise_resource_error(document: object) -> None:
    _only_resource_errors(document)


@settings(max_examples=300)
@given(st.dictionaries(_field_names, plausible_values, max_size=6))
def test_arbitrary_mappings_only_raise_resource_error(document: object) -> None:
    _only_resource_errors(document)


@settings(max_examples=500)
@given(_mutations())
def test_mutated_valid_documents_only_raise_resource_error(document: object) -> None:
    _only_resource_errors(document)


@given(st.text(max_size=200))
def test_parse_documents_never_raises(text: str) -> None:
    for result in parse_documents(text):
        assert isinstance(result, Resource | ResourceError)
        if isinstance(result, Resource):
            json.dumps(result.document)
    for result in parse_documents(text, json_only=True):
        assert isinstance(result, Resource | ResourceError)


@example({"type": []})
@example({"type": {"Dataplane": 1}})
@example(external_service("httpbin", address="h.org:\u00b2"))
@given(json_values)
def test_values_that_once_raised_other_errors(document: object) -> None:
    _only_resource_errors(document)


# -- the document as kept ----------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=300)
@given(st.dictionaries(st.text(max_size=20), _json_values, max_size=8))
@example({"type": "Dataplane", "mesh": "default", "name": "a" * 2000})  # past the window
@example({})
def test_a_document_comes_back_as_given(document: dict[str, Any]) -> None:
    raw = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    packed = pack_document(raw)
    assert unpack_document(packed) == raw
    assert len(packed) <= len(raw)
    assert pack_document(raw) == packed  # equal documents, equal octets


def test_a_usual_dataplane_is_kept_in_a_fraction_of_its_text() -> None:
    document = dataplane("web-1", "web", address="10.1.2.3")
    resource = parse_resource(document)
    assert resource.raw == json.dumps(document, separators=(",", ":")).encode("utf-8")
    assert len(resource.packed) * 3 < len(resource.raw)
    assert resource.document == document
    again = parse_stored(resource.raw.decode("utf-8"))
    assert again == resource and again.packed == resource.packed
    other = parse_resource(dataplane("web-1", "web", address="10.1.2.4"))
    assert other != resource


def test_only_json_is_packed() -> None:
    with pytest.raises(ValueError):
        pack_document(b"")
    with pytest.raises(ValueError):
        pack_document(b"\0{}")
    assert pack_document(b"{}") == b"{}"  # nothing shorter: kept as it is
