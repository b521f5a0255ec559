"""kumazone.web.api in-process: the zone's and the global's HTTP API.

Requests go through a real L{Site} and its HTTP channel over a L{StringTransport},
so paths, headers and bodies are parsed as they are off a socket.  The zone is a
real L{Zone} over SQLite in memory with its files loaded by a L{ResourceDirectory};
the global is a L{GlobalHub} over a L{MergedTable}; time is a L{Clock}.  No sockets,
no processes.  What needs a process (DNS answers after a change, persistence across
a restart, a real socket) stays in tests/process/test_api.py.
"""

from __future__ import annotations

import copy
import ipaddress
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.server import Site

from kumazone import __version__
from kumazone.core.config import DnsServerConfig, load_config
from kumazone.core.federation import MergedTable
from kumazone.core.messages import Hello, Inventory, encode
from kumazone.core.storage import Store, StoreChanges, StoredState, StoreError
from kumazone.core.vips import TableDelta, VipRange
from kumazone.core.zone import Zone
from kumazone.metrics import Metrics
from kumazone.resource_dir import ResourceDirectory
from kumazone.store.sqlite import SQLiteStore
from kumazone.sync.global_side import GlobalHub
from kumazone.sync.metrics import SyncMetrics
from kumazone.sync.protocol import SyncFactory, SyncProtocol
from kumazone.web.api import MAX_BODY_OCTETS, ApiResource, GlobalApiResource
from tests.builders import as_yaml, dataplane, external_service, gateway

DATAPLANES = "/meshes/default/dataplanes"
EXTERNAL_SERVICES = "/meshes/default/external-services"
CONFIG = load_config(None, {})
#: 6 usable IPv4 VIPs.
TINY = DnsServerConfig(
    cidr=ipaddress.IPv4Network("10.0.0.0/29"), cidr6=ipaddress.IPv6Network("fd00::/125")
)
V4, V6 = CONFIG.cidr, CONFIG.cidr6
ECHO = "echo-server_echo-example_svc_1010"

#: The zone's resources directory: file name -> documents.
FILES = {
    "default.yaml": [
        dataplane("redis-1", "redis", address="192.0.2.10", port=6379),
        dataplane("backend-1", "backend", address="192.0.2.20"),
        dataplane("backend-2", "backend", address="192.0.2.21"),
        gateway("edge-gw", "edge-gateway", address="192.0.2.30"),
        dataplane("echo-server-7d9f8b-x2x4q", ECHO, address="192.0.2.40", port=1010),
        external_service("httpbin"),
    ],
    "meshes.yaml": [{"type": "Mesh", "name": "default"}, {"type": "Mesh", "name": "payments"}],
    "payments.yaml": [
        dataplane("redis-payments-1", "redis", mesh="payments", address="192.0.2.110"),
        dataplane("ledger-1", "ledger", mesh="payments", address="192.0.2.120"),
    ],
}
FILE_SERVICES = {
    ("default", "redis"),
    ("default", "backend"),
    ("default", "edge-gateway"),
    ("default", ECHO),
    ("payments", "redis"),
    ("payments", "ledger"),
}


def http(
    site: Site, method: str, path: str, body: bytes = b"", content_type: str | None = None
) -> tuple[int, str, bytes]:
    """One request through the site's HTTP channel: (status, content type, body)."""
    channel = site.buildProtocol(None)
    assert channel is not None
    transport = StringTransport()
    channel.makeConnection(transport)
    head = [f"{method} {quote(path, safe='/!%')} HTTP/1.1", "Host: kumazone", "Connection: close"]
    if content_type is not None:
        head.append(f"Content-Type: {content_type}")
    head.append(f"Content-Length: {len(body)}")
    channel.dataReceived("\r\n".join(head).encode("ascii") + b"\r\n\r\n" + body)
    channel.connectionLost(Failure(ConnectionDone()))
    response_head, _, payload = transport.value().partition(b"\r\n\r\n")
    status_line, *header_lines = response_head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers.get("content-type", ""), payload


def answer(
    site: Site,
    method: str,
    path: str,
    document: Any = None,
    raw: bytes | None = None,
    content_type: str = "application/json",
) -> tuple[int, Any]:
    """A request with a JSON document (or raw bytes); (status, decoded JSON answer)."""
    body = raw if raw is not None else b"" if document is None else json.dumps(document).encode()
    status, answered_type, payload = http(site, method, path, body, content_type)
    assert answered_type == "application/json", (status, payload)
    return status, json.loads(payload)


@pytest.fixture
def logged() -> Iterator[EventLoggingObserver]:
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


def lines(observer: EventLoggingObserver, *words: str) -> list[str]:
    texts = [formatEvent(event) for event in observer]
    return [text for text in texts if all(word in text for word in words)]


# -- a zone ---------------------------------------------------------------------------


class FailingStore:
    """A store whose writes fail while C{failing} is set."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.failing = False

    def load(self) -> StoredState:
        return self.inner.load()

    def commit(self, changes: StoreChanges) -> None:
        if self.failing:
            raise StoreError("cannot write to store (disk full)")
        self.inner.commit(changes)

    def close(self) -> None:
        self.inner.close()


class ZoneApi:
    """A zone with its resources directory loaded, its API, and the snapshots it sent."""

    def __init__(
        self,
        directory: Path,
        config: DnsServerConfig = CONFIG,
        sync_status: Callable[[], dict[str, Any] | None] = lambda: None,
    ) -> None:
        self.directory = directory
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.metrics = Metrics("zone-1")
        self.store = FailingStore(SQLiteStore(":memory:"))
        self.zone = Zone("zone-1", config, self.store)
        ResourceDirectory(str(directory), self.zone, self.metrics, self.clock).scan()
        self.snapshots: list[Any] = []
        self.zone.listeners.append(lambda change: self.snapshots.append(change.snapshot))
        self.site = Site(
            ApiResource(self.zone, self.metrics, self.clock, sync_status), reactor=self.clock
        )

    def api(self, method: str, path: str, document: Any = None, **kwargs: Any) -> tuple[int, Any]:
        return answer(self.site, method, path, document, **kwargs)

    def vips(self) -> dict[str, Any]:
        status, document = self.api("GET", "/vips")
        assert status == 200, document
        return document

    def table(self) -> list[tuple[str, str, str, str]]:
        """What /vips serves, without the version."""
        return [(i["mesh"], i["service"], i["vip"], i["vip6"]) for i in self.vips()["items"]]

    def vip_of(self, service: str, mesh: str = "default") -> dict[str, Any] | None:
        found = [i for i in self.vips()["items"] if (i["mesh"], i["service"]) == (mesh, service)]
        assert len(found) <= 1, found
        return found[0] if found else None

    def state(self) -> tuple[Any, ...]:
        """Everything a refused request must leave as it was."""
        return (
            self.vips(),
            self.api("GET", DATAPLANES)[1],
            self.api("GET", EXTERNAL_SERVICES)[1],
            self.api("GET", "/meshes")[1],
            self.store.load().resources,
        )

    def requests(self, method: str, status: int) -> float:
        value = self.metrics.registry.get_sample_value(
            "kumazone_api_requests_total", {"method": method, "status": str(status)}
        )
        return value or 0.0

    def rejected(self) -> float:
        value = self.metrics.registry.get_sample_value(
            "kumazone_resources_rejected_total", {"source": "api"}
        )
        return value or 0.0


@pytest.fixture
def resources(tmp_path: Path) -> Path:
    directory = tmp_path / "resources"
    directory.mkdir()
    for name, documents in FILES.items():
        (directory / name).write_text(as_yaml(*documents))
    return directory


@pytest.fixture
def zone(resources: Path) -> ZoneApi:
    return ZoneApi(resources)


def test_about(zone: ZoneApi) -> None:
    status, body = zone.api("GET", "/")
    assert status == 200
    assert body == {
        "product": "kumazone",
        "version": __version__,
        "zone": "zone-1",
        "role": "zone",
        "tableVersion": zone.zone.snapshot.version,
        "sync": None,
    }


def test_about_reports_the_sync_status(resources: Path) -> None:
    status = {"global": "global.example:5685", "connected": False}
    zone = ZoneApi(resources, sync_status=lambda: status)
    assert zone.api("GET", "/")[1]["sync"] == status


def test_every_answer_is_indented_json_ending_in_a_newline(zone: ZoneApi) -> None:
    for method, path, status in [
        ("GET", "/", 200),
        ("GET", "/vips", 200),
        ("GET", "/nope", 404),
        ("POST", "/", 405),
    ]:
        answered, content_type, payload = http(zone.site, method, path)
        assert answered == status
        assert content_type == "application/json", (method, path)
        assert payload.endswith(b"}\n"), payload
        assert payload.startswith(b"{\n  "), payload
        json.loads(payload)


# -- create, read, update, delete ----------------------------------------------------------


def test_put_json_creates_then_updates(zone: ZoneApi, logged: EventLoggingObserver) -> None:
    path = f"{DATAPLANES}/cache-1"
    assert zone.vip_of("cache") is None

    status, body = zone.api("PUT", path, dataplane("cache-1", "cache"))
    assert status == 201, body
    assert body == dataplane("cache-1", "cache")
    entry = zone.vip_of("cache")
    assert entry is not None
    assert entry["names"] == ["cache.mesh"]
    assert len(zone.snapshots) == 1
    assert lines(logged, "Dataplane default/cache-1", "created")

    # The same PUT with another service: 200, the new service has a VIP, the old one none.
    status, body = zone.api("PUT", path, dataplane("cache-1", "memcached"))
    assert status == 200, body
    assert zone.vip_of("cache") is None
    assert zone.vip_of("memcached") is not None
    assert lines(logged, "Dataplane default/cache-1", "updated")

    status, body = zone.api("GET", path)
    assert status == 200
    assert body["networking"]["inbound"][0]["tags"]["kuma.io/service"] == "memcached"
    # What the API wrote is in the store.
    assert {r.name for r in zone.store.load().resources} == {"cache-1"}


def test_put_yaml_body_creates_then_updates(zone: ZoneApi) -> None:
    path = f"{DATAPLANES}/queue-1"
    for service, created in (("queue", 201), ("queue2", 200)):
        document = dataplane("queue-1", service, address="192.0.2.77", port=5672)
        raw = as_yaml(document).encode()
        status, body = zone.api("PUT", path, raw=raw, content_type="application/yaml")
        assert status == created, body
        assert body == document
        assert zone.vip_of(service) is not None
    assert zone.vip_of("queue") is None


@pytest.mark.parametrize("content_type", ["text/plain", "", "application/x-yaml"])
def test_body_is_read_as_yaml_unless_the_type_says_json(zone: ZoneApi, content_type: str) -> None:
    raw = as_yaml(dataplane("y-1", "yammy")).encode()
    status, body = zone.api("PUT", f"{DATAPLANES}/y-1", raw=raw, content_type=content_type)
    assert status == 201, body
    # JSON is YAML too.
    raw = json.dumps(dataplane("j-1", "jay")).encode()
    status, body = zone.api("PUT", f"{DATAPLANES}/j-1", raw=raw, content_type=content_type)
    assert status == 201, body


def test_yaml_body_with_a_json_content_type_is_refused(zone: ZoneApi) -> None:
    raw = as_yaml(dataplane("y-1", "yammy")).encode()
    status, body = zone.api(
        "PUT", f"{DATAPLANES}/y-1", raw=raw, content_type="application/json; charset=utf-8"
    )
    assert status == 400, body
    assert "JSON" in body["causes"][0]["message"]


def test_put_without_type_mesh_and_name_takes_them_from_the_path(zone: ZoneApi) -> None:
    document = dataplane("x", "pathy")
    for field in ("type", "mesh", "name"):
        del document[field]
    status, body = zone.api("PUT", f"{DATAPLANES}/pathy-1", document)
    assert status == 201, body
    status, body = zone.api("GET", f"{DATAPLANES}/pathy-1")
    assert status == 200
    assert (body["type"], body["mesh"], body["name"]) == ("Dataplane", "default", "pathy-1")
    assert zone.vip_of("pathy") is not None


def test_get_one_and_list(zone: ZoneApi) -> None:
    zone.api("PUT", f"{DATAPLANES}/cache-1", dataplane("cache-1", "cache"))

    status, body = zone.api("GET", f"{DATAPLANES}/redis-1")  # from the resources dir
    assert status == 200
    assert body == FILES["default.yaml"][0]
    status, body = zone.api("GET", f"{DATAPLANES}/cache-1")  # from the API
    assert status == 200
    assert body == dataplane("cache-1", "cache")

    status, body = zone.api("GET", DATAPLANES)
    assert status == 200
    names = [item["name"] for item in body["items"]]
    assert body["total"] == len(names)
    assert body["next"] is None
    assert names == sorted(names)
    assert set(names) == {
        "redis-1",
        "backend-1",
        "backend-2",
        "edge-gw",
        "echo-server-7d9f8b-x2x4q",
        "cache-1",
    }
    assert all(item["mesh"] == "default" for item in body["items"])
    assert all(item["type"] == "Dataplane" for item in body["items"])

    status, body = zone.api("GET", "/meshes/payments/dataplanes")
    assert status == 200
    assert {item["name"] for item in body["items"]} == {"redis-payments-1", "ledger-1"}

    status, body = zone.api("GET", EXTERNAL_SERVICES)
    assert status == 200
    assert body == {"total": 1, "items": [external_service("httpbin")], "next": None}

    status, body = zone.api("GET", "/meshes/payments/external-services")
    assert (status, body["total"], body["items"]) == (200, 0, [])


def test_get_meshes_and_one_mesh(zone: ZoneApi) -> None:
    status, body = zone.api("GET", "/meshes")
    assert status == 200
    assert body == {
        "total": 2,
        "items": [{"type": "Mesh", "name": "default"}, {"type": "Mesh", "name": "payments"}],
        "next": None,
    }

    status, body = zone.api("GET", "/meshes/payments")
    assert status == 200
    assert (body["type"], body["name"]) == ("Mesh", "payments")

    status, body = zone.api("GET", "/meshes/nosuch")
    assert status == 404
    assert "nosuch" in body["details"]

    # A Dataplane in a new mesh makes the mesh appear, though no Mesh declares it.
    status, _ = zone.api(
        "PUT", "/meshes/staging/dataplanes/web-1", dataplane("web-1", "web", mesh="staging")
    )
    assert status == 201
    status, body = zone.api("GET", "/meshes")
    assert [item["name"] for item in body["items"]] == ["default", "payments", "staging"]
    assert zone.api("GET", "/meshes/staging") == (200, {"type": "Mesh", "name": "staging"})


def test_default_mesh_is_listed_without_resources(tmp_path: Path) -> None:
    zone = ZoneApi(tmp_path)
    assert zone.api("GET", "/meshes")[1]["items"] == [{"type": "Mesh", "name": "default"}]
    assert zone.api("GET", "/meshes/default") == (200, {"type": "Mesh", "name": "default"})


def test_delete_then_404(zone: ZoneApi, logged: EventLoggingObserver) -> None:
    path = f"{DATAPLANES}/cache-1"
    assert zone.api("PUT", path, dataplane("cache-1", "cache"))[0] == 201
    assert zone.vip_of("cache") is not None

    assert zone.api("DELETE", path) == (200, {})
    assert zone.vip_of("cache") is None
    assert lines(logged, "Dataplane default/cache-1", "deleted")
    assert zone.store.load().resources == []
    status, body = zone.api("GET", path)
    assert status == 404
    assert "Dataplane default/cache-1" in body["details"]
    status, body = zone.api("DELETE", path)
    assert status == 404
    assert "Dataplane default/cache-1" in body["details"]


def test_a_service_shared_by_two_dataplanes_lives_until_the_last_one_goes(zone: ZoneApi) -> None:
    assert zone.api("PUT", f"{DATAPLANES}/api-1", dataplane("api-1", "api"))[0] == 201
    assert zone.api("PUT", f"{DATAPLANES}/api-2", dataplane("api-2", "api"))[0] == 201
    vip = zone.vip_of("api")
    assert vip is not None
    assert zone.api("DELETE", f"{DATAPLANES}/api-1")[0] == 200
    assert zone.vip_of("api") == vip
    assert zone.api("DELETE", f"{DATAPLANES}/api-2")[0] == 200
    assert zone.vip_of("api") is None


def test_external_service_put_get_delete_and_never_a_vip(zone: ZoneApi) -> None:
    before = zone.table()
    path = f"{EXTERNAL_SERVICES}/stripe"
    document = external_service("stripe", "stripe-api", address="api.stripe.com:443")
    status, body = zone.api("PUT", path, document)
    assert status == 201, body
    assert body == document
    assert zone.api("GET", path) == (200, document)
    assert zone.table() == before
    assert zone.vip_of("stripe-api") is None
    assert zone.vip_of("httpbin") is None  # the file's own ExternalService

    changed = external_service("stripe", "stripe-api", address="api.stripe.com:8443")
    assert zone.api("PUT", path, changed) == (200, changed)
    assert zone.api("DELETE", path) == (200, {})
    assert zone.api("GET", path)[0] == 404
    assert zone.api("DELETE", path)[0] == 404
    assert zone.table() == before


def test_gateway_dataplane_gets_a_vip(zone: ZoneApi) -> None:
    document = gateway("edge-2", "edge-two")
    assert zone.api("PUT", f"{DATAPLANES}/edge-2", document) == (201, document)
    assert zone.vip_of("edge-two") is not None


def test_same_name_in_another_mesh_is_another_resource(zone: ZoneApi) -> None:
    document = dataplane("redis-1", "redis", mesh="staging")
    assert zone.api("PUT", "/meshes/staging/dataplanes/redis-1", document) == (201, document)
    assert zone.api("GET", f"{DATAPLANES}/redis-1") == (200, FILES["default.yaml"][0])


# -- refusals ------------------------------------------------------------------------------


def changed(document: dict[str, Any], value: Any, *path: str | int) -> dict[str, Any]:
    """C{document} with the field at C{path} set to C{value}."""
    document = copy.deepcopy(document)
    inner: Any = document
    for step in path[:-1]:
        inner = inner[step]
    inner[path[-1]] = value
    return document


BAD = dataplane("bad-1", "b", address="192.0.2.9", port=80)

BAD_DATAPLANES: dict[str, tuple[dict[str, Any], str]] = {
    "bad port": (
        changed(BAD, 70000, "networking", "inbound", 0, "port"),
        "networking.inbound[0].port",
    ),
    "port not a number": (
        changed(BAD, "http", "networking", "inbound", 0, "port"),
        "networking.inbound[0].port",
    ),
    "missing kuma.io/service": (
        changed(BAD, {"app": "bad"}, "networking", "inbound", 0, "tags"),
        'networking.inbound[0].tags["kuma.io/service"]',
    ),
    "unknown top-level field": (changed(BAD, 1, "bogus"), "bogus"),
    "unknown networking field": (changed(BAD, True, "networking", "bogus"), "networking.bogus"),
    "bad address": (
        changed(BAD, "not an address!", "networking", "address"),
        "networking.address",
    ),
    "wrong type for the collection": (
        external_service("bad-1", "b", address="example.com:443"),
        "type",
    ),
    "body name does not match the path": (changed(BAD, "someone-else", "name"), "name"),
    "body mesh does not match the path": (changed(BAD, "payments", "mesh"), "mesh"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATAPLANES))
def test_bad_dataplane_is_refused_naming_the_field(
    zone: ZoneApi, logged: EventLoggingObserver, case: str
) -> None:
    # One resource of our own first, to see that a refusal does not touch it.
    assert zone.api("PUT", f"{DATAPLANES}/bad-1", dataplane("bad-1", "keep"))[0] == 201
    before, snapshots = zone.state(), len(zone.snapshots)

    document, field = BAD_DATAPLANES[case]
    status, body = zone.api("PUT", f"{DATAPLANES}/bad-1", document)
    assert status == 400, body
    assert body["title"] == "Could not process a resource"
    assert body["causes"][0]["field"] == field, body
    assert body["causes"][0]["message"]
    assert zone.state() == before
    assert len(zone.snapshots) == snapshots
    assert zone.vip_of("keep") is not None
    assert zone.vip_of("b") is None
    assert zone.rejected() == 1
    assert lines(logged, "Dataplane default/bad-1 refused", field)

    # A new name refused is not created either.
    document = changed(document, "bad-2" if field != "name" else "someone-else", "name")
    status, body = zone.api("PUT", f"{DATAPLANES}/bad-2", document)
    assert status == 400, body
    assert zone.api("GET", f"{DATAPLANES}/bad-2")[0] == 404
    assert zone.state() == before
    assert len(zone.snapshots) == snapshots
    assert zone.rejected() == 2


def test_dataplane_body_to_external_services_is_refused(zone: ZoneApi) -> None:
    before = zone.state()
    status, body = zone.api("PUT", f"{EXTERNAL_SERVICES}/odd", dataplane("odd", "odd"))
    assert status == 400, body
    assert body["causes"][0]["field"] == "type"
    assert zone.state() == before


BAD_BODIES = {
    # case: (raw body, content type, words the message must contain)
    "invalid YAML": (b"type: Dataplane\nnetworking: [unclosed\n", "application/yaml", "YAML"),
    "invalid JSON": (b'{"type": "Dataplane", ', "application/json", "JSON"),
    "two documents": (
        b"type: Dataplane\nname: a\n---\ntype: Dataplane\nname: b\n",
        "application/yaml",
        "2",
    ),
    "no document": (b"", "application/yaml", "0"),
    "not UTF-8": (b"type: Dataplane\nname: caf\xe9\n", "application/yaml", "UTF-8"),
    "not a mapping": (b"[1, 2, 3]", "application/json", "mapping"),
    "a YAML scalar": (b"just words\n", "application/yaml", "mapping"),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_unreadable_body_is_refused(zone: ZoneApi, case: str) -> None:
    before = zone.state()
    raw, content_type, words = BAD_BODIES[case]
    status, body = zone.api("PUT", f"{DATAPLANES}/a", raw=raw, content_type=content_type)
    assert status == 400, body
    cause = body["causes"][0]
    assert isinstance(cause["field"], str) and cause["field"], body
    assert words in cause["message"], body
    assert zone.state() == before
    assert zone.snapshots == []


def test_body_over_one_mebibyte_is_413(zone: ZoneApi) -> None:
    before = zone.state()
    # Exactly the limit is read; one octet more is not.
    text = json.dumps(dataplane("big-1", "big"))
    padded = (text + " " * (MAX_BODY_OCTETS - len(text))).encode()
    assert len(padded) == MAX_BODY_OCTETS
    status, body = zone.api("PUT", f"{DATAPLANES}/big-1", raw=padded + b" ")
    assert status == 413, body
    assert str(MAX_BODY_OCTETS) in body["details"]
    assert zone.state() == before
    assert zone.vip_of("big") is None

    assert zone.api("PUT", f"{DATAPLANES}/big-1", raw=padded)[0] == 201
    assert zone.vip_of("big") is not None


def test_resource_from_the_resources_dir_cannot_be_changed_through_the_api(
    zone: ZoneApi,
) -> None:
    before = zone.state()
    status, body = zone.api("PUT", f"{DATAPLANES}/redis-1", dataplane("redis-1", "hijack"))
    assert status == 409, body
    assert "default.yaml" in body["details"]
    status, body = zone.api("DELETE", f"{DATAPLANES}/redis-1")
    assert status == 409, body
    assert "default.yaml" in body["details"]
    document = external_service("httpbin", address="example.com:443")
    status, body = zone.api("PUT", f"{EXTERNAL_SERVICES}/httpbin", document)
    assert status == 409, body
    assert zone.state() == before
    assert zone.snapshots == []
    assert zone.vip_of("redis") is not None
    assert zone.vip_of("hijack") is None


@pytest.mark.parametrize(
    "path, field",
    [
        ("/meshes/bad_mesh!/dataplanes/x-1", "mesh"),
        ("/meshes/default/dataplanes/-starts-with-a-dash", "name"),
        (f"/meshes/default/dataplanes/{'n' * 300}", "name"),
    ],
)
def test_bad_names_in_the_path_are_refused(zone: ZoneApi, path: str, field: str) -> None:
    before = zone.state()
    document = dataplane("x", "pathological")
    for key in ("mesh", "name"):
        del document[key]
    status, body = zone.api("PUT", path, document)
    assert status == 400, body
    assert body["causes"][0]["field"] == field, body
    assert zone.state() == before


def test_path_that_is_not_utf8_is_400(zone: ZoneApi) -> None:
    status, body = zone.api("GET", "/meshes/caf%E9")
    assert status == 400, body
    assert "UTF-8" in body["details"]


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_store_that_cannot_write_is_503_and_changes_nothing(
    zone: ZoneApi, logged: EventLoggingObserver, method: str
) -> None:
    assert zone.api("PUT", f"{DATAPLANES}/cache-1", dataplane("cache-1", "cache"))[0] == 201
    before = zone.state()
    zone.store.failing = True
    status, body = zone.api(method, f"{DATAPLANES}/cache-1", dataplane("cache-1", "other"))
    assert status == 503, body
    assert "disk full" in body["details"]
    assert lines(logged, "Dataplane default/cache-1", "disk full")
    zone.store.failing = False
    assert zone.state() == before


# -- routing ---------------------------------------------------------------------------------


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
def test_unknown_paths_are_404(zone: ZoneApi, path: str) -> None:
    status, body = zone.api("GET", path)
    assert status == 404, body
    assert body["details"]
    assert zone.requests("GET", 404) == 1


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
def test_wrong_methods_are_405(zone: ZoneApi, method: str, path: str) -> None:
    before = zone.state()
    status, body = zone.api(method, path, dataplane("redis-1", "redis"))
    assert status == 405, body
    assert method in body["details"]
    assert zone.state() == before
    assert zone.requests(method, 405) == 1


def test_requests_are_counted_by_method_and_status(zone: ZoneApi) -> None:
    zone.api("GET", "/vips")
    zone.api("GET", "/vips")
    zone.api("PUT", f"{DATAPLANES}/a-1", dataplane("a-1", "a"))
    zone.api("PUT", f"{DATAPLANES}/a-1", {"bogus": 1})
    assert zone.requests("GET", 200) == 2
    assert zone.requests("PUT", 201) == 1
    assert zone.requests("PUT", 400) == 1


# -- /vips --------------------------------------------------------------------------------------


def test_vips_sorted_by_mesh_then_service_with_the_design_fields(zone: ZoneApi) -> None:
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
    assert set(document) == {"version", "items", "total", "next", "rangeSize", "rangeUsed"}
    assert document["version"] == zone.zone.snapshot.version > 0
    assert document["rangeSize"] == 2**28 - 2
    items = document["items"]
    assert document["rangeUsed"] == len(items)
    keys = [(item["mesh"], item["service"]) for item in items]
    assert keys == sorted(keys)
    assert set(keys) == FILE_SERVICES | {("alpha", "mmm"), ("default", "zzz"), ("payments", "aaa")}
    assert ("default", "httpbin") not in keys

    for item in items:
        assert set(item) == {"mesh", "service", "vip", "vip6", "names", "zones", "provisional"}
        vip, vip6 = ipaddress.ip_address(item["vip"]), ipaddress.ip_address(item["vip6"])
        assert vip in V4 and vip6 in V6
        # The IPv6 VIP sits at the same offset in its range as the IPv4 one.
        assert int(vip) - int(V4.network_address) == int(vip6) - int(V6.network_address), item
        assert item["zones"] == ["zone-1"]
        assert item["provisional"] is False
    assert len({item["vip"] for item in items}) == len(items)
    assert len({item["vip6"] for item in items}) == len(items)

    by_key = {(item["mesh"], item["service"]): item for item in items}
    assert by_key["default", "redis"]["names"] == ["redis.mesh"]
    assert by_key["payments", "redis"]["names"] == ["redis.mesh"]
    assert by_key["default", ECHO]["names"] == [
        f"{ECHO}.mesh",
        "echo-server.echo-example.svc.1010.mesh",
    ]


def test_vips_version_grows_with_each_change_only(zone: ZoneApi) -> None:
    first = zone.vips()["version"]
    assert zone.api("PUT", f"{DATAPLANES}/v-1", dataplane("v-1", "versioned"))[0] == 201
    second = zone.vips()["version"]
    assert second > first
    # An update that changes no service leaves the table as it was.
    document = dataplane("v-1", "versioned", address="192.0.2.201")
    assert zone.api("PUT", f"{DATAPLANES}/v-1", document)[0] == 200
    assert zone.vips()["version"] == second
    assert zone.api("GET", "/")[1]["tableVersion"] == second


def test_vips_warns_of_a_service_without_a_dns_name(zone: ZoneApi) -> None:
    service = "a" * 70
    assert zone.api("PUT", f"{DATAPLANES}/long-1", dataplane("long-1", service))[0] == 201
    entry = zone.vip_of(service)
    assert entry is not None
    assert entry["vip"] and entry["vip6"]
    assert entry["names"] == []
    assert entry["warnings"] and all(isinstance(w, str) for w in entry["warnings"])
    assert "warnings" not in (zone.vip_of("redis") or {})


def test_vips_reports_an_exhausted_range(tmp_path: Path) -> None:
    zone = ZoneApi(tmp_path, config=TINY)
    for i in range(8):
        assert zone.api("PUT", f"{DATAPLANES}/s-{i}", dataplane(f"s-{i}", f"s{i}"))[0] == 201
    document = zone.vips()
    assert (document["rangeSize"], document["rangeUsed"], len(document["items"])) == (6, 6, 6)
    (error,) = document["errors"]
    assert error["error"] == "VIP range exhausted"
    assert len(error["services"]) == 2
    served = {f"default/{item['service']}" for item in document["items"]}
    assert not set(error["services"]) & served
    assert set(error["services"]) | served == {f"default/s{i}" for i in range(8)}


def test_yaml_timestamps_are_kept_as_written(zone: ZoneApi) -> None:
    """What `kumactl get dataplane -o yaml` prints: YAML timestamps, unquoted."""
    raw = (
        as_yaml(dataplane("timed-1", "timed"))
        .replace("type: Dataplane\n", "type: Dataplane\ncreationTime: 2024-01-01T00:00:00Z\n")
        .encode()
    )
    status, body = zone.api(
        "PUT", f"{DATAPLANES}/timed-1", raw=raw, content_type="application/yaml"
    )
    assert status == 201, body
    assert body["creationTime"] == "2024-01-01T00:00:00Z"
    assert zone.api("GET", f"{DATAPLANES}/timed-1")[1]["creationTime"] == "2024-01-01T00:00:00Z"


# -- the global ------------------------------------------------------------------------------


class GlobalApi:
    """A hub over a fresh MergedTable, its API, and what it persisted."""

    def __init__(self, config: DnsServerConfig = CONFIG) -> None:
        vip_range = VipRange(config.cidr, config.cidr6)
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.table = MergedTable(vip_range, 3600.0)
        self.persisted: list[tuple[TableDelta | None, list[str], list[str]]] = []
        self.failing = False
        self.sync_metrics = SyncMetrics(CollectorRegistry())
        self.hub = GlobalHub(
            self.table,
            "table-of-the-global",
            (str(config.cidr), str(config.cidr6)),
            self.persist,
            self.clock,
            self.sync_metrics,
            require_certificates=False,
        )
        self.metrics = Metrics("global")
        self.site = Site(
            GlobalApiResource(self.hub, "mesh", self.metrics, self.clock), reactor=self.clock
        )

    def persist(self, delta: TableDelta | None, zones: list[str], deleted: list[str]) -> None:
        if self.failing:
            raise StoreError("cannot write to store (disk full)")
        self.persisted.append((delta, list(zones), list(deleted)))

    def inventory(self, zone: str, *services: tuple[str, str]) -> None:
        """Zone C{zone} sent its services, and is gone again."""
        delta = self.table.receive_inventory(
            zone, Inventory(True, 0, True, services), self.clock.seconds()
        )
        self.hub.changed(delta, [zone], [])

    def connect(self, zone: str, *services: tuple[str, str]) -> SyncProtocol:
        """Zone C{zone} connects over a StringTransport and sends its services."""
        proto = SyncFactory(self.hub.session, self.clock, self.sync_metrics).buildProtocol(None)
        proto.makeConnection(StringTransport())
        cidr, cidr6 = self.hub.cidrs
        proto.dataReceived(encode(Hello(zone, cidr=cidr, cidr6=cidr6)))
        proto.dataReceived(encode(Inventory(True, 0, True, services)))
        assert zone in self.hub.sessions
        return proto

    def api(self, method: str, path: str) -> tuple[int, Any]:
        return answer(self.site, method, path)


def test_global_about() -> None:
    glob = GlobalApi()
    glob.inventory("zone-2", ("default", "db"))
    status, body = glob.api("GET", "/")
    assert status == 200
    assert body == {
        "product": "kumazone",
        "version": __version__,
        "role": "global",
        "tableVersion": glob.table.version,
        "zones": 1,
    }


def test_global_zones_lists_each_zone() -> None:
    glob = GlobalApi()
    assert glob.api("GET", "/zones") == (200, {"total": 0, "items": [], "next": None})

    glob.inventory("zone-2", ("default", "db"), ("default", "web"))
    glob.clock.advance(60)
    glob.connect("zone-1", ("default", "web"))
    status, body = glob.api("GET", "/zones")
    assert status == 200
    assert body["total"] == 2 and body["next"] is None
    one, two = body["items"]
    version = glob.table.version
    assert one == {
        "name": "zone-1",
        "state": "online",
        "lastContact": "2023-11-14T22:14:20+00:00",
        "services": 1,
        "ackedVersion": 0,
        "tableVersion": version,
    }
    assert two == {
        "name": "zone-2",
        "state": "offline",
        "lastContact": "2023-11-14T22:13:20+00:00",
        "services": 2,
        "ackedVersion": 0,
        "tableVersion": version,
    }
    assert glob.api("GET", "/zones/zone-2") == (200, two)
    status, body = glob.api("GET", "/zones/zone-9")
    assert status == 404
    assert "zone-9" in body["details"]


def test_global_zone_never_heard_from_has_no_last_contact() -> None:
    glob = GlobalApi()
    glob.table.zone("zone-3")
    assert glob.api("GET", "/zones/zone-3")[1]["lastContact"] is None


def test_global_delete_zone(logged: EventLoggingObserver) -> None:
    glob = GlobalApi()
    glob.inventory("zone-2", ("default", "db"))
    glob.inventory("zone-3", ("default", "web"))
    assert [item["service"] for item in glob.api("GET", "/vips")[1]["items"]] == ["db", "web"]

    assert glob.api("DELETE", "/zones/zone-2") == (200, {})
    assert glob.persisted[-1][2] == ["zone-2"]
    assert lines(logged, "zone zone-2 deleted")
    assert glob.api("GET", "/zones/zone-2")[0] == 404
    assert [item["service"] for item in glob.api("GET", "/vips")[1]["items"]] == ["web"]
    status, body = glob.api("DELETE", "/zones/zone-2")
    assert status == 404
    assert "zone-2" in body["details"]


def test_global_refuses_to_delete_a_connected_zone() -> None:
    glob = GlobalApi()
    glob.connect("zone-1", ("default", "web"))
    persisted = len(glob.persisted)
    status, body = glob.api("DELETE", "/zones/zone-1")
    assert status == 409, body
    assert "zone-1" in body["details"]
    assert len(glob.persisted) == persisted
    assert glob.api("GET", "/zones/zone-1")[1]["state"] == "online"


def test_global_delete_when_the_store_fails_is_503() -> None:
    glob = GlobalApi()
    glob.inventory("zone-2", ("default", "db"))
    glob.failing = True
    status, body = glob.api("DELETE", "/zones/zone-2")
    assert status == 503, body
    assert "disk full" in body["details"]


def test_global_vips() -> None:
    glob = GlobalApi()
    glob.inventory("zone-2", ("payments", "ledger"), ("default", ECHO), ("default", "web"))
    glob.inventory("zone-3", ("default", "web"), ("default", "a" * 70))
    document = glob.api("GET", "/vips")[1]
    assert set(document) == {"version", "items", "total", "next", "rangeSize", "rangeUsed"}
    assert document["version"] == glob.table.version
    assert document["rangeSize"] == 2**28 - 2
    items = document["items"]
    assert document["rangeUsed"] == len(items) == 4
    keys = [(item["mesh"], item["service"]) for item in items]
    assert keys == [
        ("default", "a" * 70),
        ("default", ECHO),
        ("default", "web"),
        ("payments", "ledger"),
    ]
    for item in items:
        vip, vip6 = ipaddress.ip_address(item["vip"]), ipaddress.ip_address(item["vip6"])
        assert int(vip) - int(V4.network_address) == int(vip6) - int(V6.network_address), item
        assert item["provisional"] is False
    by_key = {key: item for key, item in zip(keys, items, strict=True)}
    assert by_key["default", "web"]["zones"] == ["zone-2", "zone-3"]
    assert by_key["default", "web"]["names"] == ["web.mesh"]
    assert "warnings" not in by_key["default", "web"]
    assert by_key["default", ECHO]["names"] == [
        f"{ECHO}.mesh",
        "echo-server.echo-example.svc.1010.mesh",
    ]
    long = by_key["default", "a" * 70]
    assert long["names"] == [] and long["warnings"]
    assert long["zones"] == ["zone-3"]


def test_global_vips_reports_an_exhausted_range() -> None:
    glob = GlobalApi(TINY)
    # No zone may take more than half the range (3 of 6): three zones fill it.
    for zone, first in (("zone-1", 0), ("zone-2", 3), ("zone-3", 6)):
        glob.inventory(zone, *(("default", f"s{i}") for i in range(first, min(8, first + 3))))
    document = glob.api("GET", "/vips")[1]
    assert (document["rangeSize"], document["rangeUsed"]) == (6, 6)
    (error,) = document["errors"]
    assert error["error"] == "VIP range exhausted"
    assert len(error["services"]) == 2 and error["services"] == sorted(error["services"])


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("GET", "/meshes", 404),
        ("GET", "/zones/zone-1/extra", 404),
        ("GET", "/vips/extra", 404),
        ("POST", "/", 405),
        ("POST", "/vips", 405),
        ("PUT", "/zones", 405),
        ("PUT", "/zones/zone-1", 405),
    ],
)
def test_global_unknown_paths_and_methods(method: str, path: str, status: int) -> None:
    glob = GlobalApi()
    answered, body = glob.api(method, path)
    assert answered == status, body
    assert body["details"]
