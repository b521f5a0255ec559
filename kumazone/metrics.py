"""Prometheus metrics for one process, in a registry of its own."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.names import dns

__all__ = ["Metrics", "qtype_label", "rcode_label"]

_QTYPE_NAMES = {
    dns.A: "A",
    dns.AAAA: "AAAA",
    dns.PTR: "PTR",
    dns.SOA: "SOA",
    dns.NS: "NS",
    dns.ALL_RECORDS: "ANY",
    dns.TXT: "TXT",
    dns.SRV: "SRV",
    dns.MX: "MX",
    dns.CNAME: "CNAME",
    dns.AXFR: "AXFR",
    dns.IXFR: "IXFR",
    65: "HTTPS",
    64: "SVCB",
}
_RCODE_NAMES = {
    dns.OK: "NOERROR",
    dns.EFORMAT: "FORMERR",
    dns.ESERVER: "SERVFAIL",
    dns.ENAME: "NXDOMAIN",
    dns.ENOTIMP: "NOTIMP",
    dns.EREFUSED: "REFUSED",
    dns.EBADVERSION: "BADVERS",
}


def qtype_label(qtype: int) -> str:
    """A bounded label for a query type (anything unusual is OTHER)."""
    return _QTYPE_NAMES.get(qtype, "OTHER")


def rcode_label(rcode: int) -> str:
    """A bounded label for a response code."""
    return _RCODE_NAMES.get(rcode, "OTHER")


class QueryStats(Collector):
    """Queries by type, rcode and transport, and answer latency, exported on scrape.

    prometheus_client's own Counter and Histogram take a lock and look up their
    children on every call, which costs as much as a hot-path answer; these are
    list cells and a bisect.
    """

    BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)

    def __init__(self) -> None:
        self.cells: dict[tuple[str, str, str], list[int]] = {}
        self.buckets = [0] * (len(self.BUCKETS) + 1)
        self.seconds = 0.0
        #: Answers sent from the hot path's templates.
        self.hot_answers = 0
        #: UDP queries seen, for sampling which ones the hot path times.
        self.ticks = 0

    def cell(self, qtype: int, rcode: int, transport: str) -> list[int]:
        """The one-element counter for these labels (bounded: labels are bounded)."""
        key = (qtype_label(qtype), rcode_label(rcode), transport)
        found = self.cells.get(key)
        if found is None:
            found = self.cells[key] = [0]
        return found

    def observe(self, seconds: float) -> None:
        """Record one answer's latency."""
        self.buckets[bisect_left(self.BUCKETS, seconds)] += 1
        self.seconds += seconds

    def observe_many(self, seconds: float, count: int) -> None:
        """Record C{count} answers that each took C{seconds} (sent together)."""
        self.buckets[bisect_left(self.BUCKETS, seconds)] += count
        self.seconds += seconds * count

    def collect(self) -> Iterator[Metric]:
        queries = CounterMetricFamily(
            "kumazone_dns_queries",
            "DNS queries answered, by type, rcode and transport",
            labels=["type", "rcode", "transport"],
        )
        for labels, cell in sorted(self.cells.items()):
            queries.add_metric(list(labels), cell[0])
        yield queries
        yield CounterMetricFamily(
            "kumazone_dns_hot_answers",
            "UDP answers sent from pre-encoded responses (the rest took the authority path)",
            value=self.hot_answers,
        )
        cumulative, running = [], 0
        for bound, count in zip((*self.BUCKETS, float("inf")), self.buckets, strict=True):
            running += count
            cumulative.append((str(bound) if bound != float("inf") else "+Inf", running))
        yield HistogramMetricFamily(
            "kumazone_dns_answer_seconds",
            "Time from receiving a query to sending its answer "
            "(every answer; one in 16 where the hot path reads datagrams one at a time)",
            buckets=cumulative,
            sum_value=self.seconds,
        )


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
            "Sync connections refused, by reason",
            ["reason"],
            registry=r,
        )
