"""The HTTP API through a real process: resources in, DNS answers and /vips out."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import dns.rcode
import dns.rdatatype
import pytest

from tests.builders import dataplane
from tests.kzprocess import ZoneProcess

DATAPLANES = "/meshes/default/dataplanes"
EXTERNAL_SERVICES = "/meshes/default/external-services"


def addresses(answer: Any, rdtype: str = "A") -> list[str]:
    wanted = dns.rdatatype.from_text(rdtype)
    return sorted(
        rdata.address for rrset in answer.answer if rrset.rdtype == wanted for rdata in rrset
    )


def vip_of(zone: ZoneProcess, service: str, mesh: str = "default") -> dict[str, Any] | None:
    found = [i for i in zone.vips()["items"] if (i["mesh"], i["service"]) == (mesh, service)]
    assert len(found) <= 1, found
    return found[0] if found else None


def table(zone: ZoneProcess) -> list[tuple[str, str, str, str]]:
    """What /vips serves, without the version."""
    return [(i["mesh"], i["service"], i["vip"], i["vip6"]) for i in zone.vips()["items"]]


# -- create, read, update, delete ----------------------------------------------------


def test_put_json_creates_then_updates_and_dns_follows_at_once(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    path = f"{DATAPLANES}/cache-1"
    assert zone.query("cache.mesh").rcode() == dns.rcode.NXDOMAIN

    status, body = zone.api("PUT", path, dataplane("cache-1", "cache"))
    assert status == 201, body
    assert body["name"] == "cache-1" and body["type"] == "Dataplane"
    entry = vip_of(zone, "cache")
    assert entry is not None
    answer = zone.query("cache.mesh")
    assert answer.rcode() == dns.rcode.NOERROR
    assert addresses(answer) == [entry["vip"]]
    assert addresses(zone.query("cache.mesh", "AAAA"), "AAAA") == [entry["vip6"]]

    # The same PUT with another service: 200, the new name resolves, the old one is gone.
    status, body = zone.api("PUT", path, dataplane("cache-1", "memcached"))
    assert status == 200, body
    assert zone.query("cache.mesh").rcode() == dns.rcode.NXDOMAIN
    renamed = vip_of(zone, "memcached")
    assert renamed is not None
    assert addresses(zone.query("memcached.mesh")) == [renamed["vip"]]
    assert vip_of(zone, "cache") is None

    status, body = zone.api("GET", path)
    assert status == 200
    assert body["networking"]["inbound"][0]["tags"]["kuma.io/service"] == "memcached"


def test_put_yaml_body_creates_then_updates(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    path = f"{DATAPLANES}/queue-1"
    document = (
        "type: Dataplane\n"
        "mesh: default\n"
        "name: queue-1\n"
        "networking:\n"
        "  address: 192.0.2.77\n"
        "  inbound:\n"
        "    - port: 5672\n"
        "      tags:\n"
        "        kuma.io/service: {service}\n"
    )
    status, body = zone.api(
        "PUT", path, raw=document.format(service="queue").encode(), content_type="application/yaml"
    )
    assert status == 201, body
    entry = vip_of(zone, "queue")
    assert entry is not None
    assert addresses(zone.query("queue.mesh")) == [entry["vip"]]

    status, body = zone.api(
        "PUT",
        path,
        raw=document.format(service="queue2").encode(),
        content_type="application/yaml",
    )
    assert status == 200, body
    assert zone.query("queue.mesh").rcode() == dns.rcode.NXDOMAIN
    assert zone.query("queue2.mesh").rcode() == dns.rcode.NOERROR


def test_put_without_type_mesh_and_name_takes_them_from_the_path(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    document = dataplane("x", "pathy")
    for field in ("type", "mesh", "name"):
        del document[field]
    status, body = zone.api("PUT", f"{DATAPLANES}/pathy-1", document)
    assert status == 201, body
    status, body = zone.api("GET", f"{DATAPLANES}/pathy-1")
    assert status == 200
    assert (body["type"], body["mesh"], body["name"]) == ("Dataplane", "default", "pathy-1")
    assert zone.query("pathy.mesh").rcode() == dns.rcode.NOERROR


def test_get_one_and_list(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    zone.api("PUT", f"{DATAPLANES}/cache-1", dataplane("cache-1", "cache"))

    status, body = zone.api("GET", f"{DATAPLANES}/redis-1")  # from the resources dir
    assert status == 200
    assert body["networking"]["address"] == "192.0.2.10"
    status, body = zone.api("GET", f"{DATAPLANES}/cache-1")  # from the API
    assert status == 200
    assert body == dataplane("cache-1", "cache")

    status, body = zone.api("GET", DATAPLANES)
    assert status == 200
    names = [item["name"] for item in body["items"]]
    assert body["total"] == len(names)
    assert set(names) == {
        "redis-1",
        "backend-1",
        "backend-2",
        "frontend-1",
        "echo-server-7d9f8b-x2x4q",
        "cache-1",
    }
    assert all(item["mesh"] == "default" for item in body["items"])

    status, body = zone.api("GET", "/meshes/payments/dataplanes")
    assert status == 200
    assert {item["name"] for item in body["items"]} == {"redis-payments-1", "ledger-1"}

    status, body = zone.api("GET", EXTERNAL_SERVICES)
    assert status == 200
    assert [item["name"] for item in body["items"]] == ["httpbin"]


def test_get_meshes_and_one_mesh(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    status, body = zone.api("GET", "/meshes")
    assert status == 200
    assert sorted(item["name"] for item in body["items"]) == ["default", "payments"]
    assert body["total"] == 2
    assert all(item["type"] == "Mesh" for item in body["items"])

    status, body = zone.api("GET", "/meshes/payments")
    assert status == 200
    assert (body["type"], body["name"]) == ("Mesh", "payments")

    status, body = zone.api("GET", "/meshes/nosuch")
    assert status == 404

    # A Dataplane in a new mesh makes the mesh appear.
    status, _ = zone.api(
        "PUT", "/meshes/staging/dataplanes/web-1", dataplane("web-1", "web", mesh="staging")
    )
    assert status == 201
    status, body = zone.api("GET", "/meshes")
    assert sorted(item["name"] for item in body["items"]) == ["default", "payments", "staging"]
    assert zone.api("GET", "/meshes/staging")[0] == 200


def test_delete_then_404_and_nxdomain(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    path = f"{DATAPLANES}/cache-1"
    assert zone.api("PUT", path, dataplane("cache-1", "cache"))[0] == 201
    assert zone.query("cache.mesh").rcode() == dns.rcode.NOERROR

    status, _ = zone.api("DELETE", path)
    assert status == 200
    answer = zone.query("cache.mesh")
    assert answer.rcode() == dns.rcode.NXDOMAIN
    assert any(rrset.rdtype == dns.rdatatype.SOA for rrset in answer.authority)
    assert vip_of(zone, "cache") is None
    assert zone.api("GET", path)[0] == 404
    assert zone.api("DELETE", path)[0] == 404


def test_a_service_shared_by_two_dataplanes_lives_until_the_last_one_goes(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    assert zone.api("PUT", f"{DATAPLANES}/api-1", dataplane("api-1", "api"))[0] == 201
    assert zone.api("PUT", f"{DATAPLANES}/api-2", dataplane("api-2", "api"))[0] == 201
    vip = vip_of(zone, "api")
    assert vip is not None
    assert zone.api("DELETE", f"{DATAPLANES}/api-1")[0] == 200
    assert vip_of(zone, "api") == vip
    assert addresses(zone.query("api.mesh")) == [vip["vip"]]
    assert zone.api("DELETE", f"{DATAPLANES}/api-2")[0] == 200
    assert zone.query("api.mesh").rcode() == dns.rcode.NXDOMAIN


def test_external_service_never_gets_a_vip_nor_a_name(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    before = table(zone)
    document = {
        "type": "ExternalService",
        "mesh": "default",
        "name": "stripe",
        "tags": {"kuma.io/service": "stripe-api"},
        "networking": {"address": "api.stripe.com:443"},
    }
    status, body = zone.api("PUT", f"{EXTERNAL_SERVICES}/stripe", document)
    assert status == 201, body
    assert zone.api("GET", f"{EXTERNAL_SERVICES}/stripe") == (200, document)
    assert table(zone) == before
    assert vip_of(zone, "stripe-api") is None
    for name in ("stripe-api.mesh", "stripe.mesh"):
        assert zone.query(name).rcode() == dns.rcode.NXDOMAIN
        assert zone.query(name, "AAAA").rcode() == dns.rcode.NXDOMAIN
    # The sample's own ExternalService (httpbin) has none either.
    assert vip_of(zone, "httpbin") is None
    assert zone.query("httpbin.mesh").rcode() == dns.rcode.NXDOMAIN


# -- refusals ----------------------------------------------------------------------

BAD_DATAPLANES = {
    "bad port": (
        {
            "networking": {
                "address": "192.0.2.9",
                "inbound": [{"port": 70000, "tags": {"kuma.io/service": "bad"}}],
            }
        },
        "networking.inbound[0].port",
    ),
    "port not a number": (
        {
            "networking": {
                "address": "192.0.2.9",
                "inbound": [{"port": "http", "tags": {"kuma.io/service": "bad"}}],
            }
        },
        "networking.inbound[0].port",
    ),
    "missing kuma.io/service": (
        {"networking": {"address": "192.0.2.9", "inbound": [{"port": 80, "tags": {"app": "bad"}}]}},
        'networking.inbound[0].tags["kuma.io/service"]',
    ),
    "unknown top-level field": (
        {
            "bogus": 1,
            "networking": {
                "address": "192.0.2.9",
                "inbound": [{"port": 80, "tags": {"kuma.io/service": "b"}}],
            },
        },
        "bogus",
    ),
    "unknown networking field": (
        {
            "networking": {
                "address": "192.0.2.9",
                "bogus": True,
                "inbound": [{"port": 80, "tags": {"kuma.io/service": "b"}}],
            }
        },
        "networking.bogus",
    ),
    "bad address": (
        {
            "networking": {
                "address": "not an address!",
                "inbound": [{"port": 80, "tags": {"kuma.io/service": "b"}}],
            }
        },
        "networking.address",
    ),
    "wrong type for the collection": (
        {
            "type": "ExternalService",
            "tags": {"kuma.io/service": "b"},
            "networking": {"address": "example.com:443"},
        },
        "type",
    ),
    "body name does not match the path": (
        {
            "name": "someone-else",
            "networking": {
                "address": "192.0.2.9",
                "inbound": [{"port": 80, "tags": {"kuma.io/service": "b"}}],
            },
        },
        "name",
    ),
    "body mesh does not match the path": (
        {
            "mesh": "payments",
            "networking": {
                "address": "192.0.2.9",
                "inbound": [{"port": 80, "tags": {"kuma.io/service": "b"}}],
            },
        },
        "mesh",
    ),
}


def _state(zone: ZoneProcess) -> tuple[Any, ...]:
    return (
        table(zone),
        zone.vips()["version"],
        zone.api("GET", DATAPLANES)[1],
        zone.api("GET", EXTERNAL_SERVICES)[1],
    )


@pytest.mark.parametrize("case", sorted(BAD_DATAPLANES))
def test_bad_dataplane_is_refused_naming_the_field(zone_process, case: str) -> None:
    zone: ZoneProcess = zone_process()
    # One resource of our own first, to see that a refusal does not touch it.
    assert zone.api("PUT", f"{DATAPLANES}/bad-1", dataplane("bad-1", "keep"))[0] == 201
    before = _state(zone)

    overrides, field = BAD_DATAPLANES[case]
    document = {"type": "Dataplane", "mesh": "default", "name": "bad-1", **overrides}
    status, body = zone.api("PUT", f"{DATAPLANES}/bad-1", document)
    assert status == 400, body
    assert body["causes"][0]["field"] == field, body
    assert body["causes"][0]["message"]
    assert _state(zone) == before
    assert zone.query("keep.mesh").rcode() == dns.rcode.NOERROR
    assert zone.query("b.mesh").rcode() == dns.rcode.NXDOMAIN

    # A new name refused is not created either.
    document["name"] = "bad-2" if field != "name" else "someone-else"
    status, body = zone.api("PUT", f"{DATAPLANES}/bad-2", document)
    assert status == 400, body
    assert zone.api("GET", f"{DATAPLANES}/bad-2")[0] == 404
    assert _state(zone) == before


def test_dataplane_body_to_external_services_is_refused(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    before = _state(zone)
    document = dataplane("odd", "odd")
    status, body = zone.api("PUT", f"{EXTERNAL_SERVICES}/odd", document)
    assert status == 400, body
    assert body["causes"][0]["field"] == "type"
    assert _state(zone) == before


BAD_BODIES = {
    # case: (raw body, content type, words the message must contain)
    "invalid YAML": (b"type: Dataplane\nnetworking: [unclosed\n", "application/yaml", "YAML"),
    "invalid JSON": (b'{"type": "Dataplane", ', "application/json", "JSON"),
    "two documents": (
        b"type: Dataplane\nname: a\n---\ntype: Dataplane\nname: b\n",
        "application/yaml",
        "2",
    ),
    "not UTF-8": (b"type: Dataplane\nname: caf\xe9\n", "application/yaml", "UTF-8"),
    "not a mapping": (b"[1, 2, 3]", "application/json", "mapping"),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_unreadable_body_is_refused(zone_process, case: str) -> None:
    zone: ZoneProcess = zone_process()
    before = _state(zone)
    raw, content_type, words = BAD_BODIES[case]
    status, body = zone.api("PUT", f"{DATAPLANES}/a", raw=raw, content_type=content_type)
    assert status == 400, body
    cause = body["causes"][0]
    assert isinstance(cause["field"], str) and cause["field"], body
    assert words in cause["message"], body
    assert _state(zone) == before


def test_body_over_one_mebibyte_is_413(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    before = _state(zone)
    document = dataplane("big-1", "big")
    document["labels"] = {"padding": "x" * (1024 * 1024)}
    status, body = zone.api("PUT", f"{DATAPLANES}/big-1", document)
    assert status == 413, body
    assert _state(zone) == before
    assert zone.query("big.mesh").rcode() == dns.rcode.NXDOMAIN
    # The server is still fine afterwards.
    assert zone.api("PUT", f"{DATAPLANES}/small-1", dataplane("small-1", "small"))[0] == 201


def test_resource_from_the_resources_dir_cannot_be_changed_through_the_api(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    before = _state(zone)
    status, body = zone.api("PUT", f"{DATAPLANES}/redis-1", dataplane("redis-1", "hijack"))
    assert status == 409, body
    status, body = zone.api("DELETE", f"{DATAPLANES}/redis-1")
    assert status == 409, body
    status, body = zone.api(
        "PUT",
        f"{EXTERNAL_SERVICES}/httpbin",
        {
            "type": "ExternalService",
            "mesh": "default",
            "name": "httpbin",
            "tags": {"kuma.io/service": "httpbin"},
            "networking": {"address": "example.com:443"},
        },
    )
    assert status == 409, body
    assert _state(zone) == before
    assert zone.query("redis.mesh").rcode() == dns.rcode.NOERROR
    assert zone.query("hijack.mesh").rcode() == dns.rcode.NXDOMAIN


# -- routing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/nope",
        "/vips/extra",
        "/meshes/default/widgets",
        "/meshes/default/widgets/x",
        "/meshes/default/dataplanes/redis-1/extra",
        "/meshes/default/dataplanes/no-such-dataplane",
        "/meshes/default/external-services/no-such-service",
        "/meshes/no-such-mesh",
    ],
)
def test_unknown_paths_are_404(zone_process, path: str) -> None:
    zone: ZoneProcess = zone_process()
    status, body = zone.api("GET", path)
    assert status == 404, body


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/vips"),
        ("DELETE", "/vips"),
        ("PUT", "/meshes"),
        ("DELETE", "/meshes/default"),
        ("PUT", "/meshes/default/dataplanes"),
        ("DELETE", "/meshes/default/dataplanes"),
        ("POST", "/meshes/default/dataplanes/redis-1"),
        ("PATCH", "/meshes/default/external-services/httpbin"),
        ("POST", "/"),
    ],
)
def test_wrong_methods_are_405(zone_process, method: str, path: str) -> None:
    zone: ZoneProcess = zone_process()
    before = _state(zone)
    status, body = zone.api(method, path, dataplane("redis-1", "redis"))
    assert status == 405, body
    assert _state(zone) == before


# -- /vips ----------------------------------------------------------------------------


def test_vips_sorted_by_mesh_then_service_with_the_design_fields(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    # Services whose names sort differently from their meshes, to see the order.
    for mesh, name, service in [
        ("payments", "aaa-1", "aaa"),
        ("default", "zzz-1", "zzz"),
        ("alpha", "mmm-1", "mmm"),
    ]:
        status, _ = zone.api(
            "PUT", f"/meshes/{mesh}/dataplanes/{name}", dataplane(name, service, mesh=mesh)
        )
        assert status == 201

    document = zone.vips()
    assert isinstance(document["version"], int) and document["version"] > 0
    items = document["items"]
    keys = [(item["mesh"], item["service"]) for item in items]
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)
    assert set(keys) >= {
        ("alpha", "mmm"),
        ("default", "backend"),
        ("default", "echo-server_echo-example_svc_1010"),
        ("default", "frontend"),
        ("default", "redis"),
        ("default", "zzz"),
        ("payments", "aaa"),
        ("payments", "ledger"),
        ("payments", "redis"),
    }
    assert ("default", "httpbin") not in keys

    v4_base = ipaddress.ip_network("240.0.0.0/4")
    v6_base = ipaddress.ip_network("fd00:fd00::/64")
    for item in items:
        assert {"mesh", "service", "vip", "vip6", "names", "zones", "provisional"} <= set(item)
        vip, vip6 = ipaddress.ip_address(item["vip"]), ipaddress.ip_address(item["vip6"])
        assert vip in v4_base and vip6 in v6_base
        # The IPv6 VIP sits at the same offset in its range as the IPv4 one.
        assert int(vip) - int(v4_base.network_address) == (
            int(vip6) - int(v6_base.network_address)
        ), item
        assert item["zones"] == ["zone-1"]
        assert item["provisional"] is False
        assert isinstance(item["names"], list)
    assert len({item["vip"] for item in items}) == len(items)
    assert len({item["vip6"] for item in items}) == len(items)

    by_key = {(item["mesh"], item["service"]): item for item in items}
    assert by_key["default", "redis"]["names"] == ["redis.mesh"]
    assert by_key["default", "echo-server_echo-example_svc_1010"]["names"] == [
        "echo-server_echo-example_svc_1010.mesh",
        "echo-server.echo-example.svc.1010.mesh",
    ]
    # The names answer with the VIPs /vips reports.
    for name in by_key["default", "echo-server_echo-example_svc_1010"]["names"]:
        answer = zone.query(name)
        assert addresses(answer) == [by_key["default", "echo-server_echo-example_svc_1010"]["vip"]]


def test_vips_version_grows_with_each_change_and_is_the_soa_serial(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    first = zone.vips()["version"]
    assert zone.api("PUT", f"{DATAPLANES}/v-1", dataplane("v-1", "versioned"))[0] == 201
    second = zone.vips()["version"]
    assert second > first
    soa = zone.query("mesh", "SOA")
    serials = [rdata.serial for rrset in soa.answer for rdata in rrset]
    assert serials == [second]
    # An update that changes no service leaves the table as it was.
    document = dataplane("v-1", "versioned", address="192.0.2.201")
    assert zone.api("PUT", f"{DATAPLANES}/v-1", document)[0] == 200
    assert zone.vips()["version"] == second


def test_api_answers_json(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    status, raw = zone.http("api", "GET", "/vips")
    assert status == 200
    json.loads(raw)
    status, raw = zone.http("api", "GET", "/")
    assert status == 200
    about = json.loads(raw)
    assert about["zone"] == "zone-1"


KUMACTL_STYLE_YAML = (
    # What `kumactl get dataplane -o yaml` prints: YAML timestamps included.
    "type: Dataplane\n"
    "mesh: default\n"
    "name: timed-1\n"
    "creationTime: 2024-01-01T00:00:00Z\n"
    "modificationTime: 2024-01-02T03:04:05Z\n"
    "networking:\n"
    "  address: 192.0.2.88\n"
    "  inbound:\n"
    "    - port: 80\n"
    "      tags:\n"
    "        kuma.io/service: timed\n"
)


def test_yaml_with_timestamps_is_never_a_500_and_leaves_a_consistent_zone(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    status, raw = zone.http(
        "api", "PUT", f"{DATAPLANES}/timed-1", KUMACTL_STYLE_YAML.encode(), "application/yaml"
    )
    assert status in (201, 400), raw
    # Whatever the answer, the API keeps answering JSON for everything else.
    listing_status, listing = zone.http("api", "GET", DATAPLANES)
    assert listing_status == 200, listing
    if status == 400:
        assert zone.api("GET", f"{DATAPLANES}/timed-1")[0] == 404
        assert zone.query("timed.mesh").rcode() == dns.rcode.NXDOMAIN
        assert vip_of(zone, "timed") is None
        return
    status, body = zone.api("GET", f"{DATAPLANES}/timed-1")
    assert status == 200, body
    assert body["creationTime"] == "2024-01-01T00:00:00Z"
    entry = vip_of(zone, "timed")
    assert entry is not None
    assert addresses(zone.query("timed.mesh")) == [entry["vip"]]
    zone.kill()
    zone.start()
    assert zone.api("GET", f"{DATAPLANES}/timed-1")[0] == 200
    assert vip_of(zone, "timed") == entry


@pytest.mark.parametrize(
    "path, field",
    [
        ("/meshes/bad_mesh!/dataplanes/x-1", "mesh"),
        ("/meshes/default/dataplanes/-starts-with-a-dash", "name"),
        (f"/meshes/default/dataplanes/{'n' * 300}", "name"),
    ],
)
def test_bad_names_in_the_path_are_refused(zone_process, path: str, field: str) -> None:
    zone: ZoneProcess = zone_process()
    before = _state(zone)
    document = dataplane("x", "pathological")
    for key in ("mesh", "name"):
        del document[key]
    status, body = zone.api("PUT", path, document)
    assert status == 400, body
    assert body["causes"][0]["field"] == field, body
    assert _state(zone) == before
