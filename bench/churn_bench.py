#!/usr/bin/env python3
"""Changes cost what they change (issue 10): one run, one table, every target.

kumazone beside NSD where NSD applies, each server pinned to CPU 0 (`taskset -c 0`),
dnsperf and this script on CPU 1:

- static: queries per second of kumazone and NSD on SERVICES services (dns_bench's mix:
  90% existing names, A and AAAA, 10% unknown names), and the CPU time per answer of
  each at a fixed CPU_RATE queries per second (utime + stime from /proc/PID/stat over
  the run, divided by the answers dnsperf got);
- churn: the same full-speed load while the API adds one service every 100 ms (PUT a
  new Dataplane): queries per second, each PUT's time, and each change's time until a
  DNS query for the new name answers (polled from when the PUT returns);
- flood: queries for random names never seen before in the domain (`<hex>.mesh`,
  NXDOMAIN), kumazone and NSD at full speed;
- BIG services: start-up (process start -> /ready 200 and the last name answers),
  resident memory, BIG_CHANGES PUTs (time of each, time until visible), and the worst
  latency of a DNS probe sent every 5 ms across them;
- federation (bench/federation.py): a global and two zones over mutual TLS on
  127.0.0.1: a fresh zone's full table at FED_SERVICES services, change propagation
  under 10 changes/s, and memory per service at MILLION services.

    make bench                                                  # the defaults below
    bench/churn_bench.py --services 2000 --seconds 5 --big 20000 \\
        --fed-services 20000 --million 20000                   # a quick look
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import federation
from benchlib import (
    DNSPERF_CPU,
    BenchError,
    address,
    check_tools,
    dataplane,
    dns_query,
    dnsperf,
    http_request,
    in_background,
    load,
    percentile,
    print_machine,
    raise_interrupt,
    read_vips,
    start_kumazone,
    start_nsd,
    stop_all,
    write_queries,
    write_zone_file,
)

CHANGE_INTERVAL = 0.1  # one change every 100 ms
PROBE_INTERVAL = 0.005  # the 100,000-service probe: one query every 5 ms


def answers(port: int, name: str, timeout: float = 0.25) -> bool:
    rcode, count = dns_query(port, name, "A", timeout)
    return rcode == 0 and count > 0


def change(api: int, dns_port: int, name: str, index: int, deadline: float) -> dict[str, float]:
    """PUT one new Dataplane (a new service C{name}); poll DNS from when it returns.

    C{put_ms}: the PUT's time; C{visible_ms}: from sending the PUT until a query for
    the name answers (inf when not by C{deadline}); C{status}: the PUT's HTTP status.
    """
    document = dataplane(name, name, address(index, 11))
    start = time.monotonic()
    status, _, taken = http_request(
        f"http://127.0.0.1:{api}/meshes/default/dataplanes/{name}",
        "PUT",
        document,
        timeout=max(1.0, deadline - start),
    )
    result = {"status": float(status), "put_ms": taken * 1000, "visible_ms": float("inf")}
    if status not in (200, 201):
        return result
    while time.monotonic() < deadline:
        if answers(dns_port, f"{name}.mesh"):
            result["visible_ms"] = (time.monotonic() - start) * 1000
            break
        time.sleep(0.001)
    return result


def write_flood(path: Path, count: int) -> None:
    """C{count} queries for random names in the domain, none asked twice."""
    rng = random.Random(10)
    types = ("A", "AAAA")
    with path.open("w") as out:
        for start in range(0, count, 100_000):
            out.write(
                "".join(
                    f"{rng.getrandbits(64):016x}.mesh {types[i & 1]}\n"
                    for i in range(start, min(count, start + 100_000))
                )
            )


def measure_dns(args: argparse.Namespace, work: Path, report: dict[str, Any]) -> None:
    """Static, churn and flood at SERVICES; every server started here is stopped here."""
    print(f"starting kumazone with {args.services} services ...", flush=True)
    kumazone, info = start_kumazone(work, "kumazone", args.services)
    table = read_vips(kumazone, f"http://127.0.0.1:{info['api']}/vips?size=1000")
    if len(table["items"]) < args.services:
        raise kumazone.failed(f"/vips has {len(table['items'])} of {args.services} services")
    zone_file = work / "mesh.zone"
    write_zone_file(zone_file, table)
    last = table["items"][-1]["names"][0]
    print("starting NSD ...", flush=True)
    nsd = start_nsd(work, zone_file, last)
    servers = [kumazone, nsd]
    queries = work / "queries.txt"
    write_queries(queries, table)
    for server in servers:
        result = dnsperf(server.port, queries, 300, once=True)
        report[f"first_{server.label}"] = result["qps"]
        print(f"first pass {server.label:9} {result['qps']:9.0f} qps", flush=True)

    full: dict[str, list[float]] = {s.label: [] for s in servers}
    lost: dict[str, float] = {s.label: 0 for s in servers}
    for run in range(args.runs):
        for server in servers:
            result = dnsperf(server.port, queries, args.seconds)
            full[server.label].append(result["qps"])
            lost[server.label] += result["lost"]
            print(f"static run {run + 1} {server.label:9} {result['qps']:9.0f} qps", flush=True)
    for label, values in full.items():
        report[f"static_{label}"] = statistics.median(values)
        report[f"static_lost_{label}"] = lost[label]

    for server in servers:
        before = server.cpu_seconds()
        result = dnsperf(server.port, queries, args.cpu_seconds, args.cpu_rate, latencies=False)
        used = server.cpu_seconds() - before
        report[f"cpu_{server.label}"] = used / max(1.0, result["completed"]) * 1e6
        report[f"cpu_qps_{server.label}"] = result["qps"]
        print(
            f"{args.cpu_rate} qps {server.label:9} {report[f'cpu_{server.label}']:.2f} us CPU "
            f"per answer ({result['completed']:.0f} answers, {used:.2f} s CPU)",
            flush=True,
        )

    # Churn: the full-speed load, and one new service every 100 ms meanwhile.
    print(f"churn: {args.seconds} s at full speed, one change every 100 ms ...", flush=True)
    planned = max(1, int((args.seconds - 1) / CHANGE_INTERVAL))
    join = in_background(lambda: dnsperf(kumazone.port, queries, args.seconds))
    time.sleep(0.3)  # dnsperf is sending
    start = time.monotonic()
    end = start + args.seconds - 0.5
    changes: list[dict[str, float]] = []
    for i in range(planned):
        slot = start + i * CHANGE_INTERVAL
        now = time.monotonic()
        if now >= end:
            break  # a slow API left no time for the rest within the run
        if slot > now:
            time.sleep(slot - now)
        changes.append(change(info["api"], kumazone.port, f"churn-{i}", i, end + 5))
    result = join()
    report["churn_qps"] = result["qps"]
    report["churn_lost"] = result["lost"]
    report["churn_planned"] = planned
    report["churn_changes"] = changes
    print(f"churn: {result['qps']:.0f} qps, {len(changes)} of {planned} changes made", flush=True)

    # Flood: names never seen, as many as the fastest server can ask in the run.
    count = args.seconds * args.flood_rate
    flood = work / "flood.txt"
    print(f"flood: writing {count} random names ...", flush=True)
    write_flood(flood, count)
    for server in servers:
        result = dnsperf(server.port, flood, args.seconds)
        report[f"flood_{server.label}"] = result["qps"]
        report[f"flood_wrapped_{server.label}"] = result["sent"] > count
        print(f"flood {server.label:9} {result['qps']:9.0f} qps", flush=True)
    flood.unlink()
    for server in servers:
        if not server.alive():
            raise server.failed("exited during the runs")
        server.stop()


def measure_big(args: argparse.Namespace, work: Path, report: dict[str, Any]) -> None:
    """BIG services: start-up, memory, BIG_CHANGES PUTs under a probe every 5 ms."""
    print(f"starting kumazone with {args.big} services ...", flush=True)
    big, info = start_kumazone(work, "kumazone-big", args.big)
    report["big_startup"] = info["startup"]
    report["big_rss"] = big.rss_mb()
    stop = threading.Event()

    def probe() -> list[float]:
        """Latency (ms) of one query every 5 ms, each waited for (up to 30 s)."""
        latencies = []
        rng = random.Random(5)
        next_at = time.monotonic()
        while not stop.is_set():
            name = f"svc-{rng.randrange(args.big)}.mesh"
            sent = time.monotonic()
            rcode, _ = dns_query(big.port, name, "A", 30)
            latencies.append((time.monotonic() - sent) * 1000 if rcode == 0 else float("inf"))
            next_at += PROBE_INTERVAL
            time.sleep(max(0.0, next_at - time.monotonic()))
        return latencies

    join = in_background(probe)
    time.sleep(0.5)
    changes = []
    deadline = time.monotonic() + args.big_timeout
    for i in range(args.big_changes):
        if time.monotonic() > deadline:
            break
        changes.append(change(info["api"], big.port, f"big-churn-{i}", i, deadline))
        print(
            f"{args.big} services: change {i + 1}: PUT {changes[-1]['put_ms']:.0f} ms, "
            f"visible {changes[-1]['visible_ms']:.0f} ms",
            flush=True,
        )
        time.sleep(0.3)
    stop.set()
    probes = join()
    report["big_changes"] = changes
    report["big_probe_worst"] = max(probes, default=float("inf"))
    report["big_probes"] = len(probes)
    report["big_rss_after"] = big.rss_mb()
    if not big.alive():
        raise big.failed("exited during the changes")
    big.stop()


def fmt_ms(value: float) -> str:
    if value != value:  # nan: nothing measured
        return "-"
    return "never" if value == float("inf") else f"{value:.1f} ms"


def rows(args: argparse.Namespace, report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, value, target, met) for every figure measured."""
    out: list[tuple[str, str, str, str]] = []

    def row(figure: str, value: str, target: str = "", met: bool | None = None) -> None:
        out.append((figure, value, target, "" if met is None else "met" if met else "MISSED"))

    if "static_kumazone" in report:
        kz, nsd = report["static_kumazone"], report["static_nsd"]
        row(f"static qps, {args.services} services: kumazone", f"{kz:,.0f}")
        row("static qps: NSD", f"{nsd:,.0f}")
        row("static: kumazone / NSD", f"{kz / nsd:.2f}")
        row(
            "  first pass (cold) kumazone / NSD",
            f"{report['first_kumazone']:,.0f} / {report['first_nsd']:,.0f} qps",
        )
        ckz, cnsd = report["cpu_kumazone"], report["cpu_nsd"]
        short = {
            label: " rate NOT reached" if report[f"cpu_qps_{label}"] < 0.95 * args.cpu_rate else ""
            for label in ("kumazone", "nsd")
        }
        row(
            f"CPU us/answer @{args.cpu_rate:,} q/s: kumazone",
            f"{ckz:.2f} us ({report['cpu_qps_kumazone']:,.0f} q/s{short['kumazone']})",
            f"<= 1.2 x NSD = {1.2 * cnsd:.2f} us",
            ckz <= 1.2 * cnsd,
        )
        row(
            f"CPU us/answer @{args.cpu_rate:,} q/s: NSD",
            f"{cnsd:.2f} us ({report['cpu_qps_nsd']:,.0f} q/s{short['nsd']})",
        )
        changes = report["churn_changes"]
        puts = [c["put_ms"] for c in changes]
        visible = [c["visible_ms"] for c in changes]
        ok = [c for c in changes if c["status"] in (200, 201)]
        row(
            "churn qps (1 change / 100 ms)",
            f"{report['churn_qps']:,.0f} ({report['churn_qps'] / kz:.2f} x static)",
            f">= 0.7 x static = {0.7 * kz:,.0f}",
            report["churn_qps"] >= 0.7 * kz,
        )
        row(
            "churn: changes made in the run",
            f"{len(ok)} of {report['churn_planned']}",
            f"{report['churn_planned']}",
            len(ok) == report["churn_planned"],
        )
        row(
            "churn: PUT median / worst",
            f"{fmt_ms(percentile(puts, 0.5))} / {fmt_ms(max(puts, default=float('nan')))}",
            "worst < 50 ms",
            bool(puts) and max(puts) < 50,
        )
        row(
            "churn: PUT -> visible in DNS median / worst",
            f"{fmt_ms(percentile(visible, 0.5))} / {fmt_ms(max(visible, default=float('nan')))}",
            "worst < 100 ms",
            bool(visible) and max(visible) < 100,
        )
        fkz, fnsd = report["flood_kumazone"], report["flood_nsd"]
        wrapped = report["flood_wrapped_kumazone"] or report["flood_wrapped_nsd"]
        row(
            "flood qps (random names): kumazone",
            f"{fkz:,.0f} ({fkz / fnsd:.2f} x NSD)" + (" (names repeated)" if wrapped else ""),
            f">= 0.5 x NSD = {0.5 * fnsd:,.0f}",
            fkz >= 0.5 * fnsd,
        )
        row("flood qps: NSD", f"{fnsd:,.0f}")
    if "big_startup" in report:
        n = args.big
        changes = report["big_changes"]
        puts = [c["put_ms"] for c in changes]
        visible = [c["visible_ms"] for c in changes]
        row(
            f"{n:,} services: start-up (-> /ready, last name)",
            f"{report['big_startup']:.1f} s",
            "< 5 s",
            report["big_startup"] < 5,
        )
        row(
            f"{n:,} services: RSS",
            f"{report['big_rss']:.0f} MB ({report['big_rss'] * 1024 / n:.2f} KB/service)",
        )
        row(
            f"{n:,} services: PUT median / worst ({len(puts)})",
            f"{fmt_ms(percentile(puts, 0.5))} / {fmt_ms(max(puts, default=float('nan')))}",
            "worst < 50 ms",
            bool(puts) and max(puts) < 50,
        )
        row(
            f"{n:,} services: PUT -> visible median / worst",
            f"{fmt_ms(percentile(visible, 0.5))} / {fmt_ms(max(visible, default=float('nan')))}",
            "worst < 100 ms",
            bool(visible) and max(visible) < 100,
        )
        row(
            f"{n:,} services: worst DNS probe (every 5 ms)",
            f"{fmt_ms(report['big_probe_worst'])} ({report['big_probes']} probes)",
            "< 50 ms",
            report["big_probe_worst"] < 50,
        )
    if "federation" in report:
        for figure, value, target, met in federation.rows(report["federation"]):
            row(figure, value, target, met)
    return out


def print_report(args: argparse.Namespace, report: dict[str, Any]) -> None:
    print_machine(report)
    print(
        f"DNS: servers on CPU 0, dnsperf on CPU 1; full-speed runs {args.seconds} s "
        f"(dnsperf -c 4 -q 200), static the median of {args.runs};\nfederation: every "
        "process on every CPU, mutual TLS, 127.0.0.1\n"
    )
    table = rows(args, report)
    widths = [max(len(r[i]) for r in [("figure", "value", "target", ""), *table]) for i in range(3)]
    header = f"{'figure':{widths[0]}}  {'value':{widths[1]}}  {'target':{widths[2]}}  result"
    print(header)
    print("-" * len(header))
    for figure, value, target, met in table:
        print(f"{figure:{widths[0]}}  {value:{widths[1]}}  {target:{widths[2]}}  {met}")
    targets = [r for r in table if r[3]]
    missed = [r for r in targets if r[3] != "met"]
    print(f"\n{len(targets) - len(missed)} of {len(targets)} targets met")
    for figure, _, target, _ in missed:
        print(f"  missed: {figure.strip()} ({target})")
    if report.get("errors"):
        for error in report["errors"]:
            print(f"  not measured: {error}")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    add = parser.add_argument
    add("--services", type=int, default=10_000, help="services of the static, churn and flood runs")
    add("--seconds", type=int, default=10, help="length of each full-speed run")
    add("--runs", type=int, default=2, help="static full-speed runs per server (median)")
    add("--cpu-rate", type=int, default=50_000, help="the fixed rate of the CPU run (q/s)")
    add("--cpu-seconds", type=int, default=10, help="length of the CPU run")
    add(
        "--flood-rate",
        type=int,
        default=400_000,
        help="random names written per second of "
        "the flood run (more than the fastest server answers, so that none repeats)",
    )
    add("--big", type=int, default=100_000, help="services of the big zone (0 skips it)")
    add("--big-changes", type=int, default=5, help="PUTs in the big zone")
    add("--big-timeout", type=float, default=180, help="bound on the big zone's changes (s)")
    add("--no-dns", action="store_true", help="skip static, churn and flood")
    federation.add_arguments(parser)
    args = parser.parse_args()
    if min(args.services, args.seconds, args.runs, args.cpu_rate, args.cpu_seconds) < 1:
        parser.error("--services, --seconds, --runs, --cpu-rate and --cpu-seconds must be >= 1")
    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGHUP, raise_interrupt)
    report: dict[str, Any] = {"load_start": load(), "errors": []}
    started = time.monotonic()
    try:
        check_tools()
        with tempfile.TemporaryDirectory(prefix="kumazone-churn-bench-") as tmp:
            work = Path(tmp)
            try:
                everything = os.sched_getaffinity(0)
                os.sched_setaffinity(0, {int(DNSPERF_CPU)})  # off the servers' CPU
                if not args.no_dns:
                    measure_dns(args, work, report)
                if args.big:
                    measure_big(args, work, report)
                os.sched_setaffinity(0, everything)
                if args.federation:
                    report["federation"] = {}
                    federation.measure(args, work / "federation", report["federation"])
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C waits
                stop_all()
                signal.signal(signal.SIGINT, signal.default_int_handler)
    except BenchError as e:
        print(f"churn_bench: {e}", file=sys.stderr)
        report["errors"].append(str(e).splitlines()[0])
    except KeyboardInterrupt:
        print("churn_bench: interrupted; every server stopped", file=sys.stderr)
        return 130
    report["load_end"] = load()
    print_report(args, report)
    print(f"(the whole run took {(time.monotonic() - started) / 60:.1f} min)")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
