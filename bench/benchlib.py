"""What the benchmarks share: servers pinned to a CPU, DNS queries, dnsperf, the machine.

Used by dns_bench.py, churn_bench.py and federation.py (run with the Python of
kumazone's venv: the servers are started with the twistd beside it).  Every server
started through L{Server} is registered in L{RUNNING}, and L{stop_all} stops them, so
that a script's C{finally} leaves nothing behind on an error or Ctrl-C.
"""

from __future__ import annotations

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
import threading
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
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


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


def cpu_seconds(pid: int) -> float:
    """utime + stime of C{pid} from /proc/PID/stat, in seconds (0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def all_cpus() -> str:
    """Every CPU, for taskset: processes that share the machine as they would in use."""
    return f"0-{(os.cpu_count() or 1) - 1}"


class Server:
    """A server process pinned to C{cpus} (SERVER_CPU unless told); always stopped."""

    def __init__(
        self,
        label: str,
        command: list[str],
        work: Path,
        logs: list[Path],
        cpus: str = SERVER_CPU,
    ) -> None:
        self.label = label
        self.port = 0
        self.output = work / f"{label}.out"
        self.logs = [*logs, self.output]
        self.started = time.monotonic()
        self.started_wall = time.time()  # to compare with the servers' own timestamps
        with self.output.open("wb") as out:
            self.process = subprocess.Popen(
                ["taskset", "-c", cpus, *command],
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

    def cpu_seconds(self) -> float:
        """User and system CPU time of the server and every process under it (/proc)."""
        return sum(cpu_seconds(pid) for pid in [self.pid, *descendants(self.pid)])

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


def http_request(
    url: str, method: str = "GET", document: Any = None, timeout: float = 120
) -> tuple[int, Any, float]:
    """One HTTP request with a JSON body: (status, decoded body or None, seconds taken)."""
    data = None if document is None else json.dumps(document).encode()
    request = urllib.request.Request(
        url, method=method, data=data, headers={"Content-Type": "application/json"}
    )
    start = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    except (OSError, ValueError):
        return 0, None, time.monotonic() - start
    taken = time.monotonic() - start
    try:
        return status, json.loads(body) if body else None, taken
    except ValueError:
        return status, None, taken


def dataplane(name: str, service: str, address: str, mesh: str = "default") -> dict[str, Any]:
    """A Dataplane with one inbound for C{service}."""
    return {
        "type": "Dataplane",
        "mesh": mesh,
        "name": name,
        "networking": {
            "address": address,
            "inbound": [{"port": 8080, "tags": {"kuma.io/service": service}}],
        },
    }


def address(i: int, first: int = 10) -> str:
    """The C{i}th of 16 million IPv4 addresses in C{first}.0.0.0/8."""
    return f"{first}.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}"


def write_dataplanes(path: Path, count: int, prefix: str, first: int = 10) -> None:
    """C{count} Dataplanes C{prefix}-0 ... (service C{prefix}-i each) as one JSON file.

    Written in pieces, so that a million of them do not sit in memory at once.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        out.write("[")
        for start in range(0, count, 10_000):
            chunk = [
                json.dumps(dataplane(f"{prefix}-{i}", f"{prefix}-{i}", address(i, first)))
                for i in range(start, min(count, start + 10_000))
            ]
            out.write(("," if start else "") + ",".join(chunk))
        out.write("]")


def in_background(work: Callable[[], Any]) -> Callable[[], Any]:
    """Run C{work} in a thread; the returned function joins it and returns its result."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = work()
        except BaseException as e:  # handed to the joining thread
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> Any:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["result"]

    return join


def mem_available_mb() -> float:
    """MemAvailable from /proc/meminfo."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def percentile(values: list[float], fraction: float) -> float:
    """The C{fraction} (0..1) percentile, nearest rank; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


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
    return start_zone(work, label, resources, f"svc-{count - 1}.mesh", 120 + count / 200)


def start_zone(
    work: Path,
    label: str,
    resources: Path,
    last: str | None,
    timeout: float,
    extra: list[str] | None = None,
    cpus: str = SERVER_CPU,
) -> tuple[Server, dict[str, Any]]:
    """A zone on C{resources}, ready (/ready 200) and answering C{last} (unless None).

    The result's C{startup} is the seconds from starting the process until then;
    C{api}, C{diagnostics} and C{dns} are its ports.  C{extra}: more twistd flags
    (--global, --tls-*: a zone of a federation; its zone name is C{label}).
    """
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
            *(["--zone=bench"] if extra is None else [f"--zone={label}", *extra]),
            f"--resources={resources}",
            "--dns-port=0",
            "--api-port=0",
            "--diagnostics-port=0",
            "--dp-port=0",  # zones with TLS serve dataplanes: several on one host
            "--dns-interface=127.0.0.1",
            f"--data-dir={data}",
        ],
        work,
        [log],
        cpus,
    )
    ports: dict[str, Any] = {}

    def read_ports() -> bool:
        try:
            ports.update(json.loads((data / "ports.json").read_text()))
        except (OSError, ValueError):
            return False
        return all(key in ports for key in ("dns", "api", "diagnostics"))

    server.wait_until(read_ports, timeout, "ports.json")
    server.port = int(ports["dns"])
    ready_url = f"http://127.0.0.1:{ports['diagnostics']}/ready"
    startup = server.wait_until(
        lambda: http_get(ready_url)[0] == 200 and (last is None or resolves(server.port, last)),
        timeout,
        "/ready 200" + ("" if last is None else f" and an answer for {last}"),
    )
    return server, {
        "startup": startup,
        "api": int(ports["api"]),
        "diagnostics": int(ports["diagnostics"]),
        "dns": int(ports["dns"]),
    }


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
    port: int,
    queries: Path,
    seconds: int,
    rate: int = 0,
    once: bool = False,
    latencies: bool = True,
) -> dict[str, float]:
    """One dnsperf run on DNSPERF_CPU: full speed, or C{rate} queries per second.

    With C{once}, one pass through the query file at full speed instead of
    C{seconds} (which then only bounds how long it may take).  At a C{rate}, with
    C{latencies}, every response's latency (C{-v}) for the mean and the p99.
    """
    command = [
        "taskset", "-c", DNSPERF_CPU, "dnsperf",
        "-s", "127.0.0.1", "-p", str(port), "-d", str(queries),
        *(["-n", "1"] if once else ["-l", str(seconds)]), "-c", "4", "-t", "2",
    ]  # fmt: skip
    if rate:
        command += ["-Q", str(rate), "-q", "1000", *(["-v"] if latencies else [])]
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
        "completed": number(r"Queries completed:\s+(\d+)"),
        "lost": number(r"Queries lost:\s+(\d+)"),
        "drops": drops,
        "mean_ms": number(r"Average Latency \(s\):\s+([\d.]+)") * 1000,
        "response_bytes": number(r"Average packet size:.*response\s+(\d+)"),
    }
    if rate and latencies:
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


def print_machine(report: dict[str, Any]) -> None:
    """The lines every benchmark's table starts with: the machine, versions, load."""
    print(f"\nmachine: {machine()}")
    print(f"versions: {versions()}")
    print(f"load average: {report['load_start']} at start, {report['load_end']} at end")
