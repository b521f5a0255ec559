"""Resource documents for tests."""

from __future__ import annotations

from typing import Any


def dataplane(
    name: str, *services: str, mesh: str = "default", address: str = "192.0.2.200"
) -> dict[str, Any]:
    """A Dataplane document with one inbound (ports 8000, 8001, ...) per service."""
    return {
        "type": "Dataplane",
        "mesh": mesh,
        "name": name,
        "networking": {
            "address": address,
            "inbound": [
                {"port": 8000 + index, "tags": {"kuma.io/service": service}}
                for index, service in enumerate(services)
            ],
        },
    }
