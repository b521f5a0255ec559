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

    make bench                                  # the defaults below
    bench/dns_bench.py --services 1000 --seconds 5 --runs 1 --big 0   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SERVER_CPU = "0"
DNSPERF_CPU = "1"
# What to install when a tool is missing (Debian package names).
TOOLS = {"dnsperf": "dnsperf", "nsd": "nsd", "taskset": "util-linux"}
QTYPE = {"A": 1, "SOA": 6, "AAAA": 28}
RUNNING: list[Server] = []


def tool(name: str) -> str | None:
    """A tool's path: on PATH, or in an sbin directory (nsd, for users without sbin on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        if os.access(f"{directory}/{name}", os.X_OK):
            return f"{directory}/{name}"
    return None


class BenchError(Exception):
    """The benchmark cannot go on; the message says why (with a log's tail)."""


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"  ({path.name}: no log)"
    return "\n".join(f"  {path.name}: {line}" for line in text)


def descendants(pid: int) -> list[int]:
    """Every process under C{pid}, from /proc (children of every thread)."""
    found: list[int] = []
    pending = [pid]
    while pending and len(found) < 1000:
        parent = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.append(child)
                    pending.append(child)
    return found


def vmrss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Server:
    """A server process pinned to SERVER_CPU; registered so that it is always stopped."""

    def __init__(self, label: str, command: list[str], work: Path, logs: list[Path]) -> None:
        self.label = label
        self.port = 0
        self.output = work / f"{label}.out"
        self.logs = [*logs, self.output]
        self.started = time.monotonic()
        with self.output.open("wb") as out:
            self.process = subprocess.Popen(
                ["taskset", "-c", SERVER_CPU, *command],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        RUNNING.append(self)

    @property
    def pid(self) -> int:
        return self.process.pid  # taskset execs the server in place

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss_mb(self) -> float:
        """VmRSS of the server and every process under it."""
        return sum(vmrss_mb(pid) for pid in [self.pid, *descendants(self.pid)])

    def failed(self, why: str) -> BenchError:
        logs = "\n".join(tail(path) for path in self.logs)
        return BenchError(f"{self.label}: {why}\n{logs}")

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> float:
        """Poll C{predicate} until true; the seconds since the process started."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return time.monotonic() - self.started
            if not self.alive():
                raise self.failed(f"exited with status {self.process.returncode} before {what}")
            if time.monotonic() > deadline:
                raise self.failed(f"no {what} after {timeout:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        children = descendants(self.pid) if self.alive() else []
        if self.alive():
            self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=20)
        for pid in children:  # e.g. NSD's server and xfrd processes, by their ids
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if self in RUNNING:
            RUNNING.remove(self)


def stop_all() -> None:
    for server in reversed(list(RUNNING)):
        try:
            server.stop()
        except Exception as e:  # keep stopping the others
            print(f"could not stop {server.label} (pid {server.pid}): {e}", file=sys.stderr)


def encode_name(name: str) -> bytes:
    labels = [label.encode() for label in name.rstrip(".").split(".") if label]
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\0"


def dns_query(port: int, name: str, qtype: str = "A", timeout: float = 1.0) -> tuple[int, int]:
    """One UDP query to 127.0.0.1: (rcode, answer count), or (-1, 0) when no answer."""
    ident = random.randrange(65536)
    packet = struct.pack("!6H", ident, 0x0100, 1, 0, 0, 0)
    packet += encode_name(name) + struct.pack("!2H", QTYPE[qtype], 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(packet, ("127.0.0.1", port))
            data = sock.recv(65535)
        except OSError:
            return -1, 0
    if len(data) < 12:
        return -1, 0
    answer_id, flags, _, answers = struct.unpack("!4H", data[:8])
    if answer_id != ident or not flags & 0x8000:
        return -1, 0
    return flags & 0xF, answers


def resolves(port: int, name: str, qtype: str = "A") -> bool:
    rcode, answers = dns_query(port, name, qtype)
    return rcode == 0 and answers > 0


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except (OSError, ValueError):
        return 0, b""


def read_vips(server: Server, url: str | None) -> dict[str, Any]:
    """The whole VIP table: every page of GET /vips, following C{next}."""
    table: dict[str, Any] | None = None
    while url is not None:
        status, body = http_get(url)
        if status != 200:
            raise server.failed(f"GET {url} answered {status}")
        page = json.loads(body)
        if table is None:
            table = page
        else:
            table["items"] += page["items"]
        url = page["next"]
    assert table is not None
    return table


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise BenchError("no free port on 127.0.0.1")


def write_services(directory: Path, count: int) -> None:
    """N Dataplanes (svc-0 ... svc-N-1 in mesh default) in one JSON resources file."""
    directory.mkdir(parents=True, exist_ok=True)
    documents = [
        {
            "type": "Dataplane",
            "mesh": "default",
            "name": f"bench-{i}",
            "networking": {
                "address": f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}",
                "inbound": [{"port": 8080, "tags": {"kuma.io/service": f"svc-{i}"}}],
            },
        }
        for i in range(count)
    ]
    (directory / "services.json").write_text(json.dumps(documents))


def start_kumazone(work: Path, label: str, count: int) -> tuple[Server, dict[str, Any]]:
    """A standalone zone with C{count} services, ready and answering the last of them."""
    resources = work / f"{label}-resources"
    write_services(resources, count)
    data = work / f"{label}-data"
    log = work / f"{label}.log"
    server = Server(
        label,
        [
            str(BIN / "twistd"),
            "-n",
            "--pidfile=",
            f"--logfile={log}",
            "kumazone",
            "--role=zone",
            "--zone=bench",
            f"--resources={resources}",
            "--dns-port=0",
            "--api-port=0",
            "--diagnostics-port=0",
            "--dns-interface=127.0.0.1",
            f"--data-dir={data}",
        ],
        work,
        [log],
    )
    ports: dict[str, Any] = {}

    def read_ports() -> bool:
        try:
            ports.update(json.loads((data / "ports.json").read_text()))
        except (OSError, ValueError):
            return False
        return all(key in ports for key in ("dns", "api", "diagnostics"))

    timeout = 120 + count / 200  # bounded, generous for 100,000 services on a slow machine
    server.wait_until(read_ports, timeout, "ports.json")
    server.port = int(ports["dns"])
    last = f"svc-{count - 1}.mesh"
    ready_url = f"http://127.0.0.1:{ports['diagnostics']}/ready"
    startup = server.wait_until(
        lambda: http_get(ready_url)[0] == 200 and resolves(server.port, last),
        timeout,
        f"/ready 200 and an answer for {last}",
    )
    return server, {"startup": startup, "api": int(ports["api"])}


def write_zone_file(path: Path, table: dict[str, Any]) -> int:
    """The records kumazone serves, as a BIND zone file; returns the number of names."""
    lines = [
        "$ORIGIN mesh.",
        "$TTL 60",
        "@ IN SOA ns.dns.mesh. hostmaster.mesh. 1 3600 600 86400 60",
        "@ IN NS ns.dns.mesh.",
    ]
    names = 0
    for item in table["items"]:
        for name in item["names"]:
            lines.append(f"{name}. IN A {item['vip']}")
            lines.append(f"{name}. IN AAAA {item['vip6']}")
            names += 1
    path.write_text("\n".join(lines) + "\n")
    return names


def wait_answering(server: Server, last: str, timeout: float = 120) -> None:
    server.wait_until(
        lambda: resolves(server.port, "mesh", "SOA") and resolves(server.port, last),
        timeout,
        f"answer for {last}",
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


def start_nsd(work: Path, zone_file: Path, last: str) -> Server:
    """NSD in the foreground, everything in the temp dir, rate limiting off."""
    port = free_port()
    nsd_dir = work / "nsd"
    nsd_dir.mkdir()
    log = nsd_dir / "nsd.log"
    conf = nsd_dir / "nsd.conf"
    conf.write_text(
        f"""server:
    ip-address: 127.0.0.1
    port: {port}
    do-ip6: no
    server-count: 1
    username: ""
    zonesdir: "{nsd_dir}"
    database: ""
    zonelistfile: "{nsd_dir}/zone.list"
    xfrdfile: "{nsd_dir}/xfrd.state"
    xfrdir: "{nsd_dir}"
    pidfile: "{nsd_dir}/nsd.pid"
    logfile: "{log}"
    cookie-secret-file: "{nsd_dir}/cookiesecrets.txt"
    zonefiles-write: 0
    rrl-ratelimit: 0
    rrl-whitelist-ratelimit: 0
remote-control:
    control-enable: no
zone:
    name: mesh
    zonefile: "{zone_file}"
"""
    )
    server = Server("nsd", [tool("nsd") or "nsd", "-d", "-c", str(conf)], work, [log])
    server.port = port
    wait_answering(server, last)
    return server


def write_queries(path: Path, table: dict[str, Any], count: int = 100_000) -> None:
    """90% existing names (A and AAAA, half each), 10% unknown names in the domain."""
    rng = random.Random(7)
    names = [name for item in table["items"] for name in item["names"]]
    lines = []
    for i in range(count):
        qtype = "A" if rng.random() < 0.5 else "AAAA"
        if i % 10 == 9:
            lines.append(f"no-such-{rng.randrange(10**9)}.mesh {qtype}")
        else:
            lines.append(f"{rng.choice(names)} {qtype}")
    path.write_text("\n".join(lines) + "\n")


def udp_drops(port: int) -> int:
    """Datagrams dropped by full receive buffers of the UDP sockets bound to C{port}."""
    total = 0
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) > 12 and int(fields[1].rsplit(":", 1)[1], 16) == port:
            total += int(fields[-1])
    return total


def dnsperf(
    port: int, queries: Path, seconds: int, rate: int = 0, once: bool = False
) -> dict[str, float]:
    """One dnsperf run on DNSPERF_CPU: full speed, or C{rate} queries per second.

    With C{once}, one pass through the query file at full speed instead of
    C{seconds} (which then only bounds how long it may take).
    """
    command = [
        "taskset", "-c", DNSPERF_CPU, "dnsperf",
        "-s", "127.0.0.1", "-p", str(port), "-d", str(queries),
        *(["-n", "1"] if once else ["-l", str(seconds)]), "-c", "4", "-t", "2",
    ]  # fmt: skip
    if rate:
        command += ["-Q", str(rate), "-q", "1000", "-v"]
    else:
        command += ["-q", "200"]
    drops = udp_drops(port)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        raise BenchError(f"dnsperf did not finish within {seconds + 60} s") from None
    drops = udp_drops(port) - drops
    out = done.stdout
    if done.returncode != 0 or "Queries per second" not in out:
        raise BenchError(f"dnsperf failed ({done.returncode}): {done.stderr.strip()[-2000:]}")

    def number(pattern: str) -> float:
        match = re.search(pattern, out)
        return float(match.group(1)) if match else float("nan")

    result = {
        "qps": number(r"Queries per second:\s+([\d.]+)"),
        "sent": number(r"Queries sent:\s+(\d+)"),
        "lost": number(r"Queries lost:\s+(\d+)"),
        "drops": drops,
        "mean_ms": number(r"Average Latency \(s\):\s+([\d.]+)") * 1000,
        "response_bytes": number(r"Average packet size:.*response\s+(\d+)"),
    }
    if rate:
        # -v: one line per response, "> NOERROR svc-1.mesh A 0.000123" (seconds).
        latencies = sorted(float(m) for m in re.findall(r"(?m)^> \S+ \S+ \S+ ([\d.]+)$", out))
        if not latencies:
            raise BenchError("dnsperf -v printed no latencies")
        result["mean_ms"] = statistics.fmean(latencies) * 1000
        result["p99_ms"] = latencies[math.ceil(0.99 * len(latencies)) - 1] * 1000
        result["answered"] = len(latencies)
    return result


def command_line(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (done.stdout + done.stderr).strip()


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "?",
    )
    return (
        f"{platform.node()}, {cpu}, {os.cpu_count()} logical CPUs, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def versions() -> str:
    import twisted

    nsd = re.search(r"NSD version (\S+)", command_line([tool("nsd") or "nsd", "-v"]))
    perf = re.search(r"Version (\S+)", command_line(["dnsperf", "-h"]))
    commit = command_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    return (
        f"kumazone {commit.splitlines()[-1] if commit else '?'}, Twisted {twisted.__version__}, "
        f"NSD {nsd.group(1) if nsd else '?'}, dnsperf {perf.group(1) if perf else '?'}"
    )


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (5 min {five:.2f})"


def raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def check_tools() -> None:
    absent = [name for name in TOOLS if tool(name) is None]
    if absent:
        packages = " ".join(sorted({TOOLS[name] for name in absent}))
        raise BenchError(
            f"{', '.join(absent)} missing; install with: apt-get install -y {packages}"
        )
    if not (BIN / "twistd").exists():
        raise BenchError(
            f"{BIN / 'twistd'} is missing: run with the Python of kumazone's venv "
            "(make bench, or .venv/bin/python bench/dns_bench.py)"
        )
    if (os.cpu_count() or 1) < 2:
        raise BenchError("needs two CPUs: the servers on CPU 0, dnsperf on CPU 1")


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
    print(f"\nmachine: {machine()}")
    print(f"versions: {versions()}")
    print(f"load average: {report['load_start']} at start, {report['load_end']} at end")
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
