"""Zone sync metrics, shared by the global and a zone (labelled by zone)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["SyncMetrics"]


class SyncMetrics:
    """Zone sync metrics, shared by the global and a zone (labelled by zone)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.connected = Gauge(
            "kumazone_sync_connected",
            "1 while the zone's sync connection is up",
            ["zone"],
            registry=r,
        )
        self.table_version = Gauge(
            "kumazone_sync_table_version",
            "Table version the zone holds (acknowledged)",
            ["zone"],
            registry=r,
        )
        self.lag_versions = Gauge(
            "kumazone_sync_lag_versions",
            "Table versions the zone is behind the global",
            ["zone"],
            registry=r,
        )
        self.lag_seconds = Gauge(
            "kumazone_sync_lag_seconds",
            "Seconds the zone has been behind the global",
            ["zone"],
            registry=r,
        )
        self.messages = Counter(
            "kumazone_sync_messages",
            "Sync messages, by zone, direction and type",
            ["zone", "direction", "type"],
            registry=r,
        )
        self.octets = Counter(
            "kumazone_sync_bytes",
            "Sync bytes on the wire (framing included)",
            ["zone", "direction"],
            registry=r,
        )
        self.refused = Counter(
            "kumazone_sync_refused",
            "Sync connections and zone messages refused, by reason",
            ["reason"],
            registry=r,
        )
