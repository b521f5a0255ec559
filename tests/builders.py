"""Resource documents for tests: the one place a test builds a Dataplane."""

from __future__ import annotations

from typing import Any

import yaml

from kumazone.core.resources import Resource, parse_resource


def dataplane(
    name: str,
    *services: str,
    mesh: str = "default",
    address: str = "192.0.2.200",
    port: int = 8000,
) -> dict[str, Any]:
    """A Dataplane document with one inbound (ports C{port}, C{port}+1, ...) per service."""
    return {
        "type": "Dataplane",
        "mesh": mesh,
        "name": name,
        "networking": {
            "address": address,
            "inbound": [
                {"port": port + index, "tags": {"kuma.io/service": service}}
                for index, service in enumerate(services)
            ],
        },
    }


def gateway(
    name: str, service: str, mesh: str = "default", address: str = "192.0.2.20"
) -> dict[str, Any]:
    """A gateway Dataplane document (its service comes from the gateway's tags)."""
    return {
        "type": "Dataplane",
        "mesh": mesh,
        "name": name,
        "networking": {
            "address": address,
            "gateway": {"type": "BUILTIN", "tags": {"kuma.io/service": service}},
        },
    }


def external_service(
    name: str, service: str | None = None, mesh: str = "default", address: str = "httpbin.org:443"
) -> dict[str, Any]:
    """An ExternalService document (never gets a VIP)."""
    return {
        "type": "ExternalService",
        "mesh": mesh,
        "name": name,
        "tags": {"kuma.io/service": service or name},
        "networking": {"address": address},
    }


def resource(document: dict[str, Any]) -> Resource:
    """A document parsed and validated, as the zone holds it."""
    return parse_resource(document)


def dataplane_resource(name: str, *services: str, **kwargs: Any) -> Resource:
    """L{dataplane}, parsed."""
    return parse_resource(dataplane(name, *services, **kwargs))


def as_yaml(*documents: dict[str, Any]) -> str:
    """Documents as one multi-document YAML file, as a resources directory holds them."""
    return yaml.safe_dump_all(documents, sort_keys=False)
