#!/usr/bin/env python3
"""Federation on loopback: cross-zone latency, a 100,000-service table, memory.

Starts a global and two zones (real certificates from `kumazone certs`), then:

1. registers REGISTRATIONS services one at a time through zone-1's API and times
   each until zone-2 answers its name over DNS (median, p99);
2. loads SERVICES services into zone-1 (one JSON resources file) and times until
   zone-2 answers the last of them; then starts a fresh zone-3 and times until it
   holds the whole table;
3. reports every process's resident memory.

    bench/federation.py                      # 100 registrations, 100,000 services
    bench/federation.py --services 10000     # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode

BIN = Path(sys.executable).parent


class Process:
    def __init__(self, work: Path, name: str, args: list[str]) -> None:
        self.data = work / name
        self.name = name
        command = [
            str(BIN / "twistd"),
            "-n",
            "--pidfile=",
            f"--logfile={work / name}.log",
            "kumazone",
            f"--data-dir={self.data}",
            "--api-port=0",
            "--diagnostics-port=0",
            *args,
        ]
        self.started = time.monotonic()
        self.process = subprocess.Popen(command)
        deadline = time.monotonic() + 120
        while not (self.data / "ports.json").exists():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit(f"{name} did not start; see {work / name}.log")
            time.sleep(0.05)
        self.ports = json.loads((self.data / "ports.json").read_text())

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['api']}{path}") as r:
            return json.load(r)

    def put(self, path: str, document: dict) -> None:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.ports['api']}{path}",
            method="PUT",
            data=json.dumps(document).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(request).read()

    def resolves(self, name: str) -> bool:
        query = dns.message.make_query(name, "A")
        try:
            answer = dns.query.udp(query, "127.0.0.1", port=self.ports["dns"], timeout=2)
        except dns.exception.Timeout:
            # The zone is busy applying a large table; ask again.
            return False
        return answer.rcode() == dns.rcode.NOERROR and bool(answer.answer)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def dataplane(name: str, service: str, address: str) -> dict:
    return {
        "type": "Dataplane",
        "mesh": "default",
        "name": name,
        "networking": {
            "address": address,
            "inbound": [{"port": 8080, "tags": {"kuma.io/service": service}}],
        },
    }


def wait(predicate, timeout: float, step: float = 0.001) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise SystemExit("timed out")
        time.sleep(step)
    return time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--registrations", type=int, default=100)
    parser.add_argument("--services", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kumazone-fed-") as tmp:
        work = Path(tmp)
        certs = work / "certs"
        subprocess.run(
            [
                str(BIN / "kumazone"),
                "certs",
                "--out",
                str(certs),
                "--global-host",
                "localhost",
                "--zone",
                "zone-1",
                "--zone",
                "zone-2",
                "--zone",
                "zone-3",
            ],
            check=True,
            capture_output=True,
        )

        def tls(name: str) -> list[str]:
            return [
                f"--tls-cert={certs / name}.pem",
                f"--tls-key={certs / name}-key.pem",
                f"--tls-ca={certs / 'ca.pem'}",
            ]

        glob = Process(work, "global", ["--role=global", "--kds-port=0", *tls("global")])
        kds = glob.ports["kds"]

        def zone(name: str) -> Process:
            resources = work / f"{name}-resources"
            resources.mkdir(exist_ok=True)
            return Process(
                work,
                name,
                [
                    "--role=zone",
                    f"--zone={name}",
                    f"--global=localhost:{kds}",
                    f"--resources={resources}",
                    "--dns-port=0",
                    "--dns-interface=127.0.0.1",
                    *tls(name),
                ],
            )

        processes = [glob]
        try:
            zone1, zone2 = zone("zone-1"), zone("zone-2")
            processes += [zone1, zone2]
            wait(lambda: zone2.get("/").get("sync", {}).get("connected"), 60, 0.05)
            latencies = []
            for i in range(args.registrations):
                start = time.monotonic()
                zone1.put(
                    f"/meshes/default/dataplanes/lat-{i}",
                    dataplane(f"lat-{i}", f"lat-{i}", f"10.9.{i // 256}.{i % 256}"),
                )
                wait(lambda i=i: zone2.resolves(f"lat-{i}.mesh"), 30)
                latencies.append((time.monotonic() - start) * 1000)
            latencies.sort()
            p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]

            bulk = [
                dataplane(
                    f"bulk-{i}", f"bulk-{i}", f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}"
                )
                for i in range(args.services)
            ]
            path = work / "zone-1-resources" / "bulk.json"
            start = time.monotonic()
            path.write_text(json.dumps(bulk))
            last = f"bulk-{args.services - 1}.mesh"
            wait(lambda: zone2.resolves(last), 900, 0.2)
            bulk_seconds = time.monotonic() - start
            expected = glob.get("/")["tableVersion"]

            start = time.monotonic()
            zone3 = zone("zone-3")
            processes.append(zone3)
            wait(
                lambda: zone3.resolves(last) and zone3.get("/")["tableVersion"] >= expected,
                900,
                0.2,
            )
            fresh_seconds = time.monotonic() - start
            memory = {p.name: p.rss_mb() for p in processes}
            table_size = zone3.get("/vips?size=1")["total"]
        finally:
            for process in processes:
                process.stop()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    print(
        f"machine: {platform.node()}, {cpu}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; all processes on loopback, mutual TLS"
    )
    print(f"\nregistration in zone-1 -> answer in zone-2, {len(latencies)} registrations:")
    print(
        f"  median {statistics.median(latencies):.1f} ms, p99 {p99:.1f} ms, "
        f"max {latencies[-1]:.1f} ms"
    )
    print(
        f"\n{args.services} services loaded into zone-1 -> last one answers in zone-2: "
        f"{bulk_seconds:.1f} s"
    )
    print(
        f"fresh zone-3 started -> holds the whole table ({table_size} rows): {fresh_seconds:.1f} s"
    )
    print("\nresident memory (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in memory.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
