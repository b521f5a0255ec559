"""The HTTP API (port 5681): Kuma-compatible resources and the VIP table.

Routes::

    GET    /                                  about this control plane (a browser: the status page)
    GET    /meshes                            every mesh
    GET    /meshes/{mesh}                     one mesh
    GET    /meshes/{mesh}/dataplanes          Dataplanes of a mesh
    GET|PUT|DELETE /meshes/{mesh}/dataplanes/{name}
    GET    /meshes/{mesh}/external-services
    GET|PUT|DELETE /meshes/{mesh}/external-services/{name}
    GET    /vips                              the VIP table, a page at a time

Bodies are JSON or YAML (by Content-Type; YAML when unsure), one resource each.
A resource that does not validate gets HTTP 400 naming the field; nothing stored
changes.  C{GET /vips} pages and filters (C{?size=&offset=&mesh=&service=}, see
L{kumazone.web.listing}); every JSON answer to a C{GET} carries an C{ETag}, and
C{If-None-Match} with it gets C{304}.  A browser asking for C{/} (C{Accept:
text/html}) gets the status page (L{kumazone.web.status}); any other client, JSON.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import resource as web_resource
from twisted.web.server import Request

from kumazone import __version__
from kumazone.core.ratelimit import RateLimiter, limited
from kumazone.core.resources import (
    DATAPLANE,
    EXTERNAL_SERVICE,
    MESH,
    ResourceError,
    ResourceKey,
    load_documents,
    parse_resource,
)
from kumazone.core.storage import StoreError
from kumazone.core.zone import ConflictError, Zone, ZoneSnapshot
from kumazone.metrics import Metrics, method_label
from kumazone.sync.global_side import GlobalHub, ZoneConnected
from kumazone.web.listing import QueryError, VipQuery, entity_tag, matches_entity_tag, page_items
from kumazone.web.status import status_page, wants_status_page

__all__ = [
    "MAX_BODY_OCTETS",
    "ApiResource",
    "GlobalApiResource",
    "vip_items",
    "vips_document",
]

MAX_BODY_OCTETS = 1024 * 1024
_COLLECTIONS = {"dataplanes": DATAPLANE, "external-services": EXTERNAL_SERVICE}


class HttpError(Exception):
    """An error answer: status, title, details and the fields at fault."""

    def __init__(
        self, status: int, title: str, details: str, causes: list[dict[str, str]] | None = None
    ) -> None:
        super().__init__(details)
        self.status = status
        self.body = {"title": title, "details": details, "causes": causes or []}


def vip_items(snapshot: ZoneSnapshot) -> list[dict[str, Any]]:
    """Every item of a zone's C{GET /vips}, sorted by mesh and service."""
    return [
        {
            "mesh": entry.key.mesh,
            "service": entry.key.service,
            "vip": entry.vip,
            "vip6": entry.vip6,
            "names": list(entry.names),
            "zones": list(entry.zones),
            "provisional": entry.provisional,
            **({"warnings": list(entry.problems)} if entry.problems else {}),
        }
        for entry in snapshot.entries
    ]


def vips_document(
    version: int,
    items: list[dict[str, Any]],
    range_size: int,
    exhausted: list[str],
    query: VipQuery | None = None,
    base_url: str = "/vips",
) -> dict[str, Any]:
    """The C{GET /vips} body: one page of C{items} (all of them without a query)."""
    if query is None:
        page, total, next_url = items, len(items), None
    else:
        page, total, next_url = page_items(items, query, base_url)
    document: dict[str, Any] = {
        "version": version,
        "items": page,
        "total": total,
        "next": next_url,
        "rangeSize": range_size,
        "rangeUsed": len(items),
    }
    if exhausted:
        document["errors"] = [{"error": "VIP range exhausted", "services": exhausted}]
    return document


def _vip_query(request: Request) -> VipQuery:
    """The paging and filters of a C{GET /vips}; HTTP 400 naming a bad parameter."""
    args = {
        key.decode("utf-8", "replace"): [v.decode("utf-8", "replace") for v in values]
        for key, values in (request.args or {}).items()
    }
    try:
        return VipQuery.parse(args)
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


def _listing(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"total": len(items), "items": items, "next": None}


class _JsonApi(web_resource.Resource):
    """A leaf resource that routes on the path and answers JSON."""

    isLeaf = True
    log = Logger()

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render(self, request: Request) -> bytes:
        method = request.method.decode("ascii", "replace")
        postpath = [p for p in request.postpath or [] if p]
        if method == "GET" and not postpath:
            request.setHeader(b"vary", b"Accept")
            if wants_status_page(request.getHeader("accept")):
                return self._status_page(request)
        try:
            path = [p.decode("utf-8") for p in postpath]
            status, body = self._route(method, path, request)
        except HttpError as e:
            status, body = e.status, e.body
        except UnicodeDecodeError:
            status, body = (
                400,
                {"title": "Bad request", "details": "path is not UTF-8", "causes": []},
            )
        encoded = json.dumps(body, indent=2, sort_keys=False).encode() + b"\n"
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

    def _route(self, method: str, path: list[str], request: Request) -> tuple[int, Any]:
        raise NotImplementedError

    def _only(self, method: str, allowed: str) -> None:
        if method != allowed:
            raise HttpError(405, "Method not allowed", f"{method} is not allowed here")


class ApiResource(_JsonApi):
    """A zone's API."""

    def __init__(
        self,
        zone: Zone,
        metrics: Metrics,
        clock: IReactorTime,
        sync_status: Callable[[], dict[str, Any] | None] = lambda: None,
    ) -> None:
        super().__init__(metrics)
        self.zone = zone
        self.clock = clock
        self.sync_status = sync_status
        #: The snapshot whose /vips items were built last, and those items.
        self._items_of: tuple[ZoneSnapshot | None, list[dict[str, Any]]] = (None, [])
        self._reject_log = limited(
            RateLimiter(burst=20, interval=60.0), clock, lambda line: self.log.warn(line)
        )

    # -- routing ----------------------------------------------------------------

    def _route(self, method: str, path: list[str], request: Request) -> tuple[int, Any]:
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
            return 200, self._vips(snapshot, _vip_query(request), _base_url(request, "/vips"))
        if path[0] != "meshes" or len(path) > 4:
            raise HttpError(404, "Not found", f"no such endpoint /{'/'.join(path)}")
        if len(path) == 1:
            self._only(method, "GET")
            return 200, _listing([self._mesh_document(m) for m in snapshot.meshes])
        mesh = path[1]
        if len(path) == 2:
            self._only(method, "GET")
            if mesh not in snapshot.meshes:
                raise HttpError(404, "Could not retrieve a resource", f"mesh {mesh!r} not found")
            return 200, self._mesh_document(mesh)
        kind = _COLLECTIONS.get(path[2])
        if kind is None:
            raise HttpError(404, "Not found", f"no such collection {path[2]!r}")
        if len(path) == 3:
            self._only(method, "GET")
            items = [
                dict(r.document)
                for key, r in sorted(self.zone.resources().items())
                if key.type == kind and key.mesh == mesh
            ]
            return 200, _listing(items)
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

    def _vips(self, snapshot: ZoneSnapshot, query: VipQuery, base_url: str) -> dict[str, Any]:
        """One page of the table; the items are built once per snapshot."""
        built, items = self._items_of
        if built is not snapshot:
            items = vip_items(snapshot)
            self._items_of = (snapshot, items)
        exhausted = [f"{k.mesh}/{k.service}" for k in snapshot.exhausted]
        return vips_document(
            snapshot.version, items, snapshot.range_size, exhausted, query, base_url
        )

    def _mesh_document(self, mesh: str) -> dict[str, Any]:
        declared = self.zone.resources().get(ResourceKey(MESH, "", mesh))
        return dict(declared.document) if declared else {"type": MESH, "name": mesh}

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

    def _put(self, key: ResourceKey, request: Request) -> tuple[int, Any]:
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
        try:
            created = self.zone.put(resource, self.clock.seconds())
        except ConflictError as e:
            raise HttpError(409, "Conflict", str(e)) from None
        except StoreError as e:
            self.log.error("API: {key} not stored: {error}", key=str(key), error=str(e))
            raise HttpError(503, "Store unavailable", str(e)) from None
        self.log.info(
            "API: {key} {action}", key=str(key), action="created" if created else "updated"
        )
        return (201 if created else 200), dict(resource.document)

    def _delete(self, key: ResourceKey) -> tuple[int, Any]:
        try:
            deleted = self.zone.delete(key, self.clock.seconds())
        except ConflictError as e:
            raise HttpError(409, "Conflict", str(e)) from None
        except StoreError as e:
            self.log.error("API: {key} not deleted: {error}", key=str(key), error=str(e))
            raise HttpError(503, "Store unavailable", str(e)) from None
        if not deleted:
            raise HttpError(404, "Could not delete a resource", f"{key} not found")
        self.log.info("API: {key} deleted", key=str(key))
        return 200, {}


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
        #: (allocator, version) whose /vips items were built last, and those items.
        self._items_of: tuple[object, int, list[dict[str, Any]]] = (None, -1, [])

    def _route(self, method: str, path: list[str], request: Request) -> tuple[int, Any]:
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
            return 200, self._vips(_vip_query(request), _base_url(request, "/vips"))
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

    def _vips(self, query: VipQuery, base_url: str) -> dict[str, Any]:
        """One page of the merged table."""
        table = self.hub.merged
        exhausted = [f"{k.mesh}/{k.service}" for k in sorted(table.allocator.exhausted)]
        return vips_document(
            table.version,
            self._items(),
            table.allocator.range.size,
            exhausted,
            query,
            base_url,
        )

    def _items(self) -> list[dict[str, Any]]:
        """Every item of C{/vips}, built again only when the table changed.

        Every change of the merged table bumps its version; a store failure puts a
        new allocator in place (L{MergedTable.restore}), so both are the key.
        """
        table = self.hub.merged
        allocator, version, items = self._items_of
        if allocator is table.allocator and version == table.version:
            return items
        vip_range = table.allocator.range
        items = []
        names = table.names(self.domain)
        for row in table.rows():
            owned, problems = names[(row.mesh, row.service)]
            items.append(
                {
                    "mesh": row.mesh,
                    "service": row.service,
                    "vip": str(vip_range.ipv4(row.offset)),
                    "vip6": str(vip_range.ipv6(row.offset)),
                    "names": list(owned),
                    "zones": list(row.zones),
                    "provisional": False,
                    **({"warnings": list(problems)} if problems else {}),
                }
            )
        self._items_of = (table.allocator, table.version, items)
        return items
