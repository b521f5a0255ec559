"""GET /vips paging and filters, entity tags, the status page and `kumazone status`.

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
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.server import Site

from kumazone.core.config import load_config
from kumazone.core.federation import MergedTable
from kumazone.core.vips import ServiceKey, VipRange
from kumazone.core.zone import Zone
from kumazone.metrics import Metrics
from kumazone.store.sqlite import SQLiteStore
from kumazone.sync.global_side import GlobalHub
from kumazone.web.api import ApiResource, GlobalApiResource
from kumazone.web.listing import MAX_PAGE_SIZE, PAGE_SIZE
from kumazone.web.status import status_page, wants_status_page
from kumazone.web.status_cli import StatusError, read_status, render_status, render_vips
from tests.builders import dataplane_resource

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
