#!/usr/bin/env python3
"""Queries per second: kumazone beside a plain twisted.names server, one run.

Both serve the same records: the sample zone zones/zone-1 plus N generated
services.  Each server is pinned to CPU 0 with taskset and `dnsperf` runs on CPU 1;
runs alternate between the servers (RUNS each) and the table reports medians and
the kumazone / twisted.names ratio.  Machines here are noisy: read the ratio.

    make bench                       # defaults: 1,000 services, 3 runs of 10 s
    bench/query_rate.py --services 10000 --runs 3 --seconds 15
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_services(directory: Path, count: int) -> None:
    documents = []
    for i in range(count):
        documents.append(
            json.dumps(
                {
                    "type": "Dataplane",
                    "mesh": "default",
                    "name": f"bench-{i}",
                    "networking": {
                        "address": f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}",
                        "inbound": [{"port": 8080, "tags": {"kuma.io/service": f"svc-{i}"}}],
                    },
                }
            )
        )
    (directory / "bench.yaml").write_text("\n---\n".join(documents) + "\n")


def start_kumazone(work: Path, resources: Path) -> tuple[subprocess.Popen[bytes], int, dict]:
    data = work / "kumazone-data"
    command = [
        "taskset",
        "-c",
        "0",
        str(BIN / "twistd"),
        "-n",
        "--pidfile=",
        f"--logfile={work / 'kumazone.log'}",
        "kumazone",
        "--role=zone",
        "--zone=bench",
        f"--resources={resources}",
        "--dns-port=0",
        "--api-port=0",
        "--diagnostics-port=0",
        "--dns-interface=127.0.0.1",
        f"--data-dir={data}",
    ]
    process = subprocess.Popen(command)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ports_file = data / "ports.json"
        if ports_file.exists():
            ports = json.loads(ports_file.read_text())
            with urllib.request.urlopen(f"http://127.0.0.1:{ports['api']}/vips") as r:
                table = json.load(r)
            return process, int(ports["dns"]), table
        time.sleep(0.1)
    process.kill()
    raise SystemExit("kumazone did not start")


def start_twisted_names(work: Path, table: dict) -> tuple[subprocess.Popen[bytes], int]:
    """Twisted's own `twistd dns` with a BIND zone file of the same records."""
    lines = [
        "$ORIGIN mesh.",
        "$TTL 60",
        "@ IN SOA ns.dns.mesh. hostmaster.mesh. 1 3600 600 86400 60",
        "@ IN NS ns.dns.mesh.",
    ]
    for item in table["items"]:
        for name in item["names"]:
            lines.append(f"{name}. IN A {item['vip']}")
            lines.append(f"{name}. IN AAAA {item['vip6']}")
    zone_file = work / "mesh.zone"
    zone_file.write_text("\n".join(lines) + "\n")
    port = free_port()
    command = [
        "taskset",
        "-c",
        "0",
        str(BIN / "twistd"),
        "-n",
        "--pidfile=",
        f"--logfile={work / 'twisted-names.log'}",
        "dns",
        "--bindzone",
        str(zone_file),
        "--port",
        str(port),
        "--interface",
        "127.0.0.1",
    ]
    process = subprocess.Popen(command)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["dig", "@127.0.0.1", "-p", str(port), "+short", "+tries=1", "+time=1", "mesh", "SOA"],
            capture_output=True,
            text=True,
        )
        if out.stdout.strip():
            return process, port
        time.sleep(0.2)
    process.kill()
    raise SystemExit("twisted.names did not start")


def write_queries(path: Path, table: dict, count: int = 20000) -> None:
    rng = random.Random(7)
    names = [n for item in table["items"] for n in item["names"]]
    lines = []
    for i in range(count):
        if i % 10 == 9:
            lines.append(f"no-such-{rng.randrange(10**9)}.mesh A")
        else:
            lines.append(f"{rng.choice(names)} {rng.choice(['A', 'A', 'A', 'AAAA'])}")
    path.write_text("\n".join(lines) + "\n")


def dnsperf(port: int, queries: Path, seconds: int) -> dict[str, float]:
    out = subprocess.run(
        [
            "taskset",
            "-c",
            "1",
            "dnsperf",
            "-s",
            "127.0.0.1",
            "-p",
            str(port),
            "-d",
            str(queries),
            "-l",
            str(seconds),
            "-c",
            "4",
            "-q",
            "200",
            "-t",
            "2",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def number(pattern: str) -> float:
        match = re.search(pattern, out)
        return float(match.group(1)) if match else float("nan")

    return {
        "qps": number(r"Queries per second:\s+([\d.]+)"),
        "lost": number(r"Queries lost:\s+(\d+)"),
        "latency_ms": number(r"Average Latency \(s\):\s+([\d.]+)") * 1000,
    }


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_pid(process: subprocess.Popen[bytes]) -> int:
    return process.pid  # taskset execs the server in place


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    for tool in ("dnsperf", "taskset", "dig"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install -y dnsperf bind9-dnsutils")
    with tempfile.TemporaryDirectory(prefix="kumazone-bench-") as tmp:
        work = Path(tmp)
        resources = work / "resources"
        shutil.copytree(REPO / "zones" / "zone-1", resources)
        write_services(resources, args.services)
        kumazone, kz_port, table = start_kumazone(work, resources)
        names, names_port = start_twisted_names(work, table)
        queries = work / "queries.txt"
        write_queries(queries, table)
        results: dict[str, list[dict[str, float]]] = {"kumazone": [], "twisted.names": []}
        try:
            for run in range(args.runs):
                for label, port in (("kumazone", kz_port), ("twisted.names", names_port)):
                    result = dnsperf(port, queries, args.seconds)
                    results[label].append(result)
                    print(f"run {run + 1} {label:14} {result['qps']:10.0f} qps", flush=True)
            memory = {
                "kumazone": rss_mb(child_pid(kumazone)),
                "twisted.names": rss_mb(child_pid(names)),
            }
        finally:
            for process in (kumazone, names):
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    print(
        f"\nmachine: {platform.node()}, {cpu}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}"
    )
    print(
        f"{len(table['items'])} services, {args.runs} runs x {args.seconds} s, "
        "90% existing / 10% unknown names, server on CPU 0, dnsperf on CPU 1\n"
    )
    print(f"{'server':14} {'median qps':>11} {'lost':>6} {'mean ms':>8} {'RSS MB':>7}")
    medians = {}
    for label, runs in results.items():
        medians[label] = statistics.median(r["qps"] for r in runs)
        print(
            f"{label:14} {medians[label]:11.0f} {sum(r['lost'] for r in runs):6.0f} "
            f"{statistics.median(r['latency_ms'] for r in runs):8.3f} {memory[label]:7.1f}"
        )
    print(f"\nkumazone / twisted.names: {medians['kumazone'] / medians['twisted.names']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
