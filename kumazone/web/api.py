"""The HTTP API (port 5681): Kuma-compatible resources and the VIP table.

Routes::

    GET    /                                  about this control plane
    GET    /meshes                            every mesh
    GET    /meshes/{mesh}                     one mesh
    GET    /meshes/{mesh}/dataplanes          Dataplanes of a mesh
    GET|PUT|DELETE /meshes/{mesh}/dataplanes/{name}
    GET    /meshes/{mesh}/external-services
    GET|PUT|DELETE /meshes/{mesh}/external-services/{name}
    GET    /vips                              the VIP table

Bodies are JSON or YAML (by Content-Type; YAML when unsure), one resource each.
A resource that does not validate gets HTTP 400 naming the field; nothing stored
changes.
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
from kumazone.core.names import claim_names, service_names
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
from kumazone.metrics import Metrics
from kumazone.sync.global_side import GlobalHub, ZoneConnected

__all__ = ["MAX_BODY_OCTETS", "ApiResource", "GlobalApiResource", "vips_document"]

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


def vips_document(snapshot: ZoneSnapshot) -> dict[str, Any]:
    """The C{GET /vips} body."""
    document: dict[str, Any] = {
        "version": snapshot.version,
        "items": [
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
        ],
        "rangeSize": snapshot.range_size,
        "rangeUsed": snapshot.range_used,
    }
    if snapshot.exhausted:
        document["errors"] = [
            {
                "error": "VIP range exhausted",
                "services": [f"{k.mesh}/{k.service}" for k in snapshot.exhausted],
            }
        ]
    return document


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
        try:
            path = [p.decode("utf-8") for p in request.postpath or [] if p]
            status, body = self._route(method, path, request)
        except HttpError as e:
            status, body = e.status, e.body
        except UnicodeDecodeError:
            status, body = (
                400,
                {"title": "Bad request", "details": "path is not UTF-8", "causes": []},
            )
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        self.metrics.api_requests.labels(method, str(status)).inc()
        return json.dumps(body, indent=2, sort_keys=False).encode() + b"\n"

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
            return 200, vips_document(snapshot)
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
            return 200, self._vips()
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

    def _vips(self) -> dict[str, Any]:
        table = self.hub.merged
        vip_range = table.allocator.range
        items = []
        claimed: dict[tuple[str, str], str] = {}
        for row in table.rows():
            owned, problems = claim_names(
                row.mesh, row.service, service_names(row.service, self.domain), claimed
            )
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
        document: dict[str, Any] = {
            "version": table.version,
            "items": items,
            "rangeSize": vip_range.size,
            "rangeUsed": len(items),
        }
        if table.allocator.exhausted:
            document["errors"] = [
                {
                    "error": "VIP range exhausted",
                    "services": [
                        f"{k.mesh}/{k.service}" for k in sorted(table.allocator.exhausted)
                    ],
                }
            ]
        return document
