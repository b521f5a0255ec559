"""The process's Prometheus registry and the metrics every role shares.

Each part keeps its own metrics beside its code (L{kumazone.dns.metrics},
L{kumazone.sync.metrics}); this registry is the one they are all exported from.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from kumazone.dns.metrics import QueryStats

__all__ = ["HTTP_METHODS", "Metrics", "method_label"]

#: The HTTP methods that are label values as they are; any other is "other".
HTTP_METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"})


def method_label(method: str) -> str:
    """An HTTP method as a label value: one of L{HTTP_METHODS}, or "other".

    A client picks the method; a label per made-up method would be a new series each.
    """
    return method if method in HTTP_METHODS else "other"


class Metrics:
    """Every metric kumazone exports."""

    def __init__(self, zone: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        #: Query counts and answer latency (plain numbers: they are on the hot path).
        self.dns = QueryStats()
        r.register(self.dns)
        self.malformed = Counter(
            "kumazone_dns_malformed_packets",
            "DNS packets that could not be parsed",
            ["transport"],
            registry=r,
        )
        self.send_errors = Counter(
            "kumazone_dns_send_errors",
            "UDP answers the socket refused to send",
            registry=r,
        )
        self.tcp_refused = Counter(
            "kumazone_dns_tcp_refused",
            "DNS TCP connections refused because too many were open",
            registry=r,
        )
        self.truncated = Counter(
            "kumazone_dns_truncated_responses",
            "UDP responses sent with TC set",
            registry=r,
        )
        self.vips_allocated = Gauge(
            "kumazone_vips_allocated",
            "Services holding a VIP",
            ["zone"],
            registry=r,
        ).labels(zone)
        self.vip_range_size = Gauge(
            "kumazone_vip_range_size",
            "VIPs the CIDR can hand out",
            ["zone"],
            registry=r,
        ).labels(zone)
        self.vip_range_used = Gauge(
            "kumazone_vip_range_used_ratio",
            "Share of the VIP range allocated",
            ["zone"],
            registry=r,
        ).labels(zone)
        self.vips_exhausted = Gauge(
            "kumazone_vip_services_without_vip",
            "Services that have no VIP because the range is full",
            ["zone"],
            registry=r,
        ).labels(zone)
        self.table_version = Gauge(
            "kumazone_vip_table_version",
            "Version of the VIP table (the SOA serial)",
            ["zone"],
            registry=r,
        ).labels(zone)
        self.resources_rejected = Counter(
            "kumazone_resources_rejected",
            "Resources refused because they do not validate",
            ["source"],
            registry=r,
        )
        self.api_requests = Counter(
            "kumazone_api_requests",
            "HTTP API requests by method and status",
            ["method", "status"],
            registry=r,
        )
