#!/usr/bin/env python3
"""DNS benchmark: kumazone beside plain twisted.names and NSD, one run (issue 4).

Three servers hold the same records (N services, an A and an AAAA for each of their
names, SOA and NS at the apex of `mesh`):

- kumazone, a standalone zone reading N Dataplanes from one JSON resources file;
- plain twisted.names: `twistd dns --bindzone` (DNSServerFactory with Twisted's stock
  BindAuthority) on a zone file written from kumazone's `/vips`;
- NSD (Debian's `nsd`), in the foreground (`nsd -d`) with its own nsd.conf, the same
  zone file, rate limiting off.

Every server runs on CPU 0 (`taskset -c 0`) and `dnsperf` on CPU 1.  The query mix is
90% existing names (A and AAAA, half each) and 10% unknown names (NXDOMAIN).

0. One pass through the query file per server at full speed (`dnsperf -n 1`), reported
   but not counted in the runs: kumazone answers a question the first time through
   its authority path and keeps the answer for its hot path, so this pass is its cold
   cost.
1. RUNS full-speed runs of SECONDS each per server (`dnsperf -c 4 -q 200`),
   interleaved: run 1 kumazone, twisted.names, NSD; run 2 the same; ...  Reported:
   the median queries per second and the queries lost over all runs.
2. One RATE_SECONDS run per server at a fixed RATE queries per second (`dnsperf -Q`):
   mean and 99th-percentile latency, computed from the latency of every response
   (`dnsperf -v`; dnsperf 2.10 has no latency histogram), and queries lost.
3. Resident memory (VmRSS, summed over the server's processes: NSD is three).
4. kumazone alone with BIG services: start-up time (process start until /ready
   answers 200 and the last service's name resolves) and resident memory.

    bench/dns_bench.py                          # the defaults below
    bench/dns_bench.py --services 1000 --seconds 5 --runs 1 --big 0   # a quick look
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchlib import (
    BIN,
    BenchError,
    Server,
    check_tools,
    dns_query,
    dnsperf,
    free_port,
    load,
    print_machine,
    raise_interrupt,
    read_vips,
    start_kumazone,
    start_nsd,
    stop_all,
    wait_answering,
    write_queries,
    write_zone_file,
)


def start_twisted_names(work: Path, zone_file: Path, last: str) -> Server:
    """Twisted's own `twistd dns`: DNSServerFactory over the stock BindAuthority."""
    port = free_port()
    log = work / "twisted.names.log"
    server = Server(
        "twisted.names",
        [
            str(BIN / "twistd"),
            "-n",
            "--pidfile=",
            f"--logfile={log}",
            "dns",
            "--bindzone",
            str(zone_file),
            "--port",
            str(port),
            "--interface",
            "127.0.0.1",
        ],
        work,
        [log],
    )
    server.port = port
    wait_answering(server, last)
    return server


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Everything, with every server started here; the caller stops what is left."""
    report: dict[str, Any] = {"load_start": load()}
    print(f"starting kumazone with {args.services} services ...", flush=True)
    kumazone, info = start_kumazone(work, "kumazone", args.services)
    table = read_vips(kumazone, f"http://127.0.0.1:{info['api']}/vips?size=1000")
    if len(table["items"]) < args.services:
        raise kumazone.failed(f"/vips has {len(table['items'])} of {args.services} services")
    report["startup"] = info["startup"]
    report["services"] = len(table["items"])
    zone_file = work / "mesh.zone"
    report["names"] = write_zone_file(zone_file, table)
    last = table["items"][-1]["names"][0]
    print("starting twisted.names and NSD ...", flush=True)
    servers = [
        kumazone,
        start_twisted_names(work, zone_file, last),
        start_nsd(work, zone_file, last),
    ]
    for server in servers:  # the same answers before measuring
        got = tuple(
            dns_query(server.port, name, qtype)[0]
            for name, qtype in ((last, "A"), (last, "AAAA"), ("no-such-name.mesh", "A"))
        )
        if got != (0, 0, 3):
            raise server.failed(f"answers {got} (rcodes), expected NOERROR, NOERROR, NXDOMAIN")
    queries = work / "queries.txt"
    write_queries(queries, table)

    # Every server first answers the query file once, not counted in the runs:
    # kumazone's hot path learns each question's answer from the authority path
    # the first time it is asked, so this pass shows the cold cost.
    first: dict[str, dict[str, float]] = {}
    for server in servers:
        first[server.label] = result = dnsperf(server.port, queries, 300, once=True)
        print(
            f"first pass {server.label:14} {result['qps']:9.0f} qps, "
            f"{result['lost']:.0f} lost, {result['sent']:.0f} queries",
            flush=True,
        )
    report["first"] = first
    full: dict[str, list[dict[str, float]]] = {s.label: [] for s in servers}
    for run in range(args.runs):
        for server in servers:
            result = dnsperf(server.port, queries, args.seconds)
            full[server.label].append(result)
            print(
                f"run {run + 1}  {server.label:14} {result['qps']:9.0f} qps, "
                f"{result['lost']:.0f} lost ({result['drops']:.0f} dropped by the server's "
                f"full receive buffer), {result['response_bytes']:.0f} B/response",
                flush=True,
            )
    fixed: dict[str, dict[str, float]] = {}
    for server in servers:
        result = dnsperf(server.port, queries, args.rate_seconds, args.rate)
        fixed[server.label] = result
        print(
            f"{args.rate} qps {server.label:14} mean {result['mean_ms']:.3f} ms, "
            f"p99 {result['p99_ms']:.3f} ms, {result['lost']:.0f} lost "
            f"({result['drops']:.0f} dropped by the server's full receive buffer)",
            flush=True,
        )
    report["rss"] = {s.label: s.rss_mb() for s in servers}
    report["full"] = full
    report["fixed"] = fixed
    for server in servers:
        if not server.alive():
            raise server.failed("exited during the runs")
        server.stop()

    if args.big:
        print(f"starting kumazone with {args.big} services ...", flush=True)
        big, info = start_kumazone(work, "kumazone-big", args.big)
        report["big_startup"] = info["startup"]
        report["big_rss"] = big.rss_mb()
        big.stop()
    report["load_end"] = load()
    return report


def print_report(args: argparse.Namespace, report: dict[str, Any]) -> None:
    print_machine(report)
    print(
        f"{report['services']} services ({report['names']} names, an A and an AAAA each); "
        f"{args.runs} interleaved runs x {args.seconds} s at full speed (dnsperf -c 4 -q 200), "
        f"then {args.rate_seconds} s at {args.rate} qps;\n"
        "90% existing names (A/AAAA) / 10% unknown; servers on CPU 0, dnsperf on CPU 1\n"
    )
    at = f"@{args.rate // 1000}k" if args.rate % 1000 == 0 else f"@{args.rate}"
    header = (
        f"{'server':14} {'1st pass':>8} {'median qps':>10} {'min-max qps':>15} {'lost':>5} "
        f"{'drops':>5} "
        f"{'mean ms' + at:>12} {'p99 ms' + at:>11} {'lost' + at:>8} {'RSS MB':>7}"
    )
    print(header)
    print("-" * len(header))
    medians = {}
    for label, runs in report["full"].items():
        qps = [r["qps"] for r in runs]
        medians[label] = statistics.median(qps)
        fixed = report["fixed"][label]
        print(
            f"{label:14} {report['first'][label]['qps']:8.0f} "
            f"{medians[label]:10.0f} {min(qps):7.0f}-{max(qps):<7.0f} "
            f"{sum(r['lost'] for r in runs):5.0f} {sum(r['drops'] for r in runs):5.0f} "
            f"{fixed['mean_ms']:12.3f} "
            f"{fixed['p99_ms']:11.3f} {fixed['lost']:8.0f} {report['rss'][label]:7.1f}"
        )
    to_nsd = medians["kumazone"] / medians["nsd"]
    to_names = medians["kumazone"] / medians["twisted.names"]
    print(
        "(1st pass: one pass through the query file before the runs, not counted in them; "
        "lost: over all full-speed runs;\n drops: of those, dropped by the server's full UDP "
        "receive buffer, from /proc/net/udp)"
    )
    print(f"\nkumazone / NSD: {to_nsd:.2f}    kumazone / twisted.names: {to_names:.2f}")
    line = (
        f"kumazone start-up (process start -> /ready 200 and the last name answers): "
        f"{report['services']} services {report['startup']:.1f} s"
    )
    if args.big:
        line += (
            f"; {args.big} services {report['big_startup']:.1f} s, {report['big_rss']:.0f} MB RSS"
        )
    print(line)
    kz_fixed = report["fixed"]["kumazone"]
    targets = [
        ("kumazone >= 0.5 x NSD", to_nsd >= 0.5),
        ("kumazone >= 8 x twisted.names", to_names >= 8),
        ("no lost queries", sum(r["lost"] for r in report["full"]["kumazone"]) == 0
         and kz_fixed["lost"] == 0),
        (f"p99 < 1 ms at {args.rate} qps", kz_fixed["p99_ms"] < 1),
    ]  # fmt: skip
    if args.big:
        targets.append((f"< 300 MB with {args.big} services", report["big_rss"] < 300))
    print("issue 4 targets: " + ", ".join(f"{t} {'met' if ok else 'NOT met'}" for t, ok in targets))


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--services", type=int, default=10_000, help="services in the zone")
    parser.add_argument("--seconds", type=int, default=15, help="length of a full-speed run")
    parser.add_argument("--runs", type=int, default=3, help="full-speed runs per server")
    parser.add_argument("--rate", type=int, default=10_000, help="fixed rate for latency")
    parser.add_argument("--rate-seconds", type=int, default=10, help="length of that run")
    parser.add_argument("--big", type=int, default=100_000, help="services for the start-up "
                        "and memory measurement (0 skips it)")  # fmt: skip
    args = parser.parse_args()
    if args.services < 1 or args.runs < 1 or args.seconds < 1 or args.rate < 1:
        parser.error("--services, --runs, --seconds and --rate must be at least 1")
    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGHUP, raise_interrupt)
    try:
        check_tools()
        with tempfile.TemporaryDirectory(prefix="kumazone-dns-bench-") as tmp:
            try:
                report = measure(args, Path(tmp))
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C waits
                stop_all()
                signal.signal(signal.SIGINT, signal.default_int_handler)
    except BenchError as e:
        print(f"dns_bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dns_bench: interrupted; every server stopped", file=sys.stderr)
        return 130
    print_report(args, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
