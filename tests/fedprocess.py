"""Run a real federation: a `twistd -n kumazone --role=global` and zones synced to it.

L{GlobalProcess} is the global control plane in a child process (like
L{tests.kzprocess.ZoneProcess}, which runs the zones); it restarts on the same data
directory and the same kds port, so that zones, which reconnect to a fixed
address, find it again.  L{make_certs} runs ``kumazone certs``; L{start_zone}
starts a zone synced to a global; L{ProcessGroup} stops whatever was started, and
L{wait_until} polls with a deadline.  L{free_port}, L{write_service} and
L{answer} are the small helpers the federation and replica tests share.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tests.kzprocess import TWISTD, ControlPlaneProcess, ZoneProcess

__all__ = [
    "GlobalProcess",
    "Metrics",
    "ProcessGroup",
    "answer",
    "free_port",
    "make_certs",
    "parse_metrics",
    "start_zone",
    "tls_args",
    "wait_until",
    "write_service",
]

T = TypeVar("T")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process that needs a fixed one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_service(directory: Path, service: str, address: str) -> Path:
    """C{directory} (made if missing) with one Dataplane, C{service}-1, of C{service}."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{service}.yaml").write_text(
        f"type: Dataplane\nmesh: default\nname: {service}-1\nnetworking:\n"
        f"  address: {address}\n  inbound:\n  - port: 80\n"
        f"    tags:\n      kuma.io/service: {service}\n"
    )
    return directory


def answer(zone: ZoneProcess, service: str) -> str | None:
    """The first record the zone's DNS answers for C{service}.mesh, or None."""
    message = zone.query(f"{service}.mesh", timeout=2.0)
    for rrset in message.answer:
        for record in rrset:
            return str(record)
    return None


def wait_until(
    predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.1, what: str = ""
) -> T:
    """Poll C{predicate} until it returns something true; return that.

    An C{AssertionError} or C{OSError} raised by the predicate counts as "not yet";
    at the deadline the last one (or the last false value) is in the failure.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            result = predicate()
            if result:
                return result
            last = result
        except (AssertionError, OSError, KeyError) as e:
            last = e
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"not true after {timeout:.0f}s: {what or predicate!r}; last: {last!r}"
            )
        time.sleep(interval)


def make_certs(out: Path, global_hosts: Sequence[str], zones: Sequence[str]) -> Path:
    """``kumazone certs --out OUT ...``: a CA, the global's and each zone's certificate."""
    command = [sys.executable, "-m", "kumazone", "certs", "--out", str(out)]
    for host in global_hosts:
        command += ["--global-host", host]
    for zone in zones:
        command += ["--zone", zone]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def tls_args(certs: Path, name: str) -> list[str]:
    """The TLS flags for the process whose certificate is C{certs}/C{name}.pem."""
    return [
        f"--tls-cert={certs / (name + '.pem')}",
        f"--tls-key={certs / (name + '-key.pem')}",
        f"--tls-ca={certs / 'ca.pem'}",
    ]


_SAMPLE = re.compile(r"\A([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)\Z")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Metrics:
    """Prometheus samples, parsed from the text format."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for line in text.splitlines():
            match = _SAMPLE.match(line)
            if match is None:
                continue
            name, labels, value = match.groups()
            self.samples.append((name, dict(_LABEL.findall(labels or "")), float(value)))

    def get(self, name: str, **labels: str) -> float | None:
        """The sum of the samples of C{name} that carry C{labels}; None if there is none."""
        found = [
            value
            for sample, have, value in self.samples
            if sample == name and all(have.get(k) == v for k, v in labels.items())
        ]
        return sum(found) if found else None


def parse_metrics(text: str) -> Metrics:
    """Prometheus text to L{Metrics}."""
    return Metrics(text)


class GlobalProcess(ControlPlaneProcess):
    """The global control plane in a child process."""

    def __init__(
        self,
        workdir: Path,
        certs: Path | None,
        args: Sequence[str] = (),
        data_dir: Path | None = None,
        kds_port: int = 0,
        name: str = "global",
    ) -> None:
        self.workdir = workdir
        self.certs = certs
        self.args = list(args)
        self.data_dir = data_dir or workdir / f"{name}-data"
        self.log_path = workdir / f"{name}.log"
        #: 0 until the first start has picked one; every restart reuses it.
        self.kds_port = kds_port
        self.process: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}

    def command(self) -> list[str]:
        command = [
            TWISTD,
            "-n",
            "--pidfile=",
            "--logfile=" + str(self.log_path),
            "kumazone",
            "--role=global",
            f"--kds-port={self.kds_port}",
            "--api-port=0",
            "--diagnostics-port=0",
            f"--data-dir={self.data_dir}",
        ]
        if self.certs is not None:
            command += tls_args(self.certs, "global")
        return command + self.args

    @property
    def address(self) -> str:
        """HOST:PORT for a zone's --global (the name is in the global's certificate)."""
        return f"localhost:{self.kds_port}"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 30.0) -> GlobalProcess:
        """Start and wait until /ready answers 200; later starts reuse the kds port."""
        super().start(timeout)
        self.kds_port = self.ports["kds"]
        return self

    def restart(self, timeout: float = 30.0) -> GlobalProcess:
        """Stop (if running) and start again: same data directory, same kds port."""
        self.stop()
        return self.start(timeout)

    def zones(self) -> dict[str, dict[str, Any]]:
        """GET /zones, by zone name."""
        status, document = self.api("GET", "/zones")
        assert status == 200, document
        return {item["name"]: item for item in document["items"]}

    def metrics(self) -> Metrics:
        status, text = self.http("diagnostics", "GET", "/metrics")
        assert status == 200
        return parse_metrics(text.decode())


def start_zone(
    workdir: Path,
    zone: str,
    global_address: str | None,
    certs: Path | None,
    resources: Path | None = None,
    cert_name: str | None = None,
    args: Sequence[str] = (),
    group: ProcessGroup | None = None,
    start: bool = True,
) -> ZoneProcess:
    """A zone synced to the global at C{global_address} (HOST:PORT).

    Each zone gets a directory of its own under C{workdir} (log and data).
    C{cert_name} picks another zone's certificate; C{certs=None} gives no TLS
    flags at all.  With a C{group}, the zone is stopped with the group.
    """
    home = workdir / zone
    suffix = 1
    while home.exists():
        suffix += 1
        home = workdir / f"{zone}.{suffix}"
    home.mkdir(parents=True)
    flags = [] if global_address is None else [f"--global={global_address}"]
    if certs is not None:
        flags += tls_args(certs, cert_name or zone)
    process = ZoneProcess(home, resources, zone=zone, args=[*flags, *args])
    if group is not None:
        group.add(process)  # before it starts, so that a failed start is stopped too
    return process.start() if start else process


class ProcessGroup:
    """Processes to stop at the end of a test (or a module), whatever happened."""

    def __init__(self) -> None:
        self.processes: list[GlobalProcess | ZoneProcess] = []

    def add(self, process: T) -> T:
        self.processes.append(process)  # type: ignore[arg-type]
        return process

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            try:
                process.stop()
            except Exception:  # one that will not stop must not keep the others running
                process.kill()
