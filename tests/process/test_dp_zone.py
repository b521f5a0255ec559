"""The zone's dataplane port, for real: `twistd -n kumazone --role=zone` with mutual TLS.

Certificates come from ``kumazone certs``; the dataplane here is a small client
over Python's ``ssl`` speaking the frames of L{kumazone.core.messages} (the real
dataplane process has tests of its own).  One zone serves every test of the
module; each test uses its own dataplane names and services.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kumazone.core.messages import (
    DpAck,
    DpHello,
    DpTable,
    DpWelcome,
    Error,
    Message,
    Ping,
    decode,
    encode,
)
from kumazone.core.names import names_from_forms
from kumazone.core.vips import VipRange
from tests.builders import dataplane
from tests.fedprocess import parse_metrics, tls_args, wait_until
from tests.kzprocess import REPO, ZoneProcess

DATAPLANES = ["default/web-1", "default/web-2", "default/web-3", "payments/pay-1", "bulk/slow"]


class Zone:
    """The zone process and the certificate directories."""

    def __init__(self, process: ZoneProcess, certs: Path, other: Path) -> None:
        self.process = process
        self.certs = certs
        self.other = other

    @property
    def port(self) -> int:
        return self.process.ports["dp"]

    def context(self, stem: str, certs: Path | None = None) -> ssl.SSLContext:
        """A dataplane's TLS: its certificate, the zone checked by the CA and its host."""
        certs = certs or self.certs
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(str(self.certs / "ca.pem"))
        context.load_cert_chain(str(certs / f"{stem}.pem"), str(certs / f"{stem}-key.pem"))
        return context

    def metrics(self) -> Any:
        status, body = self.process.http("diagnostics", "GET", "/metrics")
        assert status == 200
        return parse_metrics(body.decode())

    def connected(self) -> dict[tuple[str, str], dict[str, Any]]:
        status, document = self.process.api("GET", "/dataplanes/connected?size=1000")
        assert status == 200, document
        return {(item["mesh"], item["name"]): item for item in document["items"]}


@pytest.fixture(scope="module")
def zone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zone]:
    workdir = tmp_path_factory.mktemp("dp-zone")
    certs, other = workdir / "certs", workdir / "other"
    # The zone's certificate names its host; one per dataplane; and another CA's.
    _run_certs(certs, "--zone", "zone-1", "--zone-host", "127.0.0.1",
               *(f"--dataplane={d}" for d in DATAPLANES))  # fmt: skip
    _run_certs(other, "--zone", "zone-1", "--dataplane", "default/web-1")
    resources = workdir / "resources"
    shutil.copytree(REPO / "zones" / "zone-1", resources)
    process = ZoneProcess(
        workdir,
        resources,
        args=["--dp-port=0", "--dp-interface=127.0.0.1", *tls_args(certs, "zone-1")],
    )
    process.start()
    try:
        yield Zone(process, certs, other)
    finally:
        process.stop()


def _run_certs(out: Path, *args: str) -> None:
    """``kumazone certs --out OUT ...``, the real command."""
    result = subprocess.run(
        [sys.executable, "-m", "kumazone", "certs", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


class Client:
    """A dataplane connection: TLS, the frames, and what came (pings left out)."""

    def __init__(
        self, zone: Zone, stem: str, hello: DpHello, certs: Path | None = None, rcvbuf: int = 0
    ) -> None:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(5)
        raw.connect(("127.0.0.1", zone.port))
        self.sock = zone.context(stem, certs).wrap_socket(raw, server_hostname="127.0.0.1")
        self.buffer = b""
        self.send(hello)

    def send(self, message: Message) -> None:
        self.sock.sendall(encode(message))

    def frame(self, timeout: float = 5.0) -> tuple[Message, int]:
        """The next message and the octets its frame took."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buffer) >= 4:
                (length,) = struct.unpack("!I", self.buffer[:4])
                if len(self.buffer) >= 4 + length:
                    body, self.buffer = self.buffer[4 : 4 + length], self.buffer[4 + length :]
                    return decode(body), 4 + length
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no message from the zone")
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the zone closed the connection")
            self.buffer += data

    def next(self, timeout: float = 5.0) -> tuple[Message, int]:
        while True:
            message, octets = self.frame(timeout)
            if not isinstance(message, Ping):
                return message, octets

    def welcome(self) -> tuple[DpWelcome, list[DpTable]]:
        """The welcome and the table that follows it (every part)."""
        welcome, _octets = self.next()
        assert isinstance(welcome, DpWelcome), welcome
        return welcome, self.table()

    def table(self, timeout: float = 5.0) -> list[DpTable]:
        parts: list[DpTable] = []
        while not parts or not parts[-1].last:
            message, _octets = self.next(timeout)
            assert isinstance(message, DpTable), message
            parts.append(message)
        return parts

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def vips_of(zone: Zone, mesh: str) -> dict[str, tuple[str, str, tuple[str, ...]]]:
    status, document = zone.process.api("GET", f"/vips?mesh={mesh}&size=1000")
    assert status == 200
    return {i["service"]: (i["vip"], i["vip6"], tuple(i["names"])) for i in document["items"]}


def served(
    welcome: DpWelcome, tables: list[DpTable]
) -> dict[str, tuple[str, str, tuple[str, ...]]]:
    """What a dataplane serves from the welcome and its tables: VIPs and names."""
    import ipaddress

    vip_range = VipRange(ipaddress.IPv4Network(welcome.cidr), ipaddress.IPv6Network(welcome.cidr6))
    rows: dict[str, Any] = {}
    for table in tables:
        if table.full and table.part == 0:
            rows = {}
        for service in table.remove:
            rows.pop(service, None)
        for row in table.upsert:
            rows[row.service] = row
    return {
        service: (
            vip_range.ipv4_text(row.offset),
            vip_range.ipv6_text(row.offset),
            names_from_forms(service, welcome.domain, row.forms),
        )
        for service, row in rows.items()
    }


def put(zone: Zone, name: str, *services: str, mesh: str = "default") -> None:
    status, body = zone.process.api(
        "PUT",
        f"/meshes/{mesh}/dataplanes/{name}",
        dataplane(name, *services, mesh=mesh, address="192.0.2.77"),
    )
    assert status in (200, 201), body


# -- the tests -------------------------------------------------------------------------


def test_a_dataplane_gets_the_welcome_and_its_mesh_only(zone: Zone) -> None:
    client = Client(zone, "dp-default-web-1", DpHello())
    try:
        welcome, tables = client.welcome()
        assert (welcome.mesh, welcome.name) == ("default", "web-1")
        assert (welcome.domain, welcome.cidr, welcome.cidr6, welcome.ttl) == (
            "mesh", "240.0.0.0/4", "fd00:fd00::/64", 60,
        )  # fmt: skip
        assert welcome.nameservers == ("127.0.0.1",)
        assert tables[0].full
        assert served(welcome, tables) == vips_of(zone, "default")
        assert not set(served(welcome, tables)) & {"ledger"}  # payments' own
    finally:
        client.close()


def test_a_service_put_arrives_as_one_small_row_within_a_second(zone: Zone) -> None:
    client = Client(zone, "dp-default-web-2", DpHello())
    other = Client(zone, "dp-payments-pay-1", DpHello())
    try:
        welcome, tables = client.welcome()
        other.welcome()
        started = time.monotonic()
        put(zone, "cart-1", "cart")
        message, octets = client.next(timeout=1.0)
        elapsed = time.monotonic() - started
        assert isinstance(message, DpTable) and not message.full
        assert [row.service for row in message.upsert] == ["cart"] and message.remove == ()
        assert octets < 200, octets
        assert elapsed < 1.0
        assert served(welcome, [*tables, message])["cart"] == vips_of(zone, "default")["cart"]
        # The other mesh's dataplane: the version only.
        bump, _octets = other.next(timeout=1.0)
        assert bump == DpTable(message.version, message.base, False)
    finally:
        client.close()
        other.close()


def test_a_dataplane_that_reconnects_gets_only_the_changes(zone: Zone) -> None:
    client = Client(zone, "dp-default-web-3", DpHello())
    welcome, tables = client.welcome()
    client.send(DpAck(tables[-1].version))
    wait_until(
        lambda: zone.connected()[("default", "web-3")]["version"] == tables[-1].version,
        timeout=5,
        what="the ack listed",
    )
    listed = zone.connected()[("default", "web-3")]
    assert listed["address"] == "127.0.0.1" and listed["connectedSince"]
    client.close()
    wait_until(lambda: ("default", "web-3") not in zone.connected(), timeout=5)
    put(zone, "shop-1", "shop")
    status, _body = zone.process.api("DELETE", "/meshes/default/dataplanes/cart-1")
    assert status in (200, 404)
    again = Client(
        zone, "dp-default-web-3", DpHello("default", "web-3", tables[-1].version, welcome.table_id)
    )
    try:
        welcome_again, changes = again.welcome()
        assert welcome_again.table_id == welcome.table_id
        assert not changes[0].full and changes[0].base == tables[-1].version
        touched = {row.service for t in changes for row in t.upsert} | {
            s for t in changes for s in t.remove
        }
        assert "shop" in touched and touched <= {"shop", "cart"}
        assert served(welcome, [*tables, *changes]) == vips_of(zone, "default")
    finally:
        again.close()


def expect_refused(client_factory: Any) -> str:
    """What a refused connection ends with: the zone's error, or a TLS failure."""
    try:
        client = client_factory()
    except (ssl.SSLError, ConnectionError) as e:
        return f"tls: {e}"
    try:
        message, _octets = client.next()
        assert isinstance(message, Error), message
        return message.message
    except (ssl.SSLError, ConnectionError, EOFError) as e:
        return f"tls: {e}"
    finally:
        client.close()


def test_refused_a_zone_certificate_another_ca_and_another_mesh(zone: Zone) -> None:
    before = zone.metrics()
    why = expect_refused(lambda: Client(zone, "zone-1", DpHello("default", "zone-1")))
    assert "names no dataplane" in why
    why = expect_refused(lambda: Client(zone, "dp-default-web-1", DpHello(), certs=zone.other))
    assert why.startswith("tls: "), why
    why = expect_refused(lambda: Client(zone, "dp-default-web-1", DpHello("payments", "web-1")))
    assert "default/web-1" in why
    after = zone.metrics()

    def refused(metrics: Any, reason: str) -> float:
        return metrics.get("kumazone_dataplane_refused_total", reason=reason) or 0.0

    assert refused(after, "no-identity") == refused(before, "no-identity") + 1
    assert refused(after, "wrong-identity") == refused(before, "wrong-identity") + 1
    wait_until(
        lambda: refused(zone.metrics(), "tls") == refused(before, "tls") + 1,
        timeout=5,
        what="the TLS failure counted",
    )
    assert ("payments", "web-1") not in zone.connected()


def test_metrics_and_the_listing(zone: Zone) -> None:
    client = Client(zone, "dp-payments-pay-1", DpHello())
    try:
        client.welcome()
        assert ("payments", "pay-1") in zone.connected()
        metrics = zone.metrics()
        assert metrics.get("kumazone_dataplanes_connected", mesh="payments") == 1
        assert (
            metrics.get("kumazone_sync_bytes_total", zone="dataplane", direction="out") or 0
        ) > 0
        status, document = zone.process.api("GET", "/dataplanes/connected?mesh=payments")
        assert status == 200 and document["total"] == 1
    finally:
        client.close()


def test_a_dataplane_that_never_reads_is_dropped_past_its_bound(zone: Zone) -> None:
    """4 MiB queued: changes of long service names in its mesh, two a second."""
    slow = Client(zone, "dp-bulk-slow", DpHello(), rcvbuf=4096)
    slow.welcome()
    wait_until(lambda: ("bulk", "slow") in zone.connected(), timeout=5)
    label = "x" * 60
    before = zone.metrics().get("kumazone_dataplane_refused_total", reason="slow-reader") or 0.0
    try:
        for round_ in range(12):
            services = [f"{label}.{label}.{label}.r{round_}-{i}" for i in range(2000)]
            status, body = zone.process.api(
                "PUT",
                "/meshes/bulk/dataplanes/bulk-1",
                dataplane("bulk-1", *services, mesh="bulk", address="192.0.2.88", port=1),
            )
            assert status in (200, 201), body
            try:
                slow.send(Ping())  # it talks, it only does not read
            except OSError:
                break  # dropped already
            metrics = zone.metrics()
            if (
                metrics.get("kumazone_dataplane_refused_total", reason="slow-reader") or 0
            ) > before:
                break
        wait_until(lambda: ("bulk", "slow") not in zone.connected(), timeout=5)
        assert (
            zone.metrics().get("kumazone_dataplane_refused_total", reason="slow-reader")
            == before + 1
        )
        assert "more than 4194304 octets queued" in zone.process.log()
    finally:
        slow.close()
        zone.process.api("DELETE", "/meshes/bulk/dataplanes/bulk-1")


def test_the_ports_file_names_the_dataplane_port(zone: Zone) -> None:
    ports = json.loads((zone.process.data_dir / "ports.json").read_text())
    assert ports["dp"] == zone.port > 0
    assert "dataplanes on 127.0.0.1:" in zone.process.log()


def test_without_tls_the_port_is_off_unless_insecure(zone_process: Any) -> None:
    off = zone_process("zone-1", args=["--dp-port=0"])
    assert "dp" not in off.ports
    assert (
        off.log().count("dataplane port off: give --tls-cert/--tls-key/--tls-ca or --insecure") == 1
    )
    status, document = off.api("GET", "/dataplanes/connected")
    assert status == 200 and document["listening"] is False
    off.stop()
    insecure = zone_process("zone-1", args=["--dp-port=0", "--insecure"])
    assert "dataplanes on 127.0.0.1:" in insecure.log()  # loopback only, without TLS
    with socket.create_connection(("127.0.0.1", insecure.ports["dp"]), timeout=5) as plain:
        plain.sendall(encode(DpHello("payments", "pay-9")))
        buffer = b""
        messages: list[Message] = []
        while len(messages) < 2:
            buffer += plain.recv(65536)
            while len(buffer) >= 4 and len(buffer) >= 4 + struct.unpack("!I", buffer[:4])[0]:
                (length,) = struct.unpack("!I", buffer[:4])
                messages.append(decode(buffer[4 : 4 + length]))
                buffer = buffer[4 + length :]
        welcome, table = messages
        assert isinstance(welcome, DpWelcome) and (welcome.mesh, welcome.name) == (
            "payments",
            "pay-9",
        )
        assert isinstance(table, DpTable) and table.full
        assert {row.service for row in table.upsert} == {"redis", "ledger"}
