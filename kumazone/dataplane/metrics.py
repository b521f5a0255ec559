"""Dataplane resolver metrics: queries by source, upstream failures and latency, the table.

Queries answered locally are the DNS server's own counters (L{QueryStats}: the
hot path counts into them), summed on scrape; forwarded ones are counted here.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from kumazone.dns.metrics import QueryStats

__all__ = ["FAILURE_REASONS", "MAX_UPSTREAM_LABELS", "DataplaneMetrics"]

#: Why an upstream query gave no usable answer (the C{reason} label's values).
FAILURE_REASONS = ("timeout", "servfail", "refused", "network", "spoofed", "overload")
#: Upstream addresses that get a label of their own; later ones are "other".
#: resolv.conf lists at most three useful ones, but it may change at run time.
MAX_UPSTREAM_LABELS = 8
#: Upstream answers take a few milliseconds (a cache) to a second (a cold recursion).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


class _Queries(Collector):
    """C{kumazone_dataplane_queries} by source: local (the DNS server's counters) and upstream."""

    def __init__(self) -> None:
        self.local: QueryStats | None = None
        self.upstream = 0

    def collect(self) -> Iterator[Metric]:
        """Both counts, as they stand."""
        family = CounterMetricFamily(
            "kumazone_dataplane_queries",
            "DNS queries by where their answer came from: this dataplane's table, or upstream",
            labels=["source"],
        )
        local = self.local
        family.add_metric(
            ["local"], sum(cell[0] for cell in list(local.cells.values())) if local else 0
        )
        family.add_metric(["upstream"], self.upstream)
        yield family


class DataplaneMetrics:
    """Every metric of the dataplane's resolver, and its connection to the zone."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self._queries = _Queries()
        r.register(self._queries)
        self.upstream_queries = Counter(
            "kumazone_dataplane_upstream_queries",
            "Queries sent to upstream nameservers, by upstream and transport",
            ["upstream", "transport"],
            registry=r,
        )
        self.upstream_failures = Counter(
            "kumazone_dataplane_upstream_failures",
            "Upstream queries that gave no usable answer, by reason",
            ["reason"],
            registry=r,
        )
        for reason in FAILURE_REASONS:
            self.upstream_failures.labels(reason)
        self.upstream_seconds = Histogram(
            "kumazone_dataplane_upstream_seconds",
            "Time from sending a query upstream to its answer, by upstream",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.table_version = Gauge(
            "kumazone_dataplane_table_version",
            "Version of the mesh's table this dataplane serves",
            registry=r,
        )
        self.connected = Gauge(
            "kumazone_dataplane_connected",
            "1 while the connection to the zone control plane is up",
            registry=r,
        )
        self._labels: set[str] = set()

    def count_local(self, stats: QueryStats) -> None:
        """Count the answers in C{stats} (the DNS server's counters) as local."""
        self._queries.local = stats

    def forwarded(self) -> None:
        """Count one client query handed to the upstreams."""
        self._queries.upstream += 1

    def failed(self, reason: str) -> None:
        """Count one upstream query that gave no usable answer (C{reason}: L{FAILURE_REASONS})."""
        self.upstream_failures.labels(reason).inc()

    def upstream_label(self, address: str) -> str:
        """The label of an upstream address: itself, or "other" past L{MAX_UPSTREAM_LABELS}."""
        if address in self._labels:
            return address
        if len(self._labels) >= MAX_UPSTREAM_LABELS:
            return "other"
        self._labels.add(address)
        return address
