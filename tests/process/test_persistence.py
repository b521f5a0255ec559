"""VIPs survive restarts and crashes; freed VIPs are held back; a full range is reported."""

from __future__ import annotations

import json
import random
import re
import sqlite3
import threading
import time
from pathlib import Path

import dns.rcode
import dns.rdatatype
import pytest

from tests.builders import dataplane
from tests.kzprocess import ZoneProcess

#: 6 usable IPv4 VIPs (network and broadcast are never handed out).
TINY = {"KUMA_DNS_SERVER_CIDR": "10.0.0.0/29", "KUMA_DNS_SERVER_CIDR_V6": "fd00::/125"}
TINY_SIZE = 6


def put(zone: ZoneProcess, name: str, *services: str, mesh: str = "default") -> int:
    status, body = zone.api(
        "PUT", f"/meshes/{mesh}/dataplanes/{name}", dataplane(name, *services, mesh=mesh)
    )
    assert status in (200, 201), body
    return status


def delete(zone: ZoneProcess, name: str, mesh: str = "default") -> None:
    status, body = zone.api("DELETE", f"/meshes/{mesh}/dataplanes/{name}")
    assert status == 200, body


def vip_table(zone: ZoneProcess) -> dict[tuple[str, str], tuple[str, str]]:
    return {
        (item["mesh"], item["service"]): (item["vip"], item["vip6"])
        for item in zone.vips()["items"]
    }


def a_record(zone: ZoneProcess, name: str) -> list[str]:
    answer = zone.query(name)
    return sorted(
        rdata.address
        for rrset in answer.answer
        if rrset.rdtype == dns.rdatatype.A
        for rdata in rrset
    )


def stop_gracefully(zone: ZoneProcess) -> None:
    """SIGTERM; twistd re-raises the signal after a clean shutdown, so -15 is fine."""
    assert zone.stop() in (0, -15)
    assert "Server Shut Down." in zone.log()
    assert "Traceback" not in zone.log()


def metric(zone: ZoneProcess, name: str) -> float:
    status, text = zone.http("diagnostics", "GET", "/metrics")
    assert status == 200
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.decode().splitlines()
        if re.match(rf"{re.escape(name)}(\{{|\s)", line)
    ]
    assert values, f"{name} not in /metrics"
    return sum(values)


SERVICES = ["orders", "billing", "search", "auth_api_svc_80", "mail"]


def _create_services(zone: ZoneProcess) -> None:
    for index, service in enumerate(SERVICES):
        put(zone, f"{service.replace('_', '-')}-{index}", service)
    put(zone, "pay-1", "orders", mesh="payments")


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_api_services_keep_their_vips_across_a_restart(zone_process, how: str) -> None:
    zone: ZoneProcess = zone_process()
    _create_services(zone)
    before = vip_table(zone)
    assert ("default", "orders") in before and ("payments", "orders") in before
    answers = {s: a_record(zone, f"{s}.mesh") for s in SERVICES}

    if how == "SIGTERM":
        stop_gracefully(zone)
    else:
        zone.kill()
    zone.start()

    assert vip_table(zone) == before
    for service in SERVICES:
        assert a_record(zone, f"{service}.mesh") == answers[service]
        assert answers[service] == [before["default", service][0]]
    assert a_record(zone, "auth.api.svc.80.mesh") == answers["auth_api_svc_80"]
    # The API resources came back too.
    status, body = zone.api("GET", "/meshes/payments/dataplanes/pay-1")
    assert status == 200 and body == dataplane("pay-1", "orders", mesh="payments")


def test_vips_survive_two_restarts_in_a_row_and_new_services_do_not_move_them(
    zone_process,
) -> None:
    zone: ZoneProcess = zone_process()
    _create_services(zone)
    before = vip_table(zone)
    zone.kill()
    zone.start()
    put(zone, "extra-1", "extra-a", "extra-b", "extra-c")
    after = vip_table(zone)
    assert {k: v for k, v in after.items() if k in before} == before
    stop_gracefully(zone)
    zone.start()
    assert vip_table(zone) == after


def soa_serial(zone: ZoneProcess) -> int:
    answer = zone.query("mesh", "SOA")
    serials = [rdata.serial for rrset in answer.answer for rdata in rrset]
    assert len(serials) == 1, answer
    return serials[0]


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_restart_that_changes_nothing_keeps_the_table_version(zone_process, how: str) -> None:
    """The SOA serial tells how fresh a zone is: a plain restart must not move it."""
    zone: ZoneProcess = zone_process()  # zones/zone-1: three files, two meshes
    _create_services(zone)
    version = zone.vips()["version"]
    assert soa_serial(zone) == version
    if how == "SIGTERM":
        stop_gracefully(zone)
    else:
        zone.kill()
    zone.start()
    assert zone.vips()["version"] == version
    assert soa_serial(zone) == version


def test_delete_and_recreate_gives_the_same_vip(zone_process) -> None:
    zone: ZoneProcess = zone_process(resources=None)
    put(zone, "cache-1", "cache")
    put(zone, "other-1", "other")
    vip = vip_table(zone)["default", "cache"]

    delete(zone, "cache-1")
    assert zone.query("cache.mesh").rcode() == dns.rcode.NXDOMAIN
    assert ("default", "cache") not in vip_table(zone)
    put(zone, "cache-1", "cache")
    assert vip_table(zone)["default", "cache"] == vip

    # Deleted, then the process restarts, then created again: still the same VIP.
    delete(zone, "cache-1")
    zone.kill()
    zone.start()
    assert ("default", "cache") not in vip_table(zone)
    put(zone, "cache-2", "cache")  # another Dataplane, the same service
    assert vip_table(zone)["default", "cache"] == vip
    assert a_record(zone, "cache.mesh") == [vip[0]]


def test_a_freed_vip_is_not_given_to_another_service_during_hold_down(zone_process) -> None:
    zone: ZoneProcess = zone_process(resources=None, env=TINY)
    put(zone, "first-1", "first")
    freed = vip_table(zone)["default", "first"]
    assert freed[0].startswith("10.0.0.")
    delete(zone, "first-1")

    # More services than there are free VIPs: the range fills up around the held one.
    others = [f"svc{n}" for n in range(TINY_SIZE)]
    for service in others:
        put(zone, f"{service}-1", service)
    table = vip_table(zone)
    assert freed not in table.values(), table
    assert freed[0] not in {vip for vip, _ in table.values()}
    assert len(table) == TINY_SIZE - 1  # one VIP is held, one service goes without
    assert "errors" in zone.vips()

    # The hold-down survives a crash.
    zone.kill()
    zone.start()
    table = vip_table(zone)
    assert freed[0] not in {vip for vip, _ in table.values()}
    assert len(table) == TINY_SIZE - 1
    assert "errors" in zone.vips()
    assert metric(zone, "kumazone_vip_services_without_vip") == 1

    # The service that had it gets it back, even with the range full.
    put(zone, "first-2", "first")
    table = vip_table(zone)
    assert table["default", "first"] == freed
    assert a_record(zone, "first.mesh") == [freed[0]]


# -- a crash in the middle of writes --------------------------------------------------

WORKERS = 4
REQUESTS_PER_WORKER = 60


def _writer(
    zone: ZoneProcess, worker: int, seed: int, done: list[int], stop: threading.Event
) -> None:
    rng = random.Random(seed)
    for _ in range(REQUESTS_PER_WORKER):
        if stop.is_set():
            return
        mesh = rng.choice(["default", "default", "payments"])
        name = f"w{worker}-dp{rng.randrange(8)}"
        services = [f"svc-{rng.randrange(40)}" for _ in range(rng.randrange(1, 4))]
        try:
            if rng.random() < 0.3:
                zone.api("DELETE", f"/meshes/{mesh}/dataplanes/{name}")
            else:
                zone.api(
                    "PUT",
                    f"/meshes/{mesh}/dataplanes/{name}",
                    dataplane(name, *services, mesh=mesh),
                )
        except Exception:
            return  # the server died under us: that is the point
        done[worker] += 1


def _services_of_stored_dataplanes(zone: ZoneProcess) -> set[tuple[str, str]]:
    status, meshes = zone.api("GET", "/meshes")
    assert status == 200
    wanted = set()
    for mesh in (item["name"] for item in meshes["items"]):
        status, listing = zone.api("GET", f"/meshes/{mesh}/dataplanes")
        assert status == 200
        for document in listing["items"]:
            for inbound in document["networking"].get("inbound", []):
                wanted.add((mesh, inbound["tags"]["kuma.io/service"]))
    return wanted


def _check_database(path: Path) -> None:
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = db.execute("SELECT mesh, service, vip_offset FROM vips").fetchall()
        offsets = [offset for _, _, offset in rows]
        assert len(offsets) == len(set(offsets))
        stored: set[tuple[str, str]] = set()
        for type_, mesh, document in db.execute("SELECT type, mesh, document FROM resources"):
            if type_ == "Dataplane":
                for inbound in json.loads(document)["networking"].get("inbound", []):
                    stored.add((mesh, inbound["tags"]["kuma.io/service"]))
        assert {(mesh, service) for mesh, service, _ in rows} == stored
    finally:
        db.close()


def test_sigkill_during_concurrent_writes_restarts_consistent(zone_process, tmp_path) -> None:
    zone: ZoneProcess = zone_process(resources=None)
    done = [0] * WORKERS
    stop = threading.Event()
    threads = [
        threading.Thread(target=_writer, args=(zone, w, 1000 + w, done, stop), daemon=True)
        for w in range(WORKERS)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5.0
    while sum(done) < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sum(done) >= 40, f"only {sum(done)} writes in 5 s"
    zone.kill()
    stop.set()
    for thread in threads:
        thread.join(timeout=15)
        assert not thread.is_alive()

    zone.start()
    items = zone.vips()["items"]
    assert "errors" not in zone.vips()
    vips = [item["vip"] for item in items]
    vip6s = [item["vip6"] for item in items]
    assert len(vips) == len(set(vips)), "a VIP is on two services"
    assert len(vip6s) == len(set(vip6s)), "an IPv6 VIP is on two services"
    keys = [(item["mesh"], item["service"]) for item in items]
    assert len(keys) == len(set(keys)), "a service has two VIPs"
    wanted = _services_of_stored_dataplanes(zone)
    assert wanted, "nothing was stored before the crash"
    assert set(keys) == wanted
    for mesh, service in sorted(wanted)[:5]:
        if mesh == "default":
            assert a_record(zone, f"{service}.mesh") == [
                item["vip"] for item in items if (item["mesh"], item["service"]) == (mesh, service)
            ]

    stop_gracefully(zone)
    _check_database(zone.data_dir / "kumazone.sqlite3")


# -- exhaustion ----------------------------------------------------------------------


def test_exhausted_range_is_reported_and_the_rest_is_served(zone_process, tmp_path) -> None:
    resources = tmp_path / "tiny"
    resources.mkdir()
    services = [f"svc{n}" for n in range(TINY_SIZE + 3)]
    (resources / "many.yaml").write_text(
        "---\n".join(json.dumps(dataplane(f"{service}-1", service)) + "\n" for service in services)
    )
    zone: ZoneProcess = zone_process(resources=resources, env=TINY)

    document = zone.vips()
    items = document["items"]
    assert len(items) == TINY_SIZE
    assert len({item["vip"] for item in items}) == TINY_SIZE
    errors = document.get("errors")
    assert errors, document
    missing = {f"default/{s}" for s in services} - {f"default/{i['service']}" for i in items}
    assert len(missing) == 3
    assert any(
        "exhausted" in error["error"] and set(error["services"]) == missing for error in errors
    ), errors

    assert re.search(r"exhausted", zone.log(), re.IGNORECASE), zone.log()
    assert metric(zone, "kumazone_vip_services_without_vip") == 3
    assert metric(zone, "kumazone_vips_allocated") == TINY_SIZE

    for item in items:
        assert a_record(zone, f"{item['service']}.mesh") == [item["vip"]]
    for entry in missing:
        assert zone.query(f"{entry.split('/')[1]}.mesh").rcode() == dns.rcode.NXDOMAIN

    # Still answering API writes, and the error stays while the range is full.
    put(zone, "late-1", "late")
    assert zone.vips().get("errors")
    assert a_record(zone, f"{items[0]['service']}.mesh") == [items[0]["vip"]]
    assert zone.api("GET", "/")[0] == 200


def test_a_new_cidr_after_a_restart_moves_every_vip_into_it(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    _create_services(zone)
    before = vip_table(zone)
    stop_gracefully(zone)
    zone.env = {"KUMA_DNS_SERVER_CIDR": "10.128.0.0/16", "KUMA_DNS_SERVER_CIDR_V6": "fd42::/64"}
    zone.start()
    after = vip_table(zone)
    assert set(after) == set(before)
    assert all(
        vip.startswith("10.128.") and vip6.startswith("fd42:") for vip, vip6 in after.values()
    )
    assert len({vip for vip, _ in after.values()}) == len(after)
    assert "VIP range changed" in zone.log()
    assert a_record(zone, "orders.mesh") == [after["default", "orders"][0]]
    # And the new table is the one that persists.
    zone.kill()
    zone.start()
    assert vip_table(zone) == after
