"""A real federation on loopback: a global and three zones, mutual TLS, real certificates.

One federation is shared by the module (starting it costs a few seconds); every
test starts from it running and synced (the C{fed} fixture restarts what an
earlier test left stopped).  Tests that need other processes (impostor zones, an
insecure pair) start them in a group stopped at the end of the test.
"""

from __future__ import annotations

import datetime
import functools
import json
import random
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.rcode
import dns.rdatatype
import pytest

from tests import builders
from tests.fedprocess import (
    GlobalProcess,
    ProcessGroup,
    make_certs,
    parse_metrics,
    start_zone,
    wait_until,
)
from tests.kzprocess import REPO, ZoneProcess

ZONES = ("zone-1", "zone-2", "zone-3")
#: A Dataplane of mesh payments in each zone, so that DNS can be asked as that mesh.
PAYMENTS_CLIENT = {"zone-1": "127.0.0.11", "zone-2": "127.0.0.12", "zone-3": "127.0.0.13"}
#: Not a Dataplane anywhere: gets mesh default.
DEFAULT_CLIENT = "127.0.0.1"
#: Long enough for a zone's reconnection backoff (at most 10 s) and a full sync.
SYNC_TIMEOUT = 40.0

Key = tuple[str, str]
Row = tuple[str, str]


# -- resources ---------------------------------------------------------------------


def write_resources(directory: Path, *documents: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "federation-test.yaml").write_text(builders.as_yaml(*documents))


def registered(zone: ZoneProcess) -> set[Key]:
    """The services a zone's own API says it has (Dataplane inbounds and gateways)."""
    status, meshes = zone.api("GET", "/meshes")
    assert status == 200, meshes
    services: set[Key] = set()
    for mesh in (item["name"] for item in meshes["items"]):
        status, listing = zone.api("GET", f"/meshes/{mesh}/dataplanes")
        assert status == 200, listing
        for item in listing["items"]:
            networking = item.get("networking", {})
            tagged = [*networking.get("inbound", []), networking.get("gateway") or {}]
            for tags in (t.get("tags", {}) for t in tagged):
                if "kuma.io/service" in tags:
                    services.add((mesh, tags["kuma.io/service"]))
    return services


# -- the VIP table and DNS ---------------------------------------------------------


def rows(document: dict[str, Any]) -> dict[Key, Row]:
    """A /vips body as {(mesh, service): (vip, vip6)}; a key listed twice fails."""
    table: dict[Key, Row] = {}
    for item in document["items"]:
        key = (item["mesh"], item["service"])
        assert key not in table, f"{key} is listed twice in /vips"
        table[key] = (item["vip"], item["vip6"])
    return table


def item_of(document: dict[str, Any], mesh: str, service: str) -> dict[str, Any] | None:
    found = [i for i in document["items"] if (i["mesh"], i["service"]) == (mesh, service)]
    return found[0] if found else None


def addresses(answer: Any, rdtype: str) -> list[str]:
    wanted = dns.rdatatype.from_text(rdtype)
    return sorted(
        rdata.address for rrset in answer.answer if rrset.rdtype == wanted for rdata in rrset
    )


def resolve(
    zone: ZoneProcess, name: str, mesh: str = "default"
) -> tuple[int, list[str], list[str]]:
    """(rcode of the A query, A addresses, AAAA addresses) as a client of C{mesh} sees them."""
    source = PAYMENTS_CLIENT[zone.zone] if mesh == "payments" else DEFAULT_CLIENT
    a = zone.query(name, "A", source=source)
    aaaa = zone.query(name, "AAAA", source=source)
    return a.rcode(), addresses(a, "A"), addresses(aaaa, "AAAA")


def sync_status(zone: ZoneProcess) -> dict[str, Any]:
    status, document = zone.api("GET", "/")
    assert status == 200, document
    sync: dict[str, Any] | None = document["sync"]
    assert sync is not None, "this zone does not sync"
    return sync


def running(process: GlobalProcess | ZoneProcess) -> bool:
    return process.process is not None and process.process.poll() is None


# -- the federation ----------------------------------------------------------------


@dataclass
class Federation:
    workdir: Path
    certs: Path
    global_: GlobalProcess
    zones: dict[str, ZoneProcess]

    def ensure_running(self) -> None:
        """Start again whatever an earlier test left stopped or killed."""
        if not running(self.global_):
            self.global_.start()
        for zone in self.zones.values():
            if not running(zone):
                zone.start()

    def in_sync(self) -> bool:
        """Every zone connected, acknowledged the global's table and serves it."""
        table = self.global_.vips()
        states = self.global_.zones()
        for name, zone in self.zones.items():
            state = states.get(name)
            assert state is not None, f"{name} not in /zones"
            assert state["state"] == "online", state
            assert state["ackedVersion"] == table["version"], state
            assert sync_status(zone)["connected"], f"{name} not connected"
            served = zone.vips()
            assert rows(served) == rows(table), f"{name} serves another table"
            assert not [i for i in served["items"] if i["provisional"]], name
        expected = set().union(*(registered(zone) for zone in self.zones.values()))
        assert set(rows(table)) == expected
        return True

    def wait_synced(self) -> None:
        wait_until(self.in_sync, SYNC_TIMEOUT, 0.25, "the federation is in sync")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CA for the module: the global (localhost, 127.0.0.1) and zones 1-3 and 9."""
    return make_certs(
        tmp_path_factory.mktemp("certs"),
        ["localhost", "127.0.0.1"],
        ["zone-1", "zone-2", "zone-3", "zone-9"],
    )


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another CA, whose zone-4 certificate the federation must not accept."""
    return make_certs(
        tmp_path_factory.mktemp("other-certs"), ["localhost", "127.0.0.1"], ["zone-4"]
    )


@pytest.fixture(scope="module")
def federation(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, certs: Path
) -> Federation:
    """A global and zones 1-3: zone-1 and zone-2 from zones/, zone-3 a small inventory."""
    workdir = tmp_path_factory.mktemp("federation")
    group = ProcessGroup()
    request.addfinalizer(group.stop_all)
    resources: dict[str, Path] = {}
    for name in ZONES:
        directory = resources[name] = workdir / f"resources-{name}"
        if name != "zone-3":
            shutil.copytree(REPO / "zones" / name, directory)
        client = builders.dataplane(
            f"client-{name}", "payments-client", mesh="payments", address=PAYMENTS_CLIENT[name]
        )
        write_resources(directory, client)
    (resources["zone-3"] / "only-zone-3.yaml").write_text(
        builders.as_yaml(builders.dataplane("stock-1", "stock", address="203.0.113.30"))
    )
    # Zone sync listens on the default interface (every address) so that 127.0.0.2,
    # a name its certificate lacks, reaches it too; all traffic stays on loopback.
    global_ = group.add(GlobalProcess(workdir, certs))
    global_.start()
    zones = {
        name: start_zone(workdir, name, global_.address, certs, resources[name], group=group)
        for name in ZONES
    }
    return Federation(workdir, certs, global_, zones)


@pytest.fixture
def fed(federation: Federation) -> Federation:
    """The shared federation, running and in sync."""
    federation.ensure_running()
    federation.wait_synced()
    return federation


@pytest.fixture
def extra(request: pytest.FixtureRequest) -> ProcessGroup:
    """Processes of one test, stopped at its end."""
    group = ProcessGroup()
    request.addfinalizer(group.stop_all)
    return group


# -- 1. one table, every name everywhere -------------------------------------------


def test_a_service_of_one_zone_resolves_the_same_in_every_zone(fed: Federation) -> None:
    zone1, zone2, zone3 = (fed.zones[name] for name in ZONES)
    assert ("default", "web") in registered(zone2)
    assert ("default", "web") not in registered(zone1) | registered(zone3)

    rcode, web_a, web_aaaa = resolve(zone2, "web.mesh")
    assert rcode == dns.rcode.NOERROR
    assert len(web_a) == 1 and len(web_aaaa) == 1
    web = item_of(fed.global_.vips(), "default", "web")
    assert web is not None
    assert (web_a, web_aaaa) == ([web["vip"]], [web["vip6"]])
    assert web["zones"] == ["zone-2"]
    for zone in (zone1, zone3):
        assert resolve(zone, "web.mesh") == (dns.rcode.NOERROR, web_a, web_aaaa), zone.zone
        assert resolve(zone, "WEB.mesh")[1:] == (web_a, web_aaaa), zone.zone

    # A service of both zone-1 and zone-2 is one row naming both.
    backend = item_of(fed.global_.vips(), "default", "backend")
    assert backend is not None and backend["zones"] == ["zone-1", "zone-2"]
    # Mesh payments: zone-2's fraud-check, asked by a payments client of zone-3.
    fraud = item_of(fed.global_.vips(), "payments", "fraud-check")
    assert fraud is not None
    assert resolve(zone3, "fraud-check.mesh", "payments") == (
        dns.rcode.NOERROR,
        [fraud["vip"]],
        [fraud["vip6"]],
    )
    assert resolve(zone3, "fraud-check.mesh")[0] == dns.rcode.NXDOMAIN  # not in default


def test_external_services_resolve_nowhere(fed: Federation) -> None:
    zone1, zone2 = fed.zones["zone-1"], fed.zones["zone-2"]
    # They exist, in the zones that define them ...
    assert zone1.api("GET", "/meshes/default/external-services/httpbin")[0] == 200
    assert zone2.api("GET", "/meshes/default/external-services/stripe")[0] == 200
    # ... but get no VIP and no name anywhere.
    processes: list[GlobalProcess | ZoneProcess] = [fed.global_, *fed.zones.values()]
    for process in processes:
        services = {service for _, service in rows(process.vips())}
        assert not services & {"httpbin", "stripe"}
    for zone in fed.zones.values():
        for name in ("httpbin.mesh", "stripe.mesh"):
            rcode, a, aaaa = resolve(zone, name)
            assert (rcode, a, aaaa) == (dns.rcode.NXDOMAIN, [], []), (zone.zone, name)


def test_every_zone_serves_the_global_table(fed: Federation) -> None:
    table = fed.global_.vips()
    # What the table must hold, read from each zone's own API, not from the table.
    expected = set().union(*(registered(zone) for zone in fed.zones.values()))
    assert {("default", "web"), ("default", "stock"), ("payments", "ledger")} <= expected
    assert set(rows(table)) == expected
    for zone in fed.zones.values():
        served = zone.vips()
        assert rows(served) == rows(table), zone.zone
        assert [i["provisional"] for i in served["items"]] == [False] * len(served["items"])
        assert served["version"] == table["version"]
        # The SOA serial is the table version, the same in every zone.
        soa = zone.query("mesh", "SOA")
        assert [r.serial for rrset in soa.answer for r in rrset] == [table["version"]]


# -- 2. churn ----------------------------------------------------------------------


def test_random_churn_converges_to_one_table(fed: Federation) -> None:
    rng = random.Random(20240611)
    services = {
        "default": [f"churn-{n}" for n in ("alpha", "bravo", "charlie", "delta", "echo", "fox")],
        "payments": ["churn-gold", "churn-silver"],
    }
    #: What each zone holds through the API: {(mesh, name): services}.
    model: dict[str, dict[tuple[str, str], tuple[str, ...]]] = {z: {} for z in ZONES}
    operations = 0
    for step in range(60):
        zone_name = rng.choice(ZONES)
        zone, held = fed.zones[zone_name], model[zone_name]
        if held and rng.random() < 0.4:
            mesh, name = rng.choice(sorted(held))
            status, body = zone.api("DELETE", f"/meshes/{mesh}/dataplanes/{name}")
            assert status == 200, (step, body)
            del held[(mesh, name)]
        else:
            mesh = rng.choice(["default", "default", "payments"])
            name = f"churn-dp-{rng.randrange(6)}"
            chosen = tuple(rng.sample(services[mesh], rng.choice([1, 1, 2])))
            address = f"192.0.2.{100 + rng.randrange(100)}"
            status, body = zone.api(
                "PUT",
                f"/meshes/{mesh}/dataplanes/{name}",
                builders.dataplane(name, *chosen, mesh=mesh, address=address),
            )
            assert status == (200 if (mesh, name) in held else 201), (step, body)
            held[(mesh, name)] = chosen
        operations += 1
    assert operations == 60

    churned = {(mesh, s) for mesh, names in services.items() for s in names}
    by_zone = {
        name: {(mesh, s) for (mesh, _), chosen in model[name].items() for s in chosen}
        for name in ZONES
    }
    for name, zone in fed.zones.items():
        assert registered(zone) & churned == by_zone[name], name
    expected = set().union(*(registered(zone) for zone in fed.zones.values()))

    def converged() -> bool:
        table = rows(fed.global_.vips())
        assert set(table) == expected, set(table) ^ expected
        for zone in fed.zones.values():
            assert rows(zone.vips()) == table, zone.zone
        return True

    wait_until(converged, SYNC_TIMEOUT, 0.25, "every zone serves the global's table")
    fed.wait_synced()

    table = fed.global_.vips()
    vips = [i["vip"] for i in table["items"]]
    vips6 = [i["vip6"] for i in table["items"]]
    assert len(set(vips)) == len(vips), "an IPv4 VIP is held by two services"
    assert len(set(vips6)) == len(vips6), "an IPv6 VIP is held by two services"
    for item in table["items"]:
        key = (item["mesh"], item["service"])
        if key in churned:
            assert item["zones"] == [z for z in ZONES if key in by_zone[z]], item
    # Every churned service still registered resolves everywhere to its VIP;
    # every one no longer registered anywhere resolves nowhere.
    table_rows = rows(table)
    for mesh, service in sorted(churned):
        for zone in fed.zones.values():
            rcode, a, aaaa = resolve(zone, f"{service}.mesh", mesh)
            if (mesh, service) in expected:
                vip, vip6 = table_rows[(mesh, service)]
                assert (rcode, a, aaaa) == (dns.rcode.NOERROR, [vip], [vip6]), (zone.zone, service)
            else:
                assert rcode == dns.rcode.NXDOMAIN, (zone.zone, service)


# -- metrics -----------------------------------------------------------------------


def test_the_global_exports_sync_metrics(fed: Federation) -> None:
    metrics = fed.global_.metrics()
    for name in ZONES:
        assert metrics.get("kumazone_sync_connected", zone=name) == 1.0, name
        assert metrics.get("kumazone_sync_lag_versions", zone=name) == 0.0, name
    assert '\nkumazone_sync_connected{zone="zone-1"} 1.0\n' in metrics.text
    for direction in ("in", "out"):
        assert (
            metrics.get("kumazone_sync_messages_total", zone="zone-1", direction=direction) or 0
        ) > 0, direction
        assert (
            metrics.get("kumazone_sync_bytes_total", zone="zone-1", direction=direction) or 0
        ) > 0, direction
    assert (metrics.get("kumazone_sync_messages_total", zone="zone-1", type="Table") or 0) >= 1

    # A change in zone-1 moves its counters: an inventory in, a table out.
    zone1 = fed.zones["zone-1"]
    status, body = zone1.api(
        "PUT",
        "/meshes/default/dataplanes/metrics-1",
        builders.dataplane("metrics-1", "metrics-probe", address="192.0.2.250"),
    )
    assert status in (200, 201), body

    def counted() -> bool:
        now = fed.global_.metrics()
        for sample in ("kumazone_sync_messages_total", "kumazone_sync_bytes_total"):
            for direction in ("in", "out"):
                before = metrics.get(sample, zone="zone-1", direction=direction) or 0
                after = now.get(sample, zone="zone-1", direction=direction) or 0
                assert after > before, (sample, direction, before, after)
        assert now.get("kumazone_sync_lag_versions", zone="zone-1") == 0.0
        return True

    wait_until(counted, 15, 0.25, "zone-1's sync counters moved")


def test_sync_bytes_from_a_zone_are_counted_under_its_name(fed: Federation) -> None:
    """What a zone says it sent is what the global says it received from that zone."""
    zone1 = fed.zones["zone-1"]
    zone1.stop()
    # Once the global has seen the old connection close, nothing more comes from it.
    wait_until(
        lambda: fed.global_.zones()["zone-1"]["state"] == "offline", 20, 0.1, "zone-1 offline"
    )
    received_before = (
        fed.global_.metrics().get("kumazone_sync_bytes_total", zone="zone-1", direction="in") or 0
    )
    zone1.start()  # its counters start from 0, with one new connection
    fed.wait_synced()

    def counted_alike() -> bool:
        received = (
            fed.global_.metrics().get("kumazone_sync_bytes_total", zone="zone-1", direction="in")
            or 0
        )
        status, text = zone1.http("diagnostics", "GET", "/metrics")
        assert status == 200
        sent = parse_metrics(text.decode()).get(
            "kumazone_sync_bytes_total", zone="zone-1", direction="out"
        )
        assert sent, "the zone counts no bytes sent"
        assert received - received_before == sent, (received - received_before, sent)
        return True

    wait_until(counted_alike, 15, 0.5, "the global counts zone-1's bytes as zone-1 sent them")


# -- 5. security -------------------------------------------------------------------


def never_syncs(zones: list[ZoneProcess], global_: GlobalProcess, seconds: float) -> None:
    """For C{seconds}, no zone of C{zones} is connected or known to the global."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        known = global_.zones()
        for zone in zones:
            assert running(zone), f"{zone.zone} exited:\n{zone.log()}"
            assert sync_status(zone)["connected"] is False, f"{zone.zone} synced:\n{zone.log()}"
            assert zone.vips()["version"] == 0, f"{zone.zone} received a table"
        assert not {"zone-4", "zone-9"} & set(known), known
        time.sleep(0.25)


def log_since(process: GlobalProcess | ZoneProcess, mark: int) -> str:
    return process.log()[mark:]


def test_the_global_refuses_a_zone_that_claims_another_zones_name(
    fed: Federation, extra: ProcessGroup, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    zone2_before = fed.global_.zones()["zone-2"]
    mark = len(fed.global_.log())
    impostor = start_zone(
        tmp_path,
        "zone-2",
        fed.global_.address,
        fed.certs,
        empty,
        cert_name="zone-1",
        group=extra,
    )

    def refusal() -> str:
        lines = [
            line
            for line in log_since(fed.global_, mark).splitlines()
            if "refused" in line and "zone-1" in line and "zone-2" in line
        ]
        assert lines
        return lines[0]

    line = wait_until(refusal, 15, 0.2, "the global logs the refusal naming zone-1 and zone-2")
    assert "certificate" in line
    never_syncs([impostor], fed.global_, 3.0)
    # The real zone-2 kept its connection and its services.
    zone2 = fed.global_.zones()["zone-2"]
    assert zone2["state"] == "online"
    assert zone2["services"] == zone2_before["services"]
    assert sync_status(fed.zones["zone-2"])["connected"]


def test_a_refused_zone_is_counted_and_logged_once_per_connection(
    fed: Federation, extra: ProcessGroup, tmp_path: Path
) -> None:
    """One refused connection: one refusal line, one count under its reason."""
    empty = tmp_path / "empty"
    empty.mkdir()
    before = fed.global_.metrics()
    mark = len(fed.global_.log())
    impostor = start_zone(
        tmp_path,
        "zone-3",
        fed.global_.address,
        fed.certs,
        empty,
        cert_name="zone-2",
        group=extra,
    )
    wait_until(
        lambda: "claims zone 'zone-3'" in log_since(fed.global_, mark),
        15,
        0.2,
        "the global refuses the impostor",
    )
    impostor.stop()
    time.sleep(0.5)
    after = fed.global_.metrics()

    def grew(reason: str) -> float:
        name = "kumazone_sync_refused_total"
        return (after.get(name, reason=reason) or 0) - (before.get(name, reason=reason) or 0)

    log = log_since(fed.global_, mark)
    refused = re.findall(r"zone connection from (\S+) refused: .* claims zone 'zone-3'", log)
    closed = re.findall(r"sync connection from (\S+) closed before hello", log)
    assert refused
    assert grew("wrong-zone") == len(refused)
    # A connection closed before its hello is another connection than a refused one
    # (the impostor may be stopped in the middle of a handshake).
    assert not set(refused) & set(closed), (
        f"a refused connection is logged a second time as closed before hello:\n{log}"
    )
    assert grew("before-hello") == len(closed), "a refused connection is counted twice"


def test_a_zone_with_a_certificate_of_another_ca_is_refused(
    fed: Federation, extra: ProcessGroup, tmp_path: Path, other_certs: Path
) -> None:
    """The zone trusts the federation's CA, so it is the global that must say no."""
    resources = tmp_path / "resources"
    write_resources(resources, builders.dataplane("foreign-1", "foreign", address="192.0.2.77"))
    mark = len(fed.global_.log())
    foreign = start_zone(
        tmp_path,
        "zone-4",
        fed.global_.address,
        None,
        resources,
        group=extra,
        args=[
            f"--tls-cert={other_certs / 'zone-4.pem'}",
            f"--tls-key={other_certs / 'zone-4-key.pem'}",
            f"--tls-ca={fed.certs / 'ca.pem'}",
        ],
    )

    def refusal() -> str:
        lines = [
            line
            for line in log_since(fed.global_, mark).splitlines()
            if "before hello" in line or "refused" in line
        ]
        assert lines
        return lines[0]

    line = wait_until(refusal, 15, 0.2, "the global logs the refused connection")
    assert "certificate" in line.lower() or "verif" in line.lower(), line
    never_syncs([foreign], fed.global_, 3.0)
    assert ("default", "foreign") not in rows(fed.global_.vips())
    assert "the global refused" in foreign.log() or "could not sync" in foreign.log()


def test_a_zone_refuses_a_global_whose_certificate_lacks_the_name_it_dials(
    fed: Federation, extra: ProcessGroup, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    # 127.0.0.2 reaches the same global (loopback), but its certificate names
    # only localhost and 127.0.0.1.
    misdialled = start_zone(
        tmp_path, "zone-9", f"127.0.0.2:{fed.global_.kds_port}", fed.certs, empty, group=extra
    )

    def verification_error() -> str:
        lines = [
            line
            for line in misdialled.log().splitlines()
            if "could not sync" in line or "lost the global" in line
        ]
        assert lines
        return lines[0]

    line = wait_until(verification_error, 15, 0.2, "the zone logs why it cannot sync")
    assert any(word in line.lower() for word in ("verif", "certificate", "127.0.0.2")), line
    never_syncs([misdialled], fed.global_, 3.0)


def test_a_zone_with_global_and_no_tls_flags_does_not_start(
    fed: Federation, tmp_path: Path
) -> None:
    zone = ZoneProcess(tmp_path, None, zone="zone-1", args=[f"--global={fed.global_.address}"])
    result = subprocess.run(
        zone.command(), cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    output = (result.stdout + result.stderr).strip()
    assert len(output.splitlines()) == 1, output
    assert "--insecure" in output and "--tls-cert" in output, output
    assert "Traceback" not in output


def test_insecure_on_both_sides_syncs_without_tls(extra: ProcessGroup, tmp_path: Path) -> None:
    global_ = extra.add(GlobalProcess(tmp_path, None, args=["--insecure"]))
    global_.start()
    resources = tmp_path / "resources"
    write_resources(resources, builders.dataplane("plain-1", "plain", address="192.0.2.88"))
    zone = start_zone(
        tmp_path,
        "zone-1",
        f"127.0.0.1:{global_.kds_port}",
        None,
        resources,
        args=["--insecure"],
        group=extra,
    )
    wait_until(lambda: sync_status(zone)["connected"], 20, 0.2, "the insecure zone syncs")
    plain = wait_until(
        lambda: item_of(global_.vips(), "default", "plain"), 20, 0.2, "the global has plain"
    )
    assert plain is not None
    assert global_.zones()["zone-1"]["state"] == "online"
    wait_until(
        lambda: resolve(zone, "plain.mesh")[1] == [plain["vip"]],
        20,
        0.2,
        "the zone serves the global's VIP",
    )
    assert "insecure, no TLS" in global_.log()
    assert "insecure, no TLS" in zone.log()


# -- 3. partition ------------------------------------------------------------------


def test_a_partition_keeps_every_name_and_heals(fed: Federation) -> None:
    global_ = fed.global_
    zone1, zone2, zone3 = (fed.zones[name] for name in ZONES)
    table_before = rows(global_.vips())
    zone2_before = zone2.vips()
    kds_port = global_.kds_port

    global_.kill()
    wait_until(
        lambda: not sync_status(zone1)["connected"], 20, 0.1, "zone-1 notices the global is gone"
    )

    status, body = zone1.api(
        "PUT",
        "/meshes/default/dataplanes/late-1",
        builders.dataplane("late-1", "late-arrival", address="192.0.2.240"),
    )
    assert status == 201, body
    # At once in zone-1, provisional.
    rcode, late_a, late_aaaa = resolve(zone1, "late-arrival.mesh")
    assert rcode == dns.rcode.NOERROR and len(late_a) == 1 and len(late_aaaa) == 1
    late = item_of(zone1.vips(), "default", "late-arrival")
    assert late is not None and late["provisional"] is True
    assert ([late["vip"]], [late["vip6"]]) == (late_a, late_aaaa)
    assert late["vip"] not in {vip for vip, _ in table_before.values()}
    # Not in the other zones yet.
    assert resolve(zone2, "late-arrival.mesh")[0] == dns.rcode.NXDOMAIN

    # A zone restarted during the outage serves its stored table.
    zone2.stop()
    zone2.start()
    assert sync_status(zone2)["connected"] is False
    assert rows(zone2.vips()) == rows(zone2_before)
    for item in zone2_before["items"]:
        name = item["names"][0]
        assert resolve(zone2, name, item["mesh"]) == (
            dns.rcode.NOERROR,
            [item["vip"]],
            [item["vip6"]],
        ), name

    # The global comes back on the same port: the provisional VIP becomes everyone's.
    global_.start()
    assert global_.ports["kds"] == kds_port

    def late_resolves(zone: ZoneProcess) -> bool:
        return resolve(zone, "late-arrival.mesh") == (dns.rcode.NOERROR, late_a, late_aaaa)

    for zone in (zone2, zone3):
        wait_until(
            functools.partial(late_resolves, zone),
            SYNC_TIMEOUT,
            0.25,
            f"late-arrival resolves in {zone.zone} with zone-1's VIP",
        )

    def confirmed() -> dict[str, Any]:
        item = item_of(zone1.vips(), "default", "late-arrival")
        assert item is not None and item["provisional"] is False, item
        return item

    item = wait_until(confirmed, SYNC_TIMEOUT, 0.25, "zone-1 takes the global's VIP")
    assert (item["vip"], item["vip6"]) == (late["vip"], late["vip6"])
    assert item_of(global_.vips(), "default", "late-arrival") is not None
    fed.wait_synced()
    table_after = rows(global_.vips())
    assert {key: table_after.get(key) for key in table_before} == table_before


# -- 4. /zones ---------------------------------------------------------------------


def parse_time(value: str) -> float:
    return datetime.datetime.fromisoformat(value).timestamp()


def test_zones_shows_each_zone_and_delete_forgets_one(fed: Federation) -> None:
    global_ = fed.global_
    version = global_.vips()["version"]
    states = global_.zones()
    assert set(ZONES) <= set(states)
    for name, zone in fed.zones.items():
        state = states[name]
        assert state["state"] == "online", state
        assert abs(parse_time(state["lastContact"]) - time.time()) < 30, state
        assert state["services"] == len(registered(zone)), state
        assert state["ackedVersion"] == version, state
    assert global_.api("GET", "/zones/zone-1") == (200, states["zone-1"])
    assert global_.api("GET", "/zones/no-such-zone")[0] == 404

    zone3 = fed.zones["zone-3"]
    only3 = registered(zone3) - registered(fed.zones["zone-1"]) - registered(fed.zones["zone-2"])
    assert ("default", "stock") in only3
    shared = registered(zone3) - only3
    assert ("payments", "payments-client") in shared
    stock_before = rows(global_.vips())[("default", "stock")]

    stopped_at = time.time()
    zone3.stop()
    offline = wait_until(
        lambda: global_.zones()["zone-3"]["state"] == "offline" and global_.zones()["zone-3"],
        20,
        0.2,
        "zone-3 is offline",
    )
    assert parse_time(offline["lastContact"]) >= stopped_at - 1.5, offline
    assert offline["services"] == states["zone-3"]["services"]
    # A zone that is gone keeps its services until an operator deletes it.
    assert only3 <= set(rows(global_.vips()))
    assert global_.metrics().get("kumazone_sync_connected", zone="zone-3") == 0.0

    assert global_.api("DELETE", "/zones/zone-3") == (200, {})
    assert global_.api("GET", "/zones/zone-3")[0] == 404
    assert "zone-3" not in global_.zones()
    assert not only3 & set(rows(global_.vips()))
    for item in global_.vips()["items"]:
        assert "zone-3" not in item["zones"], item

    def dropped(zone: ZoneProcess) -> bool:
        return not only3 & set(rows(zone.vips()))

    for name in ("zone-1", "zone-2"):
        zone = fed.zones[name]
        wait_until(functools.partial(dropped, zone), 20, 0.2, f"{name} drops zone-3's services")
        assert resolve(zone, "stock.mesh")[0] == dns.rcode.NXDOMAIN
        assert resolve(zone, "payments-client.mesh", "payments")[0] == dns.rcode.NOERROR, (
            "a service zone-3 shared with others stays"
        )
    assert global_.api("DELETE", "/zones/zone-3")[0] == 404

    # Zone-3 comes back: it is welcomed with its inventory, and stock gets its VIP again.
    zone3.start()
    back = wait_until(
        lambda: global_.zones()["zone-3"]["state"] == "online" and global_.zones()["zone-3"],
        SYNC_TIMEOUT,
        0.25,
        "zone-3 is back online",
    )
    assert back["services"] == len(registered(zone3))
    fed.wait_synced()
    assert rows(global_.vips())[("default", "stock")] == stock_before


def stock_gone(process: GlobalProcess | ZoneProcess) -> bool:
    return ("default", "stock") not in rows(process.vips())


def test_a_zone_back_with_a_smaller_inventory_takes_its_services_away(fed: Federation) -> None:
    global_, zone3 = fed.global_, fed.zones["zone-3"]
    assert zone3.resources is not None
    stock_file = zone3.resources / "only-zone-3.yaml"
    stock_text = stock_file.read_text()
    stock = rows(global_.vips())[("default", "stock")]
    zone3.stop()
    try:
        stock_file.unlink()
        zone3.start()
        processes: list[GlobalProcess | ZoneProcess] = [global_, *fed.zones.values()]
        for process in processes:
            wait_until(
                functools.partial(stock_gone, process),
                SYNC_TIMEOUT,
                0.25,
                "stock is gone from the table",
            )
        assert resolve(fed.zones["zone-1"], "stock.mesh")[0] == dns.rcode.NXDOMAIN
    finally:
        stock_file.write_text(stock_text)

    # Back in the directory: live again within seconds, with the VIP it had.
    def stock_resolves(zone: ZoneProcess) -> bool:
        return resolve(zone, "stock.mesh")[1:] == ([stock[0]], [stock[1]])

    for zone in fed.zones.values():
        wait_until(
            functools.partial(stock_resolves, zone),
            SYNC_TIMEOUT,
            0.25,
            f"stock resolves in {zone.zone} with its old VIP",
        )


def test_ports_file_of_the_global_names_its_listeners(fed: Federation) -> None:
    ports = json.loads((fed.global_.data_dir / "ports.json").read_text())
    assert set(ports) == {"kds", "api", "diagnostics"}
    assert ports["kds"] == fed.global_.kds_port
    status, document = fed.global_.api("GET", "/")
    assert status == 200 and document["role"] == "global"
    assert document["zones"] >= len(ZONES)


def test_a_synced_zone_stops_at_once_on_sigterm(
    fed: Federation, extra: ProcessGroup, certs: Path
) -> None:
    """Its TLS connection to the global closes first: SIGTERM ends it in well under the
    15 s the process helper would wait before killing it."""
    zone = start_zone(fed.workdir, "zone-9", fed.global_.address, certs, group=extra)
    connected = b'kumazone_sync_connected{zone="zone-9"} 1.0'
    wait_until(
        lambda: connected in zone.http("diagnostics", "GET", "/metrics")[1],
        SYNC_TIMEOUT,
        what="zone-9 connects to the global",
    )
    started = time.monotonic()
    assert zone.stop() in (0, -15)  # twistd ends by the signal it was sent
    assert time.monotonic() - started < 5, f"{time.monotonic() - started:.1f}s"


# -- 6. a big table, stored on another thread -----------------------------------


def test_a_fresh_zone_stores_a_big_table_aside_and_serves_it_after_a_restart(
    extra: ProcessGroup, tmp_path: Path
) -> None:
    """A table of BACKGROUND_ROWS rows or more is written off the reactor: the fresh
    zone acknowledges it once stored, and a restart with the global gone serves it
    from the store, every VIP the same."""
    from kumazone.core.zone import BACKGROUND_ROWS

    global_ = extra.add(GlobalProcess(tmp_path, None, args=["--insecure"]))
    global_.start()
    count = BACKGROUND_ROWS + 200
    bulk = [builders.dataplane(f"bulk-{i}", f"bulk-{i}") for i in range(count)]
    resources = tmp_path / "resources-1"
    resources.mkdir()
    (resources / "bulk.json").write_text(json.dumps(bulk))
    address = f"127.0.0.1:{global_.kds_port}"
    start_zone(tmp_path, "zone-1", address, None, resources, args=["--insecure"], group=extra)
    wait_until(
        lambda: len(global_.vips()["items"]) == count, SYNC_TIMEOUT, 0.25, "the global's table"
    )
    table = rows(global_.vips())
    version = global_.vips()["version"]
    fresh = start_zone(tmp_path, "zone-2", address, None, None, args=["--insecure"], group=extra)
    wait_until(
        lambda: global_.zones()["zone-2"]["ackedVersion"] == version,
        SYNC_TIMEOUT,
        0.25,
        "zone-2 acknowledges the whole table",
    )
    assert rows(fresh.vips()) == table
    global_.stop()
    fresh.stop()
    fresh.start()
    assert rows(fresh.vips()) == table  # from its store
    assert resolve(fresh, f"bulk-{count - 1}.mesh")[1:] == (
        [table[("default", f"bulk-{count - 1}")][0]],
        [table[("default", f"bulk-{count - 1}")][1]],
    )
    assert "cannot store" not in fresh.log()
