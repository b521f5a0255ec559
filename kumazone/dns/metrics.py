"""DNS query metrics: counts by type, rcode and transport, and answer latency.

Plain numbers, exported on scrape: they are updated on the hot path.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.names import dns

__all__ = ["QueryStats", "qtype_label", "rcode_label"]

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
        """The counters and the latency histogram, as they stand."""
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
