"""The HTTP API (port 5681): Kuma-compatible resources and the VIP table.

Routes::

    GET    /                                  about this control plane (a browser: the status page)
    GET    /meshes                            the meshes, a page at a time
    GET    /meshes/{mesh}                     one mesh
    GET    /meshes/{mesh}/dataplanes          Dataplanes of a mesh, a page at a time
    GET|PUT|DELETE /meshes/{mesh}/dataplanes/{name}
    GET    /meshes/{mesh}/external-services   ExternalServices of a mesh, a page at a time
    GET|PUT|DELETE /meshes/{mesh}/external-services/{name}
    GET    /vips                              the VIP table, a page at a time
    GET    /dataplanes/connected              the dataplanes connected, a page at a time

Bodies are JSON or YAML (by Content-Type; YAML when unsure), one resource each.
A resource that does not validate gets HTTP 400 naming the field; nothing stored
changes.  Listings page as Kuma's do (C{?size=&offset=}, C{total}, C{next}; see
L{kumazone.web.listing}) and C{GET /vips} filters too (C{?mesh=&service=}); every
JSON answer to a C{GET} carries an C{ETag}, and C{If-None-Match} with it gets
C{304}.  A browser asking for C{/} (C{Accept: text/html}) gets the status page
(L{kumazone.web.status}); any other client, JSON.

What a listing costs on the reactor is what its page holds: pages are slices of
the zone's sorted live indexes (C{zone.snapshot.entries}, C{zone.listing()}) and
of the global's; a mesh is a range found by bisection; a VIP is found by its
offset.  Only C{/vips?service=TEXT} must look at every service name: that scan
runs L{SCAN_SLICE} names per reactor turn (the answer waits, C{NOT_DONE_YET}),
and its answer is consistent: if the table changes while it runs, it starts
again (at most L{SCAN_RESTARTS} times; after that it finishes on the table as it
is, by key, so that a service present throughout is counted once and one added
or removed meanwhile may or may not be).  The services that match are kept per
table version (a few queries), so paging through them, or polling them with
C{If-None-Match} as the status page does, costs a page, not a scan.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any, NamedTuple, Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource as web_resource
from twisted.web.server import NOT_DONE_YET, Request

from kumazone import __version__
from kumazone.core.federation import MergedTable
from kumazone.core.messages import Row
from kumazone.core.names import Assignment
from kumazone.core.ratelimit import RateLimiter, limited
from kumazone.core.resources import (
    DATAPLANE,
    EXTERNAL_SERVICE,
    MESH,
    Resource,
    ResourceError,
    ResourceKey,
    load_documents,
    parse_resource,
)
from kumazone.core.storage import StoreError
from kumazone.core.vips import ServiceKey
from kumazone.core.zone import ConflictError, VipEntry, Zone, ZoneSnapshot
from kumazone.metrics import Metrics, method_label
from kumazone.sync.dataplane_side import DataplaneHub, DataplaneSession
from kumazone.sync.global_side import GlobalHub, ZoneConnected
from kumazone.web.listing import (
    KeyScan,
    MeshQuery,
    PageQuery,
    QueryError,
    VipQuery,
    entity_tag,
    find,
    key_range,
    matches_entity_tag,
    next_url,
)
from kumazone.web.status import status_page, wants_status_page

__all__ = [
    "MAX_BODY_OCTETS",
    "SCAN_RESTARTS",
    "SCAN_SLICE",
    "ApiResource",
    "GlobalApiResource",
]

MAX_BODY_OCTETS = 1024 * 1024
_COLLECTIONS = {"dataplanes": DATAPLANE, "external-services": EXTERNAL_SERVICE}
#: Service names a C{/vips?service=} scan looks at per reactor turn (about 1 ms).
SCAN_SLICE = 5000
#: How often a scan starts again because the table changed, before it finishes as is.
SCAN_RESTARTS = 3
#: Scans' results kept (by table version and filter) for the pages that follow.
_SCANS_KEPT = 16
#: The global's live index of rows by key, when its table keeps one (L{_GlobalVips}).
_GLOBAL_ROWS = "listing"


class _Declared(Protocol):
    """Resources by key (a mapping, or a L{SortedIndex})."""

    def get(self, key: ResourceKey, /) -> Resource | None: ...


#: What a route answers: (status, body), or a Deferred of it (answered later).
Answer = tuple[int, Any]


class HttpError(Exception):
    """An error answer: status, title, details and the fields at fault."""

    def __init__(
        self, status: int, title: str, details: str, causes: list[dict[str, str]] | None = None
    ) -> None:
        super().__init__(details)
        self.status = status
        self.body = {"title": title, "details": details, "causes": causes or []}


def _query(request: Request, kind: type[PageQuery]) -> Any:
    """The paging (and filters) of a listing; HTTP 400 naming a bad parameter."""
    args = {
        key.decode("utf-8", "replace"): [v.decode("utf-8", "replace") for v in values]
        for key, values in (request.args or {}).items()
    }
    try:
        return kind.parse(args)
    except QueryError as e:
        raise HttpError(
            400,
            "Bad request",
            f"query parameter {e}",
            [{"field": e.parameter, "message": e.message}],
        ) from None


def _base_url(request: Request, path: str) -> str:
    """This server's URL for C{path}, as the client named it (for C{next})."""
    host = request.getHeader("host")
    if not host:
        address = request.getHost()
        host = f"{getattr(address, 'host', 'localhost')}:{getattr(address, 'port', 80)}"
    scheme = "https" if request.isSecure() else "http"
    return f"{scheme}://{host}{path}"


def _page(
    items: Sequence[Any], query: PageQuery, base_url: str
) -> tuple[list[Any], int, str | None]:
    """One page of a sorted sequence: (the page's items, total, next URL); O(page)."""
    total = len(items)
    start, stop = query.bounds(total)
    return list(items[start:stop]), total, next_url(base_url, query, total)


def _no_default(value: object) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON")


#: One value as compact JSON (C{", "} and C{": "} between items), by json's C encoder
#: made once; without it (another Python), json's own.
_compact: Callable[[Any], str]
if c_make_encoder is not None:
    _c_encoder = c_make_encoder(
        None, _no_default, encode_basestring_ascii, None, ": ", ", ", False, False, True
    )

    def _compact(value: Any) -> str:
        return "".join(_c_encoder(value, 0))

else:  # pragma: no cover - CPython has the C encoder
    _compact = json.JSONEncoder(separators=(", ", ": ")).encode


class _RawJson(NamedTuple):
    """An item of a listing that is JSON already (a resource as stored): sent as is."""

    text: str


def _item(value: Any) -> str:
    return value.text if isinstance(value, _RawJson) else _compact(value)


def _json(body: Any) -> bytes:
    """An answer's JSON: indented, ending in a newline; a listing, one item a line.

    A page of 1,000 items through C{json.dumps(indent=2)} (json's pure-Python
    path) costs about 20 ms; an item a line by the C encoder, about a third.
    """
    if not (isinstance(body, dict) and isinstance(body.get("items"), list)):
        return json.dumps(body, indent=2).encode() + b"\n"
    lines = []
    for key, value in body.items():
        if isinstance(value, list) and value:
            inner = ",\n    ".join(map(_item, value))
            lines.append(f"  {_compact(key)}: [\n    {inner}\n  ]")
        else:
            lines.append(f"  {_compact(key)}: {_compact(value)}")
    return ("{\n" + ",\n".join(lines) + "\n}\n").encode()


def _ok(body: dict[str, Any] | Deferred[dict[str, Any]]) -> Answer | Deferred[Answer]:
    """HTTP 200 with C{body}, now or when it comes."""
    if isinstance(body, Deferred):
        return body.addCallback(lambda document: (200, document))
    return 200, body


# -- the VIP table, a page at a time --------------------------------------------------


class _VipSource:
    """What C{/vips} pages through: a table's rows sorted by service key, and more.

    Made per request (and per scan step) in O(1): it points at live structures.
    """

    version: int
    range_size: int
    range_used: int

    def items(self) -> Sequence[Any]:
        """The rows, sorted by (mesh, service): a live sequence."""
        raise NotImplementedError

    def key_of(self, row: Any) -> ServiceKey:
        raise NotImplementedError

    def document(self, row: Any) -> dict[str, Any]:
        """The C{/vips} item of a row."""
        raise NotImplementedError

    def exhausted(self) -> list[str]:
        raise NotImplementedError

    def owner(self, address: str) -> ServiceKey | None:
        """The service whose VIP (or IPv6 VIP) C{address} is, or None."""
        raise NotImplementedError

    def same(self, other: _VipSource) -> bool:
        """Whether C{other} was made from this very version of the table."""
        raise NotImplementedError


def _vip_item(entry: VipEntry) -> dict[str, Any]:
    return {
        "mesh": entry.key.mesh,
        "service": entry.key.service,
        "vip": entry.vip,
        "vip6": entry.vip6,
        "names": list(entry.names),
        "zones": list(entry.zones),
        "provisional": entry.provisional,
        **({"warnings": list(entry.problems)} if entry.problems else {}),
    }


def _entry_key(entry: VipEntry) -> ServiceKey:
    return entry.key


class _ZoneVips(_VipSource):
    """A zone's table: C{zone.snapshot.entries} (sorted by key, live in the zone)."""

    def __init__(self, zone: Zone, exhausted: Callable[[ZoneSnapshot], list[str]]) -> None:
        self.zone = zone
        self.snapshot = zone.snapshot
        self.version = self.snapshot.version
        self.range_size = self.snapshot.range_size
        self.range_used = self.snapshot.range_used
        self._exhausted = exhausted

    def items(self) -> Sequence[VipEntry]:
        return self.snapshot.entries

    def key_of(self, row: Any) -> ServiceKey:
        return _entry_key(row)

    def document(self, row: Any) -> dict[str, Any]:
        return _vip_item(row)

    def exhausted(self) -> list[str]:
        return self._exhausted(self.snapshot)

    def owner(self, address: str) -> ServiceKey | None:
        table = self.zone.table
        offset = table.range.offset_of(ipaddress.ip_address(address))
        key = table.owner(offset) if offset is not None else None
        entry = find(self.items(), key, _entry_key) if key is not None else None
        # The table's offsets and the snapshot agree but for a service without a VIP.
        if entry is None or address not in (entry.vip, entry.vip6):
            return None
        return key

    def same(self, other: _VipSource) -> bool:
        return isinstance(other, _ZoneVips) and other.snapshot is self.snapshot


class _GlobalTable(NamedTuple):
    """One version of the merged table, as C{/vips} lists it."""

    rows: Sequence[Row]
    names: Callable[[str, str], Assignment]
    exhausted: list[str]


def _row_key(row: Row) -> ServiceKey:
    return ServiceKey(row.mesh, row.service)


class _GlobalVips(_VipSource):
    """The global's merged table: its rows sorted by key and the names they own."""

    def __init__(self, table: MergedTable, built: _GlobalTable) -> None:
        self.table = table
        self.allocator = table.allocator
        self.version = table.version
        self.range_size = table.allocator.range.size
        self.range_used = len(table.allocator.allocations)
        self.built = built

    def items(self) -> Sequence[Row]:
        return self.built.rows

    def key_of(self, row: Any) -> ServiceKey:
        return _row_key(row)

    def document(self, row: Any) -> dict[str, Any]:
        vip_range = self.allocator.range
        owned, problems = self.built.names(row.mesh, row.service)
        return {
            "mesh": row.mesh,
            "service": row.service,
            "vip": str(vip_range.ipv4(row.offset)),
            "vip6": str(vip_range.ipv6(row.offset)),
            "names": list(owned),
            "zones": list(row.zones),
            "provisional": False,
            **({"warnings": list(problems)} if problems else {}),
        }

    def exhausted(self) -> list[str]:
        return self.built.exhausted

    def owner(self, address: str) -> ServiceKey | None:
        offset = self.allocator.range.offset_of(ipaddress.ip_address(address))
        return self.allocator.owner(offset) if offset is not None else None

    def same(self, other: _VipSource) -> bool:
        return (
            isinstance(other, _GlobalVips)
            and other.allocator is self.allocator
            and other.version == self.version
        )


class _ScanJob:
    """A C{/vips?service=} scan, a slice per reactor turn, for whoever waits on it."""

    def __init__(
        self,
        source: Callable[[], _VipSource],
        mesh: str | None,
        test: Callable[[ServiceKey], bool],
        clock: IReactorTime,
        budget: int,
        done: Callable[[_ScanJob], None],
    ) -> None:
        self._source = source
        self._mesh = mesh
        self._test = test
        self._clock = clock
        self._budget = budget
        self._done = done
        self.waiters: list[Deferred[tuple[_VipSource, list[ServiceKey]]]] = []
        self.restarts = 0
        #: Whether the answer is of one version of the table (else: as it was, by key).
        self.consistent = True
        self.steps = 0
        self._call: IDelayedCall | None = None
        self._start(source())

    def _start(self, source: _VipSource) -> None:
        self.source = source
        mesh = self._mesh
        low = ServiceKey(mesh, "") if mesh is not None else ServiceKey("", "")
        high = ServiceKey(mesh + "\x00", "") if mesh is not None else None
        self.scan: KeyScan[Any, ServiceKey] = KeyScan(source.key_of, self._test, low, high)

    def wait(self) -> Deferred[tuple[_VipSource, list[ServiceKey]]]:
        waiter: Deferred[tuple[_VipSource, list[ServiceKey]]] = Deferred(self._cancel)
        self.waiters.append(waiter)
        return waiter

    def _cancel(self, waiter: Deferred[Any]) -> None:
        if waiter in self.waiters:
            self.waiters.remove(waiter)
        if not self.waiters:
            self.stop()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._done(self)

    def step(self) -> bool:
        """One slice (on the table as it is now); True once the scan is done."""
        self._call = None
        self.steps += 1
        now = self._source()
        if not now.same(self.source):
            if self.restarts < SCAN_RESTARTS:
                self.restarts += 1
                self._start(now)
            else:
                self.consistent = False
                self.source = now  # go on by key, on the table as it is now
        return self.scan.step(self.source.items(), self._budget)

    def schedule(self) -> None:
        """Run the next slice in the next reactor turn."""
        self._call = self._clock.callLater(0, self.run)

    def run(self) -> None:
        """Run slices, one per reactor turn, until done; then answer every waiter."""
        if not self.step():
            self.schedule()
            return
        self._done(self)
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            waiter.callback((self.source, self.scan.matched))


class _VipPages:
    """C{GET /vips} over a L{_VipSource}: pages, filters and the scans' results."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.scan_slice = SCAN_SLICE
        #: (mesh, text or address) -> (source, keys that match), newest last.
        self._found: OrderedDict[tuple[str | None, str], tuple[_VipSource, list[ServiceKey]]]
        self._found = OrderedDict()
        self._running: dict[tuple[str | None, str], _ScanJob] = {}

    def answer(
        self, source: Callable[[], _VipSource], query: VipQuery, base_url: str
    ) -> dict[str, Any] | Deferred[dict[str, Any]]:
        """One page of the table: at once, or (a scan) once the scan is done."""
        now = source()
        items = now.items()
        key_of = now.key_of
        if query.service is None:
            if query.mesh is None:
                start, stop = 0, len(items)
            else:
                start, stop = key_range(
                    items, ServiceKey(query.mesh, ""), ServiceKey(query.mesh + "\x00", ""), key_of
                )
            total = stop - start
            first, last = query.bounds(total)
            rows = items[start + first : start + last] if last > first else []
            return self._document(now, [now.document(row) for row in rows], total, query, base_url)
        address = query.address
        if address is not None:  # a VIP: its offset names its service
            key = now.owner(address)
            keys = [key] if key is not None and query.mesh in (None, key.mesh) else []
            return self._matched(now, keys, query, base_url)
        text = query.text
        assert text is not None
        wanted = (query.mesh, text)
        found = self._found.get(wanted)
        if found is not None and found[0].same(now):
            self._found.move_to_end(wanted)
            return self._matched(found[0], found[1], query, base_url)
        job = self._running.get(wanted)
        if job is None:
            job = _ScanJob(
                source,
                query.mesh,
                lambda key: text in key.service.lower(),
                self.clock,
                self.scan_slice,
                lambda done: self._finished(wanted, done),
            )
            self._running[wanted] = job
            if job.step():  # a small table: done in this turn, no waiting
                self._finished(wanted, job)
                return self._matched(job.source, job.scan.matched, query, base_url)
            waiter = job.wait()
            job.schedule()
        else:
            waiter = job.wait()
        return waiter.addCallback(lambda found: self._matched(found[0], found[1], query, base_url))

    def _finished(self, wanted: tuple[str | None, str], job: _ScanJob) -> None:
        if self._running.get(wanted) is job:
            del self._running[wanted]
        if job.scan.done and job.consistent:
            self._found[wanted] = (job.source, job.scan.matched)
            self._found.move_to_end(wanted)
            while len(self._found) > _SCANS_KEPT:
                self._found.popitem(last=False)

    def _matched(
        self, source: _VipSource, keys: list[ServiceKey], query: VipQuery, base_url: str
    ) -> dict[str, Any]:
        """The page of C{keys} (those that match, sorted) asked for: O(page log n)."""
        first, last = query.bounds(len(keys))
        items = source.items()
        rows = [find(items, key, source.key_of) for key in keys[first:last]]
        documents = [source.document(row) for row in rows if row is not None]
        return self._document(source, documents, len(keys), query, base_url)

    def _document(
        self,
        source: _VipSource,
        page: list[dict[str, Any]],
        total: int,
        query: VipQuery,
        base_url: str,
    ) -> dict[str, Any]:
        document: dict[str, Any] = {
            "version": source.version,
            "items": page,
            "total": total,
            "next": next_url(base_url, query, total),
            "rangeSize": source.range_size,
            "rangeUsed": source.range_used,
        }
        exhausted = source.exhausted()
        if exhausted:
            document["errors"] = [{"error": "VIP range exhausted", "services": exhausted}]
        return document


class _JsonApi(web_resource.Resource):
    """A leaf resource that routes on the path and answers JSON."""

    isLeaf = True
    log = Logger()

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render(self, request: Request) -> bytes | int:
        method = request.method.decode("ascii", "replace")
        postpath = [p for p in request.postpath or [] if p]
        if method == "GET" and not postpath:
            request.setHeader(b"vary", b"Accept")
            if wants_status_page(request.getHeader("accept")):
                return self._status_page(request)
        try:
            path = [p.decode("utf-8") for p in postpath]
            answer = self._route(method, path, request)
        except HttpError as e:
            answer = e.status, e.body
        except UnicodeDecodeError:
            answer = (
                400,
                {"title": "Bad request", "details": "path is not UTF-8", "causes": []},
            )
        if isinstance(answer, Deferred):
            self._answer_later(request, method, answer)
            return NOT_DONE_YET
        return self._encode(request, method, *answer)

    def _answer_later(self, request: Request, method: str, answer: Deferred[Answer]) -> None:
        """Write C{answer} when it comes; give it up if the client goes first."""
        gone: list[Failure] = []

        def client_gone(failure: Failure) -> None:
            gone.append(failure)
            answer.cancel()

        def write(result: Answer) -> None:
            if gone:
                return
            body = self._encode(request, method, *result)
            # As a body answered at once is sent: with its length, not in chunks.
            request.setHeader(b"content-length", str(len(body)).encode("ascii"))
            if body:
                request.write(body)
            request.finish()

        def failed(failure: Failure) -> None:
            if gone and failure.check(CancelledError):
                return
            if failure.check(HttpError):
                error = failure.value
                assert isinstance(error, HttpError)
                write((error.status, error.body))
                return
            self.log.failure("API: {path} failed", failure, path=request.path.decode("latin-1"))
            write((500, {"title": "Internal error", "details": "see the log", "causes": []}))

        request.notifyFinish().addErrback(client_gone)
        answer.addCallbacks(write, failed)

    def _encode(self, request: Request, method: str, status: int, body: Any) -> bytes:
        """The JSON of an answer, with its status, type and (a GET's 200) entity tag."""
        encoded = _json(body)
        request.setHeader(b"content-type", b"application/json")
        if method == "GET" and status == 200:
            tag = entity_tag(encoded)
            request.setHeader(b"etag", tag.encode("ascii"))
            request.setHeader(b"cache-control", b"no-cache")
            if matches_entity_tag(request.getHeader("if-none-match"), tag):
                status, encoded = 304, b""
        request.setResponseCode(status)
        self.metrics.api_requests.labels(method_label(method), str(status)).inc()
        return encoded

    def _status_page(self, request: Request) -> bytes:
        """The status page (HTML), for a browser's C{GET /}."""
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        # The page loads nothing but this server's API: no script, style or image from
        # anywhere else, even if a name in the table were made to look like markup.
        request.setHeader(
            b"content-security-policy",
            b"default-src 'none'; connect-src 'self'; script-src 'unsafe-inline'; "
            b"style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'",
        )
        request.setResponseCode(200)
        self.metrics.api_requests.labels("GET", "200").inc()
        return status_page()

    def _route(self, method: str, path: list[str], request: Request) -> Answer | Deferred[Answer]:
        raise NotImplementedError

    def _only(self, method: str, allowed: str) -> None:
        if method != allowed:
            raise HttpError(405, "Method not allowed", f"{method} is not allowed here")


class Writes(Protocol):
    """Where the API's writes go: the zone itself, or a replica of it."""

    def put(self, resource: Resource, now: float) -> bool | Deferred[bool]: ...

    def delete(self, key: ResourceKey, now: float) -> bool | Deferred[bool]: ...


class ApiResource(_JsonApi):
    """A zone's API."""

    def __init__(
        self,
        zone: Zone,
        metrics: Metrics,
        clock: IReactorTime,
        sync_status: Callable[[], dict[str, Any] | None] = lambda: None,
        dataplanes: DataplaneHub | None = None,
        writes: Writes | None = None,
    ) -> None:
        """
        @param dataplanes: the dataplane port's sessions (None: the port is off).
        @param writes: where PUTs and DELETEs go (None: the zone itself); a replica's
            answer later, once stored (L{kumazone.store.replica.ZoneReplica}).
        """
        super().__init__(metrics)
        self.zone = zone
        self.writes: Writes = zone if writes is None else writes
        self.clock = clock
        self.sync_status = sync_status
        self.dataplanes = dataplanes
        self.vips = _VipPages(clock)
        #: The snapshot whose exhausted services were listed last, and that list.
        self._exhausted_of: tuple[ZoneSnapshot | None, list[str]] = (None, [])
        self._reject_log = limited(
            RateLimiter(burst=20, interval=60.0), clock, lambda line: self.log.warn(line)
        )

    # -- routing ----------------------------------------------------------------

    def _route(self, method: str, path: list[str], request: Request) -> Answer | Deferred[Answer]:
        snapshot = self.zone.snapshot
        if path == []:
            self._only(method, "GET")
            return 200, {
                "product": "kumazone",
                "version": __version__,
                "zone": self.zone.name,
                "role": "zone",
                "tableVersion": snapshot.version,
                "sync": self.sync_status(),
            }
        if path == ["vips"]:
            self._only(method, "GET")
            return _ok(
                self.vips.answer(
                    self._vip_source, _query(request, VipQuery), _base_url(request, "/vips")
                )
            )
        if path == ["dataplanes", "connected"]:
            self._only(method, "GET")
            return 200, self._connected(request)
        if path[0] != "meshes" or len(path) > 4:
            raise HttpError(404, "Not found", f"no such endpoint /{'/'.join(path)}")
        if len(path) == 1:
            self._only(method, "GET")
            query = _query(request, PageQuery)
            page, total, following = _page(snapshot.meshes, query, _base_url(request, "/meshes"))
            declared = self._declared_meshes()
            items = [self._mesh_document(m, declared) for m in page]
            return 200, {"total": total, "items": items, "next": following}
        mesh = path[1]
        if len(path) == 2:
            self._only(method, "GET")
            if mesh not in snapshot.meshes:
                raise HttpError(404, "Could not retrieve a resource", f"mesh {mesh!r} not found")
            return 200, self._mesh_document(mesh, self._declared_meshes())
        kind = _COLLECTIONS.get(path[2])
        if kind is None:
            raise HttpError(404, "Not found", f"no such collection {path[2]!r}")
        if len(path) == 3:
            self._only(method, "GET")
            query = _query(request, PageQuery)
            page, total, following = _page(
                self._resources(kind, mesh), query, _base_url(request, f"/meshes/{mesh}/{path[2]}")
            )
            stored = [_RawJson(r.raw.decode("utf-8")) for r in page]
            return 200, {"total": total, "items": stored, "next": following}
        key = ResourceKey(kind, mesh, path[3])
        if method == "GET":
            found = self.zone.resources().get(key)
            if found is None:
                raise HttpError(404, "Could not retrieve a resource", f"{key} not found")
            return 200, dict(found.document)
        if method == "PUT":
            return self._put(key, request)
        if method == "DELETE":
            return self._delete(key)
        raise HttpError(405, "Method not allowed", f"{method} is not allowed here")

    def _vip_source(self) -> _VipSource:
        return _ZoneVips(self.zone, self._exhausted)

    def _connected(self, request: Request) -> dict[str, Any]:
        """A page of the dataplanes connected, by mesh and name: O(page)."""
        query: MeshQuery = _query(request, MeshQuery)
        hub = self.dataplanes
        base_url = _base_url(request, "/dataplanes/connected")
        if hub is None:
            return {"total": 0, "items": [], "next": None, "listening": False}
        sessions = hub.listing
        if query.mesh is None:
            start, stop = 0, len(sessions)
        else:
            start, stop = key_range(
                sessions, (query.mesh, ""), (query.mesh + "\x00", ""), _session_key
            )
        total = stop - start
        first, last = query.bounds(total)
        page = sessions[start + first : start + last] if last > first else []
        return {
            "total": total,
            "items": [_session_item(session) for session in page],
            "next": next_url(base_url, query, total),
            "listening": True,
            "tableVersion": hub.version,
        }

    def _exhausted(self, snapshot: ZoneSnapshot) -> list[str]:
        """The services without a VIP, as C{/vips} lists them (once per snapshot)."""
        built, exhausted = self._exhausted_of
        if built is not snapshot:
            exhausted = [f"{k.mesh}/{k.service}" for k in snapshot.exhausted]
            self._exhausted_of = (snapshot, exhausted)
        return exhausted

    def _resources(self, kind: str, mesh: str) -> Sequence[Resource]:
        """The resources of one type in one mesh, sorted by name: the zone's live listing."""
        listing = getattr(self.zone, "listing", None)
        if listing is not None:
            found: Sequence[Resource] = listing(kind, mesh)
            return found
        # A zone without listings: sort them (O(n log n), once per request).
        return [
            resource
            for key, resource in sorted(self.zone.resources().items())
            if key.type == kind and key.mesh == mesh
        ]

    def _declared_meshes(self) -> _Declared:
        """Where the Mesh resources are: the zone's listing of them, else its inventory."""
        listing = getattr(self.zone, "listing", None)
        if listing is not None:
            meshes: _Declared = listing(MESH, "")
            return meshes
        return self.zone.resources()

    def _mesh_document(self, mesh: str, declared: _Declared) -> dict[str, Any]:
        found = declared.get(ResourceKey(MESH, "", mesh))
        return dict(found.document) if found else {"type": MESH, "name": mesh}

    # -- writes -----------------------------------------------------------------

    def _reject(self, key: ResourceKey, error: ResourceError) -> HttpError:
        self.metrics.resources_rejected.labels("api").inc()
        self._reject_log(f"API: {key} refused: {error}")
        return HttpError(
            400,
            "Could not process a resource",
            "Resource is not valid",
            [{"field": error.field, "message": error.message}],
        )

    def _put(self, key: ResourceKey, request: Request) -> Answer | Deferred[Answer]:
        assert request.content is not None
        body = request.content.read(MAX_BODY_OCTETS + 1)
        if len(body) > MAX_BODY_OCTETS:
            raise HttpError(
                413, "Request too large", f"bodies are limited to {MAX_BODY_OCTETS} octets"
            )
        content_type = (request.getHeader("content-type") or "").lower()
        try:
            text = body.decode("utf-8")
            documents = list(load_documents(text, json_only="json" in content_type))
            if len(documents) != 1:
                raise ResourceError(
                    "(body)", f"must hold exactly one resource, holds {len(documents)}"
                )
            document = documents[0]
            if not isinstance(document, dict):
                raise ResourceError("(body)", "must be a mapping")
            document = dict(document)
            for field, expected in (("type", key.type), ("mesh", key.mesh), ("name", key.name)):
                document.setdefault(field, expected)
                if document[field] != expected:
                    raise ResourceError(
                        field, f"{document[field]!r} does not match {expected!r} in the path"
                    )
            resource = parse_resource(document)
        except UnicodeDecodeError:
            raise self._reject(key, ResourceError("(body)", "is not UTF-8")) from None
        except ResourceError as e:
            raise self._reject(key, e) from None

        def answer(created: bool) -> tuple[int, Any]:
            self.log.info(
                "API: {key} {action}", key=str(key), action="created" if created else "updated"
            )
            return (201 if created else 200), dict(resource.document)

        return self._written(
            key, "stored", lambda: self.writes.put(resource, self.clock.seconds()), answer
        )

    def _delete(self, key: ResourceKey) -> Answer | Deferred[Answer]:
        def answer(deleted: bool) -> tuple[int, Any]:
            if not deleted:
                raise HttpError(404, "Could not delete a resource", f"{key} not found")
            self.log.info("API: {key} deleted", key=str(key))
            return 200, {}

        return self._written(
            key, "deleted", lambda: self.writes.delete(key, self.clock.seconds()), answer
        )

    def _written(
        self,
        key: ResourceKey,
        what: str,
        write: Callable[[], bool | Deferred[bool]],
        answer: Callable[[bool], Answer],
    ) -> Answer | Deferred[Answer]:
        """C{write}'s outcome as an answer: now, or once a replica has stored it."""

        def refused(error: Exception) -> HttpError:
            if isinstance(error, ConflictError):
                return HttpError(409, "Conflict", str(error))
            self.log.error(
                "API: {key} not {what}: {error}", key=str(key), what=what, error=str(error)
            )
            return HttpError(503, "Store unavailable", str(error))

        try:
            done = write()
        except (ConflictError, StoreError) as e:
            raise refused(e) from None
        if not isinstance(done, Deferred):
            return answer(done)

        def failed(failure: Failure) -> Answer:
            failure.trap(ConflictError, StoreError)
            raise refused(failure.value)  # type: ignore[arg-type]

        return done.addCallbacks(answer, failed)


def _session_key(session: DataplaneSession) -> tuple[str, str]:
    return session.mesh, session.name


def _session_item(session: DataplaneSession) -> dict[str, Any]:
    """A dataplane as C{/dataplanes/connected} lists it."""
    return {
        "mesh": session.mesh,
        "name": session.name,
        "address": session.address,
        "version": session.acked if session.acked >= 0 else None,
        "sentVersion": session.sent_version if session.sent_version >= 0 else None,
        "connectedSince": _timestamp(session.connected_at),
    }


def _timestamp(seconds: float) -> str | None:
    if not seconds:
        return None
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="seconds")


class GlobalApiResource(_JsonApi):
    """The global's API: the VIP table and the zones.

    Routes: C{GET /}, C{GET /vips}, C{GET /zones}, C{GET|DELETE /zones/{name}}.
    """

    def __init__(self, hub: GlobalHub, domain: str, metrics: Metrics, clock: IReactorTime) -> None:
        super().__init__(metrics)
        self.hub = hub
        self.domain = domain
        self.clock = clock
        self.vips = _VipPages(clock)
        #: Without the table's live structures: (allocator, version) and what was
        #: built for them (sorted rows, names), the exhausted services likewise.
        self._built: tuple[object, int, _GlobalTable | None] = (None, -1, None)

    def _route(self, method: str, path: list[str], request: Request) -> Answer | Deferred[Answer]:
        table = self.hub.merged
        if path == []:
            self._only(method, "GET")
            return 200, {
                "product": "kumazone",
                "version": __version__,
                "role": "global",
                "tableVersion": table.version,
                "zones": len(table.zones),
            }
        if path == ["vips"]:
            self._only(method, "GET")
            return _ok(
                self.vips.answer(
                    self._vip_source, _query(request, VipQuery), _base_url(request, "/vips")
                )
            )
        if path == ["zones"]:
            self._only(method, "GET")
            items = [self._zone(name) for name in sorted(table.zones)]
            return 200, {"total": len(items), "items": items, "next": None}
        if len(path) == 2 and path[0] == "zones":
            name = path[1]
            if method == "GET":
                if name not in table.zones:
                    raise HttpError(
                        404, "Could not retrieve a resource", f"zone {name!r} not found"
                    )
                return 200, self._zone(name)
            if method == "DELETE":
                try:
                    deleted = self.hub.delete_zone(name)
                except ZoneConnected as e:
                    raise HttpError(409, "Conflict", str(e)) from None
                except StoreError as e:
                    raise HttpError(503, "Store unavailable", str(e)) from None
                if not deleted:
                    raise HttpError(404, "Could not delete a resource", f"zone {name!r} not found")
                self.log.info("API: zone {zone} deleted", zone=name)
                return 200, {}
            raise HttpError(405, "Method not allowed", f"{method} is not allowed here")
        raise HttpError(404, "Not found", f"no such endpoint /{'/'.join(path)}")

    def _zone(self, name: str) -> dict[str, Any]:
        record = self.hub.merged.zones[name]
        return {
            "name": name,
            "state": "online" if record.connected else "offline",
            "lastContact": _timestamp(record.last_contact),
            "services": len(record.services),
            "ackedVersion": record.acked,
            "tableVersion": self.hub.merged.version,
        }

    def _vip_source(self) -> _VipSource:
        return _GlobalVips(self.hub.merged, self._table())

    def _table(self) -> _GlobalTable:
        """What this version of the merged table is listed from; O(1) but once a version.

        With the table's live index of rows (L{_GLOBAL_ROWS}) and its names kept
        (C{names_of}, under this API's domain), those; without, the rows sorted and
        their names (O(n) once per version, the old way).
        """
        table = self.hub.merged
        allocator, version, built = self._built
        if built is not None and allocator is table.allocator and version == table.version:
            return built
        rows: Sequence[Row] | None = getattr(table, _GLOBAL_ROWS, None)
        names_of: Callable[[ServiceKey], Assignment] | None = getattr(table, "names_of", None)
        names: Callable[[str, str], Assignment]
        if names_of is not None and getattr(table, "domain", None) == self.domain:
            kept = names_of
            names = lambda mesh, service: kept(ServiceKey(mesh, service))  # noqa: E731
        else:
            assigned = table.names(self.domain)
            names = lambda mesh, service: assigned[(mesh, service)]  # noqa: E731
        if rows is None:
            rows = table.rows()
        exhausted = [f"{k.mesh}/{k.service}" for k in sorted(table.allocator.exhausted)]
        built = _GlobalTable(rows, names, exhausted)
        self._built = (table.allocator, table.version, built)
        return built
