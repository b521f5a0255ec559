"""No zone can hurt another: a peer holding zone-1's valid certificate attacks a real
global over real TLS, while real zones zone-2 and zone-3 keep syncing through it.

One federation is shared by the module.  After every attack: zone-2 and zone-3
serve the same VIPs and names (``/vips`` and DNS), a service added to zone-2 still
reaches zone-3, and the global's table in memory (``/vips``, ``/zones``) equals
what its store holds.
"""

from __future__ import annotations

import itertools
import json
import socket
import sqlite3
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pytest

from kumazone.core.messages import (
    Ack,
    Error,
    FrameDecoder,
    Hello,
    Inventory,
    Message,
    Ping,
    ProtocolError,
    encode,
)
from kumazone.core.vips import VipRange
from tests import builders
from tests.fedprocess import GlobalProcess, ProcessGroup, make_certs, start_zone, wait_until
from tests.kzprocess import ZoneProcess

CIDR, CIDR6 = "240.0.0.0/4", "fd00:fd00::/64"
RANGE = VipRange(IPv4Network(CIDR), IPv6Network(CIDR6))
SYNC_TIMEOUT = 30.0
#: Lower than the default so that the test of the limit is quick.
MAX_SERVICES = 50


# -- the attacker -------------------------------------------------------------------


class Peer:
    """A TLS client with zone-1's certificate that speaks the sync protocol by hand."""

    def __init__(self, certs: Path, port: int, receive_buffer: int | None = None) -> None:
        context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        context.load_cert_chain(str(certs / "zone-1.pem"), str(certs / "zone-1-key.pem"))
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            # Before connecting, so that the window the peer offers stays this small.
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        raw.settimeout(10)
        raw.connect(("127.0.0.1", port))
        self.tls = context.wrap_socket(raw, server_hostname="localhost")
        self.decoder = FrameDecoder()

    def send(self, *messages: Message) -> None:
        self.send_raw(b"".join(encode(m) for m in messages))

    def send_raw(self, data: bytes) -> None:
        self.tls.sendall(data)

    def hello(self) -> None:
        self.send(Hello("zone-1", 0, "", CIDR, CIDR6))

    def read_until_closed(self, timeout: float = 10.0) -> list[Message]:
        """What the global sends until it closes the connection."""
        self.tls.settimeout(timeout)
        received: list[Message] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.tls.recv(65536)
            except (ssl.SSLError, ConnectionError):
                break
            if not data:
                break
            received += list(self.decoder.feed(data))
        else:
            raise AssertionError(f"the global kept the connection open: {received[-3:]}")
        return received

    def close(self) -> None:
        try:
            self.tls.close()
        except OSError:
            pass


def error_of(received: list[Message]) -> str:
    errors = [m.message for m in received if isinstance(m, Error)]
    assert errors, received
    return errors[0]


def inventory(*services: str, mesh: str = "default") -> Inventory:
    return Inventory(True, 0, True, tuple((mesh, s) for s in services))


# -- the federation -----------------------------------------------------------------


class Federation:
    """A global, zone-2 and zone-3, and the attacker's way in."""

    def __init__(self, workdir: Path, group: ProcessGroup) -> None:
        self.certs = make_certs(workdir / "certs", ["localhost"], ["zone-1", "zone-2", "zone-3"])
        # Every attack here comes from zone-1's certificate, one after another: no
        # cool-down between refusals (test_a_refused_zone_waits_before_it_is_heard_again
        # has a global with one).
        args = [f"--kds-zone-max-services={MAX_SERVICES}", "--kds-zone-refusal-cooldown=0"]
        self.global_ = group.add(GlobalProcess(workdir, self.certs, args=args)).start()
        self.resources = {z: workdir / f"{z}-resources" for z in ("zone-2", "zone-3")}
        self.zones: dict[str, ZoneProcess] = {}
        for zone, services in (("zone-2", ["web", "a_b"]), ("zone-3", ["db"])):
            documents = [builders.dataplane(f"{zone}-{s}", s) for s in services]
            self.resources[zone].mkdir()
            (self.resources[zone] / "services.yaml").write_text(builders.as_yaml(*documents))
            self.zones[zone] = start_zone(
                workdir,
                zone,
                self.global_.address,
                self.certs,
                resources=self.resources[zone],
                group=group,
            )
        self.counter = itertools.count()

    def peer(self, receive_buffer: int | None = None) -> Peer:
        return Peer(self.certs, self.global_.kds_port, receive_buffer)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    group = ProcessGroup()
    try:
        federation = Federation(tmp_path_factory.mktemp("hostile"), group)
        wait_until(lambda: synced(federation), SYNC_TIMEOUT, what="the federation syncs")
        yield federation
    finally:
        group.stop_all()


def table(zone: ZoneProcess) -> dict[tuple[str, str], tuple[str, str, tuple[str, ...], bool]]:
    return {
        (i["mesh"], i["service"]): (i["vip"], i["vip6"], tuple(i["names"]), i["provisional"])
        for i in zone.vips()["items"]
    }


def synced(fed: Federation) -> bool:
    zone_2, zone_3 = (table(z) for z in fed.zones.values())
    if zone_2 != zone_3 or any(row[3] for row in zone_2.values()):
        return False
    return {k[1] for k in zone_2} >= {"web", "a_b", "db"}


def stored(fed: Federation) -> tuple[dict[tuple[str, str], str], dict[str, int]]:
    """The global's store as a reader of the file sees it: VIPs, services per zone."""
    db = sqlite3.connect(f"file:{fed.global_.data_dir / 'kumazone.sqlite3'}?mode=ro", uri=True)
    try:
        vips = {
            (mesh, service): str(RANGE.ipv4(offset))
            for mesh, service, offset in db.execute("SELECT mesh, service, vip_offset FROM vips")
        }
        zones = {
            name: count
            for name, count in db.execute(
                "SELECT z.name, COUNT(s.zone) FROM zones z "
                "LEFT JOIN zone_services s ON s.zone = z.name GROUP BY z.name"
            )
        }
    finally:
        db.close()
    return vips, zones


def in_memory(fed: Federation) -> tuple[dict[tuple[str, str], str], dict[str, int]]:
    vips = {(i["mesh"], i["service"]): i["vip"] for i in fed.global_.vips()["items"]}
    zones = {name: z["services"] for name, z in fed.global_.zones().items()}
    return vips, zones


def assert_unharmed(fed: Federation) -> None:
    """The others' answers agree and keep updating; the global's memory is its store."""
    zone_2, zone_3 = fed.zones["zone-2"], fed.zones["zone-3"]
    assert table(zone_2) == table(zone_3)
    service = f"after-{next(fed.counter)}"
    status, _ = zone_2.api(
        "PUT", f"/meshes/default/dataplanes/{service}", builders.dataplane(service, service)
    )
    assert status == 201

    def reached() -> bool:
        row = table(zone_3).get(("default", service))
        return row is not None and not row[3] and table(zone_2) == table(zone_3)

    wait_until(reached, SYNC_TIMEOUT, what=f"{service} reaches zone-3 from zone-2")
    web = table(zone_3)[("default", "web")]
    answer = zone_3.query("web.mesh", "A")
    assert [r.address for rrset in answer.answer for r in rrset] == [web[0]]
    wait_until(lambda: in_memory(fed) == stored(fed), 10.0, what="the global's memory is stored")


# -- the attacks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "why"),
    [
        ("s" * 600_000, "must be at most 1024 characters, is 600000"),
        ("é" * 300, "has characters outside"),
        ("no spaces", "has characters outside"),
    ],
    ids=["600k-characters", "non-ascii", "space"],
)
def test_a_service_name_no_resource_could_have_is_refused(
    fed: Federation, service: str, why: str
) -> None:
    peer = fed.peer()
    peer.hello()
    peer.send_raw(_frame_unchecked(inventory("fine", service)))
    message = error_of(peer.read_until_closed())
    assert message.startswith("refused: add[") and why in message
    assert ("default", "fine") not in table(fed.zones["zone-2"])
    assert_unharmed(fed)


def _frame_unchecked(message: Inventory) -> bytes:
    """A frame even over the size a well-behaved encoder would send."""
    from kumazone.core.messages import PROTOCOL_VERSION

    document = {"v": PROTOCOL_VERSION, "t": message.kind, **message._fields()}
    body = json.dumps(document, separators=(",", ":")).encode()
    return struct.pack("!I", len(body)) + body


def test_an_ack_of_a_version_beyond_any_integer_is_refused(fed: Federation) -> None:
    peer = fed.peer()
    peer.hello()
    peer.send(inventory("ack-tester"))
    body = b'{"v":3,"t":"ack","version":18446744073709551616}'
    peer.send_raw(struct.pack("!I", len(body)) + body)
    assert "must be an integer" in error_of(peer.read_until_closed())
    peer = fed.peer()
    peer.hello()
    peer.send(Ack(10**15))
    assert "ack of table version" in error_of(peer.read_until_closed())
    assert_unharmed(fed)


def test_parts_that_never_end_are_refused(fed: Federation) -> None:
    peer = fed.peer()
    peer.hello()
    peer.send(*(Inventory(True, i, False, (("default", "p"),)) for i in range(100)))
    assert "more than 64 parts" in error_of(peer.read_until_closed())
    assert_unharmed(fed)


def test_more_services_than_the_zone_limit_are_refused(fed: Federation) -> None:
    peer = fed.peer()
    peer.hello()
    peer.send(inventory(*(f"many-{i}" for i in range(MAX_SERVICES + 1))))
    message = error_of(peer.read_until_closed())
    assert f"more than its limit of {MAX_SERVICES}" in message
    assert not any(k[1].startswith("many-") for k in table(fed.zones["zone-3"]))
    assert_unharmed(fed)


def test_a_message_flood_is_refused_and_its_log_is_bounded(fed: Federation) -> None:
    peer = fed.peer()
    peer.hello()
    peer.send(*([Error("look at me")] * 100 + [Ping()] * 400))
    assert "messages per second" in error_of(peer.read_until_closed())
    reports = fed.global_.log_path.read_text().count("zone zone-1 reports:")
    assert reports <= 50
    assert_unharmed(fed)


def test_a_closed_session_does_not_stay_open_while_the_peer_sends(fed: Federation) -> None:
    peer = fed.peer()
    peer.hello()
    peer.send_raw(_frame_unchecked(inventory("x" * 2000)))
    started = time.monotonic()
    try:
        for _ in range(400):  # keeps sending, never reads
            peer.send(Ping())
            time.sleep(0.02)
    except (OSError, ssl.SSLError):
        pass  # cut by the global
    peer.close()
    assert time.monotonic() - started < 15
    assert_unharmed(fed)


def test_a_name_served_in_another_zone_stays_with_it(fed: Federation) -> None:
    before = table(fed.zones["zone-2"])
    web, a_b = before[("default", "web")], before[("default", "a_b")]
    assert web[2] == ("web.mesh",) and a_b[2] == ("a_b.mesh", "a.b.mesh")
    peer = fed.peer()
    peer.hello()
    peer.send(inventory("Web", "a.b"))

    def announced() -> bool:
        rows = table(fed.zones["zone-3"])
        return ("default", "Web") in rows and not rows[("default", "Web")][3]

    wait_until(announced, SYNC_TIMEOUT, what="zone-1's services reach zone-3")
    for zone in fed.zones.values():
        rows = table(zone)
        assert rows[("default", "web")] == web  # same VIP, same names
        assert rows[("default", "a_b")] == a_b
        assert rows[("default", "Web")][2] == () and rows[("default", "a.b")][2] == ()
        answer = zone.query("WEB.mesh", "A")
        assert [r.address for rrset in answer.answer for r in rrset] == [web[0]]
    item = next(i for i in fed.global_.vips()["items"] if i["service"] == "Web")
    assert item["names"] == [] and "web.mesh is service web's name" in item["warnings"][0]
    peer.close()
    assert_unharmed(fed)


def test_a_peer_of_another_protocol_version_is_told_why(fed: Federation) -> None:
    peer = fed.peer()
    body = json.dumps({"v": 1, "t": "hello", "zone": "zone-1"}).encode()
    peer.send_raw(struct.pack("!I", len(body)) + body)
    message = error_of(peer.read_until_closed())
    assert "sync protocol version 1" in message and "speaks version 3" in message
    assert_unharmed(fed)


def test_frames_that_are_not_messages_are_refused(fed: Federation) -> None:
    peer = fed.peer()
    peer.hello()
    body = b'{"v":3,"t":"ping","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    peer.send_raw(struct.pack("!I", len(body)) + body)
    assert "nested too deeply" in error_of(peer.read_until_closed())
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(b"\xff\xff\xff\xff").__next__()
    assert_unharmed(fed)


def test_a_zone_that_does_not_read_is_paused_then_dropped(fed: Federation) -> None:
    """A real TLS peer that stops reading: the global stops sending to it (pushes to it
    wait, coalesced), keeps serving the others meanwhile, and drops it after the
    silence timeout (15 s)."""
    peer = fed.peer(receive_buffer=4096)
    peer.hello()
    # Full inventories of long names, each replacing the last: every one is pushed
    # back as a table change of ~100 KB, far more than the peer's window and the
    # global's socket buffer hold, so the global's transport pauses it.
    rounds = 40
    for round_ in range(rounds):
        names = [f"unread-{round_}-{i:02d}-" + "x" * 1000 for i in range(MAX_SERVICES)]
        peer.send(inventory(*names))
    started = time.monotonic()
    # It keeps talking (so it is not dropped as silent), and never reads.
    stop = threading.Event()

    def ping() -> None:
        while not stop.wait(2.0):
            try:
                peer.send(Ping())
            except (OSError, ssl.SSLError):
                return

    pinger = threading.Thread(target=ping, daemon=True)
    pinger.start()
    try:
        # The peer's services are real ones: the others converge on its last inventory,
        # then go on (while the peer reads nothing).
        zone_2, zone_3 = fed.zones["zone-2"], fed.zones["zone-3"]

        def converged() -> bool:
            theirs = table(zone_3)
            last = any(service.startswith(f"unread-{rounds - 1}-") for _m, service in theirs)
            return last and table(zone_2) == theirs

        wait_until(converged, SYNC_TIMEOUT, what="zone-2 and zone-3 hold the peer's last inventory")
        assert_unharmed(fed)
        dropped = "dropped: read nothing for"
        lines = wait_until(
            lambda: [line for line in fed.global_.log().splitlines() if dropped in line],
            30.0,
            what="the global drops the peer that does not read",
        )
    finally:
        stop.set()
        pinger.join()
    assert "zone-1" in lines[-1]
    assert time.monotonic() - started < 30
    # Its socket is closed by the global: reading what is left ends.
    peer.tls.settimeout(10)
    try:
        while peer.tls.recv(65536):
            pass
    except (OSError, ssl.SSLError):
        pass
    peer.close()
    assert_unharmed(fed)


def test_a_refused_zone_waits_before_it_is_heard_again(tmp_path: Path) -> None:
    """After a refusal, the same zone is refused at its hello (no welcome, no table
    pushed) until its cool-down ends: 1 s here, then 2 s for the next in a row."""
    group = ProcessGroup()
    try:
        certs = make_certs(tmp_path / "certs", ["localhost"], ["zone-1"])
        glob = group.add(
            GlobalProcess(tmp_path, certs, args=["--kds-zone-refusal-cooldown=1"])
        ).start()

        def attempt(*messages: Message) -> list[Message]:
            peer = Peer(certs, glob.kds_port)
            peer.hello()
            peer.send(*messages)
            try:
                return peer.read_until_closed()
            finally:
                peer.close()

        first = attempt(inventory("no spaces"))
        assert "retry in 1 s" in error_of(first)
        again = attempt(inventory("fine"))
        assert [type(m) for m in again] == [Error], again
        assert "retry in 1 s" in error_of(again)
        time.sleep(1.2)
        # Heard again: refused once more, and the next wait is twice as long.
        assert "retry in 2 s" in error_of(attempt(inventory("no spaces")))
        time.sleep(2.2)
        accepted = Peer(certs, glob.kds_port)
        accepted.hello()
        accepted.send(inventory("fine"))
        accepted.tls.settimeout(10)
        welcome = next(accepted.decoder.feed(accepted.tls.recv(65536)))
        assert welcome.kind == "welcome"
        accepted.close()
        metrics = glob.http("diagnostics", "GET", "/metrics")[1].decode()
        assert 'kumazone_sync_refused_total{reason="cooling-down"} 1.0' in metrics
    finally:
        group.stop_all()


def test_insecure_sync_listens_on_loopback_only(tmp_path: Path) -> None:
    group = ProcessGroup()
    try:
        glob = group.add(GlobalProcess(tmp_path, None, args=["--insecure"])).start()
        listening = _listeners()
        assert ("127.0.0.1", glob.kds_port) in listening
        assert ("0.0.0.0", glob.kds_port) not in listening
    finally:
        group.stop_all()


def _listeners() -> set[tuple[str, int]]:
    """(address, port) of every IPv4 TCP socket listening on this host."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, _remote, state = line.split()[1:4]
        if state != "0A":  # LISTEN
            continue
        address, port = local.split(":")
        octets = bytes.fromhex(address)[::-1]
        found.add((socket.inet_ntoa(octets), int(port, 16)))
    return found
