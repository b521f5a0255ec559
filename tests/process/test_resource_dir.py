"""The watched resources directory through a real process: changes on disk go live."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import dns.rcode
import dns.rdatatype

from tests.builders import as_yaml, dataplane
from tests.kzprocess import ZoneProcess

#: The contract says "within a second"; the scan interval is 0.5 s, so 1.5 s is generous.
LIVE_WITHIN = 1.5


def wait_for(condition: Callable[[], bool], within: float = LIVE_WITHIN) -> float:
    """Poll C{condition}; return how long it took, or fail after C{within} seconds."""
    started = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise AssertionError(f"not true within {within} s")
        time.sleep(0.05)


def rcode(zone: ZoneProcess, name: str) -> int:
    return zone.query(name).rcode()


def resolves(zone: ZoneProcess, name: str) -> Callable[[], bool]:
    return lambda: rcode(zone, name) == dns.rcode.NOERROR and bool(zone.query(name).answer)


def gone(zone: ZoneProcess, name: str) -> Callable[[], bool]:
    return lambda: rcode(zone, name) == dns.rcode.NXDOMAIN


def services(zone: ZoneProcess) -> dict[tuple[str, str], dict[str, Any]]:
    return {(i["mesh"], i["service"]): i for i in zone.vips()["items"]}


def log_lines(zone: ZoneProcess, *words: str) -> list[str]:
    return [line for line in zone.log().splitlines() if all(w in line for w in words)]


def address_of(zone: ZoneProcess, name: str) -> list[str]:
    return sorted(
        rdata.address
        for rrset in zone.query(name).answer
        if rrset.rdtype == dns.rdatatype.A
        for rdata in rrset
    )


def test_a_file_added_resolves_within_the_limit(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    assert zone.resources is not None
    assert rcode(zone, "cache.mesh") == dns.rcode.NXDOMAIN
    (zone.resources / "cache.yaml").write_text(
        as_yaml(dataplane("cache-1", "cache", address="192.0.2.150"))
    )
    wait_for(resolves(zone, "cache.mesh"))
    assert address_of(zone, "cache.mesh") == [services(zone)["default", "cache"]["vip"]]
    status, body = zone.api("GET", "/meshes/default/dataplanes/cache-1")
    assert status == 200 and body["networking"]["address"] == "192.0.2.150"


def test_json_and_yml_files_and_subdirectories_are_read(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    assert zone.resources is not None
    documents = [dataplane(f"j{n}-1", f"json{n}", address="192.0.2.151", port=80) for n in (1, 2)]
    (zone.resources / "list.json").write_text(json.dumps(documents))
    (zone.resources / "nested").mkdir()
    (zone.resources / "nested" / "more.yml").write_text(as_yaml(dataplane("yml-1", "ymlsvc")))
    (zone.resources / "notes.txt").write_text(as_yaml(dataplane("txt-1", "txtsvc")))
    for name in ("json1.mesh", "json2.mesh", "ymlsvc.mesh"):
        wait_for(resolves(zone, name))
    assert rcode(zone, "txtsvc.mesh") == dns.rcode.NXDOMAIN


def test_a_file_changed_takes_effect_within_the_limit(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    assert zone.resources is not None
    path = zone.resources / "cache.yaml"
    path.write_text(as_yaml(dataplane("cache-1", "alpha")))
    wait_for(resolves(zone, "alpha.mesh"))

    path.write_text(as_yaml(dataplane("cache-1", "gamma")))  # same size: only the content moves
    wait_for(lambda: resolves(zone, "gamma.mesh")() and gone(zone, "alpha.mesh")())
    table = services(zone)
    assert ("default", "alpha") not in table and ("default", "gamma") in table

    # The sample files can be edited too: rename redis in default.yaml.
    sample = zone.resources / "default.yaml"
    sample.write_text(sample.read_text().replace("kuma.io/service: redis", "kuma.io/service: kv"))
    wait_for(lambda: resolves(zone, "kv.mesh")() and gone(zone, "redis.mesh")())
    # payments' redis is a different service and stays.
    assert ("payments", "redis") in services(zone)


def test_a_file_removed_takes_effect_within_the_limit(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    assert zone.resources is not None
    path = zone.resources / "cache.yaml"
    path.write_text(as_yaml(dataplane("cache-1", "cache")))
    wait_for(resolves(zone, "cache.mesh"))

    path.unlink()
    wait_for(gone(zone, "cache.mesh"))
    assert ("default", "cache") not in services(zone)
    assert zone.api("GET", "/meshes/default/dataplanes/cache-1")[0] == 404

    # ledger is in mesh payments: a default client never sees it, so watch /vips.
    (zone.resources / "payments.yaml").unlink()
    wait_for(lambda: ("payments", "ledger") not in services(zone))
    assert ("payments", "redis") not in services(zone)
    assert resolves(zone, "redis.mesh")()  # default's redis is from another file


def test_one_bad_document_is_logged_once_and_the_others_load(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    assert zone.resources is not None
    before = services(zone)
    text = as_yaml(
        dataplane("good-1", "goodone"),
        dataplane("bad-1", "badone", port=70000),
        dataplane("good-2", "goodtwo"),
    )
    (zone.resources / "mixed.yaml").write_text(text)
    wait_for(lambda: resolves(zone, "goodone.mesh")() and resolves(zone, "goodtwo.mesh")())
    assert rcode(zone, "badone.mesh") == dns.rcode.NXDOMAIN
    assert zone.api("GET", "/meshes/default/dataplanes/bad-1")[0] == 404
    after = services(zone)
    assert {k: v for k, v in after.items() if k in before} == before

    time.sleep(1.2)  # a few more scans: the file is not read (and logged) again
    lines = log_lines(zone, "networking.inbound[0].port")
    assert len(lines) == 1, lines
    assert "mixed.yaml" in lines[0]
    assert "70000" in lines[0]


def test_a_file_edited_into_invalid_yaml_keeps_what_it_had(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    assert zone.resources is not None
    path = zone.resources / "cache.yaml"
    path.write_text(as_yaml(dataplane("cache-1", "cache"), dataplane("q-1", "queue")))
    wait_for(lambda: resolves(zone, "cache.mesh")() and resolves(zone, "queue.mesh")())
    table = services(zone)
    version = zone.vips()["version"]

    path.write_text("type: Dataplane\nnetworking: [this is not\n  yaml: {\n")
    wait_for(lambda: bool(log_lines(zone, "cache.yaml", "YAML")))
    time.sleep(0.6)  # at least one more scan
    assert services(zone) == table
    assert zone.vips()["version"] == version
    assert address_of(zone, "cache.mesh") == [table["default", "cache"]["vip"]]
    assert resolves(zone, "queue.mesh")()
    assert zone.api("GET", "/meshes/default/dataplanes/cache-1")[0] == 200

    # Fixed again: the file's new content replaces the old.
    path.write_text(as_yaml(dataplane("cache-1", "cache")))
    wait_for(gone(zone, "queue.mesh"))
    assert address_of(zone, "cache.mesh") == [table["default", "cache"]["vip"]]


def test_a_document_edited_into_a_bad_one_keeps_its_last_good_version(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    assert zone.resources is not None
    path = zone.resources / "pair.yaml"
    path.write_text(as_yaml(dataplane("one-1", "one"), dataplane("two-1", "two")))
    wait_for(lambda: resolves(zone, "one.mesh")() and resolves(zone, "two.mesh")())

    # two-1 gets a bad port; one-1 is renamed to a new service.
    path.write_text(as_yaml(dataplane("one-1", "uno"), dataplane("two-1", "two", port=0)))
    wait_for(lambda: resolves(zone, "uno.mesh")() and gone(zone, "one.mesh")())
    assert resolves(zone, "two.mesh")()
    lines = log_lines(zone, "pair.yaml", "networking.inbound[0].port")
    assert len(lines) == 1, lines


def test_a_service_that_cannot_be_a_dns_name_gets_a_vip_and_a_warning(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    assert zone.resources is not None
    long_service = "a" * 70
    half = "b" * 40
    mixed_service = f"{half}_{half}"  # 81 octets with '_', fine as two labels with '.'
    (zone.resources / "long.yaml").write_text(
        as_yaml(
            dataplane("long-1", long_service),
            dataplane("mixed-1", mixed_service),
            dataplane("fine-1", "fine"),
        )
    )
    wait_for(resolves(zone, "fine.mesh"))
    table = services(zone)

    entry = table["default", long_service]
    assert entry["vip"] and entry["vip6"]
    assert entry["names"] == []
    assert entry.get("warnings"), entry
    others = {e["vip"] for key, e in table.items() if key != ("default", long_service)}
    assert entry["vip"] not in others
    # One warning that says which service and why (the 63-octet label limit).
    warnings = [line for line in log_lines(zone, long_service[:20]) if "63" in line]
    assert warnings, zone.log()

    mixed = table["default", mixed_service]
    assert mixed["names"] == [f"{half}.{half}.mesh"]
    assert address_of(zone, f"{half}.{half}.mesh") == [mixed["vip"]]

    # The rest of the zone is unaffected.
    assert resolves(zone, "redis.mesh")()


def test_the_same_resource_in_two_files_is_served_once(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    assert zone.resources is not None
    (zone.resources / "zz-copy.yaml").write_text(
        as_yaml(dataplane("redis-1", "stolen", address="192.0.2.99"))
    )
    wait_for(lambda: bool(log_lines(zone, "zz-copy.yaml", "redis-1")))
    assert rcode(zone, "stolen.mesh") == dns.rcode.NXDOMAIN
    status, body = zone.api("GET", "/meshes/default/dataplanes/redis-1")
    assert status == 200 and body["networking"]["address"] == "192.0.2.10"


def test_a_resource_moved_to_another_file_stays_served(zone_process) -> None:
    """Split a file: the Dataplane is written to its new file, then taken out of the old."""
    zone: ZoneProcess = zone_process()
    assert zone.resources is not None
    old, new = zone.resources / "b-old.yaml", zone.resources / "a-new.yaml"
    old.write_text(as_yaml(dataplane("cache-1", "cache"), dataplane("q-1", "queue")))
    wait_for(lambda: resolves(zone, "cache.mesh")() and resolves(zone, "queue.mesh")())
    vip = services(zone)["default", "cache"]["vip"]

    new.write_text(as_yaml(dataplane("cache-1", "cache")))
    old.write_text(as_yaml(dataplane("q-1", "queue")))
    time.sleep(LIVE_WITHIN)
    assert address_of(zone, "cache.mesh") == [vip]
    assert services(zone)["default", "cache"]["vip"] == vip
    assert zone.api("GET", "/meshes/default/dataplanes/cache-1")[0] == 200
    assert resolves(zone, "queue.mesh")()


def test_a_file_renamed_keeps_its_services_and_vips(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    assert zone.resources is not None
    path = zone.resources / "cache.yaml"
    path.write_text(as_yaml(dataplane("cache-1", "cache")))
    wait_for(resolves(zone, "cache.mesh"))
    vip = services(zone)["default", "cache"]["vip"]

    path.rename(zone.resources / "cache-renamed.yaml")
    time.sleep(LIVE_WITHIN)
    assert address_of(zone, "cache.mesh") == [vip]
    assert zone.api("GET", "/meshes/default/dataplanes/cache-1")[0] == 200


def test_a_file_with_yaml_timestamps_is_served_by_the_api(zone_process) -> None:
    """`kumactl get -o yaml` output has timestamps; GET must still answer JSON."""
    zone: ZoneProcess = zone_process()
    assert zone.resources is not None
    (zone.resources / "timed.yaml").write_text(
        as_yaml(dataplane("timed-1", "timed")).replace(
            "type: Dataplane\n", "type: Dataplane\ncreationTime: 2024-01-01T00:00:00Z\n"
        )
    )
    wait_for(resolves(zone, "timed.mesh"))
    status, raw = zone.http("api", "GET", "/meshes/default/dataplanes/timed-1")
    assert status == 200, raw
    assert json.loads(raw)["creationTime"] == "2024-01-01T00:00:00Z"
    assert zone.http("api", "GET", "/meshes/default/dataplanes")[0] == 200
