"""The dataplane role for real: a zone with TLS on its dataplane port, dataplanes of two meshes.

Certificates come from `kumazone certs --zone zone-1 --zone-host 127.0.0.1
--dataplane default/web-1 --dataplane other/db-1`.  The zone serves DNS on
127.0.0.1 and answers each client for the mesh of the Dataplane at its address:
127.0.0.2 is one of mesh "other", 127.0.0.1 none (so the default mesh).  Each
dataplane's answers are compared, octet for octet, with the zone's answers to the
same queries from a client of the dataplane's mesh.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pwd
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from kumazone.core.names import nameserver_name
from tests.builders import as_yaml, dataplane
from tests.kzprocess import TWISTD, ControlPlaneProcess, ZoneProcess
from tests.process.test_plugin import kumazone_command

#: The zone's services: both name forms, a form two services want, case.
DEFAULT_SERVICES = ["redis", "backend", "echo-server_echo-example_svc_1010", "a.b", "a_b", "Web"]
OTHER_SERVICES = ["redis", "db_primary"]
#: The source address of a client in mesh "other" (a Dataplane of that mesh has it).
OTHER_CLIENT = "127.0.0.2"


def free_port() -> int:
    """A TCP port free right now: the zone's dataplane port, the same across its restarts."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


def resources_yaml() -> str:
    documents: list[dict[str, Any]] = [{"type": "Mesh", "name": "default"}]
    documents.append({"type": "Mesh", "name": "other"})
    documents += [
        dataplane(f"dp-{i}", service, address=f"192.0.2.{10 + i}")
        for i, service in enumerate(DEFAULT_SERVICES)
    ]
    documents.append(dataplane("db-1", *OTHER_SERVICES, mesh="other", address=OTHER_CLIENT))
    return as_yaml(*documents)


class DataplaneProcess(ControlPlaneProcess):
    """A dataplane in a child process."""

    def query(
        self, name: str, rdtype: str = "A", tcp: bool = False, timeout: float = 5.0
    ) -> dns.message.Message:
        """One query with dnspython, over UDP (default) or TCP, without RD."""
        message = dns.message.make_query(name, dns.rdatatype.from_text(rdtype), use_edns=0)
        message.flags &= ~dns.flags.RD
        send = dns.query.tcp if tcp else dns.query.udp
        return send(message, "127.0.0.1", timeout=timeout, port=self.ports["dns"])

    def dig(self, *args: str) -> str:
        """Run dig against the dataplane on 127.0.0.1 and return its output."""
        binary = shutil.which("dig")
        assert binary is not None, "dig is not installed (make test installs it)"
        result = subprocess.run(
            [binary, "@127.0.0.1", "-p", str(self.ports["dns"]), *args],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return result.stdout + result.stderr

    def __init__(
        self,
        workdir: Path,
        stem: str,
        certs: Path,
        cp_port: int,
        args: tuple[str, ...] = (),
        data_dir: Path | None = None,
    ) -> None:
        self.workdir = workdir
        self.stem = stem
        self.certs = certs
        self.cp_port = cp_port
        self.args = list(args)
        self.data_dir = data_dir or workdir / f"data-{stem}"
        self.log_path = workdir / f"{stem}.log"
        self.resolv_conf = workdir / "resolv.conf"
        if not self.resolv_conf.exists():
            self.resolv_conf.write_text("nameserver 127.0.0.1\n")
        self.process: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}

    def command(self) -> list[str]:
        return [
            TWISTD,
            "-n",
            "--pidfile=",
            "--logfile=" + str(self.log_path),
            *self.args,
            "kumazone",
            "--role=dataplane",
            f"--cp-address=127.0.0.1:{self.cp_port}",
            "--dns-port=0",
            "--diagnostics-port=0",
            f"--resolv-conf={self.resolv_conf}",
            f"--data-dir={self.data_dir}",
            f"--tls-cert={self.certs / self.stem}.pem",
            f"--tls-key={self.certs / self.stem}-key.pem",
            f"--tls-ca={self.certs / 'ca.pem'}",
        ]

    def start_unready(self, timeout: float = 30.0) -> DataplaneProcess:
        """Start and wait until it serves (/healthy), with or without a table."""
        return self.start(timeout, until="/healthy")

    def ready(self) -> int:
        return self.http("diagnostics", "GET", "/ready")[0]

    def wait_for_log(self, text: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the log:\n{self.log()}")


def exchange(port: int, wire: bytes, tcp: bool, source: str = "127.0.0.1") -> bytes:
    """The raw answer of the server at 127.0.0.1:C{port} to C{wire}, sent from C{source}."""
    kind = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.settimeout(5)
        sock.bind((source, 0))
        if not tcp:
            sock.sendto(wire, ("127.0.0.1", port))
            return sock.recv(65535)
        sock.connect(("127.0.0.1", port))
        sock.sendall(struct.pack("!H", len(wire)) + wire)
        data = b""
        while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
            chunk = sock.recv(65535)
            if not chunk:
                break
            data += chunk
        return data[2:]


def addresses(answer: dns.message.Message, rdtype: str = "A") -> list[str]:
    wanted = dns.rdatatype.from_text(rdtype)
    return sorted(r.address for s in answer.answer if s.rdtype == wanted for r in s)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    result = subprocess.run(
        [
            *kumazone_command(),
            "certs",
            f"--out={out}",
            "--zone=zone-1",
            "--zone-host=127.0.0.1",
            "--dataplane=default/web-1",
            "--dataplane=other/db-1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


class World:
    """The zone and both dataplanes, stopped at the end of the module."""

    def __init__(self, workdir: Path, certs: Path) -> None:
        self.workdir = workdir
        resources = workdir / "resources"
        resources.mkdir()
        (resources / "zone.yaml").write_text(resources_yaml())
        self.dp_port = free_port()
        tls = [
            f"--tls-cert={certs / 'zone-1.pem'}",
            f"--tls-key={certs / 'zone-1-key.pem'}",
            f"--tls-ca={certs / 'ca.pem'}",
        ]
        self.zone = ZoneProcess(workdir, resources, args=[*tls, f"--dp-port={self.dp_port}"])
        self.web = DataplaneProcess(workdir, "dp-default-web-1", certs, self.dp_port)
        self.db = DataplaneProcess(workdir, "dp-other-db-1", certs, self.dp_port)

    def stop(self) -> None:
        for process in (self.web, self.db, self.zone):
            process.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[World]:
    world = World(tmp_path_factory.mktemp("dataplane"), certs)
    try:
        world.zone.start()
        assert world.zone.ports["dp"] == world.dp_port
        world.web.start()
        world.db.start()
        yield world
    finally:
        world.stop()


def wire_queries(world: World) -> list[bytes]:
    """Queries for every name and VIP of the zone (both meshes'), the apex and none-such."""
    asked: list[tuple[str, str]] = [("mesh", "SOA"), ("mesh", "NS"), ("MESH", "A")]
    asked += [("nothing.mesh", "A"), ("svc.1010.mesh", "A"), (nameserver_name("mesh"), "A")]
    asked += [("240.in-addr.arpa", "SOA"), ("1.0.0.240.in-addr.arpa", "PTR")]
    for item in world.zone.vips()["items"]:
        for name in item["names"]:
            asked += [(name, "A"), (name.upper(), "AAAA"), (name, "TXT"), (name, "ANY")]
        for address in (item["vip"], item["vip6"]):
            reverse = ipaddress.ip_address(address).reverse_pointer
            asked += [(reverse, "PTR"), (reverse, "A")]
    queries = []
    for index, (name, rdtype) in enumerate(asked):
        for use_edns in (-1, 0):
            message = dns.message.make_query(
                name, dns.rdatatype.from_text(rdtype), use_edns=use_edns, payload=1232
            )
            message.id = index
            if index % 2:
                message.flags &= ~dns.flags.RD
            queries.append(message.to_wire())
    return queries


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize("mesh", ["default", "other"])
def test_answers_are_the_zones_octet_for_octet(world: World, mesh: str, tcp: bool) -> None:
    process, source = (world.web, "127.0.0.1") if mesh == "default" else (world.db, OTHER_CLIENT)
    for wire in wire_queries(world):
        theirs = exchange(world.zone.ports["dns"], wire, tcp, source)
        ours = exchange(process.ports["dns"], wire, tcp)
        assert ours == theirs, dns.message.from_wire(wire).question


def test_each_dataplane_sees_only_its_meshs_names(world: World) -> None:
    web = world.web.query("db_primary.mesh")
    db = world.db.query("db.primary.mesh")
    assert web.rcode() == dns.rcode.NXDOMAIN
    assert db.rcode() == dns.rcode.NOERROR and addresses(db)
    # One name, each mesh its own VIP.
    assert addresses(world.web.query("redis.mesh")) != addresses(world.db.query("redis.mesh"))
    assert world.db.query("backend.mesh").rcode() == dns.rcode.NXDOMAIN


def test_dig_over_udp_tcp_and_ipv6(world: World) -> None:
    vips = {
        (i["mesh"], i["service"]): i for i in world.zone.vips()["items"] if i["mesh"] == "default"
    }
    redis = vips[("default", "redis")]
    out = world.web.dig("+norec", "redis.mesh")
    assert "status: NOERROR" in out and " aa" in out and redis["vip"] in out, out
    out = world.web.dig("+tcp", "AAAA", "redis.mesh")
    assert redis["vip6"] in out, out
    port = str(world.web.ports["dns"])
    out = subprocess.run(
        ["dig", "@::1", "-p", port, "+short", "echo-server.echo-example.svc.1010.mesh"],
        capture_output=True,
        text=True,
        timeout=20,
    ).stdout
    assert out.strip() == vips[("default", "echo-server_echo-example_svc_1010")]["vip"]
    assert "status: NXDOMAIN" in world.web.dig("nothing.mesh")


def upstream_queries(process: DataplaneProcess) -> float:
    _status, body = process.http("diagnostics", "GET", "/metrics")
    for line in body.decode().splitlines():
        if line.startswith('kumazone_dataplane_queries_total{source="upstream"}'):
            return float(line.split()[-1])
    raise AssertionError(body.decode())


def test_a_name_outside_the_domain_is_forwarded(world: World) -> None:
    # resolv.conf names 127.0.0.1: whatever answers there (usually nothing: the
    # forwarder's SERVFAIL), it is not the zone's REFUSED: the name went upstream.
    before = upstream_queries(world.web)
    answer = world.web.query("example.com", timeout=10)
    assert answer.rcode() != dns.rcode.REFUSED
    assert upstream_queries(world.web) == before + 1


def test_metrics_and_readiness(world: World) -> None:
    assert world.web.ready() == 200
    status, body = world.web.http("diagnostics", "GET", "/metrics")
    assert status == 200
    text = body.decode()
    version = world.zone.vips()["version"]
    assert "kumazone_dataplane_connected 1.0" in text
    assert f"kumazone_dataplane_table_version {float(version)}" in text
    assert 'kumazone_dataplane_queries_total{source="local"}' in text


def test_a_service_added_through_the_api_answers_within_a_second(world: World) -> None:
    document = dataplane("fresh-1", "fresh", address="192.0.2.99")
    status, _body = world.zone.api("PUT", "/meshes/default/dataplanes/fresh-1", document)
    assert status in (200, 201)
    added = time.monotonic()
    while True:
        answer = world.web.query("fresh.mesh", timeout=1)
        if answer.rcode() == dns.rcode.NOERROR:
            break
        assert time.monotonic() - added < 1.0, "not on the dataplane within a second"
        time.sleep(0.01)
    assert time.monotonic() - added < 1.0
    assert addresses(answer) == addresses(world.zone.query("fresh.mesh"))
    assert world.db.query("fresh.mesh").rcode() == dns.rcode.NXDOMAIN


def test_outages_of_the_zone_and_restarts(world: World) -> None:
    web, zone = world.web, world.zone
    redis = addresses(web.query("redis.mesh"))

    # The dataplane restarts while the zone is up and a service came meanwhile:
    # it serves its stored table at once, and gets only the change.
    web.stop()
    status, _body = zone.api(
        "PUT",
        "/meshes/default/dataplanes/late-1",
        dataplane("late-1", "late", address="192.0.2.98"),
    )
    assert status in (200, 201)
    web.start()
    web.wait_for_log("resumed from table version")
    assert "took the zone's whole table" not in web.log().split("resumed")[-1]
    deadline = time.monotonic() + 5
    while web.query("late.mesh").rcode() != dns.rcode.NOERROR:
        assert time.monotonic() < deadline
        time.sleep(0.02)

    # The zone goes: the dataplane answers all the same.
    zone.stop()
    assert addresses(web.query("redis.mesh")) == redis
    assert web.ready() == 200

    # The dataplane restarts while the zone is down: its stored table, and ready.
    web.stop()
    web.start()
    assert addresses(web.query("redis.mesh")) == redis
    assert addresses(web.query("late.mesh", tcp=True))
    assert "(stored)" in web.log()
    status, body = web.http("diagnostics", "GET", "/metrics")
    assert "kumazone_dataplane_connected 0.0" in body.decode()

    # The zone comes back: the dataplane takes it up again and follows its changes.
    zone.start()
    status, _body = zone.api(
        "PUT",
        "/meshes/default/dataplanes/back-1",
        dataplane("back-1", "back", address="192.0.2.97"),
    )
    assert status in (200, 201)
    deadline = time.monotonic() + 15
    while web.query("back.mesh").rcode() != dns.rcode.NOERROR:
        assert time.monotonic() < deadline, web.log()
        time.sleep(0.05)
    assert addresses(web.query("back.mesh")) == addresses(zone.query("back.mesh"))
    assert addresses(web.query("redis.mesh")) == redis


def test_before_any_table_the_domain_fails_and_the_rest_is_forwarded(
    tmp_path: Path, certs: Path
) -> None:
    process = DataplaneProcess(tmp_path, "dp-default-web-1", certs, free_port())
    process.start_unready()
    try:
        status, body = process.http("diagnostics", "GET", "/ready")
        assert status == 503 and b"no table yet" in body
        for name, rdtype in [
            ("redis.mesh", "A"),
            ("nothing.mesh", "AAAA"),
            ("mesh", "SOA"),
            ("1.0.0.240.in-addr.arpa", "PTR"),
        ]:
            for tcp in (False, True):
                answer = process.query(name, rdtype, tcp=tcp)
                assert answer.rcode() == dns.rcode.SERVFAIL, (name, rdtype, tcp)
        # Not one of those was forwarded; a name outside the domain is.
        assert upstream_queries(process) == 0
        assert process.query("example.com", timeout=10).rcode() != dns.rcode.REFUSED
        assert upstream_queries(process) == 1
    finally:
        assert process.stop() in (0, -15)  # twistd ends by the signal it was sent


@pytest.mark.skipif(os.geteuid() != 0, reason="-u/-g needs root")
def test_it_runs_as_another_user(world: World, certs: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    # Somewhere the user can write its data dir (pytest's own temporary dirs are 0700).
    base = Path(tempfile.mkdtemp(prefix="kz-dp-user-"))
    try:
        base.chmod(0o777)
        process = DataplaneProcess(
            base,
            "dp-default-web-1",
            certs,
            world.dp_port,
            args=("-u", str(nobody.pw_uid), "-g", str(nobody.pw_gid)),
            data_dir=base / "data",
        )
        process.resolv_conf.chmod(0o644)
        if not world.zone.process or world.zone.process.poll() is not None:
            world.zone.start()
        process.start()
        try:
            assert process.query("redis.mesh").rcode() == dns.rcode.NOERROR
            owners = {path.name: path.stat().st_uid for path in (base / "data").iterdir()}
            assert owners["dataplane.sqlite3"] == nobody.pw_uid, owners
            assert owners["ports.json"] == nobody.pw_uid, owners
            assert stat.S_ISDIR((base / "data").stat().st_mode)
            ps = subprocess.run(
                ["ps", "-o", "user=", "-p", str(process.process.pid)],  # type: ignore[union-attr]
                capture_output=True,
                text=True,
            )
            assert ps.stdout.strip() == "nobody", ps
            assert json.loads((base / "data" / "ports.json").read_text())["dns"]
        finally:
            process.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
