"""A client gets its own mesh's names, chosen by the query's source address."""

from __future__ import annotations

import ipaddress
from typing import Any

import dns.rcode
import dns.rdatatype
import pytest

from tests.builders import dataplane
from tests.kzprocess import ZoneProcess

PAYMENTS_CLIENT = "127.0.0.2"
DEFAULT_CLIENT = "127.0.0.3"
UNKNOWN_CLIENT = "127.0.0.1"


def addresses(answer: Any, rdtype: str = "A") -> list[str]:
    wanted = dns.rdatatype.from_text(rdtype)
    return sorted(
        rdata.address for rrset in answer.answer if rrset.rdtype == wanted for rdata in rrset
    )


@pytest.fixture
def zone(zone_process) -> ZoneProcess:
    """The sample zone plus one client Dataplane per mesh, on two loopback addresses."""
    process: ZoneProcess = zone_process()
    for mesh, address, service in [
        ("payments", PAYMENTS_CLIENT, "payments-client"),
        ("default", DEFAULT_CLIENT, "default-client"),
    ]:
        status, body = process.api(
            "PUT",
            f"/meshes/{mesh}/dataplanes/client-1",
            dataplane("client-1", service, mesh=mesh, address=address, port=9999),
        )
        assert status == 201, body
    return process


def vip(zone: ZoneProcess, mesh: str, service: str) -> dict[str, Any]:
    found = [i for i in zone.vips()["items"] if (i["mesh"], i["service"]) == (mesh, service)]
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_each_mesh_sees_its_own_redis(zone: ZoneProcess, tcp: bool) -> None:
    payments_redis = vip(zone, "payments", "redis")
    default_redis = vip(zone, "default", "redis")
    assert payments_redis["vip"] != default_redis["vip"]
    assert payments_redis["vip6"] != default_redis["vip6"]

    answer = zone.query("redis.mesh", source=PAYMENTS_CLIENT, tcp=tcp)
    assert answer.rcode() == dns.rcode.NOERROR
    assert addresses(answer) == [payments_redis["vip"]]
    answer = zone.query("redis.mesh", "AAAA", source=PAYMENTS_CLIENT, tcp=tcp)
    assert addresses(answer, "AAAA") == [payments_redis["vip6"]]

    answer = zone.query("redis.mesh", source=DEFAULT_CLIENT, tcp=tcp)
    assert answer.rcode() == dns.rcode.NOERROR
    assert addresses(answer) == [default_redis["vip"]]
    answer = zone.query("redis.mesh", "AAAA", source=DEFAULT_CLIENT, tcp=tcp)
    assert addresses(answer, "AAAA") == [default_redis["vip6"]]


def test_an_unknown_client_gets_mesh_default(zone: ZoneProcess) -> None:
    default_redis = vip(zone, "default", "redis")
    answer = zone.query("redis.mesh", source=UNKNOWN_CLIENT)
    assert addresses(answer) == [default_redis["vip"]]
    assert zone.query("ledger.mesh", source=UNKNOWN_CLIENT).rcode() == dns.rcode.NXDOMAIN


def test_payments_only_names_are_nxdomain_for_default_clients(zone: ZoneProcess) -> None:
    ledger = vip(zone, "payments", "ledger")
    answer = zone.query("ledger.mesh", source=PAYMENTS_CLIENT)
    assert addresses(answer) == [ledger["vip"]]
    for rdtype in ("A", "AAAA"):
        answer = zone.query("ledger.mesh", rdtype, source=DEFAULT_CLIENT)
        assert answer.rcode() == dns.rcode.NXDOMAIN
        assert answer.answer == []
        assert any(rrset.rdtype == dns.rdatatype.SOA for rrset in answer.authority)
    # And the other way round: default-only names are NXDOMAIN in payments.
    assert zone.query("frontend.mesh", source=DEFAULT_CLIENT).rcode() == dns.rcode.NOERROR
    assert zone.query("frontend.mesh", source=PAYMENTS_CLIENT).rcode() == dns.rcode.NXDOMAIN
    assert (
        zone.query("echo-server.echo-example.svc.1010.mesh", source=PAYMENTS_CLIENT).rcode()
        == dns.rcode.NXDOMAIN
    )


def test_reverse_names_stay_in_their_mesh(zone: ZoneProcess) -> None:
    ledger = vip(zone, "payments", "ledger")
    reverse = ipaddress.ip_address(ledger["vip"]).reverse_pointer
    answer = zone.query(reverse, "PTR", source=PAYMENTS_CLIENT)
    assert [rdata.target.to_text() for rrset in answer.answer for rdata in rrset] == [
        "ledger.mesh."
    ]
    answer = zone.query(reverse, "PTR", source=DEFAULT_CLIENT)
    assert answer.rcode() == dns.rcode.NXDOMAIN
    assert answer.answer == []


def test_a_client_moved_to_another_mesh_follows_at_once(zone: ZoneProcess) -> None:
    default_redis = vip(zone, "default", "redis")
    payments_redis = vip(zone, "payments", "redis")
    status, _ = zone.api("DELETE", "/meshes/payments/dataplanes/client-1")
    assert status == 200
    # 127.0.0.2 is no Dataplane now: it gets mesh default.
    assert addresses(zone.query("redis.mesh", source=PAYMENTS_CLIENT)) == [default_redis["vip"]]
    status, _ = zone.api(
        "PUT",
        "/meshes/payments/dataplanes/client-2",
        dataplane(
            "client-2", "payments-client", mesh="payments", address=PAYMENTS_CLIENT, port=9999
        ),
    )
    assert status == 201
    assert addresses(zone.query("redis.mesh", source=PAYMENTS_CLIENT)) == [payments_redis["vip"]]


def test_the_same_address_in_two_meshes_gets_default(zone: ZoneProcess) -> None:
    """An ambiguous address must not see another mesh's names."""
    status, _ = zone.api(
        "PUT",
        "/meshes/default/dataplanes/client-dup",
        dataplane("client-dup", "default-client", address=PAYMENTS_CLIENT, port=9999),
    )
    assert status == 201
    assert addresses(zone.query("redis.mesh", source=PAYMENTS_CLIENT)) == [
        vip(zone, "default", "redis")["vip"]
    ]
    assert zone.query("ledger.mesh", source=PAYMENTS_CLIENT).rcode() == dns.rcode.NXDOMAIN
