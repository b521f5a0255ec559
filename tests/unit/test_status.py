"""Listings (GET /vips, dataplanes, meshes) paged and filtered, entity tags, the status
page and `kumazone status`.

In-process: requests go through a real L{Site} over a L{StringTransport} (headers and
query strings parsed as off a socket); the zone is a real L{Zone} over SQLite in
memory, the global a L{MergedTable} behind a stand-in hub; time is a L{Clock}.
`kumazone status` reads the same sites through a fetch function, as it reads a
real API through urllib.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any, cast
from urllib.parse import urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.server import Site

from kumazone.core.config import load_config
from kumazone.core.federation import MergedTable
from kumazone.core.sortedindex import SortedIndex
from kumazone.core.vips import ServiceKey, VipRange
from kumazone.core.zone import Zone
from kumazone.metrics import Metrics
from kumazone.store.sqlite import SQLiteStore
from kumazone.sync.global_side import GlobalHub
from kumazone.web.api import SCAN_RESTARTS, ApiResource, GlobalApiResource
from kumazone.web.listing import MAX_PAGE_SIZE, PAGE_SIZE, KeyScan, find, key_range
from kumazone.web.status import status_page, wants_status_page
from kumazone.web.status_cli import (
    REREADS,
    StatusError,
    read_status,
    render_status,
    render_vips,
)
from tests.builders import dataplane_resource, external_service, resource

CONFIG = load_config(None, {})
NOW = 1_700_000_000.0
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


class Answer:
    """One HTTP answer: status, headers (lower-cased names) and body."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json", (self.status, self.body)
        return json.loads(self.body)


def request(site: Site, path: str, method: str = "GET", **headers: str) -> Answer:
    """One request through the site's HTTP channel; header names with _ for -."""
    channel = site.buildProtocol(None)
    assert channel is not None
    transport = StringTransport()
    channel.makeConnection(transport)
    head = [f"{method} {path} HTTP/1.1", "Host: kumazone.test:5681", "Connection: close"]
    head += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    channel.dataReceived(("\r\n".join(head) + "\r\nContent-Length: 0\r\n\r\n").encode())
    channel.connectionLost(Failure(ConnectionDone()))
    response_head, _, body = transport.value().partition(b"\r\n\r\n")
    status_line, *lines = response_head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines)
    return Answer(int(status_line.split()[1]), {k.lower(): v for k, v in fields.items()}, body)


def get(site: Site, path: str) -> Any:
    answer = request(site, path)
    assert answer.status == 200, (answer.status, answer.body)
    return answer.json()


def zone_site(services: int, payments: int = 0) -> tuple[Zone, Site, Metrics]:
    """A zone with C{services} services svc-0000... in default (and some in payments)."""
    zone = Zone("zone-1", CONFIG, SQLiteStore(":memory:"))
    puts = [dataplane_resource(f"dp-{n}", f"svc-{n:04d}") for n in range(services)]
    puts += [
        dataplane_resource(f"pay-{n}", f"ledger-{n}", mesh="payments") for n in range(payments)
    ]
    zone.set_file("services.yaml", puts, NOW)  # one reconciliation for them all
    clock = Clock()
    clock.advance(NOW)
    metrics = Metrics("zone-1")
    return zone, Site(ApiResource(zone, metrics, clock), reactor=clock), metrics


class Hub:
    """What the global's API reads of its hub: the merged table."""

    def __init__(self) -> None:
        self.merged = MergedTable(VipRange(CONFIG.cidr, CONFIG.cidr6), 3600.0)

    def zone(self, name: str, *services: str, connected: bool = True) -> None:
        record = self.merged.zone(name)
        record.services = {ServiceKey("default", s) for s in services}
        record.connected = connected
        record.last_contact = NOW - 30
        self.merged.reconcile(NOW)
        record.acked = self.merged.version


def global_site(hub: Hub) -> Site:
    clock = Clock()
    clock.advance(NOW)
    resource = GlobalApiResource(cast(GlobalHub, hub), "mesh", Metrics("global"), clock)
    return Site(resource, reactor=clock)


def all_pages(site: Site, path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every page from C{path} on, following C{next}: (items, pages)."""
    pages = [get(site, path)]
    while pages[-1]["next"] is not None:
        url = urlsplit(pages[-1]["next"])
        assert url.netloc == "kumazone.test:5681"  # the host the client asked
        pages.append(get(site, f"{url.path}?{url.query}"))
    return [item for page in pages for item in page["items"]], pages


# -- paging ---------------------------------------------------------------------------


def test_vips_pages_of_100_by_default_and_next_walks_the_whole_table() -> None:
    zone, site, _ = zone_site(250)
    first = get(site, "/vips")
    assert len(first["items"]) == PAGE_SIZE == 100
    assert first["total"] == first["rangeUsed"] == 250
    assert first["version"] == zone.snapshot.version
    assert first["next"] == "http://kumazone.test:5681/vips?size=100&offset=100"

    items, pages = all_pages(site, "/vips")
    assert [len(p["items"]) for p in pages] == [100, 100, 50]
    assert pages[-1]["next"] is None
    services = [item["service"] for item in items]
    assert services == [f"svc-{n:04d}" for n in range(250)]  # sorted, each once
    assert all(page["total"] == 250 for page in pages)


def test_vips_size_and_offset() -> None:
    _, site, _ = zone_site(30)
    page = get(site, "/vips?size=7&offset=21")
    assert [i["service"] for i in page["items"]] == [f"svc-{n:04d}" for n in range(21, 28)]
    assert page["next"] == "http://kumazone.test:5681/vips?size=7&offset=28"
    assert get(site, "/vips?size=7&offset=28")["next"] is None
    beyond = get(site, "/vips?offset=500")
    assert (beyond["items"], beyond["total"], beyond["next"]) == ([], 30, None)
    assert len(get(site, f"/vips?size={MAX_PAGE_SIZE}")["items"]) == 30


@pytest.mark.parametrize(
    "query, parameter",
    [
        ("size=0", "size"),
        (f"size={MAX_PAGE_SIZE + 1}", "size"),
        ("size=ten", "size"),
        ("offset=-1", "offset"),
        ("offset=1.5", "offset"),
    ],
)
def test_vips_bad_paging_is_400_naming_the_parameter(query: str, parameter: str) -> None:
    _, site, _ = zone_site(3)
    answer = request(site, f"/vips?{query}")
    assert answer.status == 400
    body = answer.json()
    assert body["causes"][0]["field"] == parameter
    assert parameter in body["details"]


# -- filters --------------------------------------------------------------------------


def test_vips_filter_by_mesh_and_by_part_of_the_service_name() -> None:
    _, site, _ = zone_site(120, payments=3)
    payments = get(site, "/vips?mesh=payments")
    assert [i["service"] for i in payments["items"]] == ["ledger-0", "ledger-1", "ledger-2"]
    assert payments["total"] == 3 and payments["rangeUsed"] == 123

    found = get(site, "/vips?service=SVC-01&size=5")  # case ignored
    assert found["total"] == 20  # svc-0100 ... svc-0119
    assert [i["service"] for i in found["items"]] == [f"svc-01{n:02d}" for n in range(5)]
    assert found["next"] == "http://kumazone.test:5681/vips?size=5&offset=5&service=SVC-01"
    items, _ = all_pages(site, "/vips?service=SVC-01&size=5")
    assert len(items) == 20

    assert get(site, "/vips?mesh=payments&service=svc")["total"] == 0
    assert get(site, "/vips?mesh=nowhere")["items"] == []


def test_vips_search_by_vip_or_vip6_in_any_spelling() -> None:
    _, site, _ = zone_site(40)
    table = get(site, "/vips")["items"]
    wanted = table[17]
    for text in (wanted["vip"], wanted["vip6"], ipaddress.ip_address(wanted["vip6"]).exploded):
        found = get(site, f"/vips?service={text.upper()}")
        assert [i["service"] for i in found["items"]] == [wanted["service"]], text
    assert get(site, "/vips?service=not-an-address")["total"] == 0


def test_global_vips_pages_and_filters_like_the_zone() -> None:
    hub = Hub()
    hub.zone("zone-1", *(f"svc-{n:04d}" for n in range(130)))
    hub.zone("zone-2", "web", "svc-0005")
    site = global_site(hub)
    first = get(site, "/vips")
    assert (len(first["items"]), first["total"], first["rangeUsed"]) == (100, 131, 131)
    assert first["version"] == hub.merged.version
    items, pages = all_pages(site, "/vips")
    assert len(pages) == 2 and len(items) == 131
    assert [i["service"] for i in items] == sorted(i["service"] for i in items)
    web = get(site, "/vips?service=web")
    assert [(i["service"], i["zones"], i["names"]) for i in web["items"]] == [
        ("web", ["zone-2"], ["web.mesh"])
    ]
    shared = get(site, "/vips?service=svc-0005")["items"]
    assert [i["zones"] for i in shared] == [["zone-1", "zone-2"]]
    assert request(site, "/vips?size=abc").status == 400


def test_global_vips_follow_a_change_of_the_table() -> None:
    hub = Hub()
    hub.zone("zone-1", "a", "b")
    site = global_site(hub)
    assert get(site, "/vips")["total"] == 2
    hub.zone("zone-1", "a", "b", "c")
    after = get(site, "/vips")
    assert (after["total"], after["version"]) == (3, hub.merged.version)


# -- entity tags ------------------------------------------------------------------------


def test_vips_etag_gives_304_until_the_table_changes() -> None:
    zone, site, metrics = zone_site(5)
    first = request(site, "/vips")
    tag = first.headers["etag"]
    assert re.fullmatch(r'"[0-9a-f]{20}"', tag)
    assert first.headers["cache-control"] == "no-cache"

    unchanged = request(site, "/vips", If_None_Match=tag)
    assert (unchanged.status, unchanged.body) == (304, b"")
    assert request(site, "/vips", If_None_Match=f'"other", W/{tag}').status == 304
    assert request(site, "/vips", If_None_Match='"other"').status == 200
    # Another page is another answer, with its own tag.
    assert request(site, "/vips?size=2", If_None_Match=tag).status == 200

    zone.put(dataplane_resource("dp-new", "brand-new"), NOW)
    changed = request(site, "/vips", If_None_Match=tag)
    assert changed.status == 200 and changed.headers["etag"] != tag
    assert "brand-new" in {i["service"] for i in changed.json()["items"]}
    counted = metrics.registry.get_sample_value(
        "kumazone_api_requests_total", {"method": "GET", "status": "304"}
    )
    assert counted == 2


def test_zones_etag_gives_304_until_a_zone_changes() -> None:
    hub = Hub()
    hub.zone("zone-1", "a")
    site = global_site(hub)
    tag = request(site, "/zones").headers["etag"]
    assert request(site, "/zones", If_None_Match=tag).status == 304
    hub.merged.zones["zone-1"].connected = False
    answer = request(site, "/zones", If_None_Match=tag)
    assert answer.status == 200
    assert answer.json()["items"][0]["state"] == "offline"


def test_errors_carry_no_etag() -> None:
    _, site, _ = zone_site(1)
    assert "etag" not in request(site, "/vips?size=0").headers
    assert "etag" not in request(site, "/nowhere").headers


# -- every listing, a page at a time ------------------------------------------------------

#: Meshes and how many services (one Dataplane each) a zone of L{big_zone} has in each.
BIG = {"default": 230, "payments": 45, "zz-last": 30}


def big_zone() -> tuple[Zone, Site, ApiResource, Clock]:
    """A zone with a few hundred services in three meshes, and ExternalServices."""
    zone = Zone("zone-1", CONFIG, SQLiteStore(":memory:"))
    puts = [
        dataplane_resource(f"dp-{mesh}-{n:03d}", f"{mesh[:3]}-svc-{n:03d}", mesh=mesh)
        for mesh, count in BIG.items()
        for n in range(count)
    ]
    puts += [resource(external_service(f"ext-{n:03d}")) for n in range(130)]
    puts += [resource({"type": "Mesh", "name": mesh}) for mesh in BIG]
    zone.set_file("services.yaml", puts, NOW)
    clock = Clock()
    clock.advance(NOW)
    api = ApiResource(zone, Metrics("zone-1"), clock)
    return zone, Site(api, reactor=clock), api, clock


def names_listed(site: Site, path: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Every page from C{path}: (the items' names, or mesh/service for /vips; pages)."""
    items, pages = all_pages(site, path)
    if path.startswith("/vips"):
        return [f"{i['mesh']}/{i['service']}" for i in items], pages
    return [i["name"] for i in items], pages


@pytest.mark.parametrize("size", [1, 7, 100, MAX_PAGE_SIZE])
def test_every_page_of_every_listing_adds_up_to_the_whole_sorted_listing(size: int) -> None:
    zone, site, _, _ = big_zone()
    table = [f"{e.key.mesh}/{e.key.service}" for e in zone.snapshot.entries]
    assert len(table) == sum(BIG.values())
    expected: dict[str, list[str]] = {
        "/vips": table,
        "/vips?mesh=payments": [t for t in table if t.startswith("payments/")],
        "/vips?mesh=default": [t for t in table if t.startswith("default/")],
        "/vips?mesh=zz-last": [t for t in table if t.startswith("zz-last/")],
        "/vips?mesh=pay": [],  # a mesh is named whole, not a prefix
        "/vips?service=SVC-01": [t for t in table if "svc-01" in t.split("/")[1]],
        "/vips?mesh=payments&service=svc-04": [
            t for t in table if t.startswith("payments/") and "svc-04" in t
        ],
        "/meshes": ["default", "payments", "zz-last"],
        "/meshes/default/external-services": [f"ext-{n:03d}" for n in range(130)],
        "/meshes/payments/external-services": [],
    }
    for mesh, count in BIG.items():
        expected[f"/meshes/{mesh}/dataplanes"] = [f"dp-{mesh}-{n:03d}" for n in range(count)]
    for path, wanted in expected.items():
        paged = f"{path}{'&' if '?' in path else '?'}size={size}"
        names, pages = names_listed(site, paged)
        assert names == wanted, path
        assert all(page["total"] == len(wanted) for page in pages), path
        assert [len(page["items"]) for page in pages[:-1]] == [size] * (len(pages) - 1), path
        assert pages[-1]["next"] is None
        assert len(pages) == max(1, -(-len(wanted) // size)), path


def test_resource_listings_page_as_kuma_does() -> None:
    _, site, _, _ = big_zone()
    first = get(site, "/meshes/default/dataplanes")
    assert (len(first["items"]), first["total"]) == (PAGE_SIZE, 230)
    assert first["next"] == (
        "http://kumazone.test:5681/meshes/default/dataplanes?size=100&offset=100"
    )
    assert first["items"][0] == {**first["items"][0], "type": "Dataplane", "name": "dp-default-000"}
    deep = get(site, "/meshes/default/dataplanes?size=20&offset=220")
    assert [i["name"] for i in deep["items"]] == [f"dp-default-{n}" for n in range(220, 230)]
    assert deep["next"] is None
    beyond = get(site, "/meshes/default/dataplanes?offset=5000")
    assert (beyond["items"], beyond["total"], beyond["next"]) == ([], 230, None)
    assert get(site, "/meshes/nowhere/dataplanes") == {"total": 0, "items": [], "next": None}
    # A listing is indented JSON with one item a line (grep finds an item whole).
    lines = request(site, "/meshes/default/dataplanes?size=3").body.decode().splitlines()
    assert lines[0] == "{" and lines[-1] == "}"
    items = [json.loads(line.strip().rstrip(",")) for line in lines if line.startswith("    {")]
    assert [i["name"] for i in items] == ["dp-default-000", "dp-default-001", "dp-default-002"]


@pytest.mark.parametrize(
    "path", ["/meshes", "/meshes/default/dataplanes", "/meshes/default/external-services"]
)
@pytest.mark.parametrize(
    "query, parameter",
    [("size=0", "size"), ("size=1001", "size"), ("size=x", "size"), ("offset=-3", "offset")],
)
def test_resource_listings_refuse_bad_paging_naming_the_parameter(
    path: str, query: str, parameter: str
) -> None:
    _, site, _ = zone_site(3)
    answer = request(site, f"{path}?{query}")
    assert answer.status == 400
    assert answer.json()["causes"][0]["field"] == parameter
    assert "etag" not in answer.headers


def test_a_page_of_dataplanes_has_an_etag_until_that_page_changes() -> None:
    zone, site, _, _ = big_zone()
    path = "/meshes/default/dataplanes?size=10&offset=200"
    tag = request(site, path).headers["etag"]
    assert request(site, path, If_None_Match=tag).status == 304
    zone.put(dataplane_resource("dp-default-2000", "late"), NOW)  # lands on that page
    changed = request(site, path, If_None_Match=tag)
    assert changed.status == 200
    assert "dp-default-2000" in [i["name"] for i in changed.json()["items"]]


# -- sorted sequences, by key (pure) ------------------------------------------------------

KEYS = st.tuples(st.sampled_from(["a", "b", "c"]), st.text("xyz", max_size=3)).map(
    lambda pair: ServiceKey(*pair)
)


@given(
    st.sets(KEYS, max_size=40),
    st.lists(st.tuples(st.booleans(), KEYS), max_size=30),
    st.integers(1, 7),
)
@settings(max_examples=150, deadline=None)
def test_a_scan_by_key_sees_each_key_there_throughout_once(
    start: set[ServiceKey], changes: list[tuple[bool, ServiceKey]], budget: int
) -> None:
    """Whatever changes between slices, a key present throughout is found exactly once."""
    for sequence in (SortedIndex((k, k) for k in start), tuple(sorted(start))):
        present = set(start)
        throughout = set(start)
        scan: KeyScan[ServiceKey, ServiceKey] = KeyScan(
            lambda k: k, lambda k: "x" in k.service, ServiceKey("b", ""), ServiceKey("b\x00", "")
        )
        pending = list(changes)
        while not scan.step(sequence, budget):
            if pending:
                add, key = pending.pop()
                (present.add if add else present.discard)(key)
                if not add:
                    throughout.discard(key)
                if isinstance(sequence, SortedIndex):
                    sequence.set(key, key) if add else sequence.pop(key)
                else:
                    sequence = tuple(sorted(present))
        wanted = {k for k in throughout if k.mesh == "b" and "x" in k.service}
        assert wanted <= set(scan.matched)
        assert len(scan.matched) == len(set(scan.matched))  # none twice
        assert scan.matched == sorted(scan.matched)
        assert all(k.mesh == "b" and "x" in k.service for k in scan.matched)
        if not changes:
            assert set(scan.matched) == wanted


def test_ranges_and_lookups_in_a_sorted_index_and_in_any_sorted_sequence() -> None:
    keys = [ServiceKey(m, s) for m in ("a", "b", "b-c", "c") for s in ("p", "q", "r")]
    index = SortedIndex((k, k) for k in keys)
    for sequence in (index, keys):  # the index bisects its own keys; a list, through key_of

        def mesh(name: str, sequence: Any = sequence) -> tuple[int, int]:
            low, high = ServiceKey(name, ""), ServiceKey(name + "\x00", "")
            return key_range(sequence, low, high, lambda k: k)

        assert (mesh("a"), mesh("b"), mesh("b-c"), mesh("c")) == ((0, 3), (3, 6), (6, 9), (9, 12))
        assert mesh("bb") == (9, 9) and mesh("") == (0, 0) and mesh("z") == (12, 12)
        assert key_range(sequence, ServiceKey("c", ""), None, lambda k: k) == (9, 12)
        assert find(sequence, ServiceKey("b-c", "q"), lambda k: k) == ServiceKey("b-c", "q")
        assert find(sequence, ServiceKey("b-c", "x"), lambda k: k) is None


# -- a scan for part of a name, a slice per reactor turn ---------------------------------


class Pending:
    """A request whose answer may come in a later reactor turn (the connection stays up)."""

    def __init__(self, site: Site, path: str, **headers: str) -> None:
        channel = site.buildProtocol(None)
        assert channel is not None
        self.channel = channel
        self.transport = StringTransport()
        channel.makeConnection(self.transport)
        head = [f"GET {path} HTTP/1.1", "Host: kumazone.test:5681", "Connection: close"]
        head += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
        channel.dataReceived(("\r\n".join(head) + "\r\nContent-Length: 0\r\n\r\n").encode())

    @property
    def answered(self) -> bool:
        return bool(self.transport.disconnecting)

    def answer(self) -> Answer:
        assert self.answered
        response_head, _, body = self.transport.value().partition(b"\r\n\r\n")
        status_line, *lines = response_head.decode("latin-1").split("\r\n")
        fields = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines)}
        assert "transfer-encoding" not in fields  # as an answer given at once: a length
        assert int(fields.get("content-length", "0")) == len(body)
        return Answer(int(status_line.split()[1]), fields, body)

    def hang_up(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))


def turn(clock: Clock) -> int:
    """One reactor turn: run the calls due now (not those they schedule); how many ran."""
    due = [call for call in clock.calls if call.getTime() <= clock.seconds()]
    for call in due:
        clock.calls.remove(call)
        call.called = True
        call.func(*call.args, **call.kw)
    return len(due)


def turns_until_answered(clock: Clock, *pending: Pending) -> int:
    turns = 0
    while not all(p.answered for p in pending):
        assert turn(clock), "nothing left to run, and no answer"
        turns += 1
    return turns


def test_a_scan_for_part_of_a_name_runs_a_slice_per_turn_and_answers_right() -> None:
    zone, site, api, clock = big_zone()
    api.vips.scan_slice = 40  # 305 services: 8 slices
    pending = Pending(site, "/vips?service=svc-02&size=10")
    assert not pending.answered
    turns = turns_until_answered(clock, pending)
    assert turns >= 7
    found = pending.answer().json()
    table = [e.key for e in zone.snapshot.entries]
    wanted = [k for k in table if "svc-02" in k.service]
    assert found["total"] == len(wanted) == 30  # svc-020 .. svc-029 in each of 3 meshes
    assert [(i["mesh"], i["service"]) for i in found["items"]] == [
        (k.mesh, k.service) for k in wanted[:10]
    ]
    assert found["version"] == zone.snapshot.version
    assert found["next"] == "http://kumazone.test:5681/vips?size=10&offset=10&service=svc-02"
    assert not clock.getDelayedCalls()
    # The pages after it (and the same page again) come from what the scan found: at once.
    items, _ = all_pages(site, found["next"].removeprefix("http://kumazone.test:5681"))
    assert [(i["mesh"], i["service"]) for i in items] == [(k.mesh, k.service) for k in wanted[10:]]
    assert not clock.getDelayedCalls()


def test_a_scan_under_a_table_change_starts_again_and_answers_the_new_table() -> None:
    zone, site, api, clock = big_zone()
    api.vips.scan_slice = 40
    pending = Pending(site, "/vips?service=svc-00")
    turn(clock)
    turn(clock)
    zone.put(dataplane_resource("dp-new", "aaa-svc-00-new"), NOW)  # before the scan's cursor
    turns_until_answered(clock, pending)
    found = pending.answer().json()
    assert found["version"] == zone.snapshot.version
    services = [i["service"] for i in found["items"]]
    assert services[0] == "aaa-svc-00-new"
    assert found["total"] == len(services) == 31


def test_a_scan_under_constant_change_still_answers() -> None:
    zone, site, api, clock = big_zone()
    api.vips.scan_slice = 40
    pending = Pending(site, "/vips?service=svc-00")
    n = 0
    while not pending.answered:
        n += 1
        zone.put(dataplane_resource(f"dp-churn-{n}", f"churn-{n}"), NOW)
        turn(clock)
    assert n > SCAN_RESTARTS
    # It finished on the table as it went, by key: the services there throughout, once each.
    found = pending.answer().json()
    wanted = [e.key for e in zone.snapshot.entries if "svc-00" in e.key.service]
    assert found["total"] == len(wanted) == 30
    assert [(i["mesh"], i["service"]) for i in found["items"]] == [
        (k.mesh, k.service) for k in wanted
    ]
    assert found["version"] == zone.snapshot.version


def test_identical_scans_share_one_and_a_client_that_hangs_up_stops_its_own() -> None:
    _, site, api, clock = big_zone()
    api.vips.scan_slice = 40
    one, two = Pending(site, "/vips?service=svc-01"), Pending(site, "/vips?service=svc-01")
    assert len(clock.getDelayedCalls()) == 1  # one scan for both
    turns_until_answered(clock, one, two)
    assert one.answer().body == two.answer().body
    assert one.answer().json()["total"] == 30

    alone = Pending(site, "/vips?service=svc-00")
    assert len(clock.getDelayedCalls()) == 1
    alone.hang_up()
    assert not clock.getDelayedCalls()  # nobody waits: the scan stops


def test_a_scanned_answer_has_an_etag_and_304() -> None:
    _, site, api, clock = big_zone()
    api.vips.scan_slice = 40
    first = Pending(site, "/vips?service=svc-01")
    turns_until_answered(clock, first)
    tag = first.answer().headers["etag"]
    again = request(site, "/vips?service=svc-01", If_None_Match=tag)  # from what was found
    assert (again.status, again.body) == (304, b"")


def test_a_vip_is_found_by_its_offset_without_a_scan() -> None:
    _, site, api, clock = big_zone()
    api.vips.scan_slice = 1
    wanted = get(site, "/vips?mesh=payments&size=1&offset=17")["items"][0]
    for text in (wanted["vip"], wanted["vip6"]):
        found = get(site, f"/vips?service={text}")  # answered at once: no scan
        assert [(i["mesh"], i["service"]) for i in found["items"]] == [
            ("payments", wanted["service"])
        ]
        assert found["total"] == 1
        assert get(site, f"/vips?service={text}&mesh=payments")["total"] == 1
        assert get(site, f"/vips?service={text}&mesh=default")["total"] == 0
    assert get(site, "/vips?service=10.255.255.254")["total"] == 0  # nobody's VIP
    assert not clock.getDelayedCalls()


def test_global_vips_every_page_and_a_scan_over_turns() -> None:
    hub = Hub()
    hub.zone("zone-1", *(f"svc-{n:03d}" for n in range(260)))
    hub.zone("zone-2", "web", "svc-005")
    site = global_site(hub)
    resource = site.resource
    assert isinstance(resource, GlobalApiResource)
    for size in (9, 100):
        items, pages = all_pages(site, f"/vips?size={size}")
        assert [i["service"] for i in items] == [*(f"svc-{n:03d}" for n in range(260)), "web"]
        assert all(page["total"] == 261 for page in pages)
    resource.vips.scan_slice = 30
    pending = Pending(site, "/vips?service=svc-00")
    clock = cast(Clock, resource.clock)
    assert turns_until_answered(clock, pending) >= 8
    found = pending.answer().json()
    assert [i["service"] for i in found["items"]] == [f"svc-00{n}" for n in range(10)]
    assert found["items"][5]["zones"] == ["zone-1", "zone-2"]
    vip = found["items"][3]["vip"]
    assert [i["service"] for i in get(site, f"/vips?service={vip}")["items"]] == ["svc-003"]


# -- the status page ------------------------------------------------------------------


@pytest.mark.parametrize(
    "accept, page",
    [
        (BROWSER_ACCEPT, True),
        ("text/html", True),
        ("*/*", False),  # curl
        (None, False),  # urllib
        ("application/json", False),
        ("application/json, text/html;q=0.5", False),
        ("text/html;q=0", False),
        ("text/html;q=0.9, application/json;q=0.8", True),
    ],
)
def test_a_browser_gets_the_page_any_other_client_json(accept: str | None, page: bool) -> None:
    assert wants_status_page(accept) is page


@pytest.mark.parametrize("make", ["zone", "global"])
def test_get_slash_is_the_page_for_a_browser_and_json_for_curl(make: str) -> None:
    if make == "zone":
        site = zone_site(2)[1]
    else:
        hub = Hub()
        hub.zone("zone-1", "a")
        site = global_site(hub)
    browser = request(site, "/", Accept=BROWSER_ACCEPT)
    assert browser.status == 200
    assert browser.headers["content-type"] == "text/html; charset=utf-8"
    assert browser.headers["vary"] == "Accept"
    assert "default-src 'none'" in browser.headers["content-security-policy"]
    assert browser.body == status_page()
    curl = request(site, "/", Accept="*/*")
    assert curl.json()["role"] == make
    assert curl.headers["vary"] == "Accept"
    assert request(site, "/", method="POST", Accept=BROWSER_ACCEPT).status == 405


def test_the_page_loads_nothing_from_anywhere_else() -> None:
    html = status_page().decode()
    assert html.startswith("<!doctype html>")
    # No address of another host: no http(s):// at all, no protocol-relative //host.
    assert not re.search(r"https?://", html)
    assert not re.search(r"""(src|href)\s*=\s*["']//""", html)
    assert "<link" not in html and "@import" not in html and "<script src" not in html
    # What it reads: this server's API, paged.
    for path in ('getJSON("/")', 'getJSON("/zones")', '"/vips?"'):
        assert path in html
    assert "If-None-Match" in html
    assert "innerHTML" not in html  # names are text, never markup


# -- kumazone status ------------------------------------------------------------------


def site_fetch(site: Site) -> Any:
    """A fetch for L{read_status} that reads C{site} as urllib would read the API."""

    def fetch(url: str) -> Any:
        parts = urlsplit(url)
        return get(site, parts.path + (f"?{parts.query}" if parts.query else ""))

    return fetch


def test_status_of_the_global_lists_zones_with_state_contact_and_lag() -> None:
    hub = Hub()
    hub.zone("zone-1", "web", "db")
    hub.zone("zone-2", "cache", connected=False)
    version = hub.merged.version
    hub.merged.zones["zone-1"].acked = version
    hub.merged.zones["zone-2"].acked = version - 1
    site = global_site(hub)
    document = read_status("http://kumazone.test:5681/", site_fetch(site))
    lines = render_status(document, NOW)
    assert lines[0] == "global  http://kumazone.test:5681  kumazone " + document["about"]["version"]
    assert f"table version  {version}" in lines
    assert "zones          1 of 2 online" in lines
    assert "VIPs           3 of 268435454" in lines
    header = next(line for line in lines if line.startswith("zone "))
    assert header.split() == ["zone", "state", "last", "contact", "services", "acked", "lag"]
    rows = {line.split()[0]: line for line in lines[lines.index(header) + 1 :]}
    assert rows["zone-1"].split() == [
        "zone-1",
        "online",
        "22:12:50Z",
        "(30",
        "s",
        "ago)",
        "2",
        str(version),
        "in",
        "sync",
    ]
    assert rows["zone-2"].split()[1] == "offline"
    assert rows["zone-2"].endswith(f"{version - 1} version behind")


def test_status_of_a_zone_shows_its_sync_state() -> None:
    site = zone_site(3)[1]
    document = read_status("http://kumazone.test:5681", site_fetch(site))
    assert "sync           standalone (allocates its own VIPs)" in render_status(document, NOW)

    about = dict(document["about"])
    about["sync"] = {
        "global": "global:5685",
        "connected": True,
        "connectedSince": NOW - 100,
        "lastTable": NOW - 40,
    }
    lines = render_status({**document, "about": about}, NOW)
    assert lines[0].startswith("zone-1  http://kumazone.test:5681")
    assert "sync           connected to global:5685 since 22:11:40Z" in lines
    assert "last table     22:12:40Z (40 s ago)" in lines
    about["sync"] = {**about["sync"], "connected": False, "connectedSince": None}
    lines = render_status({**document, "about": about}, NOW)
    assert "sync           DISCONNECTED from global:5685 (retrying with backoff)" in lines


def test_status_vips_reads_every_page_and_filters() -> None:
    _, site, _ = zone_site(1203)
    pages: list[str] = []
    fetch = site_fetch(site)

    def counting(url: str) -> Any:
        pages.append(url)
        return fetch(url)

    document = read_status("http://kumazone.test:5681", counting, vips=True)
    assert len(document["vips"]["items"]) == 1203
    assert len([url for url in pages if "/vips" in url]) == 2  # pages of 1000
    lines = render_vips(document["vips"])
    assert lines[0].split() == ["mesh/service", "VIP", "IPv6", "VIP", "zones"]
    assert lines[1].startswith("default/svc-0000 ")
    assert lines[-1] == f"1203 of 1203 VIP(s), table version {document['vips']['version']}"

    found = read_status("http://kumazone.test:5681", fetch, vips=True, service="svc-12")
    assert [line.split()[0] for line in render_vips(found["vips"])[1:-1]] == [
        "default/svc-1200",
        "default/svc-1201",
        "default/svc-1202",
    ]
    none = read_status("http://kumazone.test:5681", fetch, vips=True, service="nothing")
    assert render_vips(none["vips"]) == [f"0 of 0 VIP(s), table version {none['vips']['version']}"]


def test_status_vips_of_a_table_that_never_stops_changing_ends() -> None:
    zone, site, _ = zone_site(1203)
    fetch = site_fetch(site)
    pages: list[str] = []

    def churning(url: str) -> Any:
        answer = fetch(url)
        if "/vips" in url:
            pages.append(url)
            zone.put(dataplane_resource(f"dp-churn-{len(pages)}", f"churn-{len(pages)}"), NOW)
        return answer

    document = read_status("http://kumazone.test:5681", churning, vips=True)
    assert len(pages) == 2 * (REREADS + 1)  # read again from the start, then as it is
    assert document["vips"]["changing"] is True
    assert render_vips(document["vips"])[-1].endswith("(the table kept changing while it was read)")
    steady = read_status("http://kumazone.test:5681", fetch, vips=True)
    assert "changing" not in steady["vips"]


def test_status_marks_provisional_vips() -> None:
    vips = {
        "version": 3,
        "total": 1,
        "items": [
            {
                "mesh": "default",
                "service": "orders",
                "vip": "244.136.113.48",
                "vip6": "fd00:fd00::488:7130",
                "names": ["orders.mesh"],
                "zones": ["zone-2"],
                "provisional": True,
            }
        ],
    }
    assert render_vips(vips)[1].split()[-2:] == ["zone-2", "provisional"]


def test_status_says_what_is_not_a_kumazone_api() -> None:
    def elsewhere(url: str) -> Any:
        return {"hello": "world"}

    def unreachable(url: str) -> Any:
        raise StatusError(f"cannot reach {url}: connection refused")

    with pytest.raises(StatusError, match="is not a kumazone API"):
        read_status("http://192.0.2.1:5681", elsewhere)
    with pytest.raises(StatusError, match="connection refused"):
        read_status("http://192.0.2.1:5681", unreachable)


def test_status_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    from kumazone.cli import main

    with pytest.raises(SystemExit):
        main(["status", "--help"])
    usage = capsys.readouterr().out
    for flag in ("--api", "--vips", "--service", "--mesh"):
        assert flag in usage
