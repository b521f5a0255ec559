"""The HTTP API through a real process: resources in, DNS answers and /vips out.

What the API answers to each request (status, body, refusals, routing) is in
tests/unit/test_api.py; these tests keep what needs a process: DNS after a change,
persistence across a restart, a real socket.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import dns.rcode
import dns.rdatatype

from tests.builders import as_yaml, dataplane, external_service
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


def soa_serial(zone: ZoneProcess) -> int:
    (serial,) = [rdata.serial for rrset in zone.query("mesh", "SOA").answer for rdata in rrset]
    return serial


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

    def document(service: str) -> bytes:
        return as_yaml(dataplane("queue-1", service, address="192.0.2.77", port=5672)).encode()

    status, body = zone.api("PUT", path, raw=document("queue"), content_type="application/yaml")
    assert status == 201, body
    entry = vip_of(zone, "queue")
    assert entry is not None
    assert addresses(zone.query("queue.mesh")) == [entry["vip"]]

    status, body = zone.api("PUT", path, raw=document("queue2"), content_type="application/yaml")
    assert status == 200, body
    assert zone.query("queue.mesh").rcode() == dns.rcode.NXDOMAIN
    assert zone.query("queue2.mesh").rcode() == dns.rcode.NOERROR


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
    document = external_service("stripe", "stripe-api", address="api.stripe.com:443")
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
# What a refusal answers (400 naming the field, 404, 405, 409) is in tests/unit/test_api.py;
# here, that a refusal leaves DNS as it was.


def _state(zone: ZoneProcess) -> tuple[Any, ...]:
    return (
        table(zone),
        zone.vips()["version"],
        zone.api("GET", DATAPLANES)[1],
        zone.api("GET", EXTERNAL_SERVICES)[1],
    )


def test_a_refused_put_changes_no_dns_answer(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    # One resource of our own first, to see that a refusal does not touch it.
    assert zone.api("PUT", f"{DATAPLANES}/bad-1", dataplane("bad-1", "keep"))[0] == 201
    before = _state(zone)
    keep = addresses(zone.query("keep.mesh"))
    serial = soa_serial(zone)

    document = dataplane("bad-1", "b", address="192.0.2.9", port=70000)
    status, body = zone.api("PUT", f"{DATAPLANES}/bad-1", document)
    assert status == 400, body
    assert body["causes"][0]["field"] == "networking.inbound[0].port", body
    assert _state(zone) == before
    assert addresses(zone.query("keep.mesh")) == keep
    assert zone.query("b.mesh").rcode() == dns.rcode.NXDOMAIN
    assert soa_serial(zone) == serial


def test_body_over_one_mebibyte_is_413(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    before = _state(zone)
    document = dataplane("big-1", "big")
    document["labels"] = {"padding": "x" * (1024 * 1024)}
    body = json.dumps(document).encode()
    # A raw client that reads the answer before sending the whole body: the server
    # answers 413 from the Content-Length and closes, and a client still sending
    # would see its send fail first (urllib did, now and then, on a busy machine).
    with socket.create_connection(("127.0.0.1", zone.ports["api"]), timeout=10) as client:
        client.sendall(
            f"PUT {DATAPLANES}/big-1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body[:4096]
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = client.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
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
    document = external_service("httpbin", address="example.com:443")
    status, body = zone.api("PUT", f"{EXTERNAL_SERVICES}/httpbin", document)
    assert status == 409, body
    assert _state(zone) == before
    assert zone.query("redis.mesh").rcode() == dns.rcode.NOERROR
    assert zone.query("hijack.mesh").rcode() == dns.rcode.NXDOMAIN


# -- /vips ----------------------------------------------------------------------------


def test_vips_names_answer_with_the_vips_reported(zone_process) -> None:
    """The shape and order of /vips are in tests/unit/test_api.py; here, DNS agrees with it."""
    zone: ZoneProcess = zone_process()
    for mesh, name, service in [
        ("payments", "aaa-1", "aaa"),
        ("default", "zzz-1", "zzz"),
        ("alpha", "mmm-1", "mmm"),
    ]:
        status, _ = zone.api(
            "PUT", f"/meshes/{mesh}/dataplanes/{name}", dataplane(name, service, mesh=mesh)
        )
        assert status == 201

    items = zone.vips()["items"]
    keys = [(item["mesh"], item["service"]) for item in items]
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
    assert all(item["zones"] == ["zone-1"] for item in items)

    by_key = {(item["mesh"], item["service"]): item for item in items}
    assert by_key["default", "redis"]["names"] == ["redis.mesh"]
    assert by_key["default", "echo-server_echo-example_svc_1010"]["names"] == [
        "echo-server_echo-example_svc_1010.mesh",
        "echo-server.echo-example.svc.1010.mesh",
    ]
    # Every name of the default mesh (this client's mesh) answers with the VIPs /vips reports.
    for item in items:
        if item["mesh"] != "default":
            continue
        for name in item["names"]:
            assert addresses(zone.query(name)) == [item["vip"]], name
            assert addresses(zone.query(name, "AAAA"), "AAAA") == [item["vip6"]], name


def test_vips_version_grows_with_each_change_and_is_the_soa_serial(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    first = zone.vips()["version"]
    assert zone.api("PUT", f"{DATAPLANES}/v-1", dataplane("v-1", "versioned"))[0] == 201
    second = zone.vips()["version"]
    assert second > first
    assert soa_serial(zone) == second
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


#: What `kumactl get dataplane -o yaml` prints: YAML timestamps, unquoted.
KUMACTL_STYLE_YAML = as_yaml(dataplane("timed-1", "timed", address="192.0.2.88", port=80)).replace(
    "type: Dataplane\n",
    "type: Dataplane\ncreationTime: 2024-01-01T00:00:00Z\nmodificationTime: 2024-01-02T03:04:05Z\n",
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
