#!/usr/bin/env python3
"""Federation on loopback: a fresh zone's full table, change propagation, a million services.

A global and two zones on 127.0.0.1 with real certificates (`kumazone certs`, mutual
TLS), every process on every CPU:

1. zone-1 starts with FED_SERVICES services in its resources directory (one JSON
   file); timed until zone-2 answers the last of them;
2. propagation: FED_CHANGES new services PUT through zone-1's API at 10 per second
   (each on its own schedule, however long the ones before take), each timed from
   its scheduled moment until zone-2 answers its name: median, p99, worst;
3. a fresh zone-3 starts: the time from its connection to the global (the welcome,
   `sync.connectedSince` in its `GET /`) until it has applied the whole table
   (`sync.lastTable`, with `tableVersion` at the global's), from its start until then,
   and until its last name answers; meanwhile a DNS query every 5 ms, each waited
   for, asks zone-3 for a name it does not have (NXDOMAIN): the worst wait is the
   longest zone-3 kept a client waiting while it took the table.  Then zone-4, and
   so on: FRESH_RUNS fresh zones one after the other (each left running), the
   median reported beside each run, and the worst wait of all;
4. every process's resident memory at FED_SERVICES;
5. everything stopped; a new global and two zones with MILLION services, half in each
   zone's resources directory: the time until each zone answers the other's last
   name, each process's resident memory per service, and CHANGES_AT_MILLION PUTs in
   zone-1 timed until zone-2 answers them.  Bounded by MILLION_TIMEOUT seconds, and
   stopped early if the machine's available memory falls under 1 GB.

    bench/federation.py                                    # the defaults below
    bench/federation.py --fed-services 10000 --million 20000   # quicker
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchlib import (
    BIN,
    BenchError,
    Server,
    address,
    all_cpus,
    dataplane,
    dns_query,
    http_request,
    in_background,
    load,
    machine,
    mem_available_mb,
    percentile,
    raise_interrupt,
    resolves,
    start_zone,
    stop_all,
    tail,
    versions,
    write_dataplanes,
)

MEMORY_FLOOR_MB = 1024  # the million part stops when the machine has less available


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--no-federation", dest="federation", action="store_false", help="skip the federation")
    add("--fed-services", type=int, default=100_000, help="services in zone-1 (fresh-zone table)")
    add("--fed-changes", type=int, default=30, help="PUTs at 10/s for the propagation figure")
    add(
        "--fresh-runs",
        type=int,
        default=3,
        help="fresh zones started one after the other, up to 6 (the median is reported)",
    )
    add(
        "--million",
        type=int,
        default=1_000_000,
        help="services of the memory run, half in each zone (0 skips it)",
    )
    add("--million-timeout", type=float, default=480, help="bound on the memory run (s)")
    add("--changes-at-million", type=int, default=3, help="PUTs timed at MILLION services")


class Federation:
    """A global and its zones in C{work}, all registered to be stopped."""

    def __init__(self, work: Path, max_services: int) -> None:
        self.work = work
        self.certs = work / "certs"
        work.mkdir(parents=True, exist_ok=True)
        if not self.certs.exists():
            # zone-3 on: the fresh zones (--fresh-runs, up to six).
            zones = [a for i in range(1, 9) for a in ("--zone", f"zone-{i}")]
            subprocess.run(
                [
                    str(BIN / "kumazone"),
                    "certs",
                    "--out",
                    str(self.certs),
                    "--global-host",
                    "localhost",
                    *zones,
                ],
                check=True,
                capture_output=True,
                timeout=120,
            )
        self.servers: list[Server] = []
        log = work / "global.log"
        data = work / "global-data"
        self.glob = Server(
            "global",
            [
                str(BIN / "twistd"),
                "-n",
                "--pidfile=",
                f"--logfile={log}",
                "kumazone",
                "--role=global",
                f"--data-dir={data}",
                "--api-port=0",
                "--diagnostics-port=0",
                "--kds-port=0",
                "--kds-interface=127.0.0.1",
                f"--kds-zone-max-services={max_services}",
                # An inventory goes in parts of at most 2,000 services: room for them.
                f"--kds-zone-max-parts={max_services // 1000 + 64}",
                f"--kds-zone-max-pending-bytes={1 << 31}",
                *self.tls("global"),
            ],
            work,
            [log],
            all_cpus(),
        )
        self.servers.append(self.glob)
        ports: dict[str, Any] = {}

        def read_ports() -> bool:
            try:
                ports.update(json.loads((data / "ports.json").read_text()))
            except (OSError, ValueError):
                return False
            return "kds" in ports and "api" in ports

        self.glob.wait_until(read_ports, 120, "ports.json")
        self.glob_api = int(ports["api"])
        self.kds = int(ports["kds"])
        self.apis: dict[str, int] = {}

    def tls(self, name: str) -> list[str]:
        return [
            f"--tls-cert={self.certs / name}.pem",
            f"--tls-key={self.certs / name}-key.pem",
            f"--tls-ca={self.certs / 'ca.pem'}",
        ]

    def zone(self, name: str, resources: Path, timeout: float) -> Server:
        """Start zone C{name} on C{resources}; return once its /ready answers 200."""
        resources.mkdir(parents=True, exist_ok=True)
        extra = [f"--global=localhost:{self.kds}", *self.tls(name)]
        server, info = start_zone(self.work, name, resources, None, timeout, extra, all_cpus())
        self.servers.append(server)
        self.apis[name] = info["api"]
        return server

    def status(self, name: str, timeout: float = 30) -> dict[str, Any]:
        port = self.glob_api if name == "global" else self.apis[name]
        status, body, _ = http_request(f"http://127.0.0.1:{port}/", timeout=timeout)
        return body if status == 200 and isinstance(body, dict) else {}

    def put(self, zone: str, name: str, index: int, first: int) -> tuple[int, float]:
        """PUT a Dataplane with a new service C{name} into C{zone}: (status, seconds)."""
        status, _, taken = http_request(
            f"http://127.0.0.1:{self.apis[zone]}/meshes/default/dataplanes/{name}",
            "PUT",
            dataplane(name, name, address(index, first)),
            timeout=300,
        )
        return status, taken

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()


def wait_for(server: Server, predicate: Any, deadline: float, what: str, step: float) -> float:
    """Poll until true; the seconds it took, or raise at C{deadline}."""
    start = time.monotonic()
    while not predicate():
        if not server.alive():
            raise server.failed(f"exited before {what}")
        if time.monotonic() > deadline:
            raise server.failed(f"no {what} after {deadline - start:.0f} s")
        time.sleep(step)
    return time.monotonic() - start


def propagation(fed: Federation, zone2: Server, count: int) -> list[float]:
    """C{count} PUTs in zone-1 at 10 per second; ms from each one's slot to zone-2's answer."""
    start = time.monotonic() + 0.2
    slots = [start + i * 0.1 for i in range(count)]
    statuses: dict[int, int] = {}

    def send(i: int) -> None:
        time.sleep(max(0.0, slots[i] - time.monotonic()))
        statuses[i] = fed.put("zone-1", f"prop-{i}", i, 12)[0]

    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    latencies = [float("inf")] * count
    pending = set(range(count))
    deadline = slots[-1] + 120 + count  # bounded, generous for today's seconds-long PUTs
    while pending and time.monotonic() < deadline:
        for i in sorted(pending):
            if time.monotonic() < slots[i] or statuses.get(i, 200) not in (200, 201):
                continue
            if resolves(zone2.port, f"prop-{i}.mesh"):
                latencies[i] = (time.monotonic() - slots[i]) * 1000
                pending.discard(i)
        time.sleep(0.001)
    for thread in threads:
        thread.join(timeout=1)
    return latencies


def measure_table(args: argparse.Namespace, work: Path, report: dict[str, Any]) -> None:
    """Steps 1-4: FED_SERVICES in zone-1, propagation, a fresh zone-3, memory."""
    n = args.fed_services
    fed = Federation(work / "table", max(n, args.million) + 10_000)
    try:
        print(f"federation: a global, zone-2, then zone-1 with {n} services ...", flush=True)
        zone2 = fed.zone("zone-2", work / "table" / "zone-2-resources", 120)
        wait_for(
            zone2,
            lambda: (fed.status("zone-2").get("sync") or {}).get("connected"),
            time.monotonic() + 60,
            "connection to the global",
            0.05,
        )
        resources = work / "table" / "zone-1-resources"
        write_dataplanes(resources / "bulk.json", n, "bulk")
        zone1 = fed.zone("zone-1", resources, 120 + n / 200)
        last = f"bulk-{n - 1}.mesh"
        wait_for(
            zone1,
            lambda: resolves(zone2.port, last),
            time.monotonic() + 300 + n / 200,
            f"{last} in zone-2",
            0.1,
        )
        report["bulk_s"] = time.monotonic() - zone1.started
        print(
            f"federation: {n} services in zone-1 answer in zone-2 after "
            f"{report['bulk_s']:.1f} s; {args.fed_changes} changes at 10/s ...",
            flush=True,
        )
        report["propagation"] = propagation(fed, zone2, args.fed_changes)
        expected = fed.status("global", 300).get("tableVersion", 0)
        runs = [
            fresh_zone(fed, f"zone-{3 + i}", work / "table", expected, last)
            for i in range(min(6, max(1, args.fresh_runs)))
        ]
        report["fresh_runs"] = runs
        report["fresh_rows"] = n + args.fed_changes
        report["table_rss"] = {s.label: s.rss_mb() for s in fed.servers}
    except BenchError as e:
        raise BenchError(f"{e}\n{tail(fed.glob.logs[0], 8)}") from None
    finally:
        fed.stop()


def fresh_zone(fed: Federation, name: str, work: Path, expected: int, last: str) -> dict[str, Any]:
    """Step 3 once: a fresh zone C{name} takes the whole table (at C{expected}), probed."""
    zone = fed.zone(name, work / f"{name}-resources", 120)
    stop_probe = threading.Event()

    def probe() -> list[float]:
        waits = []
        while not stop_probe.is_set():
            sent = time.monotonic()
            rcode, _ = dns_query(zone.port, "not-a-service.mesh", "A", 30)
            waits.append((time.monotonic() - sent) * 1000 if rcode == 3 else float("inf"))
            time.sleep(0.005)
        return waits

    join_probe = in_background(probe)
    state: dict[str, Any] = {}

    def applied() -> bool:
        state.update(fed.status(name, 5))
        sync = state.get("sync") or {}
        return state.get("tableVersion", -1) >= expected and bool(sync.get("lastTable"))

    try:
        wait_for(zone, applied, time.monotonic() + 300, "the whole table", 0.02)
    finally:
        stop_probe.set()
        waits = join_probe()
    run: dict[str, Any] = {"applied_s": time.monotonic() - zone.started, "probes": waits}
    sync = state["sync"]
    if sync.get("connectedSince"):
        run["table_s"] = sync["lastTable"] - sync["connectedSince"]
        run["welcome_s"] = sync["connectedSince"] - zone.started_wall
    wait_for(zone, lambda: resolves(zone.port, last), time.monotonic() + 300, f"{last}", 0.02)
    run["last_s"] = time.monotonic() - zone.started
    print(
        f"federation: fresh {name} holds the table after {run['applied_s']:.1f} s "
        f"(connect -> applied {run.get('table_s', float('nan')):.2f} s)",
        flush=True,
    )
    return run


def settled(fed: Federation) -> bool:
    """Whether every zone has acknowledged the global's table, the same a second later."""
    versions = []
    for _ in range(2):
        status, body, _ = http_request(f"http://127.0.0.1:{fed.glob_api}/zones", timeout=30)
        if status != 200 or not isinstance(body, dict) or not body.get("items"):
            return False
        items = body["items"]
        if any(item.get("ackedVersion") != item.get("tableVersion") for item in items):
            return False
        versions.append(items[0].get("tableVersion"))
        time.sleep(1.0)
    return versions[0] == versions[1]


def measure_million(args: argparse.Namespace, work: Path, report: dict[str, Any]) -> None:
    """Step 5: MILLION services, half in each zone, bounded in time and memory."""
    m = args.million
    half = m // 2
    begin = time.monotonic()
    deadline = begin + args.million_timeout
    print(f"federation: writing {m} services (half in each zone) ...", flush=True)
    for zone, prefix, first in (("zone-1", "m1", 10), ("zone-2", "m2", 11)):
        write_dataplanes(work / "million" / f"{zone}-resources" / "bulk.json", half, prefix, first)
    fed = Federation(work / "million", m + 10_000)
    stop = threading.Event()
    why: list[str] = []

    def watchdog() -> None:
        """Stop the million's processes (by their ids) past the deadline or out of memory."""
        while not stop.wait(0.5):
            if mem_available_mb() < MEMORY_FLOOR_MB:
                why.append(f"available memory under {MEMORY_FLOOR_MB} MB")
            elif time.monotonic() > deadline:
                why.append(f"not done within --million-timeout {args.million_timeout:.0f} s")
            else:
                continue
            report["million_rss_at_stop"] = {s.label: s.rss_mb() for s in fed.servers}
            for server in fed.servers:
                server.process.kill()
            return

    watch = threading.Thread(target=watchdog, daemon=True)
    watch.start()
    try:
        print(f"federation: starting a global and two zones with {m} services ...", flush=True)
        starts = [
            in_background(
                lambda zone=zone: fed.zone(
                    zone, work / "million" / f"{zone}-resources", args.million_timeout
                )
            )
            for zone in ("zone-1", "zone-2")
        ]
        zone1, zone2 = (start() for start in starts)
        last1, last2 = f"m1-{half - 1}.mesh", f"m2-{half - 1}.mesh"
        wait_for(
            zone2,
            lambda: resolves(zone2.port, last1) and resolves(zone1.port, last2),
            deadline,
            "each zone answering the other's last name",
            0.2,
        )
        report["million_synced_s"] = time.monotonic() - begin
        print(
            f"federation: {m} services answer in both zones after "
            f"{report['million_synced_s']:.0f} s; waiting for every zone to hold the "
            "global's table ...",
            flush=True,
        )
        # The last names answer before the federation has caught up (the global
        # steps the inventories a slice at a time, the zones follow what it sends):
        # memory and change latency are measured once every zone has acknowledged
        # the global's table and it stays the same for a second.
        wait_for(zone2, lambda: settled(fed), deadline, "every zone acknowledging the table", 1.0)
        report["million_settled_s"] = time.monotonic() - begin
        report["million_rss"] = {s.label: s.rss_mb() for s in fed.servers}
        print(
            f"federation: {m} services synced after {report['million_settled_s']:.0f} s", flush=True
        )
        changes = []
        for i in range(args.changes_at_million):
            if time.monotonic() > deadline:
                break
            start = time.monotonic()
            status, _ = fed.put("zone-1", f"mchange-{i}", i, 13)
            if status not in (200, 201):
                raise zone1.failed(f"PUT mchange-{i} answered {status}")
            answered = time.monotonic()
            wait_for(
                zone2,
                lambda i=i: resolves(zone2.port, f"mchange-{i}.mesh"),
                deadline,
                f"mchange-{i} in zone-2",
                0.002,
            )
            changes.append((time.monotonic() - start) * 1000)
            print(
                f"federation: PUT mchange-{i} at {time.monotonic() - begin:.0f} s: answered "
                f"in {(answered - start) * 1000:.0f} ms, in zone-2 after {changes[-1]:.0f} ms",
                flush=True,
            )
        report["million_changes"] = changes
    except BenchError as e:
        if not why:
            raise
        report["million_error"] = why[0]
        print(f"federation: the million run stopped: {why[0]} ({str(e).splitlines()[0]})")
    finally:
        stop.set()
        watch.join()
        fed.stop()


def measure(args: argparse.Namespace, work: Path, report: dict[str, Any]) -> None:
    """Every federation figure into C{report}; every process started here is stopped."""
    report["services"] = args.fed_services
    report["million"] = args.million
    if args.fed_services > 0:
        measure_table(args, work, report)
    if args.million > 0:
        measure_million(args, work, report)


def fmt_ms(value: float) -> str:
    return "never" if value == float("inf") else f"{value:.0f} ms"


def rows(report: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(figure, value, target, met or None) for each federation figure measured."""
    out: list[tuple[str, str, str, bool | None]] = []
    n = report.get("services", 0)
    if "bulk_s" in report:
        out.append(
            (
                f"fed: {n:,} services in zone-1 -> last answers in zone-2",
                f"{report['bulk_s']:.1f} s",
                "",
                None,
            )
        )
    if "propagation" in report:
        lat = report["propagation"]
        p99 = percentile(lat, 0.99)
        out.append(
            (
                f"fed: PUT zone-1 -> answer zone-2, 10/s ({len(lat)}), median / p99 / worst",
                f"{fmt_ms(statistics.median(lat))} / {fmt_ms(p99)} / {fmt_ms(max(lat))}",
                "(none set)",
                None,
            )
        )
    runs = report.get("fresh_runs") or []
    if runs:
        tables = [run["table_s"] for run in runs if "table_s" in run]
        table = statistics.median_high(tables) if len(tables) == len(runs) else None
        each = ", ".join(f"{t:.2f}" for t in tables)
        out.append(
            (
                f"fed: fresh zone, {report['fresh_rows']:,} rows: connect -> table applied "
                f"(median of {len(runs)})",
                "-" if table is None else f"{table:.2f} s ({each})",
                "< 2 s",
                None if table is None else table < 2,
            )
        )
        middle = runs[len(runs) // 2] if table is None else runs[tables.index(table)]
        out.append(
            (
                "fed: fresh zone: start -> welcome / table applied / last name (that run)",
                f"{middle.get('welcome_s', float('nan')):.2f} s / "
                f"{middle['applied_s']:.2f} s / {middle['last_s']:.2f} s",
                "",
                None,
            )
        )
        waits = [w for run in runs for w in run["probes"]]
        if waits:
            out.append(
                (
                    "fed: fresh zone: worst DNS wait meanwhile (a query every 5 ms, all runs)",
                    f"{fmt_ms(max(waits))} ({len(waits)} queries)",
                    "(none set)",
                    None,
                )
            )
    if "table_rss" in report:
        out.append(
            (
                f"fed: RSS at {n:,} services (MB)",
                ", ".join(f"{k} {v:.0f}" for k, v in report["table_rss"].items()),
                "",
                None,
            )
        )
    m = report.get("million", 0)
    if "million_synced_s" in report:
        out.append(
            (
                f"fed: {m:,} services (half per zone): start -> both zones answer",
                f"{report['million_synced_s']:.0f} s",
                "",
                None,
            )
        )
    if "million_settled_s" in report:
        out.append(
            (
                f"fed: {m:,} services: start -> every zone holds the global's table",
                f"{report['million_settled_s']:.0f} s",
                "",
                None,
            )
        )
    rss = report.get("million_rss")
    if rss:
        for label, mb in rss.items():
            per = mb * 1024 / m
            out.append(
                (
                    f"fed: {m:,} services: {label} memory per service",
                    f"{per:.2f} KB ({mb:.0f} MB)",
                    "<= 1 KB",
                    per <= 1,
                )
            )
    if report.get("million_changes"):
        changes = report["million_changes"]
        out.append(
            (
                f"fed: {m:,} services: PUT zone-1 -> answer zone-2 ({len(changes)}), "
                "median / worst",
                f"{fmt_ms(statistics.median(changes))} / {fmt_ms(max(changes))}",
                "",
                None,
            )
        )
    if "million_error" in report:
        out.append((f"fed: {m:,} services", "stopped", "synced", False))
        out.append(("  why", report["million_error"], "", None))
        at_stop = report.get("million_rss_at_stop") or {}
        if at_stop:
            rss = ", ".join(f"{k} {v:.0f}" for k, v in at_stop.items())
            out.append(("  RSS when stopped (MB)", rss, "", None))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGHUP, raise_interrupt)
    report: dict[str, Any] = {}
    start_load = load()
    error = None
    try:
        with tempfile.TemporaryDirectory(prefix="kumazone-fed-") as tmp:
            try:
                measure(args, Path(tmp), report)
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                stop_all()
                signal.signal(signal.SIGINT, signal.default_int_handler)
    except BenchError as e:
        error = str(e)
        print(f"federation: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("federation: interrupted; every process stopped", file=sys.stderr)
        return 130
    print(f"\nmachine: {machine()}\nversions: {versions()}")
    print(f"load average: {start_load} at start, {load()} at end\n")
    for figure, value, target, met in rows(report):
        result = "" if met is None else "met" if met else "MISSED"
        print(f"{figure:70}  {value:28}  {target:14}  {result}")
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
